"""BPE training speed: gptlab's pure-Python trainer against Hugging Face ``tokenizers``' Rust BpeTrainer.

Both read the same file from disk, pre-tokenize it with GPT-2's regex over bytes and learn merges up to the same
vocabulary size (256 bytes + merges + ``<|endoftext|>``). The two run interleaved in one process, several
rounds, and the minimum time of each is compared, so load from other processes shifts both alike.

    python benchmarks/bench_bpe_train.py                      # tinyshakespeare, sizes 1024 and 4096, 3 rounds
    python benchmarks/bench_bpe_train.py --sizes 4096 --rounds 5 --threads 1
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train_gptlab(path: Path, vocab_size: int) -> int:
    from gptlab.bpe import train_bpe_files

    return train_bpe_files([path], vocab_size).n_vocab


def train_huggingface(path: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # ByteLevel with use_regex=True is GPT-2's regex + byte-to-unicode map, like gptlab's pre-tokenization.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(path)], trainer)
    return tokenizer.get_vocab_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=REPO / "data" / "tinyshakespeare.txt")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="RAYON_NUM_THREADS for the Rust trainer (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # read when the Rust thread pool starts
    import tokenizers

    print(f"corpus {args.input} ({args.input.stat().st_size / 1e6:.2f} MB), tokenizers {tokenizers.__version__}, "
          f"Rust threads: {os.environ.get('RAYON_NUM_THREADS', f'all ({os.cpu_count()} cores)')}")
    print(f"{'vocab':>6} {'gptlab (Python)':>16} {'HF tokenizers (Rust)':>21} {'ratio':>7}")
    for size in args.sizes:
        ours, theirs = [], []
        for _ in range(args.rounds):
            for trainer, times in ((train_gptlab, ours), (train_huggingface, theirs)):
                start = time.perf_counter()
                n_vocab = trainer(args.input, size)
                times.append(time.perf_counter() - start)
                assert n_vocab == size, f"{trainer.__name__} made {n_vocab} tokens, asked for {size}"
        print(f"{size:>6} {min(ours):>15.2f}s {min(theirs):>20.2f}s {min(ours) / min(theirs):>6.1f}x")


if __name__ == "__main__":
    main()
