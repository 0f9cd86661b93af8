# The two commands a new user runs: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/observatory demo

# pytest exits 5 when it collected no tests: that must fail too, and it does (make stops on any non-zero exit).
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q -m "not slow" -p no:cacheprovider --numprocesses auto --maxprocesses 4

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src

bench: $(STAMP)
	for script in benchmarks/*.py; do [ $$script = benchmarks/bench_common.py ] || $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) observatory-data .pytest_cache .mypy_cache .ruff_cache
