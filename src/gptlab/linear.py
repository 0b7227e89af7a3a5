"""The linear layer of the model: ``nn.Linear`` running on the fastest matrix kernel torch has on the CPU.

Kept out of ``model.py`` so that the architecture reads on its own: to the model, ``CPULinear`` is
``nn.Linear`` (same parameters, state-dict names and results to float32 rounding). Why it exists,
measured on the 2-core AMD EPYC (AVX-512) this was built on (``benchmarks/profile_speed.py``):

- torch's ``F.linear`` runs on MKL, which here reaches 205-217 GFLOP/s against oneDNN's 450-470; oneDNN
  ships inside torch too, so training and multi-row inference call it (``GPTLAB_ONEDNN=0`` opts out);
- one row at a time (batch-1 decoding) is bound by reading the weights: MKL runs a one-row product on
  one core, oneDNN reads at ~74% of the machine's rate; split into row blocks it reads at ~85%.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


@lru_cache(maxsize=None)
def _row_blocks(out_features: int, threads: int) -> int:
    """How many equal row blocks to cut a weight into: two per thread balance best, one per thread will do."""
    divisors = [n for n in range(max(2, threads), 4 * threads + 64) if out_features % n == 0]
    return next((n for n in divisors if n >= 2 * threads), divisors[0] if divisors else 1)  # 1: no split


class CPULinear(nn.Linear):
    """``nn.Linear`` that picks, per call, the fastest kernel torch has on the CPU in float32:

    - with gradients (training): oneDNN for the forward and both backward matmuls;
    - without, one row (batch-1 decoding) and a weight of at least 2 MB: ``W @ x`` as a batched
      matrix-vector product over row blocks of W, two per thread, so every core reads its share;
    - without, two rows or more: oneDNN, on the weight as it is or, inside ``packed_weights``, on a copy
      in oneDNN's blocked layout that its kernels read twice as fast;
    - under autocast, ``torch.compile``, on other devices and dtypes or without oneDNN: ``F.linear``.
    """

    min_weight_numel = 1 << 19  # float32 elements below which one row is faster through F.linear
    # GPTLAB_ONEDNN=0 keeps MKL (F.linear) for a CPU where oneDNN turns out slower: check with
    # benchmarks/profile_speed.py --what kernels
    use_onednn = torch.backends.mkldnn.is_available() and os.environ.get("GPTLAB_ONEDNN", "1") != "0"

    packed: torch.Tensor | None = None  # the weight in oneDNN's layout, set only inside packed_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # each attribute read goes through nn.Module.__getattr__
        kernel = self._kernel_for(x, weight)
        if kernel == "onednn_autograd":
            return OneDNNLinearFunction.apply(x, weight, bias)
        if kernel == "onednn":
            return _onednn_linear(x, weight if self.packed is None else self.packed, bias, "none", [], "")
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
        if (not x.is_cpu or x.dtype != torch.float32 or weight.dtype != torch.float32
                or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()):
            return "torch"  # other devices and dtypes, autocast, compiling
        if torch.is_grad_enabled():
            return "onednn_autograd" if self.use_onednn else "torch"
        if x.numel() != x.size(-1):  # several rows
            return "onednn" if self.use_onednn else "torch"
        big = weight.numel() >= self.min_weight_numel and weight.is_contiguous()
        return "row_blocks" if big and _row_blocks(weight.size(0), torch.get_num_threads()) > 1 else "torch"


# oneDNN's linear (what torch.compile's CPU backend emits for packed weights); absent without oneDNN
_onednn_linear = torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None


def linear_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` on the kernel ``CPULinear`` would use for it with gradients (oneDNN or F.linear)."""
    if CPULinear.use_onednn and x.is_cpu and x.dtype == weight.dtype == torch.float32:
        return _onednn_linear(x, weight, None, "none", [], "")
    return F.linear(x, weight)


class OneDNNLinearFunction(torch.autograd.Function):
    """``x @ W.T + b`` whose forward and backward matmuls all run on oneDNN (``F.linear``'s run on MKL)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)  # what F.linear's backward keeps too
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias, "none", [], "")  # (..., N)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t(), None, "none", [], "")  # (..., K) = grad @ W
        g, x2 = grad.reshape(-1, grad.size(-1)), x.reshape(-1, x.size(-1))  # (M, N), (M, K)
        if ctx.needs_input_grad[1]:
            grad_w = _onednn_linear(g.t(), x2.t(), None, "none", [], "")  # (N, K) = grad.T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)  # (N,)
        return grad_x, grad_w, grad_b


@contextmanager
def packed_weights(model: nn.Module, rows: int) -> Iterator[None]:
    """Within the block, inference matmuls of two rows or more read a copy of each weight in oneDNN's layout.

    For batched decoding: at 8 rows a GPT-2 124M step's matmuls take 14.6 ms packed against 19.5 ms
    plain here (``profile_speed.py --what floor``). The copies cost as much memory as the weights and ~0.1 s to make, and are dropped on exit;
    ``rows`` is the row count to pack for (any count works). Does nothing where oneDNN does not apply.
    """
    layers = [m for m in model.modules() if isinstance(m, CPULinear)]
    if not (CPULinear.use_onednn and layers and all(
            m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 for m in layers)):
        yield
        return
    try:
        for m in layers:
            m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows)
        yield
    finally:
        for m in layers:
            m.packed = None
