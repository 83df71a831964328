"""The engine loop: one thread owns the `LLMEngine`; HTTP handlers talk to it by messages.

    handler ──submit──► commands ──► engine thread: add / abort, then engine.step()
       ▲                                   │
       └──── asyncio.Queue per request ◄───┘  (RequestOutput, or an EngineError)

Requests join the running batch between steps (continuous batching). Only the engine
thread touches the engine; handlers read `snapshot`, a stats dict replaced whole.

The loop never dies of one request: an error while adding a request, or one that
the engine reports for a single request (a sampling failure), fails that request
alone; a step that raises fails the requests of that step and the loop goes on. If
the loop itself breaks (a bug), `fatal` says why, every stream gets an error, /health
turns 503 and `on_fatal` (the server: exit non-zero, for a supervisor to restart it)
is called. While idle, the loop checks the KV pool every `POOL_CHECK_EVERY` seconds,
so a lost memory node shows in /health and /metrics before a request fails on it.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from speckv.engine.llm_engine import LLMEngine
from speckv.engine.outputs import RequestOutput
from speckv.engine.sampling_params import SamplingParams
from speckv.pool.base import PoolUnavailable
from speckv.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
request_log = logging.getLogger("speckv.requests")  # --log-requests: a line per request
stats_log = logging.getLogger("speckv.stats")  # --stats-interval: the periodic line

_SNAPSHOT_EVERY = 0.2  # seconds between stats snapshots while stepping
_RATE_WINDOW = 10.0  # seconds of history behind the tokens/s gauge
POOL_CHECK_EVERY = 5.0  # seconds between pool checks of an idle engine


ACCEPTED = object()  # the first item of a request's queue once the engine has added it


class Overloaded(Exception):
    """The queue is full (429): retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the server is busy: too many requests are waiting")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server stopped admitting requests (503)."""


@dataclass(frozen=True, slots=True)
class EngineError:
    """Delivered instead of an output: `bad_request` errors are the client's (400)."""

    message: str
    bad_request: bool = False


@dataclass(slots=True)
class _Window:
    """Tokens since the last stats line (engine thread only)."""

    prompt_tokens: int = 0  # computed (cached ones not counted)
    generated_tokens: int = 0


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0

    def put(self, item: RequestOutput | EngineError) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            pass


