# The two set-up commands of the README: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV ?= .venv
# torch/torchvision are installed first and explicitly (a CUDA build that also runs on CPU);
# deepspeed is then built against that torch (--no-build-isolation) instead of pulling another copy.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
# uv unpacks wheels in parallel (torch's CUDA libraries are 5 GB), pip one file after another. Byte-compiled at install
# (as pip does): where PYTHONDONTWRITEBYTECODE is set, every process would compile torch's modules again.
# uv reads no pip.conf; where packages must come from an index pip is configured for:
#   make venv PIP_INSTALL="$(PY) -m pip install"
PIP_INSTALL ?= $(VENV)/bin/uv pip install --python $(PY) --compile-bytecode
STAMP := $(VENV)/.installed
# DeepSpeed's JIT-built CPU ops live in the venv, built once by `make venv` (not by the first test launch).
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
# The venv's bin first for every target: torch builds and checks those ops with the `ninja` it finds on PATH, and
# two ninja versions (the venv's and the system's) read each other's build log as stale and rebuild (25-70 s per op).
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv test lint demo compare bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	$(PIP_INSTALL) -q setuptools wheel $(TORCH_PKGS)
	$(PIP_INSTALL) -q --no-build-isolation -e '.[dev]'
	DS_ACCELERATOR=cpu $(PY) scripts/build_ds_ops.py
	touch $(STAMP)

test: venv
	$(PY) -m ruff check livt_ds scripts tests
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -x -n 3 --dist loadgroup --durations=15 tests

lint: venv
	$(PY) -m ruff check livt_ds scripts tests

demo: venv
	bash scripts/demo.sh

compare: venv
	bash scripts/compare_losses.sh

bench: venv
	DS_ACCELERATOR=cpu $(PY) scripts/bench_train.py --device cpu

clean:
	rm -rf runs
