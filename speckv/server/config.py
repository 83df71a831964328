"""Options of the HTTP server (the engine's own options are `speckv.config`'s)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where the server listens, who may use it and how much it queues."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "address to bind; the loopback by default, another host only when asked "
                "(e.g. 0.0.0.0, then also set --api-key)"})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port)"})
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer KEY' on every /v1 route. On a command line "
                "other local users can read it (/proc/PID/cmdline): prefer --api-key-file or "
                "the SPECKV_API_KEY environment variable (default: that variable if set, "
                "else no key)"})
    api_key_file: str | None = field(default=None, metadata={
        "help": "read the API key from this file (its first line); keep the file private "
                "(chmod 600)"})
    served_model_name: str | None = field(default=None, metadata={
        "help": "the model name clients must send (default: the model file's name, e.g. "
                "SmolLM2-135M-Instruct)"})
    max_waiting: int = field(default=128, metadata={
        "help": "most requests queued behind the running batch; beyond it the server "
                "answers 429 with Retry-After"})
    max_body_bytes: int = field(default=1 << 20, metadata={
        "help": "largest request body accepted, in bytes; larger ones get 413"})
    default_max_tokens: int = field(default=256, metadata={
        "help": "max_tokens of a request that does not set it"})
    log_requests: bool = field(default=False, metadata={
        "help": "log one line per finished request: id, prompt tokens (cached), generated "
                "tokens, time to first token, total time, finish reason"})
    stats_interval: float = field(default=10.0, metadata={
        "help": "seconds between stats lines while serving (prompt and generation tokens/s, "
                "running, waiting, DEVICE KV use, prefix cache hit rate), as vLLM's; 0: none"})
    shutdown_grace_seconds: float = field(default=30.0, metadata={
        "help": "on SIGINT/SIGTERM, how long in-flight requests may finish before they are "
                "aborted"})

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.stats_interval < 0:
            raise ValueError(f"stats_interval must be >= 0 (0: no stats lines), got "
                             f"{self.stats_interval}")
        if self.shutdown_grace_seconds < 0:
            raise ValueError(
                f"shutdown_grace_seconds must be >= 0, got {self.shutdown_grace_seconds}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty: give a key, or leave the option out")
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("give api_key or api_key_file, not both")

    def resolved_api_key(self) -> str | None:
        """The key in force: `api_key`, else the first line of `api_key_file`, else the
        SPECKV_API_KEY environment variable, else None (no key).

        Raises:
            ValueError: an unreadable or empty key file.
        """
        if self.api_key is not None:
            return self.api_key
        if self.api_key_file is not None:
            try:
                with open(self.api_key_file, encoding="utf-8") as fh:
                    key = fh.readline().strip()
                mode = os.stat(self.api_key_file).st_mode
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read api_key_file {self.api_key_file}: {exc}") from exc
            if not key:
                raise ValueError(f"api_key_file {self.api_key_file} holds no key")
            if mode & 0o077:
                logger.warning("api_key_file %s is readable by other users: chmod 600 it",
                               self.api_key_file)
            return key
        return os.environ.get("SPECKV_API_KEY") or None
