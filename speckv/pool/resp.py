"""A small Valkey/Redis client for page traffic: RESP2 over one socket, pipelined, with a
deadline on every call.

Why not valkey-py: page batches are hundreds of values of tens to hundreds of KiB, and
what bounds them is copies. Commands are written into one reused send buffer, replies
are read with `recv_into` into a reused buffer and parsed by hiredis (C): on loopback
this moves 256 KiB GETs at 2.4-3.4 GB/s here, valkey-py's pipeline 0.5-0.9 GB/s.

    url := valkey://[[user]:password@]host[:port][/db]   (redis:// too; port 6379)
         | valkeys://...  rediss://...                   TLS (system CAs; ?ca=FILE)
         | unix:///path/to.sock[?password=...&db=N]
         | valkey+cluster://[[user]:password@]host:port  a Valkey/Redis Cluster: any node
                                                        (valkeys+cluster:// with TLS)

In a cluster every key goes to the node that serves its hash slot (CRC16 of the key, or
of its `{hash tag}`, mod 16384), as the cluster's own clients do: a pipeline is split
per node, each part sent on that node's connection; a MOVED or ASK answer (slots moved
between nodes) reloads the slot map and the call is made once more.

Nothing that arrives is unpickled or evaluated: replies are RESP bulk strings, integers,
status lines and errors, parsed by hiredis into bytes, ints and strings.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

DEFAULT_PORT = 6379
_RECV_BYTES = 1 << 20
_FLUSH_BYTES = 4 << 20
_SCHEMES = ("valkey", "redis", "valkeys", "rediss", "unix", "valkey+cluster", "redis+cluster",
            "valkeys+cluster", "rediss+cluster")
NUM_SLOTS = 16384  # a cluster's hash slots

Arg = bytes | bytearray | memoryview | str | int
Command = Sequence[Arg | tuple[Arg, ...]]  # a tuple argument is sent as its parts joined


class RespError(Exception):
    """The server could not be reached, broke the protocol or missed the deadline."""


class ReplyError(Exception):
    """The server answered a command with an error (e.g. NOAUTH, OOM)."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    path: str | None = None  # a Unix socket instead of TCP
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: bool = False
    ca_file: str | None = None
    cluster: bool = False  # a Valkey/Redis Cluster, this node its seed

    def __str__(self) -> str:
        """The address without its password (for logs and errors)."""
        scheme = ("valkeys" if self.tls else "valkey") + ("+cluster" if self.cluster else "")
        where = f"unix://{self.path}" if self.path else f"{scheme}://{self.host}:{self.port}"
        return where + (f"/{self.db}" if self.db else "")


