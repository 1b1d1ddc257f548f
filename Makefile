# The two commands: `make demo` and `make test`. Each creates its venv when missing
# (idempotent: a stamp tracks pyproject.toml and constraints.txt) and then does its job.
# `make test PY=python3.10` (or python3.12) runs the same suite in a venv of that Python
# (.venv-3.10, ...); plain `make test` is Python 3.11 in .venv, the CI command.
SHELL := /bin/bash
PY ?= python3.11
PYTHON := $(shell .ci/find-python $(PY) 2>/dev/null)
PYVER := $(if $(PYTHON),$(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'))
VENV ?= $(if $(filter 3.11,$(PYVER)),.venv,.venv-$(PYVER))
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages: the offline demo data, and the browser of the web console's tests (chromium, chromium-driver)
APT_PKGS := dataset-fashion-mnist espeak-ng flite sox chromium chromium-driver
PYTEST_ARGS ?=

.PHONY: test demo web-demo venv sysdeps data lint models bench clean robot-check

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || .ci/find-python $(PY) >/dev/null || exit 2
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# constraints.txt holds torch/torchvision/torchaudio exactly: pip never picks a torch.
	@$(BIN)/python -m pip uninstall -q -y continua 2>/dev/null || true; rm -rf continua.egg-info  # the name before continua-robot
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all]'
	@touch $(STAMP)

# Debian packages (APT_PKGS; the demo data: DESIGN.md section 9). Installed only when missing.
sysdeps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

data: venv sysdeps
	$(BIN)/python -m demodata.prepare

lint: venv
	$(BIN)/ruff check .

test: venv sysdeps data lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The demo starts from a clean state each time (a robot would resume from state/).
demo: venv sysdeps data
	rm -rf state/demo/checkpoints
	@test -f state/demo/keys/server.key_secret || $(BIN)/python -m runtime.keys create server --dir state/demo/keys
	@test -f state/demo/keys/clients/demo.key_secret || $(BIN)/python -m runtime.keys create demo --dir state/demo/keys
	@test -f state/demo/keys/clients/web.key_secret || $(BIN)/python -m runtime.keys create web --dir state/demo/keys
	$(BIN)/python -m runtime.launch launch/demo.toml

# The demo publishers, the agent and the web console (+ Foxglove), until Ctrl-C: teach it from the page.
web-demo: venv sysdeps data
	@test -f state/demo/keys/server.key_secret || $(BIN)/python -m runtime.keys create server --dir state/demo/keys
	@test -f state/demo/keys/clients/web.key_secret || $(BIN)/python -m runtime.keys create web --dir state/demo/keys
	$(BIN)/python -m runtime.launch launch/web-demo.toml

# A robot's install, checked here (needs PyPI; two torch installs, several GB of downloads): a venv of ROBOT_PY that
# already holds ROBOT_TORCH, `pip install .` keeps it, the lower bounds of constraints-lowest.txt
# install, and the installed package serves from a models bundle and learns (README, robot section).
ROBOT_PY ?= python3.10
ROBOT_TORCH ?= torch==2.4.0
robot-check: venv data
	$(BIN)/python -m export build
	$(BIN)/python -m export bundle --out models --file build/robot-check/models.tar
	ROBOT_PY=$(ROBOT_PY) ROBOT_TORCH=$(ROBOT_TORCH) .ci/robot-install-check build/robot-check/models.tar

# Every figure the README quotes, regenerated on purpose (about an hour on 2 cores; results in
# the ignored benchmarks/results/). Each line is the command named in the README's heading.
BENCHMARKS := backbones transport mcap_codec "continual --scenario class --seeds 3" "continual --suite hard --seeds 5 --epochs 3" \
	"continual --suite hard --seeds 5 --epochs 3 --strategies ablations" method live "pipeline --seconds 15" \
	"reliability --minutes 10 --restarts 6" serving_memory web "fleet --robots 4"
bench: venv sysdeps data
	@for b in $(BENCHMARKS); do echo "python -m benchmarks.$$b"; $(BIN)/python -m benchmarks.$$b || exit $$?; done

clean:
	rm -rf data models engines benchmarks/results/*.json benchmarks/results/*.png
