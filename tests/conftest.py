"""Test setup. Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at conftest import time.

Half precision under the interpreter: Triton 3.9's interpreter returns garbage from tl.dot on
bf16 operands, so for bf16 the kernels upcast dot operands to fp32 (DOT_FP32, see
fire_kernels/triton_token_stats.py); fp16 runs the native fp16 dot. Both are compared with
the fp32 reference computed from the same half-precision inputs.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Fixtures used with @given (monkeypatched chunk sizes) are constant across examples.
settings.register_profile("fire", deadline=None, max_examples=20, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile("fire")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def small_chunks(monkeypatch):
    """Shrink the chunked backend's tiles so that small problems span many tiles."""
    from fire_kernels import chunked

    monkeypatch.setattr(chunked, "DEFAULT_TOKEN_CHUNK", 5)
    monkeypatch.setattr(chunked, "DEFAULT_VOCAB_CHUNK", 7)
