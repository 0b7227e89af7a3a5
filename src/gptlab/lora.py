"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update, scaled by alpha / rank.

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T        A: (rank, in), B: (out, rank)

B starts at zero, so a fresh adapter changes nothing; only A and B train, which at GPT-2 124M with rank 8 on
every block projection is 1.2M parameters (4.7 MB) instead of 124M. The layout is PEFT's (``lora_A``,
``lora_B``, the same scaling), so an adapter moves to and from PEFT by renaming keys (``gptlab.weights``).
The LLMs-from-scratch book's ``LinearWithLoRA`` (appendix E) stores A^T and B^T and scales by alpha alone,
so its ``alpha`` is ours divided by the rank (tests/test_lora.py checks the two agree).

``gptlab.surgery.add_lora`` swaps the chosen layers of a model for ``LoRALinear`` in place, keeping their
weight and bias Parameters (a tied head stays tied, nothing is copied); ``merge_lora`` folds every adapter
into its weight and gives back ordinary layers. Over an int8 / int4 base (QLoRA) the quantized layer stays as it
is, inside a ``LoRAOverLayer``: only the adapters are float, and only they train.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.linear import CPULinear


class LoRAAdapter(nn.Module):
    """What every LoRA layer holds beside its frozen base: ``lora_A``, ``lora_B``, the scaling and the dropout."""

    def _add_adapter(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float,
                     device: torch.device) -> None:
        self.rank, self.scaling = rank, alpha / rank
        # drawn on the CPU and then moved, so one seed gives one adapter on every device (as the classifier head)
        init_device = device if device.type == "meta" else torch.device("cpu")
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=init_device).to(device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=init_device).to(device))
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's and the book's draw
        self.lora_dropout = dropout  # a number, not an nn.Dropout: GPTModel.set_dropout changes the model's, not this

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / rank) * dropout(x) A^T B^T: (..., in) -> (..., out)."""
        x = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling  # (..., rank) -> (..., out)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / rank) B A: the weight of the ordinary layer this one computes."""
        delta = self.lora_B.detach() @ self.lora_A.detach()  # (out, in)
        weight = self.weight.detach()
        return weight + (delta * self.scaling).to(weight.dtype)


class LoRALinear(CPULinear, LoRAAdapter):
    """``CPULinear`` (its weight and bias frozen by the caller) plus ``(alpha / rank) * B A``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        with torch.device("meta"):  # the base's own Parameters are put in below: nothing to allocate
            super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias
        self._add_adapter(base.in_features, base.out_features, rank, alpha, dropout, base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # (..., out): the frozen product, on the fast kernels
        return y + self.lora_update(x)


class LoRAOverLayer(LoRAAdapter):
    """Any other frozen layer computing ``x W^T + b`` (an int8 / int4 ``gptlab.quantize.QuantizedLinear``: QLoRA)
    plus the adapter. The layer is kept whole as ``base_layer`` (PEFT's name) and runs its own forward: the integer
    kernels without gradients, dequantize + F.linear when a gradient must reach x through it. Its ``weight`` (the
    float weight, made on read) is what ``merged_weight`` adds the update to."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        device = next(itertools.chain(base.parameters(), base.buffers())).device  # a quantized weight: buffers
        self._add_adapter(base.in_features, base.out_features, rank, alpha, dropout, device)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_update(x)  # (..., out)


def lora_layer(base: nn.Module, rank: int, alpha: float, dropout: float) -> LoRAAdapter:
    """``base`` with an adapter: a ``LoRALinear`` over a float ``nn.Linear`` (its Parameters kept), else a
    ``LoRAOverLayer`` around it."""
    cls = LoRALinear if isinstance(base, nn.Linear) else LoRAOverLayer
    return cls(base, rank, alpha, dropout)
