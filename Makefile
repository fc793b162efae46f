# `make test` and `make demo` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# ComfyUI tests (`make comfy-test`): a ComfyUI checkout and the Python environment it runs in.
COMFYUI_PATH ?= $(HOME)/comfy-run/ComfyUI
COMFY_VENV ?= $(HOME)/comfy-run/venv
COMFY_OVERLAY := .comfy-venv-$(notdir $(patsubst %/,%,$(dir $(COMFYUI_PATH))))

.PHONY: venv test demo bench lint lint-js comfy-test clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch only when no torch is importable (never a multi-GB CUDA build by accident).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt
	# the library, trainer, demo and test bed by name (an editable install: edits apply at once)
	$(PIP) install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

test: venv lint-js
	# pytest, not `python -m pytest`: -m would put this folder on sys.path, where `nodes` is ours, not ComfyUI's
	$(VENV)/bin/pytest -ra tests

# JS lint of web/ (ESLint from the npm registry); skipped with a visible reason without node.
lint-js:
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then \
		test -x node_modules/.bin/eslint || npm ci --no-audit --no-fund; \
		npm run -s lint; \
	else \
		echo "SKIPPED JS lint: node/npm not found (install Node.js >= 18 to lint web/)"; \
	fi

lint: lint-js

demo: venv
	$(PY) demo/run_demo.py --out demo_out

bench: venv
	$(PY) bench/core_forward.py

# The whole suite with ComfyUI importable (integration, server and browser tests run instead of
# skipping). It runs in an overlay environment: ComfyUI's packages (torch, ...) plus this checkout
# installed by name, so ComfyUI's own environment is never changed.
#   make comfy-test COMFYUI_PATH=~/comfy-run-080/ComfyUI COMFY_VENV=~/comfy-run-080/venv
$(COMFY_OVERLAY)/.installed: pyproject.toml requirements-dev.txt
	test -x $(COMFY_VENV)/bin/python || (echo "COMFY_VENV=$(COMFY_VENV) has no bin/python" >&2; exit 2)
	$(COMFY_VENV)/bin/python -m venv --clear $(COMFY_OVERLAY)
	$(COMFY_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
		> `$(COMFY_OVERLAY)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"`/comfy-venv.pth
	$(COMFY_OVERLAY)/bin/pip install -q -r requirements-dev.txt
	# its own pytest launcher even when ComfyUI's environment has pytest (see `test` on `python -m pytest`)
	$(COMFY_OVERLAY)/bin/pip install -q --ignore-installed --no-deps pytest
	# browser tests (tests/e2e) drive Debian's chromium through playwright (no `playwright install`)
	$(COMFY_OVERLAY)/bin/pip install -q playwright
	$(COMFY_OVERLAY)/bin/pip install -q --no-deps -e .
	touch $@

comfy-test: $(COMFY_OVERLAY)/.installed
	COMFYUI_PATH=$(COMFYUI_PATH) COMFYUI_PYTHON=$(COMFY_VENV)/bin/python $(COMFY_OVERLAY)/bin/pytest -ra tests

clean:
	rm -rf $(VENV) .comfy-venv-* demo_out .pytest_cache
