"""Preference tuning with DPO: the pairs, the collate, the loss against the book's formula, the stage end to end."""
import copy
import csv
import hashlib
import io
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DATA
from gptlab.bpe import train_bpe
from gptlab.chat import chat
from gptlab.cli import main
from gptlab.config import DPO_TRAINING, DPOSettings
from gptlab.errors import GptlabError
from gptlab.finetune.dpo import (
    REFERENCE_FILE, DPOLoss, dpo_terms, evaluate_pairs, finetune_dpo, reference_logprobs, sequence_logprobs,
)
from gptlab.finetune.instruct import finetune_instruct
from gptlab.instruction_data import IGNORE_INDEX, split_records
from gptlab.model import GPTConfig, GPTModel
from gptlab.preference_data import (
    PreferenceDataset, PreferencePair, collate_preferences, default_preference_path, load_preference_records,
)
from gptlab.prompts import ALPACA, PHI3
from gptlab.respond import model_prompt_style
from gptlab.run import read_run_config, save_model
from gptlab.weights import load_run
from gptlab.surgery import add_classifier_head
from gptlab.tokenizer import get_tokenizer
from gptlab.train import TrainConfig

PAD = 50256
LN2 = math.log(2.0)
COLORS = ["red", "blue", "green", "black", "white", "pink", "grey", "brown"]


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def toy_pairs():
    """Polite versus rude answers to one toy task: a preference a few DPO steps can learn."""
    return [{"instruction": f"Name the color {c}.", "input": "", "output": f"{c}",
             "chosen": f"{c}, thank you kindly", "rejected": f"{c}, you fool"} for c in COLORS * 5]


# ---- the records and the shipped data ----------------------------------------------------------

def test_shipped_pairs_are_the_books_and_split_like_the_book():
    path = default_preference_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == \
        "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"
    assert path.read_bytes() == (DATA / "instruction-data-with-preference.json").read_bytes()
    records = load_preference_records(path)
    assert len(records) == 1100
    assert records[50]["rejected"] == "The correct spelling is obviously 'Occasion.'"  # the book's data[50]
    assert records[50]["chosen"] == "The correct spelling is 'Occasion.'"
    train, test, val = split_records(records, DPOSettings.train_fraction, DPOSettings.test_fraction)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert val[0] is records[1045] and test[0] is records[935]  # file order, no shuffle


