"""The memory node's control protocol against hostile peers: nothing that arrives is
executed, every malformed message gets an error reply and leaves the accounting
exact, and a peer of another user is refused by both ends. No model needed."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from speckv.pool import wire
from speckv.pool.base import PoolUnavailable
from speckv.pool.memnode import MemNodePool
from test_memnode import Node

SLOT = 4096
NOBODY = 65534


class Exploit:
    """Unpickling this creates `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def ask(sock: socket.socket, message: dict | bytes) -> dict:
    sock.sendall(frame(message if isinstance(message, bytes) else json.dumps(message).encode()))
    reply, fds = wire.recv(sock, max_fds=1)
    for fd in fds:
        os.close(fd)
    return reply


def attach(sock: socket.socket, slot_bytes: int = SLOT) -> dict:
    return ask(sock, {"op": "attach", "version": wire.PROTOCOL_VERSION, "slot_bytes": slot_bytes})


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One node for the tests that leave it as they found it."""
    n = Node(str(tmp_path_factory.mktemp("node") / "memnode.sock"))
    n.start()
    yield n
    n.stop()


@pytest.fixture
def own_node(tmp_path):
    """A node for a test that changes its socket's owner or mode."""
    n = Node(str(tmp_path / "memnode.sock"))
    n.start()
    yield n
    n.stop()


def test_a_pickle_sent_to_the_node_executes_nothing(node, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(str(marker)))
    with connect(node.socket) as sock:  # framed, as our protocol would carry it
        reply = ask(sock, payload)
        assert reply["ok"] is False and "not a JSON message" in reply["error"]
    with connect(node.socket) as sock:  # raw, as multiprocessing.connection sends it
        sock.sendall(struct.pack("!i", len(payload)) + payload)
        try:
            wire.recv(sock)
        except wire.WireError:
            pass  # the node may just hang up
    time.sleep(0.2)
    assert not marker.exists()
    with connect(node.socket) as sock:  # and the node serves on
        assert attach(sock)["ok"]
        assert ask(sock, {"op": "stats"})["num_free"] == (64 << 20) // SLOT


@pytest.mark.parametrize("message", [
    {"op": "allocate", "n": -5},
    {"op": "allocate", "n": 0},
    {"op": "allocate", "n": 2**70},
    {"op": "allocate", "n": "3"},
    {"op": "allocate", "n": True},
    {"op": "allocate", "n": 1.5},
    {"op": "allocate"},
    {"op": "free", "ids": [100]},  # held by nobody
    {"op": "free", "ids": [0, 0]},  # held, but twice
    {"op": "free", "ids": [-1]},
    {"op": "free", "ids": [10**9]},
    {"op": "free", "ids": "0"},
    {"op": "free", "ids": [True]},
    {"op": "explode"},
    {"op": ["attach"]},
    {},
    b"[1, 2, 3]",
    b"\xff\xfe not utf-8",
    b"[" * 100_000 + b"]" * 100_000,
    b"",
], ids=lambda m: repr(m)[:40])
def test_malformed_messages_get_error_replies_and_leave_the_accounting_exact(node, message):
    with connect(node.socket) as sock:
        attach(sock)
        held = ask(sock, {"op": "allocate", "n": 3})["ids"]
        free_before = ask(sock, {"op": "stats"})["num_free"]
        reply = ask(sock, message)
        assert reply["ok"] is False and reply["error"], reply
        assert ask(sock, {"op": "stats"})["num_free"] == free_before  # nothing moved
        assert ask(sock, {"op": "free", "ids": held})["ok"]  # still its own, still usable
        assert ask(sock, {"op": "stats"})["num_free"] == free_before + 3


def test_an_oversized_frame_is_refused_and_the_node_serves_on(node):
    with connect(node.socket) as sock:
        sock.sendall(struct.pack(">I", wire.MAX_FRAME + 1))
        reply, _ = wire.recv(sock)
        assert reply["ok"] is False and "limit" in reply["error"]
    with connect(node.socket) as sock:
        assert attach(sock)["ok"]


def test_a_client_frees_only_its_own_slots_and_idle_clients_lock_nobody_out(node):
    idle = connect(node.socket)  # connects, never attaches
    with connect(node.socket) as a, connect(node.socket) as b:
        assert attach(a)["ok"] and attach(b)["ok"]  # two engines share the node
        ids_a = ask(a, {"op": "allocate", "n": 2})["ids"]
        ids_b = ask(b, {"op": "allocate", "n": 2})["ids"]
        assert not set(ids_a) & set(ids_b)
        assert ask(b, {"op": "free", "ids": ids_a})["ok"] is False
        refused = attach(connect(node.socket), SLOT * 2)
        assert refused["ok"] is False and f"{SLOT}-byte slots" in refused["error"]
        total = ask(a, {"op": "stats"})["num_slots"]
        a.close()  # a's slots go back when it hangs up
        deadline = time.monotonic() + 5
        while ask(b, {"op": "stats"})["num_free"] != total - 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    idle.close()


def test_an_engine_attaches_and_its_accounting_matches_the_nodes(node):
    pool = MemNodePool(SLOT, 0, device=torch.device("cpu"), socket=node.socket, timeout=5)
    keys = pool.allocate(5)
    assert keys == [0, 1, 2, 3, 4]
    assert pool.node_stats()["num_free"] == pool.num_free == pool.num_slots - 5
    pool.free(keys[:2])
    assert pool.node_stats()["num_free"] == pool.num_free == pool.num_slots - 3
    pool.close()


# ---------------------------------------------------------------- fake nodes


def fake_node(path: str, reply: bytes, accepted: threading.Event) -> socket.socket:
    """A socket at `path` that answers every connection with `reply` (raw bytes)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.set()
            try:
                conn.recv(1 << 16)
                conn.sendall(reply)
            except OSError:
                pass
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener


@pytest.mark.parametrize("framed", [True, False])
def test_a_fake_node_sending_a_pickle_executes_nothing_in_the_engine(tmp_path, framed):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(str(marker)))
    reply = frame(payload) if framed else struct.pack("!i", len(payload)) + payload
    accepted = threading.Event()
    path = str(tmp_path / "fake.sock")
    listener = fake_node(path, reply, accepted)
    try:
        with pytest.raises(PoolUnavailable, match="cannot reach the memory node"):
            MemNodePool(SLOT, 0, device=torch.device("cpu"), socket=path, timeout=2)
        assert accepted.is_set() and not marker.exists()
    finally:
        listener.close()


def test_a_node_that_never_answers_fails_within_the_deadline(tmp_path):
    path = str(tmp_path / "silent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)  # accepts in the kernel's backlog, never replies
    started = time.monotonic()
    with pytest.raises(PoolUnavailable, match="did not answer in time"):
        MemNodePool(SLOT, 0, device=torch.device("cpu"), socket=path, timeout=1)
    assert time.monotonic() - started < 3
    listener.close()


# ---------------------------------------------------------------- other users

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making a socket of another uid "
                                                          "needs root")


@needs_root
def test_a_socket_owned_by_another_user_is_refused(own_node):
    os.chown(own_node.socket, NOBODY, NOBODY)
    with pytest.raises(PoolUnavailable, match=f"belongs to uid {NOBODY}"):
        MemNodePool(SLOT, 0, device=torch.device("cpu"), socket=own_node.socket, timeout=2)


LISTEN_AS_NOBODY = """
import os, socket, sys, time
os.setgid({uid}); os.setuid({uid})
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.bind(sys.argv[1]); s.listen(4)
print("ready", flush=True); time.sleep(60)
"""


@needs_root
def test_a_peer_running_as_another_user_is_refused_by_the_engine():
    directory = tempfile.mkdtemp(dir="/tmp")  # a place both users can reach, like /tmp
    os.chmod(directory, 0o777)
    path = os.path.join(directory, "node.sock")
    proc = subprocess.Popen([sys.executable, "-c", LISTEN_AS_NOBODY.format(uid=NOBODY), path],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.chown(path, 0, 0)  # the file is ours; the process behind it is not
        with pytest.raises(PoolUnavailable, match=f"runs as uid {NOBODY}"):
            MemNodePool(SLOT, 0, device=torch.device("cpu"), socket=path, timeout=2)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(directory)


CONNECT_AS_NOBODY = """
import json, os, socket, struct, sys
os.setgid({uid}); os.setuid({uid})
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(sys.argv[1])
body = json.dumps({{"op": "attach", "version": 1, "slot_bytes": 4096}}).encode()
s.sendall(struct.pack(">I", len(body)) + body)
n = struct.unpack(">I", s.recv(4))[0]
print(s.recv(n).decode())
"""


@needs_root
def test_a_client_running_as_another_user_is_refused_by_the_node(own_node):
    node = own_node
    os.chmod(node.socket, 0o777)  # even where the file would let it connect
    parent = os.path.dirname(node.socket)
    for d in (parent, os.path.dirname(parent), os.path.dirname(os.path.dirname(parent))):
        os.chmod(d, os.stat(d).st_mode | 0o011)
    out = subprocess.run([sys.executable, "-c", CONNECT_AS_NOBODY.format(uid=NOBODY), node.socket],
                         capture_output=True, text=True, timeout=30)
    reply = json.loads(out.stdout)
    assert reply["ok"] is False and f"runs as uid {NOBODY}" in reply["error"], out.stderr
    with connect(node.socket) as sock:
        assert attach(sock)["ok"]


def test_the_default_socket_directory_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = wire.private_runtime_dir()
    assert os.stat(path).st_mode & 0o777 == 0o700
    os.chmod(path, 0o755)
    with pytest.raises(wire.WireError, match="chmod 700"):
        wire.private_runtime_dir()
