import csv
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA
from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.evaluate import classification_report, confusion_matrix, plot_confusion_matrix
from gptlab.classification_data import PadCollate, read_labeled_file, split_examples
from gptlab.classify import Classifier, last_token_logits
from gptlab.surgery import add_classifier_head, select_trainable
from gptlab.model import GPTConfig, GPTModel
from gptlab.run import read_run_config
from gptlab.weights import load_run

SMS = DATA / "SMSSpamCollection"
WORDS = {
    "spam": "win free prize cash claim urgent call txt reply offer".split(),
    "ham": "see you later lunch home mum okay love dinner tonight".split(),
    "work": "meeting report deadline office project email boss budget slides client".split(),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: a second OpenMP thread only adds synchronisation, and on a busy machine it made these tests 5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_rows(n_per_class: int = 40, seed: int = 0, classes=("ham", "spam", "work")) -> list[tuple[str, str]]:
    """Texts whose words give the label away, of varied lengths (so batches are padded)."""
    rng = random.Random(seed)
    rows = [(label, " ".join(rng.choice(WORDS[label]) for _ in range(rng.randint(2, 12))))
            for label in classes for _ in range(n_per_class)]
    rng.shuffle(rows)
    return rows


def write_csv(path, rows, header=("label", "text"), delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def tiny_classifier(num_classes=2, **overrides) -> GPTModel:
    model = GPTModel(GPTConfig.preset("tiny", vocab_size=100, **overrides))
    return add_classifier_head(model, num_classes).eval()


# ---- the model ------------------------------------------------------------------------------------

def test_prediction_does_not_depend_on_padding():
    torch.manual_seed(0)
    model = tiny_classifier(3)
    seqs = [[5, 9, 2], [7, 1, 1, 4, 3, 8, 8], [11]]
    alone = torch.cat([last_token_logits(model, *PadCollate(99)([(s, 0)])[:2]) for s in seqs])
    for pad_to in (None, 20, 64):  # padded to the batch's longest, and much further
        ids, lengths, _ = PadCollate(99, pad_to)([(s, 0) for s in seqs])
        batched = last_token_logits(model, ids, lengths)
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    # The book reads position -1, a pad token for all but the longest sequence: its answer moves with padding.
    ids, lengths, _ = PadCollate(99, 20)([(s, 0) for s in seqs])
    assert not torch.allclose(model(ids)[:, -1], alone, atol=1e-3)


def test_select_trainable_parts():
    model = tiny_classifier(2)
    head = sum(p.numel() for p in model.lm_head.parameters())
    block = sum(p.numel() for p in model.h[-1].parameters()) + sum(p.numel() for p in model.ln_f.parameters())
    assert model.lm_head.weight.shape == (2, 32) and model.lm_head.weight is not model.wte.weight
    assert select_trainable(model, "head") == head
    assert select_trainable(model, "last-block") == head + block
    assert not model.h[0].attn.c_attn.weight.requires_grad and not model.wte.weight.requires_grad
    assert model.h[-1].mlp.c_fc.weight.requires_grad and model.ln_f.weight.requires_grad
    assert select_trainable(model, "all") == model.num_parameters()
    with pytest.raises(GptlabError, match="unknown trainable part 'adapters'"):
        select_trainable(model, "adapters")
    with pytest.raises(GptlabError, match="only a model with LoRA adapters"):
        select_trainable(model, "lora")  # tests/test_lora.py: with adapters


# ---- reading and splitting ------------------------------------------------------------------------

def test_reads_the_whole_sms_collection():
    table = read_labeled_file(SMS)
    assert len(table.texts) == 5574
    assert table.labels.count("ham") == 4827 and table.labels.count("spam") == 747
    assert table.texts[2].startswith("Free entry in 2 a wkly comp") and table.lines[2] == 3
    quoted = [t for t in table.texts if t.startswith('"')]
    assert quoted and all('"' in t[1:] for t in quoted[:5])  # quotes are text, never field delimiters


def test_balanced_stratified_split_is_seeded_and_complete():
    table = read_labeled_file(SMS)
    ids = [["ham", "spam"].index(label) for label in table.labels]
    s = split_examples(ids, ["ham", "spam"], balance=True, seed=123)
    for part, n in ((s.train, 523), (s.val, 75), (s.test, 149)):
        assert [ids[i] for i in part].count(0) == n and [ids[i] for i in part].count(1) == n
    every = s.train + s.val + s.test + s.left_out
    assert sorted(every) == list(range(5574))
    assert len(s.left_out) == 4827 - 747 and all(ids[i] == 0 for i in s.left_out)
    assert split_examples(ids, ["ham", "spam"], balance=True, seed=123) == s
    assert split_examples(ids, ["ham", "spam"], balance=True, seed=124).test != s.test
    unbalanced = split_examples(ids, ["ham", "spam"], split=(0.8, 0.0, 0.2))
    assert not unbalanced.val and not unbalanced.left_out and len(unbalanced.test) == 965 + 149


def test_reads_quoted_csv_with_bom_and_multiline_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('\ufeffid,text,label\n1,"hello, world",a\n2,"two\nlines ""quoted""",b\n', encoding="utf-8")
    table = read_labeled_file(path)
    assert table.texts == ["hello, world", 'two\nlines "quoted"'] and table.labels == ["a", "b"] and table.lines == [2, 3]


def test_reads_jsonl_and_headerless_positions(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hello", "label": 1}\n\n{"text": "bye", "label": 0, "id": 7}\n')
    table = read_labeled_file(path)
    assert table.texts == ["hello", "bye"] and table.labels == ["1", "0"] and table.lines == [1, 3]
    tsv = tmp_path / "three.txt"
    tsv.write_text("a\tx\tfirst text\nb\ty\tsecond text\n")
    table = read_labeled_file(tsv, text_column="2", label_column="1")
    assert table.texts == ["first text", "second text"] and table.labels == ["x", "y"]


# ---- metrics --------------------------------------------------------------------------------------

def test_classification_report_by_hand(tmp_path):
    true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    pred = [0, 0, 1, 1, 2, 2, 2, 2, 0]
    assert confusion_matrix(true, pred, 3) == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    r = classification_report(true, pred, ["a", "b", "c"])
    assert r.accuracy == pytest.approx(6 / 9)
    a, b, c = r.per_class
    assert (a.precision, a.recall, a.support) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert (b.precision, b.recall, b.f1) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5))
    assert c.f1 == pytest.approx(2 * 0.75 * 0.75 / 1.5)
    text = r.format()
    assert "accuracy 66.67% (6/9)" in text and "confusion matrix" in text
    plot_confusion_matrix(r, tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    never_predicted = classification_report([0, 1], [0, 0], ["x", "y"])
    assert never_predicted.per_class[1].precision == 0.0 and never_predicted.per_class[1].f1 == 0.0


# ---- bad input: one clear error each, nothing written ------------------------------------------------

@pytest.mark.parametrize("content, name, message", [
    ("id,message,category\n1,hi,ham\n2,win,spam\n", "d.csv",
     "no text column 'text' (columns found: 'id', 'message', 'category')"),
    ("text,kind\nhi,ham\nwin,spam\n", "d.csv", "no label column 'label' (columns found: 'text', 'kind')"),
    ('{"text": "hi", "label": "a"}\n{"text": "yo"}\n', "d.jsonl", "line 2: no label key 'label' (keys found: text)"),
    ("label,text\nham,hi\nham,hello\nspam,win\n", "d.csv", "label 'spam' has only 1 example (line 4)"),
    ("label,text\nham,hi\nspam,  \nspam,win\nham,\n", "d.csv", "2 empty text(s) in column 'text' at line(s) 3, 5"),
    ("label,text\nham,hi\nham,hello\nham,hey\n", "d.csv", "only one class ('ham')"),
    ("ham\thi there\nspam\twin, now\nspam,win cash\nham\tok\n", "SMS", "line 3: 1 field(s) where the first row has 2; "
     "it contains ',' where the rest of the file uses tab: mixed delimiters"),
    ("label,text\nham,hi\nspam\twin\n", "d.csv", "line 3: 1 field(s) where the first row has 2; it contains tab"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, capsys, content, name, message):
    path = tmp_path / name
    path.write_text(content)
    out = tmp_path / "run"
    assert main(["finetune-classifier", "--data", str(path), "--out", str(out), "--preset", "tiny", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


# ---- end to end -----------------------------------------------------------------------------------

def train_args(data, out, *extra):
    return ["finetune-classifier", "--data", str(data), "--out", str(out), "--preset", "tiny", "--epochs", "6",
            "--lr", "3e-3", "--batch-size", "16", "--device", "cpu", "--quiet", *extra]


def test_train_evaluate_and_classify_three_classes(tmp_path, capsys):
    data = write_csv(tmp_path / "d.csv", synthetic_rows(40))
    out = tmp_path / "run"
    assert main(train_args(data, out, "--split", "0.6", "0.2", "0.2")) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "confusion matrix" in printed
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["test"]["n"] == 24 and evaluation["test"]["accuracy"] >= 0.9
    assert set(evaluation["test"]["per_class"]) == {"ham", "spam", "work"}
    for name in ("accuracy.png", "confusion_matrix.png", "loss.png", "train_state.pt"):
        assert (out / name).is_file()
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == [f"{e}.000" for e in range(1, 7)]  # evaluated once per epoch
    assert float(rows[-1]["train_acc"]) >= 0.9 and rows[-1]["val_acc"]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])

    config = read_run_config(out)
    assert config["stage"] == "classifier" and config["labels"] == ["ham", "spam", "work"]
    model, _, _ = load_run(out)  # the 3-wide head comes back through the ordinary run loader
    assert model.lm_head.weight.shape == (3, 32) and model.lm_head.bias is not None

    assert main(["classify", "--model", str(out), "win free cash prize now"]) == 0
    label, prob = capsys.readouterr().out.strip().split("\t")
    assert label == "spam" and 1 / 3 < float(prob) <= 1

    texts = tmp_path / "in.jsonl"
    texts.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for y, t in synthetic_rows(5, seed=9)))
    assert main(["classify", "--model", str(out), "--input", str(texts), "--output", str(tmp_path / "o.csv")]) == 0
    assert "accuracy" in capsys.readouterr().out
    with open(tmp_path / "o.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 15 and set(got[0]) == {"text", "label", "probability", "true_label", "p_ham", "p_spam", "p_work"}
    assert sum(r["label"] == r["true_label"] for r in got) >= 13
    assert all(abs(float(r["p_ham"]) + float(r["p_spam"]) + float(r["p_work"]) - 1) < 1e-4 for r in got)

    # A batch gives each text the probability it gets alone, whatever the others' lengths.
    clf = Classifier.load(out)
    batch = clf.predict_proba([t for _, t in synthetic_rows(3, seed=4)])
    alone = torch.cat([clf.predict_proba([t]) for _, t in synthetic_rows(3, seed=4)])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


def test_balancing_reports_the_left_out_false_positive_rate(tmp_path, capsys):
    rows = [r for r in synthetic_rows(60, classes=("ham",))] + [r for r in synthetic_rows(15, seed=1, classes=("spam",))]
    data = write_csv(tmp_path / "sms", rows, header=None, delimiter="\t")  # the SMS Spam Collection's layout
    out = tmp_path / "run"
    assert main(train_args(data, out, "--balance", "--padding", "longest")) == 0
    assert "false-positive rate" in capsys.readouterr().out
    left_out = json.loads((out / "evaluation.json").read_text())["left_out"]
    assert left_out["n"] == 45 and left_out["counts"] == {"ham": 45} and left_out["positive"] == "spam"
    assert left_out["false_positive_rate"] == pytest.approx(left_out["predicted"].get("spam", 0) / 45)
    assert left_out["false_positive_rate"] <= 0.1


@pytest.mark.parametrize("kind", ["run", "hf"])
def test_init_from_a_pretrained_model_trains_only_the_last_block(tmp_path, capsys, kind):
    from gptlab.run import save_model
    from gptlab.tokenizer import get_tokenizer
    from gptlab.weights import export_hf

    torch.manual_seed(0)
    base = GPTModel(GPTConfig.preset("tiny"))  # GPT-2's vocabulary, as from `gptlab pretrain --preset tiny`
    source = tmp_path / "base"
    if kind == "run":
        save_model(source, base, get_tokenizer("gpt2"), {"stage": "pretrain"})
    else:
        export_hf(base, source, get_tokenizer("gpt2"))  # the layout `--init gpt2` downloads from the hub
    data = write_csv(tmp_path / "d.csv", synthetic_rows(12, classes=("ham", "spam")))
    out = tmp_path / "run"
    assert main(train_args(data, out, "--init", str(source), "--epochs", "1")) == 0
    config = read_run_config(out)
    assert config["classifier"]["trainable"] == "last-block" and config["classifier"]["init"] == str(source)
    tuned = load_file(out / "model.safetensors")
    before = base.state_dict()
    assert torch.equal(tuned["wte.weight"], before["wte.weight"])  # frozen
    assert torch.equal(tuned["h.0.attn.c_attn.weight"], before["h.0.attn.c_attn.weight"])
    assert not torch.equal(tuned["h.1.attn.c_attn.weight"], before["h.1.attn.c_attn.weight"])  # the last block trained
    assert tuned["lm_head.weight"].shape == (2, 32)


def test_resume_continues_a_classifier_run(tmp_path):
    data = write_csv(tmp_path / "d.csv", synthetic_rows(12, classes=("ham", "spam")))
    out = tmp_path / "run"
    assert main(train_args(data, out, "--max-steps", "2", "--eval-interval", "1")) == 0
    assert main(train_args(data, out, "--max-steps", "4", "--eval-interval", "1", "--resume")) == 0
    with open(out / "metrics.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3", "4"]
    assert main(train_args(data, out)) == 2  # an existing run is never overwritten silently


def test_classify_refuses_a_language_model_run(tmp_path, capsys):
    from gptlab.run import save_model
    from gptlab.tokenizer import get_tokenizer

    save_model(tmp_path / "lm", GPTModel(GPTConfig.preset("tiny")), get_tokenizer("gpt2"), {"stage": "pretrain"})
    assert main(["classify", "--model", str(tmp_path / "lm"), "hello"]) == 2
    assert "not a classifier run (stage 'pretrain')" in capsys.readouterr().err


# ---- the house: seeding, surgery, records, plots ----------------------------------------------------

def test_from_scratch_runs_with_one_seed_are_identical_whatever_the_global_rng(tmp_path):
    from gptlab.finetune.classifier import finetune_classifier
    from gptlab.train import TrainConfig

    data = write_csv(tmp_path / "d.csv", synthetic_rows(8, classes=("ham", "spam")))
    config = TrainConfig(max_steps=2, eval_interval=2, batch_size=8, lr=3e-3, seed=7, device="cpu")
    weights = []
    for global_seed, name in ((1, "a"), (2, "b")):  # the stage must seed itself, not rely on the caller's RNG
        torch.manual_seed(global_seed)
        finetune_classifier(data, tmp_path / name, config, progress=False)
        weights.append(load_file(tmp_path / name / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    other = TrainConfig(**{**config.__dict__, "seed": 8})
    finetune_classifier(data, tmp_path / "c", other, progress=False)
    assert not torch.equal(load_file(tmp_path / "c" / "model.safetensors")["wte.weight"], weights[0]["wte.weight"])


def test_rebuild_head_from_the_run_config():
    from gptlab.surgery import rebuild_head

    with torch.device("meta"):  # as the run loader builds a model: the head gets no values to overwrite
        model = GPTModel(GPTConfig.preset("tiny", vocab_size=100))
    rng = torch.get_rng_state()
    rebuild_head(model, {"stage": "classifier", "labels": ["a", "b", "c"]})
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn from the global generator
    assert model.lm_head.weight.shape == (3, 32) and model.lm_head.bias.shape == (3,)
    assert model.lm_head.weight.device.type == "meta" and model.lm_head.weight is not model.wte.weight
    lm = GPTModel(GPTConfig.preset("tiny", vocab_size=100))
    head = lm.lm_head
    assert rebuild_head(lm, {"stage": "pretrain"}).lm_head is head  # a language model keeps its head
    with pytest.raises(GptlabError, match="at least 2"):
        rebuild_head(lm, {"labels": ["only"]})


def test_trainable_parts_are_the_command_lines_choices():
    from gptlab.config import TRAINABLE_CHOICES
    from gptlab.surgery import TRAINABLE_PARTS

    assert tuple(TRAINABLE_PARTS) == (*TRAINABLE_CHOICES, "lora")  # lora: what --lora selects


def test_reads_a_pretty_printed_json_list_with_real_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "hi", "label": "a"}, {"text": "yo", "label": "b"}, {"text": " "}], indent=2))
    with pytest.raises(GptlabError, match=r"d.json line 10: no label key 'label'"):
        read_labeled_file(path)
    path.write_text(json.dumps([{"text": "hi", "label": "a"}, {"text": "", "label": "b"}], indent=2))
    with pytest.raises(GptlabError, match=r"1 empty text\(s\) in column 'text' at line\(s\) 6"):
        read_labeled_file(path)
    path.write_text(json.dumps([{"text": "hi", "label": "a"}, ["yo", "b"]], indent=1))
    with pytest.raises(GptlabError, match=r"d.json line 6: record 1 is a list, not an object with 'text' and 'label'"):
        read_labeled_file(path)


def test_plots_leave_matplotlibs_global_state_alone(tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom gptlab.evaluate import classification_report, plot_confusion_matrix, plot_score_histogram\n"
            f"plot_confusion_matrix(classification_report([0, 1, 1], [0, 1, 0], ['a', 'b']), {str(tmp_path / 'c.png')!r})\n"
            f"plot_score_histogram([10, 50, 90], {str(tmp_path / 'h.png')!r})\n"
            "print('matplotlib.pyplot' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"  # no pyplot, so no backend switched and no figure left open
    for name in ("c.png", "h.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
