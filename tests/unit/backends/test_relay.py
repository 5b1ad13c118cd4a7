"""RelayReply over canned upstream bytes: model rewrite, usage in every shape a backend sends it (counted,
shown only as the one chunk a client asked for), the first-event signal, reasoning stripping, and the
llama.cpp reasoning repairs."""
import orjson
import pytest

from backends.base import AgentRules, BackendRequest
from backends.errors import BackendProtocolError
from backends.llamacpp import fix_reasoning, fix_reasoning_stream
from backends.openai_compat import RelayReply, has_usage_object
from backends.reply_shape import TextTemplate


class Upstream:
    status = 200
    headers: dict = {}

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces, self.closed, self.first_event_at = pieces, False, None
        self.yielded = 0

    def first_event_received(self) -> None:
        if self.first_event_at is None:
            self.first_event_at = self.yielded

    async def read(self) -> bytes:
        return b"".join(self.pieces)

    async def iter_bytes(self):
        for piece in self.pieces:
            self.yielded += 1
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


class PieceUpstream(Upstream):
    """The lean transport's shape (UpstreamResponse.next_piece): pieces awaited one by one, no iter_bytes."""

    async def next_piece(self):
        if self.yielded == len(self.pieces):
            return None
        self.yielded += 1
        return self.pieces[self.yielded - 1]

    def iter_bytes(self):
        raise AssertionError("RelayReply reads a next_piece() upstream piece by piece")


async def relay(pieces, req, upstream=Upstream, **hooks) -> bytes:
    reply = RelayReply(upstream(pieces), req, backend="b", **hooks)
    return b"".join([block async for block in reply.events()]), reply


@pytest.mark.parametrize("upstream", [Upstream, PieceUpstream])
@pytest.mark.parametrize("split", [1, 7, 50, len(STREAM)])
async def test_stream_is_relayed_whatever_the_tcp_split(split, upstream):
    pieces = [STREAM[i:i + split] for i in range(0, len(STREAM), split)]
    text, reply = await relay(pieces, request(), upstream)
    assert text == STREAM.replace(b'"model":"up"', b'"model":"asked"')
    assert reply.usage == {"prompt_tokens": 3, "completion_tokens": 1}


async def test_hidden_usage_chunk_is_counted_not_sent():
    text, reply = await relay([STREAM], request(hide_usage_chunk=True))
    assert b'"usage"' not in text and text.endswith(b"data: [DONE]\n\n") and reply.usage["completion_tokens"] == 1


async def test_strip_reasoning_keeps_valid_json():
    text, _ = await relay([STREAM], request(rules=AgentRules(strip_reasoning=True)))
    first = orjson.loads(text.split(b"\n\n")[0][6:])
    assert first["choices"][0]["delta"] == {"content": "a"}


@pytest.mark.parametrize("upstream", [Upstream, PieceUpstream])
async def test_stream_without_done_is_a_protocol_error(upstream):
    with pytest.raises(BackendProtocolError):
        await relay([STREAM[:40]], request(), upstream)


def test_llamacpp_thinking_off_answer_moves_to_content():
    doc = {"choices": [{"message": {"content": "", "reasoning_content": "answer"}}]}
    fix_reasoning(doc, request(thinking=False))
    assert doc["choices"][0]["message"] == {"content": "answer"}
    raw = {"choices": [{"message": {"content": "<think>why</think> answer"}}]}
    fix_reasoning(raw, request())
    assert raw["choices"][0]["message"] == {"content": "answer", "reasoning_content": "why"}
    assert fix_reasoning_stream(b'{"reasoning_content":"x"}', request(thinking=False)) == b'{"content":"x"}'


def done() -> bytes:
    return b"data: [DONE]\n\n"


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
# SGLang (model_dump_json): "usage":null on every chunk, the object only on the choices:[] chunk.
SGLANG = (event({"id": "c", "model": "up", "choices": [{"index": 0, "delta": {"content": "a"}}], "usage": None})
          + event({"id": "c", "model": "up", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": None})
          + event({"id": "c", "model": "up", "choices": [], "usage": USAGE}) + done())
# The hosted API: usage inside the final choice always, and the OpenAI chunk too when asked for.
HOSTED = (event({"id": "h", "model": "up", "choices": [{"index": 0, "delta": {"content": "a"}}]})
          + event({"id": "h", "model": "up", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop",
                                                           "usage": USAGE}]})
          + event({"id": "h", "model": "up", "choices": [], "usage": USAGE}) + done())
HOSTED_IN_CHOICE_ONLY = HOSTED.replace(event({"id": "h", "model": "up", "choices": [], "usage": USAGE}), b"")


def usage_objects(text: bytes) -> list[dict]:
    """Every usage object the client would see, wherever it sits."""
    found = []
    for raw in text.split(b"\n\n"):
        if raw.startswith(b"data: {"):
            doc = orjson.loads(raw[6:])
            found += [doc["usage"]] if doc.get("usage") else []
            found += [c["usage"] for c in doc.get("choices") or () if c.get("usage")]
    return found


@pytest.mark.parametrize("stream", [SGLANG, HOSTED, HOSTED_IN_CHOICE_ONLY], ids=["sglang", "hosted", "in-choice"])
async def test_usage_is_counted_and_never_shown_to_a_client_that_did_not_ask(stream):
    text, reply = await relay([stream], request(hide_usage_chunk=True))
    assert usage_objects(text) == [] and text.endswith(b"data: [DONE]\n\n")
    assert reply.usage == USAGE


@pytest.mark.parametrize("stream", [SGLANG, HOSTED, HOSTED_IN_CHOICE_ONLY], ids=["sglang", "hosted", "in-choice"])
@pytest.mark.parametrize("split", [3, len(HOSTED)])
async def test_a_client_that_asked_gets_exactly_one_usage_chunk(stream, split):
    pieces = [stream[i:i + split] for i in range(0, len(stream), split)]
    text, reply = await relay(pieces, request())
    events = [orjson.loads(raw[6:]) for raw in text.split(b"\n\n") if raw.startswith(b"data: {")]
    assert usage_objects(text) == [USAGE]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == USAGE and events[-1]["model"] == "asked"
    assert text.endswith(b"data: [DONE]\n\n") and reply.usage == USAGE


async def test_continuous_usage_stats_the_client_asked_for_stay():
    stream = (event({"model": "up", "choices": [{"index": 0, "delta": {"content": "a"}}], "usage": USAGE})
              + event({"model": "up", "choices": [], "usage": USAGE}) + done())
    asked = request(body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert len(usage_objects((await relay([stream], asked))[0])) == 2
    assert usage_objects((await relay([stream], request(hide_usage_chunk=True)))[0]) == []


def test_usage_null_on_every_chunk_is_not_a_usage_object():
    assert not has_usage_object(b'data: {"choices":[{"delta":{}}],"usage":null}\n\n')
    assert has_usage_object(b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n')
    assert has_usage_object(b'data: {"choices": [], "usage": {"prompt_tokens": 1}}\n\n')


async def test_non_stream_usage_in_a_choice_is_counted_and_stripped():
    body = orjson.dumps({"model": "up", "usage": USAGE,
                         "choices": [{"index": 0, "message": {"content": "a"}, "usage": USAGE}]})
    reply = RelayReply(Upstream([body]), request(stream=False), backend="b")
    doc = orjson.loads(await reply.read())
    assert doc["usage"] == USAGE and "usage" not in doc["choices"][0] and reply.usage == USAGE


async def test_the_first_data_event_ends_the_first_byte_deadline_not_a_comment():
    pieces = [b": keep-alive\n\n", b"data: {\"model\":\"up\"}\n\n", done()]
    upstream = Upstream(pieces)
    reply = RelayReply(upstream, request(), backend="b")
    assert [block async for block in reply.events()][-1].endswith(b"[DONE]\n\n")
    assert upstream.first_event_at == 2


# --- templates (backends/reply_shape.py TextTemplate): the same bytes as the full rewrite of every block ---------

TEXTS = ["", " word", 'say \\"hi\\"', "back\\\\", "\\\\\\\"", 'chatcmpl-x \\"model\\": \\"up\\"', "\\u00e9t\\u00e9",
         "data: [DONE] no", '\\"usage\\":null,', '\\"role\\":null', "\\\\\\\\", "é ü 漢字", ",", "}", '\\"']


def sglang_event(rng, text: str, field: str) -> bytes:
    delta = {"role": None, "content": None, "reasoning_content": None, "tool_calls": None}
    delta[field] = "\x00"   # the text goes in raw (already escaped), after serialisation
    doc = {"id": "chatcmpl-up1", "object": "chat.completion.chunk", "created": rng.choice([1, 17, 170]),
           "model": rng.choice(["up", "up2"]), "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                         "finish_reason": None, "matched_stop": None}],
           "usage": None}
    if rng.random() < 0.2:
        doc["system_fingerprint"] = rng.choice(["b1-abc", "b2-def"])
    return event(doc).replace(b'"\\u0000"', b'"' + text.encode() + b'"')


def llamacpp_event(rng, text: str, field: str) -> bytes:
    doc = {"choices": [{"finish_reason": None, "index": 0, "delta": {field: "\x00"}}], "created": 1764604800,
           "id": "chatcmpl-abc", "model": "up", "system_fingerprint": "b1-0c1e570", "object": "chat.completion.chunk"}
    return event(doc).replace(b'"\\u0000"', b'"' + text.encode() + b'"')


@pytest.mark.parametrize("seed", range(6))
async def test_templated_blocks_are_the_full_rewrite(seed, monkeypatch):
    """Random token streams (SGLang's and llama.cpp's shapes, text with escapes, quotes, field names and
    backslashes, blocks of one or several events) relayed with templates and without: the same bytes."""
    import random
    rng = random.Random(seed)
    make = sglang_event if seed % 2 else llamacpp_event
    events = [make(rng, rng.choice(TEXTS), rng.choice(["content", "content", "reasoning_content"]))
              for _ in range(60)]
    usage = event({"id": "chatcmpl-up1", "object": "chat.completion.chunk", "created": 1, "model": "up",
                   "choices": [], "usage": USAGE})
    pieces, at = [], 0
    while at < len(events):
        take = rng.choice([1, 1, 1, 2, 3])
        pieces.append(b"".join(events[at:at + take]))
        at += take
    pieces += [usage, done()]
    monkeypatch.setattr("backends.openai_compat.time.time", lambda: 1764604800.5)
    for fields in (dict(), dict(thinking=False), dict(rules=AgentRules(strip_reasoning=True)),
                   dict(hide_usage_chunk=True)):
        texts, replies = [], []
        for templates in (True, False):
            random.seed(7)   # the same completion id for both
            reply = RelayReply(Upstream(pieces), request(**fields), backend="b", fix_block=fix_reasoning_stream)
            if not templates:
                reply._templates = 0
            texts.append(b"".join([block async for block in reply.events()]))
            replies.append(reply)
        assert texts[0] == texts[1], fields
        assert replies[0].usage == replies[1].usage == USAGE
        assert replies[0]._template is not None and replies[1]._template is None   # templates were used


# --- one token event per read (TextTemplate.event): the relay skips its [DONE] and error checks there --------

# Texts a backend could put in a token, some of them broken JSON (a raw newline, a quote closing the string early),
# which the fast path must hand back to the general one rather than relay differently.
BROKEN_TEXTS = ["data: {", "x\ndata: [DONE]", "a\n", "\\", 'a"', "data: {\\\"error\\\":1}", "}\n\ndata: [DONE]"]
ERROR_EVENT = b'data: {"error":{"message":"boom","code":400}}\n\n'
TEMPLATE_EVENT = TextTemplate.event


def stream_error(event: bytes):
    from backends.openai_compat import StreamErrorEvent
    return StreamErrorEvent(event.decode(), backend="b", status=400)


async def relay_all(pieces, req, *, fast: bool, monkeypatch):
    """What the client gets (and the error the stream ends with, if any), with the fast path on or off."""
    original, used = TEMPLATE_EVENT, []

    def event(self, block):
        out = original(self, block) if fast else None
        used.append(out is not None)
        return out
    monkeypatch.setattr(TextTemplate, "event", event)
    reply = RelayReply(Upstream(pieces), req, backend="b", stream_error=stream_error, fix_block=fix_reasoning_stream)
    out, error = [], None
    try:
        async for block in reply.events():
            out.append(block)
    except Exception as exc:   # noqa: BLE001 (compared, not hidden)
        error = (type(exc).__name__, str(exc))
    return out, error, reply.usage, any(used)


@pytest.mark.parametrize("seed", range(8))
async def test_one_event_reads_are_relayed_as_the_general_path_relays_them(seed, monkeypatch):
    """Random streams in SGLang's and llama.cpp's shapes, mostly one event per read, with texts that hold quotes,
    escapes, `data: [DONE]`, `data: {` and raw newlines, error events and [DONE] anywhere: the same blocks, the
    same usage and the same ending with the fast path as without it."""
    import random
    rng = random.Random(seed)
    make = sglang_event if seed % 2 else llamacpp_event
    # the fields around the text mostly stay as they were (a fresh Random(0) picks them), as a backend's do
    # broken texts after the first 20 events, so that a [DONE] in one does not end every stream before its tokens
    events = [make(random.Random(0) if rng.random() < 0.9 else rng,
                   rng.choice(BROKEN_TEXTS if i > 20 and rng.random() < 0.05 else TEXTS),
                   rng.choice(["content", "content", "reasoning_content"])) for i in range(80)]
    if rng.random() < 0.5:
        events.insert(rng.randrange(40, 80), ERROR_EVENT)
    if rng.random() < 0.5:   # a string closed early by `"error"`, then a text `data: {` that makes it an error event
        at = rng.randrange(30, 80)
        events[at:at] = [llamacpp_event(rng, text, "content").replace(b'"}', b'"error"}', 1) for text in ("x", "data: {")]
    events += [event({"id": "chatcmpl-up1", "object": "chat.completion.chunk", "created": 1, "model": "up",
                      "choices": [], "usage": USAGE}), done()]
    pieces, at = [], 0
    while at < len(events):
        take = rng.choice([1, 1, 1, 1, 1, 2])
        pieces.append(b"".join(events[at:at + take]))
        at += take
    monkeypatch.setattr("backends.openai_compat.time.time", lambda: 1764604800.5)
    used = []
    for fields in (dict(), dict(thinking=False), dict(hide_usage_chunk=True)):
        results = []
        for fast in (True, False):
            random.seed(7)   # the same completion id for both
            results.append(await relay_all(pieces, request(**fields), fast=fast, monkeypatch=monkeypatch))
        assert results[0][:3] == results[1][:3], fields
        assert not results[1][3]
        used.append(results[0][3])
    assert any(used)   # the fast path relayed blocks


def test_a_template_covers_one_plain_token_event_and_nothing_else():
    raw = b'data: {"choices":[{"delta":{"content":"a"}}],"model":"up"}\n\n'
    template = TextTemplate.of(raw, raw.replace(b'"up"', b'"asked"'))
    assert template.event(raw.replace(b'"a"', b'" b c"')) == raw.replace(b'"a"', b'" b c"').replace(b'"up"', b'"asked"')
    for other in (raw + raw, raw[:-1], raw.replace(b'"a"', b'"a\\\\"'), raw.replace(b'"a"', b'"a\\"b"'),
                  raw.replace(b'"a"', b'"a\ndata: [DONE]"'), raw.replace(b'"model"', b'"mode1"')):
        assert template.event(other) is None, other
    assert TextTemplate.of(raw.replace(b'"a"}', b'"a"error"}'), raw) is None


@pytest.mark.parametrize("doc", [
    {"usage": USAGE, "choices": [{"index": 0, "usage": {"prompt_tokens": 1}}, {"usage": None}]},
    {"usage": None, "choices": [{"index": 0}, {"usage": {}}, {"usage": USAGE}, {"usage": {"prompt_tokens": 1}}]},
    {"usage": {}, "choices": [{"usage": USAGE}]},
    {"choices": [{"index": 0}]}, {"choices": []}, {"choices": None}, {"choices": "abc"}, {"choices": {"usage": 1}},
    {"usage": USAGE}, {},
])
def test_take_usage_is_usage_of_then_strip_choice_usage(doc):
    import copy

    from backends.openai_compat import strip_choice_usage, take_usage, usage_of
    expected = copy.deepcopy(doc)
    usage = usage_of(expected)
    strip_choice_usage(expected.get("choices"))
    assert take_usage(doc) == usage and doc == expected


@pytest.mark.parametrize("fields", [dict(), dict(thinking=False), dict(rules=AgentRules(strip_reasoning=True)),
                                    dict(body={"tools": [{"type": "function"}]}), dict(hide_usage_chunk=True)])
def test_done_alone_is_what_the_full_rewrite_makes_of_it(fields):
    """The relay passes a block that is `data: [DONE]` alone as it is: every rewrite leaves it so."""
    from backends.openai_compat import DONE_EVENT
    reply = RelayReply(Upstream([]), request(**fields), backend="b", stream_error=stream_error,
                       fix_block=fix_reasoning_stream)
    reply._rewrite(llamacpp_event(__import__("random").Random(0), "x", "content"))
    assert reply._rewrite(DONE_EVENT) == DONE_EVENT


# --- the usage chunk the gateway asked for and hides: counted from its bytes, never rewritten ------------------

class Observer:
    def __init__(self) -> None:
        self.blocks = []

    def on_block(self, block: bytes) -> None:
        self.blocks.append(block)

    def on_document(self, doc: dict) -> None:
        pass

    def finish(self) -> None:
        self.blocks.append(b"finished")


def usage_event(rng) -> bytes:
    """A usage chunk as some backend writes it (llama.cpp's timings and cached tokens, SGLang's null details and
    usage:null, the hosted API's usage in a choice), now and then one the fast path must leave to the full rewrite."""
    usage = dict(USAGE)
    if rng.random() < 0.3:
        usage["prompt_tokens_details"] = rng.choice([None, {"cached_tokens": 0}])
    if rng.random() < 0.3:
        usage["completion_tokens_details"] = rng.choice([None, {"reasoning_tokens": 2}])
    usage["completion_tokens"] = rng.randrange(100)
    doc = {"choices": [], "created": rng.choice([1, 17, 170]), "id": "chatcmpl-up1", "model": rng.choice(["up", "u2"]),
           "object": "chat.completion.chunk", "usage": usage}
    if rng.random() < 0.3:
        doc["timings"] = {"cache_n": 0, "prompt_n": 9, "predicted_per_second": 199.7}
    if rng.random() < 0.3:
        doc["system_fingerprint"] = "b1-0c1e570"
    if rng.random() < 0.15:
        doc["choices"] = [{"index": 0, "delta": {"content": "z"}, "finish_reason": "stop", "usage": usage}]
    if rng.random() < 0.1:
        del doc["choices"]
    raw = event(doc)
    if rng.random() < 0.1:
        raw = raw.replace(b":", b": ")   # spaced JSON
    if rng.random() < 0.05:
        raw = raw.replace(b'"usage":{', b'"usage":{"x":', 1)   # broken JSON: the full rewrite keeps it
    return raw


@pytest.mark.parametrize("seed", range(10))
async def test_hidden_usage_chunk_fast_path_relays_what_the_full_rewrite_relays(seed, monkeypatch):
    """Random SGLang and llama.cpp streams whose usage chunks (one or several, in every backend's shape, some
    with choices, spaced, broken) share reads with other events, [DONE], SSE comments and blank lines: with the
    hidden chunk dropped from its raw bytes and with every block rewritten in full first, the same bytes, the
    same usage, the same blocks seen by an observer."""
    import random
    rng = random.Random(seed)
    make = sglang_event if seed % 2 else llamacpp_event
    monkeypatch.setattr("backends.openai_compat.time.time", lambda: 1764604800.5)
    dropped = []
    for _ in range(30):
        events = [make(rng, rng.choice(TEXTS), "content") for _ in range(rng.randrange(1, 6))]
        for _ in range(rng.choice([1, 1, 1, 2])):
            events.insert(rng.randrange(len(events) + 1), usage_event(rng))
        if rng.random() < 0.2:
            events.insert(rng.randrange(len(events) + 1), rng.choice([b": keep-alive\n\n", b"\n\n"]))
        events.append(done())
        pieces, at = [], 0
        while at < len(events):
            take = rng.choice([1, 2, 3, 5])
            pieces.append(b"".join(events[at:at + take]))
            at += take
        fields = rng.choice([dict(), dict(thinking=False), dict(rules=AgentRules(strip_reasoning=True)),
                             dict(body={"tools": [{"type": "function"}]}), dict(observer=Observer())])
        results = []
        for fast in (True, False):
            if fast:
                def counted(self, block, at, original=RelayReply._without_hidden_usage):
                    rest = original(self, block, at)
                    dropped.append(rest is not None)
                    return rest
                monkeypatch.setattr(RelayReply, "_without_hidden_usage", counted)
            else:
                monkeypatch.setattr(RelayReply, "_without_hidden_usage", lambda self, block, at: None)
            random.seed(7)   # the same completion id for both
            observer = Observer() if "observer" in fields else None
            req = request(**{**fields, "hide_usage_chunk": True, "observer": observer})
            reply = RelayReply(Upstream(pieces), req, backend="b", stream_error=stream_error,
                               fix_block=fix_reasoning_stream)
            out = [block async for block in reply.events()]
            results.append((out, reply.usage, observer.blocks if observer else None))
        monkeypatch.undo()
        monkeypatch.setattr("backends.openai_compat.time.time", lambda: 1764604800.5)
        assert results[0] == results[1], pieces
    assert any(dropped) and not all(dropped)   # both the fast path and the full rewrite's cases came up
