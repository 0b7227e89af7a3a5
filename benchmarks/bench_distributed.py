"""Per-step time of torchrun DDP on the CPU (gloo) against one process, at the same global batch.

    python benchmarks/bench_distributed.py [--preset mini] [--batch 8] [--steps 12] [--rounds 3]
                                           [--compare-src /path/to/other/src]

Each configuration trains ``gptlab.train.train`` on random tokens for ``--steps`` optimizer steps (global batch
``--batch`` x context length) in fresh processes; a step's time is the gap between the starts of consecutive
micro-steps (forward, backward, the gradient all-reduce, AdamW), the first 3 left out, median over the rest.
The configurations run interleaved (A, B, C, A, B, C, ...), and the table gives each one's median over rounds:

- 2 ranks x 1 thread, batch/2 each (torchrun --nproc-per-node 2, gloo)
- 1 process, 1 thread, the whole batch; and 1 process, 2 threads
- with --compare-src: 1 process, 1 thread, the same job with another tree's gptlab (PYTHONPATH), to check that
  the single-process path is as fast as before (--ab-only: just these two rows).

It also times one gloo all-reduce of as many floats as the model has trainable parameters: DDP's communication
per step, without the overlap with the backward pass that DDP gets.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def worker(spec: dict) -> None:
    import numpy as np
    import torch

    from gptlab.data import TokenWindowDataset
    from gptlab.device import keep_freed_memory_mapped
    from gptlab.model import GPTConfig, GPTModel
    from gptlab.tokenizer import get_tokenizer
    from gptlab.train import TrainConfig, lm_loss, train

    try:
        from gptlab import distributed
    except ImportError:  # --compare-src: a tree from before torchrun support, one process
        distributed = None
    keep_freed_memory_mapped()  # as the gptlab command does
    if distributed is not None:
        distributed.setup("cpu")
    world = distributed.world_size() if distributed is not None else 1
    torch.manual_seed(0)
    config = GPTConfig.preset(spec["preset"])
    model = GPTModel(config)
    T = config.context_length
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, T * spec["batch"] * (spec["steps"] + 2) + 1)
    starts: list[float] = []

    def timed_loss(m, batch):
        starts.append(time.perf_counter())
        return lm_loss(m, batch)

    train_config = TrainConfig(max_steps=spec["steps"], batch_size=spec["batch"] // world, eval_interval=10**6,
                               device="cpu", seed=1)
    train(model, get_tokenizer("gpt2"), TokenWindowDataset(tokens, T, T), None, spec["out"], train_config,
          loss_fn=timed_loss, progress=False)
    gaps = [b - a for a, b in zip(starts[3:], starts[4:])]
    result = {"step_s": statistics.median(gaps)}
    if world > 1:  # the communication alone: one all-reduce of as many floats as the gradients
        grads = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad))
        times = []
        for _ in range(6):
            start = time.perf_counter()
            torch.distributed.all_reduce(grads)
            times.append(time.perf_counter() - start)
        result["allreduce_s"] = statistics.median(times[1:])
    if distributed is None or distributed.is_main():
        Path(spec["result"]).write_text(json.dumps(result))
    if distributed is not None:
        distributed.teardown()


def run_config(name: str, spec: dict, tmp: Path, ranks: int, threads: int, src: Path) -> dict:
    spec = {**spec, "out": str(tmp / "run"), "result": str(tmp / "result.json")}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(src)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    cmd = [*(launcher if ranks > 1 else [sys.executable]), __file__, "--worker", json.dumps(spec)]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=1800)
    result = json.loads(Path(spec["result"]).read_text())
    subprocess.run(["rm", "-rf", spec["out"]], check=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mini")
    p.add_argument("--batch", type=int, default=8, help="global batch (examples per optimizer step)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compare-src", type=Path, help="another tree's src/ for a single-process A/B")
    p.add_argument("--ab-only", action="store_true", help="with --compare-src: only the two single-process rows")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    spec = {"preset": args.preset, "batch": args.batch, "steps": args.steps}
    configs = {"2 ranks x 1 thread (DDP, gloo)": (2, 1, SRC), "1 process, 1 thread": (1, 1, SRC),
               "1 process, 2 threads": (1, 2, SRC)}
    if args.ab_only:
        configs = {"1 process, 1 thread": (1, 1, SRC)}
    if args.compare_src:
        configs[f"1 process, 1 thread, {args.compare_src}"] = (1, 1, args.compare_src)
    times: dict[str, list[float]] = {name: [] for name in configs}
    allreduce: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (ranks, threads, src) in configs.items():
                result = run_config(name, spec, Path(tmp), ranks, threads, src)
                times[name].append(result["step_s"])
                allreduce += [result["allreduce_s"]] if "allreduce_s" in result else []
                print(f"round {r + 1}: {name}: {times[name][-1] * 1000:.0f} ms/step", file=sys.stderr)
    base = statistics.median(times["1 process, 1 thread"])
    print(f"preset {args.preset}, global batch {args.batch} x context, {args.steps} steps, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'configuration':<48} {'ms/step':>8} {'vs 1 process, 1 thread':>24}")
    for name, values in times.items():
        m = statistics.median(values)
        print(f"{name:<48} {m * 1000:>8.0f} {base / m:>23.2f}x")
    if allreduce:
        print(f"one gloo all-reduce of the gradients' size, 2 ranks: {statistics.median(allreduce) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
