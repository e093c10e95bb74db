# The two commands of the README, and a few helpers. Each runs scripts/setup.sh first,
# which installs what is missing and returns at once when everything is there.
.PHONY: setup test run bench mutate lint format clean

setup:
	@bash scripts/setup.sh

test:
	@bash scripts/test.sh $(ARGS)

run:
	@bash scripts/run.sh $(ARGS)

bench: setup
	@bash scripts/bench.sh $(ARGS)

# The mutation benchmark (bench/mutation.py): plants one bug at a time in a copy of the
# tree and runs the fast tests that cover it. ~30-60 min; not part of `make test`.
mutate: setup
	@bash scripts/isolated.sh .venv/bin/python bench/mutation.py $(ARGS)

lint: setup
	@.venv/bin/ruff check . && .venv/bin/ruff format --check .

format: setup
	@.venv/bin/ruff format . && .venv/bin/ruff check --fix .

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache
