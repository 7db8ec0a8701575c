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
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.fire-opd-installed
VERL_STAMP := $(VERL_VENV)/.fire-opd-installed

.PHONY: demo test test-fast compile-report bench bench-quick study clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench,demo,study]"
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
test: $(STAMP) $(VERL_STAMP)
	$(PY) -m pytest tests --ignore=tests/test_integration_verl.py
	$(VERL_VENV)/bin/python -m pytest tests/test_integration_verl.py
	$(PY) benchmarks/bench_kernels.py --quick
	$(PY) benchmarks/bench_train.py --quick

# Does distillation help, and does FiRe-OPD beat OPD: the learning-rate sweep on validation (seed 0),
# then every method x seed on the steps and brittle-teacher settings, plus TRL's DistillationTrainer
# (fire_opd/study.py; results under benchmarks/results/study/). Runs are cached by everything that
# decides them: on the commit that made the committed results this reads them back (printed as cached,
# with their commit); `make study STUDY_ARGS=--fresh` reruns all, and says how long that takes here.
STUDY_ARGS ?=
study: $(STAMP)
	$(PY) -m fire_opd study --select --seeds 0 $(STUDY_ARGS)
	$(PY) -m fire_opd study $(STUDY_ARGS)

compile-report: $(STAMP)
	$(PY) -m fire_kernels.compile_report

bench: $(STAMP)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) $(VERL_VENV) build dist *.egg-info
