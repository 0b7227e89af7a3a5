"""`gptlab serve` holds: what a careless or hostile client can cost it, checked over real sockets on 127.0.0.1.

A client that hangs up stops its generation within a step; one request's choices are capped; the API
key is checked before the body is read; slow, silent and surplus connections are cut off while the
server goes on answering others; a Host that is not this machine's is refused (DNS rebinding); seeds
and integers are checked; ``/health`` tells strangers only that the server is alive; ``--threads``.
"""
from __future__ import annotations

import json
import math
import socket
import time

import httpx
import pytest
import torch

from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.generate import generate_text
from gptlab.model import GPTConfig, GPTModel
from gptlab.run import save_model
from gptlab.serve import BackgroundServer, HostAllowlist, ServedModel, ServeLimits, create_app
from gptlab.serve.engine import CLASSIFY_BATCH
from gptlab.serve.guards import host_name, is_loopback
from gptlab.surgery import add_classifier_head
from gptlab.tokenizer import GPT2Tokenizer

KEY = "safety-key"
TIMEOUTS = dict(header_timeout=1.0, body_timeout=1.0, idle_timeout=0.5)
LIMITS = ServeLimits(max_tokens=3000, default_max_tokens=8, max_n=4, max_choices=6, **TIMEOUTS)
STEP_S = 0.05  # each generation step, slowed to this in the cancellation tests: steps are then countable


@pytest.fixture(scope="module")
def served(tiny_lm_run):
    return ServedModel.load(tiny_lm_run)


@pytest.fixture(scope="module")
def server(served):
    with BackgroundServer(create_app(served, api_key=KEY, limits=LIMITS)) as srv:
        yield srv


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# ---- raw HTTP over a socket: requests sent by halves, and how the server answers -------------------

def connect(server) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=10)


