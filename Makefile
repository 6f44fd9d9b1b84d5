# pipo-export: `make test` and `make demo` work on a fresh machine with only Python installed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= build/demo

.PHONY: venv test demo clean

$(STAMP): setup.cfg pyproject.toml graphs/pyproject.toml runtimes/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build comes from local disk; anything else pulls CUDA wheels
	$(BIN)/python -m pip install -q torch==2.13.0
	# the three distributions, editable: the contract, the runtime, then the compiler
	$(BIN)/python -m pip install -q -e graphs -e runtimes/python -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP) cpp
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/pipo-export tiny $(DEMO)/checkpoint --force
	$(BIN)/pipo-export inspect $(DEMO)/checkpoint
	$(BIN)/pipo-export export $(DEMO)/checkpoint -o $(DEMO)/export --force
	$(BIN)/pipo-export check $(DEMO)/export
	$(BIN)/pipo-export run $(DEMO)/export --prompt "PIPO folds each pair" --max-steps 8 --stream
	$(BIN)/pipo-export run $(DEMO)/export --ids 5,17,300,42,7 --max-steps 8 --json \
		--temperature 1.0 --top-p 0.95 --top-k 20 --presence-penalty 1.5 --seed 1 --threshold 0.5
	# every backend that can run this export (torch, onnxruntime; onnx-reference runs
	# standard-op --target tensorrt exports only)
	$(BIN)/pipo-export compare $(DEMO)/export --steps 6

# C++ runtime (runtimes/cpp) into build/cpp: ONNX Runtime headers from Debian's
# libonnxruntime-dev .deb (fetched with apt, unpacked, not installed), the library from the
# onnxruntime wheel in the venv; then CMake. Gives build/cpp/pipo-run and pipo-unit-tests.
CPP_BUILD ?= build/cpp
CMAKE     ?= $(shell command -v cmake 2>/dev/null || echo $(BIN)/cmake)
.PHONY: cpp
cpp: $(STAMP)
	@test -x "$(CMAKE)" || $(BIN)/python -m pip install -q cmake
	bash runtimes/cpp/fetch_ort_headers.sh $(CPP_BUILD)/ort $(BIN)/python
	$(CMAKE) -S runtimes/cpp -B $(CPP_BUILD) -DCMAKE_BUILD_TYPE=Release -DORT_ROOT=$(abspath $(CPP_BUILD)/ort) >/dev/null
	$(CMAKE) --build $(CPP_BUILD) -j2

clean:
	rm -rf $(VENV) build
