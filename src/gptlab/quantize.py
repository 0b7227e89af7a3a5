"""Weight-only quantization: int8 and int4 linear layers, and the swap of a model's linears for them.

    int8  symmetric, one float32 scale per output channel:        W[n, k] ~ q[n, k] * scale[n],  q in [-127, 127]
    int4  groups of ``group_size`` inputs per output channel, each with a scale and a zero point (asymmetric):
          W[n, k] ~ (q[n, k] - zero[n, g]) * scale[n, g],  q in [0, 15],  g = k // group_size;
          two values per byte, the even input in the low nibble

Only the weights are integers (a quarter, an eighth of float32's bytes: what batch-1 decoding reads per token);
the activations between layers stay float32 (the kernels below take bfloat16 copies of a layer's input). ``quantize_model`` swaps every linear layer (the block projections and the
output head) in place; with a tied head the token embedding becomes ``QuantizedEmbedding``, which reads the
head's integers and dequantizes only the rows it looks up: one copy of the vocabulary matrix, not two.

Kernels, measured on the 2-core Zen 5 (AVX-512 VNNI and BF16) this was built on (``benchmarks/bench_quantize.py``):

- int8: ``torch.ops.aten._weight_int8pack_mm`` on bfloat16 activations and scales (its float32 path measured
  10-50x slower). Where it is missing: ``torch._int_mm`` (oneDNN's int8 x int8 -> int32 GEMM, VNNI), the
  activation written as two int8 digits per value (x ~ step * (hi + lo / 254), step = max|x| / 127 per row), so
  that ~16 bits of it survive: weight-only, not W8A8; 1.3-4x slower than the first here, but float32-exact.
- int4: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on bfloat16 activations (its float32 path measured ~100x
  slower), on a copy of the weight in the op's own packed layout, made once per layer.
- bfloat16 activations round each input to 8 significant bits (0.4% at most); the int8 / int4 weights' own
  rounding is up to 0.4% of a row's largest weight / 3% of a group's range, so the activations add little (README).
- elsewhere (another device, autocast, gradients, a missing or wrong op): dequantize, then ``F.linear``; with a
  gradient to the input (LoRA over the layer) the float weight is made again in the backward, not kept.

The ops are private to torch: each is looked up on first use and checked against the dequantize-matmul on a tiny
input (``gptlab.linear._checked_op``); where one is missing or wrong, one log line says so and the fallback runs.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.config import INT4_GROUP_SIZES, QuantizeConfig
from gptlab.errors import GptlabError
from gptlab.linear import CPULinear, _checked_op
from gptlab.model import GPTModel

log = logging.getLogger("gptlab")

INT4_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu packs output channels in multiples of 16
_DIGIT = 254  # the second activation digit's weight: 1/254 of the first's (its range is half a step, +-127)


# ---------------------------------------------------------------- the layers


class QuantizedLinear(nn.Module):
    """What the int8 and int4 layers share: sizes, a frozen float bias, the float weight on demand."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        """The float32 weight this layer computes with, made on each read (for export and the loss over the head)."""
        return self.dequantized_rows(slice(None))

    def _with_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then F.linear: any device, dtype and autograd mode. With a gradient to x (LoRA over this
        layer: QLoRA) the float weight is not kept for the backward pass (``_FrozenProduct``)."""
        if torch.is_grad_enabled() and x.requires_grad and not torch.is_autocast_enabled(x.device.type):
            self.keep_rows()
            return self._with_bias(_FrozenProduct.apply(x, self))
        return self._with_bias(F.linear(x, self.weight.to(x.dtype)))

    def keep_rows(self) -> None:
        """The weight is about to be read on every training step: keep it cheap to read. An int8 layer's integers
        are already its one readable copy; Int4Linear's may have been replaced by the kernel's."""

    def _fast(self, x: torch.Tensor) -> bool:
        """The integer kernels take float32 or bfloat16 CPU activations without gradients, outside autocast and
        compile (under autocast the fallback's F.linear runs in autocast's dtype)."""
        return (x.is_cpu and x.dtype in (torch.float32, torch.bfloat16)
                and not (torch.is_grad_enabled() and x.requires_grad)
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _FrozenProduct(torch.autograd.Function):
    """``x W^T`` of a frozen quantized layer, with a gradient to x alone: the float weight is made in the forward and
    again in the backward, and dropped in between. Through F.linear autograd would keep every layer's float weight
    from the forward to the backward: the float model's bytes again, which training over integers is there to avoid
    (QLoRA's backward dequantizes again as well)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer  # the module, not a tensor: nothing of it is saved but the integers it already holds
        return F.linear(x, layer.weight.to(x.dtype))  # (..., N)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.weight.to(grad.dtype), None  # (..., N) @ (N, K) -> (..., K)


class Int8Linear(QuantizedLinear):
    """``y = x @ (q * scale).T + b`` with q int8 (out, in) and one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None) -> None:
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("weight_int", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, device=device))

    @classmethod
    def of(cls, layer: nn.Linear, config: QuantizeConfig) -> "Int8Linear":
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
        w = layer.weight.detach().float()  # (N, K)
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (N,): the largest weight of a row maps to 127
        new.weight_int = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        new.weight_scale = scale
        new.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float(), requires_grad=False)
        return new

    def dequantized_rows(self, rows) -> torch.Tensor:
        return self.weight_int[rows].float() * self.weight_scale[rows, None]  # (n, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = quantized_kernels()
        if not self._fast(x) or (kernels.int8_mm is None and kernels.int_mm is None):
            return self._fallback(x)
        if self.weight_int.data_ptr() % 64:
            # safetensors places an int8 tensor at any byte offset of its file, and the op's vector loads crash on
            # a misaligned one: one aligned copy, made once (torch's allocator aligns to 64 bytes), an ordinary
            # tensor even when the first call is under inference_mode
            with torch.inference_mode(False):
                self.weight_int = self.weight_int.clone()
        if kernels.int8_mm is None:
            return self._with_bias(_int8_product(kernels.int_mm, x.float(), self.weight_int, self.weight_scale)
                                   .to(x.dtype))
        x2 = x.reshape(-1, x.size(-1)).to(torch.bfloat16)  # (M, K)
        y = kernels.int8_mm(x2, self.weight_int, self.weight_scale.to(torch.bfloat16)).to(x.dtype)  # (M, N)
        return self._with_bias(y.view(*x.shape[:-1], self.out_features))


