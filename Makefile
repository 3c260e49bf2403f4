# Two entry points (see README): `make quickstart` and `make test`. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch and torchvision must come as a matching pair: this pair is on PyPI (CUDA build, runs on the CPU too).
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup quickstart test browser-deps clean

$(BIN)/gpg-vl: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	# DeepSpeed ships as an sdist whose setup.py imports torch: build it against the torch above, ops JIT-only
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed
	touch $(BIN)/gpg-vl

setup: $(BIN)/gpg-vl

quickstart: setup
	$(BIN)/gpg-vl train --config configs/quickstart.yaml

# Headless Chromium + ChromeDriver for the demo's browser test (Debian packages; needs root or sudo).
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && \
	    $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: setup browser-deps
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
