"""Tests for daemon/serving/openai.py and the OpenAI rater against the strict loopback fake: the
request's shape, the API key, retries (429 with Retry-After, 5xx, dropped connections), the errors
that end a call at once, and requests really in flight together."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from structlog.testing import capture_logs

from daemon.errors import OpenAIError, TrainingInterruptedError
from daemon.quality.backends import OpenAIRater, RaterError
from daemon.serving.openai import OpenAIClient, retry_after_s
from tests.fake_openai import FakeOpenAI, Reply

SCHEMA = {"type": "object",
          "properties": {"rating": {"type": "integer", "enum": [1, 0, -1]}, "rationale": {"type": "string"}},
          "required": ["rating", "rationale"], "additionalProperties": False}
MESSAGES = [{"role": "system", "content": "Rate the visit."}, {"role": "user", "content": "cough and fever"}]
KEY = "sk-test-ZZSECRETKEY0123456789"
MARKER = "ZZPATIENTMARKER"
CHAT = "/chat/completions"


def _ok(content: str = '{"rating": 1, "rationale": "r"}') -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "served-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


@pytest.fixture
def client(fake_openai):
    with OpenAIClient(fake_openai.config(), env={}) as c:
        yield c


# --- the request and its answer -----------------------------------------------------------------

def test_chat_sends_the_schema_as_response_format_at_temperature_0_with_the_seed(client, fake_openai):
    """chat() posts the model, the messages, temperature 0, the seed and the schema as a strict
    json_schema response format to {base_url}/chat/completions, and returns choices[0].message.content."""
    answer = client.chat("served-model", MESSAGES, schema=SCHEMA, seed=7)
    assert json.loads(answer) == {"rating": 1, "rationale": "scripted rationale from the fake Ollama server"}
    (req,) = fake_openai.requests_to(CHAT)
    assert (req.method, req.body) == ("POST", {
        "model": "served-model", "messages": MESSAGES, "temperature": 0, "seed": 7,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "rating", "strict": True, "schema": SCHEMA}}})
    assert ("Authorization" in req.headers, req.headers["Content-Type"]) == (False, "application/json")


def test_extra_keys_are_merged_into_the_body(client, fake_openai):
    """extra (llama.cpp's per-request LoRA list, for instance) goes into the body beside the usual keys."""
    fake_openai.lora_adapters = [{"id": 0, "path": "/models/adapter.gguf", "scale": 1.0}]  # a llama.cpp server
    client.chat("served-model", MESSAGES, extra={"lora": [{"id": 0, "scale": 1.0}]})
    (req,) = fake_openai.requests_to(CHAT)
    assert req.body == {"model": "served-model", "messages": MESSAGES, "temperature": 0, "seed": 42,
                        "lora": [{"id": 0, "scale": 1.0}]}


def test_a_null_content_is_none(client, fake_openai):
    """An answer whose message has content null (a refusal, a tool call) is None, not an error."""
    fake_openai.script(CHAT, Reply(body=_ok(None)))
    assert client.chat("served-model", MESSAGES) is None


def test_list_models_and_whether_a_model_is_served(client, fake_openai):
    """list_models() gives GET /models' ids; serving_problem says why a name is not served."""
    assert client.list_models() == ["served-model", "llama3.2:1b"]
    assert client.serving_problem("served-model") is None
    assert client.serving_problem("gemma3:270m") == (
        f"the server at {fake_openai.url} does not list the model 'gemma3:270m' (it lists 'served-model', "
        "'llama3.2:1b'); set openai.model to the name it serves the model under")


def test_unset_base_url_is_a_clear_error():
    """A client without openai.base_url is one OpenAIError saying which setting to fill in."""
    from daemon.config import OpenAIConfig

    with pytest.raises(OpenAIError) as info:
        OpenAIClient(OpenAIConfig(), env={})
    assert str(info.value) == ("openai.base_url is not set (set openai.base_url (or FINE_TUNER_OPENAI__BASE_URL) to "
                               "the server's API address, e.g. http://127.0.0.1:8080/v1)")


# --- the API key --------------------------------------------------------------------------------

def test_the_key_is_read_from_the_named_variable_and_sent_as_bearer():
    """openai.api_key_env names the variable; its value goes out as Authorization: Bearer and the
    server that checks it answers."""
    fake = FakeOpenAI(api_key=KEY)
    fake.start()
    try:
        with OpenAIClient(fake.config(api_key_env="FT_OPENAI_KEY"), env={"FT_OPENAI_KEY": KEY}) as c:
            assert c.list_models() == ["served-model"]
            c.chat("served-model", MESSAGES)
    finally:
        fake.stop()
    assert [r.headers["Authorization"] for r in fake.requests] == [f"Bearer {KEY}", f"Bearer {KEY}"]


def test_a_refused_key_fails_at_once_with_one_line_that_never_holds_the_key():
    """A 401 to a wrong key is not retried: one OpenAIError naming the variable to fix; neither the
    message, the error's fields nor the log lines hold the key."""
    fake = FakeOpenAI(api_key=KEY)
    fake.start()
    wrong = "sk-wrong-ZZOTHERSECRET"
    try:
        with capture_logs() as logs, OpenAIClient(fake.config(api_key_env="FT_OPENAI_KEY"),
                                                  env={"FT_OPENAI_KEY": wrong}) as c:
            with pytest.raises(OpenAIError) as info:
                c.chat("served-model", MESSAGES)
    finally:
        fake.stop()
    assert len(fake.requests) == 1
    assert (info.value.status, str(info.value)) == (401, (
        f"POST {fake.url}/chat/completions: the OpenAI-compatible server refused the API key (401) (set the "
        "server's API key in $FT_OPENAI_KEY (the variable openai.api_key_env names))"))
    assert "\n" not in str(info.value)
    text = str(info.value) + json.dumps(info.value.to_dict()) + json.dumps(logs, default=str)
    assert (wrong in text, KEY in text) == (False, False)


def test_no_key_sent_to_a_server_that_wants_one_says_to_set_api_key_env():
    """A 401 when no key is configured says to set openai.api_key_env."""
    fake = FakeOpenAI(api_key=KEY)
    fake.start()
    try:
        with OpenAIClient(fake.config(), env={"FT_OPENAI_KEY": KEY}) as c:
            with pytest.raises(OpenAIError) as info:
                c.list_models()
    finally:
        fake.stop()
    assert (len(fake.requests), str(info.value)) == (1, (
        f"GET {fake.url}/models: the OpenAI-compatible server asks for an API key and none was sent (401) (set "
        "openai.api_key_env to the name of an environment variable that holds the server's API key)"))


def test_a_key_variable_that_is_not_set_is_named():
    """openai.api_key_env naming a variable the environment lacks fails before any request."""
    from daemon.config import OpenAIConfig

    with pytest.raises(OpenAIError) as info:
        OpenAIClient(OpenAIConfig(base_url="http://127.0.0.1:9/v1", api_key_env="FT_OPENAI_KEY"), env={})
    assert info.value.message == ("openai.api_key_env names the environment variable FT_OPENAI_KEY, "
                                  "which is not set or empty")


# --- retries --------------------------------------------------------------------------------------

def test_retry_after_in_seconds_an_http_date_and_milliseconds():
    """Retry-After as seconds or an HTTP date and OpenAI's retry-after-ms give the wait, capped;
    an unreadable value gives None (the backoff applies)."""
    now = datetime(2026, 12, 3, 12, 0, 0, tzinfo=timezone.utc)
    date = format_datetime(now + timedelta(seconds=7), usegmt=True)
    past = format_datetime(now - timedelta(seconds=7), usegmt=True)
    cases = [{"Retry-After": "3"}, {"Retry-After": "0.5"}, {"Retry-After": "120"}, {"Retry-After": date},
             {"Retry-After": past}, {"Retry-After": "soon"}, {"retry-after-ms": "1500", "Retry-After": "9"}, {}]
    assert [retry_after_s(h, 30.0, now=now) for h in cases] == [3.0, 0.5, 30.0, 7.0, 0.0, None, 1.5, None]


@pytest.mark.timeout(60)
def test_429_then_200_succeeds_after_the_retry_after_time(fake_openai):
    """A 429 with Retry-After: 1 is asked again no sooner than 1 s later, and the answer is used."""
    fake_openai.script(CHAT, Reply(429, {"Retry-After": "1"}, {"error": {"message": "Rate limit reached",
                                                                         "type": "requests", "code": None}}))
    with OpenAIClient(fake_openai.config(backoff_max_s=5.0), env={}) as c:
        assert c.chat("served-model", MESSAGES) == "a scripted answer from the fake OpenAI-compatible server"
    first, second = fake_openai.requests_to(CHAT)
    assert second.at - first.at >= 1.0


@pytest.mark.timeout(60)
def test_a_retry_after_date_is_waited_for(fake_openai):
    """Retry-After as an HTTP date two seconds ahead (one-second resolution) waits at least a second."""
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=2), usegmt=True)
    fake_openai.script(CHAT, Reply(429, {"Retry-After": when}))
    with OpenAIClient(fake_openai.config(backoff_max_s=5.0), env={}) as c:
        c.chat("served-model", MESSAGES)
    first, second = fake_openai.requests_to(CHAT)
    assert second.at - first.at >= 1.0


def test_429_counts_against_retries(fake_openai):
    """With retries 2, three 429s end the call: one line with the attempts and what to change."""
    fake_openai.script(CHAT, *[Reply(429, {"Retry-After": "0"})] * 3)
    with OpenAIClient(fake_openai.config(retries=2), env={}) as c:
        with pytest.raises(OpenAIError) as info:
            c.chat("served-model", MESSAGES)
    assert len(fake_openai.requests_to(CHAT)) == 3
    assert (info.value.status, str(info.value)) == (429, (
        f"POST {fake_openai.url}/chat/completions (3 attempts): the OpenAI-compatible server answered 429 (too "
        "many requests) (the server is rate-limited or overloaded: lower openai.parallel, or raise "
        "openai.retries or openai.backoff_max_s)"))


def test_5xx_is_retried_then_a_clear_error(fake_openai):
    """500s are asked again with backoff; when every attempt fails the error says so in one line."""
    fake_openai.script(CHAT, *[Reply(500, body=b"upstream failed")] * 3)
    with capture_logs() as logs, OpenAIClient(fake_openai.config(retries=2), env={}) as c:
        with pytest.raises(OpenAIError) as info:
            c.chat("served-model", MESSAGES)
    assert len(fake_openai.requests_to(CHAT)) == 3
    assert (info.value.status, str(info.value)) == (500, (
        f"POST {fake_openai.url}/chat/completions (3 attempts): the OpenAI-compatible server failed (500) (the "
        "server failed: read its log, then run again)"))
    assert [(e["event"], e["attempt"], e["delay_s"]) for e in logs if e["event"] == "openai_retry"] == [
        ("openai_retry", 1, 0.01), ("openai_retry", 2, 0.02)]


