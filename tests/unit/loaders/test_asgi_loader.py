"""The ASGI loader's pure parts: the http scope made from a request's CGI
variables, and which name of the startup file is the app."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agent.loaders import asgi_loader, wsgi_loader

ENVIRON = {
    "REQUEST_METHOD": "POST",
    "REQUEST_URI": "/shop/caf%C3%A9/x?q=1",
    "SCRIPT_NAME": "/shop",
    "PATH_INFO": "/caf\u00c3\u00a9/x",  # the frame's UTF-8 bytes, as latin-1 text
    "QUERY_STRING": "q=1",
    "SERVER_PROTOCOL": "HTTP/1.0",
    "SERVER_NAME": "example.org",
    "SERVER_PORT": "8443",
    "REMOTE_ADDR": "10.0.0.7",
    "REMOTE_PORT": "51234",
    "HTTPS": "on",
    "CONTENT_TYPE": "application/json",
    "CONTENT_LENGTH": "12",
    "HTTP_X_FORWARDED_FOR": "1.2.3.4",
    "HTTP_COOKIE": "a=b; c=d",
}


def test_the_http_scope_of_a_request() -> None:
    state = {"pool": "p"}
    scope = asgi_loader.http_scope(ENVIRON, state)
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert (scope["http_version"], scope["method"], scope["scheme"]) == ("1.0", "POST", "https")
    assert scope["path"] == "/shop/caf\u00e9/x"
    assert scope["root_path"] == "/shop"
    assert scope["raw_path"] == b"/shop/caf%C3%A9/x"
    assert scope["query_string"] == b"q=1"
    assert scope["client"] == ("10.0.0.7", 51234)
    assert scope["server"] == ("example.org", 8443)
    assert scope["headers"] == [(b"x-forwarded-for", b"1.2.3.4"), (b"cookie", b"a=b; c=d"),
                                (b"content-type", b"application/json"), (b"content-length", b"12")]
    assert scope["state"] == state and scope["state"] is not state


def test_a_request_without_a_body_has_no_content_length_header_and_plain_http() -> None:
    environ = {**ENVIRON, "CONTENT_LENGTH": "0", "REMOTE_PORT": "x"}
    del environ["HTTPS"], environ["CONTENT_TYPE"]
    scope = asgi_loader.http_scope(environ, {})
    assert scope["scheme"] == "http"
    assert scope["client"] == ("10.0.0.7", 0)
    assert [name for name, _ in scope["headers"]] == [b"x-forwarded-for", b"cookie"]


@pytest.mark.parametrize(("source", "found"), [
    ("application = lambda s, r, w: 'application'\napp = lambda s, r, w: 'app'\n", "application"),
    ("app = lambda s, r, w: 'app'\n", "app"),
])
def test_the_app_is_application_or_else_app(tmp_path: Path, source: str, found: str) -> None:
    (tmp_path / "asgi_main.py").write_text(source)
    try:
        app = wsgi_loader.load_application(str(tmp_path), "asgi_main.py", None, asgi_loader.APP_NAMES)
        assert app(None, None, None) == found
    finally:
        sys.modules.pop("asgi_main", None)


def test_a_startup_file_without_either_name_is_a_load_error_naming_both(tmp_path: Path) -> None:
    (tmp_path / "asgi_none.py").write_text("handler = None\n")
    try:
        with pytest.raises(wsgi_loader.LoadError) as raised:
            wsgi_loader.load_application(str(tmp_path), "asgi_none.py", None, asgi_loader.APP_NAMES)
    finally:
        sys.modules.pop("asgi_none", None)
    assert raised.value.kind == "no_application"
    assert raised.value.summary.endswith("defines no callable 'application' nor 'app'")


UPGRADE = {
    "AGENT_UPGRADE": "1",
    "REQUEST_METHOD": "GET",
    "REQUEST_URI": "/shop/chat%20room?user=a",
    "SCRIPT_NAME": "/shop",
    "PATH_INFO": "/chat room",
    "QUERY_STRING": "user=a",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "SERVER_NAME": "example.org",
    "SERVER_PORT": "443",
    "REMOTE_ADDR": "10.0.0.8",
    "REMOTE_PORT": "40000",
    "HTTPS": "on",
    "CONTENT_LENGTH": "0",
    "HTTP_UPGRADE": "WebSocket",
    "HTTP_CONNECTION": "keep-alive, Upgrade",
    "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
    "HTTP_SEC_WEBSOCKET_VERSION": "13",
    "HTTP_SEC_WEBSOCKET_PROTOCOL": "chat, superchat",
    "HTTP_ORIGIN": "https://example.org",
}


def test_the_websocket_scope_of_an_upgrade_request() -> None:
    state = {"pool": "p"}
    scope = asgi_loader.websocket_scope(UPGRADE, state)
    assert scope["type"] == "websocket"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert "method" not in scope
    assert (scope["http_version"], scope["scheme"]) == ("1.1", "wss")
    assert (scope["path"], scope["raw_path"], scope["root_path"]) == ("/shop/chat room", b"/shop/chat%20room", "/shop")
    assert scope["query_string"] == b"user=a"
    assert scope["client"] == ("10.0.0.8", 40000)
    assert scope["server"] == ("example.org", 443)
    assert scope["subprotocols"] == ["chat", "superchat"]
    assert (b"origin", b"https://example.org") in scope["headers"]
    assert (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ==") in scope["headers"]
    assert all(name != b"content-length" for name, _ in scope["headers"])
    assert scope["extensions"] == {"websocket.http.response": {}}
    assert scope["state"] == state and scope["state"] is not state


def test_a_plain_connection_is_ws_and_offers_no_subprotocol() -> None:
    environ = dict(UPGRADE)
    del environ["HTTPS"], environ["HTTP_SEC_WEBSOCKET_PROTOCOL"]
    scope = asgi_loader.websocket_scope(environ, {})
    assert scope["scheme"] == "ws"
    assert scope["subprotocols"] == []


@pytest.mark.parametrize(("change", "websocket"), [
    ({}, True),
    ({"HTTP_UPGRADE": " websocket "}, True),
    ({"AGENT_UPGRADE": "0"}, False),
    ({"AGENT_UPGRADE": None}, False),         # a client's Upgrade header alone does not make one
    ({"HTTP_UPGRADE": "h2c"}, False),
    ({"HTTP_UPGRADE": None}, False),
])
def test_only_an_upgrade_frame_asking_for_websocket_is_a_websocket(change: dict[str, str | None],
                                                                    websocket: bool) -> None:
    environ = {key: value for key, value in {**UPGRADE, **change}.items() if value is not None}
    assert asgi_loader.is_websocket_upgrade(environ) is websocket  # type: ignore[arg-type]


def test_a_bad_handshake_is_answered_400_naming_the_problem_and_the_version() -> None:
    records = asgi_loader.bad_handshake_records("Sec-WebSocket-Version is not 13")
    size = int.from_bytes(records[:4], "big")
    response, end = records[4 : 4 + size], records[4 + size :]
    assert end == wsgi_loader.END_RECORD
    head, body = response.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nSec-WebSocket-Version: 13" in head
    assert body == b"400 Bad Request: not a WebSocket handshake (Sec-WebSocket-Version is not 13)\n"
    assert b"Content-Length: %d" % len(body) in head
