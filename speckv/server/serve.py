"""`speckv serve`: the engine behind uvicorn, with a graceful shutdown.

On SIGINT/SIGTERM the server stops admitting (new requests: 503), lets in-flight
requests finish for `shutdown_grace_seconds`, aborts what is left, frees every tier
and exits 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path

import uvicorn

from speckv.engine.llm_engine import LLMEngine
from speckv.server.app import ServedModel, build_app
from speckv.server.async_engine import AsyncEngine
from speckv.server.config import ServerConfig
from speckv.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, draining the engine on the first signal and exiting 0 after it
    (uvicorn itself re-raises the signal once it has shut down)."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame) -> None:
        self.engine.drain()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True


def served_name(engine: LLMEngine, config: ServerConfig) -> str:
    """The `--served-model-name`, else the model file's name without its suffixes."""
    if config.served_model_name:
        return config.served_model_name
    return Path(engine.loaded.path).name.split(".")[0]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(engine: LLMEngine, config: ServerConfig, log_level: str = "info") -> int:
    """Serves until a signal; returns the exit status."""
    if config.api_key is None and os.environ.get("SPECKV_API_KEY"):
        config = ServerConfig(**{**_fields(config), "api_key": os.environ["SPECKV_API_KEY"]})
    if not is_loopback(config.host) and config.api_key is None:
        logger.warning("serving on %s without an API key: anyone who can reach it may use it",
                       config.host)
    metrics = ServerMetrics()
    loop_engine = AsyncEngine(engine, config.max_waiting, metrics)
    metrics.watch(lambda: loop_engine.snapshot)
    model = ServedModel(served_name(engine, config), engine.tokenizer, engine.max_model_len)
    app = build_app(loop_engine, model, config)
    server = _Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level,
        timeout_graceful_shutdown=config.shutdown_grace_seconds, access_log=False), loop_engine)
    print(f"speckv: serving {model.name} on http://{config.host}:{config.port}/v1 "
          f"(context {model.max_model_len} tokens)", file=sys.stderr, flush=True)
    server.run()
    if not server.started:
        loop_engine.shutdown(0.0)
        return 1
    return 0


def _fields(config: ServerConfig) -> dict:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}
