# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both set up .venv first. The venv sees the packages of the python that made it (also when that
# python is itself a virtual environment, through a .pth file), so a machine that already has
# PyTorch (a GPU image, say) keeps its own build; otherwise TORCH_SPEC is installed.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test verify clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PYTHON) -c "import site; print('\n'.join(site.getsitepackages()))" > \
	  "$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_parent_site.pth"
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev]" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/flashdispatch demo

test: setup
	$(BIN)/python -m pytest -q

verify: setup
	$(BIN)/flashdispatch verify --tier full

clean:
	rm -rf $(VENV) build src/*.egg-info
