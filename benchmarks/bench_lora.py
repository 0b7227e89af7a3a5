"""What LoRA saves against full fine-tuning and the book's last-block recipe: step time, memory, checkpoints.

At the GPT-2 124M shape (the ``gpt2-small`` preset; random weights, which cost the same as trained ones),
one fine-tuning step (forward, loss, backward, gradient clipping, fused AdamW, as ``gptlab.train`` does it)
for each way of choosing what trains:

    full        ``select_trainable(model, "all")``: every weight
    last-block  ``select_trainable(model, "last-block")``: the book's recipe (last block + final norm + head)
    lora        ``add_lora(model, LoRAConfig())``: rank 8, alpha 16, on every block projection; the base frozen

each with the language-model head (next-token loss on ``--batch`` x ``--seq`` tokens) and, with ``--heads lm
cls``, with a 2-class head (``add_classifier_head``; the loss read at the last token, as
``finetune-classifier``). Note: the LM head is tied to the token embedding, so "last-block" with the LM head
also trains ``wte`` (38.6M parameters), and its gradient has to flow back through every block to reach it.

    python benchmarks/bench_lora.py                 # 2 x 256 tokens, LM and 2-class heads, 3 rounds
    python benchmarks/bench_lora.py --quick         # 1 x 128 tokens, LM head only, 2 rounds

Each configuration lives in its own worker process for the whole run, so that its peak resident set size
(RSS) is its own; the main process drives them in rounds, in an order that rotates from round to round, so
that a burst of load elsewhere on the machine hits all of them alike. Per configuration:

Every worker calls ``gptlab.device.keep_freed_memory_mapped`` first, as the ``gptlab`` training commands do
(``--malloc-default`` leaves glibc's malloc alone: each step then page-faults its big blocks again).

- step: median seconds of one optimizer step over all rounds (after one warm-up step);
- peak RSS: the worker's peak after its training steps (``ru_maxrss``), and that minus its RSS right after
  its imports (the part the model and the training cost); below the tables, the RSS the built model added;
- trainable parameters; gradient bytes (4 per trainable parameter, alive from backward to the step);
- optimizer state: the bytes of AdamW's ``exp_avg`` and ``exp_avg_sq`` after a step;
- checkpoint: the files a real checkpoint writes (``gptlab.run.model_files`` + ``write_run_files``, with
  ``train_state.pt`` holding what ``gptlab.train`` puts in it: the stored weights and the optimizer's
  state): ``model.safetensors`` (or, for LoRA, ``adapter.safetensors``) and ``train_state.pt``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ["full", "last-block", "lora"]
HEADS = ["lm", "cls"]


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------- worker (one configuration)


def worker(config: str, head: str, batch: int, seq: int, threads: int, keep_freed: bool) -> None:
    """Build one configuration, then answer the driver's commands on stdin, one JSON line each."""
    import torch

    torch.set_num_threads(threads)
    if keep_freed:  # what the gptlab training commands do (gptlab.cli.prepare_process)
        from gptlab.device import keep_freed_memory_mapped

        keep_freed_memory_mapped()
    from gptlab.config import LoRAConfig, TrainConfig
    from gptlab.finetune.classifier import classification_loss
    from gptlab.model import GPTConfig, GPTModel
    from gptlab.run import STATE_FILE, model_files, write_run_files, model_state_dict
    from gptlab.surgery import add_classifier_head, add_lora, select_trainable
    from gptlab.tokenizer import get_tokenizer
    from gptlab.train import make_optimizer

    base_rss = rss_mb()
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset("gpt2-small"))
    if head == "cls":
        add_classifier_head(model, 2)
    weights_rss = rss_mb() - base_rss
    if config == "lora":
        add_lora(model, LoRAConfig(rank=8, alpha=16, dropout=0.0),
                 base_ref={"source": "random gpt2-small", "fingerprint": "sha256:none"})
    else:
        select_trainable(model, "all" if config == "full" else "last-block")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    device = torch.device("cpu")
    train_config = TrainConfig(lr=1e-4)
    optimizer = make_optimizer(model, train_config, device)
    model.train()

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=g)
    if head == "lm":
        batch_data = (ids[:, :-1], ids[:, 1:])
        loss_fn = lambda: model(*batch_data)  # noqa: E731  (lm_loss: the fused head + cross-entropy)
    else:
        batch_data = (ids[:, :-1], torch.full((batch,), seq), torch.randint(0, 2, (batch,), generator=g))
        loss_fn = lambda: classification_loss(model, batch_data)  # noqa: E731

    def step() -> float:
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # warm-up: allocates the optimizer's state, and the first call of every kernel
    reply = lambda obj: print(json.dumps(obj), flush=True)  # noqa: E731
    reply({"ready": True})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "step":
            reply({"times": [step() for _ in range(int(cmd[1]))]})
        elif cmd[0] == "report":
            train_peak = peak_mb()
            opt_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                            for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))
            stored = model_state_dict(model)
            stored_params = sum(t.numel() for t in stored.values())
            # What gptlab.train's checkpoint writes: model_files + train_state.pt (state, model, optimizer, ...)
            workdir = Path(tempfile.mkdtemp(prefix="bench_lora.", dir=cmd[1] if len(cmd) > 1 else None))
            try:
                files = model_files(model, get_tokenizer("gpt2"), {"stage": "bench"}, step=1)
                payload = {"state": {"step": 1}, "model": {k: v.cpu() for k, v in stored.items()},
                           "optimizer": optimizer.state_dict()}
                files[STATE_FILE] = lambda path: torch.save(payload, path)
                t0 = time.perf_counter()
                write_run_files(workdir / "run", files)
                write_seconds = time.perf_counter() - t0
                sizes = {p.name: p.stat().st_size for p in (workdir / "run").iterdir() if p.is_file()}
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            reply({"base_rss_mb": base_rss, "weights_rss_mb": weights_rss, "train_peak_mb": train_peak,
                   "ckpt_peak_mb": peak_mb(), "trainable": trainable, "grad_bytes": trainable * 4,
                   "opt_bytes": opt_bytes, "stored_params": stored_params, "files": sizes,
                   "write_seconds": write_seconds})
        elif cmd[0] == "quit":
            return


