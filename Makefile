# `make serve` and `make test` work on a fresh machine: each creates the virtualenv if it is missing.
VENV ?= .venv
PYTHON ?= python3
# The CPU wheel lies on disk on our dev/CI machines; GPU users may set TORCH=torch to keep their own build.
TORCH ?= torch==2.13.0
# The interpreter the CPU tests run the kernels in changes between Triton releases; the suite is kept green on
# this one (CUDA builds of torch bring their own Triton: set TRITON=triton to leave it alone).
TRITON ?= triton==3.7.1
# Every other version comes from requirements.lock (python .ci/lock.py, `make lock`), as in docker/Dockerfile.
# A GPU host keeping its own torch build may need LOCK= (no constraints) if that build pins other versions.
LOCK ?= requirements.lock
CONSTRAINTS := $(if $(LOCK),-c $(LOCK))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test install lock clean image-check

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(CONSTRAINTS)
	$(PY) -m pip install -q "$(TORCH)" "$(TRITON)" $(CONSTRAINTS)
	$(PY) -m pip install -q -e ".[test,bench]" $(CONSTRAINTS)
	touch $(STAMP)

install: $(STAMP)

# Rewrite requirements.lock from the venv: after changing a dependency in pyproject.toml, install it, then lock.
lock:
	test -x $(PY) || { echo "no $(VENV): run make install first"; exit 1; }
	$(PY) .ci/lock.py > requirements.lock.new && mv requirements.lock.new requirements.lock

serve: $(STAMP)
	$(VENV)/bin/infomamba serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

# Build the CPU image and smoke-test it (needs a Docker daemon; minutes cold). Not part of `test`: CI has no daemon.
# Settings (base image, a local torch wheel, a proxy's CA) are env vars: see docker/image-check.sh.
image-check:
	docker/image-check.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
