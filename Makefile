# The two commands of the README, and a few helpers. Each runs scripts/setup.sh first,
# which installs what is missing and returns at once when everything is there.
.PHONY: setup test run bench lint format clean

setup:
	@bash scripts/setup.sh

test:
	@bash scripts/test.sh $(ARGS)

run:
	@bash scripts/run.sh $(ARGS)

bench: setup
	@bash scripts/bench.sh $(ARGS)

lint: setup
	@.venv/bin/ruff check . && .venv/bin/ruff format --check .

format: setup
	@.venv/bin/ruff format . && .venv/bin/ruff check --fix .

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache
