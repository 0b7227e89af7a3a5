"""int8 / int4 weight-only quantization against gptlab float32, in one run on one machine (README: Low precision).

    speed    batch-1 greedy decoding tokens/s at a model shape (default the GPT-2 124M shape, random weights:
             speed does not depend on their values), float32 / int8 / int4 interleaved over rounds (medians);
             the bytes of the weights each holds; peak RSS of a fresh process that loads the saved run
             (``gptlab.weights.load``, as every using command does) and decodes a few tokens
    quality  a model this script trains on tinyshakespeare (``mini`` preset, GPT-2 tokenizer), and the 124M
             shape trained briefly on it too: held-out perplexity, and the share of 200 held-out positions
             whose greedy (argmax) next token is float32's, each computed through the layers' real kernels

    python benchmarks/bench_quantize.py                       # everything (~8 minutes on 2 busy cores)
    python benchmarks/bench_quantize.py --what speed --threads 1
    python benchmarks/bench_quantize.py --device cuda         # the same on a GPU (the fallback kernels there)
"""
from __future__ import annotations

import argparse
import math
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_speed import positive_int  # the sibling script (this folder is on sys.path when run)
from gptlab.config import QuantizeConfig
from gptlab.device import select_device
from gptlab.model import GPTConfig, GPTModel, KVCache
from gptlab.quantize import describe, quantize_model, quantized_kernels
from gptlab.run import save_model
from gptlab.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
KINDS = {"float32": None, "int8": QuantizeConfig("int8"), "int4": QuantizeConfig("int4")}


def weight_bytes(model: GPTModel) -> tuple[int, int]:
    """Bytes of the tensors the model's state holds (a tied head once), and of what it holds in memory once it
    has run: int4 layers swap their weight for ``_weight_int4pack_mm_for_cpu``'s packed copy (a tied head keeps
    both: the embedding looks up its rows)."""
    state = model.state_dict()
    if model.lm_head.weight is model.wte.weight:
        state.pop("lm_head.weight")
    stored = sum(t.numel() * t.element_size() for t in state.values())
    held = [t for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values(),
                                                  *(getattr(m, "_packed", None) or ())) if t is not None]
    return stored, sum(t.numel() * t.element_size() for t in {id(t): t for t in held}.values())


def quantized(model: GPTModel, kind: str) -> GPTModel:
    import copy

    twin = copy.deepcopy(model)
    return twin if KINDS[kind] is None else quantize_model(twin, KINDS[kind])


@torch.inference_mode()
def decode_seconds(model: GPTModel, tokens: int, device) -> float:
    """Seconds per token of greedy batch-1 decoding after a 16-token prompt (the prompt not timed)."""
    V = model.config.vocab_size
    cache = KVCache(model.config, 1, 16 + tokens, device, torch.float32)
    logits = model(torch.randint(0, V, (1, 16), device=device), cache=cache, last_only=True)
    sync(device)
    start = time.perf_counter()
    for _ in range(tokens):
        logits = model(logits[:, -1].argmax(-1, keepdim=True), cache=cache, last_only=True)
    sync(device)
    return (time.perf_counter() - start) / tokens


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def speed(preset: str, rounds: int, tokens: int, device) -> None:
    torch.manual_seed(0)
    base = GPTModel(GPTConfig.preset(preset)).eval().to(device)
    models = {kind: quantized(base, kind) for kind in KINDS}
    for model in models.values():
        decode_seconds(model, 2, device)  # warm-up: kernels found, int4's packed copies made
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in range(rounds):
        order = list(KINDS)[r % 3:] + list(KINDS)[:r % 3]  # rotate, so a burst of load elsewhere hits all alike
        for kind in order:
            times[kind].append(decode_seconds(models[kind], tokens, device))
    sizes = {kind: weight_bytes(m) for kind, m in models.items()}
    rss = peak_rss(models, device)
    print(f"\n## batch-1 greedy decoding, {preset} shape, {tokens} tokens x {rounds} rounds (median), "
          f"{torch.get_num_threads()} threads, {device}\n")
    print("| weights | tokens/s | vs float32 | weights (file) | vs float32 | weights held once run | vs float32 "
          "| RSS added by load + decode | vs float32 | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    t0, (s0, h0), (a0, _) = statistics.median(times["float32"]), sizes["float32"], rss["float32"]
    for kind in KINDS:
        t, (stored, held), (added, peak) = statistics.median(times[kind]), sizes[kind], rss[kind]
        name = kind if KINDS[kind] is None else describe(models[kind].quantization)
        print(f"| {name} | {1 / t:.1f} | {t0 / t:.2f}x | {stored / 1e6:.0f} MB | {stored / s0:.3f}x | "
              f"{held / 1e6:.0f} MB | {held / h0:.3f}x | {added / 1e6:.0f} MB | {added / a0:.2f}x | {peak / 1e6:.0f} MB |")


def peak_rss(models: dict[str, GPTModel], device) -> dict[str, tuple[int, int]]:
    """Per kind, a fresh process (``--rss-child``) loads the saved run and decodes 4 tokens: the RSS that added
    (after minus before the load: the import's own peak hides in ru_maxrss), and the process's peak RSS."""
    out: dict[str, tuple[int, int]] = {}
    tokenizer = get_tokenizer("gpt2")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, model in models.items():
            run = Path(tmp) / kind
            save_model(run, model.cpu(), tokenizer)
            model.to(device)
            cmd = [sys.executable, __file__, "--rss-child", str(run), "--device", str(device)]
            added, peak = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-2:]
            out[kind] = (int(added), int(peak))
    return out


