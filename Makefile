# The two quick-start commands: `make demo` and `make test`; `make docs` builds the documentation site. Each builds .venv on first use.
# Another environment: `VENV=.venv-prefect388 CONSTRAINTS=.ci/constraints-prefect-3.8.8.txt make test`.
VENV ?= .venv
PYTHON ?= python3
CONSTRAINTS ?=
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $@

.PHONY: install demo test lint bench docs
install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/nanobanana demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python -m bench

# The documentation site (docs/, mkdocs.yml) into site/; a warning fails it.
$(BIN)/.docs-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e ".[docs]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $@

docs: $(BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