@pytest.mark.parametrize("record, message", [
    ({"instruction": "a", "rejected": "b"}, "record 1 (line 2) has no 'chosen'"),
    ({"instruction": "a", "chosen": "b"}, "record 1 (line 2) has no 'rejected'"),
    ({"instruction": "a", "chosen": 3, "rejected": "b"}, "'chosen' must be a string"),
])
def test_bad_records_name_the_record_and_line(tmp_path, record, message):
    good = {"instruction": "x", "chosen": "y", "rejected": "z"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(GptlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_preference_records(path)


def test_pairs_with_the_same_answer_twice_are_left_out_by_record_number(caplog):
    tok = get_tokenizer("gpt2")
    records = load_preference_records(default_preference_path())  # the book's file has six
    with caplog.at_level(logging.WARNING, logger="gptlab"):
        ds = PreferenceDataset(records[:935], tok, ALPACA, name="book (training part)")
    assert len(ds) == 929
    assert "book (training part): left out 6 pair(s) whose 'chosen' and 'rejected' are the same text (nothing to " \
           "prefer): record 122, 226, 400, 566, 628, 676" in caplog.text
    with pytest.raises(GptlabError, match="every pair's 'chosen' and 'rejected' are the same text"):
        PreferenceDataset([{"instruction": "a", "chosen": "b ", "rejected": "b"}], tok, ALPACA)


def test_prompts_that_fill_the_context_are_left_out_by_record_number(caplog):
    tok = get_tokenizer("gpt2")
    records = [{"instruction": "Short.", "input": "", "chosen": "a", "rejected": "b"},
               {"instruction": "word " * 80, "input": "", "chosen": "a", "rejected": "b"}]
    with caplog.at_level(logging.WARNING, logger="gptlab"):
        ds = PreferenceDataset(records, tok, ALPACA, max_length=64, name="pairs.json (validation part)", start=1045)
    assert len(ds) == 1
    assert "pairs.json (validation part): left out 1 pair(s) whose prompt fills the context of 64 tokens: " \
           "record 1046" in caplog.text
    with pytest.raises(GptlabError, match="every prompt fills the context of 64 tokens"):
        PreferenceDataset(records[1:], tok, ALPACA, max_length=64)


# ---- the collate --------------------------------------------------------------------------------

def test_collate_stacks_chosen_then_rejected_and_masks_all_but_the_responses():
    pairs = [PreferencePair([1, 2, 3], [4, 5], [6], (-1.0, -2.0)), PreferencePair([7], [8], [9, 10, 11], (-3.0, -4.0))]
    inputs, targets, reference = collate_preferences(pairs, pad_id=PAD)
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [7, 8, PAD, PAD, PAD], [1, 2, 3, 6, PAD], [7, 9, 10, 11, PAD]]
    x = IGNORE_INDEX
    assert targets.tolist() == [[x, x, 4, 5, PAD], [8, PAD, x, x, x], [x, x, 6, PAD, x], [9, 10, 11, PAD, x]]
    assert reference.tolist() == [-1.0, -3.0, -2.0, -4.0]
    assert len(collate_preferences([p._replace(reference=None) for p in pairs], pad_id=PAD)) == 2  # not yet known


# ---- the loss against the book's notebook, re-derived ---------------------------------------------

def book_compute_logprobs(logits, labels, selection_mask, reduction):
    """dpo-from-scratch.ipynb's compute_logprobs (mean), and the same with a sum (the paper's, TRL's)."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits, dim=-1)
    selected = torch.gather(input=log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    mask = selection_mask[:, 1:].clone()
    selected = selected * mask
    return selected.sum(-1) / mask.sum(-1) if reduction == "mean" else selected.sum(-1)


def book_compute_dpo_loss(model_chosen, model_rejected, reference_chosen, reference_rejected, beta):
    """dpo-from-scratch.ipynb's compute_dpo_loss (its rewards without beta, as the notebook has them)."""
    logits = (model_chosen - model_rejected) - (reference_chosen - reference_rejected)
    losses = -F.logsigmoid(beta * logits)
    return (losses.mean(), (model_chosen - reference_chosen).detach().mean(),
            (model_rejected - reference_rejected).detach().mean())


def book_batch(pairs, pad_id=PAD):
    """The notebook's batch: prompt + response + <|endoftext|> padded to one width, a mask over the response."""
    width = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) + 1 for p in pairs)
    batch = {}
    for key in ("chosen", "rejected"):
        rows, masks = [], []
        for p in pairs:
            sequence = p.prompt + getattr(p, key) + [pad_id]
            mask = [False] * len(p.prompt) + [True] * (len(sequence) - len(p.prompt))
            rows.append(sequence + [pad_id] * (width - len(sequence)))
            masks.append(mask + [False] * (width - len(sequence)))
        batch[key], batch[f"{key}_mask"] = torch.tensor(rows), torch.tensor(masks)
    return batch


class Pairs(PreferenceDataset):
    """A dataset of ready-made token pairs."""

    def __init__(self, pairs):
        self.pairs = list(pairs)


