"""fire_kernels: per-token log-probs, entropies and divergences straight from hidden states.

The [tokens, vocab] logits never exist in memory (except with backend="reference").
torch + triton only; never imports fire_opd.
"""

from fire_kernels._validation import BACKENDS
from fire_kernels.lm_head import LMHead
from fire_kernels.token_stats import TeacherStudentStats, teacher_student_stats, token_stats

__all__ = ["BACKENDS", "LMHead", "TeacherStudentStats", "teacher_student_stats", "token_stats"]
__version__ = "0.1.0"
