"""Start the service: check everything, bind the socket, then run uvicorn (one or more processes).

Every problem that can be found before serving is found here and reported as one line (exit
2): a collection that is missing or damaged, a model that does not load, a key file that is
unreadable or too short, an address that cannot be bound. The socket is bound here, not by
uvicorn, so ``--port 0`` works and the line printed at start names the real port. With
``--workers N`` uvicorn's supervisor starts N processes on that one socket; each opens the
collections itself (memory-mapped vectors are shared through the page cache) and reads the key
from its file: the settings travel in an environment variable, the key never does.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
from typing import Any

import uvicorn
from fastapi import FastAPI

from indexer.cli import UsageError
from indexer.server.api import create_app
from indexer.server.auth import read_key
from indexer.server.live import LiveCollection
from indexer.server.options import LOOPBACK, ServeConfig, config_from_args

__all__ = ["CONFIG_ENV", "app_from_env", "bind", "serve"]

CONFIG_ENV = "MOCO_SERVE_CONFIG"
"""Where worker processes find the settings (JSON of :class:`ServeConfig`; never the key)."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: one the system picks), or a UsageError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def log_config() -> dict[str, Any]:
    """uvicorn's logging, plus this service's own logger (generation switches, failures)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["indexer.server"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def app_from_env() -> FastAPI:
    """The application of one worker process (uvicorn calls this factory in each)."""
    config = ServeConfig.from_json(os.environ[CONFIG_ENV])
    key = read_key(config.api_key_file) if config.api_key_file else None
    return create_app(config, key=key)


def _open_all(config: ServeConfig) -> dict[str, LiveCollection]:
    served: dict[str, LiveCollection] = {}
    try:
        for name, directory in config.collections.items():
            served[name] = LiveCollection(name, directory, device=config.device, embed_batch=config.embed_batch)
    except BaseException:
        for live in served.values():
            live.close()
        raise
    return served


def serve(args: argparse.Namespace) -> int:
    """``python -m indexer serve``: returns when the server is stopped (Ctrl+C, SIGTERM)."""
    config = config_from_args(args)
    key = read_key(config.api_key_file) if config.api_key_file else None
    served = _open_all(config)  # a damaged collection or a bad model fails here, as one line
    try:
        sock = bind(config.host, config.port)
    except UsageError:
        for live in served.values():
            live.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    names = ", ".join(f"{name} ({_describe(live)})" for name, live in served.items())
    print(f"serving {names} at http://{shown}:{port} (API and docs: /docs; "
          f"{'API key required' if key else 'no API key'}; {config.workers} worker(s))", flush=True)
    if host not in (LOOPBACK, "::1") and key is None:
        print(f"warning: listening on {host} without --api-key-file: anyone who reaches this machine can "
              "search these collections", file=sys.stderr, flush=True)
    common = {"log_config": log_config(), "access_log": config.access_log, "timeout_graceful_shutdown": 5}
    if config.workers == 1:
        app = create_app(config, key=key, served=served)
        uvicorn.Server(uvicorn.Config(app, **common)).run(sockets=[sock])
        return 0
    for live in served.values():  # each worker opens its own; these only proved that opening works
        live.close()
    os.environ[CONFIG_ENV] = config.to_json()
    from uvicorn.supervisors import Multiprocess

    uv = uvicorn.Config("indexer.server.launch:app_from_env", factory=True, workers=config.workers, **common)
    Multiprocess(uv, sockets=[sock]).run()
    return 0


def _describe(live: LiveCollection) -> str:
    with live.use() as g:
        return f"{len(g.collection):,} items, generation {g.collection.generation}"
