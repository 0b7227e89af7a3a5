import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.generate import generate
from gptlab.linear import CPULinear, _row_blocks
from gptlab.model import PRESETS, GPTConfig, GPTModel, KVCache


def tiny(**kw):
    return GPTModel(GPTConfig.preset("tiny", vocab_size=97, **kw)).eval()


def test_gpt2_small_has_hugging_face_parameter_count():
    with torch.device("meta"):
        model = GPTModel(GPTConfig.preset("gpt2-small"))
    assert model.num_parameters() == 124_439_808


def test_presets_and_overrides():
    assert set(PRESETS) >= {"gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny", "demo"}
    cfg = GPTConfig.preset("gpt2-medium", dropout=0.1)
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.dropout) == (1024, 24, 16, 0.1)
    with pytest.raises(GptlabError, match="unknown preset 'gpt3'.*gpt2-small"):
        GPTConfig.preset("gpt3")
    with pytest.raises(GptlabError, match="divisible"):
        GPTConfig.preset("tiny", n_head=3)
    with pytest.raises(GptlabError, match="unknown config field"):
        GPTConfig.preset("tiny", width=3)


def test_forward_shapes_tied_head_and_bias_options():
    model = tiny()
    idx = torch.randint(0, 97, (3, 10))
    logits = model(idx)
    assert logits.shape == (3, 10, 97)
    assert torch.allclose(model(idx, last_only=True)[:, 0], logits[:, -1], atol=1e-6)
    assert model.lm_head.weight is model.wte.weight
    untied = tiny(tie_weights=False, qkv_bias=False)
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.h[0].attn.c_attn.bias is None
    assert untied.num_parameters() == model.num_parameters() + 97 * 32 - 2 * 3 * 32