def _int8_product(kernel: Callable, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scale).T`` on an int8 GEMM: x as two int8 digits per value, so ~16 bits of it survive."""
    x2 = x.reshape(-1, x.size(-1))  # (M, K)
    m = x2.size(0)
    step = x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30) / 127  # (M, 1)
    xs = x2 / step  # (M, K), in [-127, 127]
    hi = xs.round()
    lo = (xs - hi).mul_(_DIGIT).round_()  # the rounding error of hi, in [-127, 127]
    acc = kernel(torch.cat([hi, lo]).to(torch.int8), q.t()).float()  # (2M, N) int32 sums, exact
    y = torch.add(acc[:m], acc[m:], alpha=1 / _DIGIT).mul_(step).mul_(scale)  # (M, N)
    return y.view(*x.shape[:-1], q.size(0))


class Int4Linear(QuantizedLinear):
    """``y = x @ ((q - zero) * scale).T + b``: q in [0, 15], two per byte, a scale and zero per group of inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, device=None) -> None:
        super().__init__(in_features, out_features, bias, device)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("weight_int", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                       device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, groups, device=device))
        self.register_buffer("weight_zero", torch.empty(out_features, groups, device=device))
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None  # the kernel's copy, made on first use
        # The kernel's copy replaces weight_int (None then), except in a tied head, whose rows the embedding
        # looks up: the op's layout is private to torch (and differs between its CPU builds), so rows, the
        # state dict and a move to another device rebuild gptlab's layout from it through the op itself.
        self.rows_read = False

    @classmethod
    def of(cls, layer: nn.Linear, config: QuantizeConfig) -> "Int4Linear":
        gs = config.group_size
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, gs, device="meta")
        w = layer.weight.detach().float()  # (N, K)
        g = w.reshape(w.size(0), -1, gs)  # (N, G, gs)
        low, high = g.amin(dim=2), g.amax(dim=2)  # (N, G)
        scale = ((high - low) / 15).clamp_(min=1e-12)  # the group's range in 15 steps
        zero = -low / scale  # where 0.0 falls, in steps: a float, so the group's minimum maps to q = 0 exactly
        q = torch.round(g / scale[..., None] + zero[..., None]).clamp_(0, 15).to(torch.uint8).reshape(w.shape)
        new.weight_int = q[:, 0::2] | (q[:, 1::2] << 4)  # (N, K/2)
        new.weight_scale, new.weight_zero = scale, zero
        new.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float(), requires_grad=False)
        return new

    def own_layout(self) -> torch.Tensor:
        """gptlab's packed weight (N, K/2): the buffer, or rebuilt from the kernel's copy that replaced it."""
        if self.weight_int is not None:
            return self.weight_int
        return _from_kernel_weight(self._packed_by, self._packed[0], self.out_features, self.in_features,
                                   self.group_size)

    def keep_rows(self) -> None:
        """Training reads the weight twice a step: keep gptlab's layout beside the kernel's copy, as a tied head does
        (rebuilding it through the op is a (K, K) product each time)."""
        if not self.rows_read:
            self.weight_int, self.rows_read = self.own_layout(), True

    def unpacked_rows(self, rows) -> torch.Tensor:
        """The 4-bit values of ``rows`` as uint8, (n, K)."""
        packed = self.own_layout()[rows]  # (n, K/2)
        return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.size(0), -1)

    def dequantized_rows(self, rows) -> torch.Tensor:
        q = self.unpacked_rows(rows).float().view(-1, self.in_features // self.group_size, self.group_size)
        zero, scale = self.weight_zero[rows, :, None], self.weight_scale[rows, :, None]  # (n, G, 1)
        return ((q - zero) * scale).reshape(-1, self.in_features)  # (n, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = quantized_kernels()
        if kernels.int4_mm is None or not self._fast(x) or self.group_size not in KERNEL_GROUP_SIZES:
            return self._fallback(x)
        if self._packed is None:
            with _packing:  # the server decodes in worker threads: pack (and drop weight_int) once
                if self._packed is None:
                    self._packed = _int4_kernel_weight(kernels.int4_pack, self.unpacked_rows(slice(None)),
                                                       self.weight_scale, self.weight_zero)
                    self._packed_by = kernels.int4_mm  # what reads the copy back (own_layout)
                    if not self.rows_read:
                        self.weight_int = None  # the kernel's copy holds the same bytes
        packed, scales_zeros = self._packed
        x2 = x.reshape(-1, x.size(-1)).to(torch.bfloat16)  # (M, K): the op's fast path is bf16
        y = kernels.int4_mm(x2, packed, self.group_size, scales_zeros)[:, :self.out_features].to(x.dtype)  # (M, N)
        return self._with_bias(y.view(*x.shape[:-1], self.out_features))

    def _apply(self, fn, recurse=True):  # .to(device) and friends: the kernel's copy is made again where needed
        self.weight_int = self.own_layout()
        self._packed = None
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight_int is None:  # replaced by the kernel's copy: the state holds gptlab's layout, rebuilt
            destination[prefix + "weight_int"] = self.own_layout()


_packing = threading.Lock()


def _from_kernel_weight(int4_mm: Callable, packed: torch.Tensor, n: int, k: int, group_size: int) -> torch.Tensor:
    """gptlab's (N, K/2) nibbles from the op's packed copy: the op times the identity, with scale 1 and offset 8
    (``W = (q - 8) * 1 + 8 = q``), gives q.T exactly (0..15 are exact in bf16)."""
    eye = torch.eye(k, dtype=torch.bfloat16)  # (K, K)
    ones = torch.ones(k // group_size, packed.size(0), dtype=torch.bfloat16)  # (G, N')
    q = int4_mm(eye, packed, group_size, torch.stack([ones, 8 * ones], dim=-1))[:, :n].t()  # (N, K)
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu takes


def _int4_kernel_weight(pack: Callable, q: torch.Tensor, scale: torch.Tensor,
                        zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's layout: q packed by its own converter (rows padded to a multiple of 16), and per group
    ``(scale, offset)`` in bf16 with ``W = (q - 8) * scale + offset``, i.e. offset = (8 - zero) * scale."""
    pad = -q.size(0) % INT4_ROW_MULTIPLE
    q = F.pad(q.to(torch.int32), (0, 0, 0, pad))  # (N', K)
    scale, zero = F.pad(scale, (0, 0, 0, pad), value=1.0), F.pad(zero, (0, 0, 0, pad), value=8.0)  # (N', G)
    scales_zeros = torch.stack([scale, (8 - zero) * scale], dim=-1).transpose(0, 1)  # (G, N', 2)
    return pack(q, 1), scales_zeros.to(torch.bfloat16).contiguous()


class QuantizedEmbedding(nn.Module):
    """The token embedding of a model whose tied head is quantized: the head's rows, dequantized on lookup.

    Holds no tensors of its own (the state dict stores the head once); ``weight`` is the float table, made on read.
    """

    def __init__(self, head: QuantizedLinear) -> None:
        super().__init__()
        object.__setattr__(self, "head", head)  # not a submodule: the model owns the head as lm_head
        head.rows_read = True
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.head.dequantized_rows(idx.reshape(-1))  # (B*T, C)
        return rows.view(*idx.shape, self.embedding_dim)


# ---------------------------------------------------------------- the swap


LAYERS = {"int8": Int8Linear, "int4": Int4Linear}


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantization", None) is not None


def resolve(model: GPTModel, config: QuantizeConfig) -> QuantizeConfig:
    """``config`` with int4's group size chosen (the largest of 128, 64, 32 that divides every layer's inputs),
    or checked against every layer; a size that does not divide one is a ``GptlabError`` naming it."""
    if config.to != "int4":
        return config
    inputs = {name: m.in_features for name, m in _linears(model)}
    if config.group_size is None:
        size = next((gs for gs in INT4_GROUP_SIZES if all(k % gs == 0 for k in inputs.values())), None)
        if size is None:
            raise GptlabError(f"int4: no group size of {', '.join(map(str, INT4_GROUP_SIZES))} divides every layer's "
                              f"inputs ({sorted(set(inputs.values()))}); quantize this model --to int8")
        return QuantizeConfig("int4", size)
    for name, k in inputs.items():
        if k % config.group_size:
            fits = [gs for gs in INT4_GROUP_SIZES if all(n % gs == 0 for n in inputs.values())]
            raise GptlabError(f"--group-size {config.group_size} does not divide {name}'s {k} inputs; choose "
                              + (f"{' or '.join(map(str, fits))}" if fits else "--to int8"))
    return config


def quantize_model(model: GPTModel, config: QuantizeConfig, source: str = "the model") -> GPTModel:
    """Swap every linear layer of ``model`` for its ``config.to`` version, in place (see the module docstring).

    A model that is already quantized, or has LoRA adapters (merge them first), is refused. The model keeps
    ``model.quantization`` (the resolved config), which a run directory stores.
    """
    if is_quantized(model):
        raise GptlabError(f"{source} is already quantized ({describe(model.quantization)}); quantize the float "
                          "model it came from instead")
    if getattr(model, "lora", None) is not None:
        raise GptlabError(f"{source} has LoRA adapters; merge them first (gptlab export --merge), then quantize")
    config = resolve(model, config)
    tied = model.lm_head.weight is model.wte.weight
    with torch.no_grad():
        for name, layer in _linears(model):
            quantized = LAYERS[config.to].of(layer, config).to(layer.weight.device)
            _replace(model, name, quantized)
    if tied:
        model.wte = QuantizedEmbedding(model.lm_head)
    model.quantization = config
    return model.requires_grad_(False)


def quantized_skeleton(model: GPTModel, config: QuantizeConfig) -> GPTModel:
    """A meta-device model's linears swapped for empty quantized ones of the same shapes: what a quantized run's
    weights load into (``gptlab.weights.load_run``)."""
    tied = model.config.tie_weights and model.lm_head.weight is model.wte.weight
    for name, layer in _linears(model):
        args = (layer.in_features, layer.out_features, layer.bias is not None)
        extra = (config.group_size,) if config.to == "int4" else ()
        _replace(model, name, LAYERS[config.to](*args, *extra, device="meta"))
    if tied:
        model.wte = QuantizedEmbedding(model.lm_head)
    model.quantization = config
    return model.requires_grad_(False)


def dequantize_model(model: GPTModel) -> GPTModel:
    """The float32 model a quantized one computes, in place: ordinary ``CPULinear`` layers (a tied head tied again)."""
    if not is_quantized(model):
        return model
    tied = isinstance(model.wte, QuantizedEmbedding)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]:
        plain = CPULinear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = nn.Parameter(layer.weight.detach(), requires_grad=False)
        plain.bias = layer.bias
        _replace(model, name, plain)
    if tied:
        model.wte = nn.Embedding(model.config.vocab_size, model.config.n_embd, device="meta")
        model.wte.weight = model.lm_head.weight
    model.quantization = None
    return model


def describe(config: QuantizeConfig) -> str:
    return config.to if config.group_size is None else f"{config.to}, groups of {config.group_size}"


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


# ---------------------------------------------------------------- torch's integer ops, found on first use


class QuantizedKernels(NamedTuple):
    """torch's integer kernels as this build offers them on the CPU; None where missing or wrong."""

    int8_mm: Callable | None  # aten._weight_int8pack_mm(x bf16 (M, K), q int8 (N, K), scale bf16 (N,))
    int_mm: Callable | None  # torch._int_mm: int8 (M, K) x int8 (K, N) -> int32 (M, N)
    int4_mm: Callable | None  # aten._weight_int4pack_mm_for_cpu(x bf16, packed, group_size, scales_zeros)
    int4_pack: Callable | None  # aten._convert_weight_to_int4pack_for_cpu(q int32 (N, K), inner_k_tiles)


_found: QuantizedKernels | None = None
_finding = threading.Lock()


def quantized_kernels() -> QuantizedKernels:
    """The kernels, looked up and checked the first time a quantized layer runs."""
    global _found
    if _found is None:
        with _finding:
            if _found is None:
                _found = _find_kernels()
    return _found


def _find_kernels() -> QuantizedKernels:
    int8_mm, problem = _checked_op("_weight_int8pack_mm", _check_int8_mm, namespace="aten")
    int_mm = None
    if int8_mm is None:
        int_mm, second = _checked_op("_int_mm", _check_int_mm, namespace="aten")
        if int_mm is None:
            log.warning("torch %s: %s; %s; int8 layers dequantize and run on F.linear (slower)", torch.__version__,
                        problem, second)
        else:
            log.warning("torch %s: %s; int8 layers run on torch._int_mm (slower)", torch.__version__, problem)
    pack, problem = _checked_op("_convert_weight_to_int4pack_for_cpu", lambda op: op, namespace="aten")
    int4_mm = None
    if pack is not None:
        int4_mm, problem = _checked_op("_weight_int4pack_mm_for_cpu", lambda op: _check_int4_mm(op, pack),
                                       namespace="aten")
    if int4_mm is None:
        log.warning("torch %s: %s; int4 layers dequantize and run on F.linear (slower)", torch.__version__, problem)
    return QuantizedKernels(int8_mm, int_mm, int4_mm, pack if int4_mm is not None else None)


def _tiny_layer(cls, rows: int, config: QuantizeConfig) -> tuple[QuantizedLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(0)  # its own generator: the global RNG stream stays as it was
    plain = nn.Linear(64, rows, bias=False)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(rows, 64, generator=g))
    return cls.of(plain, config), torch.randn(3, 64, generator=g)


def _check_int8_mm(op: Callable) -> None:
    """Int8Linear's product through the op on bf16 activations, against dequantize-matmul within bf16 rounding."""
    layer, x = _tiny_layer(Int8Linear, 5, QuantizeConfig("int8"))
    got = op(x.to(torch.bfloat16), layer.weight_int, layer.weight_scale.to(torch.bfloat16)).float()
    _close(got, F.linear(x, layer.weight), 2e-2)


def _check_int_mm(op: Callable) -> None:
    """The product Int8Linear asks for (5 output channels: not a multiple of anything), against dequantize-matmul."""
    layer, x = _tiny_layer(Int8Linear, 5, QuantizeConfig("int8"))
    got = _int8_product(op, x, layer.weight_int, layer.weight_scale)
    _close(got, F.linear(x, layer.weight), 1e-4)


def _check_int4_mm(op: Callable, pack: Callable) -> None:
    """Int4Linear's product through the op (a row count it pads), against dequantize-matmul within bf16 rounding."""
    layer, x = _tiny_layer(Int4Linear, 20, QuantizeConfig("int4", 32))
    packed, scales_zeros = _int4_kernel_weight(pack, layer.unpacked_rows(slice(None)), layer.weight_scale,
                                               layer.weight_zero)
    got = op(x.to(torch.bfloat16), packed, 32, scales_zeros)[:, :20].float()
    _close(got, F.linear(x, layer.weight), 2e-2)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    scale = want.abs().max().item()
    if got.shape != want.shape or (got - want).abs().max().item() > rtol * scale:
        raise ValueError(f"it differs from the dequantized F.linear (shape {tuple(got.shape)}, "
                         f"expected {tuple(want.shape)})")
