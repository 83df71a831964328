"""The memory node's control protocol: length-prefixed JSON frames over a Unix socket.

    frame := length (4 bytes, big-endian, <= MAX_FRAME) ‖ UTF-8 JSON object

Nothing that arrives is unpickled or evaluated: a frame is parsed as JSON into plain
dicts, lists, strings and numbers, and every field is checked against the op's
schema before it is used (`field`). Both ends check the peer's credentials
(SO_PEERCRED): a socket whose other end runs as another user is refused. The one
non-JSON payload is the shared-memory segment's file descriptor, passed once with
SCM_RIGHTS in the reply to `attach`, so no segment is ever opened by a name that
another user could have planted.

Every blocking call takes a deadline (`socket.settimeout`): a peer that stops
answering raises `WireError` after that many seconds, never hangs its caller.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct

from speckv.util import is_int

MAX_FRAME = 16 << 20  # bytes: a `free` of every slot of a 64 GiB node fits
_HEADER = struct.Struct(">I")
PROTOCOL_VERSION = 1


class WireError(Exception):
    """The peer sent something that is not a valid frame, or did not answer in time."""


class BadMessage(ValueError):
    """A well-formed frame whose content breaks the op's schema (answered, not fatal)."""


class Refused(Exception):
    """The peer answered a request with an error reply (`{"ok": false, "error": ...}`)."""


def send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise WireError(f"a {len(data)}-byte message is above the {MAX_FRAME}-byte frame limit")
    frame = _HEADER.pack(len(data)) + data
    try:
        if fds:
            socket.send_fds(sock, [frame[:_HEADER.size]], fds)
            sock.sendall(frame[_HEADER.size:])
        else:
            sock.sendall(frame)
    except socket.timeout as exc:
        raise WireError("the peer did not take the message in time") from exc
    except OSError as exc:
        raise WireError(f"cannot send: {exc}") from exc


def recv(sock: socket.socket, max_fds: int = 0) -> tuple[dict, list[int]]:
    """One message, and the file descriptors that came with it (at most `max_fds`;
    any beyond are closed)."""
    fds: list[int] = []
    try:
        if max_fds:
            header, fds, _, _ = socket.recv_fds(sock, _HEADER.size, max_fds)
            header += _recv_exact(sock, _HEADER.size - len(header)) if header else b""
        else:
            header = _recv_exact(sock, _HEADER.size)
        if len(header) < _HEADER.size:
            raise WireError("the peer closed the connection")
        (length,) = _HEADER.unpack(header)
        if length > MAX_FRAME:
            raise WireError(f"a {length}-byte frame is above the {MAX_FRAME}-byte limit")
        message = _decode(_recv_exact(sock, length))
    except socket.timeout as exc:
        _close_all(fds)
        raise WireError("the peer did not answer in time") from exc
    except OSError as exc:
        _close_all(fds)
        raise WireError(f"cannot receive: {exc}") from exc
    except WireError:
        _close_all(fds)
        raise
    return message, fds


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise WireError("the peer closed the connection")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _decode(data: bytes) -> dict:
    try:
        message = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadMessage(f"not a JSON message: {exc}") from exc
    if not isinstance(message, dict):
        raise BadMessage(f"a message is a JSON object, not {type(message).__name__}")
    return message


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


# ---------------------------------------------------------------- schema


def field(message: dict, name: str, kind: type, *, low: int | None = None,
          high: int | None = None):
    """`message[name]`, checked to be a `kind` (bool is no int) within [low, high].

    Raises:
        BadMessage: missing, of another type, or out of range.
    """
    if name not in message:
        raise BadMessage(f"field {name!r} is missing")
    value = message[name]
    if not isinstance(value, kind) or (kind is int and not is_int(value)):
        raise BadMessage(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    if low is not None and value < low or high is not None and value > high:
        raise BadMessage(f"field {name!r} must be in [{low}, {high}], got {value}")
    return value


def id_list(message: dict, name: str, limit: int) -> list[int]:
    """A list of distinct ints in [0, limit)."""
    ids = field(message, name, list)
    if not all(is_int(i) and 0 <= i < limit for i in ids):
        raise BadMessage(f"field {name!r} must hold slot ids in [0, {limit})")
    if len(set(ids)) != len(ids):
        raise BadMessage(f"field {name!r} names a slot twice")
    return ids


# ---------------------------------------------------------------- who is at the other end


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a connected Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def check_peer(sock: socket.socket, what: str) -> None:
    """Raises WireError unless the peer runs as this process's user."""
    uid = peer_uid(sock)
    if uid != os.geteuid():
        raise WireError(f"{what} runs as uid {uid}, not as this user (uid {os.geteuid()}): refused")


def check_owned(path: str, what: str) -> os.stat_result:
    """Raises WireError unless `path` (not followed if a link) belongs to this user."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise WireError(f"cannot stat {what} {path}: {exc}") from exc
    if st.st_uid != os.geteuid():
        raise WireError(f"{what} {path} belongs to uid {st.st_uid}, not to this user "
                        f"(uid {os.geteuid()}): refused")
    return st


def check_private_fd(fd: int, what: str) -> os.stat_result:
    """Raises WireError unless the open file is a regular file of this user that no
    other user can read or write."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise WireError(f"{what} is not a private file of this user "
                        f"(uid {st.st_uid}, mode {stat.filemode(st.st_mode)}): refused")
    return st


def private_runtime_dir() -> str:
    """This user's private directory for sockets: $XDG_RUNTIME_DIR/speckv, else
    /tmp/speckv-<uid>; created 0700, refused if another user owns it or can enter it."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(base, "speckv") if base else f"/tmp/speckv-{os.geteuid()}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = check_owned(path, "the runtime directory")
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o077:
        raise WireError(f"the runtime directory {path} must be a directory only its owner can "
                        f"use (mode {stat.filemode(st.st_mode)}): fix it with `chmod 700 {path}`")
    return path