def head(method: str, path: str, headers: dict, length: int | None = None, host: str = "127.0.0.1") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def seconds_until_closed(sock: socket.socket, limit: float = 10.0) -> float:
    """How long until the server closes ``sock`` (whatever it sends first is read and dropped)."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        return math.inf
    return time.monotonic() - started


# ---- a client that hangs up ----------------------------------------------------------------------

def slow_down(worker, monkeypatch) -> list:
    """Every generation ``worker`` takes from now on: its batch steps slowed to STEP_S, so steps after a
    hang-up can be counted (``Job.steps``: the batch steps a job took part in)."""
    jobs, submit, step = [], worker.submit_generation, worker.batch.decode

    def slowed_step():
        time.sleep(STEP_S)
        step()

    def recorded_submit(request):
        jobs.append(submit(request))
        return jobs[-1]

    monkeypatch.setattr(worker, "submit_generation", recorded_submit)
    monkeypatch.setattr(worker.batch, "decode", slowed_step)
    return jobs


@pytest.fixture
def slow_jobs(server, monkeypatch):
    return slow_down(server.app.state.worker, monkeypatch)


def hang_up_and_count(server, jobs, close) -> None:
    """After ``close()`` the job must stop within a step, well before its 3000 tokens."""
    worker = server.app.state.worker
    completed, cancelled = worker.completed, worker.cancelled
    assert wait_until(lambda: jobs and jobs[0].steps >= 3), "the generation did not start"
    (job,) = jobs
    close()
    steps, closed_at = job.steps, time.monotonic()
    assert wait_until(lambda: worker.cancelled == cancelled + 1, timeout=5), "the abandoned job was never dropped"
    took = time.monotonic() - closed_at
    # The step under way when the client left, and at most one more while the event loop hears of it.
    assert job.steps - steps <= 2, f"{job.steps - steps} steps after the client left"
    assert took < 10 * STEP_S and worker.completed == completed
    assert wait_until(lambda: worker.active == 0)


def test_a_non_streaming_request_stops_within_a_step_when_its_client_hangs_up(server, slow_jobs):
    sock = connect(server)
    body = json.dumps({"prompt": "A long story:", "max_tokens": 3000, "temperature": 0}).encode()
    sock.sendall(head("POST", "/v1/completions", auth(), len(body)) + body)
    hang_up_and_count(server, slow_jobs, sock.close)


def test_a_stream_stops_within_a_step_when_its_client_hangs_up(server, slow_jobs):
    body = {"prompt": "A long story:", "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body, headers=auth()) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            hang_up_and_count(server, slow_jobs, response.close)


def test_a_waiting_job_whose_client_left_is_never_run(served, monkeypatch):
    with BackgroundServer(create_app(served, limits=ServeLimits(max_active=1, max_tokens=3000))) as srv:
        worker = srv.app.state.worker
        jobs = slow_down(worker, monkeypatch)
        body = json.dumps({"prompt": "x", "max_tokens": 3000, "temperature": 0}).encode()
        running, waiting = connect(srv), connect(srv)
        running.sendall(head("POST", "/v1/completions", {}, len(body)) + body)
        assert wait_until(lambda: len(jobs) == 1 and jobs[0].steps >= 1)
        waiting.sendall(head("POST", "/v1/completions", {}, len(body)) + body)
        assert wait_until(lambda: len(jobs) == 2 and worker.queued == 1)
        waiting.close()
        assert wait_until(lambda: jobs[1].cancelled.is_set(), timeout=2)
        running.close()
        assert wait_until(lambda: worker.cancelled == 2 and worker.active == 0 and worker.queued == 0, timeout=5)
        assert jobs[1].steps == 0, "a job whose client left while it waited must not start"


# ---- what one request may hold --------------------------------------------------------------------

@pytest.mark.parametrize("prompts, n, param", [(2, 4, "n"), (7, 1, "prompt"), (4, 2, "n")])
def test_prompts_times_n_is_capped(server, prompts, n, param):
    r = httpx.post(server.url + "/v1/completions", headers=auth(),
                   json={"prompt": ["hi"] * prompts, "n": n, "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == "too_many_choices"
    assert f"= {prompts * n} choices" in error["message"] and "limit of 6" in error["message"]
    assert "--max-choices" in error["message"]


def test_choices_up_to_the_cap_are_answered(server, served):
    r = httpx.post(server.url + "/v1/completions", headers=auth(), timeout=30,
                   json={"prompt": ["One", "Two", "Three"], "n": 2, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    assert texts == [generate_text(served.model, served.tokenizer, p, 3) for p in ("One", "Two", "Three")
                     for _ in range(2)]


def test_chat_n_is_held_to_the_cap_too(served):
    limits = ServeLimits(max_n=4, max_choices=3, default_max_tokens=2)
    with BackgroundServer(create_app(served, limits=limits)) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "n": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "n": 3})
        assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_classify_caps_its_texts_and_batches_a_long_list_exactly(tmp_path):
    torch.manual_seed(1)
    labels = ["ham", "spam"]
    save_model(tmp_path / "clf", add_classifier_head(GPTModel(GPTConfig.preset("tiny")), 2), GPT2Tokenizer(),
               {"stage": "classifier", "labels": labels, "classifier": {"max_length": 16}})
    served = ServedModel.load(tmp_path / "clf")
    texts = [f"message number {i}" + "!" * (i % 5) for i in range(CLASSIFY_BATCH + 5)]  # two batches
    with BackgroundServer(create_app(served, limits=ServeLimits(max_texts=len(texts)))) as srv:
        r = httpx.post(srv.url + "/v1/classify", json={"input": texts}, timeout=60)
        assert r.status_code == 200, r.text
        expected = served.classifier.predict(texts)
        got = r.json()["data"]
        assert [row["label"] for row in got] == [p.label for p in expected]
        assert [row["probability"] for row in got] == pytest.approx([p.probability for p in expected], abs=1e-5)
        r = httpx.post(srv.url + "/v1/classify", json={"input": texts + ["one more"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        assert "--max-texts" in r.json()["error"]["message"]


# ---- the API key before the body ------------------------------------------------------------------

def test_a_keyless_request_is_refused_before_its_body_is_sent(server):
    started = time.monotonic()
    socks = [connect(server) for _ in range(20)]
    for sock in socks:  # each announces 900 KB and sends none of it
        sock.sendall(head("POST", "/v1/completions", {}, length=900_000))
    for sock in socks:
        status, headers, body = read_response(sock)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert headers["www-authenticate"] == "Bearer"
    assert time.monotonic() - started < 5
    # A client that sends its body anyway: the server drops it unread and the connection stays usable.
    sock = socks[0]
    sock.sendall(b"x" * 900_000)
    sock.sendall(head("GET", "/health", {}))
    status, _, body = read_response(sock)
    assert status == 200 and json.loads(body) == {"status": "ok"}
    # One that never sends it is cut off by the header timeout, not held open.
    assert seconds_until_closed(socks[1]) < 3 * LIMITS.header_timeout
    for sock in socks:
        sock.close()


def test_a_wrong_key_is_refused_before_the_body_too(server):
    with connect(server) as sock:
        sock.sendall(head("POST", "/v1/chat/completions", auth("wrong"), length=500_000))
        status, _, body = read_response(sock)
        assert status == 401 and json.loads(body)["error"]["message"] == "incorrect API key"


# ---- slow, silent and surplus connections ----------------------------------------------------------

def test_a_half_sent_request_head_is_cut_off_while_others_are_answered(server):
    stalled = [connect(server) for _ in range(10)]
    for sock in stalled:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
    started = time.monotonic()
    r = httpx.get(server.url + "/health", headers=auth())
    assert r.status_code == 200 and r.json()["model"] == "tiny-lm" and time.monotonic() - started < 1.0
    closed = [seconds_until_closed(sock) for sock in stalled]
    assert max(closed) < 3 * LIMITS.header_timeout, closed
    for sock in stalled:
        sock.close()


def test_a_trickled_request_head_is_cut_off_at_the_header_timeout(server):
    # One byte every 0.2 s keeps the idle timer from firing; the header deadline still does.
    with connect(server) as sock:
        started = time.monotonic()
        request = head("GET", "/health", {})
        try:
            for byte in request[:-1]:
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
                if time.monotonic() - started > 5:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        took = time.monotonic() - started + seconds_until_closed(sock, limit=5)
        assert LIMITS.header_timeout * 0.9 < took < 3 * LIMITS.header_timeout


def test_a_stalled_body_gets_408_and_the_connection_closes(server):
    with connect(server) as sock:
        sock.sendall(head("POST", "/v1/completions", auth(), length=100) + b'{"prompt": "')
        started = time.monotonic()
        status, headers, body = read_response(sock)
        took = time.monotonic() - started
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        assert "--body-timeout" in json.loads(body)["error"]["message"]
        assert LIMITS.body_timeout * 0.9 < took < 3 * LIMITS.body_timeout
        assert headers["connection"] == "close" and seconds_until_closed(sock) < 1


def test_a_silent_connection_is_closed_at_the_idle_timeout(server):
    with connect(server) as fresh:  # never sends a byte
        assert seconds_until_closed(fresh) < 3 * LIMITS.idle_timeout
    with connect(server) as kept:  # one request, then silence
        kept.sendall(head("GET", "/health", {}))
        assert read_response(kept)[0] == 200
        assert seconds_until_closed(kept) < 3 * LIMITS.idle_timeout


def test_connections_over_the_limit_get_503(served):
    limits = ServeLimits(max_connections=3, idle_timeout=30, header_timeout=30)
    with BackgroundServer(create_app(served, limits=limits)) as srv:
        held = [connect(srv) for _ in range(3)]
        time.sleep(0.2)  # the server has accepted them
        with connect(srv) as extra:
            extra.sendall(head("GET", "/health", {}))
            assert read_response(extra)[0] == 503
        for sock in held:
            sock.close()
        assert wait_until(lambda: httpx.get(srv.url + "/health").status_code == 200, timeout=5)


# ---- the Host header (DNS rebinding) ---------------------------------------------------------------

def get_with_host(server, host: str, path: str = "/health") -> httpx.Response:
    return httpx.get(server.url + path, headers={"Host": host, **auth()})


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil"])
def test_a_foreign_host_is_refused_on_loopback(server, host):
    for path in ("/health", "/", "/v1/models"):
        r = get_with_host(server, host, path)
        assert r.status_code == 400, (host, path, r.text)
        error = r.json()["error"]
        assert error["code"] == "host_not_allowed" and f"--allowed-host {host_name(host)}" in error["message"]


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LocalHost.", "127.0.0.1", "127.0.0.1:1",
                                  "[::1]", "[::1]:8000", "app.localhost:3000", "127.1.2.3"])
def test_loopback_hosts_pass_with_any_port(server, host):
    r = get_with_host(server, host)
    assert r.status_code == 200 and r.json()["model"] == "tiny-lm"


def test_allowed_hosts_are_configurable(served):
    with BackgroundServer(create_app(served, allowed_hosts=["gpu-box.lan"])) as srv:
        assert get_with_host(srv, "gpu-box.lan:8000").status_code == 200
        assert get_with_host(srv, "GPU-BOX.LAN").status_code == 200
        assert get_with_host(srv, "localhost").status_code == 200
        assert get_with_host(srv, "evil.example").status_code == 400
    with BackgroundServer(create_app(served, allowed_hosts=["*"])) as srv:
        assert get_with_host(srv, "evil.example").status_code == 200


def test_a_request_without_a_host_header_passes(server):
    with connect(server) as sock:  # HTTP/1.0 needs no Host; no browser sends such a request
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert read_response(sock)[0] == 200


def test_the_host_check_applies_on_loopback_or_when_hosts_are_given():
    async def app(scope, receive, send):
        pass

    def scope(host: str, arrived: str) -> dict:
        return {"type": "http", "headers": [(b"host", host.encode())], "server": (arrived, 8000)}

    open_guard, listed = HostAllowlist(app), HostAllowlist(app, ["api.example.com"])
    assert not open_guard.permits(scope("evil.example", "127.0.0.1"))
    assert not open_guard.permits(scope("evil.example", "::ffff:127.0.0.1"))  # a dual-stack socket's view
    assert open_guard.permits(scope("evil.example", "192.168.1.5"))  # bound to the network: the user chose so
    assert not listed.permits(scope("evil.example", "192.168.1.5"))
    assert listed.permits(scope("api.example.com:443", "192.168.1.5"))
    assert [host_name(h) for h in ("[::1]:80", "Example.COM.:8080", "::1", "a:b")] == ["::1", "example.com", "::1", "a:b"]
    assert is_loopback("::1") and is_loopback("127.255.0.1") and not is_loopback("128.0.0.1")


# ---- seeds, integers and booleans ------------------------------------------------------------------

@pytest.mark.parametrize("seed", [2**64, 2**63, -1, 10**30])
def test_a_seed_out_of_range_is_a_400_naming_seed(server, seed):
    r = httpx.post(server.url + "/v1/completions", headers=auth(), json={"prompt": "x", "seed": seed, "n": 2})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "seed" and "2**63" in r.json()["error"]["message"]


def test_the_largest_seed_samples_like_generate(server, served):
    seed = 2**63 - 1
    r = httpx.post(server.url + "/v1/completions", headers=auth(), timeout=30,
                   json={"prompt": "Hi", "seed": seed, "n": 2, "max_tokens": 4, "temperature": 1.0})
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == [
        generate_text(served.model, served.tokenizer, "Hi", 4, temperature=1.0, seed=seed + i) for i in range(2)]


@pytest.mark.parametrize("field, value", [("max_tokens", True), ("n", True), ("seed", False), ("top_k", 2.0),
                                          ("max_tokens", "5"), ("stream", "yes"), ("echo", 1),
                                          ("temperature", True), ("best_of", True)])
def test_booleans_and_strings_are_not_numbers(server, field, value):
    r = httpx.post(server.url + "/v1/completions", headers=auth(), json={"prompt": "x", field: value})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == field and set(error) == {"message", "type", "param", "code"}


def test_chat_fields_are_strict_too(server):
    r = httpx.post(server.url + "/v1/chat/completions", headers=auth(),
                   json={"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": True})
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_completion_tokens"


# ---- /health ----------------------------------------------------------------------------------------

def test_health_tells_strangers_only_that_the_server_is_alive(server, served):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/health", headers=auth("wrong")).json() == {"status": "ok"}
    details = httpx.get(server.url + "/health", headers=auth()).json()
    assert details["model"] == "tiny-lm" and {"queued", "active"} <= set(details)
    with BackgroundServer(create_app(served)) as open_server:  # no key: /v1/models is open, so is this
        assert httpx.get(open_server.url + "/health").json()["model"] == "tiny-lm"


# ---- the command line: --threads, --allowed-host and the new limits --------------------------------

def test_cli_sets_threads_and_passes_hosts_and_limits(monkeypatch, tmp_path):
    import gptlab.serve

    seen = {}
    monkeypatch.setattr(gptlab.serve, "serve", lambda source, **kw: seen.update(source=source, **kw))
    before = torch.get_num_threads()
    try:
        assert main(["serve", "--model", str(tmp_path), "--threads", "2", "--allowed-host", "a.lan",
                     "--allowed-host", "b.lan", "--max-choices", "9", "--header-timeout", "2.5",
                     "--body-timeout", "4", "--idle-timeout", "0.5", "--max-connections", "7",
                     "--max-texts", "11"]) == 0
        assert torch.get_num_threads() == 2
        assert seen["allowed_hosts"] == ("a.lan", "b.lan")
        limits = seen["limits"]
        assert (limits.max_choices, limits.header_timeout, limits.body_timeout, limits.idle_timeout,
                limits.max_connections, limits.max_texts) == (9, 2.5, 4.0, 0.5, 7, 11)
        from gptlab.config import default_serve_threads

        assert main(["serve", "--model", str(tmp_path)]) == 0
        assert torch.get_num_threads() == default_serve_threads() and seen["allowed_hosts"] == ()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("argv, message", [(["--threads", "0"], "--threads must be at least 1"),
                                           (["--header-timeout", "0"], "header_timeout"),
                                           (["--body-timeout", "nan"], "body_timeout"),
                                           (["--max-choices", "0"], "max_choices")])
def test_cli_refuses_bad_settings_in_one_line(tmp_path, capsys, argv, message):
    assert main(["serve", "--model", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_limits_refuse_non_positive_timeouts():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(GptlabError, match="idle_timeout"):
            ServeLimits(idle_timeout=bad)
