"""The server's engine loop against a scripted engine (no model): errors of one request
stay with it, and a loop that dies says so (/health 503) and calls for an exit."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from speckv.engine.sampling_params import SamplingParams
from speckv.server.async_engine import ACCEPTED, AsyncEngine, EngineError
from speckv.server.metrics import ServerMetrics


class _Scheduler:
    waiting: list = []


class ScriptedEngine:
    """Enough of `LLMEngine` for the loop; `add_request` and `step` do what a test says."""

    def __init__(self, add=None, step=None) -> None:
        self.scheduler = _Scheduler()
        self.added: list[str] = []
        self.aborted: list[str] = []
        self._add, self._step = add, step

    def add_request(self, token_ids, params, request_id):
        if self._add is not None:
            self._add(token_ids)
        self.added.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(set(self.added) - set(self.aborted))

    def step(self):
        return self._step() if self._step is not None else []

    def abort(self, request_id):
        self.aborted.append(request_id)

    def check_pool(self) -> bool:
        return True

    def stats(self) -> dict:
        return {"requests_running": len(self.added) - len(self.aborted)}

    def close(self) -> None:
        pass


def submit_and_collect(loop_engine: AsyncEngine, token_ids: list[int], n: int = 2) -> list:
    async def go():
        _, outputs = loop_engine.submit(token_ids, SamplingParams(temperature=0, max_tokens=4))
        return [await asyncio.wait_for(outputs.get(), 10) for _ in range(n)]

    return asyncio.run(go())


def test_an_engine_fault_while_adding_fails_that_request_alone():
    def add(token_ids):
        if token_ids == [666]:
            raise OverflowError("int too big to convert")

    engine = ScriptedEngine(add=add)
    loop_engine = AsyncEngine(engine, max_waiting=8, metrics=ServerMetrics())
    loop_engine.start()
    try:
        [error] = submit_and_collect(loop_engine, [666], n=1)
        assert isinstance(error, EngineError) and not error.bad_request
        assert "OverflowError" in error.message
        [accepted] = submit_and_collect(loop_engine, [1, 2], n=1)  # the loop goes on
        assert accepted is ACCEPTED
        assert loop_engine.fatal is None and loop_engine.accepting
    finally:
        loop_engine.shutdown(0.0)


def test_a_loop_that_dies_fails_its_streams_turns_health_503_and_calls_for_an_exit():
    from fastapi.testclient import TestClient

    from speckv.server.app import ServedModel, build_app
    from speckv.server.config import ServerConfig

    def step():
        raise SystemError("bug in the loop")  # not an Exception the step handler takes

    class Broken(ScriptedEngine):
        def has_unfinished(self) -> bool:
            if self.added:
                raise KeyboardInterrupt  # escapes every handler inside the loop
            return False

    exited = threading.Event()
    engine = Broken(step=step)
    loop_engine = AsyncEngine(engine, max_waiting=8, metrics=ServerMetrics(),
                              on_fatal=exited.set)
    app = build_app(loop_engine, ServedModel("m", tokenizer=None, max_model_len=64),
                    ServerConfig())
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        outputs = submit_and_collect(loop_engine, [1, 2], n=2)
        assert outputs[0] is ACCEPTED
        assert isinstance(outputs[1], EngineError) and "engine failed" in outputs[1].message
        assert exited.wait(5)
        assert loop_engine.fatal is not None
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "engine failed"
        deadline = time.monotonic() + 5
        with pytest.raises(Exception, match="engine failed"):
            while time.monotonic() < deadline:
                submit_and_collect(loop_engine, [1], n=1)
