"""Where gptlab's time goes: ``torch.profiler`` over training steps and cached decoding steps.

    python benchmarks/profile_speed.py                       # GPT-2 124M shape, CPU, float32
    python benchmarks/profile_speed.py --what train --steps 3 --batch 4 --seq 256
    python benchmarks/profile_speed.py --what decode --trace decode.json   # open in chrome://tracing

Prints the operators that took the most time (self time, summed over calls), and groups them into
matrix multiplies, attention, loss, optimizer and the rest, which is what BENCHMARKS.md discusses.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from gptlab.generate import generate
from gptlab.model import GPTConfig, GPTModel
from gptlab.train import TrainConfig, lm_loss, make_optimizer

# Operator-name fragments -> the group they are reported under (first match wins).
GROUPS = [
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("loss (log-softmax, nll)", ("log_softmax", "nll_loss", "cross_entropy")),
    ("optimizer", ("adam", "_foreach")),
    ("matmul", ("addmm", "mm", "bmm", "matmul", "linear")),
    ("gelu", ("gelu",)),
    ("layernorm", ("layer_norm",)),
    ("embedding", ("embedding",)),
    ("copies", ("copy_", "clone", "contiguous", "cat", "fill_", "zero_", "to_copy")),
]


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, fragments in GROUPS:
        if any(f in lowered for f in fragments):
            return group
    return "other elementwise / overhead"


def summarise(prof, title: str, top: int) -> None:
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n## {title}: {total / 1e6:.2f} s of operator self time\n")
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[group_of(e.key)] += e.self_cpu_time_total
    print("| group | share |\n|---|---:|")
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {t / total:.1%} |")
    print(f"\n| top operators (self CPU) | calls | share |\n|---|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / total:.1%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", choices=["train", "decode", "both"], default="both")
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--steps", type=int, default=2, help="profiled training steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=32, help="profiled new tokens for decoding, batch 1")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--trace", help="also write a Chrome trace of the last profile here")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset(args.preset))
    V = model.config.vocab_size
    if args.what in ("train", "both"):
        optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
        tokens = torch.randint(0, V, (args.batch, args.seq + 1))

        def step() -> None:
            loss = lm_loss(model, (tokens[:, :-1], tokens[:, 1:]))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        summarise(prof, f"training, {args.steps} steps of {args.batch} x {args.seq} tokens", args.top)
    if args.what in ("decode", "both"):
        ids = torch.randint(0, V, (1, 16))
        generate(model, ids, 4)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(model, ids, args.tokens)
        summarise(prof, f"cached decoding, batch 1, {args.tokens} new tokens", args.top)
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"\ntrace written to {args.trace}")


if __name__ == "__main__":
    main()
