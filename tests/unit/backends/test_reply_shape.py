"""OpenAI-exact replies over canned backend bytes: one id and one `created` per stream, completion-id
prefixes, no build details, the fields OpenAI always sends; every result checked against OpenAI's schemas."""
import re

import orjson
import pytest

from backends.base import BackendRequest
from backends.openai_compat import OpenAICompatDriver, RelayReply
from backends.reply_shape import ReplyShape, fingerprint
from tests.openai_spec import assert_conforms
from tests.unit.backends.test_relay import Upstream

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
TIMINGS = {"cache_n": 0, "prompt_n": 5, "prompt_ms": 1.5, "predicted_n": 2, "predicted_per_second": 900.1}


def event(doc: dict) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def request(path: str = CHAT, stream: bool = True) -> BackendRequest:
    return BackendRequest(path=path, body={}, model="asked", route="r", adapter=None, thinking=True, stream=stream,
                          request_id="req-1")


def llama_chunk(created: int, delta: dict, finish=None, **extra) -> dict:
    """llama.cpp's chunk: keys sorted, `created` stamped per chunk, its build as system_fingerprint."""
    return {"choices": [{"finish_reason": finish, "index": 0, "delta": delta}], "created": created,
            "id": "chatcmpl-LLAMA", "model": "tiny.gguf", "object": "chat.completion.chunk",
            "system_fingerprint": "b1-0c1e570", **extra}


LLAMA_STREAM = (event(llama_chunk(100, {"role": "assistant", "content": None}))
                + event(llama_chunk(100, {"tool_calls": [{"index": 0, "id": "Xk2fT9", "type": "function",
                                                          "function": {"name": "f", "arguments": "{}"}}]}))
                + event(llama_chunk(101, {"content": " hi"}))
                + event(llama_chunk(102, {}, "tool_calls"))  # timings ride on the last chunk: usage, as asked
                + event({"choices": [], "created": 102, "id": "chatcmpl-LLAMA", "model": "tiny.gguf",
                         "object": "chat.completion.chunk", "system_fingerprint": "b1-0c1e570",
                         "usage": {"completion_tokens": 2, "prompt_tokens": 5, "total_tokens": 7},
                         "timings": TIMINGS})
                + b"data: [DONE]\n\n")
# SGLang with n = 2 gives each choice its own id (one sub-request per choice).
SGLANG_N2 = b"".join(event({"id": f"chatcmpl-{index}aa", "object": "chat.completion.chunk", "created": 100 + index,
                            "model": "kimi", "choices": [{"index": index, "delta": {"content": "x"}, "logprobs": None,
                                                          "finish_reason": None, "matched_stop": None}]})
                     for index in (0, 1, 0, 1)) + b"data: [DONE]\n\n"


async def relayed(raw: bytes, req: BackendRequest, split: int) -> list[dict]:
    pieces = [raw[i:i + split] for i in range(0, len(raw), split)]
    reply = RelayReply(Upstream(pieces), req, backend="b")
    text = b"".join([block async for block in reply.events()])
    assert text.endswith(b"data: [DONE]\n\n")
    assert b"timings" not in text and b"b1-0c1e570" not in text
    return [orjson.loads(e[6:]) for e in text.split(b"\n\n") if e.startswith(b"data: {")]


@pytest.mark.parametrize("raw", [LLAMA_STREAM, SGLANG_N2], ids=["llama", "sglang-n2"])
@pytest.mark.parametrize("split", [9, 64, 100_000])
async def test_a_stream_has_one_id_and_one_created(raw, split):
    chunks = await relayed(raw, request(), split)
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", chunks[0]["id"])
    for chunk in chunks:
        assert chunk["model"] == "asked"
        assert_conforms("CreateChatCompletionStreamResponse", chunk)


async def test_tool_call_ids_and_fingerprint_are_kept_apart():
    chunks = await relayed(LLAMA_STREAM, request(), 100_000)
    assert chunks[1]["choices"][0]["delta"]["tool_calls"][0]["id"] == "Xk2fT9"
    assert {c["system_fingerprint"] for c in chunks} == {fingerprint("b1-0c1e570")}
    assert re.fullmatch(r"fp_[0-9a-f]{10}", fingerprint("b1-0c1e570"))
    assert chunks[-1]["usage"]["total_tokens"] == 7


async def test_completion_stream_ids_say_cmpl():
    raw = b"".join(event({"choices": [{"text": t, "index": 0, "logprobs": None, "finish_reason": f}],
                          "created": 100 + i, "id": "chatcmpl-LLAMA", "model": "tiny.gguf",
                          "object": "text_completion", "system_fingerprint": "b1-0c1e570"})
                   for i, (t, f) in enumerate([(" a", None), (" b", "length")])) + b"data: [DONE]\n\n"
    chunks = await relayed(raw, request(COMPLETIONS), 100_000)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    for chunk in chunks:
        assert_conforms("CreateCompletionResponse", chunk, streamed=True)