class AsyncEngine:
    """Runs an `LLMEngine` on a thread of its own and streams outputs to asyncio callers."""

    def __init__(self, engine: LLMEngine, max_waiting: int, metrics: ServerMetrics,
                 on_fatal: Callable[[], None] | None = None, log_requests: bool = False,
                 stats_interval: float = 0.0) -> None:
        """`log_requests`: a line per finished request (logger speckv.requests);
        `stats_interval`: seconds between stats lines while busy (speckv.stats; 0: none)."""
        self.engine = engine
        self.log_requests = log_requests
        self.stats_interval = stats_interval
        self._window = _Window()  # what happened since the last stats line
        self.fatal: str | None = None  # why the loop died, if it did
        self._on_fatal = on_fatal
        self.max_waiting = max_waiting
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet added by the engine thread
        self._num_in_flight = 0  # added, not yet finished (engine thread writes it)
        self._num_waiting = 0  # the scheduler's queue after the last step
        self._accepting = True
        self._stop = threading.Event()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._ids = itertools.count()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) for tokens/s
        self.snapshot: dict = self._stats()
        self._thread = threading.Thread(target=self._run, name="speckv-engine", daemon=True)

    # ------------------------------------------------------------ handler side

    def start(self) -> None:
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return self._accepting and self.fatal is None

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return self._pending + self._num_waiting

    def submit(self, token_ids: list[int], params: SamplingParams, prefix: str = "req",
               ) -> tuple[str, asyncio.Queue]:
        """Queues a request; its outputs arrive on the returned queue.

        Raises:
            Overloaded: `max_waiting` requests are already waiting.
            ShuttingDown: the server is draining.
        """
        with self._lock:
            if self.fatal is not None:
                raise ShuttingDown(f"the engine failed: {self.fatal}")
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if self._pending + self._num_waiting >= self.max_waiting:
                self.metrics.rejected.inc()
                raise Overloaded(self._retry_after())
            self._pending += 1
        rid = f"{prefix}-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("add", rid, token_ids, params, stream))
        self._wake.set()
        return rid, stream.outputs

    def abort(self, request_id: str) -> None:
        """Stops a request (client gone); its pages are freed by the engine thread."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    def _retry_after(self) -> int:
        """Seconds until a queue place is likely free: one mean request time, at least 1."""
        mean = self.metrics.mean_request_seconds()
        return max(1, round(mean)) if mean else 1

    def drain(self) -> None:
        """Stops admitting: new requests get 503; running ones go on."""
        with self._lock:
            self._accepting = False

    def finish_in_flight(self, grace: float) -> None:
        """Drains, lets in-flight requests finish for up to `grace` seconds, then fails
        the rest: each of their streams gets an error event and its end."""
        self.drain()
        deadline = time.monotonic() + grace
        while self._in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._in_flight():
            self._commands.put(("abort_all", "the server shut down before the request finished"))
            self._wake.set()
            while self._in_flight() and self._thread.is_alive():
                time.sleep(0.05)

    def _in_flight(self) -> int:
        with self._lock:
            return self._pending + self._num_in_flight

    def shutdown(self, grace: float) -> None:
        """`finish_in_flight(grace)`, then stops the thread and closes the engine
        (freeing every tier)."""
        self.finish_in_flight(grace)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self.engine.close()

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug: say so everywhere, then let a supervisor restart
            logger.critical("the engine loop died", exc_info=True)
            self.fatal = f"{type(exc).__name__}: {exc}"
            try:
                for stream in self._streams.values():
                    stream.put(EngineError(f"the engine failed: {self.fatal}"))
                self._streams.clear()
                with self._lock:
                    self._pending = self._num_in_flight = 0
            finally:
                if self._on_fatal is not None:
                    self._on_fatal()

    def _loop(self) -> None:
        last_snapshot = last_check = 0.0
        last_line = time.monotonic()
        busy = False
        while True:
            self._handle_commands()
            if self._stop.is_set():
                self._abort_all("the server shut down before the request finished")
                break
            now = time.monotonic()
            if not self.engine.has_unfinished():
                if busy:  # back to idle: hand freed heap memory back to the OS
                    _trim_heap()
                    busy = False
                self.snapshot = self._stats()
                if now - last_check >= POOL_CHECK_EVERY:  # may wait out the pool's deadline
                    self.engine.check_pool()
                    last_check = time.monotonic()
                    self.snapshot = self._stats()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            busy = True
            self._step()
            if now - last_snapshot >= _SNAPSHOT_EVERY:
                self.snapshot, last_snapshot = self._stats(), now
            if self.stats_interval and now - last_line >= self.stats_interval:
                self._stats_line(now - last_line)
                last_line = now
        self.snapshot = self._stats()

    def _set_in_flight(self) -> None:
        with self._lock:
            self._num_in_flight = len(self._streams)
            self._num_waiting = len(self.engine.scheduler.waiting)

    def _handle_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                self._add(*command[1:])
            elif command[0] == "abort":
                self._abort(command[1])
            else:
                self._abort_all(command[1])

    def _add(self, rid: str, token_ids: list[int], params: SamplingParams, stream: _Stream) -> None:
        try:
            self.engine.add_request(token_ids, params, request_id=rid)
        except PoolUnavailable as exc:
            self.snapshot = self._stats()  # /health says so before the client hears of it
            stream.put(EngineError(f"the KV pool is unavailable: {exc}"))
        except ValueError as exc:
            stream.put(EngineError(str(exc), bad_request=True))
        except Exception as exc:  # noqa: BLE001 — an engine fault fails this request alone
            logger.exception("adding request %s failed", rid)
            self.engine.abort(rid)
            stream.put(EngineError(f"engine error: {type(exc).__name__}: {exc}"))
        else:
            self._streams[rid] = stream
            stream.put(ACCEPTED)
        finally:
            with self._lock:
                self._pending -= 1
            self._set_in_flight()

    def _abort(self, rid: str) -> None:
        if self._streams.pop(rid, None) is not None:
            self.engine.abort(rid)
            self.metrics.aborted.inc()
        self._set_in_flight()

    def _abort_all(self, why: str) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            stream.put(EngineError(why))
        self._streams.clear()
        self._set_in_flight()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except PoolUnavailable as exc:  # the engine aborted every request already
            logger.error("KV pool lost: %s", exc)
            self.snapshot = self._stats()  # /health says so before any client hears of it
            self._abort_all(f"the KV pool became unavailable: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 — fail the batch, keep serving the rest
            logger.exception("engine step failed; aborting its requests")
            self._abort_all(f"engine error: {type(exc).__name__}: {exc}")
            return
        now = time.perf_counter()
        for out in outputs:
            self._deliver(out, now)
        self._set_in_flight()

    def _deliver(self, out: RequestOutput, now: float) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        new_tokens = out.num_generated_tokens - stream.num_tokens
        if new_tokens > 0:
            if stream.last_token is None:
                self.metrics.time_to_first_token.observe(now - stream.arrival)
                stream.first_token = now
                self._window.prompt_tokens += out.num_prompt_tokens - out.num_cached_tokens
            else:
                self.metrics.inter_token_latency.observe((now - stream.last_token) / new_tokens)
            stream.last_token, stream.num_tokens = now, out.num_generated_tokens
            self.metrics.generation_tokens.inc(new_tokens)
            self._recent.append((now, new_tokens))
            self._window.generated_tokens += new_tokens
        if out.finished:
            del self._streams[out.request_id]
            self.metrics.request_finished(out.finish_reason, now - stream.arrival,
                                          out.num_prompt_tokens)
            if self.log_requests:
                ttft = "-" if stream.first_token is None else \
                    f"{stream.first_token - stream.arrival:.3f} s"
                request_log.info(
                    "request %s: %d prompt tokens (%d cached), %d generated, ttft %s, "
                    "total %.3f s, %s", out.request_id, out.num_prompt_tokens,
                    out.num_cached_tokens, out.num_generated_tokens, ttft, now - stream.arrival,
                    out.error and f"error: {out.error}" or out.finish_reason)
        if out.error is not None:  # the engine failed this request alone
            stream.put(EngineError(f"engine error: {out.error}"))
        else:
            stream.put(out)

    def _stats_line(self, seconds: float) -> None:
        """vLLM's periodic line, when something happened since the last one."""
        w, self._window = self._window, _Window()
        if not (w.prompt_tokens or w.generated_tokens or self.engine.has_unfinished()):
            return
        s = self.engine.stats()
        used = s["device_pages_used"] / max(1, s["device_pages_total"])
        hit = s.get("prefix_cache_hit_rate")
        stats_log.info(
            "prompt %.1f tokens/s, generation %.1f tokens/s, running %d, waiting %d, "
            "DEVICE KV %.1f%% used%s", w.prompt_tokens / seconds, w.generated_tokens / seconds,
            s["requests_running"], s["requests_waiting"], 100 * used,
            "" if hit is None else f", prefix cache hit rate {100 * hit:.1f}%")

    def _tokens_per_second(self) -> float:
        now = time.perf_counter()
        while self._recent and self._recent[0][0] < now - _RATE_WINDOW:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / _RATE_WINDOW

    def _stats(self) -> dict:
        stats = self.engine.stats()
        stats["requests_in_flight"] = self._in_flight()
        stats["generation_tokens_per_second"] = self._tokens_per_second()
        return stats


def _trim_heap() -> None:
    """glibc keeps freed memory of a load peak (activations of large batches) mapped;
    `malloc_trim` returns it, so an idle server's RSS falls back. No-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
