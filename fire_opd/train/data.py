"""Prompts and answers: the `Problem` type and the prompt sets a run reads.

A prompt set comes from wherever a user keeps it, read through `datasets`:

    train.jsonl | train.json | train.csv | train.tsv | train.parquet    a file
    data/                                          a folder of such files, or one written by save_to_disk
    openai/gsm8k                                   a Hugging Face dataset id (from the local cache offline)

Each row has a raw prompt or chat messages, an answer, and optionally a teacher key:

    {"prompt": "3+8-4=", "answer": "7", "teacher": "arith"}
    {"messages": [{"role": "user", "content": "What is 3+8-4?"}], "answer": "7"}

`PromptColumns` maps other column names (`data.prompt_field`, `answer_field`, `messages_field`).
`messages` rows are rendered with the tokenizer's chat template. Other columns are kept in
`Problem.row` for verifiers (fire_opd/train/verifiers.py).

Large sets are never loaded whole: `datasets` keeps the rows in a memory-mapped Arrow file, the
columns are checked once (names, types, empty cells) with Arrow's vectorized kernels, and a step
converts only the rows it draws (`PromptSet.__getitem__`).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union, overload

import torch

from fire_opd.train.sources import PROMPT_FILE_TYPES, missing_local_path


class PromptError(ValueError):
    """A prompt set that cannot be used; the message names the file (and row or column)."""


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    teacher: Optional[str] = None  # routing key in multi-teacher training
    solution: Optional[str] = None  # worked completion, for supervised warm-up of the demo models
    messages: Optional[tuple] = None  # chat messages ({"role", "content"} dicts); `prompt` is their rendering
    row: Optional[Mapping] = field(default=None, compare=False, hash=False)  # the source row, for verifiers


@dataclass(frozen=True)
class PromptColumns:
    """Which columns of a prompt set hold what (`data.prompt_field` etc.)."""

    prompt: str = "prompt"  # the raw prompt text
    answer: str = "answer"  # the reference answer (a string; integers are read as their digits)
    messages: str = "messages"  # chat messages, a list of {"role", "content"}, instead of a prompt
    teacher: str = "teacher"  # optional routing key in multi-teacher training
    solution: str = "solution"  # optional worked completion

    def __post_init__(self) -> None:
        named = {"prompt": self.prompt, "answer": self.answer, "messages": self.messages}
        if not all(isinstance(v, str) and v for v in named.values()) or len(set(named.values())) < len(named):
            raise ValueError(f"the prompt, answer and messages columns must be different, non-empty names: {named}")


def problem_from_row(record, where: Union[str, Callable[[], str]], columns: PromptColumns = PromptColumns()) -> Problem:
    """One prompt row: a prompt or messages (exactly one; an empty cell counts as absent), an
    answer, an optional teacher key, any other fields. `where` names the row in errors (a
    callable is only called for an error: finding a row's line can cost a scan)."""
    try:
        return _problem_from_row(record, "", columns)
    except PromptError as exc:
        place = where() if callable(where) else where
        raise PromptError(f"{place}{exc}") from None


def _problem_from_row(record, where: str, columns: PromptColumns) -> Problem:
    if not isinstance(record, Mapping):
        raise PromptError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt, messages = record.get(columns.prompt), record.get(columns.messages)
    if (prompt is None) == (messages is None):
        raise PromptError(
            f"{where}: give exactly one of {columns.prompt!r} (a string) or {columns.messages!r} (a list of "
            "{'role', 'content'} objects)"
        )
    if messages is not None:
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise PromptError(
                f"{where}: {columns.messages!r} must be a non-empty list of {{'role': str, 'content': str}} objects"
            )
        messages = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    elif not isinstance(prompt, str):
        raise PromptError(f"{where}: missing or non-string field {columns.prompt!r}")
    answer = record.get(columns.answer)
    if isinstance(answer, int) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise PromptError(f"{where}: missing or non-string field {columns.answer!r}")
    teacher = record.get(columns.teacher)
    if teacher is not None and not isinstance(teacher, str):
        raise PromptError(f"{where}: field {columns.teacher!r} must be a string")
    return Problem(prompt or "", answer, teacher, record.get(columns.solution), messages, dict(record))


class PromptSet(Sequence[Problem]):
    """The problems of one prompt source, converted (and chat-rendered) when indexed.

    Rows live in a `datasets.Dataset` (memory-mapped Arrow); `len` and indexing read no other row.
    """

    def __init__(self, table, *, source: str, columns: PromptColumns = PromptColumns(), chat=None):
        self.table, self.source, self.columns = table, source, columns
        self._chat = chat  # (tokenizer, chat_template_kwargs) once rendered
        self._line_numbers: Optional[torch.Tensor] = None  # of a JSON-lines file's rows, built by `where`

    def __len__(self) -> int:
        return len(self.table)

    @overload
    def __getitem__(self, i: int) -> Problem: ...
    @overload
    def __getitem__(self, i: slice) -> list[Problem]: ...
    def __getitem__(self, i: Union[int, slice]) -> Union[Problem, list[Problem]]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # IndexError past the end, negative indices from the end
        return self._problem(self.table[i], i)

    def take(self, indices: Sequence[int]) -> list[Problem]:
        """The problems of rows `indices`, read from the Arrow table in one gather (a step's draw)."""
        n = len(self)
        indices = [range(n)[i] for i in indices]
        columns = self.table[indices]  # {column: [values in the order of indices]}
        names = list(columns)
        return [self._problem(dict(zip(names, values)), i) for i, values in zip(indices, zip(*columns.values()))]

    def _problem(self, record, i: int) -> Problem:
        problem = problem_from_row(record, lambda: self.where(i), self.columns)
        if self._chat is not None and problem.messages:
            tokenizer, kwargs = self._chat
            problem = replace(problem, prompt=_apply_chat_template(tokenizer, problem.messages, kwargs))
        return problem

    @property
    def has_messages(self) -> bool:
        return self.columns.messages in self.table.column_names

    def where(self, i: int) -> str:
        """Row i as a user finds it: `file.jsonl:LINE` for JSON lines, else `source row i`. The
        line numbers of a JSON-lines file are indexed on the first call (one pass over the file,
        for an error message only), then looked up."""
        if self._line_numbers is None:
            self._line_numbers = _row_lines(Path(self.source))
        if 0 <= i < len(self._line_numbers):
            return f"{self.source}:{int(self._line_numbers[i])}"
        return f"{self.source} row {i}"

    def rendered(self, tokenizer, chat_template_kwargs: Optional[Mapping] = None) -> PromptSet:
        """The same rows, `messages` rendered with the tokenizer's chat template when indexed."""
        if self.has_messages:
            _require_chat_template(tokenizer, self.source)
        return PromptSet(
            self.table, source=self.source, columns=self.columns, chat=(tokenizer, dict(chat_template_kwargs or {}))
        )

    def first_row_of_each_teacher(self) -> dict[Optional[str], int]:
        """{teacher key (None: no key): the first row with it}, from the Arrow column."""
        if self.columns.teacher not in self.table.column_names:
            return {None: 0} if len(self) else {}
        import pyarrow.compute as pc

        column = self.table.data.column(self.columns.teacher)
        firsts: dict[Optional[str], int] = {}
        for key in self.table.unique(self.columns.teacher):
            found = pc.index(column, key) if key is not None else pc.index(pc.is_null(column), True)
            firsts[key] = int(found.as_py())
        return firsts


ProblemSet = Union[PromptSet, Sequence[Problem]]


def _row_lines(path: Path) -> torch.Tensor:
    """The 1-based line number of each row of a JSON-lines file (its non-blank lines, the rows
    `datasets` reads), or an empty tensor for any other source."""
    if path.suffix.lower() not in (".jsonl", ".json") or not path.is_file():
        return torch.zeros(0, dtype=torch.int64)
    with path.open("rb") as f:
        numbers = [n for n, line in enumerate(f, start=1) if line.strip()]
        f.seek(0)
        if f.read(64).lstrip()[:1] == b"[":  # a JSON array: rows are no lines
            return torch.zeros(0, dtype=torch.int64)
    return torch.tensor(numbers, dtype=torch.int64)


# ----------------------------------------------------------------------------- reading


def load_prompts(
    source: str | Path, *, columns: PromptColumns = PromptColumns(), split: str = "train", split_field: str = "split"
) -> PromptSet:
    """A prompt set from a file, a folder or a dataset id (see the module docstring), its columns
    checked. Errors are one `PromptError` line naming the file, and the row or column;
    FileNotFoundError for a path that does not exist.

    Args:
        source: the path or id.
        columns: the column names.
        split: the split of a dataset id, a `DatasetDict` folder or a folder of data files.
        split_field: the config field that sets `split`, named in errors.
    """
    source = str(source)
    with _reader_logs_silenced():
        table = _read_table(source, split, split_field)
    if table._indices is not None:  # a saved selection: the Arrow columns below must be in row order
        table = table.flatten_indices()
    prompts = PromptSet(table, source=source, columns=columns)
    try:
        _check_columns(prompts)
    except PromptError:
        path = Path(source)
        malformed = _malformed_json(path) if path.suffix.lower() in (".jsonl", ".json") else None
        if malformed:  # `datasets` read lines that are not objects as a "text" column
            raise PromptError(malformed) from None
        raise
    return prompts


def _datasets():
    import datasets

    datasets.disable_progress_bars()  # a run's output has its own progress bar
    return datasets


@contextlib.contextmanager
def _reader_logs_silenced():
    """`datasets` logs a reader's error before raising it; we raise it as one line instead."""
    import logging

    import datasets

    hub = logging.getLogger("huggingface_hub")  # its retries offline: one line says it below
    level, hub_level = datasets.logging.get_verbosity(), hub.level
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    hub.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        hub.setLevel(hub_level)


def _read_table(source: str, split: str, split_field: str):
    """The rows of `source` as a `datasets.Dataset`."""
    path = Path(source)
    if path.is_file():
        kind = PROMPT_FILE_TYPES.get(path.suffix.lower())
        if kind is None:
            raise PromptError(
                f"{source}: expected a {', '.join(PROMPT_FILE_TYPES)} file, a folder of them or written by "
                "datasets' save_to_disk, or a Hugging Face dataset id"
            )
        if split != "train":
            raise PromptError(f"{split_field} {split!r}: {source} is one file, a single split ('train')")
        if path.stat().st_size == 0:
            raise PromptError(f"{source}: no prompts found (the file is empty)")
        return _read_file(path, kind)
    if path.is_dir():
        return _read_folder(path, split, split_field)
    if missing_local_path(source):
        raise FileNotFoundError(f"prompts file {source} does not exist")
    return _read_hub(source, split, split_field)


def _read_file(path: Path, kind: str):
    datasets = _datasets()
    options: dict = {}
    if kind == "csv":  # every column as text ("007" stays "007"), empty cells stay empty
        separator = "\t" if path.suffix.lower() == ".tsv" else ","
        with path.open(encoding="utf-8", newline="") as f:
            header = next(csv.reader(f, delimiter=separator), [])
        features = datasets.Features({name: datasets.Value("string") for name in header})
        options = {"sep": separator, "features": features, "keep_default_na": False}
    try:
        return datasets.load_dataset(kind, data_files=str(path.resolve()), split="train", **options)
    except Exception as exc:  # noqa: BLE001 (pyarrow, pandas and datasets each raise their own)
        raise PromptError(_unreadable(path, kind, exc)) from None


def _malformed_json(path: Path) -> Optional[str]:
    """The first structural problem of a JSON-lines file (or JSON array), or None."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:  # a whole-file JSON document (an array of objects)
        document = json.loads(text)
        if isinstance(document, dict) or (isinstance(document, list) and all(isinstance(r, dict) for r in document)):
            return None  # one JSON-lines row, or an array of rows
        if isinstance(document, list):
            return f"{path}: expected JSON lines (one object per line) or a JSON array of objects"
        raise json.JSONDecodeError("", "", 0)  # a scalar: read it as JSON lines below
    except json.JSONDecodeError:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as bad:
                return f"{path}:{number}: not valid JSON ({bad.msg})"
            if not isinstance(record, dict):
                return f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
    return None


def _unreadable(path: Path, kind: str, exc: Exception) -> str:
    """One line on why `path` could not be read, with the first bad line of a JSON-lines file."""
    malformed = _malformed_json(path) if kind == "json" else None
    if malformed:
        return malformed
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:  # datasets wraps the reader's error
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return f"{path}: not readable as {kind} ({reason[:300]})"


def _read_folder(path: Path, split: str, split_field: str):
    datasets = _datasets()
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # save_to_disk
        try:
            table = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001
            raise PromptError(f"{path}: not a readable save_to_disk folder ({exc})") from None
        if isinstance(table, datasets.DatasetDict):
            if split not in table:
                raise PromptError(f"{split_field} {split!r}: {path} has the splits {sorted(table)}")
            table = table[split]
        return table
    try:
        return datasets.load_dataset(str(path), split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise PromptError(f"{split_field} {split!r}: not a split of {path} ({exc})") from None
        raise PromptError(f"{path}: no prompts read from the folder ({exc})") from None
    except Exception as exc:  # noqa: BLE001
        raise PromptError(f"{path}: no prompts read from the folder ({type(exc).__name__}: {exc})") from None


def _read_hub(source: str, split: str, split_field: str):
    datasets = _datasets()
    try:
        return datasets.load_dataset(source, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise PromptError(f"{split_field} {split!r}: not a split of {source} ({exc})") from None
        raise PromptError(f"{source}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 (offline: ConnectionError; unknown id: DatasetNotFoundError)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = (
            "" if os.environ.get("HF_HUB_OFFLINE") else "; offline, set HF_HUB_OFFLINE=1 to read the cache at once"
        )
        raise PromptError(
            f"{source}: no such file or folder, and not a dataset that could be loaded from the Hugging Face Hub "
            f"or its local cache ({reason}){offline}"
        ) from None


# ----------------------------------------------------------------------------- checks


def _check_columns(prompts: PromptSet) -> None:
    """Names, types and empty cells of the columns, over every row at once (Arrow kernels)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table, columns, source = prompts.table, prompts.columns, prompts.source
    if len(table) == 0:
        raise PromptError(f"{source}: no prompts found")
    names = table.column_names
    listed = f"(columns: {', '.join(names)})"
    if columns.prompt not in names and columns.messages not in names:
        raise PromptError(
            f"{source}: no column {columns.prompt!r} or {columns.messages!r} {listed}; map the prompt column with "
            "data.prompt_field or the chat column with data.messages_field (fire-opd eval: --prompt-field, "
            "--messages-field)"
        )
    if columns.answer not in names:
        raise PromptError(
            f"{source}: no column {columns.answer!r} {listed}; map it with data.answer_field (fire-opd eval: "
            "--answer-field)"
        )
    schema = table.data.schema

    def is_text(name: str) -> bool:
        return pa.types.is_string(schema.field(name).type) or pa.types.is_large_string(schema.field(name).type)

    def is_null_column(name: str) -> bool:
        return pa.types.is_null(schema.field(name).type)

    for name, what in ((columns.prompt, "strings"), (columns.teacher, "strings")):
        if name in names and not (is_text(name) or is_null_column(name)):
            raise PromptError(f"{source}: column {name!r} must hold {what}, not {schema.field(name).type}")
    answer_type = schema.field(columns.answer).type
    if not (is_text(columns.answer) or pa.types.is_integer(answer_type)):
        raise PromptError(f"{source}: column {columns.answer!r} must hold strings, not {answer_type}")
    if columns.messages in names and not is_null_column(columns.messages):
        kind = schema.field(columns.messages).type
        item = kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else None
        # null: every list empty (caught below); an extension type: `datasets`' JSON type for messages with
        # differing keys, checked row by row when drawn
        if item is None or not (
            pa.types.is_null(item)
            or isinstance(item, pa.BaseExtensionType)
            or (pa.types.is_struct(item) and {"role", "content"} <= {f.name for f in item})
        ):
            raise PromptError(
                f"{source}: column {columns.messages!r} must hold lists of {{'role': str, 'content': str}} objects, "
                f"not {kind}"
            )

    def present(name: str):
        return pc.is_valid(table.data.column(name)) if name in names else pa.array([False] * len(table))

    has_prompt, has_messages = present(columns.prompt), present(columns.messages)
    is_text_prompt = columns.prompt in names and is_text(columns.prompt)
    for bad, message in (
        (
            pc.equal(has_prompt, has_messages),
            f"give exactly one of {columns.prompt!r} (a string) or {columns.messages!r} (a list of "
            "{'role', 'content'} objects)",
        ),
        (pc.invert(present(columns.answer)), f"missing or non-string field {columns.answer!r}"),
        (_blank(table, columns.prompt) if is_text_prompt else pa.array([False] * len(table)),
         f"empty {columns.prompt!r}: every prompt needs text (remove the row or fill it)"),
    ):  # fmt: skip
        row = pc.index(bad, True).as_py()
        if row >= 0:
            raise PromptError(f"{prompts.where(row)}: {message}")
    if columns.messages in names and not is_null_column(columns.messages):
        chats = table.data.column(columns.messages)
        row = pc.index(pc.equal(pc.fill_null(pc.list_value_length(chats), 1), 0), True).as_py()
        if row < 0 and pa.types.is_struct(chats.type.value_type):  # a message without its role or content
            turns = pc.list_flatten(chats)
            role, content = pc.struct_field(turns, "role"), pc.struct_field(turns, "content")
            incomplete = pc.or_(pc.or_(pc.is_null(role), pc.is_null(content)), pc.is_null(turns))
            turn = pc.index(incomplete, True).as_py()
            row = -1 if turn < 0 else pc.list_parent_indices(chats)[turn].as_py()
        if row >= 0:
            raise PromptError(
                f"{prompts.where(row)}: {columns.messages!r} must be a non-empty list of "
                "{'role': str, 'content': str} objects"
            )


def _blank(table, name: str):
    """Rows whose text in column `name` is empty or white space only (nulls are not)."""
    import pyarrow.compute as pc

    text = table.data.column(name)
    return pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0), False)


