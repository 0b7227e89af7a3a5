"""Where gptlab's time goes: ``torch.profiler`` over training steps and cached decoding steps.

    python benchmarks/profile_speed.py                       # GPT-2 124M shape, CPU, float32
    python benchmarks/profile_speed.py --what train --keep-freed-memory   # as `gptlab pretrain` runs; + peak-rate table
    python benchmarks/profile_speed.py --what decode --trace decode.json   # open in chrome://tracing
    python benchmarks/profile_speed.py --what floor          # decoding against the memory floor
    python benchmarks/profile_speed.py --what kernels        # torch's BLAS (MKL) against oneDNN
    python benchmarks/profile_speed.py --what decode --quantize int8   # decoding with int8 (int4) weights
    python benchmarks/profile_speed.py --what quant-kernels  # torch's int8/int4 ops against float32, per layer

Prints the operators that took the most time (self time, summed over calls), and groups them into
matrix multiplies, attention, loss, optimizer and the rest, which is what BENCHMARKS.md discusses.
``floor`` times, per decoded token and interleaved over rounds: reading every weight matrix once
(``.sum()``, the memory floor), the weight matmuls alone through ``CPULinear`` and through plain
``F.linear``, and the whole cached decoding step, at batch 1 and batch 8 (packed, as ``generate`` does).
``kernels`` times a large float32 matmul through torch's default BLAS and through oneDNN. ``quant-kernels``
times one batch-1 product per layer shape of the model through each int8/int4 route torch offers (README: Low
precision), interleaved over rounds.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bench_speed import positive_int  # the sibling script (this folder is on sys.path when run)
from gptlab.config import TrainConfig
from gptlab.device import keep_freed_memory_mapped
from gptlab.errors import GptlabError
from gptlab.generate import generate
from gptlab.linear import CPULinear, _onednn_linear, onednn_kernels, packed_weights
from gptlab.model import PRESETS, GPTConfig, GPTModel, KVCache
from gptlab.train import lm_loss, make_optimizer

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


def decode_floor(model: GPTModel, rounds: int) -> None:
    """Per-token time of a cached decoding step against the time to read its weights once."""
    linears = [m for m in model.modules() if isinstance(m, CPULinear)]
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    V = model.config.vocab_size

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def matmuls(rows: int, how: str) -> float:
        """One step's weight products: ``CPULinear`` as it chooses, or one kernel forced for every layer."""
        inputs = [torch.zeros(rows, m.in_features) for m in linears]
        if how == "F.linear":
            product = lambda m, x: F.linear(x, m.weight, m.bias)  # noqa: E731
        elif how.startswith("oneDNN"):  # what CPULinear takes for 2+ rows, forced for any
            product = lambda m, x: _onednn_linear(x, m.weight if m.packed is None else m.packed, m.bias)  # noqa: E731
        else:
            product = lambda m, x: m(x)  # noqa: E731
        with packed_weights(model, rows) if how.endswith("packed") else nullcontext():
            return timed(lambda: [product(m, x) for m, x in zip(linears, inputs)])

    def decode(rows: int, steps: int = 8) -> float:
        cache = KVCache(model.config, rows, 16 + steps, "cpu", torch.float32)
        with packed_weights(model, rows) if rows > 1 else nullcontext():  # as generate() does
            model(torch.randint(0, V, (rows, 16)), cache=cache, last_only=True)  # the prompt: not timed
            new = torch.randint(0, V, (rows, 1))
            return timed(lambda: [model(new, cache=cache, last_only=True) for _ in range(steps)]) / steps

    probe = torch.ones(512 * 2**20 // 4)  # bench_speed.py's bandwidth probe, scaled below to the weights' bytes
    cases = {"bench_speed.py's probe: one 512 MB `.sum()`, per weight byte":
             (lambda: timed(lambda: probe.sum()) * weight_bytes / (probe.numel() * 4), 1)}
    cases["read every weight matrix once (`.sum()`)"] = (lambda: timed(lambda: [m.weight.sum() for m in linears]), 1)
    cases["weight matmuls only, `CPULinear` (row blocks), 1 row"] = (lambda: matmuls(1, "plain"), 1)
    cases["weight matmuls only, `F.linear` (MKL), 1 row"] = (lambda: matmuls(1, "F.linear"), 1)
    if onednn_kernels().linear is not None:  # forced, so also where GPTLAB_ONEDNN=0 keeps CPULinear off it
        cases["weight matmuls only, oneDNN (plain), 1 row"] = (lambda: matmuls(1, "oneDNN"), 1)
        cases["weight matmuls only, oneDNN (packed), 1 row"] = (lambda: matmuls(1, "oneDNN packed"), 1)
    cases["whole cached decoding step, batch 1"] = (lambda: decode(1), 1)
    cases["weight matmuls only, `CPULinear` (oneDNN, packed), 8 rows"] = (lambda: matmuls(8, "packed"), 8)
    cases["weight matmuls only, `CPULinear` (oneDNN, plain), 8 rows"] = (lambda: matmuls(8, "plain"), 8)
    cases["weight matmuls only, `F.linear` (MKL), 8 rows"] = (lambda: matmuls(8, "F.linear"), 8)
    cases["whole cached decoding step, batch 8 (packed)"] = (lambda: decode(8), 8)
    times: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        for fn, _ in cases.values():
            fn()  # warm-up
        for _ in range(rounds):
            for name, (fn, _) in cases.items():
                times[name].append(fn())
    floor = statistics.median(times["read every weight matrix once (`.sum()`)"])
    probe_s = times["bench_speed.py's probe: one 512 MB `.sum()`, per weight byte"]
    print(f"\n## decoding against the memory floor: {weight_bytes / 1e6:.0f} MB of weight matrices, "
          f"median of {rounds} interleaved rounds\n")
    print("| per decoding step | ms | weights read at | tokens/s | floor / this | probe / this (median of rounds) |"
          "\n|---|---:|---:|---:|---:|---:|")
    for name, (_, rows) in cases.items():
        t = statistics.median(times[name])
        # each round's time against the same round's probe: the bandwidth drifts between rounds
        share = statistics.median(p / x for p, x in zip(probe_s, times[name]))
        print(f"| {name} | {t * 1e3:.1f} | {weight_bytes / t / 1e9:.1f} GB/s | {rows / t:.1f} | {floor / t:.0%} | "
              f"{share:.0%} |")


def train_ceiling(model: GPTModel, step, batch: int, seq: int, rounds: int) -> None:
    """How far the training step is from the peak matmul rate, and what caps it.

    Records every oneDNN product of one step (shape, strides, time in the step), times each again on
    its own, as the step hands it over and with both operands contiguous (what the product costs
    without torch's copy of a transposed operand), and sets the step's model FLOPs (6 N + 12 L T C per
    token, as ``bench_speed.py``) against four limits: every product at its own standalone rate, at its
    contiguous-operand rate, and at the 2048³ peak, and the work that is not a matmul (the step minus
    its products), which no limit removes.
    """
    import gptlab.linear as linear

    if not CPULinear.use_onednn:
        print("\n## training step against the peak matmul rate: skipped, oneDNN's linear is not in use here")
        return
    kernel = linear._onednn_linear
    calls: dict[tuple, list[float]] = defaultdict(list)

    def recorded(x, w, b):
        start = time.perf_counter()
        y = kernel(x, w, b)
        calls[(tuple(x.shape), x.stride(), tuple(w.shape), w.stride(), b is not None)].append(time.perf_counter() - start)
        return y

    steps: list[float] = []
    linear._onednn_linear = recorded
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            step()
            steps.append(time.perf_counter() - start)
    finally:
        linear._onednn_linear = kernel
    step_s = statistics.median(steps)

    def flops(key: tuple) -> float:
        x_shape, _, w_shape, _, _ = key
        return 2 * math.prod(x_shape) * w_shape[0]

    def alone(key: tuple, contiguous: bool = False) -> float:
        x_shape, x_stride, w_shape, w_stride, has_bias = key
        x = torch.empty(x_shape) if contiguous else torch.empty_strided(x_shape, x_stride)
        w = torch.empty(w_shape) if contiguous else torch.empty_strided(w_shape, w_stride)
        x, w = x.normal_(), w.normal_()
        b = torch.zeros(w_shape[0]) if has_bias else None
        kernel(x, w, b)
        times = []
        for _ in range(max(3, rounds)):
            start = time.perf_counter()
            kernel(x, w, b)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    n = 2048
    peak = 2 * n**3 / alone(((n, n), (n, 1), (n, n), (n, 1), False))
    print(f"\n## training step against the peak matmul rate: {rounds} steps, median {step_s:.2f} s; "
          f"oneDNN 2048³ peak {peak / 1e9:.0f} GFLOP/s\n")
    print("| product (x @ W.T), x strides / W strides | calls per step | ms per step | GFLOP/s in the step | "
          "GFLOP/s alone | GFLOP/s alone, operands contiguous |\n|---|---:|---:|---:|---:|---:|")
    in_step = ideal = untransposed = 0.0
    for key, times in sorted(calls.items(), key=lambda kv: -sum(kv[1])):
        per_step = len(times) / rounds
        t_step, t_alone = statistics.median(times) * per_step, alone(key) * per_step
        t_contiguous = alone(key, contiguous=True) * per_step
        in_step, ideal, untransposed = in_step + t_step, ideal + t_alone, untransposed + t_contiguous
        x_shape, x_stride, w_shape, w_stride, has_bias = key
        rate = lambda t: f"{flops(key) * per_step / t / 1e9:.0f}"  # noqa: E731
        print(f"| {x_shape} @ {w_shape}{' + bias' if has_bias else ''}, {x_stride} / {w_stride} | {per_step:.0f} | "
              f"{t_step * 1e3:.0f} | {rate(t_step)} | {rate(t_alone)} | {rate(t_contiguous)} |")
    cfg = model.config
    linears = [m for m in model.modules() if isinstance(m, CPULinear)]
    n_matmul = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in linears)
    model_flops = batch * seq * (6 * n_matmul + 12 * cfg.n_layer * seq * cfg.n_embd)
    product_flops = sum(flops(k) * len(t) / rounds for k, t in calls.items())
    rest = step_s - in_step
    print(f"\n| step (median) | s | MFU |\n|---|---:|---:|")
    print(f"| measured | {step_s:.2f} | {model_flops / step_s / peak:.0%} |")
    print(f"| of which the products | {in_step:.2f} | |")
    print(f"| of which everything else (attention, norms, GELU, loss, optimizer) | {rest:.2f} | |")
    print(f"| every product at its standalone rate, the rest as measured | {ideal + rest:.2f} | "
          f"{model_flops / (ideal + rest) / peak:.0%} |")
    print(f"| every product at its rate with contiguous operands (no transposed copies), the rest as measured | "
          f"{untransposed + rest:.2f} | {model_flops / (untransposed + rest) / peak:.0%} |")
    print(f"| every product at the 2048³ peak, the rest as measured | {product_flops / peak + rest:.2f} | "
          f"{model_flops / (product_flops / peak + rest) / peak:.0%} |")