def test_a_503_then_an_answer_succeeds(client, fake_openai):
    """One 503 (a server still loading its model) is retried and the next answer used."""
    fake_openai.script(CHAT, Reply(503, body={"error": {"code": 503, "message": "Loading model",
                                                        "type": "unavailable_error"}}))
    assert client.chat("served-model", MESSAGES, schema=SCHEMA) == json.dumps(
        {"rating": 1, "rationale": "scripted rationale from the fake Ollama server"})
    assert len(fake_openai.requests_to(CHAT)) == 2


def test_a_connection_closed_early_is_retried(client, fake_openai):
    """A connection closed before the answer, then one closed half-way through the body, are both
    asked again; the third answer is used."""
    fake_openai.script(CHAT, Reply(close="before"), Reply(body=_ok(), close="midway"))
    assert client.chat("served-model", MESSAGES) == "a scripted answer from the fake OpenAI-compatible server"
    assert len(fake_openai.requests_to(CHAT)) == 3


def test_a_server_that_always_closes_early_is_a_clear_error(fake_openai):
    """Every attempt cut short: one line saying the server closed the connection."""
    fake_openai.script(CHAT, *[Reply(body=_ok(), close="midway")] * 2)
    with OpenAIClient(fake_openai.config(retries=1), env={}) as c:
        with pytest.raises(OpenAIError) as info:
            c.chat("served-model", MESSAGES)
    assert (info.value.status, str(info.value)) == (None, (
        f"POST {fake_openai.url}/chat/completions (2 attempts): the OpenAI-compatible server closed the connection "
        "before a complete answer (the server may have crashed or restarted: read its log, then run again)"))


