"""Instruction fine-tuning: records, prompt styles, the collate, training, respond and chat."""
import io
import json
import logging

import pytest
import torch

from conftest import DATA
from gptlab.bpe import train_bpe
from gptlab.chat import chat, fit_conversation
from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.finetune.instruct import finetune_instruct
from gptlab.instruction_data import (
    InstructionDataset,
    InstructionExample,
    collate_instructions,
    default_data_path,
    load_instruction_records,
    split_records,
)
from gptlab.respond import model_prompt_style, respond
from gptlab.prompts import ALPACA, PHI3, get_prompt_style

from gptlab.weights import load_run
from gptlab.tokenizer import get_tokenizer
from gptlab.train import TrainConfig

PAD = 50256


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


# ---- the collate ---------------------------------------------------------------------------------

def test_collate_matches_the_books_example():
    inputs, targets = collate_instructions([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], pad_id=PAD)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, PAD, PAD, PAD], [7, 8, 9, PAD, PAD]]
    assert targets.tolist() == [[1, 2, 3, 4, PAD], [6, PAD, -100, -100, -100], [8, 9, PAD, -100, -100]]
    assert inputs.dtype == targets.dtype == torch.long


def test_collate_equals_the_books_custom_collate_fn_on_random_batches():
    from llms_from_scratch.ch07 import custom_collate_fn

    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        batch = [torch.randint(0, 50000, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(int(torch.randint(1, 5, (1,), generator=g)))]
        max_length = [None, 3, 7][trial % 3]
        ours = collate_instructions(batch, pad_id=PAD, max_length=max_length)
        book = custom_collate_fn(batch, pad_token_id=PAD, allowed_max_length=max_length)
        assert torch.equal(ours[0], book[0]) and torch.equal(ours[1], book[1])


def test_collate_truncates_and_masks_the_prompt():
    inputs, targets = collate_instructions([InstructionExample([10, 11, 12, 13, 14], 3), InstructionExample([20, 21], 1)],
                                           pad_id=PAD, mask_prompt=True)
    # target i predicts token i + 1: the response starts at token 3, so target 2 is the first one learned
    assert targets.tolist() == [[-100, -100, 13, 14, PAD], [21, PAD, -100, -100, -100]]
    assert inputs.tolist() == [[10, 11, 12, 13, 14], [20, 21, PAD, PAD, PAD]]
    inputs, targets = collate_instructions([InstructionExample([10, 11, 12, 13, 14], 3)], pad_id=PAD,
                                           max_length=3, mask_prompt=False)
    assert inputs.tolist() == [[10, 11, 12]] and targets.tolist() == [[11, 12, 13]]


def test_collate_keeps_a_pad_id_inside_the_text_as_a_target():
    # The book masks by value; by position, an <|endoftext|> the text really contains is still learned.
    _, targets = collate_instructions([[1, PAD, 2], [3]], pad_id=PAD)
    assert targets.tolist() == [[PAD, 2, PAD], [PAD, -100, -100]]


# ---- prompt styles -------------------------------------------------------------------------------

def test_alpaca_layout_is_the_books(tok):
    from llms_from_scratch.ch07 import InstructionDataset as BookDataset
    from llms_from_scratch.ch07 import format_input

    records = load_instruction_records(DATA / "instruction-data.json")[:40]
    for r in records:
        assert ALPACA.prompt(r["instruction"], r["input"]) == format_input(r) + "\n\n### Response:\n"
    ours = InstructionDataset(records, tok, ALPACA)
    book = BookDataset(records, tok)
    assert [e.ids for e in ours] == [book[i] for i in range(len(book))]
    assert all(e.prompt_len == len(tok.encode(ALPACA.prompt(r["instruction"], r["input"])))
               for e, r in zip(ours, records))


def test_phi3_layout_and_extraction():
    assert PHI3.prompt("Name a color.") == "<|user|>\nName a color.\n<|assistant|>:\n"
    assert PHI3.prompt("Fix it.", "teh") == "<|user|>\nFix it.\nteh\n<|assistant|>:\n"
    assert PHI3.extract_response(" Blue. \n<|user|>\nmore") == "Blue."
    assert ALPACA.extract_response("Blue.\n\n### Instruction:\nName another") == "Blue."
    assert ALPACA.extract_response("  no stop at all  ") == "no stop at all"
    assert get_prompt_style("phi3") is PHI3
    with pytest.raises(GptlabError, match="unknown prompt style 'llama9'.*alpaca"):
        get_prompt_style("llama9")


def test_chat_layout_multi_turn():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a color."}]
    assert PHI3.chat(messages) == "<|user|>\nHi\n<|assistant|>:\nHello.\n<|user|>\nName a color.\n<|assistant|>:\n"
    assert ALPACA.chat(messages[-1:]) == ALPACA.prompt("Name a color.")


# ---- records and splits --------------------------------------------------------------------------

def test_shipped_data_is_the_books_and_splits_like_the_book():
    records = load_instruction_records(default_data_path())
    assert len(records) == 1100 and records == load_instruction_records(DATA / "instruction-data.json")
    train, test, val = split_records(records)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train[0] == records[0] and test[0] == records[935] and val[-1] == records[-1]
    shuffled = split_records(records, seed=1)
    assert shuffled == split_records(records, seed=1) and shuffled[0] != train
    assert sorted(map(json.dumps, sum(shuffled, []))) == sorted(map(json.dumps, records))


def test_jsonl_and_optional_input(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "input": null, "output": "d"}\n')
    assert load_instruction_records(path) == [{"instruction": "a", "output": "b", "input": ""},
                                              {"instruction": "c", "input": "", "output": "d"}]


@pytest.mark.parametrize("content, message", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], r"record 1 has no 'output'"),
    ([{"output": "b"}], r"record 0 has no 'instruction'"),
    ([{"instruction": "a", "output": 3}], r"record 0: 'output' must be a string"),
    ([["a", "b"]], r"record 0 is a list"),
    ([], r"no records"),
])
def test_bad_records_name_the_record(tmp_path, content, message):
    with pytest.raises(GptlabError, match=message):
        load_instruction_records(write_json(tmp_path / "d.json", content))


