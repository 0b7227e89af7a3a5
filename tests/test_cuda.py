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
from gptlab.run import save_model
from gptlab.serve import ServedModel
from gptlab.tokenizer import GPT2Tokenizer
from gptlab.train import lm_loss, make_optimizer
from gptlab.weights import load

pytestmark = pytest.mark.cuda
GPU = torch.device("cuda")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cuda") / "tiny-lm"
    torch.manual_seed(0)
    save_model(run, GPTModel(GPTConfig.preset("tiny")), GPT2Tokenizer(), {"prompt_style": "alpaca"})
    return run


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


def test_generate_command_with_bf16_on_cuda_equals_the_library(lm_run, capsys):
    model, tokenizer = load(lm_run, device=GPU, dtype=torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16 and model.lm_head.weight is model.wte.weight
    want = generate_text(model, tokenizer, "Every effort", 10)
    assert main(["generate", "--model", str(lm_run), "--prompt", "Every effort", "--max-new-tokens", "10",
                 "--device", "cuda", "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out == f"Every effort{want}\n"
    served = ServedModel.load(lm_run, device=GPU, dtype=torch.bfloat16)
    assert generate_text(served.model, served.tokenizer, "Every effort", 10) == want


def test_bf16_autocast_training_on_the_gpu_follows_float32():
    def losses(dtype):
        torch.manual_seed(0)
        model = GPTModel(GPTConfig.preset("tiny")).to(GPU)
        optimizer = make_optimizer(model, TrainConfig(lr=1e-3), GPU)
        tokens = torch.randint(0, 50257, (4, 33), generator=torch.Generator().manual_seed(1)).to(GPU)
        out = []
        for _ in range(5):
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                loss = lm_loss(model, (tokens[:, :-1], tokens[:, 1:]))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out

    ref, low = losses(None), losses(torch.bfloat16)
    assert low[-1] < low[0] and ref[-1] < ref[0]
    for a, b in zip(low, ref):
        assert abs(a - b) < 2e-2 * b