def parse_url(url: str) -> Address:
    """Parses a server URL (module docstring).

    Raises:
        ValueError: naming what is wrong with it.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"pool_url {url!r}: write valkey://[user:password@]host:port[/db] "
                         "(valkeys:// for TLS, unix:///path.sock for a Unix socket)")
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"pool_url scheme {parts.scheme!r}: known schemes: {', '.join(_SCHEMES)}")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"password", "db", "ca"}
    if unknown:
        raise ValueError(f"pool_url: unknown parameter(s) {sorted(unknown)}; known: ca, db, password")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"pool_url {url!r}: bad port ({exc})") from None
    db_text = query.get("db", "0") if parts.scheme == "unix" else \
        query.get("db") or parts.path.strip("/")
    if not (db_text or "0").isdigit():
        raise ValueError(f"pool_url: the database must be a number, got {db_text!r}")
    password = query.get("password", unquote(parts.password) if parts.password else None)
    username = unquote(parts.username) if parts.username else None
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("pool_url unix:// needs a socket path, e.g. unix:///run/valkey.sock")
        return Address(path=parts.path, username=username, password=password,
                       db=int(db_text or 0))
    if not parts.hostname:
        raise ValueError(f"pool_url {url!r} names no host")
    cluster = parts.scheme.endswith("+cluster")
    if cluster and int(db_text or 0):
        raise ValueError("pool_url: a cluster has database 0 only")
    return Address(parts.hostname, port or DEFAULT_PORT, None, username, password,
                   int(db_text or 0), parts.scheme.startswith(("valkeys", "rediss")),
                   query.get("ca"), cluster)


class _Calls:
    """`call` for anything with a `pipeline`."""

    def call(self, *args: Arg) -> object:
        """One command; raises ReplyError if the server answers with an error."""
        (reply,) = self.pipeline([args])
        if isinstance(reply, ReplyError):
            raise reply
        return reply


class Connection(_Calls):
    """One connection; every call finishes or raises within `timeout` seconds."""

    def __init__(self, address: Address, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._buf = bytearray(_RECV_BYTES)
        self._view = memoryview(self._buf)
        self._reader = hiredis.Reader()
        deadline = time.monotonic() + timeout
        try:
            self._sock = self._open(deadline)
        except (OSError, ssl.SSLError) as exc:
            raise RespError(f"cannot connect to {address}: {exc}") from exc
        try:
            if address.password is not None:
                auth = ("AUTH", address.username, address.password) if address.username \
                    else ("AUTH", address.password)
                self.call(*auth)
            if address.db:
                self.call("SELECT", address.db)
        except ReplyError as exc:
            self.close()
            raise RespError(f"{address} refused the connection: {exc}") from exc
        except RespError:
            self.close()
            raise

    def _open(self, deadline: float) -> socket.socket:
        a = self.address
        if a.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(a.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((a.host, a.port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if a.tls:
                context = ssl.create_default_context(cafile=a.ca_file)
                sock.settimeout(max(1e-3, deadline - time.monotonic()))
                sock = context.wrap_socket(sock, server_hostname=a.host)
        return sock

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def pipeline(self, commands: Iterable[Command]) -> list[object]:
        """Sends every command, then reads their replies, in order; an error reply is
        returned as a `ReplyError` in its place (the others stand)."""
        return self._exchange(commands, self._read)

    def get_into(self, names: list[bytes], into: Callable[[int, int], memoryview | None]
                 ) -> list[int | None]:
        """GETs `names`, reading each value straight into the buffer `into(i, size)` gives
        for it (None: read and dropped). Returns each value's size (None: no such key).
        Values never pass through an intermediate object: this is the page read path."""
        return self._exchange([("GET", n) for n in names],
                              lambda count, deadline: self._read_bulk(count, deadline, into))

    def _exchange(self, commands: Iterable[Command], read: Callable[[int, float], list]) -> list:
        if self._sock is None:
            raise RespError(f"the connection to {self.address} is closed")
        deadline = time.monotonic() + self.timeout
        out = _Outgoing()
        count = 0
        try:
            for command in commands:
                out.add(command)
                count += 1
                if out.size >= _FLUSH_BYTES:
                    out.send(self._sock, deadline, self.address)
            out.send(self._sock, deadline, self.address)
            return read(count, deadline)
        except TimeoutError as exc:
            self.close()
            raise RespError(f"{self.address} did not answer within the {self.timeout:g} s "
                            "deadline") from exc
        except (OSError, hiredis.ProtocolError) as exc:
            self.close()  # the stream is out of step: never reuse it
            raise RespError(f"{self.address}: {exc or type(exc).__name__}") from exc
        except RespError:
            self.close()
            raise

    def _recv(self, deadline: float) -> int:
        self._sock.settimeout(_remaining(deadline, self.address))
        got = self._sock.recv_into(self._buf)
        if not got:
            raise RespError(f"{self.address} closed the connection")
        return got

    def _read(self, count: int, deadline: float) -> list[object]:
        replies: list[object] = []
        reader = self._reader
        while len(replies) < count:
            reply = reader.gets()
            if reply is False:
                reader.feed(self._view, 0, self._recv(deadline))
                continue
            replies.append(ReplyError(str(reply)) if isinstance(reply, hiredis.ReplyError)
                           else reply)
        return replies

    def _read_bulk(self, count: int, deadline: float,
                   into: Callable[[int, int], memoryview | None]) -> list[int | None]:
        """`count` bulk-string replies, parsed here (not by hiredis): each value is copied
        once, from the receive buffer (or the socket, for its bulk) into its buffer."""
        sizes: list[int | None] = []
        view, start, end = self._view, 0, 0
        while len(sizes) < count:
            newline = self._buf.find(b"\r\n", start, end)
            if newline < 0:  # an incomplete header line: keep it, read more behind it
                view[:end - start] = view[start:end]
                end -= start
                start = 0
                if end >= len(view) - 2:
                    raise RespError(f"{self.address} sent a reply header over {end} bytes")
                self._sock.settimeout(_remaining(deadline, self.address))
                got = self._sock.recv_into(view[end:])
                if not got:
                    raise RespError(f"{self.address} closed the connection")
                end += got
                continue
            line = bytes(view[start:newline])
            start = newline + 2
            if line[:1] == b"-":  # the rest of the stream is not read: it must be dropped
                raise RespError(f"{self.address} answered GET with an error: "
                                f"{line[1:].decode(errors='replace')}")
            if line[:1] != b"$" or not line[1:].lstrip(b"-").isdigit():
                raise RespError(f"{self.address} answered GET with {line[:40]!r}")
            size = int(line[1:])
            if size < 0:
                sizes.append(None)
                continue
            target = into(len(sizes), size)
            need = size + 2  # the value and its CRLF
            have = min(need, end - start)
            if target is not None:
                target[:min(have, size)] = view[start:start + min(have, size)]
            start += have
            done = have
            while done < need:  # the rest of a long value: from the socket, straight in
                self._sock.settimeout(_remaining(deadline, self.address))
                if target is not None and done < size:
                    got = self._sock.recv_into(target[done:size])
                else:
                    got = self._sock.recv_into(view[:need - done])
                if not got:
                    raise RespError(f"{self.address} closed the connection")
                done += got
            sizes.append(size)
        if start != end:
            raise RespError(f"{self.address} sent more than was asked")
        return sizes


class _Outgoing:
    """Commands in RESP, as one list of buffers: small pieces joined, large arguments
    (page rows) referenced where they lie, sent with one scatter-gather call per batch."""

    _LARGE = 4096

    def __init__(self) -> None:
        self.parts: list = []
        self.small = bytearray()
        self.size = 0

    def add(self, command: Command) -> None:
        small = self.small
        small += b"*%d\r\n" % len(command)
        for arg in command:
            pieces = arg if isinstance(arg, tuple) else (arg,)
            blobs = [p.encode() if isinstance(p, str) else b"%d" % p if isinstance(p, int)
                     else memoryview(p).cast("B") for p in pieces]  # (numpy rows: bytes)
            small += b"$%d\r\n" % sum(len(b) for b in blobs)
            for blob in blobs:
                if len(blob) >= self._LARGE:
                    self.parts.append(bytes(small))
                    small.clear()
                    self.parts.append(blob)
                    self.size += len(blob)
                else:
                    small += blob
            small += b"\r\n"

    def send(self, sock: socket.socket, deadline: float, address: Address) -> None:
        if self.small:
            self.parts.append(bytes(self.small))
            self.small.clear()
        parts = [memoryview(p) for p in self.parts]
        self.parts, self.size = [], 0
        if not hasattr(sock, "sendmsg") or isinstance(sock, ssl.SSLSocket):
            sock.settimeout(_remaining(deadline, address))
            sock.sendall(b"".join(parts))
            return
        i = 0
        while i < len(parts):
            sock.settimeout(_remaining(deadline, address))
            sent = sock.sendmsg(parts[i:i + 512])
            while sent and i < len(parts):  # drop what went, keep the rest of a part
                if sent >= len(parts[i]):
                    sent -= len(parts[i])
                    i += 1
                else:
                    parts[i] = parts[i][sent:]
                    sent = 0


def _remaining(deadline: float, address: Address) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RespError(f"{address} did not answer within the deadline")
    return left


def connect(address: Address, timeout: float) -> "Connection | ClusterConnection":
    """A connection to a server, or to a whole cluster."""
    return ClusterConnection(address, timeout) if address.cluster else Connection(address, timeout)


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def key_slot(key: bytes) -> int:
    """The cluster hash slot of `key` (CRC16-XMODEM of its hash tag, if any, mod 16384)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    crc = 0
    for byte in key:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc % NUM_SLOTS


