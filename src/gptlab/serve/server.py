"""Running the app: the listening socket (bound before the model loads), uvicorn in the foreground
(``gptlab serve``) or in a background thread (tests, benchmarks, notebooks), and the connection-level
limits: how many connections, and how long a client may stay silent or take over a request's headers.

uvicorn speaks HTTP/1.1 through h11 here, always (not httptools where it is installed), with a header
deadline added (``TimedH11Protocol``); h11 itself refuses headers over 16 KiB.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI

from gptlab.config import API_KEY_ENV, DEFAULT_HOST, DEFAULT_PORT, QuantizeConfig, ServeLimits  # noqa: F401  (API_KEY_ENV: re-exported)
from gptlab.device import inference_dtype, select_device
from gptlab.errors import GptlabError
from gptlab.serve.app import create_app
from gptlab.serve.engine import ServedModel

log = logging.getLogger("gptlab")


def bind_warnings(host: str, api_key: str | None) -> list[str]:
    """What to tell the user about listening on ``host``: anything but loopback is reachable by others."""
    if host == "localhost":
        return []
    try:
        if ipaddress.ip_address(host).is_loopback:
            return []
    except ValueError:
        pass  # a host name: it may resolve to a public address
    warnings = [f"listening on {host}, which is not a loopback address: other machines can reach this server"]
    if api_key is None:
        warnings.append(f"no API key: anyone who can connect may use the model (set --api-key or {API_KEY_ENV})")
    return warnings


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (0: any free port) for uvicorn to serve on.

    Bound before the model loads, so a port in use is a one-line error at once, not a uvicorn log
    after a model has loaded and its address has been announced.
    """
    if not 0 <= port <= 65535:
        raise GptlabError(f"port {port} is out of range; use 1-65535 (or 0: any free port)")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise GptlabError(f"cannot listen on {host}:{port} ({e.strerror or e}); "
                          "choose another --port, or a --host address of this machine") from None
    return sock


def timed_protocol(header_timeout: float):
    """uvicorn's h11 protocol with a deadline on each request's headers (a slow or stalled client is cut off).

    The clock starts when the connection opens and again when a response ends; it stops when a
    request's headers are complete. uvicorn's own keep-alive timeout (``idle_timeout``) closes a silent
    connection sooner, but any byte stops that one, so a client trickling a request (or the rest of a
    body the server has refused and is discarding) is held to this one.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()
            # A connection that never sends anything: as silent as an idle keep-alive one.
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are complete: the application has it now
                self._disarm()

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()
            if self.cycle is cycle and not self.transport.is_closing():  # no pipelined request started
                self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.logger.info("closing a connection that did not send a request within %g s "
                                 "(gptlab serve --header-timeout)", header_timeout)
                self.transport.close()

    return TimedH11Protocol


def uvicorn_server(app: FastAPI, log_level: str):
    """uvicorn for ``app`` with its connection limits (``app.state.limits``, a ``ServeLimits``)."""
    import uvicorn  # the serve extra; imported when a server starts

    limits: ServeLimits = getattr(app.state, "limits", ServeLimits())
    return uvicorn.Server(uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=2, http=timed_protocol(limits.header_timeout),
        timeout_keep_alive=limits.idle_timeout, limit_concurrency=limits.max_connections))


class BackgroundServer:
    """uvicorn serving ``app`` from a daemon thread on a free port: for tests, benchmarks and notebooks.

        with BackgroundServer(create_app(served)) as server:
            openai.OpenAI(base_url=server.url + "/v1", api_key="-")...
    """

    def __init__(self, app: FastAPI, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning") -> None:
        self._socket = listening_socket(host, port)  # bound here, so the port is known before the server starts
        self.app = app
        self.host, self.port = host, self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn_server(app, log_level)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="gptlab-uvicorn", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


def serve(source: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
          limits: ServeLimits = ServeLimits(), device: str = "auto", name: str | None = None,
          prompt_style: str | None = None, log_level: str = "info", allowed_hosts: Sequence[str] = (),
          quantize: QuantizeConfig | None = None, dtype: str = "fp32") -> None:
    """Load ``source`` and serve it until interrupted (``gptlab serve``): quantized as it loads with ``quantize``
    (``--quantize``), or its weights in ``dtype`` (``--dtype`` fp32 or bf16).

    torch's thread count is the caller's to set (``gptlab serve --threads``): it is process-wide.
    """
    for warning in bind_warnings(host, api_key):
        log.warning(warning)
    sock = listening_socket(host, port)
    try:
        where = select_device(device)
        served = ServedModel.load(source, device=where, name=name, prompt_style=prompt_style,
                                  quantize=quantize, dtype=inference_dtype(dtype, where))
        app = create_app(served, api_key=api_key, limits=limits, allowed_hosts=allowed_hosts)
        shown = f"[{host}]" if ":" in host else host
        port = sock.getsockname()[1]
        log.info("serving %s (%s) at http://%s:%d/ (chat page) and http://%s:%d/v1 (OpenAI API)%s",
                 served.name, served.kind, shown, port, shown, port, "; API key required" if api_key else "")
        uvicorn_server(app, log_level).run(sockets=[sock])
    finally:
        sock.close()
