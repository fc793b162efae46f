# `make test` and `make demo` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: venv test demo bench lint lint-js clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# CPU torch only when no torch is importable (never a multi-GB CUDA build by accident).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

test: venv lint-js
	$(PY) -m pytest -ra tests

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
	$(PY) train/demo.py --out demo_out

bench: venv
	$(PY) bench/core_forward.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
