# Two commands do all set-up on a fresh machine (Debian/Ubuntu, Python >= 3.11):
#   make demo   - install into a virtual environment, then run the main job end to end on embedded defaults
#   make test   - install into a virtual environment, then run the test suite (what .ci/run does)
#
# The environment is .venv in this directory, or the one already active ($VIRTUAL_ENV), or VENV=DIR.
# It is made with whatever python3 the machine has (Debian's own included: PEP 668 forbids installing into
# it, a virtual environment is the supported route). torch is installed first only when the environment has
# none (TORCH_SPEC, by default the CPU wheel this project is developed with); a torch you have is kept.
PYTHON ?= python3
ifdef VIRTUAL_ENV
VENV ?= $(VIRTUAL_ENV)
else
VENV ?= .venv
endif
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= all
APT_PACKAGES = espeak-ng fortunes fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-cs fortunes-bg \
               fortunes-br fortunes-pl fortunes-eo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps venv demo test baseline

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; fi

# A virtual environment; Debian and Ubuntu ship venv's pip bootstrap separately (python3-venv).
$(VPY):
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "$(PYTHON) cannot make a virtual environment; installing python3-venv"; rm -rf $(VENV); \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    python3-venv "python$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv" >/dev/null; \
	  $(PYTHON) -m venv $(VENV); }

venv: $(VPY)

install: system-deps $(VPY)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q '$(TORCH_SPEC)'
	$(VPY) -m pip install -q -e '.[$(EXTRAS)]'

demo: install
	$(VENV)/bin/whisper-experts quickstart

test: install
	HF_HUB_OFFLINE=1 $(VPY) -m pytest -q

baseline: install
	$(VPY) benchmarks/baseline_wer.py
