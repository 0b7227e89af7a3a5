"""Where tensors live and at what precision: device selection, autocast, and the CPU allocator setting.

Low in the layers so that every stage, the server and the command line share one rule for ``--device``.
"""
from __future__ import annotations

import contextlib
import ctypes

import torch

from gptlab.errors import GptlabError


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GptlabError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptlabError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GptlabError(f"device {name!r} requested but there are {torch.cuda.device_count()} CUDA GPU(s), "
                          f"numbered from 0")
    if device.type == "mps" and not _mps_available():
        raise GptlabError(f"device {name!r} requested but Apple's MPS is not available here; use --device cpu")
    return device


def keep_freed_memory_mapped() -> bool:
    """Stop glibc from returning large freed blocks to the OS (Linux, CPU training); True if it applied.

    Activations, logits and gradients are allocated and freed every step. glibc serves blocks above
    32 MB with mmap and unmaps them on free, so the next step page-faults and zeroes them again:
    measured here, that was 35-65% of a small model's training step. Serving them from the heap, and
    never trimming it, keeps the pages mapped. It changes the whole process and cannot be undone, so no
    library call makes it: the ``gptlab`` command does, and a Python user opts in by calling this.
    Elsewhere (macOS, musl, Windows) it does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32. CPUs without bf16 units run it ~100x slower."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch, device: torch.device):
    """A tensor, or a tuple, list or dict of them, moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
