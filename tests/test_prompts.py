"""Prompt sets from wherever a user keeps them (fire_opd/train/data.py): JSONL, JSON, CSV, TSV,
parquet, save_to_disk folders and Hugging Face dataset ids (from the local cache, offline), with
mapped columns; one-line errors naming the file and the column or row; rows read only when drawn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from fire_opd.train.data import (
    Problem,
    PromptColumns,
    PromptError,
    PromptSet,
    check_teacher_keys,
    load_prompts,
    prompt_batch,
)

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    {"question": f"{a}+{b}=", "solution_text": str(a + b), "teacher": "arith" if a % 2 else "other", "id": a}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 0)]
]
COLUMNS = PromptColumns(prompt="question", answer="solution_text")


def _expected() -> list[tuple]:
    return [(r["question"], r["solution_text"], r["teacher"]) for r in ROWS]


def _seen(problems) -> list[tuple]:
    return [(p.prompt, p.answer, p.teacher) for p in problems]


def _write_all(folder: Path) -> dict[str, Path]:
    """The same rows in every file format."""
    table = datasets.Dataset.from_list(ROWS)
    paths = {kind: folder / f"rows.{kind}" for kind in ("jsonl", "json", "csv", "tsv", "parquet")}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    paths["json"].write_text(json.dumps(ROWS))
    for kind, sep in (("csv", ","), ("tsv", "\t")):
        header = sep.join(ROWS[0])
        paths[kind].write_text(header + "\n" + "".join(sep.join(str(v) for v in r.values()) + "\n" for r in ROWS))
    table.to_parquet(str(paths["parquet"]))
    table.save_to_disk(str(folder / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select([0, 1])}).save_to_disk(str(folder / "saved_dict"))
    paths["saved"], paths["saved_dict"] = folder / "saved", folder / "saved_dict"
    return paths


def test_every_file_kind_reads_the_same_rows(tmp_path):
    for kind, path in _write_all(tmp_path).items():
        problems = load_prompts(path, columns=COLUMNS)
        assert isinstance(problems, PromptSet) and len(problems) == len(ROWS), kind
        assert _seen(problems) == _expected(), kind
        assert problems[0].row["id"] in (1, "1"), kind  # other columns reach the verifiers
    test = load_prompts(tmp_path / "saved_dict", columns=COLUMNS, split="test")
    assert _seen(test) == _expected()[:2]
    # integer answers are read as their digits; CSV cells stay text ("007" stays "007")
    (tmp_path / "codes.csv").write_text("prompt,answer\nq,007\n")
    assert load_prompts(tmp_path / "codes.csv")[0].answer == "007"
    (tmp_path / "ints.jsonl").write_text('{"prompt": "1+1=", "answer": 2}\n')
    assert load_prompts(tmp_path / "ints.jsonl")[0].answer == "2"


def test_a_dataset_id_loads_from_the_local_cache_offline(tmp_path):
    """A Hugging Face dataset id resolves offline from the cache a previous online load left:
    the cache is built here in that layout (HF_HOME/datasets/<owner>___<name>/...)."""
    home = tmp_path / "hf"
    script = f"""
import glob, os, shutil, datasets
datasets.disable_progress_bars()
cache = os.path.join({str(home)!r}, "datasets")
rows = {ROWS!r}
path = os.path.join({str(tmp_path)!r}, "train.parquet")
datasets.Dataset.from_list(rows).to_parquet(path)
datasets.load_dataset("parquet", data_files={{"train": path}}, cache_dir=cache)
built = glob.glob(os.path.join(cache, "parquet", "*"))[0]
os.makedirs(os.path.join(cache, "me___tiny_prompts"))
shutil.move(built, os.path.join(cache, "me___tiny_prompts", "default"))
for arrow in glob.glob(os.path.join(cache, "me___tiny_prompts", "**", "parquet-train.arrow"), recursive=True):
    os.rename(arrow, arrow.replace("parquet-train.arrow", "tiny_prompts-train.arrow"))
