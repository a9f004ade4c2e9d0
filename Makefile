PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= $(CURDIR)/.demo

.PHONY: setup demo test quick bench clean protos

$(BIN)/edgemoe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/edgemoe

demo: setup
	$(BIN)/edgemoe demo --dir $(DEMO_DIR)

protos: setup
	bash protos/generate.sh $(BIN)/python

test: setup
	$(BIN)/python -m pytest -q

# For development: everything but the long tests and the root/namespace ones.
quick: setup
	$(BIN)/python -m pytest -q -m "not slow and not netns"

bench: setup
	$(BIN)/edgemoe demo-model $(DEMO_DIR)/bench-src --size random
	$(BIN)/edgemoe pack $(DEMO_DIR)/bench-src $(DEMO_DIR)/bench-packed --force
	$(BIN)/edgemoe bench --model $(DEMO_DIR)/bench-packed --cache-mb 4.5 --in-place $(DEMO_DIR)/bench-src

clean:
	rm -rf $(VENV) $(DEMO_DIR)