def test_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text('[{"instruction": "a", "output": "b"},\n oops]')
    with pytest.raises(GptlabError, match=r"bad.json: not valid JSON \(line 2"):
        load_instruction_records(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    with pytest.raises(GptlabError, match=r"line 2 is not valid JSON"):
        load_instruction_records(tmp_path / "bad.jsonl")
    (tmp_path / "missing.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(GptlabError, match=r"record 1 \(line 2\) has no 'output'"):
        load_instruction_records(tmp_path / "missing.jsonl")
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(GptlabError, match="empty"):
        load_instruction_records(tmp_path / "empty.json")
    with pytest.raises(GptlabError, match="no such file"):
        load_instruction_records(tmp_path / "nope.json")
    with pytest.raises(GptlabError, match="split fractions"):
        split_records([{}] * 10, 0.9, 0.2)


def test_prompts_longer_than_the_context_are_left_out_by_name(tok, caplog):
    records = [{"instruction": "short", "input": "", "output": "ok"},
               {"instruction": "long " * 100, "input": "", "output": "ok"}]
    with caplog.at_level(logging.WARNING, logger="gptlab"):
        dataset = InstructionDataset(records, tok, ALPACA, max_length=64, name="d.json")
    assert len(dataset) == 1 and "record 1 (" in caplog.text and "context of 64" in caplog.text
    with pytest.raises(GptlabError, match="every prompt is longer than the context of 64"):
        InstructionDataset(records[1:], tok, ALPACA, max_length=64, name="d.json")


# ---- training, respond, chat ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny model fine-tuned on a repetitive toy task; phi3 style, prompt masked."""
    root = tmp_path_factory.mktemp("instruct")
    colors = ["red", "blue", "green", "black", "white"]
    records = [{"instruction": f"Repeat the word {c}.", "input": "", "output": f"{c} {c}"} for c in colors * 8]
    data = write_json(root / "toy.json", records)
    # A small vocabulary learned from the toy records keeps the output layer (and the test) small.
    corpus = "\n".join(PHI3.example(r["instruction"], "", r["output"]) for r in records) + " <|endoftext|>"
    train_bpe(corpus, 300).save(root / "tok")
    out = root / "run"
    config = TrainConfig(max_steps=30, batch_size=8, lr=3e-3, eval_interval=15, warmup_steps=2, device="cpu")
    result = finetune_instruct(data, out, preset="tiny", tokenizer=str(root / "tok"), prompt_style="phi3",
                               train_config=config, mask_prompt=True, train_fraction=0.8, test_fraction=0.1,
                               progress=False)
    return out, result


def test_finetune_lowers_validation_loss_and_records_the_style(trained_run):
    out, result = trained_run
    _, _, config = load_run(out)
    assert config["stage"] == "instruct" and config["prompt_style"] == "phi3" and config["mask_prompt"] is True
    assert config["split"] == {"train": 32, "test": 4, "val": 4, "seed": None}
    assert result.step == 30 and result.val_loss < config["initial_val_loss"] - 2.0
    assert len(json.loads((out / "test.json").read_text())) == 4
    assert (out / "metrics.csv").is_file() and (out / "loss.png").is_file()
    assert model_prompt_style(out) is PHI3 and model_prompt_style(out, "alpaca") is ALPACA
    assert model_prompt_style("gpt2") is ALPACA  # not a run directory: the default


def test_respond_adds_extracted_answers(trained_run, tok):
    out, _ = trained_run
    model, tokenizer, _ = load_run(out)
    records = json.loads((out / "test.json").read_text())
    answered = respond(model, tokenizer, PHI3, records, max_new_tokens=8, progress=False)
    assert [{k: v for k, v in r.items() if k != "model_response"} for r in answered] == records
    assert all(isinstance(r["model_response"], str) and "<|user|>" not in r["model_response"] for r in answered)


def test_cli_respond_and_offline_judge(trained_run, tmp_path, capsys):
    out, _ = trained_run
    responses = tmp_path / "responses.json"
    assert main(["respond", "--model", str(out), "--output", str(responses), "--max-new-tokens", "6",
                 "--limit", "2", "--quiet", "--device", "cpu"]) == 0
    assert "phi3 style" in capsys.readouterr().out
    assert len(json.loads(responses.read_text())) == 2
    assert main(["judge", "--input", str(responses), "--offline"]) == 0
    printed = capsys.readouterr().out
    assert "2 records: ROUGE-L" in printed and "exact match" in printed
    scored = json.loads((tmp_path / "responses.judged.json").read_text())
    assert all("rouge_l" in r and "exact_match" in r for r in scored)


def test_cli_errors_are_one_line(tmp_path, capsys):
    write_json(tmp_path / "d.json", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    assert main(["finetune-instruct", "--data", str(tmp_path / "d.json"), "--preset", "tiny",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "record 1 has no 'output'" in err
    (tmp_path / "x.json").write_text("hello")
    assert main(["respond", "--model", str(tmp_path), "--input", str(tmp_path / "x.json"),
                 "--output", str(tmp_path / "o.json")]) == 2
    assert "line 1 is not valid JSON" in capsys.readouterr().err


def scripted(lines):
    lines = list(lines)

    def read(prompt):
        if not lines:
            raise EOFError
        line = lines.pop(0)
        if isinstance(line, BaseException):
            raise line
        return line
    return read


def test_chat_keeps_turns_and_survives_ctrl_c(trained_run, monkeypatch):
    out, _ = trained_run
    model, tokenizer, _ = load_run(out)
    shown = io.StringIO()
    messages = chat(model, tokenizer, PHI3, max_new_tokens=5, read=scripted(["Repeat the word red.", "", "/help",
                                                                            "And blue?", KeyboardInterrupt()]),
                    out=shown)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "And blue?" and "/reset" in shown.getvalue()

    def interrupted(*args, **kwargs):
        yield "red"
        raise KeyboardInterrupt

    monkeypatch.setattr("gptlab.chat.stream_text", interrupted)
    shown = io.StringIO()
    messages = chat(model, tokenizer, PHI3, read=scripted(["hi", "/reset", "again", "/exit", "never read"]), out=shown)
    assert "red [stopped]" in shown.getvalue() and "forgotten" in shown.getvalue()
    assert messages == [{"role": "user", "content": "again"}, {"role": "assistant", "content": "red"}]


def test_fit_conversation_drops_the_oldest_turns(tok):
    messages = [{"role": "user", "content": "one " * 20}, {"role": "assistant", "content": "two " * 20},
                {"role": "user", "content": "three"}]
    full = len(tok.encode(PHI3.chat(messages)))
    prompt, dropped = fit_conversation(PHI3, tok, list(messages), budget=full)
    assert dropped == 0 and prompt == PHI3.chat(messages)
    kept = list(messages)
    prompt, dropped = fit_conversation(PHI3, tok, kept, budget=full - 1)
    assert dropped == 2 and kept == messages[2:] and prompt == PHI3.prompt("three")
    with pytest.raises(GptlabError, match="must fit in 3"):
        fit_conversation(PHI3, tok, [{"role": "user", "content": "a long message"}], budget=3)


# ---- the house: one JSON reader, seeding ----------------------------------------------------------

def test_records_name_their_real_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}], indent=2))
    with pytest.raises(GptlabError, match=r"record 1 \(line 6\) has no 'output'"):
        load_instruction_records(path)
    path.write_text('[{"instruction": "a", "output": "b"},\n\n 7]')
    with pytest.raises(GptlabError, match=r"d.json line 3: record 1 is an int, not an object with 'instruction'"):
        load_instruction_records(path)
    path.write_text('{\n  "instruction": "a",\n  "output": "b"\n}\n')  # one object, pretty-printed
    with pytest.raises(GptlabError, match=r"one JSON object, not a list of records; put the records in a list"):
        load_instruction_records(path)
    for bad in ('[{"instruction": "a", "output": "b"} {"instruction": "c"}]', '[{"instruction": "a", "output": "b"},]',
                '[{"instruction": "a", "output": "b"}] extra'):
        path.write_text(bad)
        with pytest.raises(GptlabError, match=r"d.json: not valid JSON \(line 1"):
            load_instruction_records(path)


def test_jsonl_keeps_unicode_line_separators_inside_texts(tmp_path):
    path = tmp_path / "d.jsonl"
    records = [{"instruction": "a\u2028b", "output": "c\u2029d"}, {"instruction": "e", "output": "f"}]
    path.write_text("\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert load_instruction_records(path) == [{**r, "input": ""} for r in records]


def test_runs_from_a_preset_with_one_seed_are_identical_whatever_the_global_rng(tmp_path):
    from safetensors.torch import load_file

    records = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("yes", "no", "maybe", "so")] * 3
    data = write_json(tmp_path / "d.json", records)
    config = TrainConfig(max_steps=2, eval_interval=2, batch_size=4, lr=1e-3, seed=5, device="cpu")
    weights = []
    for global_seed, name in ((1, "a"), (2, "b")):  # the stage must seed itself, not rely on the caller's RNG
        torch.manual_seed(global_seed)
        finetune_instruct(data, tmp_path / name, config, preset="tiny", progress=False)
        weights.append(load_file(tmp_path / name / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_resume_replays_the_stored_settings(tmp_path):
    from gptlab.run import read_run_config

    records = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("yes", "no", "maybe", "so")] * 3
    data = write_json(tmp_path / "d.json", records)
    out = tmp_path / "run"
    first = TrainConfig(max_steps=1, eval_interval=1, batch_size=4, device="cpu")
    finetune_instruct(data, out, first, preset="tiny", prompt_style="phi3", mask_prompt=True, progress=False)
    more = TrainConfig(**{**first.__dict__, "max_steps": 2})
    result = finetune_instruct(None, out, more, resume=True, progress=False)  # no settings given: the run's
    config = read_run_config(out)
    assert result.step == 2 and config["prompt_style"] == "phi3" and config["mask_prompt"] is True
    assert config["instruct"]["data"] == str(data) and config["instruct"]["preset"] == "tiny"
