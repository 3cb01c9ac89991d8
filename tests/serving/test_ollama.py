"""Tests for daemon/serving/ollama.py: host parsing, every client call against the fake server, fault modes."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from daemon.config import OllamaConfig
from daemon.errors import OllamaError, OllamaUnavailableError
from daemon.serving.ollama import DEFAULT_HOST, OllamaClient, UnreachableMemory, parse_host, resolve_base_url
from tests.conftest import wait_for
from tests.fake_ollama import FakeOllama

SCHEMA = {"type": "object",
          "properties": {"rating": {"type": "integer", "enum": [0, 1, 2]}, "rationale": {"type": "string"}},
          "required": ["rating", "rationale"], "additionalProperties": False}


@pytest.fixture
def client(fake_ollama):
    with OllamaClient(fake_ollama.config(), env={}) as c:
        yield c


# --- host parsing (reference §1, the Python client's rules) -------------------------------------

HOST_TABLE = [
    (None, "http://127.0.0.1:11434"),
    ("", "http://127.0.0.1:11434"),
    ("example.com", "http://example.com:11434"),
    (":56789", "http://127.0.0.1:56789"),
    ("1.2.3.4", "http://1.2.3.4:11434"),
    ("1.2.3.4:56789", "http://1.2.3.4:56789"),
    ("http://example.com", "http://example.com:80"),
    ("https://example.com", "https://example.com:443"),
    ("https://example.com:56789", "https://example.com:56789"),
    ("example.com:56789", "http://example.com:56789"),
    ("example.com/", "http://example.com:11434"),
    ("example.com/path", "http://example.com:11434/path"),
    ("example.com:56789/path/", "http://example.com:56789/path"),
    ("https://example.com:56789/path", "https://example.com:56789/path"),
    ("[0001:002:003:0004::1]", "http://[0001:002:003:0004::1]:11434"),
    ("[0001:002:003:0004::1]:56789", "http://[0001:002:003:0004::1]:56789"),
    ("http://[0001:002:003:0004::1]", "http://[0001:002:003:0004::1]:80"),
    ("https://[0001:002:003:0004::1]:56789", "https://[0001:002:003:0004::1]:56789"),
    ("[0001:002:003:0004::1]:56789/path/", "http://[0001:002:003:0004::1]:56789/path"),
]


@pytest.mark.parametrize(("value", "expected"), HOST_TABLE)
def test_parse_host_follows_the_python_client(value, expected):
    """parse_host gives the same base URL as the official client's _parse_host for the reference table."""
    assert parse_host(value) == expected


def test_parse_host_rejects_an_invalid_port():
    """A non-numeric port is an OllamaError that tells the operator the expected form."""
    with pytest.raises(OllamaError) as info:
        parse_host("example.com:notaport")
    assert info.value.message == "ollama host 'example.com:notaport' has an invalid port"


def test_configured_host_wins_over_ollama_host():
    """ollama.host from the config is used even when OLLAMA_HOST is set (the client's host argument wins)."""
    assert resolve_base_url("10.0.0.5", {"OLLAMA_HOST": "example.com:1234"}) == "http://10.0.0.5:11434"


def test_ollama_host_is_the_fallback():
    """Without ollama.host, OLLAMA_HOST is parsed with the same rules."""
    assert resolve_base_url(None, {"OLLAMA_HOST": "example.com:1234"}) == "http://example.com:1234"


def test_default_host_without_config_or_environment():
    """Neither set: the default local server."""
    assert resolve_base_url(None, {}) == DEFAULT_HOST == "http://127.0.0.1:11434"


def test_client_reads_host_from_its_env_mapping():
    """OllamaClient takes its base URL from the env mapping it is given."""
    with OllamaClient(OllamaConfig(), env={"OLLAMA_HOST": ":56789"}) as c:
        assert c.base_url == "http://127.0.0.1:56789"


# --- calls against the fake ---------------------------------------------------------------------

def test_version(client):
    """version() returns the server's version string."""
    assert client.version() == "0.12.3"


def test_is_reachable_true_then_false_when_down(client, fake_ollama):
    """is_reachable() is True for a live server and False, without raising, when it is down."""
    assert client.is_reachable() is True
    fake_ollama.fault = "down"
    assert client.is_reachable() is False