def rss_now() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def rss_peak() -> int:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the parent's size over the exec)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def rss_child(run: str, device: str) -> None:
    from gptlab.weights import load

    get_tokenizer("gpt2")  # the tokenizer's tables are not the weights: loaded before the first reading
    decode_seconds(GPTModel(GPTConfig.preset("tiny")).eval().to(device), 2, device)  # torch's first-op buffers
    before = rss_now()
    model, _ = load(run, device=device)
    decode_seconds(model, 4, device)
    print(rss_now() - before, rss_peak())


# ---- quality --------------------------------------------------------------------------------------

def train(preset: str, steps: int, out: Path, context: int, batch: int) -> Path:
    from gptlab.pretrain import pretrain

    pretrain(SHAKESPEARE, out, {"max_steps": steps, "eval_interval": steps, "batch_size": batch, "lr": 2e-3,
                                "warmup_steps": min(20, steps // 5)},
             preset=preset, context_length=context, progress=False)
    return out


@torch.inference_mode()
def quality(name: str, run: Path, device, positions: int = 200, windows: int = 16) -> None:
    from gptlab.weights import load

    tokenizer = get_tokenizer("gpt2")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    held_out = torch.tensor(tokenizer.encode(text[int(len(text) * 0.9):]))  # pretrain's validation split: unseen
    base, _ = load(run, device=device)
    T = base.config.context_length
    chunks = held_out[: windows * (T + 1)].view(windows, T + 1).to(device)
    idx, targets = chunks[:, :-1], chunks[:, 1:]
    results = {}
    for kind in KINDS:
        model, _ = load(run, device=device, quantize=KINDS[kind])
        logits = model(idx)  # (W, T, V), through the layers' own kernels
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        results[kind] = (math.exp(loss.item()), logits.argmax(-1).flatten()[:positions])
    ppl0, greedy0 = results["float32"]
    print(f"\n## quality, {name}: {windows} held-out windows of {T} tokens; greedy agreement over the first "
          f"{positions} positions\n")
    print("| weights | perplexity | vs float32 | greedy tokens = float32's |\n|---|---:|---:|---:|")
    for kind, (ppl, greedy) in results.items():
        agree = (greedy == greedy0).float().mean().item()
        print(f"| {kind} | {ppl:.2f} | {ppl / ppl0 - 1:+.2%} | {agree:.1%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", choices=["speed", "quality", "all"], default="all")
    ap.add_argument("--preset", default="gpt2-small", help="model shape for speed (default: gpt2-small, 124M)")
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--tokens", type=positive_int, default=32, help="decoded tokens per round and kind")
    ap.add_argument("--steps", type=positive_int, default=400, help="training steps of the small quality model")
    ap.add_argument("--large-steps", type=positive_int, default=30, help="training steps at the 124M shape")
    ap.add_argument("--batch", type=positive_int, default=8, help="training batch (windows of --context tokens)")
    ap.add_argument("--context", type=positive_int, default=128, help="training and evaluation window")
    ap.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    if args.rss_child is not None:
        return rss_child(args.rss_child, str(device))
    print(f"# bench_quantize: {platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, kernels: {quantized_kernels()._asdict()}")
    if args.what in ("speed", "all"):
        speed(args.preset, args.rounds, args.tokens, device)
    if args.what in ("quality", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            trained = f"steps of {args.batch} x {args.context} tokens"
            quality(f"`mini` preset trained {args.steps} {trained}",
                    train("mini", args.steps, Path(tmp) / "mini", args.context, args.batch), device)
            quality(f"124M shape trained {args.large_steps} {trained}",
                    train("gpt2-small", args.large_steps, Path(tmp) / "large", args.context, args.batch), device)
            print(f"\n(training and evaluation took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
