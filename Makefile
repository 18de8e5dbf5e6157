# The two commands of the README. Both create .venv with the project installed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install lint unit e2e faults objectstores thirdparty bench clean

$(BIN)/ckpt-exporter: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

install: $(BIN)/ckpt-exporter

demo: install
	$(BIN)/ckpt-exporter demo

lint: install
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench
	$(BIN)/mypy daemon

unit: install
	$(BIN)/python -m pytest -q -m "not e2e and not faults and not objectstore and not thirdparty"

# Each test runs in one suite: objectstore-marked tests only in make
# objectstores, a test marked both e2e and faults only in make e2e.
e2e: install
	$(BIN)/python -m pytest -q -m "e2e and not objectstore"

faults: install
	$(BIN)/python -m pytest -q -m "faults and not e2e and not objectstore"

# Everything against real object-store servers on 127.0.0.1 (moto's S3,
# fake-gcs-server), started and stopped by the tests: the clients (with a
# fault-injecting proxy), the base-path backend, the daemon end to end and its
# object-store faults (about 10 minutes on 2 cores).
objectstores: install
	$(BIN)/python -m pytest -q -m objectstore

# Real third-party stacks, each in an environment of its own as a trainer's
# would be (about 8 minutes and 6 GB of venvs the first time): Model
# Garden (tf-models-official pins its own TensorFlow; the daemon runs its
# export worker there through worker_python) and Keras 3 on JAX.
MG_VENV  ?= .venv-modelgarden
JAX_VENV ?= .venv-jax
TRAINER_VENV ?= .venv-trainer

$(MG_VENV)/bin/python:
	$(PYTHON) -m venv $(MG_VENV)
	$(MG_VENV)/bin/pip install --quiet --upgrade pip
	$(MG_VENV)/bin/pip install --quiet 'tf-models-official~=2.20.0'

# A trainer's environment with plain `tensorflow`, then the daemon installed
# into it as a user would: tests/test_install.py checks that this added no
# second TensorFlow distribution.
$(TRAINER_VENV)/bin/ckpt-exporter: pyproject.toml
	$(PYTHON) -m venv $(TRAINER_VENV)
	$(TRAINER_VENV)/bin/pip install --quiet --upgrade pip
	$(TRAINER_VENV)/bin/pip install --quiet "tensorflow==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("tensorflow"))')"
	$(TRAINER_VENV)/bin/pip install --quiet .
	@touch $@

$(JAX_VENV)/bin/python:
	$(PYTHON) -m venv $(JAX_VENV)
	$(JAX_VENV)/bin/pip install --quiet --upgrade pip
	$(JAX_VENV)/bin/pip install --quiet 'jax>=0.4.30' 'keras>=3.5'

thirdparty: install $(MG_VENV)/bin/python $(JAX_VENV)/bin/python $(TRAINER_VENV)/bin/ckpt-exporter
	CKPT_EXPORTER_MODELGARDEN_PYTHON=$(abspath $(MG_VENV))/bin/python \
	CKPT_EXPORTER_TRAINER_PYTHON=$(abspath $(TRAINER_VENV))/bin/python \
	CKPT_EXPORTER_JAX_PYTHON=$(abspath $(JAX_VENV))/bin/python \
	$(BIN)/python -m pytest -q -m thirdparty

# The benchmark suite (about 15 minutes on 2 cores): a table on stdout, JSON in bench/results.json.
bench: install
	$(BIN)/python bench/run.py

# Lint and the fast tests (about 2 minutes on 2 cores). The heavy suites have
# targets of their own, which CI runs too: make e2e (real trainers, daemons and
# signals, about 18 minutes), make faults (about 7 minutes), make
# objectstores (about 9 minutes) and make thirdparty (about 8 minutes with
# its venvs made from scratch).
test: lint
	$(BIN)/python -m pytest -q -m "not e2e and not faults and not objectstore and not thirdparty"

clean:
	rm -rf $(VENV) $(MG_VENV) $(JAX_VENV) $(TRAINER_VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
