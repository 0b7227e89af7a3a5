"""Running the app: the listening socket (bound before the model loads), uvicorn in the foreground
(``gptlab serve``) or in a background thread (tests, benchmarks, notebooks)."""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from pathlib import Path

from fastapi import FastAPI

from gptlab.config import API_KEY_ENV, DEFAULT_HOST, DEFAULT_PORT, ServeLimits  # noqa: F401  (API_KEY_ENV: re-exported)
from gptlab.device import select_device
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


def uvicorn_server(app: FastAPI, log_level: str):
    import uvicorn  # the serve extra; imported when a server starts

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))


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
          prompt_style: str | None = None, log_level: str = "info") -> None:
    """Load ``source`` and serve it until interrupted (``gptlab serve``)."""
    for warning in bind_warnings(host, api_key):
        log.warning(warning)
    sock = listening_socket(host, port)
    try:
        served = ServedModel.load(source, device=select_device(device), name=name, prompt_style=prompt_style)
        app = create_app(served, api_key=api_key, limits=limits)
        shown = f"[{host}]" if ":" in host else host
        port = sock.getsockname()[1]
        log.info("serving %s (%s) at http://%s:%d/ (chat page) and http://%s:%d/v1 (OpenAI API)%s",
                 served.name, served.kind, shown, port, shown, port, "; API key required" if api_key else "")
        uvicorn_server(app, log_level).run(sockets=[sock])
    finally:
        sock.close()
