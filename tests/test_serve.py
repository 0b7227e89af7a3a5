"""`gptlab serve`: the OpenAI-compatible API checked with the official openai client against a live server.

Every answer is compared with what ``gptlab.generate`` produces for the same prompt and settings, so the
server is shown to add transport only: no change to the text, the stop handling or the sampling.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.surgery import add_classifier_head
from gptlab.generate import generate_text
from gptlab.model import GPTConfig, GPTModel
from gptlab.prompts import get_prompt_style
from gptlab.run import save_model
from gptlab.serve import (APIError, BackgroundServer, GenerationWorker, ServedModel, ServeLimits, bind_warnings,
                          create_app, sse_stream)
from gptlab.tokenizer import GPT2Tokenizer

KEY = "test-key-123"
LIMITS = ServeLimits(max_tokens=3000, default_max_tokens=16, max_request_bytes=20_000, max_n=3)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("serve") / "tiny-lm"
    torch.manual_seed(0)
    save_model(run, GPTModel(GPTConfig.preset("tiny")), GPT2Tokenizer(), {"prompt_style": "alpaca"})
    return run


@pytest.fixture(scope="module")
def served(lm_run):
    return ServedModel.load(lm_run)


@pytest.fixture(scope="module")
def server(served):
    with BackgroundServer(create_app(served, api_key=KEY, limits=LIMITS)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def reference(served: ServedModel, prompt: str, max_tokens: int, **kwargs) -> str:
    return generate_text(served.model, served.tokenizer, prompt, max_tokens, **kwargs)


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_models_lists_the_served_model_with_its_kind(client):
    (entry,) = client.models.list().data
    assert entry.id == "tiny-lm" and entry.object == "model" and entry.owned_by == "gptlab"
    extras = entry.model_extra
    assert extras["kind"] == "generator" and extras["context_length"] == 64 and extras["prompt_style"] == "alpaca"
    assert extras["max_tokens_limit"] == 3000
    assert client.models.retrieve("tiny-lm").id == "tiny-lm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_is_exactly_what_generate_gives(client, served):
    prompt = "Every effort moves you"
    r = client.completions.create(model="tiny-lm", prompt=prompt, max_tokens=12, temperature=0)
    (choice,) = r.choices
    assert choice.text == reference(served, prompt, 12)
    assert choice.finish_reason == "length" and choice.index == 0
    assert r.object == "text_completion" and r.model == "tiny-lm" and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == len(served.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streamed_completion_joins_to_the_same_text(client, served):
    prompt = "The quick brown fox"
    chunks = list(client.completions.create(model="tiny-lm", prompt=prompt, max_tokens=15, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(pieces) > 1, "the text must arrive in pieces, not as one block"
    assert "".join(pieces) == reference(served, prompt, 15)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15


def test_stop_string_cuts_the_text_and_reports_stop(client, served):
    prompt = "I had always thought"
    full = reference(served, prompt, 20)
    stop = full[6:10]
    expected = full[: full.index(stop)]
    r = client.completions.create(model="tiny-lm", prompt=prompt, max_tokens=20, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="tiny-lm", prompt=prompt, max_tokens=20, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_n_choices_differ_by_seed(client, served):
    prompt = "Hello"
    kwargs = dict(model="tiny-lm", prompt=prompt, max_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=2)
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in second.choices]
    assert texts == [reference(served, prompt, 10, temperature=1.0, top_p=0.9, seed=7 + i) for i in range(2)]
    assert texts[0] != texts[1]
    assert first.usage.prompt_tokens == 1 and first.usage.completion_tokens == 20  # the prompt counts once


def test_several_prompts_and_echo(client, served):
    prompts = ["One", "Two three"]
    r = client.completions.create(model="tiny-lm", prompt=prompts, max_tokens=5, temperature=0, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [p + reference(served, p, 5) for p in prompts]
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 10


def test_chat_formats_with_the_runs_prompt_style(client, served):
    style = get_prompt_style("alpaca")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]
    # Sampled (seeded): this random model's greedy answer is a run of newlines, which the stop strings hold back.
    expected = reference(served, style.chat(messages), 14, stop=style.stop, temperature=1.0, seed=3)
    r = client.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=14, temperature=1.0, seed=3)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(served.tokenizer.encode(style.chat(messages)))

    chunks = list(client.chat.completions.create(model="tiny-lm", messages=messages, max_tokens=14, temperature=1.0,
                                                 seed=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content) == expected and len(content) > 1
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_chat_accepts_text_parts_and_max_completion_tokens(client, served):
    style = get_prompt_style("alpaca")
    r = client.chat.completions.create(
        model="tiny-lm", temperature=0, max_completion_tokens=6,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}])
    assert r.choices[0].message.content == reference(served, style.chat([{"role": "user", "content": "Hi there"}]),
                                                     6, stop=style.stop)


def test_api_key_is_required_on_v1_only(server):
    for headers in ({}, auth("wrong"), {"Authorization": "Basic " + KEY}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "gptlab chat" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: the page works offline


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 5000}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"n": 4}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"logprobs": 6}, "logprobs"),  # OpenAI allows 0-5
    ({"prompt": []}, "prompt"),
])
def test_bad_values_are_400_naming_the_parameter(server, body, param):
    # json.dumps, not httpx's json=: it writes NaN (as Python's json reads it), which httpx refuses to send
    r = httpx.post(server.url + "/v1/completions", content=json.dumps({"model": "tiny-lm", "prompt": "x", **body}),
                   headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_penalties_and_min_p_decode_as_gptlab_generate_does(client, served):
    prompt = "Every effort moves"
    settings = dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, min_p=0.1)
    r = client.completions.create(model="tiny-lm", prompt=prompt, max_tokens=12, temperature=0,
                                  presence_penalty=0.5, frequency_penalty=0.3,
                                  extra_body={"repetition_penalty": 1.2, "min_p": 0.1})
    assert r.choices[0].text == reference(served, prompt, 12, **settings)
    assert r.choices[0].text != reference(served, prompt, 12)  # the penalties changed what greedy picks


def test_sampling_follows_gptlabs_one_rule_set(client, served):
    # The server checks sampling with gptlab.config's rules, as the CLI and generate do: any finite
    # temperature >= 0 (OpenAI's API stops at 2; gptlab does not).
    prompt = "Hot"
    r = client.completions.create(model="tiny-lm", prompt=prompt, max_tokens=6, temperature=2.5, seed=11)
    assert r.choices[0].text == reference(served, prompt, 6, temperature=2.5, seed=11)
    # A request without a temperature samples at OpenAI's default of 1.0, not greedily.
    r = client.completions.create(model="tiny-lm", prompt=prompt, max_tokens=6, seed=11)
    assert r.choices[0].text == reference(served, prompt, 6, temperature=1.0, seed=11)


def test_error_shapes_and_status_codes(server, client):
    def post(path, body, **kw):
        return httpx.post(server.url + path, json=body, headers=auth(), **kw)

    r = post("/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens 5000"):
        client.completions.create(model="tiny-lm", prompt="x", max_tokens=5000)

    r = post("/v1/completions", {"prompt": "x" * 30_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(server.url + "/v1/completions", headers=auth(),
                         content=iter([b'{"prompt": "', b"y" * 25_000, b'"}']))  # no Content-Length
    assert chunked.status_code == 413

    r = post("/v1/completions", {"prompt": "x", "max_tokens": "many"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"
    r = post("/v1/chat/completions", {"messages": "hello"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages"
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]

    r = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    assert r.status_code == 400 and "end with a user message" in r.json()["error"]["message"]
    r = post("/v1/chat/completions", {"messages": [{"role": "tool", "content": "a"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"
    r = post("/v1/classify", {"input": "hi"})
    assert r.status_code == 400 and "not a classifier" in r.json()["error"]["message"]

    r = httpx.get(server.url + "/v1/nothing", headers=auth())
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/v1/completions", headers=auth()).status_code == 405


def test_concurrent_clients_each_get_their_own_answer(client, served):
    prompts = [f"Client number {i} says" for i in range(6)]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        if i % 2:
            stream = client.completions.create(model="tiny-lm", prompt=prompts[i], max_tokens=20, temperature=0,
                                               stream=True)
            results[i] = "".join(c.choices[0].text for c in stream)
        else:
            results[i] = client.completions.create(model="tiny-lm", prompt=prompts[i], max_tokens=20,
                                                   temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: reference(served, p, 20) for i, p in enumerate(prompts)}


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_long_stream_leaves_health_responsive_and_disconnect_cancels_it(server):
    worker = server.app.state.worker
    completed, cancelled = worker.completed, worker.cancelled
    body = {"prompt": "A very long story:", "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body, headers=auth()) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"]
            started = time.monotonic()
            health = httpx.get(server.url + "/health", headers=auth()).json()  # the details need the key
            assert time.monotonic() - started < 2.0
            assert health["active"] == 1
        # leaving the block closes the connection mid-stream
    assert wait_until(lambda: worker.cancelled == cancelled + 1 and worker.active == 0)
    assert worker.completed == completed, "the abandoned generation must stop, not run to max_tokens"


def test_worker_bounds_its_queue_and_keeps_a_failure_to_its_own_request():
    def broken():
        yield ("text", 0, "partial")
        raise RuntimeError("boom")

    async def scenario() -> None:
        worker = GenerationWorker(max_active=2, max_queue=1)
        held = worker.submit(lambda: iter([("text", 0, "a")]))
        with pytest.raises(APIError) as full:
            worker.submit(lambda: iter(()))
        assert full.value.status == 503 and full.value.code == "overloaded"
        worker.start()
        try:
            while worker.queued:
                await asyncio.sleep(0.01)
            bad = worker.submit(broken)
            assert [event async for event in held.events()] == [("text", 0, "a")]
            sent = [chunk async for chunk in sse_stream(bad, {"id": "x"}, chat=False, include_usage=False, n=1)]
            assert json.loads(sent[0][6:])["choices"][0]["text"] == "partial"
            error = json.loads(sent[-1][6:])["error"]  # reported in-stream, and no [DONE]
            assert "boom" in error["message"] and error["type"] == "server_error" and len(sent) == 2
        finally:
            worker.stop()
        assert worker.completed == 2

    asyncio.run(scenario())


def test_classifier_run_serves_labels_and_probabilities(tmp_path):
    torch.manual_seed(1)
    model = add_classifier_head(GPTModel(GPTConfig.preset("tiny")), 3)
    labels = ["ham", "spam", "other"]
    save_model(tmp_path / "clf", model, GPT2Tokenizer(), {"stage": "classifier", "labels": labels,
                                                          "classifier": {"max_length": 16}})
    served = ServedModel.load(tmp_path / "clf", name="spam-filter")
    texts = ["Win a free prize now", "See you at lunch?"]
    tokenizer = GPT2Tokenizer()
    with torch.no_grad():
        expected = [model.eval()(torch.tensor([tokenizer.encode(t)]))[0, -1].softmax(-1).tolist() for t in texts]
    with BackgroundServer(create_app(served)) as srv:
        r = httpx.post(srv.url + "/v1/classify", json={"model": "spam-filter", "input": texts})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == "spam-filter"
        for i, (row, probs) in enumerate(zip(body["data"], expected)):
            assert row["index"] == i
            assert [row["probabilities"][name] for name in labels] == pytest.approx(probs, abs=1e-5)
            assert row["label"] == labels[max(range(3), key=probs.__getitem__)]
            assert row["probability"] == pytest.approx(max(probs), abs=1e-5)
        assert body["usage"]["prompt_tokens"] == sum(len(tokenizer.encode(t)) for t in texts)
        single = httpx.post(srv.url + "/v1/classify", json={"input": texts[0]}).json()["data"]
        assert single[0]["label"] == body["data"][0]["label"]
        assert single[0]["probabilities"] == pytest.approx(body["data"][0]["probabilities"], abs=1e-5)
        entry = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert entry["kind"] == "classifier" and entry["labels"] == labels
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_generative"
        assert httpx.post(srv.url + "/v1/classify", json={"input": []}).status_code == 400


def test_bind_warnings_name_non_loopback_addresses():
    assert bind_warnings("127.0.0.1", None) == [] and bind_warnings("::1", None) == []
    assert bind_warnings("localhost", None) == []
    warnings = bind_warnings("0.0.0.0", None)
    assert len(warnings) == 2 and "not a loopback" in warnings[0] and "API key" in warnings[1]
    assert len(bind_warnings("192.168.1.5", "secret")) == 1


@pytest.mark.parametrize("port,message", [(None, "Address already in use"), (70000, "port 70000 is out of range")])
def test_serve_fails_on_its_port_in_one_line_before_loading(tmp_path, capsys, port, message):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1] if port is None else port
        # the model does not exist: the port is checked first, so its error is the one reported
        code = main(["serve", "--model", str(tmp_path / "nope"), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "cannot load" not in err
    assert len(err.strip().splitlines()) == 1


def test_limits_are_checked():
    with pytest.raises(GptlabError, match="max_queue"):
        ServeLimits(max_queue=0)
    with pytest.raises(GptlabError, match="above the limit"):
        ServeLimits(max_tokens=10, default_max_tokens=20)


def test_cli_passes_options_and_env_api_key(monkeypatch, lm_run):
    import gptlab.serve

    seen = {}
    monkeypatch.setattr(gptlab.serve, "serve", lambda source, **kw: seen.update(source=source, **kw))
    monkeypatch.setenv("GPTLAB_API_KEY", "from-env")
    assert main(["serve", "--model", str(lm_run), "--port", "9", "--max-tokens-limit", "50", "--max-n", "2"]) == 0
    assert seen["source"] == str(lm_run) and seen["port"] == 9 and seen["host"] == "127.0.0.1"
    assert seen["api_key"] == "from-env"
    assert seen["limits"].max_tokens == 50 and seen["limits"].max_n == 2 and seen["limits"].default_max_tokens == 50
    main(["serve", "--model", str(lm_run), "--api-key", "flag"])
    assert seen["api_key"] == "flag"


def test_cli_reports_a_missing_model_in_one_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gptlab serve: error:") and "missing" in err[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`gptlab serve --model RUN OPTIONS` in a subprocess on a free port, answering /health inside the block;
    ``output`` holds what it printed once the block ends (tests/test_serve_batching.py uses it too)."""

    def __init__(self, run, *options: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "gptlab.cli", "serve", "--model", str(run), "--port",
                                      str(self.port), *options], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.output = ""

    def up(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return self.proc.poll() is not None

    def __enter__(self) -> "ServeProcess":
        if not (wait_until(self.up, timeout=60) and self.proc.poll() is None):
            self.__exit__()
            raise AssertionError(f"gptlab serve did not start:\n{self.output}")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.output = self.proc.communicate(timeout=20)[0]


def test_gptlab_serve_command_end_to_end(lm_run):
    with ServeProcess(lm_run, "--model-name", "cli-model", env={**os.environ, "GPTLAB_API_KEY": KEY}) as srv:
        cli_client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        r = cli_client.chat.completions.create(model="cli-model", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 4
    assert "serving cli-model (generator)" in srv.output and f"http://127.0.0.1:{srv.port}/" in srv.output


def test_engine_speaks_no_http():
    # The engine is what a batching engine replaces: it must not depend on the web framework.
    import ast

    import gptlab.serve.engine
    import gptlab.serve.schemas

    for module in (gptlab.serve.engine, gptlab.serve.schemas):
        tree = ast.parse(open(module.__file__, encoding="utf-8").read())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {name for name in imported if name.split(".")[0] in ("fastapi", "starlette", "uvicorn")}
