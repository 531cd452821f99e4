# One entry point for people and CI. `make demo` and `make test` are the README's quick start.
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Create .venv and install pai-usage with every extra and the dev tools

.PHONY: demo
demo: $(STAMP) ## Run the offline Ad Creator on the embedded SQLite default and print the summary
	$(BIN)/python -m examples.ad_creator

.PHONY: test
test: $(STAMP) ## Run the whole test suite (SQLite and PostgreSQL)
	$(BIN)/pytest -q

.PHONY: lint
lint: $(STAMP) ## ruff and pyright (strict)
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/pyright

.PHONY: format
format: $(STAMP)
	$(BIN)/ruff format
	$(BIN)/ruff check --fix

.PHONY: bench
bench: $(STAMP) ## Run the benchmarks and print ratios against same-run baselines
	$(BIN)/python -m benchmarks

.PHONY: help
help:
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'
