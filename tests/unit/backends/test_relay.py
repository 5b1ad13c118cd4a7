"""RelayReply over canned upstream bytes: model rewrite, usage, the gateway's hidden usage chunk, reasoning
stripping, and the llama.cpp reasoning repairs."""
import orjson
import pytest

from backends.base import AgentRules, BackendRequest
from backends.errors import BackendProtocolError
from backends.llamacpp import fix_reasoning, fix_reasoning_stream
from backends.openai_compat import RelayReply


class Upstream:
    status = 200
    headers: dict = {}

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces, self.closed = pieces, False

    async def read(self) -> bytes:
        return b"".join(self.pieces)

    async def iter_bytes(self):
        for piece in self.pieces:
            yield piece

    async def aclose(self) -> None:
        self.closed = True


def event(doc: dict) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def request(**fields) -> BackendRequest:
    values = dict(path="/v1/chat/completions", body={}, model="asked", route="r", adapter=None, thinking=True,
                  stream=True)
    return BackendRequest(**{**values, **fields})


STREAM = (event({"model": "up", "choices": [{"index": 0, "delta": {"reasoning_content": "hm", "content": "a"}}]})
          + event({"model": "up", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
          + b"data: [DONE]\n\n")


async def relay(pieces, req, **hooks) -> bytes:
    reply = RelayReply(Upstream(pieces), req, backend="b", **hooks)
    return b"".join([block async for block in reply.events()]), reply


@pytest.mark.parametrize("split", [1, 7, 50, len(STREAM)])
async def test_stream_is_relayed_whatever_the_tcp_split(split):
    pieces = [STREAM[i:i + split] for i in range(0, len(STREAM), split)]
    text, reply = await relay(pieces, request())
    assert text == STREAM.replace(b'"model":"up"', b'"model":"asked"')
    assert reply.usage == {"prompt_tokens": 3, "completion_tokens": 1}


async def test_hidden_usage_chunk_is_counted_not_sent():
    text, reply = await relay([STREAM], request(hide_usage_chunk=True))
    assert b'"usage"' not in text and text.endswith(b"data: [DONE]\n\n") and reply.usage["completion_tokens"] == 1


async def test_strip_reasoning_keeps_valid_json():
    text, _ = await relay([STREAM], request(rules=AgentRules(strip_reasoning=True)))
    first = orjson.loads(text.split(b"\n\n")[0][6:])
    assert first["choices"][0]["delta"] == {"content": "a"}


async def test_stream_without_done_is_a_protocol_error():
    with pytest.raises(BackendProtocolError):
        await relay([STREAM[:40]], request())


def test_llamacpp_thinking_off_answer_moves_to_content():
    doc = {"choices": [{"message": {"content": "", "reasoning_content": "answer"}}]}
    fix_reasoning(doc, request(thinking=False))
    assert doc["choices"][0]["message"] == {"content": "answer"}
    raw = {"choices": [{"message": {"content": "<think>why</think> answer"}}]}
    fix_reasoning(raw, request())
    assert raw["choices"][0]["message"] == {"content": "answer", "reasoning_content": "why"}
    assert fix_reasoning_stream(b'{"reasoning_content":"x"}', request(thinking=False)) == b'{"content":"x"}'
