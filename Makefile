# `make serve` and `make test` work on a fresh machine: each creates the virtualenv if it is missing.
VENV ?= .venv
PYTHON ?= python3
# The CPU wheel lies on disk on our dev/CI machines; GPU users may set TORCH=torch to keep their own build.
TORCH ?= torch==2.13.0
# The interpreter the CPU tests run the kernels in changes between Triton releases; the suite is kept green on
# this one (CUDA builds of torch bring their own Triton: set TRITON=triton to leave it alone).
TRITON ?= triton==3.7.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" "$(TRITON)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/infomamba serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
