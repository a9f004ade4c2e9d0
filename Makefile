PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= $(CURDIR)/.demo

.PHONY: setup demo check test quick soak bench clean protos gpu-check

$(BIN)/edgemoe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[cpu,test]'
	touch $@

setup: $(BIN)/edgemoe

demo: setup
	$(BIN)/edgemoe demo --dir $(DEMO_DIR)

protos: setup
	bash protos/generate.sh $(BIN)/python

# Lint, types and the layering rule (tests/test_layers.py). mypy needs the folders under
# their import names: a tree of links lays them out as the wheel does.
check: setup
	$(BIN)/ruff check coordinator node edgemoe tests
	rm -rf build/typecheck && mkdir -p build/typecheck/edgemoe
	ln -s $(CURDIR)/edgemoe/__init__.py $(CURDIR)/coordinator $(CURDIR)/node $(CURDIR)/protos build/typecheck/edgemoe/
	cd build/typecheck && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p edgemoe
	$(BIN)/python -m pytest -q tests/test_layers.py

test: setup check
	$(BIN)/python -m pytest -q

# For development: everything but the long tests and the root/namespace ones.
quick: setup
	$(BIN)/python -m pytest -q -m "not slow and not netns"

# The long form of the reliability suite (README, Reliability): the 1,000-request serve soak,
# 25 kill trials, 500 fuzz examples per property. Minutes, not part of `make test`.
soak: setup
	EDGEMOE_SOAK=1 $(BIN)/python -m pytest -q tests/test_soak.py tests/test_faults.py tests/test_fuzz.py

# On the GPU machine (../shared/gpu/README.md, after `source .gpu-b/on-device.sh`; no venv
# there): the same-answer suite and a short bench, logs under $$OUT. CI has no GPU.
gpu-check:
	bash .ci/gpu-check

bench: setup
	$(BIN)/edgemoe demo-model $(DEMO_DIR)/bench-src --size random
	$(BIN)/edgemoe pack $(DEMO_DIR)/bench-src $(DEMO_DIR)/bench-packed --force
	$(BIN)/edgemoe bench --model $(DEMO_DIR)/bench-packed --cache-mb 4.5 --in-place $(DEMO_DIR)/bench-src

clean:
	rm -rf $(VENV) $(DEMO_DIR)