def check_teacher_keys(problems: ProblemSet, teachers: Iterable[str], default: Optional[str]) -> None:
    """Every row's teacher key (None: `default`) names a loaded teacher; else a KeyError naming the
    first row that does not. Reads one Arrow column for a `PromptSet`."""
    names = list(teachers)
    if isinstance(problems, PromptSet):
        firsts, where = problems.first_row_of_each_teacher(), problems.where
    else:
        firsts = {}
        for i, p in enumerate(problems):
            firsts.setdefault(p.teacher, i)

        def where(i: int) -> str:
            return f"row {i}"

    for key, row in sorted(firsts.items(), key=lambda kv: kv[1]):
        name = default if key is None else key
        if name is None:
            raise KeyError(f"{where(row)} has no teacher key and no default teacher was given (teachers: {names})")
        if name not in names:
            raise KeyError(f"{where(row)} names teacher {key!r}, which is not among the loaded teachers {names}")


# ----------------------------------------------------------------------------- chat rendering


def _require_chat_template(tokenizer, source: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            f"{source} has 'messages' rows but the tokenizer has no chat template; use 'prompt' rows "
            "or a tokenizer with one (chat_template.jinja, or chat_template in tokenizer_config.json)"
        )


def _apply_chat_template(tokenizer, messages: tuple, kwargs: Mapping) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True, **kwargs)


