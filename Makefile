.PHONY: demo test lint

# A 3-trial sweep campaign of gpt-pretrain on the CPU, then its history.
demo:
	./scripts/demo.sh

# The whole test suite (lint, types, pytest).
test:
	./scripts/test.sh

lint:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .
