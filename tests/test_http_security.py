"""The HTTP API's security rules, as a web page in the user's browser or a stranger on the
network would meet them: Host check (DNS rebinding), origins, API key, body type and size."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from helpers.daemons import LocalDaemon, local_config, local_daemon
from helpers.http import JSON, post, request
from speclora.daemon.server import ServerSetupError, http_api_key, open_http

KEY = "test-key-0123456789"
ALLOWED_ORIGIN = "http://localhost:3000"
OK = {"prompt": "Hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def keyed(
    tiny_paths: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDaemon]:
    home = tmp_path_factory.mktemp("sec")
    key_file = home / "api-key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    d = local_daemon(
        home,
        {
            "models": {"target": str(tiny_paths[0]), "draft": "none"},
            "server": {
                "http_api_key_file": str(key_file),
                "http_cors_origins": [ALLOWED_ORIGIN],
                "http_allowed_hosts": ["speclora.lan"],
                "http_max_body_bytes": 4096,
            },
        },
        learning=False,
    )
    yield d
    d.close()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_api_key_is_required_when_set(keyed: LocalDaemon) -> None:
    base = f"http://{keyed.server.http_address}/v1"
    for wrong in ("", "not-the-key"):
        api = openai.OpenAI(base_url=base, api_key=wrong or "x", max_retries=0)
        if not wrong:  # no Authorization header at all
            api = api.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as err:
            api.completions.create(model="speclora", prompt="Hi", max_tokens=2)
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
        assert err.value.response.headers["www-authenticate"] == "Bearer"
    api = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)
    assert api.completions.create(model="speclora", prompt="Hi", max_tokens=2).usage
    address = keyed.server.http_address
    for path in ("/metrics", "/v1/models"):
        assert request(address, "GET", path).status == 401
        assert request(address, "GET", path, headers=auth()).status == 200
    assert request(address, "GET", "/health").status == 200  # probes need no key


@pytest.mark.parametrize(
    "host",
    [
        "evil.example.com",
        "evil.example.com:8421",
        "127.0.0.1.nip.io",
        "localhost.evil.example",
        "192.168.1.10:8421",
        "",
    ],
)
def test_a_foreign_host_is_refused(keyed: LocalDaemon, host: str) -> None:
    """DNS rebinding: a page at evil.example.com resolves its own name to 127.0.0.1; the
    browser then sends `Host: evil.example.com` to the daemon."""
    reply = post(keyed.server.http_address, "/v1/completions", OK, Host=host, **auth())
    assert reply.status == 403 and reply.error["code"] == "host_not_allowed"
    assert (
        request(keyed.server.http_address, "GET", "/health", headers={"Host": host}).status == 403
    )


@pytest.mark.parametrize(
    "host", ["localhost", "127.0.0.1", "[::1]", "app.localhost", "speclora.lan"]
)
def test_loopback_and_configured_hosts_are_served(keyed: LocalDaemon, host: str) -> None:
    port = keyed.server.http_address.rsplit(":", 1)[1]
    reply = post(keyed.server.http_address, "/v1/completions", OK, Host=f"{host}:{port}", **auth())
    assert reply.status == 200, reply.body


def test_cross_origin_requests_only_from_the_allow_list(keyed: LocalDaemon) -> None:
    address = keyed.server.http_address
    foreign = post(address, "/v1/completions", OK, Origin="https://evil.example.com", **auth())
    assert foreign.status == 403 and foreign.error["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in foreign.headers
    allowed = post(address, "/v1/completions", OK, Origin=ALLOWED_ORIGIN, **auth())
    assert allowed.status == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN  # never "*"
    same = post(address, "/v1/completions", OK, Origin=f"http://{address}", **auth())
    assert same.status == 200 and "access-control-allow-origin" not in same.headers
    preflight = {
        "Origin": ALLOWED_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    ok = request(address, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert ok.status == 200 and ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    bad = {**preflight, "Origin": "https://evil.example.com"}
    assert request(address, "OPTIONS", "/v1/chat/completions", headers=bad).status == 403


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_post_bodies_must_be_json(keyed: LocalDaemon, content_type: str | None) -> None:
    """A form or a `text/plain` fetch is what a page can send without a CORS preflight."""
    headers = {**auth(), **({"Content-Type": content_type} if content_type else {})}
    body = b'{"prompt": "Hi", "max_tokens": 2}'
    reply = request(keyed.server.http_address, "POST", "/v1/completions", body, headers)
    assert reply.status == 415 and reply.error["code"] == "unsupported_media_type"
    with_charset = {**auth(), "Content-Type": "application/json; charset=utf-8"}
    assert (
        request(keyed.server.http_address, "POST", "/v1/completions", body, with_charset).status
        == 200
    )


def test_bodies_past_the_limit_are_refused(keyed: LocalDaemon) -> None:
    address = keyed.server.http_address
    big = {"prompt": "x" * 5000, "max_tokens": 2}
    reply = post(address, "/v1/completions", big, **auth())
    assert reply.status == 413 and reply.error["code"] == "body_too_large"
    # Without a Content-Length (chunked), the limit holds while reading.
    conn = http.client.HTTPConnection(address, timeout=30)
    try:
        chunks = (b'{"prompt": "' + b"x" * 1000 for _ in range(8))
        conn.request(
            "POST", "/v1/completions", body=chunks, headers={**JSON, **auth()}, encode_chunked=True
        )
        response = conn.getresponse()
        assert response.status == 413
    finally:
        conn.close()
    assert post(address, "/v1/completions", OK, **auth()).status == 200


def test_off_loopback_needs_the_flag_and_then_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, paths = local_config(tmp_path, {"server": {"http_address": "0.0.0.0:0"}})
    with pytest.raises(ServerSetupError, match="allow_non_loopback"):
        open_http(config, paths)
    # Off loopback a key is always required: the daemon's token file unless one is given.
    assert http_api_key(config, paths, loopback=True) is None
    token = http_api_key(config, paths, loopback=False)
    assert token and token == paths.token_file.read_text().strip()
    monkeypatch.setenv("SPECLORA_API_KEY", "from-the-env")
    assert http_api_key(config, paths, loopback=False) == "from-the-env"


def test_the_env_key_guards_a_loopback_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPECLORA_API_KEY", "from-the-env")
    config, paths = local_config(tmp_path, {})
    server = open_http(config, paths)
    assert server is not None
    try:
        assert request(server.address, "GET", "/v1/models").status == 401
        # Past the key it is still loading (no models attached): 503, not 401.
        reply = request(server.address, "GET", "/v1/models", headers=auth("from-the-env"))
        assert reply.status == 503
    finally:
        server.stop()


def test_a_taken_port_is_a_clear_setup_error(keyed: LocalDaemon, tmp_path: Path) -> None:
    config, paths = local_config(tmp_path, {"server": {"http_address": keyed.server.http_address}})
    with pytest.raises(ServerSetupError, match="http_address"):
        open_http(config, paths)


def test_wildcard_cors_is_a_config_error(tmp_path: Path) -> None:
    from speclora.shared.config import ConfigError

    with pytest.raises(ConfigError, match="http_cors_origins"):
        local_config(tmp_path, {"server": {"http_cors_origins": ["*"]}})


def test_every_error_kind_has_an_http_status() -> None:
    """A kind added for gRPC (DEADLINE_EXCEEDED came with the adapter RPCs) must not fall
    through to a 500 over HTTP."""
    from speclora.daemon.errors import ErrorKind
    from speclora.daemon.http.openai import ERROR_STATUS

    assert set(ERROR_STATUS) == set(ErrorKind)