def test_list_models(client):
    """list_models() returns the tags entries with full names."""
    assert sorted(m["name"] for m in client.list_models()) == ["gemma2:2b", "llama3.2:1b", "qwen2.5:0.5b"]


def test_show_returns_model_info(client):
    """show() returns details and model_info with the architecture."""
    info = client.show("llama3.2:1b")
    assert info["model_info"]["general.architecture"] == "llama"
    assert info["details"]["quantization_level"] == "Q4_K_M"


def test_show_unknown_model_is_404(client):
    """show() of an unknown model raises OllamaError with status 404 and the server's text."""
    with pytest.raises(OllamaError) as info:
        client.show("nope:1b")
    assert info.value.status == 404
    assert info.value.server_error == "model 'nope:1b' not found"
    assert not isinstance(info.value, OllamaUnavailableError)


def test_upload_blob_digest_matches_file(client, fake_ollama, tmp_path):
    """upload_blob() returns sha256:<hex> of the file, and the server stored exactly those bytes."""
    data = bytes(range(256)) * 9000  # > 2 MiB: several 1 MiB chunks
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    digest = client.upload_blob(path)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert fake_ollama.blobs[digest] == data
    posts = fake_ollama.requests_to(f"/api/blobs/{digest}", "POST")
    assert [(r.size_bytes, r.headers.get("Content-Length")) for r in posts] == [(len(data), str(len(data)))]


def test_upload_blob_skips_a_stored_blob(client, fake_ollama, tmp_path):
    """A blob the server already holds is not sent again (HEAD answers 200)."""
    path = tmp_path / "a.json"
    path.write_text('{"lora_alpha": 16}')
    first = client.upload_blob(path)
    second = client.upload_blob(path)
    assert first == second
    assert len(fake_ollama.requests_to(f"/api/blobs/{first}", "POST")) == 1
    assert len(fake_ollama.requests_to(f"/api/blobs/{first}", "HEAD")) == 2


def test_upload_empty_file(client, fake_ollama, tmp_path):
    """An empty file uploads as the sha256 of nothing."""
    path = tmp_path / "empty"
    path.write_bytes(b"")
    digest = client.upload_blob(path)
    assert digest == "sha256:" + hashlib.sha256(b"").hexdigest()
    assert fake_ollama.blobs[digest] == b""


def test_create_streams_status_and_registers_the_model(client, fake_ollama):
    """create() sends the JSON create body, passes each status line to on_status and the model appears."""
    seen: list[dict] = []
    final = client.create("acme:v1", from_="llama3.2:1b", system="You rate records.",
                          messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                          parameters={"temperature": 0}, on_status=seen.append)
    assert final == {"status": "success"}
    assert seen[-1] == {"status": "success"}
    assert seen[-2] == {"status": "writing manifest"}
    (req,) = fake_ollama.requests_to("/api/create")
    assert req.body == {"model": "acme:v1", "stream": True, "from": "llama3.2:1b", "system": "You rate records.",
                        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                        "parameters": {"temperature": 0}}
    shown = client.show("acme:v1")
    assert shown["details"]["parent_model"] == "llama3.2:1b"
    assert shown["system"] == "You rate records."
    assert "acme:v1" in [m["name"] for m in client.list_models()]


def test_create_error_line_inside_stream_raises(client, fake_ollama, tmp_path):
    """An {"error": ...} line in a 200 create stream raises OllamaError with the server's text."""
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text('{"lora_alpha": 16}')
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    adapters = {"adapter_config.json": client.upload_blob(cfg),
                "adapter_model.safetensors": client.upload_blob(weights)}
    seen: list[dict] = []
    with pytest.raises(OllamaError) as info:
        client.create("bad:v1", from_="qwen2.5:0.5b", adapters=adapters, on_status=seen.append)
    assert (info.value.status, info.value.server_error) == (200, "unsupported architecture")
    assert seen == [{"status": "converting adapter"}]
    assert fake_ollama.get_model("bad:v1") is None


def test_create_unknown_base_fails(client):
    """A create from a model the server does not have fails (the real server tries a pull)."""
    with pytest.raises(OllamaError) as info:
        client.create("x:v1", from_="missing:7b")
    assert info.value.server_error == "pull model manifest: file does not exist"


def test_create_without_from_is_400(client):
    """A create with neither from nor files is rejected before the stream with 400."""
    with pytest.raises(OllamaError) as info:
        client.create("x:v1", system="s")
    assert (info.value.status, info.value.server_error) == (400, "neither 'from' or 'files' was specified")


def test_create_with_a_missing_adapter_blob_is_400(client):
    """Adapters referencing a blob never uploaded fail with 400."""
    digest = "sha256:" + "ab" * 32
    with pytest.raises(OllamaError) as info:
        client.create("x:v1", from_="llama3.2:1b", adapters={"adapter_config.json": digest})
    assert info.value.status == 400
    assert info.value.server_error.endswith("no such file or directory")


def test_chat_sends_format_and_options(client, fake_ollama):
    """chat() sends stream false, the schema as format and the options, and returns the message."""
    resp = client.chat("llama3.2:1b", [{"role": "user", "content": "rate"}], format=SCHEMA,
                       options={"temperature": 0})
    assert json.loads(resp["message"]["content"]) == {"rating": 0,
                                                      "rationale": "scripted rationale from the fake Ollama server"}
    (req,) = fake_ollama.requests_to("/api/chat")
    assert req.body == {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "rate"}],
                        "stream": False, "format": SCHEMA, "options": {"temperature": 0}}


def test_chat_unknown_model_is_404(client):
    """chat() with an unknown model raises OllamaError 404."""
    with pytest.raises(OllamaError) as info:
        client.chat("ghost", [{"role": "user", "content": "x"}])
    assert (info.value.status, info.value.server_error) == (404, "model 'ghost:latest' not found")


def test_delete_then_unknown(client, fake_ollama):
    """delete() removes a model; deleting it again is a 404 OllamaError."""
    client.delete("gemma2:2b")
    assert fake_ollama.get_model("gemma2:2b") is None
    with pytest.raises(OllamaError) as info:
        client.delete("gemma2:2b")
    assert info.value.status == 404


def test_api_key_is_sent_as_bearer(fake_ollama):
    """OLLAMA_API_KEY in the env mapping becomes an Authorization: Bearer header."""
    with OllamaClient(fake_ollama.config(), env={"OLLAMA_API_KEY": "k123"}) as c:
        c.version()
    assert fake_ollama.requests_to("/api/version")[0].headers["Authorization"] == "Bearer k123"


# --- fault modes: each ends quickly with a typed error (pytest-timeout bounds the time) ----------

def _calls(client):
    return {
        "version": lambda: client.version(),
        "show": lambda: client.show("llama3.2:1b"),
        "chat": lambda: client.chat("llama3.2:1b", [{"role": "user", "content": "x"}], format=SCHEMA),
        "create": lambda: client.create("f:v1", from_="llama3.2:1b"),
    }


FAULT_CASES = [
    ("down", "version", OllamaUnavailableError, None),
    ("down", "chat", OllamaUnavailableError, None),
    ("down", "create", OllamaUnavailableError, None),
    ("slow", "version", OllamaUnavailableError, None),
    ("slow", "chat", OllamaUnavailableError, None),
    ("slow", "create", OllamaUnavailableError, None),
    ("error500", "show", OllamaError, 500),
    ("error500", "create", OllamaError, 500),
    ("reset", "chat", OllamaUnavailableError, None),
    ("reset", "create", OllamaUnavailableError, None),
    ("garbage", "version", OllamaError, 200),
    ("garbage", "chat", OllamaError, 200),
    ("garbage", "create", OllamaError, 200),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("fault", "call", "error", "status"), FAULT_CASES)
def test_fault_mode_raises_typed_error(fake_ollama, fault, call, error, status):
    """Each fault mode ends in the expected OllamaError subclass and status, within the timeouts."""
    fake_ollama.slow_s = 5.0
    with OllamaClient(fake_ollama.config(read_timeout_s=0.3, create_timeout_s=0.3), env={}) as c:
        fake_ollama.fault = fault
        with pytest.raises(OllamaError) as info:
            _calls(c)[call]()
    assert type(info.value) is error
    assert info.value.status == status


@pytest.mark.timeout(30)
def test_idempotent_calls_retry_5xx_but_create_does_not(client, fake_ollama):
    """With retries=1, show is sent twice on 500 while create is sent once."""
    fake_ollama.fault = "error500"
    with pytest.raises(OllamaError):
        client.show("llama3.2:1b")
    with pytest.raises(OllamaError):
        client.create("f:v1", from_="llama3.2:1b")
    assert len(fake_ollama.requests_to("/api/show")) == 2
    assert len(fake_ollama.requests_to("/api/create")) == 1


@pytest.mark.timeout(30)
def test_client_recovers_when_the_server_comes_back(client, fake_ollama):
    """After the server was down and restarts on the same port, the same client works again."""
    assert client.version() == "0.12.3"
    fake_ollama.fault = "down"
    with pytest.raises(OllamaUnavailableError):
        client.version()
    fake_ollama.fault = None
    assert client.version() == "0.12.3"


def test_refused_connection_message(fake_ollama):
    """A refused connection names the URL and the call, and hints at starting Ollama."""
    with OllamaClient(fake_ollama.config(retries=0), env={}) as c:
        fake_ollama.fault = "down"
        with pytest.raises(OllamaUnavailableError) as info:
            c.version()
    assert info.value.message == f"Ollama at {fake_ollama.url} refused the connection (GET /api/version)"
    assert info.value.hint.startswith("start Ollama (ollama serve / systemctl start ollama)")


# --- total deadline: a trickling or silent server cannot hold a call ----------------------------

DEADLINE_CFG = dict(connect_timeout_s=0.5, read_timeout_s=0.5, create_timeout_s=0.5, backoff_s=0.01,
                    backoff_max_s=0.02)
DEADLINE_S = 1.0  # connect_timeout_s + read_timeout_s (create_timeout_s for create) above


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["version", "chat", "create"])
def test_trickling_server_is_cut_at_the_total_deadline(fake_ollama, call):
    """A server sending one byte every 0.1 s (each socket read is short) still ends the call with a
    timed-out OllamaUnavailableError within the call's total deadline, and the connection is closed."""
    fake_ollama.trickle_s = 0.1
    with OllamaClient(fake_ollama.config(**DEADLINE_CFG), env={}) as c:
        fake_ollama.fault = "trickle"
        started = time.monotonic()
        with pytest.raises(OllamaUnavailableError) as info:
            _calls(c)[call]()
        elapsed = time.monotonic() - started
        wait_for(lambda: fake_ollama.open_connections() == 0, timeout=5, message="the connection closed")
    assert " timed out (" in info.value.message
    assert elapsed < 3 * DEADLINE_S, elapsed


@pytest.mark.timeout(60)
def test_retries_share_the_call_deadline(fake_ollama):
    """A server that never answers costs one deadline in total, however many retries are configured."""
    with OllamaClient(fake_ollama.config(retries=10, **DEADLINE_CFG), env={}) as c:
        fake_ollama.fault = "hang"
        started = time.monotonic()
        with pytest.raises(OllamaUnavailableError) as info:
            c.version()
        elapsed = time.monotonic() - started
        wait_for(lambda: fake_ollama.open_connections() == 0, timeout=5, message="the connections closed")
    assert info.value.message == f"Ollama at {fake_ollama.url} timed out (GET /api/version)"
    assert elapsed < 3 * DEADLINE_S, elapsed
    assert 1 <= fake_ollama.accepted <= 3


@pytest.mark.timeout(60)
def test_is_reachable_is_false_within_the_deadline_for_a_trickling_server(fake_ollama):
    """is_reachable() gives up on a trickling server within the deadline and returns False."""
    with OllamaClient(fake_ollama.config(**DEADLINE_CFG), env={}) as c:
        fake_ollama.fault = "trickle"
        started = time.monotonic()
        assert c.is_reachable() is False
        elapsed = time.monotonic() - started
    assert elapsed < 3 * DEADLINE_S, elapsed


# --- unreachable memory: a silent server is waited for once -------------------------------------

@pytest.mark.timeout(60)
def test_shared_memory_fails_at_once_until_the_ttl_has_passed(fake_ollama):
    """Clients sharing an UnreachableMemory: after one waited on a silent server, the other fails at
    once without opening a connection; once the TTL has passed it asks the server again."""
    now = [1000.0]
    memory = UnreachableMemory(ttl_s=30.0, clock=lambda: now[0])
    cfg = fake_ollama.config(retries=0, **DEADLINE_CFG)
    with OllamaClient(cfg, env={}, memory=memory) as first, OllamaClient(cfg, env={}, memory=memory) as second:
        fake_ollama.fault = "hang"
        with pytest.raises(OllamaUnavailableError):
            first.version()
        assert fake_ollama.accepted == 1
        with pytest.raises(OllamaUnavailableError) as remembered:
            second.show("llama3.2:1b")
        now[0] += 29.9
        assert second.is_reachable() is False
        assert fake_ollama.accepted == 1
        now[0] += 0.1
        fake_ollama.fault = None
        assert second.version() == "0.12.3"
        assert fake_ollama.accepted == 2
    assert remembered.value.message == (
        f"Ollama at {fake_ollama.url} timed out (GET /api/version); POST /api/show was not sent: "
        "a server that did not answer is not asked again for 30 s")
    assert remembered.value.status is None


