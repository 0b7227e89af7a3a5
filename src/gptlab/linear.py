"""The linear layer of the model: ``nn.Linear`` running on the fastest matrix kernel torch has on the CPU.

Kept out of ``model.py`` so that the architecture reads on its own: to the model, ``CPULinear`` is
``nn.Linear`` (same parameters, state-dict names and results to float32 rounding). Why it exists,
measured on the 2-core AMD EPYC (AVX-512) this was built on (``benchmarks/profile_speed.py``):

- torch's ``F.linear`` runs on MKL, which here reaches 205-217 GFLOP/s against oneDNN's 450-470; oneDNN
  ships inside torch too, so training and multi-row inference call it (``GPTLAB_ONEDNN=0`` opts out);
- one row at a time (batch-1 decoding) is bound by reading the weights: MKL runs a one-row product on
  one core, oneDNN reads at ~74% of the machine's rate; split into row blocks it reads at ~85%.

oneDNN is reached through private torch ops (``torch.ops.mkldnn._linear_pointwise``,
``_reorder_linear_weight``), which a torch release may rename or change. They are looked up on first
use, not at import, and checked against ``F.linear`` on a tiny input; where one is missing or wrong,
``CPULinear`` runs on ``F.linear`` and one log line says which op and why.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

log = logging.getLogger("gptlab")


@lru_cache(maxsize=None)
def _row_blocks(out_features: int, threads: int) -> int:
    """How many equal row blocks to cut a weight into: two per thread balance best, one per thread will do."""
    divisors = [n for n in range(max(2, threads), 4 * threads + 64) if out_features % n == 0]
    return next((n for n in divisors if n >= 2 * threads), divisors[0] if divisors else 1)  # 1: no split


# GPTLAB_ONEDNN=0 keeps MKL (F.linear) for a CPU where oneDNN turns out slower: check with
# benchmarks/profile_speed.py --what kernels
ONEDNN_WANTED = os.environ.get("GPTLAB_ONEDNN", "1") != "0"


class _OneDNNWorks:
    """``CPULinear.use_onednn``: True unless opted out of or oneDNN's linear is missing or wrong here."""

    def __get__(self, obj, owner=None) -> bool:
        return ONEDNN_WANTED and onednn_kernels().linear is not None  # opted out: no lookup, no log line


class CPULinear(nn.Linear):
    """``nn.Linear`` that picks, per call, the fastest kernel torch has on the CPU in float32:

    - with gradients (training): oneDNN for the forward and both backward matmuls;
    - without, one row (batch-1 decoding) and a weight of at least 2 MB: ``W @ x`` as a batched
      matrix-vector product over row blocks of W, two per thread, so every core reads its share;
    - without, two rows or more: oneDNN, on the weight as it is or, inside ``packed_weights``, on a copy
      in oneDNN's blocked layout that its kernels read twice as fast;
    - without, in bfloat16 (weights held in bf16: ``--dtype bf16``): oneDNN's bf16 kernel, any row count;
    - under autocast, ``torch.compile``, on other devices and dtypes or without oneDNN: ``F.linear``
      (under CPU autocast that is a bf16 matmul on oneDNN too: autocast casts, gptlab's kernels stand aside).
    """

    min_weight_numel = 1 << 19  # float32 elements below which one row is faster through F.linear
    # whether CPULinear calls oneDNN: decided on first read (ONEDNN_WANTED, onednn_kernels); a test may set it
    use_onednn = _OneDNNWorks()

    packed: torch.Tensor | None = None  # the weight in oneDNN's layout, set only inside packed_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # each attribute read goes through nn.Module.__getattr__
        kernel = self._kernel_for(x, weight)
        if kernel == "onednn_autograd":
            return OneDNNLinearFunction.apply(x, weight, bias)
        if kernel == "onednn":
            return _onednn_linear(x, weight if self.packed is None else self.packed, bias)
        if kernel == "row_blocks":
            n_out = weight.size(0)
            blocks = _row_blocks(n_out, torch.get_num_threads())
            w = weight.view(blocks, n_out // blocks, -1)  # (nb, N/nb, K)
            # x as a (K, 1) column: the transpose of (1, K), a layout BLAS takes (reshape(-1, 1) is slow)
            xb = x.reshape(1, -1).t().expand(blocks, -1, -1)  # (nb, K, 1)
            y = torch.bmm(w, xb) if bias is None else torch.baddbmm(bias.view(blocks, -1, 1), w, xb)
            return y.view(*x.shape[:-1], n_out)  # (..., N): the blocks' outputs land in order
        return F.linear(x, weight, bias)

    def _kernel_for(self, x: torch.Tensor, weight: torch.Tensor) -> str:
        # ordered cheapest first: this runs 49 times per GPT-2 124M token
        if (not x.is_cpu or x.dtype != weight.dtype or torch.is_autocast_enabled("cpu")
                or torch.compiler.is_compiling()):
            return "torch"  # other devices, mixed dtypes, autocast (it casts for F.linear), compiling
        if x.dtype != torch.float32:  # bf16 weights (--dtype bf16) read up to 2x faster by oneDNN than by F.linear
            bf16 = x.dtype == torch.bfloat16 and not torch.is_grad_enabled() and self.use_onednn
            return "onednn" if bf16 else "torch"
        if torch.is_grad_enabled():
            return "onednn_autograd" if self.use_onednn else "torch"
        if x.numel() != x.size(-1):  # several rows
            return "onednn" if self.use_onednn else "torch"
        big = weight.numel() >= self.min_weight_numel and weight.is_contiguous()
        return "row_blocks" if big and _row_blocks(weight.size(0), torch.get_num_threads()) > 1 else "torch"


# ---------------------------------------------------------------- oneDNN's ops, found on first use


class OneDNN(NamedTuple):
    """oneDNN's kernels as this torch offers them; None where missing or wrong."""

    linear: Callable | None  # torch.ops.mkldnn._linear_pointwise: x @ W.T + b (what torch.compile emits)
    reorder: Callable | None  # torch.ops.mkldnn._reorder_linear_weight: W in oneDNN's blocked layout


_found: OneDNN | None = None  # set once, by onednn_kernels
_finding = threading.Lock()  # the server decodes in worker threads: look up (and log) once


def onednn_kernels() -> OneDNN:
    """oneDNN's linear and weight packing, looked up and checked the first time anything asks."""
    global _found
    if _found is None:
        with _finding:
            if _found is None:
                _found = _find_onednn()
    return _found


def _find_onednn() -> OneDNN:
    if not torch.backends.mkldnn.is_available():
        log.info("this torch build has no oneDNN: CPULinear runs on F.linear")
        return OneDNN(None, None)
    linear, problem = _checked_op("_linear_pointwise", _check_linear)
    if linear is None:
        log.warning("torch %s: %s; CPULinear runs on F.linear (slower on the CPU)", torch.__version__, problem)
        return OneDNN(None, None)
    reorder, problem = _checked_op("_reorder_linear_weight", lambda op: _check_reorder(linear, op))
    if reorder is None:
        log.warning("torch %s: %s; batched decoding reads the weights unpacked", torch.__version__, problem)
    return OneDNN(linear, reorder)


def _checked_op(name: str, check: Callable[[Callable], None], namespace: str = "mkldnn") -> tuple[Callable | None, str]:
    """``torch.ops.<namespace>.<name>`` and "" if it exists and passes ``check``; else None and what went wrong."""
    try:
        op = getattr(getattr(torch.ops, namespace), name)
    except Exception as e:  # AttributeError today; whatever a later torch raises for an op it lacks
        return None, f"torch.ops.{namespace}.{name} is missing ({type(e).__name__})"
    try:
        # tiny, seeded, in float32 with gradients, whatever mode the first caller is in
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            check(op)
    except Exception as e:  # a changed signature raises; a changed meaning gives other numbers
        first_line = (str(e).splitlines() or [""])[0]
        return None, f"torch.ops.{namespace}.{name} does not work as expected ({type(e).__name__}: {first_line})"
    return op, ""


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):  # float32 rounding
        raise ValueError(f"it differs from F.linear (shape {tuple(got.shape)}, expected {tuple(want.shape)})")


