# Two commands do all set-up on a fresh machine (Debian/Ubuntu, Python >= 3.11):
#   make demo   - install, then run the main job end to end on embedded defaults
#   make test   - install, then run the test suite (what .ci/run does)
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
APT_PACKAGES = espeak-ng fortunes fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-cs fortunes-bg \
               fortunes-br fortunes-pl fortunes-eo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps demo test baseline

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; fi

install: system-deps
	$(PIP) install -q -e '.[all]'

demo: install
	whisper-experts quickstart

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

baseline: install
	$(PYTHON) benchmarks/baseline_wer.py
