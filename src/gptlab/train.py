"""The one training loop, shared by pretraining and every fine-tuning stage.

A stage hands ``train`` a model, its datasets, a ``loss_fn(model, batch) -> loss`` and a ``TrainConfig``;
the loop owns everything else: batching (seeded and resumable), AdamW with decay/no-decay groups,
warmup + cosine schedule, gradient accumulation and clipping, mixed precision, ``torch.compile``,
periodic evaluation, metrics CSV and loss plot, checkpoints written as one set (``gptlab.run``), exact
``--resume``, a stop with a clear message when the loss or the weights stop being finite, and a clean save
on Ctrl-C or SIGTERM. It knows nothing about any stage.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gptlab import distributed
from gptlab.config import TrainConfig
from gptlab.data import EpochBatchSampler
from gptlab.device import autocast, resolve_precision, select_device, to_device
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text
from gptlab.model import GPTModel
from gptlab.plotting import plot_lines
from gptlab.run import (
    METRICS_FILE, PLOT_FILE, SHARDED_STATE_DIR, STATE_FILE, clear_run, load_model_weights, load_torch_file, model_files,
    model_state_dict, recover_run_dir, write_run_files,
)
from gptlab.tokenizer import Tokenizer

log = logging.getLogger("gptlab")

LossFn = Callable[[torch.nn.Module, tuple], torch.Tensor]


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    train_loss: float
    val_loss: float | None
    interrupted: bool
    history: list[dict] = field(default_factory=list)
    stop_signal: int | None = None  # the signal that stopped an interrupted run (SIGINT, SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM during training: stop at once, without a checkpoint."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def lm_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    """Next-token cross-entropy; targets of -100 are ignored (padding, masked prompts).

    The model computes it (``GPTModel.forward(inputs, targets)``, fused with its head where it can be:
    ``gptlab.loss``), so a DDP or ``torch.compile`` wrapper passes it through.
    """
    inputs, targets = batch
    return model(inputs, targets=targets)


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``total_steps``; steps past it
    (a resumed run given more steps) stay at ``lr * min_lr_ratio``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: matrices decay, biases and norms (1-D tensors) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise GptlabError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates all tensors at once; on CPU it was several times faster than the default.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fused)


def evaluate_loss(model: torch.nn.Module, loader: DataLoader, loss_fn: LossFn, device: torch.device,
                  dtype: torch.dtype | None = None, max_batches: int | None = None) -> float:
    """Mean loss over (up to ``max_batches``) batches of ``loader``, in eval mode."""
    total, count = score_share(model, loader, loss_fn, device, dtype, max_batches)
    return total / max(count, 1)


@torch.no_grad()
def score_share(model: torch.nn.Module, loader: DataLoader, loss_fn: LossFn, device: torch.device,
                dtype: torch.dtype | None = None, max_batches: int | None = None, rank: int = 0,
                world: int = 1) -> tuple[float, int]:
    """``(sum of batch losses, batches)`` over this rank's share (batches ``rank``, ``rank + world``, ...) of
    the first ``max_batches`` batches of ``loader``, in eval mode; summed over the ranks, one process's.

    Every rank runs the same number of forwards (an FSDP forward gathers weights from all of them): a rank
    with one batch fewer scores its last again (or, with none of its own, the first) and leaves it out.
    """
    was_training = model.training
    model.eval()
    total, count, last = 0.0, 0, None
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        if i % world != rank:
            last = batch if last is None else last  # a spare for a rank with fewer batches than ranks
            continue
        with autocast(device, dtype):
            total += loss_fn(model, to_device(batch, device)).item()
        count, last = count + 1, batch
    if world > 1:
        n = len(loader) if max_batches is None else min(len(loader), max_batches)
        for _ in range(-(-n // world) - count):
            with autocast(device, dtype):
                loss_fn(model, to_device(last, device))
    model.train(was_training)
    return total, count


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so it can checkpoint and exit."""

    def __init__(self, repeat_aborts: bool = True) -> None:
        # Under torchrun a Ctrl-C reaches each rank twice (from the terminal and from the launcher), and the
        # launcher kills what has not stopped after its own timeout: a repeat is not an abort there.
        self.repeat_aborts = repeat_aborts
        self.requested = False
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:  # a second Ctrl-C means now
                if self.repeat_aborts:
                    raise Interrupted(signum)
                return
            self.requested, self.signum = True, signum
            if distributed.is_main():
                tqdm.write(f"\n{signal.Signals(signum).name} received: saving a checkpoint, then stopping "
                           "(again to abort without saving)")

        with contextlib.suppress(ValueError):  # signals can only be set from the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class MetricsLog:
    """``metrics.csv`` rows; on resume, rows after the checkpoint are dropped so nothing is counted twice."""

    BASE = ["step", "epoch", "tokens_seen", "lr", "train_loss", "val_loss", "val_ppl"]

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path, self.rows = path, []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]

    def append(self, row: dict, write: bool = True) -> None:
        """Add a row; ``write=False`` when a checkpoint is about to write the file with the rest of its set."""
        self.rows.append(row)
        if write:
            atomic_write_text(self.path, self.text())

    def text(self) -> str:
        columns = self.BASE + sorted({k for r in self.rows for k in r} - set(self.BASE))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        return buf.getvalue()

    def plot(self, path: Path, title: str,
             columns: tuple[tuple[str, str], ...] = (("train_loss", "train"), ("val_loss", "validation")),
             x: str = "tokens_seen", ylabel: str = "loss") -> None:
        """Plot metric ``columns`` (``(column, legend label)`` pairs) against column ``x``; empty cells are skipped."""
        series = [(label, [(float(r[x]), float(r[key])) for r in self.rows if r.get(key) not in (None, "")])
                  for key, label in columns]
        plot_lines(path, series, title, xlabel=x.replace("_", " "), ylabel=ylabel)


