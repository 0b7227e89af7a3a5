"""Text to training examples.

- ``read_text`` / ``text_files``: UTF-8 input with errors that name the file and byte offset.
- ``prepare_token_file`` / ``open_token_file``: a corpus tokenized once into a memory-mapped file
  (uint16 when the vocabulary fits, else uint32), so corpora larger than memory can be trained on. Its header
  carries the tokenizer's fingerprint, so ``load_tokens`` refuses it for a model with another vocabulary.
- ``TokenWindowDataset``: sliding windows of ``max_length`` tokens, targets shifted by one.
- ``EpochBatchSampler``: seeded, resumable batch order, so ``--resume`` replays exactly the same batches.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from gptlab.bpe import GPT2_PATTERN, text_blocks
from gptlab.errors import GptlabError
from gptlab.files import atomic_write, read_text, read_text_chunks, text_files  # noqa: F401  (read_text: re-exported)
from gptlab.tokenizer import Tokenizer

TOKEN_FILE_MAGIC = b"GPTLABTK"
TOKEN_FILE_VERSION = 2  # 2: the header has the tokenizer's fingerprint; 1: its name and size only
HEADER_BYTES = 4096  # fixed, so the header can be rewritten in place once the token count is known
BLOCK_BYTES = 1 << 22


def iter_text_blocks(path: str | Path, block_bytes: int = BLOCK_BYTES, pattern: str | None = GPT2_PATTERN,
                     on_read: Callable[[int], None] | None = None) -> Iterator[tuple[str, int]]:
    """Yield ``(text, n_bytes)`` blocks of a UTF-8 file, cut only where tokenization is unaffected.

    ``pattern`` is the tokenizer's pre-tokenization (``tokenizer.pattern``; ``None`` for one that has none),
    which decides where a cut is safe: see ``gptlab.bpe.text_blocks``, which BPE training reads through too.
    """
    for text in text_blocks(read_text_chunks(path, block_bytes, on_read), pattern):
        yield text, len(text.encode("utf-8"))


def _encode_files(files: list[Path], tokenizer: Tokenizer, desc: str) -> Iterator[np.ndarray]:
    """Token ids of each file in blocks; documents are separated by the end-of-text token."""
    total = sum(f.stat().st_size for f in files)
    pattern = getattr(tokenizer, "pattern", None)  # a regex-split tokenizer says how: it allows more cuts
    has_text = False
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=total < BLOCK_BYTES) as bar:
        for i, f in enumerate(files):
            if i > 0 and tokenizer.eot_id is not None:
                yield np.array([tokenizer.eot_id], dtype=np.int64)
            for text, n_bytes in iter_text_blocks(f, pattern=pattern):
                has_text = has_text or not text.isspace()
                yield np.asarray(tokenizer.encode(text), dtype=np.int64)
                bar.update(n_bytes)
    if not has_text:
        where = files[0] if len(files) == 1 else files[0].parent
        raise GptlabError(f"{where}: no text to train on (empty or only whitespace)")


def encode_path(path: str | Path, tokenizer: Tokenizer) -> np.ndarray:
    """Tokenize a text file or folder into memory."""
    files = text_files(path)
    parts = list(_encode_files(files, tokenizer, desc="tokenizing"))
    return np.concatenate(parts)


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if n_vocab <= 2**16 else np.dtype(np.uint32)


def prepare_token_file(input_path: str | Path, out: str | Path, tokenizer: Tokenizer) -> dict:
    """Tokenize a text file or folder once into ``out``: an 8-byte magic, a JSON header, then the ids."""
    files = text_files(input_path)
    dtype = token_dtype(tokenizer.n_vocab)
    header = {"version": TOKEN_FILE_VERSION, "dtype": dtype.name, "tokenizer": tokenizer.name,
              "n_vocab": tokenizer.n_vocab, "fingerprint": tokenizer.fingerprint, "source": str(input_path),
              "n_files": len(files), "n_tokens": 0}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"\0" * HEADER_BYTES)
            for ids in _encode_files(files, tokenizer, desc=f"preparing {Path(input_path).name}"):
                f.write(ids.astype(dtype).tobytes())
                header["n_tokens"] += len(ids)
            f.seek(0)
            f.write(_pack_header(header))

    atomic_write(out, write)
    return header


def _pack_header(header: dict) -> bytes:
    body = json.dumps(header).encode()
    packed = TOKEN_FILE_MAGIC + struct.pack("<I", len(body)) + body
    if len(packed) > HEADER_BYTES:
        raise GptlabError(f"token file header too long ({len(packed)} bytes)")
    return packed.ljust(HEADER_BYTES, b"\0")


def is_token_file(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(TOKEN_FILE_MAGIC)) == TOKEN_FILE_MAGIC


def open_token_file(path: str | Path) -> tuple[np.memmap, dict]:
    """Memory-map a file written by ``prepare_token_file``: ``(ids, header)``; ids stay on disk until read."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if not head.startswith(TOKEN_FILE_MAGIC) or len(head) < HEADER_BYTES:
        raise GptlabError(f"{path}: not a gptlab token file (run `gptlab prepare` to make one)")
    (length,) = struct.unpack("<I", head[8:12])
    try:
        header = json.loads(head[12 : 12 + length])
    except json.JSONDecodeError as e:
        raise GptlabError(f"{path}: corrupt token file header ({e})") from None
    expected = HEADER_BYTES + header["n_tokens"] * np.dtype(header["dtype"]).itemsize
    if path.stat().st_size != expected:
        raise GptlabError(f"{path}: truncated token file ({path.stat().st_size} bytes, expected {expected}); prepare it again")
    ids = np.memmap(path, dtype=header["dtype"], mode="r", offset=HEADER_BYTES, shape=(header["n_tokens"],))
    return ids, header