async def test_whole_chat_reply_gets_what_openai_always_sends():
    """SGLang's shape: `tool_calls: null`, no refusal, its `metadata.weight_version`."""
    doc = {"id": "chatcmpl-9", "object": "chat.completion", "created": 5, "model": "kimi",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", "reasoning_content": "r",
                                                "tool_calls": None},
                        "finish_reason": "stop", "matched_stop": 163586}],
           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
           "metadata": {"weight_version": "default"}, "timings": TIMINGS, "system_fingerprint": "b1-0c1e570"}
    reply = RelayReply(Upstream([orjson.dumps(doc)]), request(stream=False), backend="b")
    out = orjson.loads(await reply.read())
    assert_conforms("CreateChatCompletionResponse", out)
    message = out["choices"][0]["message"]
    assert message["refusal"] is None and "tool_calls" not in message and message["reasoning_content"] == "r"
    assert out["choices"][0]["logprobs"] is None
    assert not {"metadata", "timings"} & out.keys() and out["system_fingerprint"] == fingerprint("b1-0c1e570")
    assert out["id"] == reply.shape.id and out["created"] == reply.shape.created


async def test_whole_completion_reply_id_says_cmpl():
    doc = {"id": "chatcmpl-LLAMA", "object": "text_completion", "created": 5, "model": "tiny.gguf",
           "choices": [{"text": " a", "index": 0, "finish_reason": "length"}]}
    out = orjson.loads(await RelayReply(Upstream([orjson.dumps(doc)]), request(COMPLETIONS, False), backend="b").read())
    assert_conforms("CreateCompletionResponse", out)
    assert out["id"].startswith("cmpl-") and out["choices"][0]["logprobs"] is None


def test_timings_anywhere_in_a_usage_event_leaves_valid_json():
    shape = ReplyShape(CHAT, 7)
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2, "prompt_tokens_details": None}
    for doc in ({"timings": TIMINGS, "id": "chatcmpl-1", "choices": [], "usage": usage},
                {"id": "chatcmpl-1", "usage": usage, "timings": TIMINGS},
                {"choices": [], "timings": TIMINGS, "usage": {"prompt_tokens_details": None, "total_tokens": 2}}):
        out = orjson.loads(shape.usage_block(shape.block(event(doc)))[6:])
        assert "timings" not in out and out.get("id", shape.id) == shape.id
        assert "prompt_tokens_details" not in out["usage"]


def test_backend_requests_carry_the_request_id():
    driver = OpenAICompatDriver("b", [], vision=False)
    assert driver.request_headers(request()) == {"x-request-id": "req-1"}
    driver.headers = lambda: {"authorization": "Bearer k"}
    assert driver.request_headers(request()) == {"authorization": "Bearer k", "x-request-id": "req-1"}


def test_backend_requests_carry_the_trace_context():
    driver = OpenAICompatDriver("b", [], vision=False)
    traced = request()
    traced.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert driver.request_headers(traced) == {"x-request-id": "req-1", "traceparent": traced.traceparent}
    traced.request_id = ""
    assert driver.request_headers(traced) == {"traceparent": traced.traceparent}


@pytest.mark.parametrize("event, expected", [
    # SGLang: unset fields as null, removed (OpenAI never sends usage/tool_calls/role as null in a chunk)
    (b'data: {"choices":[{"delta":{"role":null,"content":"a","tool_calls":null},"finish_reason":null}],'
     b'"usage":null}\n\n',
     b'data: {"choices":[{"delta":{"content":"a"},"finish_reason":null}]}\n\n'),
    (b'data: {"choices":[{"delta":{"role": null, "content":"a"}}], "usage": null}\n\n',
     b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'),
    # llama.cpp: finish_reason null on every token is OpenAI's own shape and stays as it is
    (b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" w"}}],"object":"x"}\n\n',
     b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" w"}}],"object":"x"}\n\n'),
])
def test_null_only_fields_go_and_finish_reason_null_stays(event, expected):
    assert ReplyShape("/v1/chat/completions", 1).block(event) == expected


