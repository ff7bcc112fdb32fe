"""Raw HTTP to a daemon's HTTP API: exact bytes, any header (the stdlib's http.client)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

JSON = {"Content-Type": "application/json"}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        """The OpenAI error object of an error reply."""
        body = self.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]


def request(
    address: str,
    method: str,
    path: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> Reply:
    """One request. `body`: bytes as they are, anything else as JSON (with its content type)."""
    conn = http.client.HTTPConnection(address, timeout=timeout)
    try:
        sent = dict(headers or {})
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            sent = {**JSON, **sent}
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        data = response.read()
        names = {k.lower(): v for k, v in response.getheaders()}
        return Reply(response.status, names, data)
    finally:
        conn.close()


def post(address: str, path: str, body: Any, **headers: str) -> Reply:
    return request(address, "POST", path, body, headers)


def sse_events(body: bytes) -> list[bytes]:
    """The payloads of a text/event-stream body ("data: X\\n\\n" -> X), comments dropped."""
    events = []
    for block in body.split(b"\n\n"):
        if not block or block.startswith(b":"):
            continue
        assert block.startswith(b"data: "), block
        events.append(block[len(b"data: ") :])
    return events


def scrape(address: str, headers: Mapping[str, str] | None = None) -> dict[str, dict]:
    """/metrics parsed with prometheus_client's own text parser: {sample name: {labels: value}}
    with labels as a sorted tuple of (name, value) pairs."""
    from prometheus_client.parser import text_string_to_metric_families

    reply = request(address, "GET", "/metrics", headers=headers)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def one(samples: dict[str, dict], name: str, **labels: str) -> float:
    """The value of one sample (0 when the family has no such labels)."""
    return samples[name].get(tuple(sorted(labels.items())), 0.0)


def total(samples: dict[str, dict], name: str, **labels: str) -> float:
    """The sum over every sample of a family that has these labels (and any others)."""
    want = set(labels.items())
    return sum(v for key, v in samples[name].items() if want <= set(key))


def open_stream(address: str, body: dict) -> socket.socket:
    """POST /v1/completions on a raw socket and leave the response unread (hang up by closing
    the socket: a client that goes away)."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: " + address.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(payload)).encode()
        + b"\r\n\r\n"
        + payload
    )
    return sock


def read_until(sock: socket.socket, needle: bytes, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while needle not in data:
        assert time.monotonic() < deadline, f"no {needle!r} within {timeout} s: {data[-200:]!r}"
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {needle!r}: {data[-200:]!r}"
        data += chunk
    return data
