"""ROUGE-L, exact match, and the LLM judge against a real chat-completions server on 127.0.0.1."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.evaluate import (
    JudgeCache,
    JudgeClient,
    evaluate_responses,
    exact_match,
    judge_prompt,
    judge_records,
    lcs_length,
    parse_score,
    rouge_l,
    score_histogram,
    text_histogram,
)

# ---- offline metrics -----------------------------------------------------------------------------


def test_lcs_and_rouge_l_by_hand():
    assert lcs_length("a b c d e".split(), "a c e x".split()) == 3
    assert lcs_length([], ["a"]) == 0
    # LCS "the cat on the mat" = 5 words; P = 5/5, R = 5/6, F = 2PR / (P + R) = 10/11
    assert rouge_l("The cat on the mat.", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("mat the on", "the cat sat on the mat") == pytest.approx(2 * 2 / (3 + 6))
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0 and rouge_l("a b", "c d") == 0.0


def test_rouge_l_against_brute_force_lcs():
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(50):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        brute = max((k for k in range(len(a) + 1) for sub in itertools.combinations(a, k)
                     if _is_subsequence(sub, b)), default=0)
        assert lcs_length(a, b) == brute


def _is_subsequence(sub, seq):
    it = iter(seq)
    return all(x in it for x in sub)


def test_exact_match_ignores_case_punctuation_and_spacing():
    assert exact_match("  The  answer is 42. ", "the answer is 42")
    assert not exact_match("The answer is 41.", "The answer is 42.")


@pytest.mark.parametrize("reply, score", [("85", 85), ("Score: 85/100", 85), ("100", 100), ("0", 0),
                                          ("I'd say 70.", 70), ("101", None), ("1000", None), ("3.5", None),
                                          ("no idea", None), ("", None)])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_histograms():
    assert score_histogram([0, 9, 10, 55, 99, 100]) == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    lines = text_histogram([0, 9, 100], width=4).splitlines()
    assert lines[0] == "   0-9   | #### 2" and lines[-1] == "  90-100 | ## 1" and len(lines) == 10


# ---- a chat-completions server -------------------------------------------------------------------

class FakeJudge:
    """An OpenAI-compatible /v1/chat/completions endpoint. ``script`` holds what the next requests get:
    ("status", code) / ("slow", seconds) / ("text", reply) / ("garbage",); when empty, it answers 90 for
    responses containing "correct" and 20 otherwise."""

    def __init__(self):
        self.script, self.requests = [], []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                action = judge.script.pop(0) if judge.script else ("auto",)
                if action[0] == "status":
                    payload = json.dumps({"error": {"message": f"scripted {action[1]}"}}).encode()
                    self.send_response(action[1])
                    if action[1] == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if action[0] == "slow":
                    time.sleep(action[1])
                prompt = body["messages"][-1]["content"]
                reply = action[1] if action[0] == "text" else ("90" if "`correct" in prompt else "20")
                payload = (b"<html>oops</html>" if action[0] == "garbage" else json.dumps({
                    "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                 "finish_reason": "stop"}]}).encode())
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge_server():
    server = FakeJudge()
    yield server
    server.close()


def records(n=4):
    return [{"instruction": f"Task {i}.", "input": "x" if i % 2 else "", "output": f"answer {i}",
             "model_response": "correct" if i % 2 == 0 else "wrong"} for i in range(n)]


def client(server, **kwargs):
    sleeps = []
    options = dict(timeout=2.0, retries=2, backoff=0.01, sleep=sleeps.append)
    c = JudgeClient(server.url, "judge-llm", api_key="sk-test", **{**options, **kwargs})
    return c, sleeps


def test_judges_over_chat_completions(judge_server, tmp_path):
    c, sleeps = client(judge_server)
    judged = judge_records(records(), c, JudgeCache(tmp_path / "cache.jsonl"), progress=False)
    assert [r["judge_score"] for r in judged] == [90, 20, 90, 20]
    first = judge_server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "judge-llm" and first["body"]["temperature"] == 0.0
    assert first["body"]["messages"] == [{"role": "user", "content": judge_prompt(records()[0])}]
    assert "### Instruction:\nTask 0." in judge_prompt(records()[0]) and "### Input:\nx" in judge_prompt(records()[1])
    assert sleeps == []


def test_judge_prompt_is_the_books():
    # the task is laid out by gptlab.prompts.ALPACA, the style the book's format_input spells out again
    from llms_from_scratch.ch07 import format_input

    for r in records(2):
        assert judge_prompt(r) == (f"Given the input `{format_input(r)}` and correct output `{r['output']}`, "
                                   f"score the model response `{r['model_response']}` on a scale from 0 to 100, "
                                   "where 100 is the best score. Respond with the integer number only.")


def test_retries_server_errors_and_rate_limits_with_backoff(judge_server):
    judge_server.script = [("status", 500), ("status", 429), ("garbage",)]
    c, sleeps = client(judge_server, retries=3)
    assert c.complete("score this") == "20"
    assert len(judge_server.requests) == 4
    assert sleeps == [0.01, 0.0, 0.04]  # backoff 0.01 * 2**attempt; 429's Retry-After: 0 wins


def test_slow_reply_times_out_and_is_retried(judge_server):
    judge_server.script = [("slow", 1.0)]
    c, sleeps = client(judge_server, timeout=0.25)
    start = time.perf_counter()
    assert c.complete("score `correct`") == "90"
    assert len(judge_server.requests) == 2 and len(sleeps) == 1 and time.perf_counter() - start < 1.0


def test_gives_up_after_the_retries_with_one_message(judge_server):
    judge_server.script = [("status", 503)] * 3
    c, sleeps = client(judge_server, retries=2)
    with pytest.raises(GptlabError, match=r"failed 3 times, last: HTTP 503: scripted 503.*run again to resume"):
        c.complete("x")
    assert len(sleeps) == 2


def test_client_errors_fail_at_once(judge_server):
    judge_server.script = [("status", 401)]
    c, sleeps = client(judge_server)
    with pytest.raises(GptlabError, match=r"HTTP 401: scripted 401; set the key"):
        c.complete("x")
    judge_server.script = [("status", 404)]
    with pytest.raises(GptlabError, match=r"HTTP 404.*ollama pull judge-llm"):
        c.complete("x")
    assert sleeps == [] and len(judge_server.requests) == 2


def test_unreachable_endpoint_is_one_clear_error():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = JudgeClient(f"http://127.0.0.1:{port}/v1", "llama3", retries=5, backoff=10.0, sleep=pytest.fail)
    with pytest.raises(GptlabError, match=r"cannot reach the judge at http://127.0.0.1:\d+/v1 .*ollama serve"):
        c.complete("x")


def test_cache_resumes_an_interrupted_run(judge_server, tmp_path):
    cache_path = tmp_path / "cache.jsonl"
    judge_server.script = [("text", "90"), ("text", "20"), ("text", "85")] + [("status", 500)] * 2
    c, _ = client(judge_server, retries=1)
    with pytest.raises(GptlabError, match="run again to resume"):
        judge_records(records(6), c, JudgeCache(cache_path), progress=False)
    assert len(cache_path.read_text().splitlines()) == 3

    judge_server.requests.clear()
    judged = judge_records(records(6), c, JudgeCache(cache_path), progress=False)
    assert [r["judge_score"] for r in judged] == [90, 20, 85, 20, 90, 20]
    assert len(judge_server.requests) == 3  # only the records the first run did not finish

    judge_server.requests.clear()
    changed = records(6)
    changed[5]["model_response"] = "correct now"  # a new answer is a new question
    judged = judge_records(changed, c, JudgeCache(cache_path), progress=False)
    assert len(judge_server.requests) == 1 and judged[5]["judge_score"] == 90


def test_cache_survives_a_cut_line_and_unscored_replies_are_asked_again(judge_server, tmp_path):
    cache_path = tmp_path / "cache.jsonl"
    judge_server.script = [("text", "I cannot score this"), ("text", "75")]
    c, _ = client(judge_server)
    judged = judge_records(records(2), c, JudgeCache(cache_path), progress=False)
    assert [r["judge_score"] for r in judged] == [None, 75]
    with open(cache_path, "a") as f:
        f.write('{"key": "cut sho')  # killed mid-write
    judged = judge_records(records(2), c, JudgeCache(cache_path), progress=False)
    assert [r["judge_score"] for r in judged] == [90, 75] and len(judge_server.requests) == 3
    entries = [json.loads(line) for line in cache_path.read_text().splitlines()[-1:]]
    assert entries[0]["score"] == 90  # appended on a fresh line after the cut one


def test_evaluate_responses_writes_scores_histogram_and_plot(judge_server, tmp_path):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(records(4)))
    c, _ = client(judge_server)
    summary = evaluate_responses(path, None, client=c, progress=False)
    assert summary["judge_mean"] == 55.0 and summary["judged"] == 4 and summary["histogram"][9] == 2
    out = json.loads((tmp_path / "responses.judged.json").read_text())
    assert [r["judge_score"] for r in out] == [90, 20, 90, 20] and all("rouge_l" in r for r in out)
    assert (tmp_path / "responses.judged.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "responses.judged.cache.jsonl").is_file()


def test_missing_answers_are_named(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    with pytest.raises(GptlabError, match=r"record 0 has no string 'model_response' \(run `gptlab respond` first"):
        evaluate_responses(path)


def test_cli_judge(judge_server, tmp_path, capsys, monkeypatch):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(records(4)))
    monkeypatch.setenv("GPTLAB_JUDGE_BASE_URL", judge_server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert main(["judge", "--input", str(path), "--judge-model", "m", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "mean score 55.00/100 over 4 records" in printed and "  90-100 | " in printed
    assert judge_server.requests[0]["auth"] == "Bearer sk-env"
    monkeypatch.setenv("GPTLAB_JUDGE_BASE_URL", "http://127.0.0.1:9/v1")
    assert main(["judge", "--input", str(path), "--output", str(tmp_path / "other.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the judge" in err
