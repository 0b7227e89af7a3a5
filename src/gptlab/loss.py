"""The language-model loss: the output head and its cross-entropy, without the whole logits where it can.

A model-side kernel, beside ``linear.py``: ``GPTModel.forward(idx, targets)`` calls ``lm_head_loss``, so
the training loop only asks the model for its loss, and DDP or ``torch.compile`` wrappers pass it through.
On the CPU in float32 ``HeadCrossEntropy`` computes the same mean cross-entropy 256 rows of logits at a
time, and under CPU bfloat16 autocast the same with bf16 matmuls (log-softmax and the gradient's softmax stay
float32); everywhere else (other autocast dtypes, GPUs, ``torch.compile``, a head with a bias) it is the
logits and ``F.cross_entropy``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from gptlab.linear import linear_product

HEAD_LOSS_CHUNK = 256  # rows of logits at a time: 51 MB at GPT-2 vocabulary; 64-1024 ran alike


def lm_head_loss(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` (B, T, C) -> (B, T, V) against ``targets`` (B, T).

    Targets of -100 are ignored (padding, masked prompts). ``head`` is a linear layer: the fused path
    multiplies ``hidden`` by ``head.weight`` itself.
    """
    weight, bias = head.weight, head.bias
    if fused_loss_applies(hidden, weight, bias):
        # grad mode is off inside an autograd.Function's forward: tell it whether gradients are wanted
        return HeadCrossEntropy.apply(hidden.flatten(0, 1), weight, targets.flatten(), HEAD_LOSS_CHUNK,
                                      torch.is_grad_enabled(), product_dtype())
    logits = head(hidden)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def fused_loss_applies(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """``HeadCrossEntropy`` computes ``hidden @ weight.T`` from float32 on the CPU, eagerly, with no bias, without
    autocast or under bfloat16 autocast (``product_dtype``)."""
    return (bias is None and hidden.is_cpu and weight.is_cpu and hidden.dtype == weight.dtype == torch.float32
            and product_dtype() is not None and not torch.compiler.is_compiling())


def product_dtype() -> torch.dtype | None:
    """The dtype of the fused loss's matmuls: float32, bfloat16 under CPU bf16 autocast, None under another.

    Under bf16 autocast the logits path would write (B*T, V) logits in bf16, a float32 copy, its
    log-probabilities and their gradient: at the 124M shape those passes cost more than the head's matmuls.
    """
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32
    return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None


class HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against targets, ``chunk`` rows of logits at a time.

    At the GPT-2 124M shape, 4 x 256 tokens, the logits are 1024 x 50,257 float32 (206 MB), and the
    usual loss writes them, their log-probabilities, and a zeroed gradient of each. Here each chunk's
    log-probabilities (one kernel) become, in place, their own gradient (softmax minus one-hot) and are
    multiplied straight into the gradients of ``hidden`` and ``weight`` during the forward; backward
    only scales them. What it buys is memory (two 51 MB chunks instead of ~600 MB at that shape, more
    at longer contexts); the step's speed is level with the logits path on the CPU it was measured on.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                grad_enabled: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        valid = targets != -100  # (M,)
        row_weight = valid.to(hidden.dtype) / valid.sum().clamp(min=1)  # (M,): d(mean loss) / d(row loss)
        want_hidden, want_weight = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        ctx.grad_hidden = torch.empty_like(hidden) if want_hidden else None  # (M, C)
        ctx.grad_weight = None  # (V, C), from the first chunk on; a frozen head gets none
        ctx.handed_out = False  # backward gives the gradients away once
        total = hidden.new_zeros(())
        # the matmuls' operands, cast once (no copy in float32); the float32 weight's gradient is summed in float32
        hidden_p, weight_p = hidden.to(dtype), weight.to(dtype)
        for start in range(0, hidden.size(0), chunk):
            h, t, w = hidden_p[start : start + chunk], targets[start : start + chunk], row_weight[start : start + chunk]
            t = t.clamp(min=0)  # ignored rows pick token 0, then count for nothing (weight 0)
            logprobs = torch.log_softmax(linear_product(h, weight_p).float(), dim=-1)  # (c, V), float32
            total -= (logprobs.gather(1, t[:, None]).squeeze(1) * w).sum()
            if want_hidden or want_weight:
                grad = logprobs.exp_()  # softmax, in place
                grad[torch.arange(len(t)), t] -= 1.0  # d(row loss) / d(logits): softmax - one-hot, (c, V)
                grad = grad.to(dtype)
                # each row's weight scales the small (c, C) factors, not the (c, V) gradient
                if want_hidden:
                    ctx.grad_hidden[start : start + chunk] = linear_product(grad, weight_p.t()) * w[:, None]  # (c, C)
                if want_weight:
                    grad_weight = linear_product(grad.t(), (h * w[:, None].to(dtype)).t()).float()  # (V, C)
                    ctx.grad_weight = grad_weight if ctx.grad_weight is None else ctx.grad_weight.add_(grad_weight)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.handed_out:
            raise RuntimeError("lm_loss: backward ran twice through the same loss; its gradients were computed "
                               "in the forward and handed out the first time: compute the loss again instead")
        scale = grad_loss.item()  # 1 unless the loss was scaled (gradient accumulation)
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        # ctx lets go, so autograd owns the only reference and adds the tied embedding's gradient in place
        ctx.grad_hidden = ctx.grad_weight = None
        ctx.handed_out = True
        if scale != 1.0:
            grad_hidden = None if grad_hidden is None else grad_hidden.mul_(scale)
            grad_weight = None if grad_weight is None else grad_weight.mul_(scale)
        return grad_hidden, grad_weight, None, None, None, None
