"""The server's guards: ASGI middleware that refuses a request before it costs the server anything.

Outermost first, as ``create_app`` installs them:

    HostAllowlist   a request that reached a loopback address must name a loopback host (DNS rebinding)
    RequireAPIKey   everything but the chat page and ``/health`` needs the key, checked on the headers
                    before one byte of the body is read
    BodyLimits      the body within ``max_request_bytes`` and ``body_timeout`` seconds, read once and
                    handed on whole

Each answers in OpenAI's error shape. A refused body is never read into memory: uvicorn's HTTP protocol
discards what the client still sends after the answer, and the connection's header timeout
(``gptlab.serve.server``) bounds how long it may go on sending.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse

from gptlab.serve.schemas import APIError

if TYPE_CHECKING:
    from gptlab.serve.engine import Job

PUBLIC_PATHS = ("/", "/health")  # the chat page (it asks for the key itself) and liveness


OLLAMA_PREFIX = "/api/"  # Ollama's routes answer errors in Ollama's shape, {"error": "message"}


def error_response(error: APIError, close: bool = False, path: str = "") -> JSONResponse:
    """The error in the shape of the protocol that ``path`` belongs to: Ollama's under /api/, else OpenAI's."""
    headers = dict(error.headers() or {})
    if close:  # the client is still sending: end the connection instead of reading on
        headers["Connection"] = "close"
    body = {"error": error.message} if path.startswith(OLLAMA_PREFIX) else error.body()
    return JSONResponse(body, status_code=error.status, headers=headers or None)


def header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


# ---- the Host header ------------------------------------------------------------------------------

def host_name(host: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` -> ``::1``, ``Localhost.:80`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") > 1:  # a bare IPv6 address (not valid in a Host header, but unambiguous)
        return host
    name, colon, port = host.rpartition(":")
    return (name if colon and port.isdigit() else host).rstrip(".")


def is_loopback(host: str) -> bool:
    """``localhost`` (and RFC 6761's ``*.localhost``), 127.0.0.0/8, ``::1`` and IPv4-mapped loopback."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as a dual-stack socket reports it
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


class HostAllowlist:
    """A request that arrived on a loopback address must name a loopback host, or one of ``allowed``.

    A web page can point a name of its own at 127.0.0.1 (DNS rebinding) and so reach a server on this
    machine from the user's browser; the browser then sends that name as the Host. Refusing every name
    but loopback ones (and those the user allows) closes that door. With ``allowed`` given, requests on
    every address are held to it (and the loopback names); ``"*"`` in ``allowed`` turns the check off.
    A request without a Host header (HTTP/1.0) is not from a browser and passes.
    """

    def __init__(self, app, allowed: Sequence[str] = ()) -> None:
        self.app = app
        self.allowed = {host_name(h) for h in allowed}

    def permits(self, scope) -> bool:
        if scope["type"] != "http" or "*" in self.allowed:
            return True
        given = header(scope, b"host")
        arrived = (scope.get("server") or ("",))[0] or ""
        if given is None or not (self.allowed or is_loopback(arrived)):
            return True
        name = host_name(given)
        return is_loopback(name) or name in self.allowed

    async def __call__(self, scope, receive, send) -> None:
        if self.permits(scope):
            return await self.app(scope, receive, send)
        name = host_name(header(scope, b"host") or "")
        error = APIError(400, f"this server does not answer for the host {name!r} (a guard against DNS rebinding); "
                              f"to allow it: gptlab serve --allowed-host {name}", param="Host",
                         code="host_not_allowed")
        await error_response(error, path=scope["path"])(scope, receive, send)


# ---- the API key ----------------------------------------------------------------------------------

def api_key_error(authorization: str | None, api_key: str) -> APIError | None:
    """Why an ``Authorization`` header does not carry ``api_key``; None when it does."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
    if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        return APIError(401, "incorrect API key", code="invalid_api_key")
    return None


class RequireAPIKey:
    """Every path but ``PUBLIC_PATHS`` needs ``api_key``; a request without it gets 401 before its body is read."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.api_key is not None and scope["path"] not in PUBLIC_PATHS:
            error = api_key_error(header(scope, b"authorization"), self.api_key)
            if error is not None:
                return await error_response(error, path=scope["path"])(scope, receive, send)
        await self.app(scope, receive, send)


# ---- the body -------------------------------------------------------------------------------------

class BodyLimits:
    """A body over ``max_bytes`` gets 413, one slower than ``timeout`` seconds 408, before the app parses it.

    The body is read here in full (it is small by construction) so a chunked upload without a
    Content-Length is bounded too; the application then receives it as one message.
    """

    def __init__(self, app, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is over this server's limit of {self.max_bytes:,} bytes "
                                  "(gptlab serve --max-request-bytes)", code="request_too_large")
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(too_large, path=scope["path"])(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                slow = APIError(408, f"the request body did not arrive within {self.timeout:g} s "
                                     "(gptlab serve --body-timeout)", code="request_timeout")
                return await error_response(slow, close=True, path=scope["path"])(scope, receive, send)
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await error_response(too_large, path=scope["path"])(scope, receive, send)
            if not message.get("more_body", False):
                break
        await self.app(scope, replay(b"".join(chunks), receive), send)


def replay(body: bytes, receive):
    """An ASGI receive that hands the application ``body`` as one message, then whatever the client sends next."""
    replayed = False

    async def receive_replayed():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: http.disconnect, which cancels the request's job

    return receive_replayed


# ---- a client that hangs up ------------------------------------------------------------------------

@asynccontextmanager
async def cancelled_on_disconnect(job: Job, request: Request):
    """While the body runs, a client that hangs up cancels ``job`` at once, not when its answer is done.

    The request's body has been read, so the next ASGI message is the disconnect; the worker then
    drops the job before its next step.
    """
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
