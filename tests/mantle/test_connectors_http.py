"""http/request (SPEC 5.1, 5.3) against a real local HTTP server."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from mantle.connectors.credentials import Credential
from mantle.connectors import ConnectorError, ConnectorInterrupted, Invocation, run_action
from tests.helpers import Background, cancelled_once_accepted, refusing_port
from tests.helpers.fixtures import http_target  # noqa: F401
from tests.helpers.http_target import HttpTarget
from tests.helpers.waiting import wait_until


def call(params, credential=None, cancel=None):
    if isinstance(credential, str):
        credential = Credential("token", "generic", {"key": credential})
    inv = Invocation("http/request", params, cancel or threading.Event(), credential=credential)
    return run_action(inv)


def fails(params, credential=None) -> ConnectorError:
    with pytest.raises(ConnectorError) as caught:
        call(params, credential)
    return caught.value


# --- request --------------------------------------------------------------------------------

def test_get_returns_status_headers_body_and_json(http_target):
    http_target.route("/data", json={"ok": True, "n": [1, 2]}, headers=[("X-Trace", "abc")])
    output = call({"url": http_target.url("/data")})
    assert output["status"] == 200
    assert output["headers"]["content-type"] == "application/json"
    assert output["headers"]["x-trace"] == "abc"
    assert output["body"] == '{"ok": true, "n": [1, 2]}'
    assert output["json"] == {"ok": True, "n": [1, 2]}


def test_method_defaults_to_get(http_target):
    http_target.route("/x", body="hi")
    call({"url": http_target.url("/x")})
    assert http_target.requests("/x")[0].method == "GET"


@pytest.mark.parametrize("method", ["post", "Put", "PATCH", "delete", "options"])
def test_method_is_case_insensitive(http_target, method):
    http_target.route("/x", body="hi")
    call({"url": http_target.url("/x"), "method": method})
    assert http_target.requests("/x")[0].method == method.upper()


def test_head_request_returns_empty_body_without_json(http_target):
    http_target.route("/x", json={"a": 1})
    output = call({"url": http_target.url("/x"), "method": "HEAD"})
    assert output["status"] == 200 and output["body"] == "" and "json" not in output


def test_query_string_reaches_the_server(http_target):
    http_target.route("/search", body="ok")
    call({"url": http_target.url("/search?q=a%20b&n=1")})
    assert http_target.requests("/search")[0].target == "/search?q=a%20b&n=1"


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "FETCH", 5])
def test_unsupported_method_fails(method):
    error = fails({"url": "http://127.0.0.1:9/", "method": method})
    assert error.message == f'http/request: unsupported method "{method}"'


@pytest.mark.parametrize("params", [{}, {"url": None}, {"url": ""}])
def test_missing_url_fails(params):
    assert fails(params).message == "http/request: url is required"


@pytest.mark.parametrize("url", ["ftp://example.com/x", "example.com", "http://", "http://a b/",
                                 "http://host:99999/", "/relative"])
def test_invalid_url_fails(url):
    assert fails({"url": url}).message == f'http/request: invalid url "{url}"'


def test_invalid_timeout_fails():
    error = fails({"url": "http://127.0.0.1:9/", "timeout": "soon"})
    assert error.message == 'http/request: invalid timeout "soon"'


def test_headers_that_are_not_a_map_fail():
    assert fails({"url": "http://127.0.0.1:9/", "headers": ["a"]}).message == (
        "http/request: headers must be a map"
    )


def test_header_value_with_newline_fails():
    error = fails({"url": "http://127.0.0.1:9/", "headers": {"X-A": "1\r\nX-B: 2"}})
    assert error.message == 'http/request: invalid header "X-A"'



def test_header_value_outside_latin1_fails_as_an_invalid_header(http_target):
    # HTTP/1.1 header text is Latin-1: http.client's refusal came out as a network error,
    # "GET <url>: 'latin-1' codec can't encode character..." after the connection was made.
    http_target.route("/x", body="ok")
    error = fails({"url": http_target.url("/x"), "headers": {"X-Name": "Zoë €"}})
    assert error.message == 'http/request: invalid header "X-Name"'
    assert http_target.hits("/x") == 0

# --- body and headers -----------------------------------------------------------------------

def test_string_body_is_sent_as_is_with_text_plain(http_target):
    http_target.route("/in", body="ok")
    call({"url": http_target.url("/in"), "method": "POST", "body": '{"not": "parsed"} é'})
    received = http_target.requests("/in")[0]
    assert received.body == '{"not": "parsed"} é'.encode()
    assert received.header("Content-Type") == "text/plain; charset=utf-8"


@pytest.mark.parametrize("body, sent", [({"a": [1, None]}, b'{"a":[1,null]}'),
                                        ([1, "x"], b'[1,"x"]'), (42, b"42"), (1.5, b"1.5"),
                                        (True, b"true"), (False, b"false")])
def test_non_string_body_is_sent_as_json(http_target, body, sent):
    http_target.route("/in", body="ok")
    call({"url": http_target.url("/in"), "method": "PUT", "body": body})
    received = http_target.requests("/in")[0]
    assert received.body == sent
    assert received.header("Content-Type") == "application/json"


def test_null_body_sends_no_body_and_no_content_type(http_target):
    http_target.route("/in", body="ok")
    call({"url": http_target.url("/in"), "method": "POST", "body": None})
    received = http_target.requests("/in")[0]
    assert received.body == b"" and received.header("Content-Type") is None


def test_header_values_are_sent_as_text_and_override_defaults(http_target):
    http_target.route("/in", body="ok")
    call({"url": http_target.url("/in"), "method": "POST", "body": {"a": 1},
          "headers": {"content-type": "application/vnd.x+json", "X-Count": 3,
                      "X-Flag": True, "User-Agent": "probe/1"}})
    received = http_target.requests("/in")[0]
    assert received.header_values("Content-Type") == ["application/vnd.x+json"]
    assert received.header("X-Count") == "3" and received.header("X-Flag") == "true"
    assert received.header_values("User-Agent") == ["probe/1"]


def test_default_user_agent_names_mantle(http_target):
    http_target.route("/in", body="ok")
    call({"url": http_target.url("/in")})
    assert http_target.requests("/in")[0].header("User-Agent").startswith("mantle/")


# --- credentials ----------------------------------------------------------------------------

def test_credential_is_sent_as_bearer_token(http_target):
    http_target.route("/in", body="ok")
    call({"url": http_target.url("/in")}, credential="s3cret")
    assert http_target.requests("/in")[0].header("Authorization") == "Bearer s3cret"


def test_authorization_header_in_params_wins_over_credential(http_target):
    http_target.route("/in", body="ok")
    call({"url": http_target.url("/in"), "headers": {"authorization": "Basic abc"}},
         credential="s3cret")
    assert http_target.requests("/in")[0].header_values("Authorization") == ["Basic abc"]


def test_credential_echoed_back_by_the_server_is_redacted_from_output(http_target):
    http_target.route("/echo", echo=True)
    output = call({"url": http_target.url("/echo")}, credential="s3cret")
    assert "s3cret" not in output["body"]
    assert ["Authorization", "Bearer ********"] in output["json"]["headers"]


# --- response -------------------------------------------------------------------------------

def test_repeated_response_header_is_a_list_of_strings(http_target):
    http_target.route("/c", body="ok", headers=[("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
    output = call({"url": http_target.url("/c")})
    assert output["headers"]["set-cookie"] == ["a=1", "b=2"]


def test_response_header_values_in_utf8_read_as_utf8_and_latin1_as_latin1(http_target):
    # The target writes header text as Latin-1: "\u00c3\u00a9" goes out as the UTF-8 of é.
    http_target.route("/h", body="ok", headers=[
        ("Content-Disposition", 'attachment; filename="caf\u00c3\u00a9.pdf"'),
        ("X-Latin", "caf\u00e9")])
    headers = call({"url": http_target.url("/h")})["headers"]
    assert headers["content-disposition"] == 'attachment; filename="caf\u00e9.pdf"'
    assert headers["x-latin"] == "caf\u00e9"


def test_json_key_is_present_whenever_body_parses_whatever_the_content_type(http_target):
    http_target.route("/t", body="[1, 2]", content_type="text/plain")
    output = call({"url": http_target.url("/t")})
    assert output["body"] == "[1, 2]" and output["json"] == [1, 2]


def test_json_after_a_byte_order_mark_is_decoded_and_the_body_kept_as_sent(http_target):
    # Some servers (.NET, files saved by Windows editors) start JSON with a UTF-8 BOM, which
    # RFC 8259 lets a parser ignore; json.loads refused it and "json" was missing.
    http_target.route("/bom", body=b'\xef\xbb\xbf{"count": 42}',
                      content_type="application/json")
    output = call({"url": http_target.url("/bom")})
    assert output["json"] == {"count": 42} and output["body"] == '\ufeff{"count": 42}'


@pytest.mark.parametrize("body", ["hello", "", "{broken", "NaN", "\ufeff", "\ufeff\ufeff1"])
def test_json_key_is_absent_when_body_is_not_json(http_target, body):
    http_target.route("/t", body=body, content_type="application/json")
    output = call({"url": http_target.url("/t")})
    assert output["body"] == body and "json" not in output


def test_json_null_body_gives_json_key_with_null(http_target):
    http_target.route("/t", body="null")
    assert call({"url": http_target.url("/t")})["json"] is None


def test_invalid_utf8_in_body_is_replaced(http_target):
    http_target.route("/b", body=b"ok\xff\xfe!")
    assert call({"url": http_target.url("/b")})["body"] == "ok\ufffd\ufffd!"


def test_json_with_an_escaped_lone_surrogate_keeps_a_replacement_character(http_target):
    # "\ud800" without its pair is valid JSON text (a string cut inside an emoji), but no
    # database, JSON document or HTTP body can carry the lone surrogate it decodes to: storing
    # the output failed the whole execution with "internal error".
    http_target.route("/cut", body=b'{"text": "ab\\ud83d", "ok": "\\ud83d\\ude00"}')
    output = call({"url": http_target.url("/cut")})
    assert output["json"] == {"text": "ab\ufffd", "ok": "\U0001f600"}
    json.dumps(output, ensure_ascii=False).encode("utf-8")  # storable


def test_status_400_or_more_fails_and_keeps_the_full_output(http_target):
    http_target.route("/missing", status=404, json={"error": "nope"})
    url = http_target.url("/missing")
    error = fails({"url": url, "method": "delete"})
    assert error.message == f"http/request: DELETE {url} returned 404"
    assert error.retryable
    assert error.output["status"] == 404 and error.output["json"] == {"error": "nope"}


def test_status_below_400_succeeds(http_target):
    http_target.route("/a", status=204)
    assert call({"url": http_target.url("/a")})["status"] == 204


def test_network_error_names_method_url_and_reason():
    with refusing_port() as port:
        url = f"http://127.0.0.1:{port}/x"
        error = fails({"url": url, "method": "post"})
    assert error.message == f"http/request: POST {url}: connection refused"
    assert error.retryable


@pytest.mark.alone
def test_timeout_fails_with_the_timeout_as_written(http_target):
    http_target.route("/slow", hold=True)
    url = http_target.url("/slow")
    started = time.monotonic()
    error = fails({"url": url, "timeout": "150ms"})
    assert error.message == f"http/request: GET {url} timed out after 150ms"
    assert 0.14 <= time.monotonic() - started < 1.0


def test_timeout_covers_a_slow_body(http_target):
    http_target.route("/slow-body", body="x" * 10, hold_body=True)
    url = http_target.url("/slow-body")
    assert fails({"url": url, "timeout": "0.1s"}).message == (
        f"http/request: GET {url} timed out after 0.1s"
    )


def _drip_server() -> socket.socket:
    """A server answering one request with a 100-byte body sent a byte every 50 ms: each read
    gets data in time, only a whole-request deadline stops it."""
    listener = socket.create_server(("127.0.0.1", 0))

    def drip():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
                for _ in range(100):
                    time.sleep(0.05)
                    conn.sendall(b"x")
            except OSError:
                pass

    threading.Thread(target=drip, daemon=True).start()
    return listener


def test_a_timeout_too_long_to_wait_on_leaves_every_request_deadline_working(http_target):
    # 10^14 hours is more than a thread or a socket can wait: it failed the request with
    # "timestamp out of range for platform time_t" and killed the process's one deadline
    # thread, so no later http/request or AI request ever ended at its timeout again.
    http_target.route("/ok", body="ok")
    assert call({"url": http_target.url("/ok"), "timeout": "99999999999999h"})["body"] == "ok"
    listener = _drip_server()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
    started = time.monotonic()
    try:
        error = fails({"url": url, "timeout": "300ms"})
    finally:
        listener.close()
    assert error.message == f"http/request: GET {url} timed out after 300ms"
    assert time.monotonic() - started < 2


def test_body_over_10_mib_fails(http_target):
    http_target.route("/huge", stream=10 * 1024 * 1024 + 1)
    assert fails({"url": http_target.url("/huge")}).message == (
        "http/request: response body exceeds 10485760 bytes"
    )


def test_declared_content_length_over_10_mib_fails_without_reading(http_target):
    http_target.route("/huge", body=b"x" * (10 * 1024 * 1024 + 1), hold_body=True)
    assert fails({"url": http_target.url("/huge")}).message == (
        "http/request: response body exceeds 10485760 bytes"
    )


def test_body_of_exactly_10_mib_is_accepted(http_target):
    http_target.route("/big", stream=10 * 1024 * 1024)
    assert len(call({"url": http_target.url("/big")})["body"]) == 10 * 1024 * 1024


# --- redirects ------------------------------------------------------------------------------

def test_redirect_is_followed(http_target):
    http_target.route("/old", status=301, redirect_to="/new")
    http_target.route("/new", json={"here": 1})
    output = call({"url": http_target.url("/old")})
    assert output["status"] == 200 and output["json"] == {"here": 1}


def test_a_redirect_to_a_location_in_raw_utf8_goes_to_that_path(http_target):
    # Servers send non-ASCII Locations as raw UTF-8 (curl and browsers follow them so);
    # http.client reads header bytes as Latin-1, and "/café" was requested as
    # "/caf%C3%83%C2%A9". The target's send_header writes this text as Latin-1: bytes c3 a9.
    http_target.route("/old", status=302, redirect_to="/caf\u00c3\u00a9?q=\u00c3\u00a9")
    http_target.route("/caf%C3%A9", body="here")
    output = call({"url": http_target.url("/old")})
    assert output["status"] == 200 and output["body"] == "here"
    assert http_target.requests("/caf%C3%A9")[0].target == "/caf%C3%A9?q=%C3%A9"


@pytest.mark.parametrize("status", [301, 302, 303])
def test_post_redirected_by_301_302_303_becomes_get_without_body(http_target, status):
    http_target.route("/form", status=status, redirect_to="/done")
    http_target.route("/done", body="ok")
    call({"url": http_target.url("/form"), "method": "POST", "body": {"a": 1}})
    received = http_target.requests("/done")[0]
    assert received.method == "GET" and received.body == b""
    assert received.header("Content-Type") is None


def test_put_redirected_by_303_becomes_get(http_target):
    http_target.route("/form", status=303, redirect_to="/done")
    http_target.route("/done", body="ok")
    call({"url": http_target.url("/form"), "method": "PUT", "body": "x"})
    assert http_target.requests("/done")[0].method == "GET"


@pytest.mark.parametrize("status", [307, 308])
def test_307_and_308_keep_method_and_body(http_target, status):
    http_target.route("/form", status=status, redirect_to="/done")
    http_target.route("/done", body="ok")
    call({"url": http_target.url("/form"), "method": "PATCH", "body": {"a": 1}})
    received = http_target.requests("/done")[0]
    assert received.method == "PATCH" and received.body == b'{"a":1}'
    assert received.header("Content-Type") == "application/json"


def test_redirect_to_same_origin_keeps_authorization(http_target):
    http_target.route("/old", status=302, redirect_to="/new")
    http_target.route("/new", body="ok")
    call({"url": http_target.url("/old")}, credential="s3cret")
    assert http_target.requests("/new")[0].header("Authorization") == "Bearer s3cret"


def test_redirect_to_another_host_drops_authorization(http_target):
    http_target.route("/old", status=302, redirect_to=f"http://localhost:{http_target.port}/new")
    http_target.route("/new", body="ok")
    call({"url": http_target.url("/old"), "headers": {"Authorization": "Token t"}})
    assert http_target.requests("/old")[0].header("Authorization") == "Token t"
    assert http_target.requests("/new")[0].header("Authorization") is None


def test_redirect_to_another_port_drops_credential_for_the_rest_of_the_chain(http_target):
    with HttpTarget() as other:
        http_target.route("/old", status=307, redirect_to=other.url("/hop"))
        other.route("/hop", status=302, redirect_to=f"http://localhost:{other.port}/new")
        other.route("/new", body="ok")
        call({"url": http_target.url("/old")}, credential="s3cret")
        assert other.requests("/hop")[0].header("Authorization") is None
        assert other.requests("/new")[0].header("Authorization") is None


def test_redirect_to_another_host_drops_every_header_the_credential_added(http_target):
    # An openai credential adds OpenAI-Organization (its org_id field, a credential value
    # like any other) beside Authorization: neither goes to another origin.
    http_target.route("/old", status=302, redirect_to=f"http://localhost:{http_target.port}/new")
    http_target.route("/new", body="ok")
    call({"url": http_target.url("/old")},
         credential=Credential("ai", "openai", {"api_key": "sk-1", "org_id": "org-7"}))
    assert http_target.requests("/old")[0].header("OpenAI-Organization") == "org-7"
    assert http_target.requests("/new")[0].header("Authorization") is None
    assert http_target.requests("/new")[0].header("OpenAI-Organization") is None


def test_more_than_10_redirects_fails(http_target):
    for hop in range(11):
        http_target.route(f"/r{hop}", status=302, redirect_to=f"/r{hop + 1}")
    http_target.route("/r11", body="never")
    url = http_target.url("/r0")
    assert fails({"url": url}).message == f"http/request: GET {url}: stopped after 10 redirects"
    assert http_target.hits("/r10") == 1 and http_target.hits("/r11") == 0


def test_exactly_10_redirects_are_followed(http_target):
    for hop in range(10):
        http_target.route(f"/r{hop}", status=302, redirect_to=f"/r{hop + 1}")
    http_target.route("/r10", body="made it")
    assert call({"url": http_target.url("/r0")})["body"] == "made it"


# --- cancellation ---------------------------------------------------------------------------

@pytest.mark.alone
def test_cancel_interrupts_a_request_to_a_silent_server_within_100ms(http_target):
    http_target.route("/silent", hold=True)
    cancel = threading.Event()
    call_ = Background(lambda: call({"url": http_target.url("/silent")}, cancel=cancel))
    http_target.wait_for_hits("/silent")
    cancelled_at = time.monotonic()
    cancel.set()
    call_.join(2)
    assert isinstance(call_.error, ConnectorInterrupted)
    latency = call_.ended_at - cancelled_at
    print(f"http cancel latency: {latency * 1000:.1f} ms")
    assert latency < 0.5


@pytest.mark.alone
def test_cancel_interrupts_a_slow_body(http_target):
    http_target.route("/slow-body", body="x" * 100, hold_body=True)
    cancel = threading.Event()
    call_ = Background(lambda: call({"url": http_target.url("/slow-body")}, cancel=cancel))
    http_target.wait_for_hits("/slow-body")
    cancelled_at = time.monotonic()
    cancel.set()
    call_.join(2)
    assert isinstance(call_.error, ConnectorInterrupted)
    assert call_.ended_at - cancelled_at < 0.5


def _syn_sent_to(port: int) -> bool:
    """Whether a TCP connect to 127.0.0.1:``port`` is waiting for the server (SYN_SENT)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return any(row[2] == f"0100007F:{port:04X}" and row[3] == "02" for row in rows)


@pytest.mark.alone
def test_cancel_interrupts_a_connect_that_gets_no_answer():
    # A server whose accept queue is full drops the SYN, as a firewall does: the connect
    # waits for an answer that never comes. Cancel must not wait for the request's timeout.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))  # fills the queue
    cancel = threading.Event()
    try:
        call_ = Background(lambda: call({"url": f"http://127.0.0.1:{port}/", "timeout": "20s"},
                                        cancel=cancel))
        wait_until(lambda: _syn_sent_to(port), timeout=5, message="the connect is waiting")
        cancelled_at = time.monotonic()
        cancel.set()
        call_.join(10)
    finally:
        queued.close()
        listener.close()
    assert isinstance(call_.error, ConnectorInterrupted)
    assert call_.ended_at - cancelled_at < 0.5


@pytest.mark.alone
def test_cancel_interrupts_a_tls_handshake_the_server_never_answers():
    ended, after_cancel = cancelled_once_accepted(lambda port, cancel: call(
        {"url": f"https://127.0.0.1:{port}/", "timeout": "20s"}, cancel=cancel))
    assert isinstance(ended.error, ConnectorInterrupted)
    assert after_cancel < 0.5


def test_held_response_is_answered_once_released(http_target):
    http_target.route("/gate", body="open", hold=True)
    call_ = Background(lambda: call({"url": http_target.url("/gate")}))
    http_target.wait_for_hits("/gate")
    assert call_.running
    http_target.release("/gate")
    assert call_.join(2).result["body"] == "open"


def test_cancel_set_before_the_call_sends_nothing(http_target):
    http_target.route("/x", body="ok")
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ConnectorInterrupted):
        call({"url": http_target.url("/x")}, cancel=cancel)
    assert http_target.hits("/x") == 0


# --- TLS ------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_certificate_is_verified(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=127.0.0.1",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one():
        conn, _ = listener.accept()
        try:
            context.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    server = threading.Thread(target=serve_one, daemon=True)
    server.start()
    url = f"https://127.0.0.1:{listener.getsockname()[1]}/"
    try:
        error = fails({"url": url})
    finally:
        listener.close()
    assert error.message.startswith(f"http/request: GET {url}: certificate verify failed: ")
