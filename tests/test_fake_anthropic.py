"""The fake Anthropic API, driven through the real SDK."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from anthropic.types import MessageParam, TextBlockParam, ToolParam, ToolUseBlock
from tests.fake_anthropic import FakeAnthropic, Reply, error, message, text, tool_use

KEY = "sk-test"
MODEL = "claude-haiku-4-5"  # the SDK warns on the older models


@pytest.fixture
def server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as fake:
        yield fake


def _client(server: FakeAnthropic, max_retries: int = 0, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=KEY, base_url=server.url, max_retries=max_retries, **kwargs)


def _tokens(part: Any) -> int:
    return math.ceil(len(json.dumps(part, sort_keys=True)) / 4)


def test_tool_use_reply_reaches_the_sdk(server: FakeAnthropic) -> None:
    weather: ToolParam = {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    content = [text("Let me look."), tool_use("get_weather", {"city": "Paris"})]

    def script(request: dict[str, Any]) -> Reply:
        return message(request, content, stop_reason="tool_use")

    server.script = script
    reply = _client(server).messages.create(
        model=MODEL,
        max_tokens=100,
        tools=[weather],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )

    assert reply.stop_reason == "tool_use"
    assert reply.model == MODEL
    block = reply.content[1]
    assert isinstance(block, ToolUseBlock)
    assert block.name == "get_weather"
    assert block.input == {"city": "Paris"}
    assert block.id.startswith("toolu_")
    # A string prompt counts as the text block it stands for.
    assert reply.usage.input_tokens == _tokens(weather) + _tokens(text("Weather in Paris?"))
    assert reply.usage.output_tokens == math.ceil(len(json.dumps(content)) / 4)
    assert reply.usage.cache_read_input_tokens == 0
    assert reply.usage.cache_creation_input_tokens == 0

    (recorded,) = server.messages_requests()
    assert recorded.headers["content-type"] == "application/json"
    assert recorded.body is not None and recorded.body["tools"] == [weather]


def test_rate_limit_is_retried(server: FakeAnthropic) -> None:
    server.queue(
        error(429, "rate_limit_error", "slow down", {"retry-after": "0"}),
        message({"model": MODEL}, [text("done")]),
    )
    reply = _client(server, max_retries=2).messages.create(
        model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.content[0].type == "text" and reply.content[0].text == "done"
    assert len(server.messages_requests()) == 2


def test_authentication_permissions_and_models(server: FakeAnthropic) -> None:
    wrong = anthropic.Anthropic(api_key="sk-wrong", base_url=server.url, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        wrong.models.retrieve(MODEL)
    request_id = denied.value.request_id
    assert request_id is not None and request_id.startswith("req_")
    assert denied.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
        "request_id": request_id,
    }

    client = _client(server)
    info = client.models.retrieve(MODEL)
    assert (info.id, info.display_name, info.type) == (MODEL, MODEL, "model")
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("claude-unknown-1")

    server.forbidden = True
    with pytest.raises(anthropic.PermissionDeniedError):
        client.models.retrieve(MODEL)
    assert [r.path for r in server.requests] == [f"/v1/models/{MODEL}"] * 2 + [
        "/v1/models/claude-unknown-1",
        f"/v1/models/{MODEL}",
    ]


def test_identical_requests_read_the_cache(server: FakeAnthropic) -> None:
    server.script = lambda request: message(request, [text("ok")])
    system: list[TextBlockParam] = [
        {
            "type": "text",
            "text": "You are a careful assistant. " * 40,
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
        }
    ]
    client = _client(server)

    def ask() -> anthropic.types.Usage:
        return client.messages.create(
            model=MODEL,
            max_tokens=10,
            system=system,
            messages=[{"role": "user", "content": "hello"}],
        ).usage

    first, second = ask(), ask()
    assert first.cache_creation_input_tokens and first.cache_creation_input_tokens > 0
    assert first.cache_read_input_tokens == 0
    assert first.cache_creation is not None
    assert first.cache_creation.ephemeral_1h_input_tokens == first.cache_creation_input_tokens
    assert first.cache_creation.ephemeral_5m_input_tokens == 0
    assert second.cache_read_input_tokens == first.cache_creation_input_tokens
    assert second.cache_creation_input_tokens == 0
    assert first.input_tokens == second.input_tokens == _tokens(text("hello"))


def test_moving_breakpoint_reads_the_earlier_prefix(server: FakeAnthropic) -> None:
    server.script = lambda request: message(request, [text("ok")])
    client = _client(server)
    cached: TextBlockParam = {
        "type": "text",
        "text": "first question " * 20,
        "cache_control": {"type": "ephemeral"},
    }
    plain: TextBlockParam = {"type": "text", "text": "first question " * 20}
    turn: list[MessageParam] = [{"role": "user", "content": [cached]}]
    first = client.messages.create(model=MODEL, max_tokens=10, messages=turn).usage

    later: TextBlockParam = {
        "type": "text",
        "text": "second question",
        "cache_control": {"type": "ephemeral"},
    }
    turns: list[MessageParam] = [
        {"role": "user", "content": [plain]},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [later]},
    ]
    second = client.messages.create(model=MODEL, max_tokens=10, messages=turns).usage

    assert first.cache_creation is not None and second.cache_creation is not None
    assert first.cache_creation.ephemeral_5m_input_tokens == first.cache_creation_input_tokens
    assert second.cache_read_input_tokens == first.cache_creation_input_tokens
    assert second.cache_creation_input_tokens == _tokens(text("an answer")) + _tokens(
        text("second question")
    )
    assert second.input_tokens == 0


def test_overloaded_without_retries(server: FakeAnthropic) -> None:
    server.queue(error(529, "overloaded_error", "Overloaded"))
    with pytest.raises(anthropic.InternalServerError) as overloaded:
        _client(server).messages.create(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert overloaded.value.status_code == 529
    assert len(server.messages_requests()) == 1


def test_slow_reply_times_out(server: FakeAnthropic) -> None:
    server.queue(Reply(body={}, delay=30.0))
    started = time.monotonic()
    with pytest.raises(anthropic.APITimeoutError):
        _client(server, timeout=0.3).messages.create(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert time.monotonic() - started < 10


def test_running_out_of_replies_is_a_server_error(server: FakeAnthropic) -> None:
    with pytest.raises(anthropic.InternalServerError, match="ran out"):
        _client(server).messages.create(
            model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
