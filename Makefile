# dvswitch: `make demo` sets everything up and runs the demo; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint unit bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "dvswitch needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/dvs demo --hosts 8 --vms 64 --moves 20

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q

unit: install
	$(BIN)/python -m pytest -q -m "not cluster"

bench: install
	$(BIN)/dvs bench --hosts 8,32 --vms 1280 --moves 200 --out bench-results

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
