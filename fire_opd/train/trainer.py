"""A thin FiRe-OPD trainer for Hugging Face causal LMs. `train` is the loop; each stage is a call
into the unit that owns it:

    1. sample     rollouts.sample_step   the student answers `samples_per_prompt` times per prompt
    2. score      scoring.score_rollouts no grad: per token, student and teacher log-prob and
                                         entropy and the reverse KL, from hidden states (no logits)
    3. select     update.Updater.step    FiRe's filter and weights over the whole rollout batch
    4. update     (same)                 micro-batches accumulate one AdamW step (clipped)
    5. evaluate   evaluate.eval_metrics  held-out avg@N / pass@k, every `eval.every` steps
    6. log        run_log.RunLog         metrics.jsonl, TensorBoard
    7. checkpoint checkpoint             atomic saves; `TrainState` is what a resume needs

`parallel.parallelism.Parallelism` holds every factor the number of processes puts into a step.
Every rollout row is sampled from its own seed (seed, step, prompt, sample), so a resumed run
continues exactly and 1 or K processes (torchrun) draw the same rollouts.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Mapping, Optional

import torch

from fire_kernels import TeacherStudentStats
from fire_opd.algorithm.routing import route_rows
from fire_opd.parallel import distributed
from fire_opd.parallel.parallelism import Parallelism
from fire_opd.train import checkpoint, run_dir
from fire_opd.train.checkpoint import TrainState
from fire_opd.train.config import TrainConfig, default_teacher
from fire_opd.train.data import Problem, ProblemSet, check_teacher_keys, prepare_problems, prompt_batch
from fire_opd.train.evaluate import eval_metrics
from fire_opd.train.forwards import autocast, build_forwards
from fire_opd.train.health import health_metrics, rollout_health
from fire_opd.train.models import prepare_models, save_merged
from fire_opd.train.rollouts import Rollouts, sample_step
from fire_opd.train.run_log import RunLog, check_report_to
from fire_opd.train.scoring import TeacherPlan, score_rollouts
from fire_opd.train.update import Updater
from fire_opd.train.verifiers import resolve_verifier
from fire_opd.train.verify import verify_flagged

logger = logging.getLogger("fire_opd")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class FireOPDTrainer:
    """Train a student by on-policy distillation from its teachers with the FiRe-OPD loss.

    Models, tokenizer and prompts are loaded from the config unless given directly (tests and
    the demo pass them in). Teachers must share the student's vocabulary.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        student=None,
        teachers: Optional[dict] = None,
        tokenizer=None,
        train_problems: Optional[ProblemSet] = None,
        eval_problems: Optional[ProblemSet] = None,
        answer_formats: Optional[Mapping[str, re.Pattern]] = None,
    ):
        self.config = config
        # {teacher key: the answer format its completions follow}, for train/malformed_fraction (the demo's tasks)
        self.answer_formats = answer_formats
        if config.runtime.threads:
            torch.set_num_threads(config.runtime.threads)
        check_report_to(config.logging.report_to)  # a tracker that cannot log fails now, not after loading
        self.parallel = Parallelism.start(resolve_device(config.runtime.device), vocab=config.parallel.vocab)
        self.output_dir = Path(config.output_dir)
        resume = bool(config.checkpoint.resume_from)
        run_dir.check_output_dir(self.output_dir, resume=resume, overwrite=config.checkpoint.overwrite)
        if self.is_main:
            run_dir.lock_run(self.output_dir)  # one live run per output_dir
        try:
            self._set_up(config, student, teachers, tokenizer, train_problems, eval_problems)
        except BaseException:  # refused, failed or interrupted (Ctrl-C) while loading: the directory is free again
            if self.is_main:
                run_dir.unlock_run(self.output_dir)
            raise

    def _set_up(self, config, student, teachers, tokenizer, train_problems, eval_problems) -> None:
        """Everything after the lock: the resume checks, the models, the prompts, the update."""
        # the checkpoint to resume, and what the new config changes, before any model loads
        resume_from = config.checkpoint.resume_from
        resume_path = run_dir.resolve_resume(resume_from, self.output_dir) if resume_from else None
        changes = run_dir.check_resume(resume_path, config) if resume_path is not None else []
        distributed.barrier()  # every rank has checked output_dir before rank 0 writes to it
        sampling = config.sampling
        # this process's prompts of each step, and how many go into one generate call
        self.my_prompts, self.prompts_per_call = self.parallel.my_prompts(
            sampling.prompts_per_step, sampling.rollout_chunk_prompts
        )
        self.student, self.teachers, self.tokenizer, self.vocab_size = prepare_models(
            config, self.device, student=student, teachers=teachers, tokenizer=tokenizer,
            vocab_group=self.parallel.vocab_group,
        )  # fmt: skip
        self.verifier = resolve_verifier(config.data.verifier)
        self.train_problems, self.eval_problems = prepare_problems(
            config, self.tokenizer, train_problems, eval_problems
        )
        self.default_teacher = default_teacher(config.models.default_teacher, self.teachers)
        # Fail now, not mid-run, on a prompt that names no loaded teacher.
        check_teacher_keys(self.train_problems, self.teachers, self.default_teacher)
        # the per-micro-batch forwards (loss inside the student's), wrapped once by DDP / FSDP
        self.student_forward, self.teacher_forwards = build_forwards(
            config, self.student, self.teachers, device=self.device, vocab_group=self.parallel.vocab_group,
            vocab_size=self.vocab_size,
        )  # fmt: skip
        self.parallel.wrap(
            self.student_forward, self.teacher_forwards, mode=config.parallel.student,
            teacher_mode=config.parallel.teachers,
        )  # fmt: skip
        self.loss_fn = self.student_forward.loss
        self.updater = Updater(config, self.student_forward, self.teacher_forwards, self.parallel)
        self.optimizer, self.scheduler = self.updater.optimizer, self.updater.scheduler
        self.state = TrainState()
        self.run_log = RunLog(self.output_dir, report_to=config.logging.report_to, config=config.to_dict())
        self.stopped_by_signal: Optional[str] = None
        if resume_path is not None:
            self.load_checkpoint(resume_path)
            if self.is_main:
                logger.warning("resuming from %s (step %d)", resume_path, self.step)
                for key, old, new in changes:
                    logger.warning("resumed with a changed config: %s %r -> %r", key, old, new)
                run_dir.record_config_changes(self.output_dir, self.step, changes)
        # a run resumed after its last step has nothing to do, and changes nothing
        self.finished = self.step >= config.optim.steps

    # ------------------------------------------------------------------ the loop

    def train(self, until_step: Optional[int] = None) -> list[dict]:
        """Run to `optim.steps` (or stop after `until_step`, e.g. to checkpoint and resume).

        SIGTERM or SIGINT (a cluster preempting the job, Ctrl-C) ends the run at the next step
        boundary with a checkpoint; `checkpoint.resume_from: latest` continues it. A run that
        fails or is aborted releases its output directory as one that ends does."""
        try:
            return self._train(until_step)
        except BaseException:
            self.close()
            raise

    def _train(self, until_step: Optional[int]) -> list[dict]:
        from tqdm.auto import tqdm

        cfg, state = self.config, self.state
        if self.finished:
            if self.is_main:
                logger.warning("the run in %s already finished (step %d of %d): nothing to do", self.output_dir,
                               state.step, cfg.optim.steps)  # fmt: skip
            self.close()
            return state.history
        self._start_run()
        started = time.perf_counter()
        if state.step == 0 and cfg.eval.at_start and self.eval_problems and self.parallel.generates_for_eval:
            state.initial_eval = self.evaluate()  # where the student starts, on the same problems
            if self.is_main:
                self.run_log.write(0, {"train/step": 0, **state.initial_eval})
        stop = cfg.optim.steps if until_step is None else min(until_step, cfg.optim.steps)
        bar = tqdm(
            total=cfg.optim.steps,
            initial=state.step,
            disable=not cfg.logging.progress or not self.is_main,
            desc="fire-opd",
        )
        with run_dir.stop_signals(announce=self.is_main) as received:
            while state.step < stop:
                metrics = self.train_step()
                state.step += 1
                state.seconds += time.perf_counter() - started
                started = time.perf_counter()
                if self.is_main:
                    run_dir.refresh_lock(self.output_dir)
                last = state.step == cfg.optim.steps
                if self._due(cfg.eval.every, last) and self.eval_problems and self.parallel.generates_for_eval:
                    metrics.update(self.evaluate())
                self.log(metrics)
                saved = self._due(cfg.checkpoint.save_every, last)
                if saved:
                    self.save_checkpoint(self.output_dir / ("final" if last else f"step-{state.step:06d}"))
                if last and cfg.lora.merge_lora and self.is_main:  # a plain model folder beside final/
                    save_merged(self.output_dir / run_dir.MERGED_DIR, student=self.student, tokenizer=self.tokenizer)
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: round(v, 3) for k, v in metrics.items() if k in _BAR_KEYS})
                if distributed.any_rank(bool(received)) and not last:
                    self._stop(received[0] if received else "SIGTERM", saved)
                    break
        bar.close()
        if self.is_main:
            (self.output_dir / run_dir.SUMMARY_FILE).write_text(json.dumps(self.summary(), indent=1) + "\n")
        self.close()
        return state.history

    def train_step(self) -> dict:
        """One step: sample, score, select and update; returns the step's metrics."""
        t0, comm0 = time.perf_counter(), distributed.COMM_BYTES[0]
        problems, rollouts = self.sample()
        t_sample = time.perf_counter()
        plan = self.plan([p.teacher for p in problems])  # micro-batches by teacher: scoring and the dense update
        scores = score_rollouts(rollouts, plan, student=self.student_forward, teachers=self.teacher_forwards)
        t_score = time.perf_counter()
        health = rollout_health(rollouts, problems, self.tokenizer.eos_token_id, self.verifier, self.answer_formats)
        reliable, verified = self.verify(rollouts, problems, scores, plan)  # fire.filter_mode "verified" only
        metrics = self.updater.step(rollouts, scores, plan, health, state=self.state, teacher_reliable=reliable)
        t_update = time.perf_counter()

        mask = rollouts.response_mask
        tokens = int(mask.sum())
        assert scores.divergence is not None  # scoring asks for the reverse KL
        # this process's rows -> global values (means over processes of equal size; token counts summed)
        local = {
            **health_metrics(health),
            "train/response_length": tokens / len(problems),
            "train/full_vocab_reverse_kl": float(scores.divergence[mask].sum()),  # a token mean below
            "train/reward": float(health["correct"].mean()),
            "train/tokens": float(tokens),
        }
        local = distributed.mean_over_ranks(local, summed=("train/tokens", "train/full_vocab_reverse_kl"))
        local["train/full_vocab_reverse_kl"] /= max(local["train/tokens"], 1.0)
        teacher_params = sum(distributed.local_numel(t.parameters()) for t in self.teachers.values())
        return {
            **metrics,
            **verified,
            **local,
            "train/skipped_steps": float(self.state.skipped_steps),
            "train/step": self.step + 1,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/world_size": float(self.parallel.world_size),
            "train/student_params_per_process": float(distributed.local_numel(self.student.parameters())),
            "train/teacher_params_per_process": float(teacher_params),
            "time/sample_s": t_sample - t0,
            "time/score_s": t_score - t_sample,
            "time/update_s": t_update - t_score,
            "train/tokens_per_s": local["train/tokens"] / max(t_update - t0, 1e-9),
            "train/comm_bytes": float(distributed.COMM_BYTES[0] - comm0),  # this process's collective payload
        }

    # ------------------------------------------------------------------ the stages

    def sample(self) -> tuple[list[Problem], Rollouts]:
        """This process's rollouts of the current step (rollouts.sample_step)."""
        cfg = self.config.sampling
        # The rollouts come from the policy the step scores and trains: a float32 student on CUDA
        # samples under the bf16 autocast of its forwards (bf16 products, and half the bytes per
        # decode step). Evaluation stays in the weights' dtype, as `fire-opd eval` does.
        with autocast(self.device, self.config.models.dtype):
            return sample_step(
                self.student_forward, self.tokenizer,
                prompt_batch(self.train_problems, self.step, cfg.prompts_per_step, self.config.seed),
                mine=self.my_prompts, per_call=self.prompts_per_call,
                samples_per_prompt=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_p=cfg.top_p, seed=self.config.seed, step=self.step,
                synced_gpus=self.parallel.synced_generation,
            )  # fmt: skip

    def plan(self, keys: list[Optional[str]]) -> TeacherPlan:
        """Which teacher reads which rollout, in which micro-batches (`keys`: each row's teacher key,
        None for the default teacher); one collective under torchrun."""
        routes = route_rows(keys, self.teachers, default=self.default_teacher)
        size = self.config.optim.micro_batch_size
        return TeacherPlan(routes, self.parallel.plan_micro_batches(routes, size, order=sorted(self.teachers)))

    def score(self, rollouts: Rollouts, keys: list[Optional[str]]) -> TeacherStudentStats:
        """Per-token [B, T] statistics of the rollouts, each by its own teacher (scoring.score_rollouts)."""
        return score_rollouts(rollouts, self.plan(keys), student=self.student_forward, teachers=self.teacher_forwards)

    def verify(
        self, rollouts: Rollouts, problems: list[Problem], scores: TeacherStudentStats, plan: TeacherPlan
    ) -> tuple[Optional[torch.Tensor], dict]:
        """fire.filter_mode "verified": the teachers finish the flagged rollouts from their first
        divergence token (verify.verify_flagged); (None, {}) for every other mode."""
        cfg = self.config
        if not (cfg.fire.filters and cfg.fire.filter_mode == "verified"):
            return None, {}
        # The teachers continue under the autocast they scored the rollouts in (a float32 teacher on
        # CUDA: bf16 products), so the teacher that is checked is the one whose scores flagged the rollout.
        with autocast(self.device, cfg.models.dtype):
            return verify_flagged(
                rollouts, problems, scores, fire=cfg.fire,
                group_ids=rollouts.group_ids(cfg.sampling.samples_per_prompt), teachers=self.teachers,
                routes=plan.routes, tokenizer=self.tokenizer, verifier=self.verifier,
                max_new_tokens=cfg.sampling.max_new_tokens,
                rows_per_call=self.prompts_per_call * cfg.sampling.samples_per_prompt,  # the sampler's calls
            )  # fmt: skip

    def evaluate(self) -> dict:
        """Held-out `eval/accuracy` (avg@N), `eval/pass@k` and the same per teacher key."""
        cfg = self.config
        return eval_metrics(
            self.student_forward, self.tokenizer, self.eval_problems, samples=cfg.eval.samples,
            temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, max_new_tokens=cfg.sampling.max_new_tokens,
            verifier=self.verifier, seed=cfg.seed * 1_000_003 + self.step, synced_gpus=self.parallel.synced_generation,
        )  # fmt: skip

    def log(self, metrics: dict) -> None:
        self.state.record(metrics)
        if (
            self.is_main
            and self.config.logging.every
            and self._due(self.config.logging.every, self.step == self.config.optim.steps)
        ):
            self.run_log.write(self.step, metrics)

    def save_checkpoint(self, path: str | Path) -> Path:
        """The student, tokenizer and training state (checkpoint.save_training_checkpoint)."""
        return checkpoint.save_training_checkpoint(
            path, state=self.state, config=self.config, student=self.student, tokenizer=self.tokenizer,
            optimizer=self.optimizer, scheduler=self.scheduler, parallel=self.parallel,
        )  # fmt: skip

    def load_checkpoint(self, path: str | Path) -> None:
        self.state = checkpoint.load_training_checkpoint(
            path, student=self.student, optimizer=self.optimizer, scheduler=self.scheduler, parallel=self.parallel,
            metrics_file=self.output_dir / run_dir.METRICS_FILE,
        )  # fmt: skip

    def summary(self) -> dict:
        """How the run went: the final model, steps, time, throughput, and the initial against
        the last evaluation (written to output_dir/summary.json when a run ends)."""
        state = self.state
        last_eval, tokens = state.last_eval, state.tokens
        final, merged = self.output_dir / "final", self.output_dir / run_dir.MERGED_DIR
        return {
            "final_model": str(final.resolve()) if final.is_dir() else None,
            **({"merged_model": str(merged.resolve())} if self.config.lora.merge_lora and merged.is_dir() else {}),
            "steps": state.step,
            "of_steps": self.config.optim.steps,
            "seconds": state.seconds,
            "tokens_per_s": tokens / state.seconds if state.seconds > 0 else None,
            "skipped_steps": state.skipped_steps,
            "initial_eval": state.initial_eval,
            "final_eval": {k: v for k, v in last_eval.items() if k.startswith("eval/")},
            "final_eval_step": last_eval.get("train/step"),
        }

    def close(self) -> None:
        """Release the output directory (its lock) and the logs; `train` does it when it ends."""
        try:
            self.run_log.close()
        finally:
            if self.is_main:
                run_dir.unlock_run(self.output_dir)

    # ------------------------------------------------------------------ around the loop

    def _start_run(self) -> None:
        if self.is_main:
            if self.config.checkpoint.overwrite and not self.config.checkpoint.resume_from:
                run_dir.clear_run(self.output_dir)
            run_dir.remove_partial_saves(self.output_dir)
            self.run_log.start(self.step)
            (self.output_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))

    def _due(self, every: int, last: bool) -> bool:
        return bool(every and self.step % every == 0) or last

    def _stop(self, signal_name: str, saved: bool) -> None:
        """A stop signal: a checkpoint at this step boundary, then the loop ends."""
        self.stopped_by_signal = signal_name
        path = self.output_dir / f"step-{self.step:06d}"
        if not saved:
            self.save_checkpoint(path)
        if self.is_main:
            logger.warning(
                "%s received: stopped after step %d with checkpoint %s; resume with checkpoint.resume_from: latest",
                signal_name,
                self.step,
                path,
            )

    # the run's position, kept in `state` (what a resume restores)
    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def history(self) -> list[dict]:
        return self.state.history

    @property
    def skipped_steps(self) -> int:
        return self.state.skipped_steps

    @property
    def is_main(self) -> bool:
        return self.parallel.is_main

    @property
    def device(self) -> torch.device:
        return self.parallel.device


_BAR_KEYS = ("train/loss", "fire/keep_ratio", "eval/accuracy")