def test_a_server_that_is_down_refuses_the_connection(fake_openai):
    """No server listening: retried, then one line saying so and what to do."""
    fake_openai.stop()
    with OpenAIClient(fake_openai.config(retries=1), env={}) as c:
        with pytest.raises(OpenAIError) as info:
            c.list_models()
    assert str(info.value) == (
        f"GET {fake_openai.url}/models (2 attempts): the OpenAI-compatible server refused the connection (start the "
        "server and check that it listens at openai.base_url)")


@pytest.mark.timeout(60)
def test_a_silent_server_ends_at_the_deadline(fake_openai):
    """An answer that does not come within connect + read timeout ends the call, not retried."""
    fake_openai.delay_s = 5.0
    with OpenAIClient(fake_openai.config(connect_timeout_s=0.5, read_timeout_s=0.5), env={}) as c:
        with pytest.raises(OpenAIError) as info:
            c.chat("served-model", MESSAGES)
    assert (len(fake_openai.requests_to(CHAT)), info.value.message) == (1, (
        f"POST {fake_openai.url}/chat/completions: the OpenAI-compatible server did not answer completely within 1 s"))


# --- errors that end a call at once ---------------------------------------------------------------

def test_an_unknown_model_is_named_with_what_to_check(client, fake_openai):
    """A 404 for the model names it and says to check openai.model against GET /models; not retried."""
    with pytest.raises(OpenAIError) as info:
        client.chat("gemma3:270m", MESSAGES)
    assert len(fake_openai.requests_to(CHAT)) == 1
    assert (info.value.status, info.value.message, info.value.hint) == (
        404, f"POST {fake_openai.url}/chat/completions: the OpenAI-compatible server does not serve the model "
             "'gemma3:270m' (404)",
        f"check openai.model (unset: the base model's name is asked for) against the names GET {fake_openai.url}"
        "/models lists, and that openai.base_url ends with the API's prefix (usually /v1)")


def test_a_refused_request_gives_the_status_only_never_the_servers_text(client, fake_openai):
    """A 400 whose error text repeats the record is reported by its status only: no record text."""
    bad = [{"role": "patient", "content": f"chest pain {MARKER}"}]
    with pytest.raises(OpenAIError) as info:
        client.chat("served-model", bad)
    assert MARKER.encode() in fake_openai.requests_to(CHAT)[0].raw  # the fake did echo it...
    assert (info.value.status, info.value.message) == (  # ...and the error does not
        400, f"POST {fake_openai.url}/chat/completions: the OpenAI-compatible server refused the request (400; its "
             "error text is not shown, as it may repeat the records)")
    assert MARKER not in str(info.value) + json.dumps(info.value.to_dict())


def test_an_answer_over_the_cap_is_refused(fake_openai):
    """An answer larger than openai.max_response_bytes is an error naming the setting, not retried."""
    body = json.dumps(_ok("x" * 4000)).encode()
    fake_openai.script(CHAT, Reply(body=body))
    with OpenAIClient(fake_openai.config(max_response_bytes=1024), env={}) as c:
        with pytest.raises(OpenAIError) as info:
            c.chat("served-model", MESSAGES)
    assert len(fake_openai.requests_to(CHAT)) == 1
    assert (info.value.status, str(info.value)) == (200, (
        f"POST {fake_openai.url}/chat/completions: the OpenAI-compatible server announced an answer of {len(body)} "
        "bytes, more than openai.max_response_bytes (1024); it was not read (check that openai.base_url is an "
        "OpenAI-compatible server (a rating's answer is a few KB), or raise openai.max_response_bytes)"))


