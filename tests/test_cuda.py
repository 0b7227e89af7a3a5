"""The bf16 paths on a CUDA GPU, against float32 on the same GPU (and the CPU): run where a GPU is (``-m cuda``,
``benchmarks/gpu_check.sh``); skipped elsewhere (tests/conftest.py). Bounds as in test_bf16.py: bf16 keeps 8
bits of mantissa, so logits are compared at a few parts in a hundred of their largest magnitude.
"""
from __future__ import annotations

import pytest
import torch

from gptlab.cli import main
from gptlab.config import TrainConfig
from gptlab.device import inference_dtype, resolve_precision
from gptlab.generate import generate, generate_text
from gptlab.model import GPTConfig, GPTModel
from gptlab.serve import ServedModel
from gptlab.weights import load

pytestmark = pytest.mark.cuda
GPU = torch.device("cuda")


def test_auto_and_bf16_resolve_on_a_gpu_with_bf16():
    assert resolve_precision("auto", GPU) == torch.bfloat16
    assert inference_dtype("bf16", GPU) == torch.bfloat16


def test_bf16_weights_on_the_gpu_track_float32_logits_cached_and_not():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset("tiny")).to(GPU).eval()
    low = GPTModel(model.config).to(GPU, torch.bfloat16).eval()
    low.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(3)).to(GPU)
    with torch.no_grad():
        ref = model(ids)
        got = low(ids)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 0.03 * ref.abs().max()
    cached = generate(low, ids[:1, :8], 12)
    assert torch.equal(cached, generate(low, ids[:1, :8], 12, use_cache=False))


def test_generate_command_with_bf16_on_cuda_equals_the_library(tiny_lm_run, capsys):
    model, tokenizer = load(tiny_lm_run, device=GPU, dtype=torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16 and model.lm_head.weight is model.wte.weight
    want = generate_text(model, tokenizer, "Every effort", 10)
    assert main(["generate", "--model", str(tiny_lm_run), "--prompt", "Every effort", "--max-new-tokens", "10",
                 "--device", "cuda", "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out == f"Every effort{want}\n"
    served = ServedModel.load(tiny_lm_run, device=GPU, dtype=torch.bfloat16)
    assert generate_text(served.model, served.tokenizer, "Every effort", 10) == want


def test_pretrain_in_bf16_on_the_gpu_follows_float32(tmp_path, verdict_path):
    from gptlab.pretrain import pretrain

    results = {p: pretrain(verdict_path, tmp_path / p, TrainConfig(max_steps=10, batch_size=4, lr=1e-3, eval_interval=5,
                                                                  precision=p, device="cuda"),
                           preset="tiny", progress=False, sample_prompt=None) for p in ("fp32", "bf16", "auto")}
    for result in results.values():
        assert float(result.history[-1]["val_loss"]) < float(result.history[0]["val_loss"])
    assert abs(results["bf16"].val_loss - results["fp32"].val_loss) < 0.01 * results["fp32"].val_loss
    # auto is bf16 on a GPU with bf16 (CUDA kernels may add in another order from run to run: not bit for bit)
    assert results["auto"].val_loss == pytest.approx(results["bf16"].val_loss, rel=2e-3)
