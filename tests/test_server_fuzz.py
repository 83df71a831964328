"""A fixed corpus of malformed and hostile requests against a real `speckv serve`:
each gets a 4xx with OpenAI's error body (or, where the value is a legal one, a 200),
never a 5xx or a hang, and a normal request succeeds after each."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections import Counter

import pytest

from speckv.server.process import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
KEY = "sésame-ключ"  # non-ASCII on purpose
NORMAL = {"model": MODEL, "prompt": "The sea is", "max_tokens": 2, "temperature": 0}

HOSTILE_VALUES = [None, True, False, -1, 0, 1, 2**31, 2**63, 2**70, -2**70, 1e-300, 5e-324,
                  1e-320, 2.0, 1e308, -0.0, 1.5, "", "10", "x", "\ud800", "a\udfffb", [], [1], [-1],
                  [2**40], [2**70], ["x", "y"], {}, {"a": 1}, [[1]], "\x00"]
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
          "stream", "stream_options", "n", "selector", "token_budget", "ignore_eos", "echo",
          "logprobs", "suffix", "user"]


def completion_cases() -> list[tuple[str, dict]]:
    cases = []
    for name in FIELDS:
        for value in HOSTILE_VALUES:
            body = {**NORMAL, name: value}
            if name == "stream" and value is True:
                continue  # a legal stream: covered by the server tests
            cases.append((f"{name}={value!r}"[:60], body))
    return cases


def chat_cases() -> list[tuple[str, dict]]:
    base = {"model": MODEL, "max_tokens": 2}
    messages = [None, [], {}, "hi", [None], [{}], [{"role": "user"}],
                [{"role": "robot", "content": "hi"}], [{"role": "user", "content": None}],
                [{"role": "user", "content": 5}], [{"role": "user", "content": "\ud800"}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}],
                [{"role": "user", "content": [{"type": "text"}]}],
                [{"role": "user", "content": "x " * 9000}],
                [{"role": "user", "content": "hi"}] * 5000]
    cases = [(f"messages={m!r}"[:60], {**base, "messages": m}) for m in messages]
    for extra in ({"max_completion_tokens": True}, {"max_completion_tokens": -3},
                  {"temperature": 1e-300}, {"top_p": 1e-320}, {"top_k": 2**63}):
        cases.append((f"chat {extra}", {**base, "messages": [{"role": "user", "content": "hi"}],
                                        **extra}))
    return cases


def raw_cases() -> list[tuple[str, str, str, bytes, dict]]:
    """(name, method, path, body, headers)."""
    json_type = {"Content-Type": "application/json"}
    deep = b'{"model": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    return [
        ("invalid utf-8", "POST", "/v1/completions", b'{"model": "\xff\xfe", "prompt": "x"}',
         json_type),
        ("nested 1000 deep", "POST", "/v1/completions", deep, json_type),
        ("nested object 1000 deep", "POST", "/v1/completions",
         b'{"a":' * 1000 + b"1" + b"}" * 1000, json_type),
        ("truncated json", "POST", "/v1/completions", b'{"model": "x", "prompt": ', json_type),
        ("empty body", "POST", "/v1/completions", b"", json_type),
        ("json array", "POST", "/v1/completions", b"[1, 2]", json_type),
        ("json string", "POST", "/v1/completions", b'"hello"', json_type),
        ("json null", "POST", "/v1/completions", b"null", json_type),
        ("json number", "POST", "/v1/chat/completions", b"12", json_type),
        ("NaN literal", "POST", "/v1/completions",
         b'{"model": "SmolLM2-135M-Instruct", "prompt": "x", "temperature": NaN}', json_type),
        ("Infinity literal", "POST", "/v1/completions",
         b'{"model": "SmolLM2-135M-Instruct", "prompt": "x", "top_p": Infinity}', json_type),
        ("text/plain body", "POST", "/v1/completions", json.dumps(NORMAL).encode(),
         {"Content-Type": "text/plain"}),
        ("unknown route", "GET", "/v2/nothing", b"", {}),
        ("unknown v1 route", "POST", "/v1/embeddings", b"{}", json_type),
        ("wrong method", "GET", "/v1/completions", b"", {}),
        ("wrong method on health", "POST", "/health", b"", {}),
        ("oversized body", "POST", "/v1/completions", b"x" * (2 << 20), json_type),
        ("path traversal", "GET", "/../../etc/passwd", b"", {}),
    ]


class Fuzzed(ServerProcess):
    def __init__(self, *args: str, env: dict | None = None) -> None:
        super().__init__("--device-kv-bytes", "64MiB", *args, env=env)

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict | None = None, chunked: bool = False) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            if chunked:
                conn.putrequest(method, path)
                for k, v in (headers or {}).items():
                    conn.putheader(k, v)
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                piece = b"x" * (1 << 20)
                for _ in range(50):  # 50 MiB, no Content-Length
                    try:
                        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                    except OSError:
                        break  # the server answered and closed: read that answer
                else:
                    conn.send(b"0\r\n\r\n")
            else:
                conn.request(method, path, body, headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def post_json(self, body: dict, path: str = "/v1/completions",
                  headers: dict | None = None) -> tuple[int, bytes]:
        data = json.dumps(body).encode("utf-8", errors="surrogatepass")
        return self.request("POST", path, data, {"Content-Type": "application/json",
                                                 **(headers or {})})

    def assert_serves(self, headers: dict | None = None) -> None:
        status, data = self.post_json(NORMAL, headers=headers)
        assert status == 200, data
        assert json.loads(data)["usage"]["completion_tokens"] == 2


def assert_answered(status: int, data: bytes, name: str) -> None:
    """A 2xx, or a 4xx with OpenAI's error body; never a 5xx."""
    assert status < 500, (name, status, data[:300])
    if status >= 400:
        body = json.loads(data)
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, (name, body)
        assert isinstance(error["message"], str) and error["message"], (name, body)
    elif data.startswith(b"data: "):  # a stream: it ends properly
        assert data.rstrip().endswith(b"data: [DONE]"), (name, data[-200:])


