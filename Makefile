.PHONY: demo test test-quick lint kind-e2e

# A 3-trial sweep campaign of gpt-pretrain on the CPU, then its history.
demo:
	./scripts/demo.sh

# The whole test suite: lint, types, pytest (the real gpt-pretrain campaign included).
test:
	./scripts/test.sh

# Everything but the minutes-long runs of the real train.py.
test-quick:
	./scripts/test.sh -m "not slow"

lint:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

# On a machine with Docker, kind, kubectl and helm: the chart on a throwaway cluster,
# a CPU-sized campaign to 3 trials.
kind-e2e:
	./scripts/kind-e2e.sh
