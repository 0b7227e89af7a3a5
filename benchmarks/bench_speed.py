"""Training and generation speed of gptlab against Hugging Face ``transformers`` and ``llms-from-scratch``.

Every peer runs the same GPT-2 shape on the same random token ids, in the same process, interleaved:
each round measures the peak matmul rate, the memory read bandwidth, then every peer on every task,
in an order that rotates from round to round, so a burst of load elsewhere on the machine hits all of
them alike. The table reports medians over the rounds and ratios against gptlab. Peak resident memory
is measured in a fresh subprocess per peer and task, so that one peer's allocations do not count for
another.

    make bench                                          # installs the peers, then runs the default below
    python benchmarks/bench_speed.py                    # GPT-2 124M shape, CPU, float32, 3 rounds
    python benchmarks/bench_speed.py --quick            # smaller workloads, 2 rounds: a few minutes
    python benchmarks/bench_speed.py --device cuda --precision bf16 --compile

What each row measures:

- train: one optimizer step (forward, cross-entropy, backward, AdamW) on ``--batch`` x ``--seq`` tokens.
  Each peer uses the optimizer its own training code uses: gptlab's ``make_optimizer`` (fused AdamW),
  the default of Hugging Face's ``Trainer`` (``adamw_torch_fused``) and the book's plain ``AdamW``.
  MFU = model FLOPs / peak matmul FLOP/s, with model FLOPs per token = 6 N + 12 L T C (PaLM's count;
  N = parameters in matrix multiplies, i.e. all but the position embeddings). The peak is the faster of
  torch's ``a @ b`` and, on the CPU, oneDNN's matmul (also part of torch); both are printed.
- gen: greedy decoding of ``--gen-tokens`` new tokens after a ``--prompt`` token prompt, with and
  without a KV cache, at batch 1 and ``--gen-batch``; tokens/s counts every sequence's new tokens.
  The bandwidth limit for batch 1 is the measured read bandwidth / the bytes of weights read per token;
  each peer's batch-1 cached run is judged against the mean of two bandwidth reads, just before and just
  after it (this machine's bandwidth drifts within a round), and the row is the median over rounds.
- ttft: time to the first new token (prefill of the prompt + one token), batch 1.
- rss: peak resident set size of a fresh process doing a few training steps / one cached generation,
  and that peak minus the process's size right after its imports (the part the work itself costs).
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

PEERS = ["gptlab", "hf", "lfs"]
PEER_NAMES = {"gptlab": "gptlab", "hf": "HF transformers", "lfs": "llms-from-scratch"}
VOCAB, CTX, C, L, H = 50257, 1024, 768, 12, 12  # GPT-2 124M


# ---------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def autocast(device: torch.device, dtype: torch.dtype | None):
    from gptlab.device import autocast as gptlab_autocast

    return gptlab_autocast(device, dtype)


def peak_matmul_flops(device: torch.device, dtype: torch.dtype | None, n: int, reps: int = 3) -> dict[str, float]:
    """FLOP/s of an n x n x n matmul in the benchmark's precision, per kernel torch offers for it.

    ``blas`` is ``a @ b`` (MKL on x86 CPUs, cuBLAS on CUDA). On the CPU in float32 also ``onednn``: oneDNN
    ships inside torch too and, on some CPUs (AMD with AVX-512 here), runs twice MKL's rate. The peak for
    MFU is the faster of the two, so a model that uses oneDNN is not measured against MKL's lower ceiling.
    """
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    kernels = {"blas": lambda: a @ b}
    if device.type == "cpu" and dtype is None:
        from gptlab.linear import onednn_kernels

        onednn = onednn_kernels().linear  # None where this torch lacks it
        if onednn is not None:
            kernels["onednn"] = lambda: onednn(a, b, None, "none", [], "")
    rates = {}
    for name, fn in kernels.items():
        fn()
        rates[name] = 2 * n**3 / statistics.median(timed(fn, device) for _ in range(reps))
    return rates


def read_bandwidth(device: torch.device, megabytes: int, reps: int = 3) -> float:
    """Bytes/s of summing a float32 tensor far larger than any cache: what decoding one token is bound by."""
    x = torch.ones(megabytes * 2**20 // 4, device=device)
    x.sum()
    seconds = statistics.median(timed(lambda: x.sum(), device) for _ in range(reps))
    return x.numel() * 4 / seconds


def model_flops_per_token(seq: int) -> float:
    n_matmul = VOCAB * C + L * (12 * C * C + 9 * C)  # head (tied wte) + blocks' weights and biases
    return 6 * n_matmul + 12 * L * seq * C


def weight_bytes_per_token(bytes_per_param: int) -> int:
    """Weights read to decode one token at batch 1: every matrix once (wpe contributes one row)."""
    return (VOCAB * C + L * (12 * C * C + 13 * C) + 2 * C) * bytes_per_param


# ---------------------------------------------------------------- peers

# Each peer builder returns an object with train_step(x, y), generate(ids, n, use_cache) -> ids,
# and first_token(ids): the same work done the way that library's own code does it.


class GptlabPeer:
    def __init__(self, device, dtype, compile_model: bool, train: bool = True):
        from gptlab.config import TrainConfig
        from gptlab.model import GPTConfig, GPTModel
        from gptlab.train import make_optimizer

        self.device, self.dtype = device, dtype
        self.model = GPTModel(GPTConfig.preset("gpt2-small")).to(device)
        if train:
            self.optimizer = make_optimizer(self.model, TrainConfig(lr=1e-4), device)
            self.forward = torch.compile(self.model) if compile_model else self.model

    def train_step(self, x, y):
        from gptlab.train import lm_loss

        self.model.train()
        with autocast(self.device, self.dtype):
            loss = lm_loss(self.forward, (x, y))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def generate(self, ids, n, use_cache):
        from gptlab.generate import generate

        with autocast(self.device, self.dtype):
            return generate(self.model, ids, n, use_cache=use_cache)

    def first_token(self, ids):
        from gptlab.generate import stream

        with autocast(self.device, self.dtype):
            return next(stream(self.model, ids, 1))


class HFPeer:
    def __init__(self, device, dtype, compile_model: bool, train: bool = True):
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.device, self.dtype = device, dtype
        config = GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=C, n_layer=L, n_head=H,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.model = GPT2LMHeadModel(config).to(device)  # SDPA attention is the default
        self.model.generation_config.eos_token_id = None  # random weights: always generate n tokens
        self.model.generation_config.pad_token_id = VOCAB - 1
        if train:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)  # Trainer's default
            self.forward = torch.compile(self.model) if compile_model else self.model

    def train_step(self, x, y):
        self.model.train()
        with autocast(self.device, self.dtype):
            loss = self.forward(input_ids=x, labels=x).loss  # the model shifts the labels itself
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _generate(self, ids, n, use_cache):
        mask = torch.ones_like(ids)
        with torch.no_grad(), autocast(self.device, self.dtype):
            return self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, use_cache=use_cache)

    def generate(self, ids, n, use_cache):
        return self._generate(ids, n, use_cache)

    def first_token(self, ids):
        return self._generate(ids, 1, True)


def lfs_kv_model_class():
    """llms-from-scratch's KV-cache GPT, with its causal-mask slice corrected.

    ``causal_mask[:, -num_tokens:]`` keeps the last *columns* of the (keys x keys) mask, so the first
    one-token decode step fails with a shape error; the rows of the new queries, ``[-num_tokens:, :]``,
    are what is meant. The class is rebuilt from its own source with that one slice changed.
    """
    from llms_from_scratch.kv_cache import gpt2 as kv

    source = textwrap.dedent(inspect.getsource(kv.MultiHeadAttention))
    wrong = "causal_mask[:, -num_tokens:]"
    if wrong in source:
        namespace = dict(vars(kv))
        exec(compile(source.replace(wrong, "causal_mask[-num_tokens:, :]"), kv.__file__, "exec"), namespace)
        kv.MultiHeadAttention = namespace["MultiHeadAttention"]  # TransformerBlock looks it up here
    return kv


class LFSPeer:
    CFG = {"vocab_size": VOCAB, "context_length": CTX, "emb_dim": C, "n_heads": H, "n_layers": L,
           "drop_rate": 0.0, "qkv_bias": True}

    def __init__(self, device, dtype, compile_model: bool, train: bool = True, kv: bool = True, plain: bool = True):
        from llms_from_scratch.ch04 import GPTModel

        self.device, self.dtype = device, dtype
        if plain:  # the book's chapter-4 model: training and uncached generation
            self.model = GPTModel(self.CFG).to(device)
        if kv:
            self.kv_model = lfs_kv_model_class().GPTModel(self.CFG).to(device)
            self.kv_model.cfg = self.CFG  # what its generate_text_simple expects
            self.kv_model.reset_kv_cache = lambda: setattr(self.kv_model, "current_pos", 0)
        if train:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1)  # the book's
            self.forward = torch.compile(self.model) if compile_model else self.model

    def train_step(self, x, y):
        from llms_from_scratch.ch05 import calc_loss_batch

        self.model.train()
        with autocast(self.device, self.dtype):
            loss = calc_loss_batch(x, y, self.forward, self.device)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def generate(self, ids, n, use_cache):
        with autocast(self.device, self.dtype):
            if use_cache:
                from llms_from_scratch.kv_cache.generate import generate_text_simple

                return generate_text_simple(self.kv_model, ids, n, use_cache=True)
            from llms_from_scratch.ch04 import generate_text_simple

            self.model.eval()
            return generate_text_simple(self.model, ids, n, context_size=CTX)

    def first_token(self, ids):
        return self.generate(ids, 1, use_cache=False)  # the book's loop: one forward pass, argmax


PEER_CLASSES = {"gptlab": GptlabPeer, "hf": HFPeer, "lfs": LFSPeer}


# ---------------------------------------------------------------- peak memory (one process per measurement)


def proc_status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, from /proc/self/status.

    Not ``getrusage``: Linux keeps ``ru_maxrss`` across ``execve``, so a child would report its parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (peak memory is measured on Linux only)")


def child_main(peer: str, task: str, args) -> None:
    """Runs in a fresh process: import, record RSS, do the work, print both as one JSON line."""
    device, dtype = torch.device(args.device), precision_dtype(args.precision)
    gen = torch.Generator().manual_seed(0)
    if peer == "gptlab":
        import gptlab.generate, gptlab.model, gptlab.train  # noqa: E401,F401
    elif peer == "hf":
        import transformers  # noqa: F401
        from transformers import GPT2LMHeadModel  # noqa: F401
    else:
        import llms_from_scratch.ch04, llms_from_scratch.ch05, llms_from_scratch.kv_cache.gpt2  # noqa: E401,F401
    base = proc_status_bytes("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if task == "train":
        p = PEER_CLASSES[peer](device, dtype, args.compile)
        tokens = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=gen).to(device)
        for _ in range(3):  # the optimizer state exists from the first step on; the peak comes after
            p.train_step(tokens[:, :-1], tokens[:, 1:])
    else:
        kwargs = {"plain": False} if peer == "lfs" else {}
        p = PEER_CLASSES[peer](device, dtype, False, train=False, **kwargs)
        ids = torch.randint(0, VOCAB, (1, args.prompt), generator=gen).to(device)
        p.generate(ids, args.gen_tokens, use_cache=True)
    sync(device)
    peak = proc_status_bytes("VmHWM")
    cuda_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    print(json.dumps({"base": base, "peak": peak, "cuda_peak": cuda_peak}))


def measure_rss(peer: str, task: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", peer, task, "--device", args.device, "--precision", args.precision,
           "--batch", str(args.batch), "--seq", str(args.seq), "--prompt", str(args.prompt),
           "--gen-tokens", str(args.gen_tokens)] + (["--compile"] if args.compile else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory child {peer} {task} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the run


def precision_dtype(name: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def describe_machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    if hasattr(os, "getloadavg"):
        parts.append("load average %.1f %.1f %.1f" % os.getloadavg())
    return "; ".join(parts)


def run(args) -> None:
    device, dtype = torch.device(args.device), precision_dtype(args.precision)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    prompts = {b: torch.randint(0, VOCAB, (b, args.prompt), generator=gen).to(device) for b in (1, args.gen_batch)}
    print(f"# {describe_machine(device)}", file=sys.stderr)
    print(f"# building {', '.join(args.peers)} (GPT-2 124M shape, {args.precision})", file=sys.stderr)
    peers = {name: PEER_CLASSES[name](device, dtype, args.compile) for name in args.peers}

    # Warm-up: first calls allocate, pick kernels, compile; none of it is timed.
    for name, p in peers.items():
        if "train" in args.tasks:
            for _ in range(2):
                p.train_step(x, y)
        if "gen" in args.tasks or "ttft" in args.tasks:
            p.generate(prompts[1], 4, True)
            p.generate(prompts[1], 2, False)

    gen_cases = [(b, c) for b in (1, args.gen_batch) for c in (True, False)
                 if c or b == 1 or not args.skip_nocache_batch]
    results: dict[tuple, list[float]] = defaultdict(list)
    for r in range(args.rounds):
        order = args.peers[r % len(args.peers):] + args.peers[: r % len(args.peers)]
        print(f"# round {r + 1}/{args.rounds} (order {', '.join(order)})", file=sys.stderr)
        for kernel, rate in peak_matmul_flops(device, dtype, args.matmul_n).items():
            results[f"peak_{kernel}"].append(rate)
        results["peak"].append(max(results["peak_blas"][-1], results.get("peak_onednn", [0])[-1]))
        results["bw"].append(read_bandwidth(device, args.bw_mb))
        for name in order:
            p = peers[name]
            if "train" in args.tasks:
                results[("train", name)].append(args.batch * args.seq / timed(lambda: p.train_step(x, y), device))
            if "ttft" in args.tasks:
                results[("ttft", name)].append(timed(lambda: p.first_token(prompts[1]), device))
            for b, cached in gen_cases if "gen" in args.tasks else ():
                n = args.gen_tokens if cached else args.nocache_tokens
                out = []
                bracket = b == 1 and cached  # judged against the bandwidth read just before and just after
                before = read_bandwidth(device, args.bw_mb) if bracket else None
                seconds = timed(lambda: out.append(p.generate(prompts[b], n, cached)), device)
                if bracket:
                    results[("bw_at", name)].append((before + read_bandwidth(device, args.bw_mb)) / 2)
                assert out[0].shape == (b, args.prompt + n), (name, out[0].shape)
                results[("gen", name, b, cached)].append(b * n / seconds)
            gc.collect()
        per_token = weight_bytes_per_token(4 if args.precision == "fp32" else 2)
        print("#   peak %.1f GFLOP/s, bw %.1f GB/s, train tok/s %s, batch-1 decode tok/s %s" % (
            results["peak"][-1] / 1e9, results["bw"][-1] / 1e9,
            " ".join(f"{n}={results[('train', n)][-1]:.1f}" for n in order if ('train', n) in results),
            " ".join(f"{n}={results[('gen', n, 1, True)][-1]:.1f} (bw around it {results[('bw_at', n)][-1] / 1e9:.1f}"
                     f" GB/s, {results[('gen', n, 1, True)][-1] * per_token / results[('bw_at', n)][-1]:.0%} of its limit)"
                     for n in order if ('gen', n, 1, True) in results)), file=sys.stderr)

    rss = {}
    if not args.skip_rss:
        del peers, p  # the children's memory is their own, but this process's should not crowd them
        gc.collect()
        for task in ("train", "gen"):
            for name in args.peers:
                print(f"# peak memory: {name} {task}", file=sys.stderr)
                rss[(task, name)] = measure_rss(name, task, args)

    print_table(args, results, rss, device)


def print_table(args, results, rss, device) -> None:
    med = {k: statistics.median(v) for k, v in results.items()}
    peak, bw = med["peak"], med["bw"]
    bpp = 4 if args.precision == "fp32" else 2
    limit_b1 = bw / weight_bytes_per_token(bpp)
    peers = args.peers
    others = [p for p in peers if p != "gptlab"]
    header = ["", *(PEER_NAMES[p] for p in peers)] + [f"gptlab / {PEER_NAMES[o]}" for o in others if "gptlab" in peers]
    rows = []

    def row(label, values: dict, fmt="{:.1f}", higher_better=True):
        cells = [fmt.format(values[p]) if values.get(p) is not None else "-" for p in peers]
        ratios = []
        if "gptlab" in peers:
            for o in others:
                a, b = values.get("gptlab"), values.get(o)
                ratios.append(f"{(a / b if higher_better else b / a):.2f}x" if a and b else "-")
        rows.append([label, *cells, *ratios])

    flops = model_flops_per_token(args.seq)
    if "train" in args.tasks:
        train = {p: med[("train", p)] for p in peers}
        row(f"train step, tokens/s (batch {args.batch} x {args.seq})", train)
        row("train MFU vs measured peak matmul", {p: train[p] * flops / peak for p in peers}, "{:.0%}")
        if "peak_onednn" in med:
            row("  MFU vs torch's `a @ b` (MKL) alone", {p: train[p] * flops / med["peak_blas"] for p in peers},
                "{:.0%}")
    for b in (1, args.gen_batch):
        for cached in (True, False):
            key = ("gen", b, cached)
            if not any(("gen", p, b, cached) in med for p in peers):
                continue
            n = args.gen_tokens if cached else args.nocache_tokens
            row(f"generate, batch {b}, {'KV cache' if cached else 'no cache'}, tokens/s ({n} new)",
                {p: med.get(("gen", p, b, cached)) for p in peers})
            if b == 1 and cached:
                # per run, then the median: each run is judged against the bandwidth read around it
                per_token = weight_bytes_per_token(bpp)
                row("  batch 1 cached vs bandwidth limit (median of rounds)",
                    {p: statistics.median(d / (b / per_token) for d, b in zip(results[("gen", p, 1, True)],
                                                                              results[("bw_at", p)])) for p in peers},
                    "{:.0%}")
    if "ttft" in args.tasks:
        row(f"time to first token, ms ({args.prompt}-token prompt)", {p: med[("ttft", p)] * 1e3 for p in peers},
            "{:.0f}", higher_better=False)
    if ("gen", "gptlab", args.gen_batch, True) in med:
        rows.append([f"gptlab batch {args.gen_batch} / batch 1 throughput (cached)",
                     f"{med[('gen', 'gptlab', args.gen_batch, True)] / med[('gen', 'gptlab', 1, True)]:.2f}x"]
                    + [""] * (len(header) - 2))
    for task, label in (("train", "training (3 steps)"), ("gen", "generation (batch 1, cached)")):
        if rss:
            row(f"peak RSS, {label}, MB", {p: rss[(task, p)]["peak"] / 2**20 for p in peers}, "{:.0f}", False)
            row("  of which after imports, MB", {p: (rss[(task, p)]["peak"] - rss[(task, p)]["base"]) / 2**20
                                                 for p in peers}, "{:.0f}", False)
            if device.type == "cuda":
                row(f"peak CUDA memory, {label}, MB", {p: rss[(task, p)]["cuda_peak"] / 2**20 for p in peers},
                    "{:.0f}", False)

    print(f"\n{describe_machine(device)}; {args.precision}{', torch.compile' if args.compile else ''}; "
          f"{args.rounds} rounds, medians")
    kernels = " (" + ", ".join(f"{k}: {med['peak_' + k] / 1e9:.1f}" for k in ("blas", "onednn")
                               if "peak_" + k in med) + ")"
    print(f"peak matmul ({args.matmul_n}^3): {peak / 1e9:.1f} GFLOP/s{kernels}; read bandwidth: {bw / 1e9:.1f} GB/s "
          f"-> batch-1 decode limit {limit_b1:.1f} tokens/s ({weight_bytes_per_token(bpp) / 1e6:.0f} MB of weights "
          f"per token); model FLOPs per training token: {flops / 1e6:.0f} M\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for r in rows:
        print("| " + " | ".join(r + [""] * (len(header) - len(r))) + " |")



def positive_int(text: str) -> int:
    """argparse type: a whole number above zero, or a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="autocast dtype for every peer (bf16/fp16 have no fast path on most CPUs)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each peer's model for training")
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="2 rounds, 50 new tokens, 20 without cache, batch 2 x 128 training: a few minutes")
    ap.add_argument("--peers", nargs="+", choices=PEERS, default=PEERS)
    ap.add_argument("--batch", type=positive_int, default=4, help="training batch size")
    ap.add_argument("--seq", type=positive_int, default=256, help="training sequence length")
    ap.add_argument("--prompt", type=positive_int, default=16, help="prompt tokens for generation")
    ap.add_argument("--gen-tokens", type=positive_int, default=200, help="new tokens with the KV cache")
    ap.add_argument("--nocache-tokens", type=positive_int, default=200, help="new tokens without a cache")
    ap.add_argument("--gen-batch", type=positive_int, default=8)
    ap.add_argument("--skip-nocache-batch", action="store_true", help="no uncached generation at --gen-batch")
    ap.add_argument("--tasks", nargs="+", choices=["train", "gen", "ttft"], default=["train", "gen", "ttft"],
                    help="timed tasks (peak memory is separate: --skip-rss)")
    ap.add_argument("--skip-rss", action="store_true", help="no peak-memory subprocesses")
    ap.add_argument("--matmul-n", type=positive_int, default=2048)
    ap.add_argument("--bw-mb", type=positive_int, default=512)
    ap.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="keep freed memory mapped in the timing process (glibc mallopt, "
                         "gptlab.device.keep_freed_memory_mapped), as the gptlab command does for training; "
                         "train() alone does not. It applies to every peer in the process alike")
    ap.add_argument("--child", nargs=2, metavar=("PEER", "TASK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:  # new defaults; what the command line gives still wins
        ap.set_defaults(rounds=2, gen_tokens=50, nocache_tokens=20, batch=2, seq=128)
        args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from gptlab.device import keep_freed_memory_mapped

        keep_freed_memory_mapped()
    if args.child:
        child_main(*args.child, args)
    else:
        run(args)


if __name__ == "__main__":
    main()