"""
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    check = """
import sys
from fire_opd.train.data import PromptColumns, load_prompts, PromptError
problems = load_prompts("me/tiny_prompts", columns=PromptColumns(prompt="question", answer="solution_text"))
print(len(problems), problems[2].prompt, problems[2].answer)
for bad in ("me/not_cached", "me/tiny_prompts"):
    try:
        load_prompts(bad, split="validation" if bad == "me/tiny_prompts" else "train")
    except PromptError as exc:
        print(exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", check], check=True, env=env, cwd=ROOT, capture_output=True, text=True
    ).stdout.splitlines()
    assert out[0] == "6 5+6= 11"
    assert out[1].startswith("me/not_cached: no such file or folder, and not a dataset that could be loaded")
    assert out[2].startswith("split 'validation': not a split of me/tiny_prompts")
    assert len(out) == 3


def test_errors_name_the_file_and_the_column_or_row(tmp_path):
    paths = _write_all(tmp_path)
    cases = [
        (
            paths["csv"],
            {},
            "rows.csv: no column 'prompt' or 'messages' (columns: question, solution_text, teacher, id)",
        ),
        (paths["parquet"], {"prompt": "question"}, "rows.parquet: no column 'answer' (columns: question,"),
        (paths["saved_dict"], {**vars(COLUMNS)}, None),  # fine: the default split exists
    ]
    for path, columns, message in cases:
        if message is None:
            load_prompts(path, columns=PromptColumns(**columns))
            continue
        with pytest.raises(PromptError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_prompts(path, columns=PromptColumns(**columns))
    with pytest.raises(PromptError, match=r"split 'dev': .*saved_dict has the splits \['test', 'train'\]"):
        load_prompts(paths["saved_dict"], columns=COLUMNS, split="dev", split_field="split")
    with pytest.raises(PromptError, match=r"prompts_split 'test': .*rows.parquet is one file, a single split"):
        load_prompts(paths["parquet"], columns=COLUMNS, split="test", split_field="prompts_split")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(PromptError, match=r"broken.parquet: not readable as parquet \("):
        load_prompts(tmp_path / "broken.parquet")
    (tmp_path / "rows.txt").write_text("1+1=\n")
    with pytest.raises(PromptError, match=r"rows.txt: expected a .jsonl, .json, .csv, .tsv, .parquet file"):
        load_prompts(tmp_path / "rows.txt")
    (tmp_path / "gap.csv").write_text("prompt,answer\n1+1=,2\n2+2=,\n")
    assert load_prompts(tmp_path / "gap.csv")[1].answer == ""  # an empty CSV cell is an empty string
    (tmp_path / "gap.parquet").write_bytes(b"")
    datasets.Dataset.from_list([{"prompt": "1=", "answer": "1"}, {"prompt": "2=", "answer": None}]).to_parquet(
        str(tmp_path / "gap.parquet")
    )
    with pytest.raises(PromptError, match=r"gap.parquet row 1: missing or non-string field 'answer'"):
        load_prompts(tmp_path / "gap.parquet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "nothere.parquet")
    with pytest.raises(ValueError, match="must be different, non-empty names"):
        PromptColumns(prompt="answer")


def test_rows_are_read_when_a_step_draws_them(tmp_path, monkeypatch):
    """A large set is not converted up front: opening it and drawing a step touch only the
    step's rows (the Arrow table stays memory-mapped)."""
    n = 20_000
    path = tmp_path / "big.parquet"
    datasets.Dataset.from_dict(
        {"prompt": [f"{i}=" for i in range(n)], "answer": [str(i) for i in range(n)]}
    ).to_parquet(str(path))
    problems = load_prompts(path)
    converted = []
    import fire_opd.train.data as data

    real = data.problem_from_row
    monkeypatch.setattr(data, "problem_from_row", lambda *a, **k: converted.append(1) or real(*a, **k))
    assert len(problems) == n and not converted
    batch = prompt_batch(problems, step=3, per_step=8, seed=0)
    assert len(converted) == 8
    # the same draw as from a list of the same problems
    as_list = [Problem(f"{i}=", str(i)) for i in range(n)]
    assert [p.prompt for p in batch] == [p.prompt for p in prompt_batch(as_list, step=3, per_step=8, seed=0)]
    assert problems.table.cache_files, "the rows are expected in a memory-mapped Arrow file"


def test_teacher_keys_are_checked_from_the_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    problems = load_prompts(path, columns=COLUMNS)
    check_teacher_keys(problems, ["arith", "other"], None)
    with pytest.raises(KeyError, match=r"rows.jsonl:5 names teacher 'other', which is not among"):
        check_teacher_keys(problems, ["arith"], None)
    path.write_text('{"prompt": "1=", "answer": "1", "teacher": "arith"}\n{"prompt": "2=", "answer": "2"}\n')
    with pytest.raises(KeyError, match=r"rows.jsonl:2 has no teacher key and no default teacher"):
        check_teacher_keys(load_prompts(path), ["arith", "b"], None)
    check_teacher_keys(load_prompts(path), ["arith", "b"], "b")


def test_cli_trains_and_evaluates_from_mapped_columns(tmp_path, capsys):
    """`fire-opd eval` and the train preflight take every kind of source and the column flags;
    a wrong column is one line before any model loads."""
    from fire_opd.cli import main as cli

    assets = ROOT / "fire_opd" / "demo" / "assets"
    paths = _write_all(tmp_path)
    out = tmp_path / "eval.json"
    code = cli.main(
        ["eval", "--model", str(assets / "teacher_arith"), "--tokenizer", str(assets / "tokenizer"),
         "--prompts", str(paths["saved_dict"]), "--split", "test", "--prompt-field", "question",
         "--answer-field", "solution_text", "--max-new-tokens", "4", "--no-progress", "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    record = json.loads(out.read_text())
    assert record["settings"]["split"] == "test" and record["settings"]["columns"]["prompt"] == "question"
    assert [p["prompt"] for p in record["problems"]] == ["1+2=", "3+4="]
    capsys.readouterr()
    code = cli.main(
        ["eval", "--model", str(assets / "teacher_arith"), "--tokenizer", str(assets / "tokenizer"),
         "--prompts", str(paths["csv"]), "--answer-field", "solution_text"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "rows.csv: no column 'prompt' or 'messages'" in err[0] and "--prompt-field" in err[0]


def test_drawing_rows_reads_no_file(tmp_path, monkeypatch):
    """A step's rows come from the Arrow table alone: drawing them opens no file (before, every
    drawn row re-read the JSON-lines file from its start to find its line number, so a step's
    cost grew with the set). A row's line, for an error message, is indexed once."""
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps({"prompt": f"{i}=", "answer": str(i)}) for i in range(3_000)]
    path.write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")  # a blank line after row 9
    problems = load_prompts(path)
    opened = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: opened.append(self) or real_open(self, *a, **k))
    for step in range(3):
        prompt_batch(problems, step=step, per_step=64, seed=0)
    assert not opened
    assert problems.where(9) == f"{path}:10" and problems.where(10) == f"{path}:12"
    assert problems.where(2_999) == f"{path}:3001"
    assert len(opened) == 1  # the line index, built once


def test_an_empty_prompt_is_refused_by_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "3=", "answer": "3"}\n{"prompt": "  ", "answer": "1"}\n'
    )
    with pytest.raises(PromptError, match=rf"{path}:3: empty 'prompt': every prompt needs text"):
        load_prompts(path)
    (tmp_path / "rows.csv").write_text("q,answer\n1+1=,2\n,3\n")
    with pytest.raises(PromptError, match=r"rows.csv row 1: (empty 'q'|give exactly one of 'q')"):
        load_prompts(tmp_path / "rows.csv", columns=PromptColumns(prompt="q"))


def test_one_rule_for_hub_ids_and_local_paths(tmp_path, monkeypatch):
    """The checks before loading and the loaders read a name the same way (fire_opd/train/sources.py):
    `gpt2` is a Hub id for both (the model check refused it before)."""
    from fire_opd.cli.preflight import check_model_path
    from fire_opd.train.sources import is_hub_id, missing_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for hub in ("gpt2", "openai/gsm8k", "Qwen/Qwen2.5-7B-Instruct"):
        assert is_hub_id(hub) and not missing_local_path(hub), hub
        check_model_path(hub, "student")  # no error: read from the Hub cache later
    for local in ("./student", "/no/such/folder", "prompts.jsonl", "data/train.parquet", "models/student", "~/x"):
        assert missing_local_path(local), local
    (tmp_path / "prompts.jsonl").write_text("")
    assert not missing_local_path("prompts.jsonl")
