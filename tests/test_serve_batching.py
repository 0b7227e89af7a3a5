"""`gptlab serve` for many users: continuous batching over HTTP, Ollama's API (the official ``ollama`` client
and the LLMs-from-scratch book's ``query_model``), OpenAI's logprobs, and ``gptlab judge`` against the server.

Answers are compared with ``gptlab.generate`` for the same prompt and settings, as in test_serve.py.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time

import httpx
import ollama
import openai
import pytest
import torch
from llms_from_scratch.ch07 import query_model

from gptlab.cli import main
from gptlab.generate import generate_text
from gptlab.model import GPTConfig, GPTModel
from gptlab.run import save_model
from gptlab.serve import BackgroundServer, ServedModel, ServeLimits, create_app
from gptlab.tokenizer import GPT2Tokenizer
from test_serve import ServeProcess, wait_until  # pytest puts tests/ on sys.path (its default import mode)

KEY = "batch-key"
LIMITS = ServeLimits(max_tokens=3000, default_max_tokens=12, max_n=3, max_active=8)
STEP_S = 0.05


@pytest.fixture(scope="module")
def served(tiny_lm_run):
    return ServedModel.load(tiny_lm_run)


@pytest.fixture(scope="module")
def open_server(served):
    """No API key: the book's query_model sends none."""
    with BackgroundServer(create_app(served, limits=LIMITS)) as srv:
        yield srv


@pytest.fixture(scope="module")
def keyed_server(served):
    with BackgroundServer(create_app(served, api_key=KEY, limits=LIMITS)) as srv:
        yield srv


def chat_reference(served: ServedModel, content: str, max_tokens: int, **kwargs) -> str:
    style = served.prompt_style
    prompt = style.chat([{"role": "user", "content": content}])
    return generate_text(served.model, served.tokenizer, prompt, max_tokens, stop=style.stop, **kwargs)


# ---- continuous batching over HTTP --------------------------------------------------------------

def test_concurrent_requests_each_get_what_they_would_alone(open_server, served):
    prompts = ["Every effort moves you", "The quick brown fox jumps over the lazy dog and", "Hi", "Once upon a time"]
    lengths = [20, 6, 31, 13]

    async def ask(http, prompt, n):
        r = await http.post(open_server.url + "/v1/completions",
                            json={"prompt": prompt, "max_tokens": n, "temperature": 0})
        return r.json()["choices"][0]["text"]

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(ask(http, p, n) for p, n in zip(prompts, lengths)))

    worker = open_server.app.state.worker
    texts = asyncio.run(scenario())
    assert texts == [generate_text(served.model, served.tokenizer, p, n) for p, n in zip(prompts, lengths)]
    assert wait_until(lambda: worker.rows == 0 and worker.batch.cache is None)  # idle: no cache held


def test_n_choices_decode_together_each_with_its_seed(open_server, served):
    client = openai.OpenAI(base_url=open_server.url + "/v1", api_key="-", max_retries=0)
    r = client.completions.create(model="tiny-lm", prompt="Hello there", max_tokens=10, temperature=0.9, seed=40, n=3)
    want = [generate_text(served.model, served.tokenizer, "Hello there", 10, temperature=0.9, seed=40 + i)
            for i in range(3)]
    assert [c.text for c in r.choices] == want and len(set(want)) == 3


# ---- OpenAI's logprobs ----------------------------------------------------------------------------

