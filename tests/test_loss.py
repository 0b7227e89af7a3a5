"""The model's loss (``GPTModel.forward(idx, targets)``): the fused ``HeadCrossEntropy`` and the plain path."""
import pytest
import torch
import torch.nn.functional as F

import gptlab.loss
from gptlab.model import GPTConfig, GPTModel, KVCache
from gptlab.train import lm_loss


def lm_loss_and_grads(model: GPTModel, inputs, targets, fused: bool, monkeypatch, scale: float = 1.0):
    if fused:  # the fused loss multiplies by the head's weight itself: the head's forward must not run
        monkeypatch.setattr(model.lm_head, "forward", lambda *a: pytest.fail("the fused loss computed full logits"))
    else:  # route around the fused path: the reference is logits + F.cross_entropy
        monkeypatch.setattr(gptlab.loss, "fused_loss_applies", lambda *a: False)
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, (inputs, targets))
    (loss * scale).backward()
    monkeypatch.undo()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("scale", [1.0, 0.25])  # 0.25: the loss scaled as gradient accumulation does
def test_fused_head_loss_equals_logits_cross_entropy(scale, monkeypatch):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=97))
    inputs = torch.randint(0, 97, (3, 40))
    targets = torch.randint(0, 97, (3, 40))
    targets[0, :7] = -100  # masked prompt
    targets[2, 30:] = -100  # padding
    fused_loss, fused_grads = lm_loss_and_grads(model, inputs, targets, True, monkeypatch, scale)
    ref_loss, ref_grads = lm_loss_and_grads(model, inputs, targets, False, monkeypatch, scale)
    torch.testing.assert_close(fused_loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == ref_grads.keys()
    for name in ref_grads:  # the tied wte gets both the head's and the embedding's gradient
        torch.testing.assert_close(fused_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_head_loss_without_gradients_only_computes_logits(monkeypatch):
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=97))
    inputs, targets = torch.randint(0, 97, (10, 60)), torch.randint(0, 97, (10, 60))
    products = []
    real = gptlab.loss.linear_product
    monkeypatch.setattr(gptlab.loss, "linear_product", lambda *a: products.append(1) or real(*a))
    with torch.no_grad():  # evaluation: 600 rows in chunks of 256, one product each, no gradient work
        loss = lm_loss(model, (inputs, targets))
    assert len(products) == 3
    ref = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, ref)


def test_fused_head_loss_with_a_frozen_head_trains_the_rest():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=97))
    model.wte.weight.requires_grad_(False)  # the tied head/embedding frozen, the blocks trainable
    inputs, targets = torch.randint(0, 97, (2, 30)), torch.randint(0, 97, (2, 30))
    lm_loss(model, (inputs, targets)).backward()
    assert model.wte.weight.grad is None and model.h[0].attn.c_attn.weight.grad is not None


def test_fused_head_loss_refuses_a_second_backward():
    """Its gradients are computed in the forward and given away once: a second backward must fail loudly."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=97))
    inputs, targets = torch.randint(0, 97, (2, 30)), torch.randint(0, 97, (2, 30))
    loss = lm_loss(model, (inputs, targets))
    loss.backward(retain_graph=True)
    first = model.wte.weight.grad.clone()
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    lm_loss(model, (inputs, targets)).backward()  # computing the loss again is the way: gradients add up
    torch.testing.assert_close(model.wte.weight.grad, 2 * first)


def test_a_head_with_a_bias_takes_the_plain_path_even_with_targets(monkeypatch):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=97))
    model.lm_head = torch.nn.Linear(32, 97)  # untied, with a bias: what HeadCrossEntropy does not compute
    monkeypatch.setattr(gptlab.loss.HeadCrossEntropy, "apply", lambda *a: pytest.fail("fused path with a bias"))
    inputs, targets = torch.randint(0, 97, (2, 20)), torch.randint(0, 97, (2, 20))
    targets[1, 15:] = -100
    loss = model(inputs, targets=targets)
    torch.testing.assert_close(loss, F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100))
    loss.backward()
    assert model.lm_head.bias.grad is not None


def test_a_classifier_head_keeps_its_own_loss():
    """A K-wide head with a bias (``gptlab`` classifier surgery): the model gives logits, the stage its loss."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=97))
    model.lm_head = torch.nn.Linear(32, 3)
    ids, labels = torch.randint(0, 97, (4, 12)), torch.tensor([0, 2, 1, 2])
    logits = model(ids)  # (B, T, K)
    assert logits.shape == (4, 12, 3)
    F.cross_entropy(logits[:, -1], labels).backward()  # the last token's logits, as the classifier stage does
    assert model.lm_head.weight.grad.shape == (3, 32)


def test_a_wrapper_passes_the_targets_through_and_gets_the_fused_loss(monkeypatch):
    """What DDP and ``torch.compile`` do: call the model's forward with the same arguments."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=97))
    inputs, targets = torch.randint(0, 97, (2, 20)), torch.randint(0, 97, (2, 20))
    applied = []
    real = gptlab.loss.HeadCrossEntropy.apply
    monkeypatch.setattr(gptlab.loss.HeadCrossEntropy, "apply", lambda *a: applied.append(1) or real(*a))
    wrapped = lm_loss(Wrapper(model), (inputs, targets))
    assert applied == [1]
    torch.testing.assert_close(wrapped, F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()))


def test_a_cache_passed_where_the_targets_go_is_a_clear_error():
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=97)).eval()
    cache = KVCache(model.config, 1, 8, "cpu", torch.float32)
    with pytest.raises(TypeError, match="cache=cache"):
        model(torch.zeros(1, 4, dtype=torch.long), cache)
