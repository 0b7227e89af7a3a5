"""The one training loop, shared by pretraining and every fine-tuning stage.

A stage hands ``train`` a model, its datasets, a ``loss_fn(model, batch) -> loss`` and a ``TrainConfig``;
the loop owns everything else: batching (seeded and resumable), AdamW with decay/no-decay groups,
warmup + cosine schedule, gradient accumulation and clipping, mixed precision, ``torch.compile``,
periodic evaluation, metrics CSV and loss plot, atomic checkpoints, exact ``--resume``, and a clean
save on Ctrl-C or SIGTERM. It knows nothing about any stage.
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
from torch.autograd.function import once_differentiable
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gptlab.data import EpochBatchSampler
from gptlab.config import TrainConfig
from gptlab.device import autocast, resolve_precision, select_device, to_device
from gptlab.errors import GptlabError
from gptlab.files import atomic_write_text
from gptlab.linear import CPULinear, linear_product
from gptlab.model import GPTModel
from gptlab.files import atomic_write
from gptlab.run import METRICS_FILE, PLOT_FILE, STATE_FILE, save_model
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


HEAD_LOSS_CHUNK = 256  # rows of logits at a time: 51 MB at GPT-2 vocabulary; 64-1024 ran alike


def lm_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    """Next-token cross-entropy; targets of -100 are ignored (padding, masked prompts).

    A plain ``GPTModel`` on the CPU in float32 takes ``HeadCrossEntropy``, which never holds the whole
    (B, T, V) logits; anything else (autocast, GPUs, ``torch.compile`` or DDP wrappers, other heads)
    goes through the logits and ``F.cross_entropy``.
    """
    inputs, targets = batch
    head = getattr(model, "lm_head", None)
    if (isinstance(model, GPTModel) and isinstance(head, CPULinear) and head.bias is None
            and head.weight.is_cpu and head.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        hidden = model.hidden_states(inputs).flatten(0, 1)  # (B*T, C)
        # grad mode is off inside an autograd.Function's forward: tell it whether gradients are wanted
        return HeadCrossEntropy.apply(hidden, head.weight, targets.flatten(), HEAD_LOSS_CHUNK,
                                      torch.is_grad_enabled())
    logits = model(inputs)  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


class HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against targets, ``chunk`` rows of logits at a time.

    At the GPT-2 124M shape, 4 x 256 tokens, the logits are 1024 x 50,257 float32 (206 MB), and the
    usual loss writes them, their log-probabilities, and a zeroed gradient of each. Here each chunk's
    log-probabilities (one kernel) become, in place, their own gradient (softmax minus one-hot) and are
    multiplied straight into the gradients of ``hidden`` and ``weight`` during the forward; backward
    only scales them. What it buys is memory (two 51 MB chunks instead of ~600 MB at that shape, more
    at longer contexts); the step's speed is level with the logits path on the CPU it was measured on.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                grad_enabled: bool) -> torch.Tensor:
        valid = targets != -100  # (M,)
        row_weight = valid.to(hidden.dtype) / valid.sum().clamp(min=1)  # (M,): d(mean loss) / d(row loss)
        want_hidden, want_weight = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        ctx.grad_hidden = torch.empty_like(hidden) if want_hidden else None  # (M, C)
        ctx.grad_weight = None  # (V, C), from the first chunk on; a frozen head gets none
        ctx.handed_out = False  # backward gives the gradients away once
        total = hidden.new_zeros(())
        for start in range(0, hidden.size(0), chunk):
            h, t, w = hidden[start : start + chunk], targets[start : start + chunk], row_weight[start : start + chunk]
            t = t.clamp(min=0)  # ignored rows pick token 0, then count for nothing (weight 0)
            logprobs = torch.log_softmax(linear_product(h, weight), dim=-1)  # (c, V)
            total -= (logprobs.gather(1, t[:, None]).squeeze(1) * w).sum()
            if want_hidden or want_weight:
                grad = logprobs.exp_()  # softmax, in place
                grad[torch.arange(len(t)), t] -= 1.0  # d(row loss) / d(logits): softmax - one-hot, (c, V)
                # each row's weight scales the small (c, C) factors, not the (c, V) gradient
                if want_hidden:
                    ctx.grad_hidden[start : start + chunk] = linear_product(grad, weight.t()) * w[:, None]  # (c, C)
                if want_weight:
                    grad_weight = linear_product(grad.t(), (h * w[:, None]).t())  # (V, C)
                    ctx.grad_weight = grad_weight if ctx.grad_weight is None else ctx.grad_weight.add_(grad_weight)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.handed_out:
            raise RuntimeError("lm_loss: backward ran twice through the same loss; its gradients were computed "
                               "in the forward and handed out the first time: compute the loss again instead")
        scale = grad_loss.item()  # 1 unless the loss was scaled (gradient accumulation)
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        # ctx lets go, so autograd owns the only reference and adds the tied embedding's gradient in place
        ctx.grad_hidden = ctx.grad_weight = None
        ctx.handed_out = True
        if scale != 1.0:
            grad_hidden = None if grad_hidden is None else grad_hidden.mul_(scale)
            grad_weight = None if grad_weight is None else grad_weight.mul_(scale)
        return grad_hidden, grad_weight, None, None, None


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``total_steps``."""
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


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, loader: DataLoader, loss_fn: LossFn, device: torch.device,
                  dtype: torch.dtype | None = None, max_batches: int | None = None) -> float:
    """Mean loss over (up to ``max_batches``) batches of ``loader``, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with autocast(device, dtype):
            total += loss_fn(model, to_device(batch, device)).item()
        count += 1
    model.train(was_training)
    return total / max(count, 1)


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so it can checkpoint and exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:  # a second Ctrl-C means now
                raise KeyboardInterrupt
            self.requested = True
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

    def append(self, row: dict) -> None:
        self.rows.append(row)
        columns = self.BASE + sorted({k for r in self.rows for k in r} - set(self.BASE))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())

    def plot(self, path: Path, title: str,
             columns: tuple[tuple[str, str], ...] = (("train_loss", "train"), ("val_loss", "validation")),
             x: str = "tokens_seen", ylabel: str = "loss") -> None:
        """Plot metric ``columns`` (``(column, legend label)`` pairs) against column ``x``; empty cells are skipped."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = [float(r[x]) for r in self.rows]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        for key, label in columns:
            points = [(t, float(r[key])) for t, r in zip(xs, self.rows) if r.get(key) not in (None, "")]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=label)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)


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
) -> TrainResult:
    """Train ``model`` in place and keep ``out_dir`` a loadable, resumable run directory.

    ``eval_fn(model)`` adds metrics (accuracy, say) to each evaluation row; ``sample_fn(model)`` returns
    text printed at each evaluation; ``meta`` goes into ``config.json`` for the using stages.
    """
    out_dir = Path(out_dir)
    device = select_device(config.device)
    amp_dtype = resolve_precision(config.precision, device)
    model.to(device).train()
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    sampler = EpochBatchSampler(len(train_data), config.batch_size, config.shuffle, config.seed)
    # Its own generator: a DataLoader iterator otherwise draws a seed from the global RNG, which would
    # shift every dropout mask after a resume (it starts a new iterator mid-epoch).
    loader = DataLoader(train_data, batch_sampler=sampler, collate_fn=collate_fn, generator=torch.Generator())
    val_loader = None
    if val_data is not None and len(val_data) > 0:
        val_loader = DataLoader(val_data, batch_size=config.batch_size, shuffle=False, collate_fn=collate_fn,
                                generator=torch.Generator())
    batches_per_epoch = len(sampler)
    total_steps = config.max_steps or max(1, int(config.epochs * batches_per_epoch) // config.grad_accum)

    optimizer = make_optimizer(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    forward_model = torch.compile(model) if config.compile else model

    state = {"step": 0, "micro_step": 0, "tokens_seen": 0, "loss_sum": 0.0, "loss_count": 0}
    if resume:
        state = _load_state(out_dir, model, optimizer, scaler, device)
        log.info("resuming %s at step %d of %d", out_dir, state["step"], total_steps)
    metrics = MetricsLog(out_dir / METRICS_FILE, state["step"] if resume else None)
    meta = {**(meta or {}), "train": {**asdict(config), "total_steps": total_steps}}
    last_val: float | None = None

    def train_row() -> dict:
        """The mean training loss since the last row, which it then resets."""
        row = {"step": state["step"], "epoch": f"{state['micro_step'] / batches_per_epoch:.3f}",
               "tokens_seen": state["tokens_seen"], "lr": f"{lr_at(max(state['step'] - 1, 0), total_steps, config):.3e}",
               "train_loss": f"{state['loss_sum'] / max(state['loss_count'], 1):.4f}"}
        state["loss_sum"], state["loss_count"] = 0.0, 0
        return row

    def evaluate_and_checkpoint() -> None:
        nonlocal last_val
        row = train_row()
        if val_loader is not None:
            last_val = evaluate_loss(forward_model, val_loader, loss_fn, device, amp_dtype, config.eval_batches)
            row.update(val_loss=f"{last_val:.4f}", val_ppl=f"{math.exp(min(last_val, 50)):.2f}")
        if eval_fn is not None:
            model.eval()
            row.update({k: f"{v:.4f}" for k, v in eval_fn(model).items()})
            model.train()
        metrics.append(row)
        extras = " ".join(f"{k} {v}" for k, v in row.items() if k not in ("epoch", "lr", "step", "tokens_seen"))
        tqdm.write(f"step {row['step']:>6} | tokens {row['tokens_seen']:>9} | {extras}")
        if sample_fn is not None:
            model.eval()
            tqdm.write(f"  sample: {sample_fn(model)!r}")
            model.train()
        _checkpoint(out_dir, model, tokenizer, optimizer, scaler, state, meta, metrics)

    start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=state["step"], desc="training", unit="step", disable=not progress,
               dynamic_ncols=True)
    interrupted = False
    with _StopRequest() as stop:
        while state["step"] < total_steps:
            epoch, offset = divmod(state["micro_step"], batches_per_epoch)
            sampler.set_position(epoch, offset)
            for batch in loader:
                micro_in_step = state["micro_step"] % config.grad_accum
                batch = to_device(batch, device)
                with autocast(device, amp_dtype):
                    loss = loss_fn(forward_model, batch)
                scaler.scale(loss / config.grad_accum).backward()
                state["micro_step"] += 1
                state["tokens_seen"] += batch[0].numel()
                state["loss_sum"] += loss.item()
                state["loss_count"] += 1
                if micro_in_step + 1 < config.grad_accum:
                    continue
                lr = lr_at(state["step"], total_steps, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if config.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
                done = state["step"] >= total_steps
                if done or state["step"] % config.eval_interval == 0:
                    evaluate_and_checkpoint()
                elif config.log_interval and state["step"] % config.log_interval == 0:
                    metrics.append(train_row())
                if stop.requested and not done:
                    if state["step"] % config.eval_interval:
                        _checkpoint(out_dir, model, tokenizer, optimizer, scaler, state, meta, metrics)
                    interrupted = True
                if done or interrupted:
                    break
            if interrupted:
                break
    bar.close()
    elapsed = time.perf_counter() - start
    last = metrics.rows[-1] if metrics.rows else {}
    log.info("%s after %d steps, %d tokens, %.1f s (%.0f tokens/s)", "stopped" if interrupted else "finished",
             state["step"], state["tokens_seen"], elapsed, state["tokens_seen"] / max(elapsed, 1e-9))
    return TrainResult(
        step=state["step"], tokens_seen=state["tokens_seen"],
        train_loss=float(last.get("train_loss") or "nan"), val_loss=last_val,
        interrupted=interrupted, history=list(metrics.rows),
    )


def _checkpoint(out_dir, model, tokenizer, optimizer, scaler, state, meta, metrics: MetricsLog) -> None:
    """Everything ``--resume`` needs in one atomically written file, then the weights for the using stages."""
    payload = {
        "state": dict(state),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    atomic_write(out_dir / STATE_FILE, lambda tmp: torch.save(payload, tmp))
    save_model(out_dir, model, tokenizer, meta)
    if metrics.rows:
        metrics.plot(out_dir / PLOT_FILE, title=out_dir.name)


def _load_state(out_dir: Path, model, optimizer, scaler, device) -> dict:
    path = out_dir / STATE_FILE
    if not path.is_file():
        raise GptlabError(f"{out_dir}: nothing to resume (no {STATE_FILE}); start without --resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not a pickle traceback
        raise GptlabError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise GptlabError(f"{path}: the checkpoint belongs to another model config ({str(e).splitlines()[0]})") from None
    model.to(device)
    optimizer.load_state_dict(payload["optimizer"])
    scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["rng"]["torch"])
    random.setstate(_as_tuple(payload["rng"]["python"]))
    if payload["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    return dict(payload["state"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
