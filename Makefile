# The two commands: `make demo` and `make test`. Each creates .venv when missing
# (idempotent: a stamp tracks pyproject.toml and constraints.txt) and then does its job.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PKGS := dataset-fashion-mnist espeak-ng flite sox
PYTEST_ARGS ?=

.PHONY: test demo venv sysdeps data lint models bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# constraints.txt holds torch/torchvision/torchaudio exactly: pip never picks a torch.
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all]'
	@touch $(STAMP)

# Debian packages for the offline demo data (DESIGN.md section 9). Installed only when missing.
sysdeps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

data: venv sysdeps
	$(BIN)/python -m sensors.datasets.prepare

lint: venv
	$(BIN)/ruff check .

test: venv sysdeps data lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The demo starts from a clean state each time (a robot would resume from state/).
demo: venv sysdeps data
	rm -rf state/demo/checkpoints
	@test -f state/demo/keys/server.key_secret || $(BIN)/python -m runtime.keys create server --dir state/demo/keys
	@test -f state/demo/keys/clients/demo.key_secret || $(BIN)/python -m runtime.keys create demo --dir state/demo/keys
	$(BIN)/python -m runtime.launch launch/demo.toml

clean:
	rm -rf data models engines benchmarks/results/*.json benchmarks/results/*.png
