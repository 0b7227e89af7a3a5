"""The speed options give the same results as the plain float32 eager model, within tolerance.

``torch.compile`` on CPU needs a C compiler (gcc) and takes about 40 s for the tiny model on 2 cores,
so that test is marked ``slow``: it runs by default; ``-m 'not slow'`` leaves it out of a quick local run.
"""
import shutil

import pytest
import torch

from gptlab.config import TrainConfig
from gptlab.device import autocast
from gptlab.generate import generate, stream
from gptlab.model import GPTConfig, GPTModel
from gptlab.train import lm_loss, make_optimizer

CPU = torch.device("cpu")


def tiny_model(**overrides) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig.preset("tiny", **overrides))


def batch(model: GPTModel, B: int = 2, T: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, model.config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def train_steps(model: GPTModel, dtype: torch.dtype | None, steps: int = 3, forward=None) -> list[float]:
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3), CPU)
    forward = forward if forward is not None else model
    data, losses = batch(model), []
    for _ in range(steps):
        with autocast(CPU, dtype):
            loss = lm_loss(forward, data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_autocast_logits_and_loss_match_float32(dtype, tol):
    model = tiny_model().eval()
    x, y = batch(model)
    with torch.no_grad():
        ref_logits, ref_loss = model(x), lm_loss(model, (x, y))
        with autocast(CPU, dtype):
            logits, loss = model(x), lm_loss(model, (x, y))
    assert logits.dtype == dtype  # the matmuls really ran in the low precision
    assert loss.dtype == torch.float32  # and the loss was computed in float32
    scale = ref_logits.abs().max()
    assert (logits.float() - ref_logits).abs().max() < 8 * tol * scale
    assert abs(loss.item() - ref_loss.item()) < tol * ref_loss.item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_follows_float32_training(dtype):
    # the autocast dtype itself, not resolve_precision: that refuses bf16 on a CPU without native bf16
    reference = train_steps(tiny_model(), None, steps=3)
    low = train_steps(tiny_model(), dtype, steps=3)
    assert reference[-1] < reference[0] and low[-1] < low[0]  # both learn
    for a, b in zip(low, reference):
        assert abs(a - b) < 2e-2 * b


def test_autocast_generation_tracks_float32():
    model = tiny_model().eval()
    ids = torch.tensor([[11, 22, 33, 44]])
    with torch.no_grad():
        ref = model(ids, last_only=True)
        with autocast(CPU, torch.bfloat16):
            out = generate(model, ids, 8)
            low = model(ids, last_only=True)
    assert out.shape == (1, 12)
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()
    # bf16 keeps the first choice wherever float32's top two logits are not nearly tied
    top2 = ref[0, -1].topk(2).values
    if top2[0] - top2[1] > 0.05 * ref.abs().max():
        assert out[0, 4] == ref[0, -1].argmax()


def test_cached_decoding_past_the_context_matches_uncached():
    # 60-token prompt + 12 new tokens crosses the tiny context of 64: the cache is sized to the call and the
    # stream switches to sliding-window recomputation, and every token must equal the uncached path's.
    model = tiny_model().eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 60), generator=torch.Generator().manual_seed(2))
    cached = generate(model, ids, 12, use_cache=True)
    assert torch.equal(cached, generate(model, ids, 12, use_cache=False))
    assert torch.equal(cached[:, :60], ids)  # the prompt comes back untouched
    steps = list(stream(model, ids, 12))
    assert torch.equal(torch.stack(steps, dim=1), cached[:, 60:])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="torch.compile on CPU needs a C compiler")
def test_compiled_training_matches_eager():
    # One compiled graph (training mode, forward + backward): the losses of three AdamW steps, which
    # depend on the compiled gradients too, equal the eager ones.
    eager = train_steps(tiny_model(), None, steps=3)
    model = tiny_model()
    assert train_steps(model, None, steps=3, forward=torch.compile(model)) == pytest.approx(eager, rel=1e-4)


def test_profile_speed_train_table_accounts_for_every_product():
    """The peak-rate table of ``benchmarks/profile_speed.py``: one row per product shape, counts that add up."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_speed.py"
    out = subprocess.run([sys.executable, str(script), "--what", "train", "--preset", "tiny", "--steps", "1",
                          "--rounds", "2", "--batch", "2", "--seq", "16", "--keep-freed-memory"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = re.findall(r"^\| \((.+?)\) @ \((.+?)\).*? \| (\d+) \| \d+ \| \d+ \| \d+ \| \d+ \|$", out.stdout, re.M)
    calls = sum(int(n) for *_, n in rows)
    # tiny: 2 layers x 4 linears x 3 products (forward, grad of input, grad of weight) + the head's 3 products
    assert calls == 2 * 4 * 3 + 3
    assert "(2, 16, 32) @ (96, 32) + bias" in out.stdout  # c_attn's forward, (B, T, C) @ (3C, C)
    for limit in ("measured", "every product at its standalone rate", "every product at its rate with contiguous",
                  "every product at the 2048³ peak"):
        assert re.search(rf"^\| {limit}.* \| \d+% \|$", out.stdout, re.M), limit
