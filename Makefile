# The two set-up commands of the README: `make speedrun` (the main job) and `make test`.
PYTHON ?= python3
# On a CPU-only machine this pin takes the CPU wheel of torch 2.13.0 that pip finds locally;
# on a GPU machine the same pin resolves to PyPI's CUDA wheel. Override with TORCH=... to choose.
TORCH ?= torch==2.13.0

.PHONY: install speedrun test
install:
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e '.[dev]'

speedrun: install
	$(PYTHON) -m nanor1.cli speedrun

test: install
	$(PYTHON) -m pytest
