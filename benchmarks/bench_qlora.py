"""LoRA over a float32, int8 and int4 base (QLoRA), in one run on one machine (README: Fine-tune with LoRA).

A base of the ``mini`` preset (GPT-2 tokenizer) is pretrained briefly on tinyshakespeare; each base kind then gets
the same LoRA adapters (rank 8, alpha 16, the block projections, the same seed) and fine-tunes on the-verdict.txt,
the same batches in the same order, steps interleaved (float32, int8, int4, float32 with another adapter seed: the
noise between two float runs, against which the quantized bases' losses are read). Per base kind:

- trainable parameters; the bytes of the base's weights (integers, scales, the float norms and embeddings) and of
  the adapters + AdamW's two moments (what training adds);
- step: median seconds of one optimizer step (forward, loss, backward, clipping, AdamW, as ``gptlab.train``);
- loss: the mean training loss of the last 5 steps, and the held-out loss (the text's last 10%) at the end, each
  computed through the base's own layers.

    python benchmarks/bench_qlora.py                  # ~2 minutes on 2 busy cores
    python benchmarks/bench_qlora.py --steps 20 --base-steps 50
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_lora import cpu_name  # the sibling scripts (this folder is on sys.path when run)
from bench_quantize import quantized, train, weight_bytes
from bench_speed import positive_int
from gptlab.config import LoRAConfig, TrainConfig
from gptlab.surgery import add_lora
from gptlab.train import make_optimizer
from gptlab.weights import load

REPO = Path(__file__).resolve().parent.parent
VERDICT = REPO / "data" / "the-verdict.txt"
RUNS = [("float32", "float32", 0), ("int8", "int8", 0), ("int4", "int4", 0), ("float32, adapter seed 1", "float32", 1)]


def adapted(base, kind: str, seed: int):
    torch.manual_seed(seed)
    model = add_lora(quantized(base, kind), LoRAConfig(rank=8, alpha=16.0),
                     {"source": "bench", "fingerprint": "sha256:none"})
    return model.train(), make_optimizer(model, TrainConfig(lr=2e-3), torch.device("cpu"))


def step(model, optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    start = time.perf_counter()
    loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=positive_int, default=40, help="LoRA fine-tuning steps per base kind")
    ap.add_argument("--base-steps", type=positive_int, default=150, help="pretraining steps of the base")
    ap.add_argument("--batch", type=positive_int, default=4)
    ap.add_argument("--context", type=positive_int, default=128)
    ap.add_argument("--threads", type=positive_int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        base, tokenizer = load(train("mini", args.base_steps, Path(tmp) / "base", args.context, 8))
    ids = torch.tensor(tokenizer.encode(VERDICT.read_text(encoding="utf-8")))
    split = int(len(ids) * 0.9)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, split - args.context - 1, (args.steps, args.batch), generator=g)
    windows = [torch.stack([ids[s:s + args.context + 1] for s in row.tolist()]) for row in starts]  # (B, T + 1)
    held = ids[split:split + (len(ids) - split - 1) // args.context * args.context + 1]
    held_x = held[:-1].view(-1, args.context)
    held_y = held[1:].view(-1, args.context)

    runs = {name: adapted(base, kind, seed) for name, kind, seed in RUNS}
    times = {name: [] for name in runs}
    losses = {name: [] for name in runs}
    for i, w in enumerate(windows):
        names = list(runs)[i % len(runs):] + list(runs)[:i % len(runs)]  # a rotating order: load hits all alike
        for name in names:
            seconds, loss = step(*runs[name], w[:, :-1], w[:, 1:])
            losses[name].append(loss)
            if i:  # the first step of each is its warm-up
                times[name].append(seconds)

    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {args.threads} thread(s); mini base "
          f"({base.num_parameters() / 1e6:.1f}M parameters, {args.base_steps} steps on tinyshakespeare), LoRA rank 8 "
          f"on the block projections, {args.steps} steps of {args.batch} x {args.context} tokens of the-verdict.txt")
    print()
    print("| base | trainable params | base weights MB | adapters + AdamW state MB | step (s) | step vs float32 "
          "| train loss (last 5) | held-out loss |")
    print("|---|---|---|---|---|---|---|---|")
    reference = statistics.median(times["float32"])
    for name, (model, optimizer) in runs.items():
        trainable = [p for p in model.parameters() if p.requires_grad]
        adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
        state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items()
                          if k in ("exp_avg", "exp_avg_sq"))
        stored, _ = weight_bytes(model)
        model.eval()
        with torch.no_grad():
            held_loss = model(held_x, held_y).item()
        print(f"| {name} | {sum(p.numel() for p in trainable) / 1e6:.3f}M | {(stored - adapter_bytes) / 1e6:.1f} "
              f"| {(adapter_bytes + state_bytes) / 1e6:.2f} | {statistics.median(times[name]):.3f} "
              f"| {statistics.median(times[name]) / reference:.2f} | {statistics.mean(losses[name][-5:]):.4f} "
              f"| {held_loss:.4f} |")
    print()
    print(f"loss at the first step: {', '.join(f'{n} {v[0]:.4f}' for n, v in losses.items())}")


if __name__ == "__main__":
    main()