def render_prompts(
    problems: ProblemSet, tokenizer, chat_template_kwargs: Optional[Mapping] = None, *, source: str = "prompts"
) -> ProblemSet:
    """Problems whose `messages` are rendered into `prompt` with the tokenizer's chat template
    (`add_generation_prompt=True` plus `chat_template_kwargs`, e.g. {"enable_thinking": False}).
    A `PromptSet` renders each row when it is indexed; a list at once. The rendered text is
    tokenized later without adding special tokens: the template has them."""
    if isinstance(problems, PromptSet):
        return problems.rendered(tokenizer, chat_template_kwargs)
    if not any(p.messages for p in problems):
        return list(problems)
    _require_chat_template(tokenizer, source)
    kwargs = dict(chat_template_kwargs or {})
    return [
        replace(p, prompt=_apply_chat_template(tokenizer, p.messages, kwargs)) if p.messages else p for p in problems
    ]


# ----------------------------------------------------------------------------- a run's prompts


def columns_of(data_config) -> PromptColumns:
    """The `PromptColumns` of a DataConfig."""
    return PromptColumns(
        prompt=data_config.prompt_field, answer=data_config.answer_field, messages=data_config.messages_field
    )


def prepare_problems(
    config, tokenizer, train: Optional[ProblemSet] = None, held_out: Optional[ProblemSet] = None
) -> tuple[ProblemSet, list[Problem]]:
    """A TrainConfig's training problems (read from `data.prompts` unless given) and its first
    `eval.size` held-out problems, chat rows rendered."""
    data = config.data
    if train is None:
        train = load_prompts(
            data.prompts, columns=columns_of(data), split=data.prompts_split, split_field="data.prompts_split"
        )
    if held_out is None:
        held_out = (
            load_prompts(
                data.eval_prompts,
                columns=columns_of(data),
                split=data.eval_prompts_split,
                split_field="data.eval_prompts_split",
            )
            if data.eval_prompts
            else []
        )
    held_out = list(held_out[: config.eval.size]) if config.eval.size else []
    for name, given in (("train_problems", train), ("eval_problems", held_out)):
        if not isinstance(given, PromptSet):  # problems passed in (a file's rows are checked when read)
            blank = next((i for i, p in enumerate(given) if not p.messages and not p.prompt.strip()), None)
            if blank is not None:
                raise PromptError(f"{name} row {blank}: empty prompt; every prompt needs text")
    return (
        render_prompts(train, tokenizer, data.chat_template_kwargs, source="prompts"),
        list(render_prompts(held_out, tokenizer, data.chat_template_kwargs, source="eval_prompts")),
    )


def prompt_batch(problems: ProblemSet, step: int, per_step: int, seed: int) -> list[Problem]:
    """A step's prompts: consecutive slices of per-epoch permutations of `problems`, a function of
    (seed, step) only, so a resumed run draws what the uninterrupted one would have. Reads only
    the drawn rows; an epoch's permutation is drawn once (`_epoch_order`), not at every step."""
    n = len(problems)
    drawn = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(k, n)
        drawn.append(int(_epoch_order(n, seed, epoch)[offset]))
    if isinstance(problems, PromptSet):
        return problems.take(drawn)
    return [problems[i] for i in drawn]


@functools.lru_cache(maxsize=2)  # a step spans at most two epochs
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def write_prompts(problems: Iterable[Problem], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for p in problems:
            record = {"prompt": p.prompt, "answer": p.answer}
            if p.teacher is not None:
                record["teacher"] = p.teacher
            f.write(json.dumps(record) + "\n")
