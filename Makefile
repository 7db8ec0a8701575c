# Two entry points: `make demo` and `make test`. Both bootstrap .venv once (idempotent).
#
# TORCH_SPEC pins the CPU build of PyTorch that lies on the development machines' disk,
# so pip never pulls a multi-GB CUDA build here. On a GPU machine with torch already
# installed in the venv the pin is skipped; `make TORCH_SPEC=torch` lets pip choose.
PYTHON     ?= python3
VENV       ?= .venv
# verl 0.9.1 requires transformers<5.11 (and brings ray, wandb, ...): its integration is tested in a venv of
# its own, so the main suite keeps the newest transformers TRL 1.16 supports
VERL_VENV  ?= .venv-verl
TORCH_SPEC ?= torch==2.13.0
# pytest-xdist workers for `make test` (tests/conftest.py gives each its share of the cores' threads)
TEST_WORKERS ?= auto
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.fire-opd-installed
VERL_STAMP := $(VERL_VENV)/.fire-opd-installed

# `make test`'s smoke runs of the benchmark scripts (bench-quick, below)
QUICK_BENCHES := bench-quick-kernels bench-quick-train bench-quick-memory bench-quick-prompts bench-quick-verify gpu-check-dry

.PHONY: demo test test-oldest lint docs compile-report compile-matrix bench bench-quick $(QUICK_BENCHES) study gpu-check gpu-wheels clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench,demo,study,docs]"
	touch $(STAMP)

$(VERL_STAMP): pyproject.toml Makefile
	test -x $(VERL_VENV)/bin/python || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/python -m pip install -q --upgrade pip
	$(VERL_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "verl==0.9.1" "pytest>=7.4" "hypothesis>=6.90" -e .
	touch $(VERL_STAMP)

demo: $(STAMP)
	$(PY) -m fire_opd demo

# The suite runs Triton kernels through Triton's CPU interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1 before triton is imported) and compiles every kernel for sm_80/sm_90.
# The verl integration's tests run in $(VERL_VENV) (verl's own code, never skipped).
test: $(STAMP) $(VERL_STAMP) lint docs
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist worksteal --ignore=tests/test_integration_verl.py
	$(VERL_VENV)/bin/python -m pytest tests/test_integration_verl.py
	$(MAKE) --no-print-directory bench-quick

# The suite on every lower bound pyproject.toml declares, pinned, in .venv-oldest, then with TRL and
# Liger at their floors too (transformers 4.x), in .venv-oldest-peers (torch 2.6's CUDA build, about
# 3 GB, is downloaded once and each venv takes about 6 GB: no CPU build of it is on the registry).
# Not part of `make test`; run it when a bound or a compatibility shim changes (docs/development.md).
# OLDEST_PYTHON / PEERS_PYTHON=path where python3.10 / python3.11 is not on the PATH.
OLDEST_PYTHON ?= python3.10
PEERS_PYTHON ?= python3.11
test-oldest: $(STAMP)
	$(PY) benchmarks/oldest_deps.py --python $(OLDEST_PYTHON)
	$(PY) benchmarks/oldest_deps.py --peers --python $(PEERS_PYTHON)

# The benchmark scripts on tiny shapes and the GPU check's dry run, so that none can rot; under
# `make -j` (CI) two run at a time
bench-quick: $(QUICK_BENCHES)
bench-quick-kernels: $(STAMP)
	$(PY) benchmarks/bench_kernels.py --quick
bench-quick-train: $(STAMP)
	$(PY) benchmarks/bench_train.py --quick
bench-quick-memory: $(STAMP)
	$(PY) benchmarks/bench_memory.py --quick
bench-quick-prompts: $(STAMP)
	$(PY) benchmarks/bench_prompts.py --quick
bench-quick-verify: $(STAMP)
	$(PY) benchmarks/bench_verify.py --quick
gpu-check-dry: $(STAMP)
	$(PY) benchmarks/gpu_check.py --dry

# ruff (lint and format) and mypy, configured in pyproject.toml (also run by pre-commit)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml, docs/): --strict fails on a broken link or API reference
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# Everything that needs a GPU, in one command (benchmarks/gpu_check.py): the CUDA tests, then the
# anchor workloads side by side; results to $(GPU_CHECK_OUT) (default benchmarks/results), written
# as each phase and row finishes. On a CUDA machine benchmarks/gpu_check.sh runs it with that
# machine's own python3 (its CUDA build of torch; nothing is downloaded there: peers come as
# wheels from .whl/, which `make gpu-wheels` fills here). Without CUDA it is the dry run on tiny
# shapes. On a lent machine: `make gpu-check GPU_CHECK_OUT=$$OUT` (docs/development.md).
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?=
gpu-check:
	@if $(GPU_PYTHON) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
	  GPU_PYTHON=$(GPU_PYTHON) bash benchmarks/gpu_check.sh $(GPU_CHECK_OUT); \
	else \
	  $(MAKE) --no-print-directory $(STAMP) && $(PY) benchmarks/gpu_check.py --dry; \
	fi

# The GPU check's peers and what they need that the lent machines' image lacks, as wheels to carry
# there (that machine reaches no registry). Fetched for its Python (3.12 on 2026-11's image), not
# this one's: multiprocess ships one wheel per Python version.
GPU_PYTHON_VERSION ?= 3.12
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) -d .whl \
	  "cut-cross-entropy==25.1.1" "liger-kernel==0.8.5" "trl==1.16.0" "datasets==5.2.0" "dill==0.4.1" \
	  "multiprocess==0.70.19"

# Does distillation help, and does FiRe-OPD beat OPD: the learning-rate sweep on validation (seed 0),
# then the paper's four methods x 3 seeds on the steps (200 steps), steps-100, brittle-teacher and chain
# settings, plus TRL's DistillationTrainer (fire_opd/demo/study/; results under benchmarks/results/study/).
# Runs are cached by everything that decides them: with the code and assets that made the committed
# results this reads them back (printed as cached, with their commit);
# `make study STUDY_ARGS=--fresh` reruns all and says how long that takes (about 75 minutes here).
STUDY_ARGS ?=
# chain keeps the learning rates the study of a1b98cd chose (by greedy accuracy; fire_opd/demo/recipes.py)
STUDY_SETTINGS := steps steps-100 brittle-teacher
study: $(STAMP)
	$(PY) -m fire_opd study --select --seeds 0 --settings $(STUDY_SETTINGS) $(STUDY_ARGS)
	$(PY) benchmarks/demo_recipe.py
	$(PY) -m fire_opd study --settings $(STUDY_SETTINGS) chain --variants opd fire filter_only reweight_only \
	  $(STUDY_ARGS)

compile-report: $(STAMP)
	$(PY) -m fire_kernels.compile_report

# The same report under every Triton release torch has pinned since 2.4, 3.0 to 3.9 (pip installs
# each, about 600 MB, into ~/.cache/fire-opd-triton-releases; 7-8 minutes on 2 cores here once installed).
compile-matrix: $(STAMP)
	$(PY) benchmarks/compile_matrix.py

bench: $(STAMP)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_train.py --lora-memory
	$(PY) benchmarks/bench_train.py --precision
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_prompts.py

clean:
	rm -rf $(VENV) $(VERL_VENV) build dist site *.egg-info