# ---------------------------------------------------------------- driver


class Worker:
    def __init__(self, config: str, head: str, args) -> None:
        self.name = f"{config} ({head})"
        self.config, self.head = config, head
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", config, head, "--batch", str(args.batch), "--seq", str(args.seq),
             "--threads", str(args.threads)] + ([] if args.keep_freed_memory else ["--malloc-default"]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.times: list[float] = []

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            self.proc.wait()


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = open("/proc/cpuinfo").read()
                simd = "AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
                return f"{name}, {os.cpu_count()} cores, {simd}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}" if nbytes < 10 * 2**20 else f"{nbytes / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 x 128 tokens, the LM head only, 2 rounds")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 2; --quick 1)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256; --quick 128)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over every configuration (default 3)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per configuration per round (default 1)")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=None, help="default: lm cls (--quick: lm)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=CONFIGS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every worker (default 1)")
    parser.add_argument("--malloc-default", dest="keep_freed_memory", action="store_false",
                        help="leave glibc's malloc as it is (default: keep freed memory mapped, as the gptlab "
                             "training commands do: gptlab.device.keep_freed_memory_mapped)")
    parser.add_argument("--workdir", default=None, help="where the checkpoints are written (default: temp dir)")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "HEAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or (1 if args.quick else 2)
    args.seq = args.seq or (128 if args.quick else 256)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.heads = args.heads or (["lm"] if args.quick else HEADS)

    if args.worker:
        worker(*args.worker, args.batch, args.seq, args.threads, args.keep_freed_memory)
        return

    print(f"CPU: {cpu_name()}; torch threads per worker: {args.threads}; GPT-2 124M shape, float32, "
          f"batch {args.batch} x {args.seq} tokens, {args.rounds} rounds x {args.steps} steps, "
          f"{'freed memory kept mapped (as gptlab training)' if args.keep_freed_memory else 'default malloc'}",
          flush=True)
    workers = [Worker(c, h, args) for h in args.heads for c in args.configs]
    try:
        for w in workers:  # all build and warm up at once; nothing is timed until every one is ready
            w.read()
        for r in range(args.rounds):
            order = workers[r % len(workers):] + workers[:r % len(workers)]
            for w in order:
                w.times += w.ask(f"step {args.steps}")["times"]
            print(f"round {r + 1}: " + ", ".join(f"{w.name} {statistics.median(w.times):.2f}s" for w in workers),
                  flush=True)
        reports = {w.name: w.ask("report" + (f" {args.workdir}" if args.workdir else "")) for w in workers}
    finally:
        for w in workers:
            w.close()

    print()
    print("| head | configuration | step (s) | trainable params | grads MB | AdamW state MB | weights file MB "
          "| train_state.pt MB | peak RSS MB | above imports MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w in workers:
        r = reports[w.name]
        weights_file = r["files"].get("adapter.safetensors", r["files"].get("model.safetensors", 0))
        print(f"| {w.head} | {w.config} | {statistics.median(w.times):.2f} | {r['trainable'] / 1e6:,.2f}M "
              f"| {mb(r['grad_bytes'])} | {mb(r['opt_bytes'])} | {mb(weights_file)} "
              f"| {mb(r['files']['train_state.pt'])} "
              f"| {r['train_peak_mb']:,.0f} | {r['train_peak_mb'] - r['base_rss_mb']:,.0f} |")
    print()
    print("Ratios against full fine-tuning with the same head (lower is less):")
    print()
    print("| head | configuration | step time | trainable | AdamW state | weights file | train_state.pt "
          "| peak RSS above imports |")
    print("|---|---|---|---|---|---|---|---|")
    for w in workers:
        full = next((v for v in workers if v.head == w.head and v.config == "full"), None)
        if full is None or w is full:
            continue
        r, f = reports[w.name], reports[full.name]
        wf = lambda rep: rep["files"].get("adapter.safetensors", rep["files"].get("model.safetensors", 0))  # noqa: E731
        print(f"| {w.head} | {w.config} | {statistics.median(w.times) / statistics.median(full.times):.2f} "
              f"| {r['trainable'] / f['trainable']:.4f} | {r['opt_bytes'] / f['opt_bytes']:.4f} "
              f"| {wf(r) / wf(f):.4f} | {r['files']['train_state.pt'] / f['files']['train_state.pt']:.4f} "
              f"| {(r['train_peak_mb'] - r['base_rss_mb']) / (f['train_peak_mb'] - f['base_rss_mb']):.2f} |")
    print()
    for w in workers:
        r = reports[w.name]
        print(f"{w.name}: RSS after imports {r['base_rss_mb']:,.0f} MB, the built model added "
              f"{r['weights_rss_mb']:,.0f} MB, peak while writing the checkpoint {r['ckpt_peak_mb']:,.0f} MB "
              f"(written in {r['write_seconds']:.1f} s); step times {', '.join(f'{t:.2f}' for t in w.times)}")


if __name__ == "__main__":
    main()
