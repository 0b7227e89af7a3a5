"""Load test for `gptlab serve`: N concurrent streaming clients for a bounded time against 127.0.0.1.

    python benchmarks/bench_serve_load.py                       # random-weight `demo` model, 8 clients, 15 s
    python benchmarks/bench_serve_load.py --model runs/demo --clients 16 --duration 30
    python benchmarks/bench_serve_load.py --url http://127.0.0.1:8000 --api-key KEY   # a server already running

Each client loops: POST /v1/completions with ``stream: true`` (and ``stream_options.include_usage``), reading
the server-sent events to the end. Per request it records the time to the first token (TTFT), the decode
rate (completion tokens / time from the first token to the end) and whether the response completed: a
finish_reason, a usage chunk and the final ``[DONE]``. Reported: requests/s, aggregate tokens/s, TTFT and
tokens/s percentiles, and how many responses completed (the script exits 1 if any did not).

Unless ``--url`` is given the server is started as a subprocess (`gptlab serve`), once per ``--max-active``
value, so the same load compares the worker's continuous batch (8: up to 8 rows decoded together) with a
plain queue (1: one request at a time) in one run, as ratios less sensitive to a busy machine. ``--threads``
does the same for torch's thread count in the server (`gptlab serve --threads`):

    python benchmarks/bench_serve_load.py --clients 16 --duration 60 --max-active 8 --threads 2,1

``--goals`` measures continuous batching against its goals on one server (``--max-active``'s first value):
rounds of one client alone, then ``--clients`` at once, alternated (A, B, A, B: medians, less sensitive to a
busy machine), with ``/health`` polled throughout; it reports aggregate tokens/s loaded vs alone, TTFT p50
loaded vs idle, failed or truncated responses, the slowest ``/health`` and the server's peak RSS:

    python benchmarks/bench_serve_load.py --goals --preset gpt2-small --clients 8 --duration 20 --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = ["Every effort moves you", "I had always thought Jack Gisburn", "The quick brown fox", "Once upon a time",
           "In the beginning", "It was a dark and stormy night", "To be, or not to be", "Call me Ishmael"]


@dataclass
class RequestResult:
    started: float
    ttft: float | None = None
    elapsed: float = 0.0
    completion_tokens: int = 0
    completed: bool = False
    error: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        decode = self.elapsed - (self.ttft or 0.0)
        return self.completion_tokens / decode if self.ttft is not None and decode > 0 else None


@dataclass
class LoadReport:
    label: str
    duration: float
    results: list[RequestResult] = field(default_factory=list)

    def summary(self) -> dict:
        done = [r for r in self.results if r.completed]
        ttft = [r.ttft for r in done if r.ttft is not None]
        rates = [r.tokens_per_s for r in done if r.tokens_per_s is not None]
        tokens = sum(r.completion_tokens for r in done)
        return {"label": self.label, "requests": len(self.results), "completed": len(done),
                "failed": len(self.results) - len(done), "wall_s": self.duration,
                "requests_per_s": len(done) / self.duration, "tokens_per_s": tokens / self.duration,
                "ttft_s": percentiles(ttft), "request_tokens_per_s": percentiles(rates),
                "errors": sorted({r.error for r in self.results if r.error})[:5]}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98], "max": values[-1]}


async def one_request(http: httpx.AsyncClient, url: str, headers: dict, body: dict) -> RequestResult:
    result = RequestResult(started=time.perf_counter())
    finish = usage = None
    try:
        async with http.stream("POST", url + "/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    result.completed = finish is not None and usage is not None
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = event["error"]["message"]
                    break
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    if choice.get("text") and result.ttft is None:
                        result.ttft = time.perf_counter() - result.started
                    finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    result.elapsed = time.perf_counter() - result.started
    result.completion_tokens = usage["completion_tokens"] if usage else 0
    if not result.completed and result.error is None:
        result.error = "stream ended without finish_reason, usage and [DONE]"
    return result


async def run_load(url: str, api_key: str | None, clients: int, duration: float, max_tokens: int,
                   label: str, stagger: float = 0.0) -> LoadReport:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report = LoadReport(label, duration)
    deadline = time.perf_counter() + duration

    async def client(i: int, http: httpx.AsyncClient) -> None:
        n = 0
        await asyncio.sleep(stagger * i / clients)  # 0: all start at once, and equal requests stay in lockstep
        while time.perf_counter() < deadline:  # a request started before the deadline runs to its end
            body = {"prompt": PROMPTS[(i + n) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8,
                    "seed": 1000 * i + n, "stream": True, "stream_options": {"include_usage": True}}
            report.results.append(await one_request(http, url, headers, body))
            n += 1

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        report.duration = time.perf_counter() - start
    return report


async def poll_health(url: str, headers: dict, stop: asyncio.Event, every: float = 0.1) -> list[float]:
    """Seconds each ``GET /health`` took until ``stop``; a failed one counts as infinitely slow."""
    times = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                ok = (await http.get(url + "/health", headers=headers)).status_code == 200
            except httpx.HTTPError:
                ok = False
            times.append(time.perf_counter() - started if ok else float("inf"))
            try:
                await asyncio.wait_for(stop.wait(), timeout=every)
            except asyncio.TimeoutError:
                pass
    return times


async def load_with_health(url: str, api_key: str | None, clients: int, duration: float, max_tokens: int,
                           label: str, stagger: float = 0.0) -> tuple[LoadReport, list[float]]:
    stop = asyncio.Event()
    health = asyncio.create_task(poll_health(url, {"Authorization": f"Bearer {api_key}"} if api_key else {}, stop))
    report = await run_load(url, api_key, clients, duration, max_tokens, label, stagger)
    stop.set()
    return report, await health


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident memory (Linux VmHWM), MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_goals(srv: "ServerProcess", args) -> int:
    """Alternate one client alone and ``args.clients`` at once on one server; report against the goals."""
    alone, loaded, health = [], [], []
    for r in range(args.rounds):
        for clients, into in ((1, alone), (args.clients, loaded)):
            report, times = asyncio.run(load_with_health(srv.url, None, clients, args.duration, args.max_tokens,
                                                         f"round {r + 1}, {clients} client(s)", args.stagger))
            into.append(report.summary())
            health += times
            show(into[-1])
    median = statistics.median
    rate = lambda runs: median(s["tokens_per_s"] for s in runs)  # noqa: E731
    ttft = lambda runs: median(s["ttft_s"]["p50"] for s in runs if s["ttft_s"])  # noqa: E731
    failed = sum(s["failed"] for s in alone + loaded)
    speedup, ttft_ratio = rate(loaded) / rate(alone), ttft(loaded) / ttft(alone)
    slowest = max(health) if health else float("nan")
    rss = peak_rss_mib(srv.proc.pid)
    print(f"\n== goals ({args.rounds} rounds of {args.duration:g} s each, medians; clients spread over "
          f"{args.stagger:g} s)")
    print(f"  aggregate tokens/s  {args.clients} clients {rate(loaded):.1f} vs 1 client {rate(alone):.1f}: "
          f"x{speedup:.2f}  (goal >= 4)")
    print(f"  TTFT p50            loaded {ttft(loaded) * 1000:.0f} ms vs idle {ttft(alone) * 1000:.0f} ms: "
          f"x{ttft_ratio:.2f}  (goal <= 3)")
    print(f"  failed or truncated {failed} of {sum(s['requests'] for s in alone + loaded)}  (goal 0)")
    print(f"  /health             {len(health)} polls, p99 {percentiles(health).get('p99', float('nan')) * 1000:.1f} ms, "
          f"slowest {slowest * 1000:.1f} ms  (goal < 100)")
    print(f"  server peak RSS     {rss:.0f} MiB" if rss is not None else "  server peak RSS     unknown")
    if args.json:
        Path(args.json).write_text(json.dumps({"alone": alone, "loaded": loaded, "speedup": speedup,
                                               "ttft_ratio": ttft_ratio, "failed": failed, "health_max_s": slowest,
                                               "peak_rss_mib": rss}, indent=2) + "\n")
    return 1 if failed else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_random_run(preset: str, directory: Path) -> Path:
    import torch

    from gptlab.model import GPTConfig, GPTModel
    from gptlab.run import save_model
    from gptlab.tokenizer import GPT2Tokenizer

    torch.manual_seed(0)
    run = directory / f"random-{preset}"
    save_model(run, GPTModel(GPTConfig.preset(preset)), GPT2Tokenizer())
    return run


class ServerProcess:
    """`gptlab serve` in a subprocess, so the load generator does not share its interpreter (and GIL)."""

    def __init__(self, model: str, max_active: int, max_queue: int, device: str, threads: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", "gptlab.cli", "serve", "--model", model, "--port", str(self.port),
                   "--max-active", str(max_active), "--max-queue", str(max_queue), "--device", device]
        if threads is not None:
            command += ["--threads", str(threads)]
        # OMP_NUM_THREADS would cap torch's pool under --threads: the server gets the command's setting alone
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**env, "GPTLAB_API_KEY": ""})

    def __enter__(self) -> "ServerProcess":
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"gptlab serve exited:\n{self.log.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("gptlab serve did not start within 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def show(summary: dict) -> None:
    def fmt(p: dict, unit: str, scale: float = 1.0) -> str:
        return " ".join(f"{k} {v * scale:.1f}{unit}" for k, v in p.items()) if p else "-"

    print(f"\n== {summary['label']}")
    print(f"  requests   {summary['requests']} in {summary['wall_s']:.1f} s: {summary['completed']} completed, "
          f"{summary['failed']} failed")
    print(f"  throughput {summary['requests_per_s']:.2f} requests/s, {summary['tokens_per_s']:.1f} tokens/s")
    print(f"  TTFT       {fmt(summary['ttft_s'], ' ms', 1000)}")
    print(f"  tokens/s   {fmt(summary['request_tokens_per_s'], '')}  (per request, after its first token)")
    for error in summary["errors"]:
        print(f"  error: {error}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model source to serve (default: a random-weight --preset run)")
    p.add_argument("--preset", default="demo", help="size of the random model when no --model (default: %(default)s)")
    p.add_argument("--url", default=None, help="load an already running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("GPTLAB_API_KEY"), help="for --url (default: $GPTLAB_API_KEY)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds each load runs (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=48, help="new tokens per request (default: %(default)s)")
    p.add_argument("--max-active", default="1,8", help="worker settings to compare, comma-separated (default: %(default)s)")
    p.add_argument("--threads", default=None,
                   help="server torch threads to compare, comma-separated (default: the server's own default)")
    p.add_argument("--device", default="cpu", help="server device (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the summaries to this file")
    p.add_argument("--goals", action="store_true",
                   help="one server: 1 client and --clients alternated, against the batching goals")
    p.add_argument("--rounds", type=int, default=3, help="--goals: rounds of (1 client, --clients) (default: %(default)s)")
    p.add_argument("--stagger", type=float, default=0.0,
                   help="--goals: seconds over which the clients' first requests are spread (default: %(default)s, "
                        "all at once: equal requests then arrive and finish in lockstep, the worst case for TTFT)")
    args = p.parse_args(argv)
    if args.goals:
        with tempfile.TemporaryDirectory() as tmp:
            model = args.model or str(make_random_run(args.preset, Path(tmp)))
            threads = int(args.threads.split(",")[0]) if args.threads else None
            max_active = int(args.max_active.split(",")[-1])
            with ServerProcess(model, max_active, max_queue=max(64, 2 * args.clients), device=args.device,
                               threads=threads) as srv:
                return run_goals(srv, args)

    summaries = []
    if args.url:
        summaries.append(asyncio.run(run_load(args.url, args.api_key, args.clients, args.duration, args.max_tokens,
                                              f"{args.url}, {args.clients} clients")).summary())
        show(summaries[-1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = args.model or str(make_random_run(args.preset, Path(tmp)))
            thread_counts = [int(v) for v in args.threads.split(",")] if args.threads else [None]
            for threads in thread_counts:
                for max_active in [int(v) for v in args.max_active.split(",")]:
                    with ServerProcess(model, max_active, max_queue=max(64, 2 * args.clients), device=args.device,
                                       threads=threads) as srv:
                        label = f"{Path(model).name}, {args.clients} clients, max_active={max_active}"
                        if threads is not None:
                            label += f", threads={threads}"
                        summaries.append(asyncio.run(run_load(srv.url, None, args.clients, args.duration,
                                                              args.max_tokens, label)).summary())
                    show(summaries[-1])
        if len(summaries) > 1:
            base = summaries[0]
            for other in summaries[1:]:
                ratio = lambda key, sub: (other[key].get(sub, float("nan")) / base[key][sub]  # noqa: E731
                                          if base[key].get(sub) else float("nan"))
                print(f"\n{other['label']} vs {base['label']}: requests/s x"
                      f"{other['requests_per_s'] / max(base['requests_per_s'], 1e-9):.2f}, "
                      f"TTFT p50 x{ratio('ttft_s', 'p50'):.2f}, TTFT p90 x{ratio('ttft_s', 'p90'):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2) + "\n")
    failed = sum(s["failed"] for s in summaries)
    print(f"\nevery response completed: {'yes' if failed == 0 else f'NO ({failed} did not)'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