class ClusterConnection(_Calls):
    """Connections to the nodes of a cluster, keys routed by their hash slots."""

    def __init__(self, address: Address, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._conns: dict[tuple[str, int], Connection] = {}
        self._slots: list[tuple[str, int] | None] = []
        self._load_slots()

    def _node(self, node: tuple[str, int]) -> Connection:
        conn = self._conns.get(node)
        if conn is None or conn._sock is None:
            from dataclasses import replace

            conn = Connection(replace(self.address, host=node[0], port=node[1], cluster=False),
                              self.timeout)
            self._conns[node] = conn
        return conn

    def _load_slots(self) -> None:
        """The slot map, from any node that answers (the seed first)."""
        seeds = [(self.address.host, self.address.port), *self._conns]
        error: Exception | None = None
        for seed in dict.fromkeys(seeds):
            try:
                ranges = self._node(seed).call("CLUSTER", "SLOTS")
            except (RespError, ReplyError) as exc:
                error = exc
                continue
            slots: list[tuple[str, int] | None] = [None] * NUM_SLOTS
            for entry in ranges:
                host = entry[2][0].decode() or seed[0]  # "" names the node asked
                for slot in range(int(entry[0]), int(entry[1]) + 1):
                    slots[slot] = (host, int(entry[2][1]))
            self._slots = slots
            return
        raise RespError(f"no node of the cluster at {self.address} gave its slots: {error}")

    def _route(self, keys: list[bytes]) -> dict[tuple[str, int], list[int]]:
        """Indices of `keys` per node that serves them."""
        parts: dict[tuple[str, int], list[int]] = {}
        for i, key in enumerate(keys):
            node = self._slots[key_slot(key)]
            if node is None:
                raise RespError(f"the cluster at {self.address} serves no node for slot "
                                f"{key_slot(key)}")
            parts.setdefault(node, []).append(i)
        return parts

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def pipeline(self, commands: Iterable[Command]) -> list[object]:
        """As `Connection.pipeline`: each command goes to the node of its first key (a
        command without keys, to the node of slot 0)."""
        commands = list(commands)
        for attempt in (0, 1):
            keys = [_key_of(c) for c in commands]
            replies: list[object] = [None] * len(commands)
            for node, index in self._route(keys).items():
                for i, reply in zip(index, self._node(node).pipeline([commands[i] for i in index])):
                    replies[i] = reply
            if attempt == 0 and any(_moved(r) for r in replies):
                self._load_slots()
                continue
            return replies
        raise AssertionError("unreachable")

    def get_into(self, names: list[bytes], into: Callable[[int, int], memoryview | None]
                 ) -> list[int | None]:
        for attempt in (0, 1):
            sizes: list[int | None] = [None] * len(names)
            try:
                for node, index in self._route(names).items():
                    got = self._node(node).get_into([names[i] for i in index],
                                                    lambda j, n, index=index: into(index[j], n))
                    for i, size in zip(index, got):
                        sizes[i] = size
                return sizes
            except RespError as exc:
                if attempt or not any(m in str(exc) for m in ("MOVED", "ASK")):
                    raise
                self._load_slots()
        raise AssertionError("unreachable")


def _key_of(command: Command) -> bytes:
    """The key a command names (its second argument), b"" for none."""
    if len(command) < 2 or isinstance(command[1], tuple):
        return b""
    key = command[1]
    return key.encode() if isinstance(key, str) else b"%d" % key if isinstance(key, int) else bytes(key)


def _moved(reply: object) -> bool:
    return isinstance(reply, ReplyError) and str(reply).startswith(("MOVED", "ASK"))
