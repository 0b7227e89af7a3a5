"""Serve a model over HTTP: an OpenAI-compatible API, server-sent-event streaming and a chat page.

    GET  /                      the chat page (``assets/chat.html``: no CDN, works offline)
    GET  /health                liveness; the model and queue depth too, with the API key (if one is set)
    GET  /v1/models             the one served model, with gptlab's extras (kind, context, labels, limits)
    POST /v1/completions        OpenAI's legacy completions: prompt(s) -> text, ``stream`` as SSE
    POST /v1/chat/completions   messages -> an answer, laid out by the model's prompt style
    POST /v1/classify           a classifier run: text(s) -> label and class probabilities
    POST /api/generate, /api/chat, GET /api/tags, POST /api/show, GET /api/version   Ollama's API (``ollama``)

The package, low to high: ``schemas`` (request bodies, OpenAI's error shape, request checks), ``engine``
(the model and the worker thread that decodes requests as one continuous batch: no HTTP here), ``guards``
(the Host allowlist, the API key and the body's size and time, checked before a request costs anything),
``ollama`` (Ollama's routes and NDJSON shapes over the same engine), ``app`` (OpenAI's routes and response
shapes) and ``server`` (sockets, uvicorn, connection limits and timeouts).

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the official client
raises its usual exceptions: 400 bad values (and a Host this server does not answer for), 401 API key,
404 unknown model or route, 408 body too slow, 413 body too large, 422 malformed fields, 503 queue full
(or too many connections). Under /api/ they take Ollama's shape, ``{"error": "message"}`` (a malformed
field is a 400 there, as in Ollama).
"""
from gptlab.config import ServeLimits
from gptlab.serve.app import create_app, sse_stream
from gptlab.serve.engine import Engine, GenerationWorker, Job, ServedModel
from gptlab.serve.guards import BodyLimits, HostAllowlist, RequireAPIKey
from gptlab.serve.schemas import APIError, Sampling
from gptlab.serve.server import (API_KEY_ENV, DEFAULT_HOST, DEFAULT_PORT, BackgroundServer, bind_warnings,
                                 listening_socket, serve)

__all__ = ["API_KEY_ENV", "DEFAULT_HOST", "DEFAULT_PORT", "APIError", "BackgroundServer", "BodyLimits", "Engine",
           "GenerationWorker", "HostAllowlist", "Job", "RequireAPIKey", "Sampling", "ServeLimits", "ServedModel",
           "bind_warnings", "create_app", "listening_socket", "serve", "sse_stream"]