def test_memory_is_per_server():
    """A failure remembered for one base URL says nothing about another."""
    memory = UnreachableMemory(ttl_s=30.0)
    error = OllamaUnavailableError("Ollama at http://10.0.0.1:11434 timed out (GET /api/version)")
    memory.remember("http://10.0.0.1:11434", error)
    assert memory.recall("http://10.0.0.2:11434") is None
    assert memory.recall("http://10.0.0.1:11434")[0] is error


# --- a hostile server: endless, huge, redirecting, deeply nested or wrong-shaped answers -----------

MiB = 1 << 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("call", "path"), [("version", "/api/version"), ("chat", "/api/chat"),
                                            ("create", "/api/create")])
def test_an_answer_that_never_ends_is_cut_at_the_deadline(fake_ollama, call, path):
    """A 200 answer without Content-Length whose bytes keep coming (each read returns at once, so
    neither the read timeout nor shutting the socket stops it) ends in a timed-out
    OllamaUnavailableError, and the connection is closed."""
    fake_ollama.hostile[path] = "endless"
    fake_ollama.endless_chunk_bytes, fake_ollama.endless_pause_s = 16 * 1024, 0.01  # ~1.6 MB/s: under the cap
    method = "GET" if call == "version" else "POST"
    with OllamaClient(fake_ollama.config(**DEADLINE_CFG), env={}) as c:
        with pytest.raises(OllamaUnavailableError) as info:
            _calls(c)[call]()
        wait_for(lambda: fake_ollama.open_connections() == 0, timeout=5, message="the connection closed")
    assert info.value.message == f"Ollama at {fake_ollama.url} timed out ({method} {path})"


def test_an_announced_answer_over_the_cap_is_refused_unread(fake_ollama):
    """A Content-Length above ollama.max_response_bytes is an OllamaError naming the call, the size,
    the cap and the setting, raised before the body is read and not retried."""
    fake_ollama.hostile["/api/version"] = "huge"
    fake_ollama.huge_bytes = 2 * MiB
    with OllamaClient(fake_ollama.config(max_response_bytes=MiB), env={}) as c:
        with pytest.raises(OllamaError) as info:
            c.version()
        wait_for(lambda: fake_ollama.open_connections() == 0, timeout=5, message="the connection closed")
    size = 2 * MiB + len(b'{"version": "0.12.3"}')
    assert (type(info.value), info.value.status, info.value.message) == (
        OllamaError, 200, f"Ollama's answer to GET /api/version announces {size} bytes, more than "
                          f"ollama.max_response_bytes ({MiB}); it was not read")
    assert info.value.hint == (f"check that {fake_ollama.url} is an Ollama server (its answers are a few KB), "
                               "or raise ollama.max_response_bytes")
    assert len(fake_ollama.requests_to("/api/version")) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("mode", "call", "path"), [("huge_unannounced", "version", "/api/version"),
                                                    ("huge_unannounced", "chat", "/api/chat"),
                                                    ("endless", "chat", "/api/chat")])
def test_reading_stops_past_the_cap(fake_ollama, mode, call, path):
    """An answer without Content-Length (spaces, then valid JSON; or spaces without end) is read up to
    ollama.max_response_bytes only: an OllamaError naming the call, the cap and the setting, not retried."""
    fake_ollama.hostile[path] = mode
    fake_ollama.huge_bytes = 4 * MiB
    method = "GET" if call == "version" else "POST"
    with OllamaClient(fake_ollama.config(max_response_bytes=MiB, read_timeout_s=30.0), env={}) as c:
        with pytest.raises(OllamaError) as info:
            _calls(c)[call]()
        wait_for(lambda: fake_ollama.open_connections() == 0, timeout=5, message="the connection closed")
    assert (type(info.value), info.value.status, info.value.message) == (
        OllamaError, 200, f"Ollama's answer to {method} {path} is larger than ollama.max_response_bytes "
                          f"({MiB}); reading stopped there")
    assert len(fake_ollama.requests_to(path)) == 1


@pytest.mark.timeout(60)
def test_a_create_status_line_over_the_cap_stops_the_stream(fake_ollama):
    """A create stream whose line never ends is read up to ollama.max_response_bytes: an OllamaError
    naming the stream, the cap and the setting."""
    fake_ollama.hostile["/api/create"] = "endless"
    with OllamaClient(fake_ollama.config(max_response_bytes=MiB, create_timeout_s=30.0), env={}) as c:
        with pytest.raises(OllamaError) as info:
            c.create("f:v1", from_="llama3.2:1b")
    assert (type(info.value), info.value.status, info.value.message) == (
        OllamaError, 200, f"a line of Ollama's POST /api/create stream is larger than "
                          f"ollama.max_response_bytes ({MiB}); reading stopped there")


@pytest.mark.parametrize(("call", "method", "path"), [("version", "GET", "/api/version"),
                                                      ("chat", "POST", "/api/chat")])
def test_a_redirect_is_never_followed(fake_ollama, call, method, path):
    """A 307 to a second server sends nothing there: an OllamaError naming the status and the
    configured host (not the Location), not retried."""
    elsewhere = FakeOllama()
    elsewhere.add_model("llama3.2:1b")
    elsewhere.start()
    try:
        fake_ollama.hostile[path] = "redirect"
        fake_ollama.redirect_to = f"{elsewhere.url}{path}?leak=SECRETQUERY"
        with OllamaClient(fake_ollama.config(), env={}) as c:
            with pytest.raises(OllamaError) as info:
                _calls(c)[call]()
    finally:
        elsewhere.stop()
    assert (elsewhere.accepted, elsewhere.requests) == (0, [])
    assert (type(info.value), info.value.status, info.value.message) == (
        OllamaError, 307, f"Ollama at {fake_ollama.url} answered 307 (a redirect) to {method} {path}; "
                          "redirects are never followed")
    assert "SECRETQUERY" not in info.value.hint
    assert len(fake_ollama.requests_to(path)) == 1


@pytest.mark.timeout(60)
def test_a_redirect_with_a_body_without_end_is_refused_unread(fake_ollama):
    """A 307 whose body never ends is refused at once, without reading the body (requests would read
    it whole to prepare the next request) and long before the deadline."""
    fake_ollama.hostile["/api/chat"] = "redirect"
    fake_ollama.redirect_to, fake_ollama.redirect_endless = "http://127.0.0.1:9/api/chat", True
    fake_ollama.endless_chunk_bytes, fake_ollama.endless_pause_s = 16 * 1024, 0.01
    with OllamaClient(fake_ollama.config(read_timeout_s=30.0), env={}) as c:
        with pytest.raises(OllamaError) as info:
            _calls(c)["chat"]()
        wait_for(lambda: fake_ollama.open_connections() == 0, timeout=5, message="the connection closed")
    assert (info.value.status, info.value.message) == (
        307, f"Ollama at {fake_ollama.url} answered 307 (a redirect) to POST /api/chat; redirects are never followed")


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(("call", "path", "body", "message"), [
    ("version", "/api/version", DEEP, "Ollama answered GET /api/version with a body that is JSON nested too "
                                      "deeply to read"),
    ("show", "/api/show", DEEP, "Ollama answered POST /api/show with a body that is JSON nested too deeply to read"),
    ("create", "/api/create", DEEP + b"\n", "Ollama sent a line that is JSON nested too deeply to read in the "
                                            "POST /api/create stream"),
    ("chat", "/api/chat", b"[" + b"{}," * 100_000 + b"{}]",
     "Ollama answered POST /api/chat with a body that holds more than 100,000 '{' and '[' (JSON objects and "
     "lists)"),
])
def test_deeply_nested_or_container_heavy_json_is_a_clear_error(fake_ollama, call, path, body, message):
    """JSON nested 100,000 deep (or holding more than 100,000 objects and lists) is an OllamaError that
    names the call, not a RecursionError or an answer parsed at many times its size."""
    fake_ollama.hostile[path] = "body"
    fake_ollama.hostile_bodies[path] = body
    with OllamaClient(fake_ollama.config(), env={}) as c:
        with pytest.raises(OllamaError) as info:
            _calls(c)[call]()
    assert (type(info.value), info.value.status, info.value.message) == (OllamaError, 200, message)


@pytest.mark.parametrize(("call", "path", "body", "problem"), [
    ("version", "/api/version", {"version": {"major": 0}}, "'version' is an object, not a string"),
    ("tags", "/api/tags", {"models": "llama3.2:1b"}, "'models' is a string, not a list or null"),
    ("tags", "/api/tags", {"models": ["llama3.2:1b", 7]}, "models[0] is a string, not an object"),
    ("tags", "/api/tags", {"models": [{"name": "a:1b", "digest": 5}]}, "models[0]['digest'] is a number, not a string"),
    ("show", "/api/show", {"details": "gguf", "modelfile": "FROM x"}, "'details' is a string, not an object"),
    ("show", "/api/show", {"modelfile": ["FROM x"]}, "'modelfile' is a list, not a string"),
    ("chat", "/api/chat", {"message": "rating 1"}, "'message' is a string, not an object"),
    ("chat", "/api/chat", {"message": {"content": 1}}, "message['content'] is a number, not a string"),
    ("chat", "/api/chat", [{"message": {}}], "the answer is a list, not an object"),
])
def test_an_answer_of_the_wrong_shape_names_the_call(fake_ollama, call, path, body, problem):
    """A JSON answer whose keys the caller uses have the wrong type is an OllamaError naming the call
    and the key, never a TypeError or AttributeError later."""
    fake_ollama.hostile[path] = "body"
    fake_ollama.hostile_bodies[path] = json.dumps(body).encode()
    method = "GET" if call in ("version", "tags") else "POST"
    with OllamaClient(fake_ollama.config(), env={}) as c:
        calls = {**_calls(c), "tags": c.list_models}
        with pytest.raises(OllamaError) as info:
            calls[call]()
    assert (type(info.value), info.value.status, info.value.message) == (
        OllamaError, 200, f"Ollama answered {method} {path} with unexpected JSON ({problem})")


@pytest.mark.parametrize(("line", "problem"), [(b'["pulling"]\n', "the line is a list, not an object"),
                                               (b'{"status": 5}\n', "'status' is a number, not a string")])
def test_a_create_status_line_of_the_wrong_shape_names_the_stream(fake_ollama, line, problem):
    """A create status line that is not an object with a string status is an OllamaError naming the stream."""
    fake_ollama.hostile["/api/create"] = "body"
    fake_ollama.hostile_bodies["/api/create"] = b'{"status": "pulling manifest"}\n' + line
    with OllamaClient(fake_ollama.config(), env={}) as c:
        with pytest.raises(OllamaError) as info:
            c.create("f:v1", from_="llama3.2:1b")
    assert (type(info.value), info.value.status, info.value.message) == (
        OllamaError, 200, f"Ollama sent unexpected JSON in the POST /api/create stream ({problem})")


def test_an_error_answer_is_read_only_in_part(fake_ollama):
    """Of an error answer only the first 64 KiB are read for the server's error text: a 500 whose
    4 MiB body holds its error text at the end ends with the status and no text."""
    fake_ollama.hostile["/api/show"] = "body"
    fake_ollama.hostile_status["/api/show"] = 500
    fake_ollama.hostile_bodies["/api/show"] = b" " * (4 * MiB) + b'{"error": "the real reason"}'
    with OllamaClient(fake_ollama.config(retries=0), env={}) as c:
        with pytest.raises(OllamaError) as info:
            c.show("llama3.2:1b")
    assert (info.value.status, info.value.server_error, info.value.message) == (
        500, "", "Ollama answered 500 to POST /api/show: ")


def test_a_head_answer_announcing_a_large_body_is_not_refused(fake_ollama):
    """HEAD has no body: a Content-Length above the cap on a blob's HEAD answer is no error."""
    digest = "sha256:" + "ab" * 32
    fake_ollama.hostile[f"/api/blobs/{digest}"] = "body"
    fake_ollama.hostile_bodies[f"/api/blobs/{digest}"] = b"x" * (2 * MiB)
    with OllamaClient(fake_ollama.config(max_response_bytes=MiB), env={}) as c:
        assert c.blob_exists(digest) is True
