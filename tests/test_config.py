"""TrainConfig: sections, dotted keys, the flat keys of earlier versions, and checkpoints they wrote."""

from __future__ import annotations

import json
import logging

import pytest

from fire_opd.algorithm.options import FireOptions
from fire_opd.train.config import LEGACY_KEYS, TrainConfig, field_names


def test_sections_dotted_keys_and_overrides_agree(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        "models:\n  student: s\n  teachers: {a: t}\ndata:\n  prompts: p.jsonl\n"
        "optim:\n  lr: 0.001\n  adam_betas: [0.9, 0.95]\nfire:\n  method: opd\n  percentile: 30\n"
    )
    config = TrainConfig.from_yaml(nested, ["optim.lr=3e-4", "fire.alpha=0.5", "checkpoint.resume_from=latest"])
    assert config.optim.lr == 3e-4 and config.optim.adam_betas == (0.9, 0.95)
    assert config.fire == FireOptions(method="opd", percentile=30.0, alpha=0.5)
    assert config.models.teachers == {"a": "t"} and config.checkpoint.resume_from == "latest"
    dotted = TrainConfig.from_dict({"models.student": "s", "models.teachers": {"a": "t"}, "optim.lr": 3e-4})
    assert dotted.models == config.models and dotted.optim.lr == config.optim.lr
    # to_dict round-trips, and `updated` changes one field
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.updated({"sampling.top_p": 0.9}).sampling.top_p == 0.9 and config.sampling.top_p == 1.0


def test_every_flat_key_of_earlier_versions_still_works_with_one_warning(tmp_path, caplog):
    """Each flat key maps to one field; a YAML and --set that use them load the same config as the
    sections, and say so in one warning line."""
    fields = set(field_names())
    assert set(LEGACY_KEYS.values()) <= fields and len(set(LEGACY_KEYS.values())) == len(LEGACY_KEYS)
    new_in_0_2 = {"checkpoint.allow_config_change", "eval.at_start"}  # fields that had no flat key
    new_in_0_2 |= {f"data.{k}" for k in ("prompts_split", "eval_prompts_split")}
    new_in_0_2 |= {f"data.{k}_field" for k in ("prompt", "answer", "messages")}
    new_in_0_2 |= {"logging.report_to"} | {
        f"lora.{k}" for k in ("r", "alpha", "dropout", "target_modules", "merge_lora")
    }
    assert set(LEGACY_KEYS.values()) | new_in_0_2 == fields - {"preset", "seed", "output_dir"}  # none is missing
    flat = tmp_path / "flat.yaml"
    flat.write_text("student: s\nteachers: {a: t}\nlr: 0.001\nmethod: opd\nparallel: fsdp\neval_every: 5\n")
    with caplog.at_level(logging.WARNING, logger="fire_opd"):
        config = TrainConfig.from_yaml(flat, ["percentile=30", "log_every=2"])
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warnings) == 1 and "lr -> optim.lr" in warnings[0] and "log_every -> logging.every" in warnings[0]
    assert config.optim.lr == 1e-3 and config.fire.method == "opd" and config.fire.percentile == 30.0
    assert config.parallel.student == "fsdp" and config.eval.every == 5 and config.logging.every == 2


def test_errors_name_the_field_as_written():
    with pytest.raises(ValueError, match=r"unknown config field 'optim.lrr' \(did you mean 'optim.lr'"):
        TrainConfig.from_dict({"optim": {"lrr": 1}})
    with pytest.raises(ValueError, match=r"unknown config field 'percentil' \(did you mean 'percentile'"):
        TrainConfig.from_dict({"percentil": 20})
    with pytest.raises(ValueError, match=r"fire.percentile must be in \[0, 100\], got 120"):
        TrainConfig.from_dict({"fire": {"percentile": 120}})
    with pytest.raises(ValueError, match=r"optim.lr must be in \(0, inf\]"):
        TrainConfig.from_dict({"optim.lr": 0})
    with pytest.raises(ValueError, match="config field 'sampling.top_p' expects float"):
        TrainConfig.from_dict({"sampling.top_p": "high"})
    with pytest.raises(ValueError, match="override 'lr' must look like key=value"):
        TrainConfig.from_dict({}, ["lr"])