def test_attention_is_causal():
    model = tiny()
    idx = torch.randint(0, 97, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    assert torch.allclose(model(idx)[0, :8], model(changed)[0, :8], atol=1e-6)
    assert not torch.allclose(model(idx)[0, 8:], model(changed)[0, 8:])


def test_kv_cache_prefill_in_chunks_matches_full_forward():
    model = tiny()
    idx = torch.randint(0, 97, (2, 20))
    full = model(idx)
    cache = KVCache(model.config, 2, model.config.context_length, "cpu", torch.float32)
    parts = [model(idx[:, :7], cache=cache), model(idx[:, 7:8], cache=cache), model(idx[:, 8:20], cache=cache)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("new_tokens", [10, 90])  # 90 grows well past the context of 64
def test_cached_and_uncached_greedy_generation_are_identical(new_tokens):
    model = tiny()
    prompt = torch.randint(0, 97, (2, 5))
    cached = generate(model, prompt, new_tokens, use_cache=True)
    uncached = generate(model, prompt, new_tokens, use_cache=False)
    assert cached.shape == (2, 5 + new_tokens)
    assert torch.equal(cached, uncached)


def test_too_long_input_is_a_clear_error():
    with pytest.raises(GptlabError, match="exceeds the model's context length 64"):
        tiny()(torch.zeros(1, 65, dtype=torch.long))


def test_set_dropout_changes_every_rate():
    model = tiny(dropout=0.1)
    model.set_dropout(0.0)
    assert model.config.dropout == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(b.attn.dropout == 0.0 for b in model.h)


def test_row_blocks_give_every_thread_work_and_fall_back_when_none_divide():
    assert [_row_blocks(768, t) for t in (1, 2, 8, 16)] == [2, 4, 16, 32]
    assert _row_blocks(50257, 2) == 29  # 29 x 1733: the GPT-2 head splits unevenly across 2 threads but splits
    assert _row_blocks(50257, 64) == 1 and _row_blocks(97, 2) == 1  # prime or no divisor in range: F.linear


def record_kernels(monkeypatch) -> list[str]:
    kernels = []
    real = CPULinear._kernel_for
    monkeypatch.setattr(CPULinear, "_kernel_for", lambda self, *a: kernels.append(real(self, *a)) or kernels[-1])
    return kernels


@pytest.mark.parametrize("rows", [1, 3, 8, 65])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_features", [96, 97])
@pytest.mark.parametrize("use_onednn", [True, False])
def test_cpu_linear_equals_f_linear(rows, bias, out_features, use_onednn, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(CPULinear, "min_weight_numel", 0)  # test-sized weights take the row-block path
    monkeypatch.setattr(CPULinear, "use_onednn", use_onednn and CPULinear.use_onednn)  # False where oneDNN is not
    layer = CPULinear(48, out_features, bias=bias)
    x = torch.randn(rows, 1, 48)
    kernels = record_kernels(monkeypatch)
    with torch.no_grad():
        fast = layer(x)
    # one row takes the row blocks when the width splits evenly; more rows take oneDNN where torch has it
    expected = ("row_blocks" if out_features == 96 else "torch") if rows == 1 else (
        "onednn" if CPULinear.use_onednn else "torch")
    assert kernels == [expected]
    ref = F.linear(x, layer.weight, layer.bias)
    assert fast.shape == (rows, 1, out_features) and fast.is_contiguous()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def linear_grads(forward, layer: torch.nn.Linear, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_(x.requires_grad)
    layer.zero_grad(set_to_none=True)
    out = forward(x)
    out.backward(grad)
    grads = [x.grad, layer.weight.grad] + ([layer.bias.grad] if layer.bias is not None else [])
    return [out.detach()] + grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_needs_grad", [True, False])
@pytest.mark.parametrize("layout", ["3d", "2d", "non-contiguous"])
def test_onednn_training_path_matches_f_linear_values_and_gradients(bias, x_needs_grad, layout, monkeypatch):
    torch.manual_seed(0)
    layer = CPULinear(48, 80, bias=bias)
    x = {"3d": torch.randn(3, 5, 48), "2d": torch.randn(7, 48),
         "non-contiguous": torch.randn(3, 96, 5).transpose(1, 2)[:, :, ::2]}[layout].requires_grad_(x_needs_grad)
    grad = torch.randn(*x.shape[:-1], 80)
    kernels = record_kernels(monkeypatch)
    fast = linear_grads(layer, layer, x, grad)
    assert kernels == ["onednn_autograd"]  # with gradients: oneDNN forward and backward
    ref = linear_grads(lambda t: F.linear(t, layer.weight, layer.bias), layer, x, grad)
    for a, b in zip(fast, ref):
        assert (a is None) == (b is None) == (a is fast[1] and not x_needs_grad)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_training_on_onednn_gives_the_losses_of_f_linear(monkeypatch):
    from gptlab.config import TrainConfig
    from gptlab.train import lm_loss, make_optimizer

    def losses(use_onednn: bool) -> list[float]:
        monkeypatch.setattr(CPULinear, "use_onednn", use_onednn)
        torch.manual_seed(0)
        model = GPTModel(GPTConfig.preset("tiny", vocab_size=96))
        opt = make_optimizer(model, TrainConfig(lr=1e-2), torch.device("cpu"))
        tokens = torch.randint(0, 96, (4, 33), generator=torch.Generator().manual_seed(1))
        out = []
        for _ in range(5):
            loss = lm_loss(model, (tokens[:, :-1], tokens[:, 1:]))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out

    onednn, mkl = losses(True), losses(False)
    assert onednn[-1] < onednn[0] - 0.5  # it learns
    assert onednn == pytest.approx(mkl, rel=1e-4)


def test_onednn_is_available_on_this_build():
    # the benchmarks' numbers assume it: a torch without oneDNN falls back to F.linear silently
    assert torch.backends.mkldnn.is_available()
    assert CPULinear.use_onednn == (os.environ.get("GPTLAB_ONEDNN", "1") != "0")


def test_small_weights_keep_f_linear_for_one_row(monkeypatch):
    layer = CPULinear(48, 96)
    kernels = record_kernels(monkeypatch)
    with torch.no_grad():
        layer(torch.randn(1, 48))
    assert layer.weight.numel() < CPULinear.min_weight_numel and kernels == ["torch"]


@pytest.mark.parametrize("batch", [1, 3])
def test_inference_kernels_decode_like_the_full_forward(batch, monkeypatch):
    monkeypatch.setattr(CPULinear, "min_weight_numel", 0)
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=96)).eval()  # every width splits into blocks
    idx = torch.randint(0, 96, (batch, 20), generator=torch.Generator().manual_seed(0))
    kernels = record_kernels(monkeypatch)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, batch, 20, "cpu", torch.float32)
        steps = [model(idx[:, :4], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(4, 20)]
    per_call = 4 * model.config.n_layer + 1  # every projection and the head
    assert kernels[:2 * per_call] == ["onednn"] * 2 * per_call  # the full forward and the prompt: many rows
    assert kernels[2 * per_call:] == ["row_blocks" if batch == 1 else "onednn"] * 16 * per_call
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_gptlab_onednn_0_keeps_f_linear():
    code = "from gptlab.linear import CPULinear; print(CPULinear.use_onednn)"
    env = {**os.environ, "GPTLAB_ONEDNN": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_batched_generation_reads_packed_weights_then_drops_them(monkeypatch):
    import gptlab.linear

    model = GPTModel(GPTConfig.preset("tiny", vocab_size=96)).eval()
    idx = torch.randint(0, 96, (3, 5), generator=torch.Generator().manual_seed(0))
    real, packed_reads = gptlab.linear._onednn_linear, []
    monkeypatch.setattr(gptlab.linear, "_onednn_linear", lambda x, w, *a: packed_reads.append(w.is_mkldnn) or real(x, w, *a))
    batched = generate(model, idx, 6)
    per_call = 4 * model.config.n_layer + 1
    assert packed_reads == [True] * 6 * per_call  # the prompt and every step, every projection
    assert all(m.packed is None for m in model.modules() if isinstance(m, CPULinear))  # copies dropped
    alone = torch.cat([generate(model, idx[i : i + 1], 6) for i in range(3)])  # batch 1: no packing
    assert torch.equal(batched, alone)
