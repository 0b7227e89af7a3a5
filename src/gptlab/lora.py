"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update, scaled by alpha / rank.

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T        A: (rank, in), B: (out, rank)

B starts at zero, so a fresh adapter changes nothing; only A and B train, which at GPT-2 124M with rank 8 on
every block projection is 1.2M parameters (4.7 MB) instead of 124M. The layout is PEFT's (``lora_A``,
``lora_B``, the same scaling), so an adapter moves to and from PEFT by renaming keys (``gptlab.weights``).
The LLMs-from-scratch book's ``LinearWithLoRA`` (appendix E) stores A^T and B^T and scales by alpha alone,
so its ``alpha`` is ours divided by the rank (tests/test_lora.py checks the two agree).

``gptlab.surgery.add_lora`` swaps the chosen layers of a model for ``LoRALinear`` in place, keeping their
weight and bias Parameters (a tied head stays tied, nothing is copied); ``merge_lora`` folds every adapter
into its weight and gives back ordinary layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.linear import CPULinear


class LoRALinear(CPULinear):
    """``CPULinear`` (its weight and bias frozen by the caller) plus ``(alpha / rank) * B A``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        with torch.device("meta"):  # the base's own Parameters are put in below: nothing to allocate
            super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.scaling = rank, alpha / rank
        device = base.weight.device
        # drawn on the CPU and then moved, so one seed gives one adapter on every device (as the classifier head)
        init_device = device if device.type == "meta" else torch.device("cpu")
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=init_device).to(device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=init_device).to(device))
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's and the book's draw
        self.lora_dropout = dropout  # a number, not an nn.Dropout: GPTModel.set_dropout changes the model's, not this

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # (..., out): the frozen product, on the fast kernels
        x = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., rank) -> (..., out)
        return y + update * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / rank) B A: the weight of the ordinary layer this one computes."""
        delta = self.lora_B.detach() @ self.lora_A.detach()  # (out, in)
        return self.weight.detach() + (delta * self.scaling).to(self.weight.dtype)