class _Run:
    """One call of ``train``: the model, its optimizer and loaders, and the counters a checkpoint stores."""

    def __init__(self, model, tokenizer, train_data, val_data, out_dir: Path, config: TrainConfig, loss_fn,
                 collate_fn, eval_fn, sample_fn, meta: dict | None, resume: bool,
                 extra_files: dict[str, str] | None = None) -> None:
        self.model, self.tokenizer, self.out_dir, self.config = model, tokenizer, out_dir, config
        self.extra_files = dict(extra_files or {})
        self.loss_fn, self.eval_fn, self.sample_fn = loss_fn, eval_fn, sample_fn
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.main = self.rank == 0  # the one rank that writes files, logs and draws the progress bar
        self.fsdp = config.fsdp and self.world > 1
        self.device = distributed.rank_device(select_device(config.device))
        self.amp_dtype = resolve_precision(config.precision, self.device, sum(p.numel() for p in model.parameters()))
        model.to(self.device).train()
        torch.manual_seed(config.seed + self.rank)  # each rank its own dropout masks; rank 0 those of one process
        random.seed(config.seed + self.rank)

        self.sampler = EpochBatchSampler(len(train_data), config.batch_size, config.shuffle, config.seed,
                                         self.rank, self.world)
        # Their own generators: a DataLoader iterator otherwise draws a seed from the global RNG, which would
        # shift every dropout mask after a resume (it starts a new iterator mid-epoch).
        self.loader = DataLoader(train_data, batch_sampler=self.sampler, collate_fn=collate_fn,
                                 generator=torch.Generator())
        self.val_loader = None
        if val_data is not None and len(val_data) > 0:
            self.val_loader = DataLoader(val_data, batch_size=config.batch_size, shuffle=False, collate_fn=collate_fn,
                                         generator=torch.Generator())
        # the book's "train loss": the training set scored in eval mode (no dropout), its first batches in order
        self.train_eval_loader = None
        if config.eval_train_batches:
            self.train_eval_loader = DataLoader(train_data, batch_size=config.batch_size, shuffle=False,
                                                collate_fn=collate_fn, generator=torch.Generator())
        self.batches_per_epoch = len(self.sampler)
        steps_per_epoch = max(1, self.batches_per_epoch // config.grad_accum)
        self.total_steps = config.max_steps or max(1, int(config.epochs * self.batches_per_epoch) // config.grad_accum)
        self.eval_interval = config.eval_interval or steps_per_epoch  # None: once per epoch

        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if trainable < model.num_parameters():
            log.info("training %s of the model's %s parameters", f"{trainable:,}", f"{model.num_parameters():,}")
        if self.world > 1:
            log.info("%d ranks (%s): global batch %d = batch size %d x grad accum %d x %d ranks",
                     self.world, "FSDP" if self.fsdp else "DDP", config.batch_size * config.grad_accum * self.world,
                     config.batch_size, config.grad_accum, self.world)
        if self.fsdp:  # shard before the optimizer is made: it then holds each rank's shards only
            distributed.shard_model(model)
        self.optimizer = make_optimizer(model, config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        # eval_model scores (a DDP forward in eval mode would still broadcast buffers); forward_model trains
        self.eval_model = torch.compile(model) if config.compile else model
        self.forward_model = self.eval_model
        if self.world > 1 and not self.fsdp:
            self.forward_model = distributed.data_parallel(self.eval_model, self.device)

        # The schedule's length is fixed when the run starts: a resume given more steps trains on past it at
        # the final learning rate, so the steps already taken stay exactly what they were.
        self.schedule_steps = self.total_steps
        self.state = {"step": 0, "micro_step": 0, "tokens_seen": 0, "loss_sum": 0.0, "loss_count": 0}
        if resume:
            self.state = _load_state(out_dir, model, self.optimizer, self.scaler, self.device, self.fsdp)
            trained_on = self.state.get("world_size", 1)
            if trained_on != self.world:
                raise GptlabError(f"{out_dir}: the run was trained on {trained_on} rank(s), this is {self.world}: the "
                                  f"global batch and the data position depend on it; resume with torchrun "
                                  f"--nproc-per-node {trained_on} in all (or without torchrun if 1)")
            planned = self.state.get("total_steps", self.total_steps)
            if self.total_steps < planned:
                raise GptlabError(f"{out_dir}: the run was started for {planned} steps; --max-steps/--epochs may "
                                  f"add steps on resume, not remove them (this would end at {self.total_steps})")
            self.schedule_steps = self.state.get("schedule_steps", self.total_steps)
            extra = (f"; steps after {self.schedule_steps} run at the schedule's final lr"
                     if self.total_steps > self.schedule_steps else "")
            log.info("resuming %s at step %d of %d%s", out_dir, self.state["step"], self.total_steps, extra)
        self.state.update(total_steps=self.total_steps, schedule_steps=self.schedule_steps)
        if self.world > 1:
            self.state["world_size"] = self.world
        # the running loss stays on the device: reading it is a host sync, done only when a row is logged
        self.loss_sum = torch.tensor(float(self.state["loss_sum"]), device=self.device)
        self.metrics = MetricsLog(out_dir / METRICS_FILE, self.state["step"] if resume else None)
        self.meta = {**(meta or {}), "train": {**asdict(config), "total_steps": self.total_steps,
                                               "schedule_steps": self.schedule_steps}}
        self.last_val: float | None = None
        self.last_checkpoint: int | None = self.state["step"] if resume else None

    # ---- one step -------------------------------------------------------------------------------

    def micro_step(self, batch) -> None:
        batch = to_device(batch, self.device)
        # several ranks average their gradients on the last micro-step of an accumulation only
        last = (self.state["micro_step"] + 1) % self.config.grad_accum == 0
        with self._gradient_sync(last):
            with autocast(self.device, self.amp_dtype):
                loss = self.loss_fn(self.forward_model, batch)
            self.scaler.scale(loss / self.config.grad_accum).backward()
        self.loss_sum += loss.detach()
        self.state["micro_step"] += 1
        self.state["tokens_seen"] += batch[0].numel() * self.world  # the ranks' batches: as large (padded: about)
        self.state["loss_count"] += 1

    def _gradient_sync(self, sync: bool):
        if self.world == 1 or sync:
            return contextlib.nullcontext()
        if self.fsdp:
            return distributed.fsdp_no_sync(self.model)
        return self.forward_model.no_sync()

    def optimizer_step(self) -> float:
        lr = lr_at(self.state["step"], self.schedule_steps, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        return lr

    # ---- logging, evaluation, checkpoints ---------------------------------------------------------

    def train_row(self) -> dict:
        """The mean training loss since the last row, which it then resets; a non-finite one stops the run."""
        state = self.state
        total = distributed.mean(self.loss_sum) if self.world > 1 else self.loss_sum.item()  # the ranks' mean
        mean = total / max(state["loss_count"], 1)
        if not math.isfinite(mean):
            self._diverged(f"the mean training loss up to step {state['step']} is {mean}")
        row = {"step": state["step"], "epoch": f"{state['micro_step'] / self.batches_per_epoch:.3f}",
               "tokens_seen": state["tokens_seen"],
               "lr": f"{lr_at(max(state['step'] - 1, 0), self.schedule_steps, self.config):.3e}",
               "train_loss": f"{mean:.4f}"}
        self.loss_sum.zero_()
        state["loss_count"] = 0
        return row

    def _kept(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        return f"the last intact checkpoint is step {self.last_checkpoint} in {self.out_dir}"

    def _diverged(self, what: str) -> None:
        raise GptlabError(f"training diverged: {what}; {self._kept()}. Lower --lr, or check --grad-clip and "
                          "--precision")

    def log_row(self, row: dict, bar, write: bool = True) -> None:
        try:
            self.metrics.append(row, write and self.main)
        except GptlabError as e:  # a full disk: say what survives
            raise GptlabError(f"{e}; {self._kept()}") from None
        if self.main:
            bar.set_postfix(loss=row["train_loss"], lr=row["lr"])

    def evaluate_and_checkpoint(self, bar) -> None:
        row = self.train_row()
        if self.val_loader is not None:
            self.last_val = self._evaluate(self.val_loader, self.config.eval_batches)
            if not math.isfinite(self.last_val):
                self._diverged(f"the validation loss at step {self.state['step']} is {self.last_val}")
            row.update(val_loss=f"{self.last_val:.4f}", val_ppl=f"{math.exp(min(self.last_val, 50)):.2f}")
        if self.train_eval_loader is not None:
            train_eval = self._evaluate(self.train_eval_loader, self.config.eval_train_batches)
            row.update(train_eval_loss=f"{train_eval:.4f}")
        if self.eval_fn is not None:
            row.update({k: f"{v:.4f}" for k, v in self._in_eval_mode(self.eval_fn).items()})
        self.log_row(row, bar, write=False)  # the checkpoint below writes metrics.csv with its set
        extras = " ".join(f"{k} {v}" for k, v in row.items() if k not in ("epoch", "lr", "step", "tokens_seen"))
        if self.main:
            tqdm.write(f"step {row['step']:>6} | tokens {row['tokens_seen']:>9} | {extras}")
        if self.sample_fn is not None:  # on every rank: a sharded model generates only with all of them
            sample = self._in_eval_mode(self.sample_fn)
            if self.main:
                tqdm.write(f"  sample: {sample!r}")
        self.checkpoint()

    def _evaluate(self, loader: DataLoader, max_batches: int | None) -> float:
        """The mean loss over ``loader``'s first batches, each rank scoring its share of them; ``max_batches``
        counts global batches (``batch_size x world``), as one process with that batch size would."""
        if max_batches is not None:
            max_batches *= self.world
        total, count = score_share(self.eval_model, loader, self.loss_fn, self.device, self.amp_dtype, max_batches,
                                   self.rank, self.world)
        if self.world > 1:
            total, count = distributed.total(total), distributed.total(count)
        return total / max(count, 1)

    def _in_eval_mode(self, fn):
        self.model.eval()
        try:
            return fn(self.model)
        finally:
            self.model.train()

    def checkpoint(self) -> None:
        """One set of files, all of this step (``gptlab.run.write_run_files``): the resumable state, the
        weights and config for the using stages, metrics.csv and loss.png, and the stage's extra files."""
        step = self.state["step"]
        finite = all(torch.isfinite(p).all() for p in self.model.parameters())  # never save weights that are lost
        if distributed.any_rank(not finite) if self.world > 1 else not finite:  # (FSDP: each rank has its shards)
            self._diverged(f"the weights after step {step} are not finite")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        payload = {"state": {**self.state, "loss_sum": self.loss_sum.item()}, "scaler": self.scaler.state_dict(),
                   "rng": rng}
        full_state, sharded = None, None
        if self.world > 1:
            payload["rng_ranks"] = distributed.gather(rng)  # each rank's dropout stream, for an exact resume
        if self.fsdp:  # every rank takes part: the full weights gather on rank 0, the shards go to disk
            full_state = distributed.full_state_dict(self.model)
            sharded = distributed.save_sharded(self.out_dir, step, self.model, self.optimizer)
        elif self.main:  # DDP: the ranks' replicas are equal
            payload.update(model={k: v.cpu() for k, v in model_state_dict(self.model).items()},  # LoRA: what trains
                           optimizer=self.optimizer.state_dict())
        if not self.main:
            self.last_checkpoint = step
            return
        files = model_files(self.model, self.tokenizer, self.meta, step, state=full_state)
        files[STATE_FILE] = lambda path: torch.save(payload, path)
        if sharded is not None:  # written by all ranks beside the run: moved into this set
            files[SHARDED_STATE_DIR] = lambda path: sharded.replace(path)
        texts = dict(self.extra_files)
        if self.metrics.rows:
            texts[METRICS_FILE] = self.metrics.text()
            files[PLOT_FILE] = lambda path: self.metrics.plot(path, title=self.out_dir.name)
        for name, text in texts.items():
            files[name] = lambda path, text=text: path.write_text(text, encoding="utf-8")
        try:
            write_run_files(self.out_dir, files)
        except GptlabError as e:
            raise GptlabError(f"{e}; {self._kept()}") from None
        self.last_checkpoint = step

    # ---- the loop -------------------------------------------------------------------------------

    def _stopping(self, stop: _StopRequest) -> bool:
        """Did a Ctrl-C or SIGTERM reach this process, or under several ranks any of them? (Then every rank
        stops after the same step; that costs one small all-reduce per step.)"""
        if self.world == 1:
            return stop.requested
        if distributed.any_rank(stop.requested):
            stop.signum = stop.signum or signal.SIGTERM  # another rank's
            return True
        return False

    def run(self, progress: bool) -> bool:
        """Train to ``total_steps``; returns True when a stop was requested (the run is then checkpointed)."""
        state, config = self.state, self.config
        bar = tqdm(total=self.total_steps, initial=state["step"], desc="training", unit="step",
                   disable=not (progress and self.main), dynamic_ncols=True)
        with bar, _StopRequest(repeat_aborts=self.world == 1) as stop:
            self.stop = stop
            while state["step"] < self.total_steps:
                epoch, offset = divmod(state["micro_step"], self.batches_per_epoch)
                self.sampler.set_position(epoch, offset)
                for batch in self.loader:
                    self.micro_step(batch)
                    if state["micro_step"] % config.grad_accum:
                        continue
                    self.optimizer_step()
                    bar.update(1)
                    done = state["step"] >= self.total_steps
                    if done or state["step"] % self.eval_interval == 0:
                        self.evaluate_and_checkpoint(bar)
                    elif config.log_interval and state["step"] % config.log_interval == 0:
                        self.log_row(self.train_row(), bar)
                    if done:
                        return False
                    if self._stopping(stop):
                        if state["step"] % self.eval_interval:
                            self.checkpoint()
                        return True
        return False


def train(
    model: GPTModel,
    tokenizer: Tokenizer,
    train_data: Dataset,
    val_data: Dataset | None,
    out_dir: str | Path,
    config: TrainConfig,
    loss_fn: LossFn = lm_loss,
    collate_fn: Callable | None = None,
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    sample_fn: Callable[[torch.nn.Module], str] | None = None,
    meta: dict | None = None,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> TrainResult:
    """Train ``model`` in place and keep ``out_dir`` a loadable, resumable run directory.

    ``eval_fn(model)`` adds metrics (accuracy, say) to each evaluation row; ``sample_fn(model)`` returns
    text printed at each evaluation; ``meta`` goes into ``config.json`` for the using stages;
    ``extra_files`` (name -> text) are written with every checkpoint, in its set. ``overwrite``: the run
    already in ``out_dir`` is removed once this one has started (its setup has succeeded).
    """
    out_dir = Path(out_dir)
    if distributed.is_main():
        recover_run_dir(out_dir)  # finish a checkpoint that a killed run committed, remove what it left half-written
    distributed.barrier()  # the other ranks read the state only once it is whole
    run = _Run(model, tokenizer, train_data, val_data, out_dir, config, loss_fn, collate_fn, eval_fn,
               sample_fn, meta, resume, extra_files)
    if overwrite and not resume and run.main:
        clear_run(out_dir)
    tokens_before, start = run.state["tokens_seen"], time.perf_counter()
    interrupted = run.run(progress)
    distributed.barrier()  # every rank returns once rank 0 has written the last checkpoint: a stage reads it
    elapsed = time.perf_counter() - start
    tokens = run.state["tokens_seen"] - tokens_before  # this invocation's, also after a resume
    log.info("%s after %d steps, %d tokens in this run, %.1f s (%.0f tokens/s)",
             "stopped" if interrupted else "finished", run.state["step"], tokens, elapsed, tokens / max(elapsed, 1e-9))
    last = run.metrics.rows[-1] if run.metrics.rows else {}
    return TrainResult(
        step=run.state["step"], tokens_seen=run.state["tokens_seen"],
        train_loss=float(last.get("train_loss") or "nan"), val_loss=run.last_val,
        interrupted=interrupted, history=list(run.metrics.rows), stop_signal=run.stop.signum if interrupted else None,
    )


def _load_state(out_dir: Path, model, optimizer, scaler, device, sharded: bool = False) -> dict:
    path = out_dir / STATE_FILE
    if not path.is_file():
        raise GptlabError(f"{out_dir}: nothing to resume (no {STATE_FILE}); start without --resume")
    fix = "it is damaged: start the run over with --overwrite"
    payload = load_torch_file(path, fix)
    weights = {"scaler", "rng"} if sharded else {"model", "optimizer", "scaler", "rng"}
    if not isinstance(payload, dict) or not {"state", *weights} <= payload.keys():
        what = "an --fsdp run's" if sharded else "a gptlab"
        raise GptlabError(f"{path}: not {what} training state; {fix} (or resume with --fsdp as it was started)")
    if sharded:
        distributed.load_sharded(out_dir / SHARDED_STATE_DIR, model, optimizer, fix)
    else:
        _load_full_weights(path, payload, model, device, fix)
    rng = payload["rng"]
    if len(payload.get("rng_ranks", [])) == distributed.world_size():
        rng = payload["rng_ranks"][distributed.rank()]
    try:
        if not sharded:
            optimizer.load_state_dict(payload["optimizer"])
        scaler.load_state_dict(payload["scaler"])
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_tuple(rng["python"]))
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return dict(payload["state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise GptlabError(f"{path}: the training state does not fit this run ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''}); {fix}") from None


def _load_full_weights(path: Path, payload: dict, model, device, fix: str) -> None:
    state = payload["model"]
    if not isinstance(state, dict):
        raise GptlabError(f"{path}: not a gptlab training state; {fix}")
    if model.lm_head.weight is model.wte.weight:  # states written before LoRA held a tied head twice
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    load_model_weights(model, state, path)
    model.to(device)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
