"""The memory node as a real process: started from the CLI, used, killed, restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import assert_no_leak
from speckv import SamplingParams
from speckv.pool.base import PoolUnavailable

PAGE, LAYERS = 24_576, 30
PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPT = "In the harbour the fishing boats rocked gently while the gulls circled overhead. " * 3


class Node:
    """`speckv memnode` run as its own process, the way a user starts it."""

    def __init__(self, socket_path: str) -> None:
        self.socket = socket_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "speckv.cli", "memnode", "--socket", self.socket,
             "--size", "64MiB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("memnode ready"), line + self.proc.stderr.read()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def node(tmp_path):
    n = Node(str(tmp_path / "memnode.sock"))
    n.start()
    yield n
    n.stop()


@pytest.fixture(scope="module")
def solo(make_llm):
    return make_llm(device_kv_bytes="16MiB").generate(PROMPT, PARAMS)[0].token_ids


@pytest.mark.slow
def test_node_serves_dies_mid_run_and_serves_again_after_restart(make_llm, node, solo):
    llm = make_llm(device_kv_bytes=3 * LAYERS * PAGE, pool="memnode", memnode_socket=node.socket)
    engine = llm.engine
    assert llm.generate(PROMPT, PARAMS)[0].token_ids == solo
    assert llm.stats()["pool_pages_loaded"] > 0  # the node really served pages

    engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    node.kill()
    started = time.monotonic()
    with pytest.raises(PoolUnavailable, match="memory node"):
        for _ in range(200):
            engine.step()
    assert time.monotonic() - started < 15, "noticing the dead node took too long"
    assert_no_leak(engine)  # the request failed; its DEVICE pages are free
    with pytest.raises(PoolUnavailable, match=f"cannot reach the memory node at {node.socket}"):
        llm.generate("Hi", PARAMS)  # nothing queued behind the error
    assert engine.num_unfinished() == 0

    node.start()  # restarted by its operator at the same socket
    assert llm.generate(PROMPT, PARAMS)[0].token_ids == solo
    assert_no_leak(engine)
    llm.close()


@pytest.mark.slow
def test_engine_spawned_node_is_restarted_after_it_dies(make_llm, solo):
    llm = make_llm(device_kv_bytes=3 * LAYERS * PAGE, pool="memnode", pool_bytes="32MiB")
    backend = llm.engine.cache.store.backend
    first = backend._proc
    first.kill()
    first.wait(timeout=10)
    with pytest.raises(PoolUnavailable):
        llm.generate(PROMPT, PARAMS)  # the first step finds the node gone ...
    assert llm.generate(PROMPT, PARAMS)[0].token_ids == solo  # ... the next request respawns it
    assert backend._proc is not first and backend._proc.poll() is None
    llm.close()
    assert backend._proc.poll() is not None  # close() stops the node it spawned


def test_sigterm_removes_the_socket_and_leaves_no_shared_memory_file(node):
    assert os.stat(node.socket).st_mode & 0o077 == 0  # only its owner can connect
    before = set(os.listdir("/dev/shm"))
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=10) == 0
    assert not os.path.exists(node.socket)
    assert not {f for f in before if f.startswith("speckv")}  # the segment is a memfd


@pytest.mark.parametrize("kv_read", ["copy", "in_place"])
def test_link_model_makes_transfers_take_the_link_time(make_llm, solo, kv_read):
    bandwidth, latency = 0.5e9, 20e-6  # custom:0.5,20000
    llm = make_llm(device_kv_bytes=3 * LAYERS * PAGE, pool="memnode", pool_bytes="32MiB",
                   link="custom:0.5,20000", kv_read=kv_read)
    started = time.perf_counter()
    assert llm.generate(PROMPT, PARAMS)[0].token_ids == solo
    elapsed = time.perf_counter() - started
    s = llm.stats()
    assert s["pool_link_wait_seconds"] > 0
    # every read waited at least the link's time for its bytes (a lower bound: not flaky)
    if kv_read == "copy":
        assert s["tier_pages_fetched"] > 0
        assert s["tier_stall_seconds"] >= s["tier_bytes_fetched"] / bandwidth + s["tier_fetches"] * latency
    else:  # read where they lie, but never faster than the link carries them
        assert s["tier_pages_fetched"] == 0 and s["tier_bytes_read_in_place"] > 0
        assert elapsed >= s["tier_bytes_read_in_place"] / bandwidth
    llm.close()


def test_memnode_cli_rejects_bad_arguments(tmp_path):
    run = [sys.executable, "-m", "speckv.cli", "memnode", "--socket", str(tmp_path / "s")]
    bad_link = subprocess.run(run + ["--link", "warp"], capture_output=True, text=True)
    assert bad_link.returncode == 2 and "unknown link 'warp'; known links" in bad_link.stderr
    too_big = subprocess.run(run + ["--size", "100TiB"], capture_output=True, text=True)
    assert too_big.returncode == 2 and "exceeds the free shared memory" in too_big.stderr