def matmul_kernels(rounds: int, n: int = 2048) -> None:
    """The float32 matmul rate of torch's default BLAS (MKL here) against oneDNN, also inside torch."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    kernels = {"`a @ b` (torch's BLAS: MKL)": lambda: a @ b}
    onednn = onednn_kernels().linear  # None where this torch lacks it
    if onednn is not None:
        kernels["oneDNN (`torch.ops.mkldnn._linear_pointwise`)"] = lambda: onednn(a, b, None, "none", [], "")
    times: dict[str, list[float]] = defaultdict(list)
    for fn in kernels.values():
        fn()
    for _ in range(rounds):
        for name, fn in kernels.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(f"\n## float32 matmul, {n} x {n} x {n}, {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, median of {rounds}\n")
    print("| kernel | GFLOP/s |\n|---|---:|")
    for name, ts in times.items():
        print(f"| {name} | {2 * n**3 / statistics.median(ts) / 1e9:.0f} |")


def quant_kernels(config: GPTConfig, rounds: int) -> None:
    """Batch-1 products at the model's layer shapes: float32 ``CPULinear`` against torch's integer routes."""
    from gptlab.config import QuantizeConfig
    from gptlab.quantize import Int4Linear, Int8Linear, _int4_kernel_weight, _int8_product, quantized_kernels

    C, V = config.n_embd, config.vocab_size
    found = quantized_kernels()
    shapes = {"c_attn": (C, 3 * C), "c_proj": (C, C), "c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C), "head": (C, V)}
    print(f"\n## batch-1 products, ms, {torch.get_num_threads()} threads, median of {rounds} interleaved rounds\n")
    routes: dict[str, dict[str, float]] = {}
    for name, (k, n) in shapes.items():
        plain = CPULinear(k, n, bias=False)
        q8 = Int8Linear.of(plain, QuantizeConfig("int8"))
        q4 = Int4Linear.of(plain, QuantizeConfig("int4", 128 if k % 128 == 0 else 32))
        x = torch.randn(1, k)
        packed, sz = _int4_kernel_weight(found.int4_pack, q4.unpacked_rows(slice(None)), q4.weight_scale,
                                         q4.weight_zero) if found.int4_pack else (None, None)
        q, scale, gs = q8.weight_int, q8.weight_scale, q4.group_size
        cases = {
            "float32 CPULinear": lambda: plain(x),
            "int8 dequantize + F.linear": lambda: F.linear(x, q8.weight),
            "int8 `_weight_int8pack_mm`, float32 x": lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale),
            "int8 `_weight_int8pack_mm`, bf16 x (gptlab)": lambda: q8(x),
            "int8 `_int_mm`, two-digit x (gptlab's second choice)": lambda: _int8_product(torch._int_mm, x, q, scale),
            "int4 dequantize + F.linear": lambda: F.linear(x, q4.weight),
        }
        if packed is not None:
            cases["int4 `_weight_int4pack_mm_for_cpu`, float32 x"] = lambda: found.int4_mm(x, packed, gs, sz.float())
            cases["int4 `_weight_int4pack_mm_for_cpu`, bf16 x (gptlab)"] = lambda: found.int4_mm(x.bfloat16(), packed,
                                                                                                  gs, sz)
        times: dict[str, list[float]] = defaultdict(list)
        with torch.no_grad():
            for fn in cases.values():
                fn()
            for _ in range(rounds):
                for case, fn in cases.items():
                    start = time.perf_counter()
                    fn()
                    times[case].append(time.perf_counter() - start)
        for case in cases:
            routes.setdefault(case, {})[f"{name} {n}x{k}"] = statistics.median(times[case]) * 1e3
    columns = list(next(iter(routes.values())))
    print("| route | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for case, row in routes.items():
        print(f"| {case} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", choices=["train", "decode", "floor", "kernels", "quant-kernels", "all"], default="all")
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="--what decode with this model's linears quantized (gptlab.quantize)")
    ap.add_argument("--rounds", type=positive_int, default=5,
                    help="rounds for --what floor and kernels (interleaved) and for train's peak-rate table")
    ap.add_argument("--preset", default="gpt2-small", choices=list(PRESETS), help="model size (default: gpt2-small)")
    ap.add_argument("--steps", type=positive_int, default=2, help="profiled training steps (after one warm-up step)")
    ap.add_argument("--batch", type=positive_int, default=4)
    ap.add_argument("--seq", type=positive_int, default=256)
    ap.add_argument("--tokens", type=positive_int, default=32, help="profiled new tokens for decoding, batch 1")
    ap.add_argument("--top", type=positive_int, default=15)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="train and decode: bf16 trains under bf16 autocast (as --precision bf16) and decodes with "
                         "the weights in bf16 (as --dtype bf16); the peak-rate table is float32's only")
    ap.add_argument("--trace", help="also write a Chrome trace of the last profile here")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="keep freed memory mapped (glibc mallopt, gptlab.device.keep_freed_memory_mapped), as "
                         "the gptlab command does for training; train() alone does not. Without it the training "
                         "profile counts page faults in fill_ and copy_")
    args = ap.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory_mapped()

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset(args.preset))
    V = model.config.vocab_size
    amp = torch.bfloat16 if args.precision == "bf16" else None
    if args.what in ("train", "all"):
        optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
        tokens = torch.randint(0, V, (args.batch, args.seq + 1))

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
                loss = lm_loss(model, (tokens[:, :-1], tokens[:, 1:]))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        summarise(prof, f"training, {args.steps} steps of {args.batch} x {args.seq} tokens, {args.precision}", args.top)
        if amp is None:
            train_ceiling(model, step, args.batch, args.seq, args.rounds)
    if args.quantize and args.what != "decode":
        raise SystemExit("profile_speed.py: error: --quantize profiles decoding: give --what decode")
    if args.quantize and amp is not None:
        raise SystemExit("profile_speed.py: error: --quantize and --precision bf16 do not combine (the integer "
                         "kernels already take bf16 activations)")
    if args.quantize:
        from gptlab.config import QuantizeConfig
        from gptlab.quantize import quantize_model

        quantize_model(model.eval(), QuantizeConfig(args.quantize))
    if amp is not None:
        model = model.to(torch.bfloat16)  # decoding: the weights held in bf16, as gptlab generate --dtype bf16
    if args.what in ("decode", "all"):
        ids = torch.randint(0, V, (1, 16))
        generate(model, ids, 4)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(model, ids, args.tokens)
        quantized = f", {args.quantize} weights" if args.quantize else ""
        summarise(prof, f"cached decoding, batch 1, {args.tokens} new tokens{quantized}", args.top)
    if args.what in ("floor", "all"):
        decode_floor(model.eval(), args.rounds)
    if args.what in ("kernels", "all"):
        matmul_kernels(args.rounds)
    if args.what in ("quant-kernels", "all"):
        quant_kernels(model.config, args.rounds)
    if args.trace and args.what in ("train", "decode"):
        prof.export_chrome_trace(args.trace)
        print(f"\ntrace written to {args.trace}")


if __name__ == "__main__":
    try:
        main()
    except GptlabError as e:  # e.g. --seq longer than the preset's context
        raise SystemExit(f"profile_speed.py: error: {e}")
