"""bfloat16 against float32 in gptlab, on one machine, in one run: training speed, the loss it reaches, decoding.

    python benchmarks/bench_bf16.py                      # CPU: every part below (~15 min on 2 busy cores)
    python benchmarks/bench_bf16.py --what train decode  # only the 124M-shape speeds
    python benchmarks/bench_bf16.py --device cuda --compile --what train decode   # a GPU: + MFU

What each part measures (medians over ``--rounds``; fp32 and bf16 interleaved, A, B, A, B, ..., so a burst of
load elsewhere on the machine hits both alike; the ratios are what to read on a shared machine):

- train: one optimizer step (forward, loss, backward, fused AdamW) of the GPT-2 124M shape on
  ``--batch`` x ``--seq`` tokens, float32 against bf16 autocast, as ``gptlab pretrain`` runs it. With
  ``--compile`` (for GPUs) the model is ``torch.compile``d; on CUDA the MFU is against the GPU's dense bf16
  peak from ``GPU_BF16_PEAKS`` (model FLOPs as ``bench_speed.py`` counts them).
- sizes: the same step for the ``tiny``, ``mini`` and ``small`` presets: where bf16 starts to pay, which is
  what ``--precision auto`` goes by (``gptlab.device.AUTO_BF16_MIN_PARAMETERS``).
- loss: ``gptlab.pretrain`` of the ``--loss-preset`` model for ``--loss-steps`` steps on tinyshakespeare,
  once with ``--precision fp32`` and once with ``bf16``, same seed and batches: the validation and training
  losses at the end and the run's tokens/s (whole runs, one after the other: not interleaved).
- decode: greedy batch-1 decoding of ``--gen-tokens`` tokens with the KV cache at the 124M shape, weights
  held in float32 against ``--dtype bf16`` (``gptlab.generate``, as ``gptlab generate`` runs it); the
  greedy tokens of the two agree where float32's top two logits are not nearly tied (random weights here).
- memory: bytes of the weights in each dtype, and the oneDNN-packed copy bf16 decoding reads while it runs.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_speed import describe_machine, model_flops_per_token, positive_int, timed  # the sibling script
from gptlab.config import TrainConfig
from gptlab.device import cpu_bf16_instructions, keep_freed_memory_mapped, resolve_precision
from gptlab.generate import generate
from gptlab.linear import CPULinear
from gptlab.model import GPTConfig, GPTModel
from gptlab.pretrain import pretrain
from gptlab.train import lm_loss, make_optimizer

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by a fragment of torch.cuda.get_device_name; first match wins.
GPU_BF16_PEAKS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
                  ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12),
                  ("3090", 71e12), ("V100", 125e12)]


def gpu_peak(device: torch.device) -> tuple[str, float | None]:
    name = torch.cuda.get_device_name(device)
    return name, next((peak for fragment, peak in GPU_BF16_PEAKS if fragment in name), None)


def interleaved(cases: dict, rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each case's callable, the cases run in turn each round (A, B, A, B, ...)."""
    for fn in cases.values():  # warm-up: allocations, kernel choice, compilation
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def train_step_fn(preset: str, precision: str, device, batch: int, seq: int, compile_model: bool):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset(preset)).to(device).train()
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4), device)
    forward = torch.compile(model) if compile_model else model
    seq = min(seq, model.config.context_length)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    dtype = PRECISIONS[precision]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = lm_loss(forward, (x, y))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model, batch * seq


def bench_train(args, device, presets: list[str]) -> list[str]:
    lines = ["| model | parameters | fp32 tokens/s | bf16 tokens/s | bf16 / fp32 |" + (" bf16 MFU |" if
             device.type == "cuda" else ""), "|---|---:|---:|---:|---:|" + ("---:|" if device.type == "cuda" else "")]
    for preset in presets:
        steps, tokens, model = {}, 0, None
        for precision in PRECISIONS:
            steps[precision], model, tokens = train_step_fn(preset, precision, device, args.batch, args.seq,
                                                            args.compile)
        print(f"# train {preset}: {args.rounds} interleaved rounds", file=sys.stderr)
        seconds = interleaved(steps, args.rounds, device)
        rate = {p: tokens / s for p, s in seconds.items()}
        row = (f"| {preset} | {model.num_parameters() / 1e6:.1f}M | {rate['fp32']:.0f} | {rate['bf16']:.0f} | "
               f"{rate['bf16'] / rate['fp32']:.2f}x |")
        if device.type == "cuda":
            name, peak = gpu_peak(device)
            seq = min(args.seq, model.config.context_length)
            mfu = rate["bf16"] * model_flops_per_token(seq) / peak if peak and preset == "gpt2-small" else None
            row += f" {mfu:.1%} of {name}'s {peak / 1e12:.0f} TFLOP/s |" if mfu else " - |"
        lines.append(row)
        del steps, model
    return lines


