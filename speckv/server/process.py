"""`speckv serve` as a child process: started, watched through /health and /metrics,
stopped with a signal. Used by the serving benchmark and the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments dropped)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


class ServerProcess:
    """A `speckv serve ARGS` process on a free loopback port, healthy once constructed."""

    def __init__(self, *args: str, env: dict | None = None, startup_seconds: float = 180) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "speckv.cli", "serve", "--port", str(self.port), *args]
        self.log = tempfile.TemporaryFile("w+")  # a pipe nobody reads could fill and block it
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + startup_seconds
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"speckv serve exited with {self.proc.returncode}:\n"
                                   f"{self.output()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"speckv serve was not healthy after {startup_seconds} s")
            time.sleep(0.25)

    def output(self) -> str:
        """What the server printed so far."""
        self.log.seek(0)
        return self.log.read()

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.status, r.read().decode()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.get("/metrics")[1])

    def rss_bytes(self) -> int | None:
        """The server's resident memory (Linux /proc), or None where it cannot be read."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def wait_idle(self, timeout: float = 60.0) -> dict[str, float]:
        """Metrics once nothing runs, waits or is in flight and every DEVICE page is free
        or held by the prefix cache only."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            cached = m.get("speckv_engine_prefix_cache_device_pages", 0)
            if (m["speckv_device_pages_free"] + cached == m["speckv_device_pages_capacity"]
                    and m["speckv_requests_running"] == 0 and m["speckv_requests_waiting"] == 0
                    and m["speckv_engine_requests_in_flight"] == 0):
                return m
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not idle after {timeout} s: {m}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signals the server and waits for it (killing it after `timeout`); its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