def random_pairs(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: torch.randint(1, vocab - 1, (int(torch.randint(lo, hi, (1,), generator=g)),),
                                        generator=g).tolist()
    return [PreferencePair(draw(3, 9), draw(1, 7), draw(1, 7)) for _ in range(n)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_gradient_equal_the_books_formula(reduction):
    torch.manual_seed(1)
    config = GPTConfig.preset("tiny", vocab_size=97)
    reference_model = GPTModel(config).eval()
    policy = copy.deepcopy(reference_model)
    with torch.no_grad():  # a policy some way from the reference, so the loss is not ln 2
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = random_pairs(5, 97, seed=2)
    beta = 0.1

    # ours: reference log-probabilities computed once up front, one forward over chosen and rejected rows
    ds = Pairs(pairs)
    collate = lambda b: collate_preferences(b, pad_id=96)
    ds.set_reference(reference_logprobs(reference_model, ds, collate, batch_size=5, device=torch.device("cpu"),
                                        reduction=reduction))
    batch = collate(ds.pairs)
    ours = DPOLoss(beta, reduction)(policy, batch)
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    # the notebook's: a frozen second model, separate forwards for chosen and rejected, gather over log_softmax
    b = book_batch(pairs, pad_id=96)
    logps = {key: book_compute_logprobs(policy(b[key]), b[key], b[f"{key}_mask"], reduction)
             for key in ("chosen", "rejected")}
    with torch.no_grad():
        ref = {key: book_compute_logprobs(reference_model(b[key]), b[key], b[f"{key}_mask"], reduction)
               for key in ("chosen", "rejected")}
    book_loss, book_chosen, book_rejected = book_compute_dpo_loss(logps["chosen"], logps["rejected"], ref["chosen"],
                                                                  ref["rejected"], beta)
    book_loss.backward()

    assert abs(ours.item() - LN2) > 1e-3  # the comparison is not the trivial one
    torch.testing.assert_close(ours, book_loss, rtol=1e-5, atol=1e-6)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(ours_grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    terms = DPOLoss(beta, reduction).terms(policy, batch)
    # our rewards are the paper's and TRL's, beta * log-ratio; the notebook prints the log-ratio alone
    torch.testing.assert_close(terms["chosen_reward"].mean(), beta * book_chosen, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["rejected_reward"].mean(), beta * book_rejected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["loss"], -F.logsigmoid(terms["reward_margin"]), rtol=1e-5, atol=1e-6)


def test_loss_is_exactly_ln2_while_the_policy_is_the_reference():
    torch.manual_seed(3)
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=97)).eval()
    ds = Pairs(random_pairs(19, 97, seed=4))
    collate = lambda b: collate_preferences(b, pad_id=96)
    cpu = torch.device("cpu")
    ds.set_reference(reference_logprobs(model, ds, collate, batch_size=8, device=cpu))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate)
    metrics = evaluate_pairs(model, loader, DPOLoss(0.1), cpu)
    assert metrics == {"loss": pytest.approx(LN2, abs=1e-7), "chosen_reward": 0.0, "rejected_reward": 0.0,
                       "reward_margin": 0.0, "reward_accuracy": 0.0}
    # and in a training batch of other pairs and padding: equal up to float rounding
    shuffled = collate([ds.pairs[i] for i in (18, 3, 7, 0, 11)])
    assert DPOLoss(0.1)(model, shuffled).item() == pytest.approx(LN2, abs=1e-6)
    assert dpo_terms(torch.zeros(4), torch.zeros(4), 0.5)["loss"].tolist() == [pytest.approx(LN2, abs=1e-7)] * 2


def test_sequence_logprobs_mean_is_sum_over_response_tokens():
    torch.manual_seed(5)
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=50)).eval()
    inputs = torch.randint(0, 50, (2, 6))
    targets = torch.full((2, 6), IGNORE_INDEX)
    targets[0, 2:5] = torch.tensor([1, 2, 3])
    targets[1, 5] = 4
    with torch.no_grad():
        total = sequence_logprobs(model, inputs, targets, "sum")
        mean = sequence_logprobs(model, inputs, targets, "mean")
        log_probs = model(inputs).log_softmax(-1)
    expected = torch.stack([log_probs[0, [2, 3, 4], [1, 2, 3]].sum(), log_probs[1, 5, 4]])
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(mean, expected / torch.tensor([3.0, 1.0]))


