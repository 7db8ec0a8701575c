"""Checks that run before any model is loaded, so a mistake costs seconds, not a 30B load.

Each check raises `UsageError` with one line that names the file, field or value and what to
do; the CLI prints it and exits with status 2 (`--debug` shows the traceback). Loading a model's
config.json and tokenizer is cheap and happens here; weights are not touched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

from fire_opd.errors import UsageError
from fire_opd.train.config import TrainConfig, UnknownKey, default_teacher, flatten_keys, parse_override, read_yaml
from fire_opd.train.sources import missing_local_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.pt")


# ----------------------------------------------------------------------------- config


def load_config(config_path: Optional[str], cli_fields: dict[str, Any], overrides: list[str]) -> TrainConfig:
    """TrainConfig from the YAML file, the CLI flags (dotted keys) and `--set key=value` (later wins)."""
    data: dict = {}
    try:
        if config_path:
            data = read_yaml(config_path)
            flatten_keys(data)  # unknown keys are named with the file
    except UnknownKey as exc:
        raise UsageError(f"{config_path}: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"--config {exc}" if "no such file" in str(exc) else str(exc)) from None
    data = {**data, **{key: value for key, value in cli_fields.items() if value is not None}}
    for item in overrides:
        try:
            parse_override(item)
        except ValueError as exc:
            raise UsageError(f"--set {item}: {exc}") from None
    try:
        return TrainConfig.from_dict(data, overrides)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"config: {exc}") from None


# ----------------------------------------------------------------------------- models and tokenizers


def check_model(path: str, what: str):
    """The model's Hugging Face config (config.json only), after checking the folder holds a
    model. `what` names it in errors ("student", "teacher 'math'")."""
    local = Path(path)
    if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        return _check_adapters(local, what)
    check_model_path(path, what)
    from transformers import AutoConfig  # (seconds: after the checks that need no import)

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001  (any failure here is the user's path or file)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{what} {path}: cannot read its config ({first})") from None


def check_model_path(path: str, what: str) -> None:
    """A model folder with a config and weights, or a Hub id: the file-system checks alone."""
    local = Path(path)
    if (local / "adapter_config.json").is_file() and not (local / "config.json").is_file():
        return  # an adapter folder: check_model reads its base model
    if local.exists():
        if not local.is_dir():
            raise UsageError(f"{what} {path}: is a file; expected a Hugging Face model folder (config.json + weights)")
        if not (local / "config.json").is_file():
            raise UsageError(
                f"{what} {path}: no config.json; expected a Hugging Face model folder (save_pretrained output)"
            )
        if not any(any(local.glob(pattern)) for pattern in WEIGHT_PATTERNS):
            raise UsageError(f"{what} {path}: no weights (*.safetensors or pytorch_model*.bin)")
    elif missing_local_path(path):  # a local path, mistyped
        raise UsageError(
            f"{what} {path}: no such directory; expected a Hugging Face model folder (config.json + "
            "weights) or a Hub id like 'Qwen/Qwen3-0.6B'"
        )


def _check_adapters(folder: Path, what: str):
    """A peft adapter folder (a LoRA run's checkpoint): peft installed, its base model checked."""
    import json

    try:
        import peft  # noqa: F401
    except ImportError:
        raise UsageError(f"{what} {folder}: a LoRA adapter folder; loading it needs peft (pip install peft)") from None
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{what} {folder}: its adapter_config.json names no base_model_name_or_path")
    return check_model(base, f"{what} {folder}'s base model")


def check_lora(config: TrainConfig, student_config) -> None:
    """peft is installed, and every module name in lora.target_modules is a module of the student
    (its architecture built on the meta device: no weights are read)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UsageError("lora.r > 0 needs peft: pip install 'fire-opd[lora]'") from None
    targets = config.lora.target_modules
    if isinstance(targets, str):
        return  # "all-linear"
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(student_config)
    names = {name.rsplit(".", 1)[-1] for name, _ in skeleton.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
        )
        raise UsageError(
            f"lora.target_modules: no module of the student is named {missing[0]!r}; its linear layers are "
            f"{', '.join(linear)}"
        )


def has_tokenizer_files(path: str) -> bool:
    local = Path(path)
    return not local.is_dir() or any((local / name).is_file() for name in TOKENIZER_FILES)


def check_tokenizer(path: str, what: str, hint: str):
    """The tokenizer at `path`, loaded (cheap), or a UsageError that says how to point at one."""
    from fire_opd.train.models import load_tokenizer

    if not has_tokenizer_files(path):
        raise UsageError(f"{what} {path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); {hint}")
    try:
        return load_tokenizer(path)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{what} {path}: cannot load its tokenizer ({first}); {hint}") from None


def vocab_size(model_config) -> Optional[int]:
    size = getattr(model_config, "vocab_size", None)
    if size is None and getattr(model_config, "text_config", None) is not None:
        size = getattr(model_config.text_config, "vocab_size", None)
    return size


def check_same_tokenizer(student_tok, teacher_tok, teacher: str) -> None:
    """Teachers score the student's token ids: their token -> id maps must be the same."""
    ours, theirs = student_tok.get_vocab(), teacher_tok.get_vocab()
    if ours == theirs:
        return
    differ = sorted(tok for tok in set(ours) | set(theirs) if ours.get(tok) != theirs.get(tok))
    example = differ[0]
    ids = [str(vocab[example]) if example in vocab else "absent" for vocab in (ours, theirs)]
    raise UsageError(
        f"{teacher} uses a different tokenizer from the student's: {len(differ)} of {len(ours)} tokens "
        f"differ (e.g. {example!r}: student id {ids[0]}, teacher id {ids[1]}); a teacher must share the "
        "student's tokenizer"
    )


# ----------------------------------------------------------------------------- prompts


def check_prompts(
    source: Optional[str],
    field: str,
    tokenizer,
    chat_template_kwargs: dict,
    teachers: Optional[dict] = None,
    default_teacher: Optional[str] = None,
    *,
    columns=None,
    split: str = "train",
    split_field: str = "prompts_split",
):
    """Open and check a prompt set (columns, empty cells, teacher keys, the chat template on its
    first chat row); return it (rows are converted when a step draws them)."""
    from fire_opd.train.data import PromptColumns, PromptError, check_teacher_keys, load_prompts

    if not source:
        return []
    try:
        problems = load_prompts(source, columns=columns or PromptColumns(), split=split, split_field=split_field)
        problems = problems.rendered(tokenizer, chat_template_kwargs)
    except FileNotFoundError:
        raise UsageError(f"{field} {source}: no such file") from None
    except (PromptError, ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    if problems.has_messages:
        import pyarrow.compute as pc

        column = problems.table.data.column(problems.columns.messages)
        first_chat = pc.index(pc.is_valid(column), True).as_py()
        try:
            problems[first_chat]
        except PromptError as exc:
            raise UsageError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001  (a chat template that fails on these messages)
            raise UsageError(
                f"{field} {source}: the chat template failed on {problems.where(first_chat)} ({exc}); check the "
                "messages and chat_template_kwargs"
            ) from None
    if teachers is not None:
        try:
            check_teacher_keys(problems, teachers, default_teacher)
        except KeyError as exc:
            raise UsageError(f"{field} {source}: {exc.args[0]}") from None
    return problems


# ----------------------------------------------------------------------------- the commands


def check_kernel_backend(config: TrainConfig) -> None:
    """runtime.backend=triton on a GPU whose Triton is known to abort compiling the kernels'
    backward (`fire_kernels.backends.triton_token_stats.backward_compiler_aborts`: Triton 3.2 on
    sm_90 with 16-bit operands). The abort kills the process with no Python error at the first
    backward, after every model has loaded; here it costs a second."""
    if config.runtime.backend != "triton" or config.runtime.device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        return
    from fire_kernels.backends.triton_token_stats import backward_compiler_aborts, triton

    device = torch.device(config.runtime.device) if config.runtime.device.startswith("cuda") else None
    capability = torch.cuda.get_device_capability(device)
    dtypes = {config.models.dtype, config.models.teacher_dtype or config.models.dtype}
    if backward_compiler_aborts(triton.__version__, capability, {getattr(torch, name) for name in dtypes}):
        raise UsageError(
            f"runtime.backend: triton cannot train here: Triton {triton.__version__} aborts compiling its "
            f"backward for sm_{capability[0]}{capability[1]} with {' / '.join(sorted(dtypes))} models; use "
            "runtime.backend=auto (the chunked kernels) or torch >= 2.7 (Triton >= 3.3)"
        )


def check_fsdp(config: TrainConfig) -> None:
    """FSDP2 on CPU with a torch that gets it wrong (`distributed.fsdp_refusal`), refused before
    any model loads rather than after every model has."""
    sharded = [f"parallel.{name}" for name in ("student", "teachers") if getattr(config.parallel, name) == "fsdp"]
    if not sharded or os.environ.get("WORLD_SIZE", "1") == "1":
        return
    from fire_opd.parallel.distributed import fsdp_refusal
    from fire_opd.train.trainer import resolve_device

    if (refusal := fsdp_refusal(resolve_device(config.runtime.device).type)) is not None:
        raise UsageError(f"{' and '.join(sharded)}: {refusal}")


def check_train(config: TrainConfig) -> None:
    """Everything `fire-opd train` can check before loading weights, the checks that need no
    heavy import (torch, transformers, datasets) first."""
    from fire_opd.train.run_dir import check_output_dir
    from fire_opd.train.verifiers import resolve_verifier

    if not config.models.student:
        raise UsageError("no student: pass --student PATH (or 'student:' in --config)")
    if not config.models.teachers:
        raise UsageError("no teacher: pass --teacher PATH or --teacher NAME=PATH (or 'teachers:' in --config)")
    if not config.data.prompts:
        raise UsageError("no prompts: pass --prompts FILE.jsonl (or 'prompts:' in --config)")
    for name in config.models.teachers:
        if not re.match(r"^[\w.-]+$", name):
            raise UsageError(
                f"teacher name {name!r}: use letters, digits, '_', '.' or '-' (it is the prompts' "
                "'teacher' key and a metric suffix)"
            )
    check_model_path(config.models.student, "student")  # paths first: they need no import
    for name, path in config.models.teachers.items():
        check_model_path(path, f"teacher {name!r}")
    for source, field in ((config.data.prompts, "prompts"), (config.data.eval_prompts, "eval_prompts")):
        if source and missing_local_path(source):
            raise UsageError(f"{field} {source}: no such file")
    try:
        check_output_dir(
            config.output_dir, resume=bool(config.checkpoint.resume_from), overwrite=config.checkpoint.overwrite
        )
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    if (
        config.checkpoint.resume_from
        and config.checkpoint.resume_from != "latest"
        and not Path(config.checkpoint.resume_from).is_dir()
    ):
        raise UsageError(f"resume_from {config.checkpoint.resume_from}: no such checkpoint folder (or use 'latest')")
    try:
        resolve_verifier(config.data.verifier)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    from fire_opd.train.run_log import check_report_to

    try:  # (TensorBoard, the default, is only warned about when it is missing: the trainer says so)
        check_report_to(config.logging.report_to)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from fire_opd.parallel.distributed import my_prompts

    try:  # under torchrun: can the step's prompts be dealt to the processes?
        my_prompts(
            config.sampling.prompts_per_step,
            config.sampling.rollout_chunk_prompts,
            0,
            int(os.environ.get("WORLD_SIZE", "1")),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_kernel_backend(config)
    check_fsdp(config)
    student_config = check_model(config.models.student, "student")
    if config.lora.enabled:
        check_lora(config, student_config)
    tokenizer_path = config.models.tokenizer or config.models.student
    tokenizer = check_tokenizer(
        tokenizer_path,
        "tokenizer" if config.models.tokenizer else "student",
        "pass --tokenizer PATH (or models.tokenizer in --config)",
    )
    tokens = len(tokenizer)
    # heads may be padded past the tokenizer (differently for student and teacher), never short of it
    rows = vocab_size(student_config)
    if rows is not None and rows < tokens:
        raise UsageError(
            f"student {config.models.student} has vocab_size {rows} but the tokenizer has {tokens} tokens; "
            "pass the student's own tokenizer"
        )
    for name, path in config.models.teachers.items():
        what = f"teacher {name!r} ({path})"
        teacher_config = check_model(path, f"teacher {name!r}")
        rows = vocab_size(teacher_config)
        if rows is not None and rows < tokens:
            raise UsageError(
                f"{what} has vocab_size {rows} but the student's tokenizer has {tokens} tokens; teachers must "
                "share the student's tokenizer"
            )
        if has_tokenizer_files(path):
            check_same_tokenizer(tokenizer, check_tokenizer(path, what, "fix or remove its tokenizer files"), what)
    from fire_opd.train.data import columns_of

    default = default_teacher(config.models.default_teacher, config.models.teachers)
    data = config.data
    columns = columns_of(data)
    check_prompts(
        data.prompts, "prompts", tokenizer, data.chat_template_kwargs, config.models.teachers, default,
        columns=columns, split=data.prompts_split, split_field="data.prompts_split",
    )  # fmt: skip
    check_prompts(
        data.eval_prompts, "eval_prompts", tokenizer, data.chat_template_kwargs,
        columns=columns, split=data.eval_prompts_split, split_field="data.eval_prompts_split",
    )  # fmt: skip
