"""A thin FiRe-OPD trainer for Hugging Face causal LMs. Read `train_step` top to bottom:

    1. sample      the student generates `samples_per_prompt` answers per prompt (on-policy)
    2. score       no grad: one fused sweep per teacher gives old student log-prob and entropy,
                   teacher log-prob and entropy for every response token (no logits)
    3. filter and  FiRe statistics over the whole rollout batch -> advantages, loss mask
       reweight
    4. update      micro-batches: hidden states -> log pi_theta (fused) -> clipped surrogate
                   (objective "sampled"), or -> the exact per-token divergence to the teacher
                   (objective "full_vocab"); gradients accumulate to one AdamW step (clipped,
                   warmup + cosine schedule)

Every rollout chunk is seeded by (seed, step, chunk), so a resumed run continues exactly and 1 or K
processes (torchrun, fire_opd/distributed.py) sample the same rollouts.

Around the loop, in their own modules: models.prepare_models (loading, dtypes, gradient
checkpointing), data.prepare_problems (prompt files, chat templates), evaluate (avg@N, pass@k),
run_log (metrics.jsonl, TensorBoard), checkpoint (atomic saves, resume, preemption signals).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import checkpoint, distributed, sharded_head
from .config import TrainConfig
from .data import Problem, prepare_problems
from .errors import TrainingStopped
from .evaluate import evaluate_by_teacher
from .loss import FILTER_METHODS, LOCAL, FireAdvantages, compute_fire_advantages, dense_coefficients, loss_normalizer
from .loss_from_hidden import FireOPDLoss, response_token_stats
from .models import lm_head, prepare_models, response_hidden_states
from .regime import filter_diagnostics, health_metrics, rollout_health
from .routing import route_rows, scatter_rows
from .run_log import RunLog
from .sampling import Rollouts, concat_rollouts, generate_rollouts
from .verifiers import resolve_verifier

logger = logging.getLogger("fire_opd")

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def warmup_cosine(config: TrainConfig) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup, then cosine decay to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine

    return factor


class FireOPDTrainer:
    """Train `student` by on-policy distillation from `teachers` with the FiRe-OPD loss.

    Models, tokenizer and prompts are loaded from the config unless given directly (tests and
    the demo pass them in). Teachers must share the student's vocabulary.
    """

    def __init__(self, config: TrainConfig, *, student=None, teachers: Optional[dict] = None, tokenizer=None,
                 train_problems: Optional[list[Problem]] = None, eval_problems: Optional[list[Problem]] = None):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.rank, self.world_size, self.device = distributed.setup(resolve_device(config.device))
        self.is_main = self.rank == 0  # logs, evaluates and writes checkpoints
        self.output_dir = Path(config.output_dir)
        checkpoint.check_output_dir(self.output_dir, resume=bool(config.resume_from), overwrite=config.overwrite)
        distributed.barrier()  # every rank has checked output_dir before rank 0 writes to it
        num_chunks = config.prompts_per_step // (config.rollout_chunk_prompts or config.prompts_per_step)
        self.my_chunks = distributed.my_chunks(num_chunks, self.rank, self.world_size)
        # vocab_parallel: each process keeps its rows of every lm_head (fire_opd/sharded_head.py)
        self.vocab_group = dist.group.WORLD if config.vocab_parallel and distributed.active() else None
        self.student, self.teachers, self.tokenizer = prepare_models(config, self.device, student=student,
                                                                     teachers=teachers, tokenizer=tokenizer,
                                                                     vocab_group=self.vocab_group)
        self.verifier = resolve_verifier(config.verifier)
        self.train_problems, self.eval_problems = prepare_problems(config, self.tokenizer, train_problems,
                                                                   eval_problems)
        self.default_teacher = config.default_teacher or (next(iter(self.teachers)) if len(self.teachers) == 1
                                                          else None)
        # Fail now, not mid-run, on a prompt that names no loaded teacher.
        route_rows([p.teacher for p in self.train_problems], self.teachers, default=self.default_teacher)

        # data-parallel update under torchrun (DDP or FSDP2; gloo on CPU, nccl on CUDA), nothing otherwise
        self.wrapper = distributed.wrap(self.student, self.device, config.parallel,
                                        ignore=sharded_head.sharded_parameter_names(self.student))
        self.fsdp = self.wrapper is not None and distributed.is_fsdp(self.wrapper)
        self.teacher_wrappers = {name: wrapper for name, teacher in self.teachers.items()
                                 if (wrapper := distributed.wrap_teacher(teacher, config.teacher_parallel)) is not None}
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=config.lr, betas=config.adam_betas,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(config))
        self.loss_fn = FireOPDLoss(clip_ratio=config.clip_ratio, loss_agg_mode=config.loss_agg_mode,
                                   temperature=config.temperature, backend=config.backend,
                                   fused_update=config.fused_update, divergence=config.divergence,
                                   jsd_beta=config.jsd_beta, vocab_process_group=self.vocab_group)
        self.step = 0
        self.skipped_steps, self._skipped_in_a_row = 0, 0
        self.history: list[dict] = []
        self.run_log = RunLog(self.output_dir, tensorboard=config.tensorboard)
        self.stopped_by_signal: Optional[str] = None
        if config.resume_from:
            path = checkpoint.resolve_resume(config.resume_from, self.output_dir)
            if path is not None:
                self.load_checkpoint(path)
                if self.is_main:
                    logger.warning("resuming from %s (step %d)", path, self.step)

    # ------------------------------------------------------------------ the loop

    def train(self, until_step: Optional[int] = None) -> list[dict]:
        """Run to `config.steps` (or stop after `until_step`, e.g. to checkpoint and resume).

        SIGTERM or SIGINT (a cluster preempting the job, Ctrl-C) ends the run at the next step
        boundary with a checkpoint; `resume_from: latest` continues it."""
        from tqdm.auto import tqdm

        cfg = self.config
        if self.is_main:
            if cfg.overwrite and not cfg.resume_from:
                checkpoint.clear_run(self.output_dir)
            checkpoint.remove_partial_saves(self.output_dir)
            self.run_log.start(self.step)
            (self.output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        stop = cfg.steps if until_step is None else min(until_step, cfg.steps)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress or not self.is_main, desc="fire-opd")
        with checkpoint.stop_signals() as received:
            while self.step < stop:
                metrics = self.train_step()
                self.step += 1
                last = self.step == cfg.steps
                # under FSDP or vocab_parallel every process takes part in generation (its collectives)
                if (self.is_main or self.fsdp or self.vocab_group is not None) and self.eval_problems and (
                        (cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                    metrics.update(self.evaluate())
                self.log(metrics)
                saved = (cfg.save_every and self.step % cfg.save_every == 0) or last
                if saved:
                    self.save_checkpoint(self.output_dir / ("final" if last else f"step-{self.step:06d}"))
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: round(v, 3) for k, v in metrics.items()
                                 if k in ("train/loss", "fire/keep_ratio", "eval/accuracy")})
                if distributed.any_rank(bool(received)) and not last:
                    self.stopped_by_signal = received[0] if received else "SIGTERM"
                    path = self.output_dir / f"step-{self.step:06d}"
                    if not saved:
                        self.save_checkpoint(path)
                    if self.is_main:
                        logger.warning("%s received: stopped after step %d with checkpoint %s; resume with "
                                       "resume_from: latest", self.stopped_by_signal, self.step, path)
                    break
        bar.close()
        self.run_log.close()
        return self.history

    def train_step(self) -> dict:
        t0, comm0 = time.perf_counter(), distributed.COMM_BYTES[0]

        # 1. sample: this rank's chunks of the step's prompts, each chunk with its own seed
        problems, rollouts = self.sample()
        t_sample = time.perf_counter()

        # 2. score (no grad)
        keys = [p.teacher for p in problems]
        old_log_prob, student_entropy, teacher_log_prob, teacher_entropy, reverse_kl = self.score(rollouts, keys)
        t_score = time.perf_counter()

        # 3 + 4. FiRe statistics and the update
        health = rollout_health(rollouts, problems, self.tokenizer.eos_token_id, self.verifier)
        metrics = self.update(rollouts, keys, old_log_prob, student_entropy, teacher_log_prob, teacher_entropy,
                              health)
        t_update = time.perf_counter()

        tokens = int(rollouts.response_mask.sum())
        mask = rollouts.response_mask
        # this rank's rows -> global values (means over ranks of equal size; token counts summed)
        local = {**health_metrics(health), "train/response_length": tokens / len(problems),
                 "train/full_vocab_reverse_kl": float(reverse_kl[mask].sum()),  # a token mean below
                 "train/reward": float(health["correct"].mean()), "train/tokens": float(tokens)}
        local = distributed.mean_over_ranks(local, summed=("train/tokens", "train/full_vocab_reverse_kl"))
        local["train/full_vocab_reverse_kl"] /= max(local["train/tokens"], 1.0)
        metrics.update(local)
        metrics.update({
            "train/step": self.step + 1,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/world_size": float(self.world_size),
            "train/student_params_per_process": float(distributed.local_numel(self.student.parameters())),
            "train/teacher_params_per_process": float(sum(distributed.local_numel(t.parameters())
                                                          for t in self.teachers.values())),
            "time/sample_s": t_sample - t0, "time/score_s": t_score - t_sample, "time/update_s": t_update - t_score,
            "train/tokens_per_s": local["train/tokens"] / max(t_update - t0, 1e-9),
            "train/comm_bytes": float(distributed.COMM_BYTES[0] - comm0),  # this process's collective payload
        })
        return metrics

    def sample(self) -> tuple[list[Problem], Rollouts]:
        """This rank's rollouts of the step: its chunks of the step's prompts, each sampled with
        the seed (seed, step, chunk), so a chunk's rollouts do not depend on the process count."""
        cfg = self.config
        prompts = self._prompt_batch()
        chunk = cfg.rollout_chunk_prompts or cfg.prompts_per_step
        problems, parts = [], []
        for c in self.my_chunks:
            torch.manual_seed(distributed.chunk_seed(cfg.seed, self.step, c))
            random.seed(distributed.chunk_seed(cfg.seed, self.step, c))
            chunk_problems = [p for p in prompts[c * chunk : (c + 1) * chunk] for _ in range(cfg.samples_per_prompt)]
            parts.append(generate_rollouts(self.student, self.tokenizer, [p.prompt for p in chunk_problems],
                                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                           top_p=cfg.top_p, synced_gpus=self._synced_generation))
            problems += chunk_problems
        return problems, concat_rollouts(parts, self.tokenizer.pad_token_id)

    @torch.no_grad()
    def score(self, rollouts: Rollouts, keys: list[Optional[str]]):
        """Per-token [B, T] old log-prob, student entropy, teacher log-prob and entropy and the
        full-vocab reverse KL, each rollout scored by its own teacher in one fused sweep."""
        cfg = self.config
        routes = route_rows(keys, self.teachers, default=self.default_teacher)
        ids, attn, mask = rollouts.input_ids, rollouts.attention_mask, rollouts.response_mask
        per_teacher: dict = {}
        for name, chunk, padding in self._micro_batches(sorted(self.teachers), routes, self.device):
            teacher = self.teachers[name]

            def student_stats(t_h):  # inside the student's (FSDP) forward: its lm_head is gathered there
                with self._autocast():
                    s_h = response_hidden_states(self.student, ids[chunk], attn[chunk], rollouts.prompt_len)
                return response_token_stats(s_h, lm_head(self.student).to(s_h.dtype), rollouts.response_ids[chunk],
                                            mask[chunk], t_h, lm_head(teacher).to(t_h.dtype),
                                            temperature=cfg.temperature, divergence="reverse_kl", backend=cfg.backend,
                                            vocab_process_group=self.vocab_group)

            def with_teacher():  # inside the teacher's forward when it is sharded
                with self._autocast():
                    t_h = response_hidden_states(teacher, ids[chunk], attn[chunk], rollouts.prompt_len)
                return distributed.forward_through(self.wrapper if self.fsdp else None, self.student, student_stats,
                                                   t_h)

            stats = distributed.forward_through(self.teacher_wrappers.get(name), teacher, with_teacher)
            if not padding:
                per_teacher.setdefault(name, []).append(stats)
        per_teacher = {name: tuple(torch.cat(column) for column in zip(*parts)) for name, parts in per_teacher.items()}
        return scatter_rows(per_teacher, routes, batch_size=len(keys))

    def update(self, rollouts: Rollouts, keys: list[Optional[str]], old_log_prob, student_entropy, teacher_log_prob,
               teacher_entropy, health: Optional[dict] = None) -> dict:
        cfg = self.config
        dense = cfg.objective == "full_vocab"
        mask = rollouts.response_mask
        fire_args = dict(method=cfg.method, percentile=cfg.percentile, alpha=cfg.alpha, beta=cfg.beta,
                         filter_scope=cfg.filter_scope, filter_score=cfg.filter_score,
                         teacher_confidence_gate=cfg.teacher_confidence_gate)
        # rollouts of one prompt are adjacent: prompt index of each row, for filter_scope="group"
        group_ids = torch.arange(mask.shape[0], device=mask.device) // cfg.samples_per_prompt
        if dense:
            # The dense loss needs each rollout's teacher hidden states again; they are recomputed
            # per micro-batch (one no-grad teacher forward) rather than kept from scoring, which
            # would hold [rollouts, response_len, D_t] activations through the whole update.
            # Micro-batches therefore hold rows of one teacher each.
            routes = route_rows(keys, self.teachers, default=self.default_teacher)
            micro_batches = self._micro_batches(sorted(self.teachers), routes, mask.device)
        else:  # the clipped surrogate needs no teacher: micro-batches of any rows
            micro_batches = self._micro_batches([None], {None: torch.arange(mask.shape[0])}, mask.device)
        metrics: dict = {}
        if cfg.stats_scope == "batch":
            fire = compute_fire_advantages(old_log_prob, teacher_log_prob, student_entropy, teacher_entropy, mask,
                                           group_ids=group_ids, **fire_args)
            normalizer = loss_normalizer(fire.loss_mask, cfg.loss_agg_mode)
            metrics = dict(fire.metrics)
            if health is not None and cfg.method in FILTER_METHODS:
                metrics.update(distributed.mean_over_ranks(filter_diagnostics(
                    fire.keep, health, mask, teacher_log_prob, old_log_prob, cfg.samples_per_prompt)))

        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, loss_metrics = 0.0, {}
        # Every process runs the same micro-batches per teacher (the last one syncs the gradients);
        # the padding ones (uneven routing) bring no tokens.
        count = len(micro_batches)
        real = sum(1 for *_, padding in micro_batches if not padding)
        for index, (teacher_name, rows, padding) in enumerate(micro_batches):
            if cfg.stats_scope == "micro_batch":
                # The released code's behaviour: statistics inside each micro-batch (of this
                # process: no collective), each micro-batch's loss averaged over its own tokens,
                # then over the micro-batches of every process.
                part = compute_fire_advantages(old_log_prob[rows], teacher_log_prob[rows], student_entropy[rows],
                                               teacher_entropy[rows], mask[rows], group_ids=group_ids[rows],
                                               process_group=LOCAL, **fire_args)
                part_normalizer, scale = None, 1 / (real * self.world_size)
                if not padding:
                    metrics = _accumulate(metrics, part.metrics, real)
            else:
                part, part_normalizer, scale = _select_rows(fire, rows), normalizer, 1.0
            if padding:  # only there to keep every process's collectives in step: no token of its own
                part = _without_tokens(part)
            sync = self.wrapper is None or index == count - 1
            with distributed.gradient_sync(self.wrapper, sync):
                loss, mb_metrics = self._micro_batch_loss(rollouts, rows, teacher_name if dense else None, part,
                                                          part_normalizer, old_log_prob[rows])
                # every process's loss is normalized by the global count, and DDP / FSDP average the
                # gradients over processes: times world_size, the result is the batch gradient
                (loss * scale * (self.world_size if self.wrapper is not None else 1)).backward()
            # under vocab_parallel each process's loss is every process's: its share is 1 / K
            total_loss += float(loss.detach()) * scale / (self.world_size if self.vocab_group is not None else 1)
            if not padding:
                loss_metrics = _accumulate(loss_metrics, mb_metrics, real)
        total_loss = distributed.mean_over_ranks({"loss": total_loss}, summed=("loss",))["loss"]
        loss_metrics = distributed.mean_over_ranks(loss_metrics)
        if cfg.stats_scope == "micro_batch":
            metrics = distributed.mean_over_ranks(metrics)
        grad_norm = self._clipped_gradient_norm()
        skipped = self._skip_if_not_finite(total_loss, grad_norm)
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()  # the schedule follows the step count either way
        return {**metrics, **loss_metrics, "train/loss": total_loss, "train/grad_norm": grad_norm,
                "train/step_skipped": float(skipped), "train/skipped_steps": float(self.skipped_steps)}

    def _micro_batch_loss(self, rollouts: Rollouts, rows: torch.Tensor, teacher_name: Optional[str],
                          part: FireAdvantages, normalizer: Optional[float], old_log_prob: torch.Tensor):
        """(loss, metrics) of some rows: the dense divergence to `teacher_name`'s distribution, or
        (teacher_name None) the clipped surrogate. Run as the student wrapper's forward (DDP / FSDP
        hooks see it, FSDP gathers the lm_head), itself inside the teacher's forward when the
        teacher is sharded."""
        cfg = self.config
        ids, attn = rollouts.input_ids[rows], rollouts.attention_mask[rows]
        teacher = self.teachers.get(teacher_name)

        def student_loss(teacher_hidden):
            with self._autocast():
                hidden = response_hidden_states(self.student, ids, attn, rollouts.prompt_len)
            head = lm_head(self.student).to(hidden.dtype)
            if teacher is not None:
                return self.loss_fn.dense(hidden, head, teacher_hidden, lm_head(teacher).to(teacher_hidden.dtype),
                                          rollouts.response_ids[rows],
                                          dense_coefficients(part, cfg.loss_agg_mode, normalizer), part.loss_mask)
            return self.loss_fn(hidden, head, rollouts.response_ids[rows], old_log_prob, part.advantages,
                                part.loss_mask, normalizer=normalizer)

        def with_teacher():
            teacher_hidden = None
            if teacher is not None:
                with torch.no_grad(), self._autocast():
                    teacher_hidden = response_hidden_states(teacher, ids, attn, rollouts.prompt_len)
            return distributed.forward_through(self.wrapper, self.student, student_loss, teacher_hidden)

        return distributed.forward_through(self.teacher_wrappers.get(teacher_name), teacher, with_teacher)

    def _micro_batches(self, names: list, routes: dict, device) -> list[tuple[Optional[str], torch.Tensor, bool]]:
        """(teacher, rows, padding) micro-batches, teacher by teacher in one order on every process.
        Under torchrun every process runs as many micro-batches of each teacher as the process with
        the most (DDP syncs once, FSDP gathers the same shards, vocab_parallel gathers the same
        tokens); the extra ones repeat some rows of this process and are marked padding."""
        local = {name: list(routes[name].to(device).split(self.config.micro_batch_size)) if name in routes else []
                 for name in names}
        counts = [len(local[name]) for name in names]
        if self.wrapper is not None or self.teacher_wrappers:
            counts = distributed.max_over_ranks_each(counts)
        some_rows = next(chunk for chunks in local.values() for chunk in chunks)
        return [(name, local[name][i] if i < len(local[name]) else (local[name] or [some_rows])[0],
                 i >= len(local[name])) for name, count in zip(names, counts) for i in range(count)]

    def _clipped_gradient_norm(self) -> float:
        """Clip the student's gradients to max_grad_norm; returns their norm before clipping."""
        heads = sharded_head.sharded_parameters(self.student)
        if self.wrapper is not None:
            distributed.count_gradients(self.student.parameters(), skip=heads)
        if self.vocab_group is None:
            return float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config.max_grad_norm))
        # each lm_head shard holds the whole batch's gradient for its rows, times the loss's K
        for param in heads:
            if param.grad is not None:
                param.grad.div_(self.world_size)
        return sharded_head.clip_grad_norm(self.student, self.config.max_grad_norm)

    def _skip_if_not_finite(self, loss: float, grad_norm: float) -> bool:
        """A step whose loss or gradient norm is not finite leaves the weights and the optimizer
        state as they are: its gradients are dropped, it is counted and logged with its cause, and
        `max_skipped_steps` such steps in a row stop the run with an error."""
        cause = (f"loss {loss}" if not math.isfinite(loss) else
                 f"gradient norm {grad_norm}" if not math.isfinite(grad_norm) else None)
        if cause is None:
            self._skipped_in_a_row = 0
            return False
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self._skipped_in_a_row += 1
        logger.warning("step %d skipped: %s is not finite (weights and optimizer state unchanged)", self.step + 1,
                       cause)
        if self._skipped_in_a_row >= self.config.max_skipped_steps:
            raise TrainingStopped(f"{self._skipped_in_a_row} steps in a row had a non-finite loss or gradient norm "
                               f"(last: {cause}, step {self.step + 1}); stopping. Lower lr, check the data, or raise "
                               "max_skipped_steps")
        return True

    # ------------------------------------------------------------------ evaluation, logging, checkpoints

    def evaluate(self) -> dict:
        """Held-out avg@N as `eval/accuracy` (greedy pass@1 by default), pass@k for k > 1, and the
        same per teacher key (`eval/accuracy_<key>`)."""
        cfg = self.config
        results = evaluate_by_teacher(self.student, self.tokenizer, self.eval_problems, samples=cfg.eval_samples,
                                      temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                                      max_new_tokens=cfg.max_new_tokens, verifier=self.verifier,
                                      seed=cfg.seed * 1_000_003 + self.step, synced_gpus=self._synced_generation)
        out = {}
        for key, summary in results.items():
            suffix = "" if key == "all" else f"_{key}"
            out[f"eval/accuracy{suffix}"] = summary[f"avg@{cfg.eval_samples}"]
            out.update({f"eval/{name}{suffix}": value for name, value in summary.items()
                        if name.startswith("pass@") and name != "pass@1"})
        return out

    def log(self, metrics: dict) -> None:
        self.history.append(metrics)
        if self.is_main and self.config.log_every and (self.step % self.config.log_every == 0 or self.step == self.config.steps):
            self.run_log.write(self.step, metrics)

    def save_checkpoint(self, path: str | Path) -> Path:
        """The student and tokenizer in Hugging Face format plus the trainer's state, written
        atomically by rank 0 (fire_opd/checkpoint.py); then prunes step checkpoints beyond
        `keep_last`. Weights and optimizer state are saved whole (gathered from the shards under
        FSDP), so one copy serves a resume with any number of processes and either mode, and the
        model folder loads into a single process with `from_pretrained`."""
        path = Path(path)
        weights, optimizer_state = distributed.full_state_dicts(self.student, self.optimizer)  # all ranks (FSDP)
        sharded_head.gather_state(self.student, self.optimizer, weights, optimizer_state)  # whole lm_heads (vocab_parallel)
        if self.is_main:
            python_rng, tensor_rng = checkpoint.rng_state()
            state = {"step": self.step, "skipped_steps": self.skipped_steps, "history": self.history,
                     "config": self.config.to_dict(), "scheduler": self.scheduler.state_dict(),
                     "python_rng": python_rng, "world_size": self.world_size}
            checkpoint.save_checkpoint(path, model=self.student, tokenizer=self.tokenizer, state=state,
                                       tensor_state={"optimizer": optimizer_state, "rng": tensor_rng},
                                       weights=weights)
            if path.parent == self.output_dir:
                checkpoint.prune_checkpoints(self.output_dir, self.config.keep_last)
        distributed.barrier()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        state, tensors = checkpoint.load_checkpoint(path, model=self.student, optimizer=self.optimizer,
                                                    device=self.device)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history = state["step"], state["history"]
        self.skipped_steps = state["skipped_steps"]
        checkpoint.set_rng_state(state["python_rng"], tensors["rng"])
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size and self.is_main:
            # rollouts depend on (seed, step, chunk) only, so the run continues as it would have
            logger.warning("checkpoint %s was written by %d process(es), resuming with %d: the rollouts and "
                           "statistics are the same; parameters agree up to floating-point reduction order", path,
                           saved_world, self.world_size)

    # ------------------------------------------------------------------ helpers

    def _prompt_batch(self) -> list[Problem]:
        """Prompts for this step: consecutive slices of per-epoch permutations (stateless)."""
        n, per_step = len(self.train_problems), self.config.prompts_per_step
        out = []
        for k in range(self.step * per_step, (self.step + 1) * per_step):
            epoch, offset = divmod(k, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch))
            out.append(self.train_problems[int(perm[offset])])
        return out

    @property
    def _synced_generation(self) -> Optional[bool]:
        """vocab_parallel's lm_head makes every decode step a collective: all processes decode
        until the last one is done (None: `generate` decides, as it does for FSDP)."""
        return True if self.vocab_group is not None else None

    def _autocast(self):
        if self.device.type == "cuda" and self.config.dtype == "float32":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


def _without_tokens(part: FireAdvantages) -> FireAdvantages:
    """The same rows with no token in the loss."""
    return replace(part, loss_mask=torch.zeros_like(part.loss_mask), advantages=torch.zeros_like(part.advantages),
                   token_weights=torch.zeros_like(part.token_weights))


def _select_rows(fire: FireAdvantages, rows: torch.Tensor) -> FireAdvantages:
    """The rows of a batch-level FiRe result that one micro-batch trains on."""
    return FireAdvantages(fire.advantages[rows], fire.loss_mask[rows], fire.keep[rows], fire.token_weights[rows],
                          fire.threshold)


def _accumulate(total: dict, metrics: dict, count: int) -> dict:
    """Running mean of metric dicts over `count` micro-batches."""
    total = dict(total)
    for key, value in metrics.items():
        total[key] = total.get(key, 0.0) + value / count
    return total