def test_chat_logprobs_are_the_models_and_match_the_text(open_server, served):
    client = openai.OpenAI(base_url=open_server.url + "/v1", api_key="-", max_retries=0)
    r = client.chat.completions.create(model="tiny-lm", messages=[{"role": "user", "content": "Say a word"}],
                                       max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    # the first token's log-probability, recomputed from the model on the laid-out prompt
    ids = served.tokenizer.encode(served.prompt_style.chat([{"role": "user", "content": "Say a word"}]))
    with torch.no_grad():
        logp = torch.log_softmax(served.model(torch.tensor([ids]))[0, -1], dim=-1)
    assert math.isclose(content[0].logprob, float(logp.max()), abs_tol=1e-4)
    assert content[0].top_logprobs[0].token == content[0].token  # greedy: the top token is the one taken
    stream = client.chat.completions.create(model="tiny-lm", messages=[{"role": "user", "content": "Say a word"}],
                                            max_tokens=8, temperature=0, logprobs=True, stream=True)
    streamed = [t for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for t in chunk.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_completion_logprobs_legacy_shape_and_limits(open_server):
    body = {"prompt": "Every effort", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    choice = httpx.post(open_server.url + "/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["token_logprobs"]) == 5
    assert all(len(top) <= 2 for top in lp["top_logprobs"]) and lp["text_offset"][0] == 0
    for bad, param in (({"logprobs": 6}, "logprobs"), ({"logprobs": 1, "echo": True}, "echo with logprobs")):
        r = httpx.post(open_server.url + "/v1/completions", json={**body, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith(param)
    r = httpx.post(open_server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


# ---- Ollama's API ---------------------------------------------------------------------------------

def test_the_books_query_model_works_unchanged(open_server, served, caplog):
    with caplog.at_level(logging.INFO, logger="gptlab"):
        reply = query_model("Name a colour.", model="tiny-lm", url=open_server.url + "/api/chat")
    # seed 123, temperature 0: greedy, LIMITS.default_max_tokens new tokens; num_ctx is ignored, with a log line
    assert reply == chat_reference(served, "Name a colour.", LIMITS.default_max_tokens)
    assert any("num_ctx" in r.getMessage() for r in caplog.records)


def test_the_ollama_client_chat_generate_and_model_routes(open_server, served):
    client = ollama.Client(host=open_server.url)
    messages = [{"role": "user", "content": "Tell me about rivers"}]
    r = client.chat(model="tiny-lm", messages=messages, options={"temperature": 0, "num_predict": 9})
    assert r.message.role == "assistant" and r.message.content == chat_reference(served, "Tell me about rivers", 9)
    assert r.done and r.done_reason in ("stop", "length") and r.eval_count <= 9 and r.prompt_eval_count > 0
    options = {"temperature": 0.8, "top_k": 20, "top_p": 0.95, "seed": 7, "num_predict": 10, "stop": ["zz"]}
    parts = list(client.generate(model="tiny-lm:latest", prompt="Rivers", raw=True, options=options, stream=True))
    want = generate_text(served.model, served.tokenizer, "Rivers", 10, temperature=0.8, top_k=20, top_p=0.95, seed=7,
                         stop=["zz"])
    assert "".join(p.response for p in parts) == want and parts[-1].done and not parts[0].done
    # Ollama's defaults for what a request leaves out: temperature 0.8, top_k 40, top_p 0.9
    r = client.generate(model="tiny-lm", prompt="Rivers", raw=True, options={"seed": 3, "num_predict": 6})
    assert r.response == generate_text(served.model, served.tokenizer, "Rivers", 6, temperature=0.8, top_k=40,
                                       top_p=0.9, seed=3)
    (entry,) = client.list().models
    assert entry.model == "tiny-lm" and entry.details.family == "gpt2" and entry.size > 0
    info = client.show("tiny-lm").modelinfo
    assert info["gpt2.context_length"] == 64 and info["general.parameter_count"] == served.model.num_parameters()
    assert httpx.get(open_server.url + "/api/version").json()["version"]


def test_ollama_streams_ndjson_lines_and_an_empty_prompt_just_loads(open_server, served):
    url = open_server.url + "/api/generate"
    r = httpx.post(url, json={"model": "tiny-lm", "prompt": "Rivers", "raw": True,
                              "options": {"temperature": 0, "num_predict": 5}})
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert r.headers["content-type"].startswith("application/x-ndjson") and len(lines) >= 2
    assert not any(line["done"] for line in lines[:-1]) and lines[-1]["done"] and lines[-1]["eval_count"] == 5
    assert "".join(line["response"] for line in lines) == generate_text(served.model, served.tokenizer, "Rivers", 5)
    assert lines[-1]["done_reason"] == "length" and lines[-1]["total_duration"] >= lines[-1]["eval_duration"] > 0
    (loaded,) = [json.loads(line) for line in httpx.post(url, json={"model": "tiny-lm"}).text.splitlines()]
    assert loaded["done"] and loaded["done_reason"] == "load" and loaded["response"] == ""
    assert httpx.post(url, json={"model": "tiny-lm", "stream": False}).json()["done_reason"] == "load"


def test_ollama_errors_are_ollamas_shape(open_server, keyed_server):
    client = ollama.Client(host=open_server.url)
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="llama3", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404 and "llama3" in e.value.error
    for num_predict in (0, -1, 3001):
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model="tiny-lm", prompt="x", options={"num_predict": num_predict})
        assert e.value.status_code == 400 and "num_predict" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="tiny-lm", prompt="x", options={"temperature": -1})
    assert e.value.status_code == 400 and "options.temperature" in e.value.error
    url = open_server.url + "/api/chat"
    for body in (b'{"model": "tiny-lm", "messages": [', b'{"model": "tiny-lm", "messages": "hi"}',
                 b'{"model": "tiny-lm", "stream": "yes", "messages": []}'):
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and set(r.json()) == {"error"} and r.json()["error"], r.text
    r = httpx.post(url, json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "model is required" in r.json()["error"]
    r = httpx.post(url, json={"model": "tiny-lm", "messages": [{"role": "user", "content": "x"}], "format": "json"})
    assert r.status_code == 400 and "format" in r.json()["error"]
    # the /v1 routes' API key rule, in Ollama's shape
    r = httpx.get(keyed_server.url + "/api/tags")
    assert r.status_code == 401 and set(r.json()) == {"error"}
    keyed = ollama.Client(host=keyed_server.url, headers={"Authorization": f"Bearer {KEY}"})
    assert keyed.list().models[0].model == "tiny-lm"


def test_an_ollama_client_that_disconnects_frees_its_batch_slot_before_the_next_step(served, monkeypatch):
    with BackgroundServer(create_app(served, limits=LIMITS)) as srv:
        worker = srv.app.state.worker
        step, steps = worker.batch.decode, []

        def slowed_step():  # countable steps, and what each one decoded
            time.sleep(STEP_S)
            steps.append(worker.batch.size)
            step()

        monkeypatch.setattr(worker.batch, "decode", slowed_step)
        body = {"model": "tiny-lm", "messages": [{"role": "user", "content": "A long story"}],
                "options": {"temperature": 0, "num_predict": 3000}}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", srv.url + "/api/chat", json=body) as response:
                first = json.loads(next(response.iter_lines()))
                assert first["done"] is False and worker.rows == 1
        # the connection is closed: the row leaves at once, within the step under way and one more
        closed_at = len(steps)
        assert wait_until(lambda: worker.rows == 0 and worker.cancelled == 1, timeout=5)
        assert len(steps) - closed_at <= 2 and worker.completed == 0


# ---- gptlab judge against gptlab serve ------------------------------------------------------------

def test_gptlab_judge_runs_the_books_evaluation_against_gptlab_serve(tmp_path, capsys):
    # A judge that always answers " 85": its head favours that token whatever the text (ln_f gives every
    # position the same vector), so the scores are known; the route, the client and the parsing are real.
    torch.manual_seed(0)
    tokenizer = GPT2Tokenizer()
    model = GPTModel(GPTConfig.preset("tiny")).eval()
    (score_token,) = tokenizer.encode(" 85")
    with torch.no_grad():
        model.wte.weight[score_token] *= 4
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(model.wte.weight[score_token])
    judge_run = tmp_path / "judge-lm"
    save_model(judge_run, model, tokenizer, {"prompt_style": "alpaca"})
    records = [{"instruction": f"Task {i}.", "input": "", "output": f"answer {i}", "model_response": "an answer"}
               for i in range(3)]
    (tmp_path / "responses.json").write_text(json.dumps(records))
    env = {k: v for k, v in os.environ.items() if k != "GPTLAB_API_KEY"}
    with ServeProcess(judge_run, "--max-tokens-limit", "256", env=env) as srv:
        code = main(["judge", "--input", str(tmp_path / "responses.json"), "--base-url", srv.url + "/v1",
                     "--judge-model", "judge-lm", "--max-tokens", "4", "--quiet"])
    assert code == 0
    assert "mean score 85.00/100 over 3 records" in capsys.readouterr().out
    judged = json.loads((tmp_path / "responses.judged.json").read_text())
    assert [r["judge_score"] for r in judged] == [85, 85, 85]