def _check_linear(op: Callable) -> None:
    """The products ``CPULinear`` asks of oneDNN's linear, against F.linear and its autograd gradients:
    the forward (3-D input, bias) and ``OneDNNLinearFunction``'s backward (transposed operands, no bias)."""
    g = torch.Generator().manual_seed(0)  # its own generator: the global RNG stream stays as it was
    x, w, b = torch.randn(2, 3, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    grad = torch.randn(2, 3, 5, generator=g)
    x.requires_grad_(), w.requires_grad_()
    ref = F.linear(x, w, b)  # (2, 3, 5)
    grad_x, grad_w = torch.autograd.grad(ref, (x, w), grad)  # (2, 3, 8), (5, 8)
    x, w = x.detach(), w.detach()
    g2, x2 = grad.reshape(-1, 5), x.reshape(-1, 8)  # (6, 5), (6, 8)
    _same(op(x, w, b, "none", [], ""), ref.detach())
    _same(op(grad, w.t(), None, "none", [], ""), grad_x)  # grad @ W
    _same(op(g2.t(), x2.t(), None, "none", [], ""), grad_w)  # grad.T @ x


def _check_reorder(linear: Callable, op: Callable) -> None:
    """A weight packed for 3 rows, read by oneDNN's linear for a (3, 1, K) input, as batched decoding does."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 1, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    _same(linear(x, op(w, 3), b, "none", [], ""), F.linear(x, w, b))


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` on oneDNN, ``weight`` plain or packed; only where ``onednn_kernels().linear``."""
    return onednn_kernels().linear(x, weight, bias, "none", [], "")


def linear_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` on the kernel ``CPULinear`` would use for it with gradients (oneDNN or F.linear)."""
    if x.is_cpu and x.dtype == weight.dtype == torch.float32 and CPULinear.use_onednn:
        return _onednn_linear(x, weight, None)
    return F.linear(x, weight)


class OneDNNLinearFunction(torch.autograd.Function):
    """``x @ W.T + b`` whose forward and backward matmuls all run on oneDNN (``F.linear``'s run on MKL)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)  # what F.linear's backward keeps too
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)  # (..., N)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t(), None)  # (..., K) = grad @ W
        g, x2 = grad.reshape(-1, grad.size(-1)), x.reshape(-1, x.size(-1))  # (M, N), (M, K)
        if ctx.needs_input_grad[1]:
            grad_w = _onednn_linear(g.t(), x2.t(), None)  # (N, K) = grad.T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)  # (N,)
        return grad_x, grad_w, grad_b


def _packed_dtypes(rows: int) -> tuple[torch.dtype, ...]:
    """The weight dtypes that ``packed_weights`` packs for ``rows``: one float32 row reads faster as row blocks,
    but one bfloat16 row reads 2x faster packed (9.5 ms against 20 ms plain for a GPT-2 124M token's block
    matmuls, 1 thread; against 18 ms for float32's row blocks), so bf16 is packed at any row count."""
    return (torch.float32, torch.bfloat16) if rows > 1 else (torch.bfloat16,)


@contextmanager
def packed_weights(model: nn.Module, rows: int) -> Iterator[None]:
    """Within the block, inference matmuls of two rows or more read a copy of each weight in oneDNN's layout.

    For batched decoding: at 8 rows a GPT-2 124M step's matmuls take 14.6 ms packed against 19.5 ms
    plain here (``profile_speed.py --what floor``). In bfloat16 (``--dtype bf16``) one row too: see ``_packed_dtypes``.
    The copies cost as much memory as the weights and ~0.1 s to make, and are dropped on exit;
    ``rows`` is the row count to pack for (any count works). Does nothing where oneDNN does not apply.
    """
    layers = [m for m in model.modules() if isinstance(m, CPULinear)]
    if not (layers and all(m.weight.device.type == "cpu" and m.weight.dtype in _packed_dtypes(rows) for m in layers)
            and CPULinear.use_onednn and onednn_kernels().reorder is not None):
        yield
        return
    reorder = onednn_kernels().reorder
    try:
        for m in layers:
            m.packed = reorder(m.weight.detach(), rows)
        yield
    finally:
        for m in layers:
            m.packed = None