def load_tokens(path: str | Path, tokenizer: Tokenizer) -> np.ndarray:
    """Token ids from a prepared token file (memory-mapped) or a text file/folder (tokenized now)."""
    if is_token_file(path):
        ids, header = open_token_file(path)
        check_token_file_tokenizer(path, header, tokenizer)
        return ids
    return encode_path(path, tokenizer)


def check_token_file_tokenizer(path: str | Path, header: dict, tokenizer: Tokenizer) -> None:
    """Refuse a token file written with another tokenizer: its ids would mean other tokens.

    Version 2 headers carry the tokenizer's fingerprint (two trained BPEs are both named "bpe" and may have
    the same size); version 1 headers only its name and size.
    """
    if "fingerprint" in header:
        same = header["fingerprint"] == tokenizer.fingerprint
        theirs = f"{header['n_vocab']} tokens, fingerprint {header['fingerprint'][:8]}"
        ours = f"{tokenizer.n_vocab} tokens, fingerprint {tokenizer.fingerprint[:8]}"
    else:
        same = header["tokenizer"] == tokenizer.name and header["n_vocab"] == tokenizer.n_vocab
        theirs, ours = f"{header['n_vocab']} tokens", f"{tokenizer.n_vocab} tokens"
    if not same:
        raise GptlabError(
            f"{path}: prepared with tokenizer {header['tokenizer']!r} ({theirs}), but the model uses "
            f"{tokenizer.name!r} ({ours}); prepare it again with this tokenizer (`gptlab prepare --tokenizer ...`)"
        )


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first ``1 - val_fraction`` of the stream for training, the rest for validation (no shuffling)."""
    if not 0.0 <= val_fraction < 1.0:
        raise GptlabError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_train = int(round(len(tokens) * (1.0 - val_fraction)))
    return tokens[:n_train], tokens[n_train:]


class TokenWindowDataset(Dataset):
    """Input windows ``ids[i : i + max_length]`` and targets one token later, every ``stride`` tokens."""

    def __init__(self, tokens: np.ndarray, max_length: int, stride: int, name: str = "text") -> None:
        if max_length <= 0 or stride <= 0:
            raise GptlabError(f"max_length and stride must be positive (got max_length={max_length}, stride={stride})")
        if len(tokens) < max_length + 1:
            raise GptlabError(
                f"{name} is {len(tokens)} tokens long; one training window needs max_length + 1 = {max_length + 1} "
                "(use more text or a smaller --context-length)"
            )
        self.tokens, self.max_length, self.stride = tokens, max_length, stride
        self.starts = range(0, len(tokens) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[i]
        chunk = torch.from_numpy(np.asarray(self.tokens[start : start + self.max_length + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]  # (T,), (T,)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices, shuffled by a generator seeded from ``(seed, epoch)`` alone.

    Because the order of epoch ``e`` depends on nothing else, training can restart at any batch of any
    epoch (``set_position``) and see exactly the batches an uninterrupted run would have seen.

    Under several ranks (``rank`` of ``world``) every batch of the one global order is ``batch_size x world``
    indices, of which each rank takes its own ``batch_size``: the ranks read disjoint shares of what one
    process with ``batch_size x world`` would read. An incomplete last global batch is then left out (a
    rank's share could be empty); one process keeps it.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1) -> None:
        if batch_size <= 0:
            raise GptlabError(f"batch size must be positive, got {batch_size}")
        if n == 0:
            raise GptlabError("dataset is empty")
        if world > 1 and n < batch_size * world:
            raise GptlabError(f"the dataset has {n} examples, fewer than one global batch (batch size {batch_size} x "
                              f"{world} ranks): use a smaller --batch-size or fewer ranks")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        if self.world > 1:
            return self.n // (self.batch_size * self.world)
        return -(-self.n // self.batch_size)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        size = self.batch_size * self.world
        for b in range(self.start, len(self)):
            first = b * size + self.rank * self.batch_size  # this rank's share of global batch b
            yield order[first : first + self.batch_size]