@pytest.fixture(scope="module")
def server():
    s = Fuzzed("--max-body-bytes", str(1 << 20))
    yield s
    assert s.stop() == 0


@pytest.mark.slow
def test_every_hostile_request_gets_a_4xx_and_the_server_goes_on(server):
    totals: Counter[str] = Counter()
    started = time.monotonic()
    for name, body in completion_cases() + chat_cases():
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, data = server.post_json(body, path)
        assert_answered(status, data, name)
        totals[f"{status // 100}xx"] += 1
        server.assert_serves()
    for name, method, path, body, headers in raw_cases():
        status, data = server.request(method, path, body, headers)
        assert_answered(status, data, name)
        assert status >= 400, (name, status)
        totals[f"{status // 100}xx"] += 1
        server.assert_serves()
    status, data = server.request("POST", "/v1/completions",
                                  headers={"Content-Type": "application/json"}, chunked=True)
    assert status == 413 and json.loads(data)["error"]["code"] == "body_too_large"
    totals["4xx"] += 1
    server.assert_serves()
    assert server.get("/health")[0] == 200
    server.wait_idle()
    print(f"\nfuzz: {sum(totals.values())} requests in {time.monotonic() - started:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    assert "5xx" not in totals


def test_a_non_ascii_api_key_header_is_a_401_not_a_500():
    s = Fuzzed(env={"SPECKV_API_KEY": KEY})
    try:
        for token in (KEY, "ключ", "x" * 10_000, ""):
            raw = f"Bearer {token}".encode("utf-8").decode("latin-1")
            status, data = s.request("POST", "/v1/completions", json.dumps(NORMAL).encode(),
                                     {"Content-Type": "application/json",
                                      "Authorization": raw})
            expected = 200 if token == KEY else 401
            assert status == expected, (token[:10], status, data[:200])
        assert s.request("GET", "/openapi.json")[0] == 404  # not served behind a key
        s.assert_serves({"Authorization": f"Bearer {KEY}".encode().decode("latin-1")})
    finally:
        assert s.stop() == 0


def test_many_connections_that_send_nothing_do_not_block_requests(server):
    idle = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        idle.append(sock)
    try:
        server.assert_serves()
    finally:
        for sock in idle:
            sock.close()
