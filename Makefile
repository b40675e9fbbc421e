# The README's two commands, `make demo` and `make test`, do all set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# The venv sees system site-packages so that a torch already installed (say a CUDA build on a
# GPU box) is kept; only where none is importable do we install the CPU wheel.
TORCH_CPU := torch==2.13.0

.PHONY: install install-test demo test bench bench-pipeline clean

$(PY):
	python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m batchgen demo

test: install-test
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q tests

bench: install-test
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m batchgen bench --json

# The same model as a 1,000-row Ray job at 1 and 2 replicas, against the bare engine (~12 min on 2 cores).
bench-pipeline: install-test
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m batchgen bench --pipeline --skip-hf --json

clean:
	rm -rf $(VENV) demo-out
