"""Test setup. Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at conftest import time.

Half precision under the interpreter: Triton 3.9's interpreter returns garbage from tl.dot on
bf16 operands, so for bf16 the kernels upcast dot operands to fp32 (DOT_FP32, see
fire_kernels/backends/triton_token_stats.py); fp16 runs the native fp16 dot. Both are compared with
the fp32 reference computed from the same half-precision inputs.
"""

import os

# The device the kernel suites that take one (tests/test_cuda.py) run on: "cuda" under `make
# gpu-check`, else the CPU, with the Triton kernels in the interpreter.
TEST_DEVICE = os.environ.get("FIRE_OPD_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise SystemExit(f"FIRE_OPD_TEST_DEVICE must be 'cpu' or 'cuda', got {TEST_DEVICE!r}")
if TEST_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Fixtures used with @given (monkeypatched chunk sizes) are constant across examples.
settings.register_profile(
    "fire",
    deadline=None,
    max_examples=20,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("fire")
# Under pytest-xdist (`make test` runs `-n auto`) the workers share the cores: each takes its share
# of threads, and OMP_NUM_THREADS passes that share to the processes a test launches (torchrun sets
# it to 1 per process on its own).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(THREADS)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
    raise SystemExit("FIRE_OPD_TEST_DEVICE=cuda but torch sees no CUDA device")


ALLOW_SKIPS = bool(os.environ.get("FIRE_OPD_ALLOW_SKIPS"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: means something only on a GPU (FIRE_OPD_TEST_DEVICE=cuda)")


def pytest_collection_modifyitems(config, items):
    """Cases marked `cuda` are deselected off the GPU and counted in one line of the summary (not
    skipped: `make test` fails on any skip)."""
    if TEST_DEVICE == "cuda":
        return
    not_applicable = [item for item in items if item.get_closest_marker("cuda")]
    if not_applicable:
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]
        config.hook.pytest_deselected(items=not_applicable)
        config._fire_not_applicable = len(not_applicable)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist: the workers collect (and deselect); the controller prints the summary line."""
    count = getattr(node, "workeroutput", {}).get("fire_not_applicable", 0)
    node.config._fire_not_applicable = max(getattr(node.config, "_fire_not_applicable", 0), count)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    count = getattr(config, "_fire_not_applicable", 0)
    if count:
        terminalreporter.write_line(
            f"{count} CUDA-only tests not applicable on this machine (no GPU); "
            "`make gpu-check` runs them with FIRE_OPD_TEST_DEVICE=cuda"
        )
    skipped = len(terminalreporter.stats.get("skipped", []))
    if skipped and not ALLOW_SKIPS:
        terminalreporter.write_line(
            f"{skipped} test(s) skipped (reasons above): the run fails, since a skip can hide a suite whose "
            "optional dependency is missing; FIRE_OPD_ALLOW_SKIPS=1 allows them"
        )


def pytest_sessionfinish(session, exitstatus):
    """Any skipped test fails the session (`make test`), unless FIRE_OPD_ALLOW_SKIPS=1."""
    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: hand the count to the controller
        session.config.workeroutput["fire_not_applicable"] = getattr(session.config, "_fire_not_applicable", 0)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and not ALLOW_SKIPS and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def small_chunks(monkeypatch):
    """Shrink the chunked backend's tiles so that small problems span many tiles."""
    from fire_kernels.backends import chunked

    monkeypatch.setattr(chunked, "DEFAULT_TOKEN_CHUNK", 5)
    monkeypatch.setattr(chunked, "DEFAULT_VOCAB_CHUNK", 7)
