"""Decoding speed: speculative decoding, prompt lookup and beam search against plain cached decoding.

Everything runs here, on the CPU, with models this script trains itself (each for a fixed time, then
stopped the way Ctrl-C stops `gptlab pretrain`: a checkpoint, then out):

    tokenizer  byte-level BPE, 4,096 tokens, learnt from tinyshakespeare and the instruction data. A small
               vocabulary keeps the output head cheap, and so checking k + 1 guesses costs about one step
               (with GPT-2's 50,257 the head's k + 1 rows alone cost more than a draft saves);
    target     the `mini` preset (4 x 192, context 128), pretrained on tinyshakespeare;
    draft      `tiny` widths (2 x 32) with the target's context, pretrained on the same text;
    instruct   the target fine-tuned (Alpaca layout) on the 126 records of data/instruction-data.json whose
               instruction says rewrite/edit/correct and that have an input, for prompt lookup: a few passes
               over them, so that it answers them much as the references do, which copy most of their input.

(On two shared CPU cores a `small` target, 12M parameters, sees ~30k tokens in three minutes: too few to
learn anything a draft could predict; `mini` sees ~5x more. ``--target-preset`` / ``--draft-preset`` change them.)
The per-forward costs are measured too: a draft step c and a check of k + 1 rows v, in target steps, give the
expected speedup (1 - a^(k+1)) / ((1 - a) (k c + v)) at acceptance a (Leviathan et al.), printed beside the
measured one.

Then, prompt by prompt, each way of decoding runs in a rotating order (so a burst of load elsewhere hits all
alike) and the table reports summed times, the speedup over plain cached decoding (same model, same
tokens: greedy speculative and prompt-lookup output is checked identical) and the fraction of guesses kept:

    speculative   target + draft on continuations of held-out tinyshakespeare, greedy and sampled;
    prompt lookup the instruct model on those records (answers that copy their input), and the target on
                  tinyshakespeare (which repeats only what the model itself repeats);
    beam search   num_beams beams with the KV cache (one batched pass per step, cache rows reordered)
                  against num_beams separate greedy decodes.

    python benchmarks/bench_decoding.py                  # trains (6.5 minutes), then measures (under 1)
    python benchmarks/bench_decoding.py --reuse          # measures again with the models already trained
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
INSTRUCTIONS = REPO / "data" / "instruction-data.json"
COPYING = re.compile(r"\b(rewrite|edit|correct)", re.IGNORECASE)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ---- training, each stage for a fixed time --------------------------------------------------------

def for_seconds(seconds: float, work):
    """Run ``work()``, asking it to stop (SIGINT, which gptlab's training loop turns into checkpoint-and-exit)
    after ``seconds``."""
    timer = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        return work()
    finally:
        timer.cancel()


def timed_training(lr: float, batch_size: int):
    from gptlab.config import TrainConfig

    # no schedule to finish (the clock stops it): constant lr after a warmup; no evaluation until the stop
    return TrainConfig(max_steps=10**7, batch_size=batch_size, lr=lr, min_lr_ratio=1.0, warmup_steps=30,
                       eval_interval=10**7, eval_batches=4, log_interval=25)


def train_models(out: Path, args) -> None:
    from gptlab.bpe import train_bpe
    from gptlab.finetune.instruct import finetune_instruct
    from gptlab.config import PRESETS
    from gptlab.pretrain import pretrain

    records = json.loads(INSTRUCTIONS.read_text())
    started = time.perf_counter()
    text = [SHAKESPEARE.read_text(), *(" ".join(r.values()) for r in records)]
    train_bpe(text, 4096).save(out / "tokenizer")
    print(f"tokenizer: {time.perf_counter() - started:.0f} s")
    context = PRESETS[args.target_preset].context_length
    for name, preset, seconds, lr in (("target", args.target_preset, args.target_seconds, 2e-3),
                                      ("draft", args.draft_preset, args.draft_seconds, 3e-3)):
        started = time.perf_counter()
        result = for_seconds(seconds, lambda: pretrain(
            SHAKESPEARE, out / name, timed_training(lr, 8), preset=preset, tokenizer=str(out / "tokenizer"),
            context_length=context, val_fraction=0.1, sample_prompt=None, overwrite=True, progress=False))
        print(f"{name}: {preset}, {result.step} steps in {time.perf_counter() - started:.0f} s, "
              f"train loss {result.train_loss:.2f}")
    copying = [r for r in records if COPYING.search(r["instruction"]) and r["input"]]
    (out / "copying.json").write_text(json.dumps(copying))
    started = time.perf_counter()
    result = for_seconds(args.instruct_seconds, lambda: finetune_instruct(
        out / "copying.json", out / "instruct", timed_training(2e-3, 8), init=str(out / "target"),
        train_fraction=0.9, test_fraction=0.05, mask_prompt=True, overwrite=True, progress=False))
    print(f"instruct: {result.step} steps in {time.perf_counter() - started:.0f} s, train loss {result.train_loss:.2f}")


# ---- measuring --------------------------------------------------------------------------------------

class Timings:
    """Seconds, new tokens and guesses per way of decoding, summed over prompts."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def add(self, name: str, seconds: float, tokens: int, stats=None) -> None:
        row = self.rows.setdefault(name, {"seconds": 0.0, "tokens": 0, "proposed": 0, "accepted": 0})
        row["seconds"] += seconds
        row["tokens"] += tokens
        if stats is not None:
            row["proposed"] += stats.proposed
            row["accepted"] += stats.accepted

    def table(self, baseline: str, title: str) -> str:
        base = self.rows[baseline]
        lines = [f"**{title}**", "", "| decoding | tokens | seconds | tokens/s | speedup | guesses kept |",
                 "|---|---|---|---|---|---|"]
        for name, row in self.rows.items():
            kept = f"{row['accepted'] / row['proposed']:.0%} of {row['proposed']}" if row["proposed"] else ""
            speed, base_speed = row["tokens"] / row["seconds"], base["tokens"] / base["seconds"]
            lines.append(f"| {name} | {row['tokens']} | {row['seconds']:.1f} | {speed:.1f} | "
                         f"{speed / base_speed:.2f}x | {kept} |")
        return "\n".join(lines)


def run_rotating(ways: dict, prompts: list, timings: Timings, check_same: bool) -> None:
    """Each prompt through every way, the order rotating by one per prompt; greedy outputs must agree."""
    from gptlab.speculative import SpeculationStats

    names = list(ways)
    for i, prompt in enumerate(prompts):
        outputs = {}
        for name in names[i % len(names):] + names[: i % len(names)]:
            stats = SpeculationStats()
            started = time.perf_counter()
            tokens = ways[name](prompt, stats)
            timings.add(name, time.perf_counter() - started, len(tokens), stats)
            outputs[name] = tokens
        if check_same:
            first = outputs[names[0]]
            for name, tokens in outputs.items():
                assert tokens == first, f"{name} gave other tokens than {names[0]} on prompt {i}"


def shakespeare_prompts(tokenizer, n: int, length: int) -> list[torch.Tensor]:
    """``n`` windows of ``length`` tokens from the held-out last tenth of tinyshakespeare."""
    text = SHAKESPEARE.read_text()
    ids = tokenizer.encode(text[int(len(text) * 0.9):])
    step = (len(ids) - length) // n
    return [torch.tensor([ids[i * step : i * step + length]]) for i in range(n)]


def forward_costs(target, draft, k: int, rounds: int = 40) -> tuple[float, float, float]:
    """Seconds of one target step (1 row), and in target steps: one draft step (c) and one check of k + 1 rows (v);
    each after a 32-token prefill, interleaved, median of ``rounds``."""
    import statistics

    from gptlab.linear import packed_weights
    from gptlab.model import KVCache

    def step(model, rows: int):
        cache = KVCache(model.config, 1, 32 + rows, "cpu", torch.float32)
        model(torch.zeros(1, 32, dtype=torch.long), cache=cache, last_only=True)
        ids = torch.zeros(1, rows, dtype=torch.long)

        def run() -> float:
            cache.pos = 32
            started = time.perf_counter()
            model(ids, cache=cache, last_only=rows == 1)
            return time.perf_counter() - started
        return run

    times: dict[str, list[float]] = {"target": [], "draft": [], "check": []}
    with torch.no_grad(), packed_weights(target, k + 1):
        runs = {"target": step(target, 1), "draft": step(draft, 1), "check": step(target, k + 1)}
        for _ in range(rounds):
            for name, run in runs.items():
                times[name].append(run())
    t, d, v = (statistics.median(times[name]) for name in ("target", "draft", "check"))
    return t, d / t, v / t


def expected_speedup(acceptance: float, k: int, c: float, v: float) -> float:
    """Leviathan et al.'s tokens per check over its cost in target steps (i.i.d. acceptance ``acceptance``)."""
    tokens = (1 - acceptance ** (k + 1)) / (1 - acceptance) if acceptance < 1 else k + 1
    return tokens / (k * c + v)


def projected_costs(vocab_size: int, draft_preset: str, k: int = 3) -> str:
    """c and v for wider targets (random weights: costs only), and the speedup they would give at a few
    acceptance rates: where a draft starts to pay on this machine."""
    from gptlab.config import GPTConfig
    from gptlab.model import GPTModel

    lines = [f"**projected: the same costs for wider targets** (random weights, vocabulary {vocab_size}, context 128, "
             f"draft `{draft_preset}`, k={k}; speedup from the formula, not measured)", "",
             "| target | one step | c | v | at 50% kept | at 70% | at 90% |", "|---|---|---|---|---|---|---|"]
    draft = GPTModel(GPTConfig.preset(draft_preset, vocab_size=vocab_size, context_length=128)).eval()
    for name in ("mini", "small", "gpt2-small"):
        config = GPTConfig.preset(name, vocab_size=vocab_size, context_length=128)
        step, c, v = forward_costs(GPTModel(config).eval(), draft, k, rounds=20)
        at = " | ".join(f"{expected_speedup(a, k, c, v):.2f}x" for a in (0.5, 0.7, 0.9))
        lines.append(f"| `{name}` ({config.n_layer} x {config.n_embd}) | {step * 1e3:.1f} ms | {c:.2f} | {v:.2f} "
                     f"| {at} |")
    return "\n".join(lines)


def measure(out: Path, args) -> str:
    import gptlab
    from gptlab.generate import generate, generate_text
    from gptlab.instruction_data import load_instruction_records
    from gptlab.prompts import get_prompt_style

    target, tok = gptlab.load(out / "target")
    draft, _ = gptlab.load(out / "draft")
    instruct, _ = gptlab.load(out / "instruct")
    sections = []
    new = args.new_tokens
    t_name, d_name = f"`{args.target_preset}`", f"`{args.draft_preset}`"

    def tokens_of(model, **options):
        if "draft" in options or "prompt_lookup" in options:
            options["speculation"] = None  # filled per call below

        def run(ids, stats):
            settings = {**options, "speculation": stats} if "speculation" in options else options
            return generate(model, ids, new, **settings)[0, ids.size(1):].tolist()
        return run

    # prompt + new tokens stay inside the context: past it every step recomputes and nothing is speculated
    prompt_length = min(32, target.config.context_length - new)
    prompts = shakespeare_prompts(tok, args.prompts, prompt_length)
    timings = Timings()
    ways = {"plain (KV cache)": tokens_of(target)}
    for k in args.draft_tokens:
        ways[f"draft {d_name}, k={k}"] = tokens_of(target, draft=draft, draft_tokens=k)
    ways["prompt lookup n=3, k=4"] = tokens_of(target, prompt_lookup=3, draft_tokens=4)
    run_rotating(ways, prompts, timings, check_same=True)
    table = timings.table("plain (KV cache)", f"target {t_name} with draft {d_name} on held-out tinyshakespeare, "
                                              f"greedy, {len(prompts)} prompts of {prompt_length} tokens, {new} new "
                                              "tokens each (outputs checked identical)")
    lines = ["", "| draft | c: draft step / target step | v: check of k + 1 rows / target step | acceptance | "
             "expected speedup | measured |", "|---|---|---|---|---|---|"]
    base = timings.rows["plain (KV cache)"]
    for k in args.draft_tokens:
        step, c, v = forward_costs(target, draft, k)
        row = timings.rows[f"draft {d_name}, k={k}"]
        acceptance = row["accepted"] / max(row["proposed"], 1)
        measured = (row["tokens"] / row["seconds"]) / (base["tokens"] / base["seconds"])
        lines.append(f"| {d_name}, k={k} | {c:.2f} | {v:.2f} | {acceptance:.0%} | "
                     f"{expected_speedup(acceptance, k, c, v):.2f}x | {measured:.2f}x |")
    lines.append(f"\n(one target step: {step * 1e3:.1f} ms)")
    sections.append(table + "\n" + "\n".join(lines))
    sections.append(projected_costs(tok.n_vocab, args.draft_preset))

    timings = Timings()
    k = max(args.draft_tokens)  # sampled: one setting is enough to show what sampling does to acceptance
    sampled = {"plain (KV cache)": tokens_of(target, temperature=0.8, seed=1),
               f"draft {d_name}, k={k}": tokens_of(target, temperature=0.8, seed=1, draft=draft, draft_tokens=k)}
    run_rotating(sampled, prompts, timings, check_same=False)
    sections.append(timings.table("plain (KV cache)", "the same, sampled at temperature 0.8 (same distribution, "
                                                      "other tokens)"))

    # the longest inputs of the fine-tuning split (its first 90%): the answers with the most to copy
    records = load_instruction_records(out / "copying.json")
    records = sorted(records[: int(len(records) * 0.9)], key=lambda r: -len(r["input"]))[: args.records]
    style = get_prompt_style("alpaca")

    def answer(**options):
        def run(record, stats):
            text = generate_text(instruct, tok, style.prompt(record["instruction"], record["input"]), 48,
                                 stop=style.stop, speculation=stats, **options)
            return tok.encode(text)
        return run

    timings = Timings()
    lookup = {"plain (KV cache)": answer()}
    for n, k in ((3, 4), (3, 8), (1, 4)):
        lookup[f"prompt lookup n={n}, k={k}"] = answer(prompt_lookup=n, draft_tokens=k)
    run_rotating(lookup, records, timings, check_same=True)
    sections.append(timings.table("plain (KV cache)", f"instruct model ({t_name} fine-tuned on the copying "
                                  f"records) on the {len(records)} of them with the longest inputs, greedy, up to 48 "
                                  "new tokens (outputs checked identical)"))

    beams = Timings()
    ways = {"greedy": tokens_of(target), **{f"beams {b}": tokens_of(target, num_beams=b) for b in args.beams}}
    run_rotating(ways, prompts[: args.beam_prompts], beams, check_same=False)
    greedy = beams.rows["greedy"]["seconds"] / beams.rows["greedy"]["tokens"]
    lines = [f"**beam search with the KV cache against num_beams separate greedy decodes** (target {t_name}, "
             f"{args.beam_prompts} prompts, {new} new tokens)", "", "| decoding | seconds per new token | "
             "against num_beams x greedy |", "|---|---|---|", f"| greedy | {greedy:.4f} | |"]
    for b in args.beams:
        row = beams.rows[f"beams {b}"]
        per_token = row["seconds"] / row["tokens"]
        lines.append(f"| {b} beams | {per_token:.4f} | {per_token / (b * greedy):.2f} |")
    sections.append("\n".join(lines))
    return "\n\n".join(sections)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_decoding", help="where the models are trained")
    p.add_argument("--reuse", action="store_true", help="measure the models already in --out")
    p.add_argument("--target-preset", default="mini")
    p.add_argument("--draft-preset", default="tiny")
    p.add_argument("--target-seconds", type=float, default=150.0)
    p.add_argument("--draft-seconds", type=float, default=60.0)
    p.add_argument("--instruct-seconds", type=float, default=180.0)
    p.add_argument("--prompts", type=positive_int, default=6, help="tinyshakespeare prompts")
    p.add_argument("--new-tokens", type=positive_int, default=88)
    p.add_argument("--records", type=positive_int, default=16, help="rewrite/edit/correct records")
    p.add_argument("--draft-tokens", type=positive_int, nargs="+", default=[2, 3, 5])
    p.add_argument("--beams", type=positive_int, nargs="+", default=[2, 4])
    p.add_argument("--beam-prompts", type=positive_int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.reuse:
        train_models(args.out, args)
    report = measure(args.out, args)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; total {time.perf_counter() - started:.0f} s\n")
    print(report)


if __name__ == "__main__":
    main()