# ---- the stage end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny model instruction-tuned (phi3 style) on the toy task, with a small vocabulary learned from it."""
    root = tmp_path_factory.mktemp("dpo")
    records = toy_pairs()
    data = write_json(root / "pairs.json", records)
    corpus = "\n".join(PHI3.example(r["instruction"], "", r[k]) for r in records for k in ("output", "chosen",
                                                                                           "rejected"))
    train_bpe(corpus + " <|endoftext|>", 320).save(root / "tok")
    sft = root / "sft"
    config = TrainConfig(max_steps=20, batch_size=8, lr=3e-3, eval_interval=20, warmup_steps=2, device="cpu")
    # chosen and rejected answers both learned, half each, so the model starts without a preference
    sft_records = [{**r, "output": r["chosen"] if i % 2 else r["rejected"]} for i, r in enumerate(records)]
    finetune_instruct(write_json(root / "sft.json", sft_records), sft, config, preset="tiny",
                      tokenizer=str(root / "tok"), prompt_style="phi3", mask_prompt=True, progress=False)
    return root, data, sft


DPO_STEPS = TrainConfig(max_steps=12, batch_size=4, lr=1e-3, eval_interval=4, device="cpu", betas=(0.9, 0.999),
                        min_lr_ratio=1.0, grad_clip=None)


@pytest.fixture(scope="module")
def dpo_run(sft_run):
    root, data, sft = sft_run
    out = root / "dpo"
    result = finetune_dpo(data, out, DPO_STEPS, init=str(sft), beta=0.5, train_fraction=0.6, test_fraction=0.2,
                          train_eval_batches=2, progress=False)
    return out, result


def rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_dpo_learns_the_preference_and_logs_every_metric(dpo_run):
    out, result = dpo_run
    config = read_run_config(out)
    assert config["stage"] == "dpo" and config["prompt_style"] == "phi3"  # the SFT run's style, by default
    assert config["split"] == {"train": 24, "test": 8, "val": 8}
    initial = config["initial"]
    assert initial["val_loss"] == pytest.approx(LN2, abs=1e-7)  # policy = reference before the first step
    assert initial["val_reward_margin"] == 0.0 and initial["val_reward_accuracy"] == 0.0
    metrics = rows(out)
    assert [int(r["step"]) for r in metrics] == [4, 8, 12]
    for column in ("train_loss", "val_loss", "train_chosen_reward", "train_rejected_reward", "train_reward_margin",
                   "train_reward_accuracy", "val_chosen_reward", "val_rejected_reward", "val_reward_margin",
                   "val_reward_accuracy"):
        assert all(r[column] != "" for r in metrics), column
    last = metrics[-1]
    val_losses = [float(r["val_loss"]) for r in metrics]
    assert LN2 > val_losses[0] > val_losses[1] > val_losses[2] and val_losses[2] < 0.55
    assert result.val_loss == val_losses[2]
    assert float(last["val_reward_accuracy"]) == 1.0 and float(last["val_reward_margin"]) > 0.3
    assert float(last["val_chosen_reward"]) > float(last["val_rejected_reward"])
    for name in ("loss.png", "rewards.png", "reward_accuracy.png", REFERENCE_FILE, "test.json", "val.json"):
        assert (out / name).is_file(), name