def test_a_redirect_is_never_followed(client, fake_openai):
    """A 307 to another server sends nothing there: an error naming the status, not retried."""
    elsewhere = FakeOpenAI()
    elsewhere.start()
    try:
        fake_openai.script(CHAT, Reply(307, {"Location": f"{elsewhere.url}/chat/completions"}))
        with pytest.raises(OpenAIError) as info:
            client.chat("served-model", MESSAGES)
    finally:
        elsewhere.stop()
    assert (elsewhere.accepted, len(fake_openai.requests_to(CHAT))) == (0, 1)
    assert (info.value.status, info.value.message) == (
        307, f"POST {fake_openai.url}/chat/completions: the OpenAI-compatible server answered 307 (a redirect), "
             "which is never followed")


@pytest.mark.parametrize(("body", "problem"), [
    (b"<html>not json</html>", "answered with a body that is not JSON"),
    ({"choices": []}, "answered with unexpected JSON ('choices' is an empty list)"),
    ({"choices": [{"message": "hi"}]}, "answered with unexpected JSON (choices[0]['message'] is a string, not an "
                                       "object)"),
    ({"object": "chat.completion"}, "answered with unexpected JSON (no 'choices')"),
])
def test_an_answer_that_is_not_a_chat_completion_is_named(client, fake_openai, body, problem):
    """A body that is not JSON, or not a chat completion, is one error naming what is wrong."""
    fake_openai.script(CHAT, Reply(body=body))
    with pytest.raises(OpenAIError) as info:
        client.chat("served-model", MESSAGES)
    assert info.value.message == f"POST {fake_openai.url}/chat/completions: the OpenAI-compatible server {problem}"


# --- the rater ------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_the_rater_keeps_parallel_requests_in_flight(fake_openai):
    """OpenAIRater with parallel 4 has four chats in flight at once (the fake answers none before
    four arrived together), never more; answers come back in input order with progress."""
    fake_openai.gate = 4
    fake_openai.responder = lambda model, messages, body: messages[-1]["content"]
    shared = [{"role": "system", "content": "Rate the visit."}]
    conversations = [[*shared, {"role": "user", "content": f"record {i}"}] for i in range(12)]
    progress = []
    answers = OpenAIRater(fake_openai.config(parallel=4), schema=SCHEMA).answer(
        "served-model", conversations, on_progress=lambda d, t: progress.append((d, t)))
    assert [a.text for a in answers] == [f"record {i}" for i in range(12)]
    assert fake_openai.peak_in_flight == 4
    assert progress == [(d, 12) for d in range(1, 13)]
    assert fake_openai.accepted == 4  # one kept-alive connection per worker thread


def test_the_rater_turns_a_failure_into_one_rater_error_line(fake_openai):
    """A server error ends the rater with one RaterError line naming the model and what to do."""
    fake_openai.script(CHAT, *[Reply(500)] * 3)
    with pytest.raises(RaterError) as info:
        OpenAIRater(fake_openai.config(parallel=1, retries=2)).answer("served-model", [MESSAGES])
    assert str(info.value) == (
        f"the OpenAI-compatible server could not answer for served-model: POST {fake_openai.url}/chat/completions "
        "(3 attempts): the OpenAI-compatible server failed (500) (the server failed: read its log, then run again)")


def test_a_stopped_rater_asks_nothing_more(fake_openai):
    """With the stop event set, the rater raises TrainingInterruptedError before any request."""
    stop = threading.Event()
    stop.set()
    with pytest.raises(TrainingInterruptedError):
        OpenAIRater(fake_openai.config()).answer("served-model", [MESSAGES] * 3, stop_event=stop)
    assert fake_openai.requests_to(CHAT) == []
