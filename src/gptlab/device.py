"""Where tensors live and at what precision: device selection, autocast, and the CPU allocator setting.

Low in the layers so that every stage, the server and the command line share one rule for ``--device``.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging

import torch

from gptlab.errors import GptlabError

log = logging.getLogger("gptlab")


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


# --precision auto turns bf16 on for a CPU with native bf16 from this many parameters on (TrainConfig's help
# says 20M). benchmarks/bench_bf16.py on the 2-core Zen 5 (a shared machine; BENCHMARKS.md "bfloat16"), bf16 / fp32
# training tokens/s in four runs (2 threads at load 1-2, 2 threads at load 3, 1 thread, 2 threads at load 7-9):
# tiny (1.6M) 1.22x / 1.24x / 1.26x / 0.68x, mini (11.5M) 1.29x / 1.41x / 2.05x / 0.88x, small (30M)
# 1.48x / 1.38x / 1.44x / 1.06x, the 124M shape 1.56x / 1.60x / 1.54x / 1.26x. From small on every run favours
# bf16; below, the most loaded one did not (the casts and the extra small ops), so small models stay float32.
AUTO_BF16_MIN_PARAMETERS = 20_000_000


@functools.lru_cache(maxsize=None)
def cpu_bf16_instructions() -> str | None:
    """The CPU's native bfloat16 instruction set as /proc/cpuinfo names it (``amx_bf16``, ``avx512_bf16``;
    ``bf16`` on Arm), or None: without one torch emulates bf16, ~100x slower than float32 on an AVX2 CPU.

    Read from the flags, never assumed from the vendor or torch's build: torch's own
    ``torch.backends.cpu.get_cpu_capability()`` says ``AVX512`` for a CPU with and one without avx512_bf16.
    No /proc/cpuinfo (macOS, Windows): None, so bf16 stays off where it cannot be checked.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith(("flags", "Features"))), [])
    except OSError:
        return None
    return next((name for name in ("amx_bf16", "avx512_bf16", "bf16") if name in flags), None)


def bf16_problem(device: torch.device) -> str | None:
    """Why ``device`` has no native bfloat16, or None when it has it."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:  # torch >= 2.3 would otherwise count a GPU that only emulates bf16 (pre-Ampere) as capable
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            native = torch.cuda.is_bf16_supported()
        return None if native else f"the GPU {torch.cuda.get_device_name(index)} has no native bfloat16"
    if device.type == "cpu":
        if cpu_bf16_instructions() is None:
            return ("this CPU has no native bfloat16 (no avx512_bf16, amx_bf16 or bf16 among its /proc/cpuinfo "
                    "flags), where torch emulates it many times slower than float32")
        return None
    if device.type == "mps":
        newer = getattr(torch.backends.mps, "is_macos_or_newer", None)
        return None if newer is not None and newer(14, 0) else "Apple's MPS runs bfloat16 from macOS 14 on"
    return f"gptlab does not know whether {device.type} has bfloat16"


def check_bf16(device: torch.device, option: str) -> None:
    """A one-line ``GptlabError`` for ``option bf16`` on a device without native bfloat16, naming what to use."""
    problem = bf16_problem(device)
    if problem is not None:
        raise GptlabError(f"{option} bf16 on {device}: {problem}; use {option} fp32")


def resolve_precision(precision: str, device: torch.device, parameters: int | None = None) -> torch.dtype | None:
    """The autocast dtype for training, or None for plain float32; ``bf16`` is refused where it is not native.

    ``auto``: bf16 on a GPU with bf16; on a CPU with native bf16 for a model of at least
    ``AUTO_BF16_MIN_PARAMETERS`` ``parameters`` (where it measured faster); else fp32. The choice is logged.
    """
    if precision == "auto":
        precision, why = "fp32", "no native bfloat16 here"
        if device.type == "cuda" and bf16_problem(device) is None:
            precision, why = "bf16", "the GPU has native bfloat16"
        elif device.type == "cpu" and cpu_bf16_instructions() is not None:
            if parameters is not None and parameters >= AUTO_BF16_MIN_PARAMETERS:
                precision, why = "bf16", (f"the CPU has {cpu_bf16_instructions()} and the model has "
                                          f"{parameters:,} parameters")
            else:
                why = (f"the CPU has {cpu_bf16_instructions()}, but below {AUTO_BF16_MIN_PARAMETERS:,} parameters "
                       "float32 trains faster")
        log.info("precision auto: %s (%s; --precision fp32 or bf16 to choose)", precision, why)
    elif precision == "bf16":
        check_bf16(device, "--precision")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


INFERENCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype ``--dtype NAME`` holds a model's weights in for inference on ``device``, checked."""
    if name not in INFERENCE_DTYPES:
        raise GptlabError(f"--dtype must be one of {', '.join(INFERENCE_DTYPES)}; got {name!r}")
    if name == "bf16":
        check_bf16(device, "--dtype")
    return INFERENCE_DTYPES[name]


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