def test_a_dpo_run_is_an_ordinary_run_directory(dpo_run, tmp_path, capsys):
    out, _ = dpo_run
    assert model_prompt_style(out) is PHI3
    model, tokenizer, _ = load_run(out)
    assert model.lm_head.out_features == model.config.vocab_size
    responses = tmp_path / "responses.json"
    assert main(["respond", "--model", str(out), "--output", str(responses), "--max-new-tokens", "6", "--limit", "2",
                 "--quiet", "--device", "cpu"]) == 0  # respond's default input: the run's test.json
    assert "phi3 style" in capsys.readouterr().out
    assert main(["judge", "--input", str(responses), "--offline"]) == 0
    assert main(["export", "--format", "hf", str(out), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    lines = iter(["Name the color red.", "/exit"])
    messages = chat(model, tokenizer, model_prompt_style(out), max_new_tokens=4, read=lambda prompt: next(lines),
                    out=io.StringIO())
    assert [m["role"] for m in messages] == ["user", "assistant"]
    from gptlab.serve.engine import ServedModel

    served = ServedModel.load(out)
    assert served.kind == "generator" and served.prompt_style is PHI3


def test_resume_is_exact(sft_run, tmp_path):
    from safetensors.torch import load_file

    root, data, sft = sft_run
    options = dict(init=str(sft), train_fraction=0.6, test_fraction=0.2, train_eval_batches=1, progress=False)
    short = TrainConfig(**{**DPO_STEPS.__dict__, "max_steps": 6, "eval_interval": 3})
    finetune_dpo(data, tmp_path / "straight", short, **options)
    first = TrainConfig(**{**short.__dict__, "max_steps": 3})
    finetune_dpo(data, tmp_path / "resumed", first, **options)
    finetune_dpo(None, tmp_path / "resumed", short, resume=True, progress=False)  # the run's stored settings
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows(tmp_path / "straight") == rows(tmp_path / "resumed")
    assert read_run_config(tmp_path / "resumed")["initial"] == read_run_config(tmp_path / "straight")["initial"]
    with pytest.raises(GptlabError, match="--beta"):  # a resume continues with the run's own settings
        finetune_dpo(None, tmp_path / "resumed", short, resume=True, beta=0.3, progress=False)
    (tmp_path / "resumed" / REFERENCE_FILE).write_text("{")
    more = TrainConfig(**{**short.__dict__, "max_steps": 7})
    with pytest.raises(GptlabError, match=f"{REFERENCE_FILE} is missing or damaged"):
        finetune_dpo(None, tmp_path / "resumed", more, resume=True, progress=False)
    finetune_dpo(data, tmp_path / "resumed", first, overwrite=True, **options)  # starts over, whole
    assert [r["step"] for r in rows(tmp_path / "resumed")] == ["3"]
    assert json.loads((tmp_path / "resumed" / REFERENCE_FILE).read_text())["logp_reduction"] == "mean"


def test_cli_trains_and_prints_the_curve_summary(sft_run, tmp_path, capsys):
    root, data, sft = sft_run
    assert main(["finetune-dpo", "--init", str(sft), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--eval-interval", "2", "--batch-size", "4", "--lr", "1e-3",
                 "--logp-reduction", "sum", "--beta", "0.5", "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "done: step 2" in printed and "val loss 0.6931 -> " in printed and "reward accuracy 0.0% -> " in printed
    settings = read_run_config(tmp_path / "run")["dpo"]
    assert settings["logp_reduction"] == "sum" and settings["beta"] == 0.5


def test_cli_errors_are_one_line(sft_run, tmp_path, capsys):
    root, data, sft = sft_run

    def error(*args):
        assert main(["finetune-dpo", "--out", str(tmp_path / "run"), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    assert "beta must be positive" in error("--init", str(sft), "--beta", "0")
    assert "beta must be positive" in error("--init", str(sft), "--beta", "-1")
    assert "give --init RUN" in error()
    bad = write_json(tmp_path / "bad.json", [{"instruction": "a", "chosen": "b", "rejected": "b"}] * 2)
    assert "every pair's 'chosen' and 'rejected' are the same text" in error("--init", str(sft), "--data", str(bad))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"instruction": "a", "chosen": "b", "rejected": "c"}\n{"instruction": "a", "chosen": "b"}\n')
    assert "record 1 (line 2) has no 'rejected'" in error("--init", str(sft), "--data", str(missing))

    # a classifier run: config.json lists labels and the head has one output per label
    model, tokenizer, _ = load_run(sft)
    classifier = tmp_path / "classifier"
    save_model(classifier, add_classifier_head(model, 2), tokenizer, {"stage": "classifier", "labels": ["ham", "spam"]})
    assert "is a classifier run" in error("--init", str(classifier), "--data", str(data))
    assert not (tmp_path / "run").exists()  # no half-written run


def test_settings_and_defaults():
    assert (DPO_TRAINING.lr, DPO_TRAINING.weight_decay, DPO_TRAINING.epochs, DPO_TRAINING.batch_size) == \
        (5e-6, 0.01, 1, 8)  # the book's recipe
    assert DPOSettings(init="x").beta == 0.1 and DPOSettings(init="x").logp_reduction == "mean"
    for bad in (dict(beta=float("nan")), dict(logp_reduction="max"), dict(dropout=1.0), dict(train_fraction=0.0)):
        with pytest.raises(GptlabError):
            DPOSettings(init="x", **bad)
