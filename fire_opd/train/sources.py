"""Where a run's models and prompts come from: a local path or a Hugging Face Hub id.

One rule for both, so that the checks before any model loads and the loaders agree on what a
name means: a Hub id is `name` or `owner/name` (letters, digits, '_', '.', '-'; `gpt2`,
`Qwen/Qwen2.5-7B-Instruct`, `openai/gsm8k`). A source that exists on disk is a local path; one
that does not, and is no Hub id (or starts with '.', '/' or '~', or ends in a data file's
suffix), is a local path that is missing. Imports nothing heavy.
"""

from __future__ import annotations

import re
from pathlib import Path

#: file suffix -> the `datasets` builder that reads it
PROMPT_FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(source: str) -> bool:
    """Whether `source` reads as a Hub id rather than a local path (see the module docstring)."""
    return bool(HUB_ID.match(source)) and Path(source).suffix.lower() not in PROMPT_FILE_TYPES


def missing_local_path(source: str) -> bool:
    """A local path that does not exist: neither on disk nor a Hub id (nor under a folder that
    exists, as `models/student` would be when `models/` is there)."""
    path = Path(source).expanduser()
    if path.exists():
        return False
    return not is_hub_id(source) or Path(source.split("/")[0]).is_dir()