def bench_loss(args, device) -> list[str]:
    lines = ["| precision | val loss | train loss | tokens/s (whole run) |", "|---|---:|---:|---:|"]
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in PRECISIONS:
            print(f"# loss: {args.loss_steps} steps of {args.loss_preset} in {precision}", file=sys.stderr)
            config = TrainConfig(max_steps=args.loss_steps, batch_size=args.loss_batch, lr=1e-3, warmup_steps=20,
                                 eval_interval=args.loss_steps, eval_batches=20, precision=precision,
                                 device=str(device), seed=123)
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # the loop's evaluation lines: not into the tables
                result = pretrain(SHAKESPEARE, Path(tmp) / precision, config, preset=args.loss_preset,
                                  progress=False, sample_prompt=None)
            seconds = time.perf_counter() - start
            losses[precision] = result.val_loss
            lines.append(f"| {precision} | {result.val_loss:.4f} | {result.train_loss:.4f} | "
                         f"{result.tokens_seen / seconds:.0f} |")
    lines.append(f"\nbf16's validation loss is {losses['bf16'] / losses['fp32'] - 1:+.2%} from float32's.")
    return lines


def bench_decode(args, device) -> list[str]:
    torch.manual_seed(0)
    models = {"fp32": GPTModel(GPTConfig.preset("gpt2-small")).to(device).eval()}
    models["bf16"] = GPTModel(GPTConfig.preset("gpt2-small")).to(device=device, dtype=torch.bfloat16).eval()
    models["bf16"].load_state_dict({k: v.to(torch.bfloat16) for k, v in models["fp32"].state_dict().items()})
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    out = {}
    cases = {p: (lambda m=m, p=p: out.__setitem__(p, generate(m, prompt, args.gen_tokens))) for p, m in models.items()}
    print(f"# decode: {args.rounds} interleaved rounds of {args.gen_tokens} tokens", file=sys.stderr)
    seconds = interleaved(cases, args.rounds, device)
    rate = {p: args.gen_tokens / s for p, s in seconds.items()}
    agree = (out["fp32"][0, 16:] == out["bf16"][0, 16:]).float().mean().item()
    first_diff = next((i for i, (a, b) in enumerate(zip(out["fp32"][0, 16:], out["bf16"][0, 16:])) if a != b), None)
    return ["| weights | tokens/s | vs fp32 |", "|---|---:|---:|",
            f"| fp32 | {rate['fp32']:.1f} | 1.00x |", f"| bf16 | {rate['bf16']:.1f} | {rate['bf16'] / rate['fp32']:.2f}x |",
            f"\ngreedy tokens equal to float32's: {agree:.0%} of {args.gen_tokens}"
            + (f" (first difference at new token {first_diff})" if first_diff is not None else "")]


def weights_memory() -> list[str]:
    with torch.device("meta"):
        model = GPTModel(GPTConfig.preset("gpt2-small"))
    params = sum(p.numel() for p in model.parameters())
    packed = sum(m.weight.numel() for m in model.modules() if isinstance(m, CPULinear))
    return ["| weights | MB | vs fp32 |", "|---|---:|---:|", f"| fp32 | {params * 4 / 1e6:.0f} | 1.00x |",
            f"| bf16 | {params * 2 / 1e6:.0f} | 0.50x |",
            f"| bf16 while decoding on the CPU (+ oneDNN-packed copy of the matrices) | {(params + packed) * 2 / 1e6:.0f}"
            f" | {(params + packed) / params / 2:.2f}x |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--what", nargs="+", choices=["train", "sizes", "loss", "decode", "memory"],
                    default=["train", "sizes", "loss", "decode", "memory"])
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--batch", type=positive_int, default=4, help="training batch at every size")
    ap.add_argument("--seq", type=positive_int, default=256, help="training sequence length (at most the context)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training model (for GPUs)")
    ap.add_argument("--loss-preset", default="mini")
    ap.add_argument("--loss-steps", type=positive_int, default=200)
    ap.add_argument("--loss-batch", type=positive_int, default=8)
    ap.add_argument("--gen-tokens", type=positive_int, default=100)
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="torch.set_num_threads (default: torch's, every core; 1 is steadier on a shared machine)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    keep_freed_memory_mapped()  # as the gptlab training commands run
    print(f"# {describe_machine(device)}; native bf16: "
          f"{cpu_bf16_instructions() if device.type == 'cpu' else 'see the GPU'}", file=sys.stderr)
    resolve_precision("bf16", device)  # a device without native bf16: the one-line error, before any work
    sections = {
        "train": lambda: ["### Training step at the GPT-2 124M shape", *bench_train(args, device, ["gpt2-small"])],
        "sizes": lambda: ["### Training step by model size", *bench_train(args, device, ["tiny", "mini", "small"])],
        "loss": lambda: [f"### Loss after {args.loss_steps} steps ({args.loss_preset}, tinyshakespeare)",
                         *bench_loss(args, device)],
        "decode": lambda: ["### Batch-1 greedy decoding at the GPT-2 124M shape", *bench_decode(args, device)],
        "memory": lambda: ["### Weights' memory at the GPT-2 124M shape", *weights_memory()],
    }
    print(f"machine: {describe_machine(device)}\n")
    for what in args.what:
        print("\n".join(sections[what]()) + "\n", flush=True)


if __name__ == "__main__":
    main()
