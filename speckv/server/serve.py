"""`speckv serve`: the engine behind uvicorn, with a graceful shutdown.

On SIGINT/SIGTERM the server stops admitting (new requests and /health: 503; the
port stays open so clients and probes get that answer, not a refused connection),
lets in-flight requests finish for `shutdown_grace_seconds`, fails what is left
(each such stream gets an error event and `data: [DONE]`), then closes the port,
frees every tier and exits 0. A second SIGINT forces the exit. If the engine loop
dies, the server exits 1 so that a supervisor restarts it.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
import threading
from pathlib import Path

import uvicorn

from speckv.engine.llm_engine import LLMEngine
from speckv.server.app import ServedModel, build_app
from speckv.server.async_engine import AsyncEngine
from speckv.server.config import ServerConfig
from speckv.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


_CLOSE_GRACE_S = 5.0  # after the drain: for the last events to reach their clients


class _Server(uvicorn.Server):
    """uvicorn's server, draining the engine on the first signal before uvicorn's own
    shutdown begins, and exiting 0 after it (uvicorn itself re-raises the signal once
    it has shut down)."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace = grace
        self._draining: threading.Thread | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining is None:
            self._draining = threading.Thread(target=self._drain, name="speckv-drain",
                                              daemon=True)
            self.engine.drain()
            self._draining.start()
        elif sig == signal.SIGINT:  # the second Ctrl-C
            self.force_exit = self.should_exit = True

    def _drain(self) -> None:
        self.engine.finish_in_flight(self.grace)
        self.should_exit = True

    def stop_on_fatal(self) -> None:
        """The engine loop died: stop serving (run() then returns 1)."""
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
    api_key = config.resolved_api_key()
    if not is_loopback(config.host) and api_key is None:
        logger.warning("serving on %s without an API key: anyone who can reach it may use it",
                       config.host)
    metrics = ServerMetrics()
    server: _Server | None = None
    if config.log_requests:  # shown whatever the level of the rest
        logging.getLogger("speckv.requests").setLevel(logging.INFO)
    if config.stats_interval:
        logging.getLogger("speckv.stats").setLevel(logging.INFO)
    loop_engine = AsyncEngine(engine, config.max_waiting, metrics,
                              on_fatal=lambda: server is not None and server.stop_on_fatal(),
                              log_requests=config.log_requests,
                              stats_interval=config.stats_interval)
    metrics.watch(lambda: loop_engine.snapshot)
    model = ServedModel(served_name(engine, config), engine.tokenizer, engine.max_model_len)
    app = build_app(loop_engine, model, config, api_key)
    server = _Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level,
        timeout_graceful_shutdown=_CLOSE_GRACE_S, access_log=False), loop_engine,
        config.shutdown_grace_seconds)
    print(f"speckv: serving {model.name} on http://{config.host}:{config.port}/v1 "
          f"(context {model.max_model_len} tokens)", file=sys.stderr, flush=True)
    server.run()
    if not server.started:
        loop_engine.shutdown(0.0)
        return 1
    if loop_engine.fatal is not None:
        print(f"speckv: the engine failed ({loop_engine.fatal}); exiting 1", file=sys.stderr)
        return 1
    return 0