def test_checkpoints_written_with_the_flat_config_still_resume(tmp_path):
    """A checkpoint's trainer_state.json of fire-opd 0.1 holds the flat config; resuming reads
    only the step, history, schedule and RNG states from it."""
    from fire_opd.demo.tasks import TASK_ALPHABET, sample_problems
    from fire_opd.demo.tiny_models import build_char_tokenizer, tiny_llama
    from fire_opd.train.run_dir import STATE_FILE
    from fire_opd.train.trainer import FireOPDTrainer

    tokenizer = build_char_tokenizer(TASK_ALPHABET)

    def trainer(config):
        model = lambda seed: tiny_llama(  # noqa: E731
            len(tokenizer), 32, 1, 2, seed=seed, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id
        )
        return FireOPDTrainer(
            config, student=model(0), teachers={"arith": model(1)}, tokenizer=tokenizer,
            train_problems=sample_problems(["arith"], 16, seed=1, split="train"),
        )  # fmt: skip

    base = {
        "output_dir": str(tmp_path / "run"), "optim.steps": 3, "sampling.prompts_per_step": 2,
        "sampling.samples_per_prompt": 2, "sampling.max_new_tokens": 4, "checkpoint.save_every": 1,
        "logging.progress": False, "logging.report_to": [], "eval.every": 0,
    }  # fmt: skip
    first = trainer(TrainConfig.from_dict(base))
    first.train(until_step=2)
    state_file = tmp_path / "run" / "step-000002" / STATE_FILE
    state = json.loads(state_file.read_text())
    state["config"] = {"steps": 3, "lr": 1e-4, "method": "fire", "prompts_per_step": 2}  # as 0.1 wrote it
    state_file.write_text(json.dumps(state))
    resumed = trainer(TrainConfig.from_dict({**base, "checkpoint.resume_from": "latest"}))
    assert resumed.step == 2 and len(resumed.train()) == 3


@pytest.mark.parametrize("page", ["README.md", "docs/training.md"])
def test_the_documented_configs_are_valid(page):
    """Every `# distill.yaml` block of the README and the training page loads as a TrainConfig
    (a renamed or mistyped field in the docs fails here)."""
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[1] / page).read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if b.startswith("# distill.yaml")]
    assert blocks, f"{page} has no distill.yaml block"
    for block in blocks:
        config = TrainConfig.from_dict(yaml.safe_load(block))
        assert config.models.student and config.models.teachers


@pytest.mark.parametrize(
    "key,suggested",
    [
        ("optim.learning_rate", "optim.lr"),  # transformers' name (it suggested optim.min_lr_ratio)
        ("learning_rate", "optim.lr"),
        ("sampling.max_completion_length", "sampling.max_new_tokens"),  # TRL's
        ("optim.max_steps", "optim.steps"),
        ("fire.percentil", "fire.percentile"),  # a typo: the closest name of its own section
        ("sampling.temprature", "sampling.temperature"),
    ],
)
def test_unknown_keys_suggest_the_field_meant(key, suggested):
    with pytest.raises(ValueError, match=rf"unknown config field '{key}' \(did you mean '{suggested}'\?\)"):
        TrainConfig.from_dict({key: 1})


def test_the_config_knows_the_kernel_backends():
    """The config's copy of fire_kernels.BACKENDS (kept so that the CLI's checks import no torch)."""
    from fire_kernels import BACKENDS
    from fire_opd.train.config import KERNEL_BACKENDS

    assert KERNEL_BACKENDS == BACKENDS


def test_every_field_is_documented_once_and_the_page_shows_it():
    """Each config field's help lives in its dataclass (`field(metadata={"help": ...})`); the
    training page's field table and `fire-opd train --help` are made from it."""
    import re
    from pathlib import Path

    from fire_opd.cli.main import build_parser
    from fire_opd.train.config import field_docs, fields_markdown

    keys = [key for key, _, _ in field_docs()]
    assert sorted(keys) == sorted(field_names()) and all(text for _, _, text in field_docs())
    page = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    table = re.search(r"<!-- fields:start -->\n(.*?)\n<!-- fields:end -->", page, flags=re.S)
    assert table and table.group(1) == fields_markdown(), "run python -m fire_opd.train.config into docs/training.md"
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    assert all(f"  {key} = " in train.epilog for key in keys)


def test_presets_set_their_fields_under_the_users_own(caplog):
    from fire_opd.train.config import PRESETS

    released = TrainConfig.from_dict({"preset": "fire-released"})
    for key, value in PRESETS["fire-released"].items():
        section, name = key.split(".")
        assert getattr(getattr(released, section), name) == value
    with caplog.at_level("WARNING", logger="fire_opd"):
        mine = TrainConfig.from_dict({"preset": "fire-released", "loss.objective": "full_vocab"})
    assert mine.loss.objective == "full_vocab" and mine.loss.stats_scope == "micro_batch"
    assert "override preset fire-released's: loss.objective='full_vocab' (preset: 'sampled')" in caplog.text
    assert TrainConfig().updated({"preset": "fire-released"}).optim.micro_batch_size == 1
    assert mine.updated({"optim.lr": 1e-4}).loss.objective == "full_vocab"  # a later update keeps the user's key
    with pytest.raises(ValueError, match="preset must be one of fire-released, got 'paper'"):
        TrainConfig.from_dict({"preset": "paper"})