# SameField: the bytes.replace fast path must give exactly what the regex gives, block after block.
SAME_FIELD_BLOCKS = [
    b'data: {"id":"chatcmpl-A","created":17,"model":"up","x":1}\n\n',
    b'data: {"id":"chatcmpl-A","created":17,"model":"up"}\n\ndata: {"id":"chatcmpl-A","created":17,"model":"up"}\n\n',
    b'data: {"id":"chatcmpl-B","created":170,"model":"up2"}\n\n',          # another value: the regex, then cached
    b'data: {"id":"chatcmpl-B","created":1700,"model":"up2"}\n\n',         # a longer number with the same prefix
    b'data: {"id":"chatcmpl-B","created":170,"model":"up2","choices":[{"delta":{"content":"cmpl- \\"model\\": x"}}]}\n\n',
    b'data: {"id": "cmpl-C","created": 5,"model": "up\\"q","tool_calls":[{"id":"call_1"}]}\n\n',
    b'data: {"id":"chatcmpl-A","created":17,"model":"up"}\n\ndata: {"id":"chatcmpl-Z","created":18,"model":"up9"}\n\n',
    b": keep-alive\n\n",
    b'data: {"id":"chatcmpl-A","created":17}\n\n',
]


def test_same_field_rewrites_exactly_as_the_regex_does():
    from backends.openai_compat import MODEL_FIELD
    from backends.reply_shape import CREATED_FIELD, ID_FIELD, SameField
    cases = [(ID_FIELD, b"cmpl-", b'"id":"chatcmpl-OURS"', False), (CREATED_FIELD, b'"created":', b'"created":99', True),
             (MODEL_FIELD, b'"model":', b'"model":"as\\\\ked"', False)]
    for pattern, key, new, tail in cases:
        field = SameField(pattern, key, new, tail)
        for block in SAME_FIELD_BLOCKS + SAME_FIELD_BLOCKS[::-1]:
            assert field.sub(block) == pattern.sub(lambda _m: new, block), (pattern.pattern, block)


async def test_a_stream_keeps_one_id_created_and_model_through_the_fast_path():
    chunks = [event(llama_chunk(1700000000 + i // 3, {"content": f"t{i}"})) for i in range(10)]
    chunks += [event(llama_chunk(1700000009, {}, "stop")), b"data: [DONE]\n\n"]
    reply = RelayReply(Upstream(chunks), request(), backend="b")
    out = b"".join([block async for block in reply.events()])
    docs = [orjson.loads(line[6:]) for line in out.split(b"\n\n") if line.startswith(b"data: {")]
    assert len(docs) == 11
    assert {(d["id"], d["created"], d["model"]) for d in docs} == {(reply.shape.id, reply.shape.created, "asked")}



# cut_timings and cut_null_details replace these regexes' subs (which sre ran at every byte of a usage chunk).
TIMINGS_REGEX = re.compile(rb',?\s*"timings":\s*\{[^{}]*\}')
NULL_DETAILS_REGEX = re.compile(rb',?\s*"(?:prompt|completion)_tokens_details":\s*null')
CUT_PARTS = [b",", b" ", b"\n", b"\t", b'"timings":', b"{", b"}", b'"a":1', b'"prompt', b'"completion',
             b'_tokens_details":', b"null", b"nul", b"x", b'"', b",,", b'"prompt_tokens_details":', b'"timings": ',
             b'{"n":1}', b'"completion_tokens_details": ', b'"usage":{']


@pytest.mark.parametrize("seed", range(4))
def test_usage_fields_are_cut_exactly_as_the_regexes_cut_them(seed):
    import random
    from backends.reply_shape import cut_null_details, cut_timings
    rng = random.Random(seed)
    for _ in range(20_000):
        block = b"".join(rng.choice(CUT_PARTS) for _ in range(rng.randint(0, 16)))
        assert cut_timings(block) == TIMINGS_REGEX.sub(b"", block), block
        assert cut_null_details(block) == NULL_DETAILS_REGEX.sub(b"", block), block


def test_llamacpp_usage_chunk_loses_timings_and_keeps_its_details():
    raw = (b'data: {"choices":[],"created":1,"id":"chatcmpl-x","model":"m","object":"chat.completion.chunk",'
           b'"usage":{"completion_tokens":3,"prompt_tokens":9,"total_tokens":12,"prompt_tokens_details":'
           b'{"cached_tokens":0}},"timings":{"cache_n":0,"prompt_n":9,"predicted_per_second":199.7}}\n\n')
    assert ReplyShape.usage_block(raw) == TIMINGS_REGEX.sub(b"", raw) == raw.replace(
        b',"timings":{"cache_n":0,"prompt_n":9,"predicted_per_second":199.7}', b"")


def test_a_block_with_two_builds_maps_each_fingerprint_once():
    from backends.reply_shape import map_fingerprints
    one, two = b'"system_fingerprint":"b1-abc"', b'"system_fingerprint":"b2-def"'
    map_fingerprints(b"data: {" + one + b"}\n\n")   # the value seen last: mapped by bytes.replace
    out = map_fingerprints(b"data: {" + one + b"}\n\ndata: {" + two + b"}\n\n")
    assert out == (b'data: {"system_fingerprint":"' + fingerprint("b1-abc").encode() + b'"}\n\n'
                   b'data: {"system_fingerprint":"' + fingerprint("b2-def").encode() + b'"}\n\n')
