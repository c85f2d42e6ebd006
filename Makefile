.PHONY: demo test test-e2e lint

# A 3-trial sweep campaign of gpt-pretrain on the CPU, then its history.
demo:
	./scripts/demo.sh

# The test suite (lint, types, pytest; the slow end-to-end campaign is `make test-e2e`).
test:
	./scripts/test.sh

# The end-to-end campaign of the real gpt-pretrain at its cpu profile.
test-e2e:
	./scripts/test.sh -m slow

lint:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .
