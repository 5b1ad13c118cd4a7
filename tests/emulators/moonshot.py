"""Moonshot emulator: the hosted Kimi API (api.moonshot.ai/v1) as the gateway sees it, offline.

Owns the app factory `create_moonshot_app(MoonshotOptions)`, the routes and the runner
`python -m tests.emulators.moonshot --port N ...`. Behaviour per reference/moonshot-api.md:
- bearer auth: a missing key -> 401 `incorrect_api_key_error`, a wrong one -> 401
  `invalid_authentication_error` (§1, §4);
- `GET /v1/models` lists the configured models (default kimi-k2.6, kimi-k3: kimi-k2.5 is retired, §0);
  an unlisted model -> 404 `resource_not_found_error` (§4);
- `POST /v1/chat/completions`: request rules in `moonshot_rules` (§2, §3); answers with
  `reasoning_content` before `content` (§3), flat `usage.cached_tokens` (§3 "Usage"), and in a
  stream a final chunk carrying `finish_reason` and `choices[0].usage`, the OpenAI-style usage
  chunk with `include_usage`, then `data: [DONE]` (§3 "Streaming"); tool-call ids per generation
  (`functions.{name}:{idx}` on K2, `{name}_{idx}` on K3: §8; the hosted format is UNCONFIRMED in §3);
- generations (§8): each model id follows its generation's rules (`moonshot_rules.GENERATION_PROFILES`),
  chosen by the id or by `--generation ID=GEN`; what a K2.6 server did with replayed reasoning ("kept" or
  "discarded" without `keep: "all"`) is recorded for tests at `GET /_emulator/reasoning`;
- `max_tokens` reached inside a tool call: the call's arguments stop where the budget does and the
  finish_reason is "length" (§3 "finish_reason"), streamed or not;
- `POST /v1/tokenizers/estimate-token-count` (§1);
- faults: 429 is `engine_overloaded_error` with `Retry-After: 1`, 504 an HTML page (§4). The
  in-stream error event after `stream_error_after` is an emulator choice (nothing is documented).

Where reference/ is ambiguous the emulator takes the strict reading, the one a gateway must survive:
- `n` != 1 and penalties != 0 are refused with the documented `invalid <param>: only <v> is allowed`
  400, not ignored (§2.1, §7: UNCONFIRMED for K2.5; K3 refuses them);
- `Retry-After` is sent only with `engine_overloaded_error` (the one type it is documented for). A
  `rate_limit_reached_error` says its wait only in the message ("try again after {t} seconds"), TPM
  and TPD messages give none, `exceeded_current_quota_error` (quota, billing) never does (§4, §7);
- a stream always carries usage in its final choice (`choices[0].usage`), requested or not, and with
  `include_usage` also sends the OpenAI usage chunk: usage twice (§3 "Streaming"). A non-stream reply
  has usage at the top level only (nothing documents more);
- a stream sends its response head before generating: `delay_prefill_s` holds only the first event,
  so a client's first-byte clock must run to the first event (when the hosted head goes out is not
  documented; `delay_first_byte_s` holds the head instead);
- plain http(s) image URLs are refused (`unsupported image url`), only `data:`/`ms://` pass (§3, §7);
- an empty `reasoning_content` on an assistant tool-call turn counts as missing (§8);
- unknown self-hosted fields are refused by name (see `moonshot_rules`).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import HTMLResponse, Response

from tests.emulators.common import (
    SSE_DONE,
    AuthCheck,
    Fault,
    FaultInjector,
    QuietDisconnects,
    RequestLog,
    bearer_token,
    emulator_app,
    intake,
    json_response,
    raw_response,
    read_json,
    runner_args,
    sse_event,
    sse_response,
)
from tests.emulators.generation import Output, PromptCache, chat_deltas, chat_prompt_text, chat_prompt_tokens, plan_chat
from tests.emulators.moonshot_rules import (
    GENERATION_PROFILES,
    HostedError,
    check_chat_request,
    check_model,
    error_body,
    profile_of,
    replayed_reasoning,
)

DEFAULT_MODELS = ("kimi-k2.6", "kimi-k3")
FAULT_DEFAULTS = {
    400: ("invalid_request_error", "Invalid request: emulated fault"),
    401: ("invalid_authentication_error", "Invalid Authentication"),
    403: ("permission_denied_error", "The API you are accessing is not open"),
    404: ("resource_not_found_error", "Not found the model emulated or Permission denied"),
    429: ("engine_overloaded_error", "The engine is currently overloaded, please try again later"),
    500: ("server_error", "emulated server error"),
    503: ("server_unavailable", "emulated: the service is scaling or under maintenance"),
}
TYPE_MESSAGES = {
    "engine_overloaded_error": "The engine is currently overloaded, please try again later",
    "rate_limit_reached_error": ("Your account org-emulator<ak-emulator> request reached organization max RPM: 3, "
                                 "please try again after 1 seconds"),
    "exceeded_current_quota_error": ("You exceeded your current token quota: <org-emulator> 0, "
                                     "please check your account balance"),
}
GATEWAY_TIMEOUT_HTML = (
    "<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
    "<center><h1>504 Gateway Time-out</h1></center>\r\n</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class MoonshotOptions:
    api_key: str | None = None  # None: any bearer key is accepted, a missing one still fails
    models: tuple[str, ...] = DEFAULT_MODELS
    generations: dict[str, str] = field(default_factory=dict, compare=False)  # model id -> generation
    sleep: Callable[[float], Awaitable[Any]] = field(default=asyncio.sleep, compare=False)


def auth_check(api_key: str | None) -> AuthCheck:
    def check(authorization: str | None, path: str) -> Response | None:
        if path.startswith("/_emulator"):
            return None
        token = bearer_token(authorization)
        if token is None:
            return json_response(error_body("incorrect_api_key_error", "Incorrect API key provided"), 401)
        if api_key is not None and token != api_key:
            return json_response(error_body("invalid_authentication_error", "Invalid Authentication"), 401)
        return None
    return check


def hosted_error_response(error: HostedError) -> Response:
    return json_response(error_body(error.error_type, error.message), error.status)


def fault_response(fault: Fault) -> Response:
    """A fault-injected error in the hosted shape; `Retry-After` only for engine overload (§4)."""
    status = fault.status or 500
    if status == 504:
        return HTMLResponse(GATEWAY_TIMEOUT_HTML, status_code=504)
    default_type, default_message = FAULT_DEFAULTS.get(status, ("server_error", "emulated error"))
    error_type = fault.type or default_type
    message = fault.message or TYPE_MESSAGES.get(error_type, default_message)
    headers = {"Retry-After": "1"} if error_type == "engine_overloaded_error" else None
    return json_response(error_body(error_type, message), status, headers)


def model_card(model: str, created: int, generations: dict[str, str] | None = None) -> dict[str, Any]:
    """Beyond `id`, the card's fields are UNCONFIRMED (§7); these are plausible ones."""
    profile = profile_of(model, generations)
    return {"id": model, "object": "model", "created": created, "owned_by": "moonshot", "root": model,
            "parent": None, "context_length": profile.context_length, "supports_image_in": True,
            "supports_video_in": True, "supports_reasoning": True}


# --- response bodies -----------------------------------------------------------------------------


def usage_body(output: Output, cached_tokens: int) -> dict[str, Any]:
    """K2.5-era usage: `cached_tokens` is flat, not in `prompt_tokens_details` (§3 "Usage")."""
    return {"prompt_tokens": output.prompt_tokens, "completion_tokens": output.completion_tokens,
            "total_tokens": output.prompt_tokens + output.completion_tokens, "cached_tokens": cached_tokens}


def message_body(output: Output) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": output.content or ""}
    if output.reasoning is not None:
        message["reasoning_content"] = output.reasoning
    if output.tool_call is not None:
        call = output.tool_call
        message["tool_calls"] = [{"index": 0, "id": call.call_id, "type": "function",
                                  "function": {"name": call.name, "arguments": call.arguments}}]
    return message


def chat_response(output: Output, model: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": message_body(output),
                                         "finish_reason": output.finish_reason}],
            "usage": usage}


def chat_events(output: Output, model: str, usage: dict[str, Any], include_usage: bool) -> list[bytes]:
    """Role chunk, reasoning deltas, content/tool deltas, final chunk with `choices[0].usage`."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}

    def chunk(delta: dict[str, Any], finish: str | None = None, choice_usage: dict | None = None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if choice_usage is not None:
            choice["usage"] = choice_usage
        return sse_event({**head, "choices": [choice]})

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk(delta) for delta in chat_deltas(output)]
    events.append(chunk({}, output.finish_reason, usage))
    if include_usage:
        events.append(sse_event({**head, "choices": [], "usage": usage}))
    return events + [SSE_DONE]


def stream_error_event(fault: Fault) -> bytes:
    return sse_event(error_body(fault.type or "server_error", fault.message or "emulated in-stream error"))


# --- app -----------------------------------------------------------------------------------------


class MoonshotState:
    def __init__(self, options: MoonshotOptions) -> None:
        self.options = options
        self.faults = FaultInjector(options.sleep)
        self.log = RequestLog()
        self.cache = PromptCache()
        self.created = int(time.time())
        self.replays: list[dict[str, Any]] = []  # what each request's replayed reasoning met (§8)

    def reset(self) -> None:
        self.cache.clear()
        self.replays.clear()


def api_router(state: MoonshotState) -> APIRouter:
    router = APIRouter()
    models = state.options.models
    generations = state.options.generations

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body, json_error, fault = await intake(request, state.log, state.faults)
        await state.faults.delay(fault)
        if fault is not None and fault.raw_body is not None:
            return raw_response(fault)
        if fault is not None and fault.status is not None:
            return fault_response(fault)
        if json_error is not None:
            return hosted_error_response(HostedError(400, "invalid_request_error", f"Invalid request: {json_error}"))
        try:
            model, thinking = check_chat_request(body, models, generations)
        except HostedError as error:
            return hosted_error_response(error)
        profile = profile_of(model, generations)
        replay = replayed_reasoning(body, profile, thinking)
        if replay is not None:
            state.replays.append({"model": model, "generation": profile.generation, "reasoning": replay})
        output = plan_chat(body, adapter=model, thinking=thinking, tool_id_format=profile.tool_id_format)
        prompt = chat_prompt_text(body["messages"])
        usage = usage_body(output, state.cache.cached_tokens(model, prompt, output.prompt_tokens))
        prefill_s = fault.prefill_s if fault is not None else 0.0

        async def prefill() -> None:
            if prefill_s:
                await state.options.sleep(prefill_s)
        if body.get("stream") is True:
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            return sse_response(chat_events(output, model, usage, include), fault,
                                stream_error_event(fault) if fault else b"", before_first=prefill)
        await prefill()
        return json_response(chat_response(output, model, usage))

    @router.get("/v1/models")
    async def list_models() -> Response:
        return json_response({"object": "list", "data": [model_card(m, state.created, generations) for m in models]})

    @router.get("/_emulator/reasoning")
    async def reasoning_replays() -> Response:
        return json_response(state.replays)

    @router.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> Response:
        if model_id not in models:
            return hosted_error_response(HostedError(
                404, "resource_not_found_error", f"Not found the model {model_id} or Permission denied"))
        return json_response(model_card(model_id, state.created, generations))

    @router.post("/v1/tokenizers/estimate-token-count")
    async def estimate_token_count(request: Request) -> Response:
        body, _, error = await read_json(request)
        try:
            if error is not None:
                raise HostedError(400, "invalid_request_error", f"Invalid request: {error}")
            check_model(body, models)
            messages = body.get("messages")
            if not isinstance(messages, list):
                raise HostedError(400, "invalid_request_error", "Invalid request: messages must be an array")
        except HostedError as exc:
            return hosted_error_response(exc)
        return json_response({"data": {"total_tokens": chat_prompt_tokens(messages)}})

    return router


def create_moonshot_app(options: MoonshotOptions) -> FastAPI:
    state = MoonshotState(options)
    return emulator_app("Moonshot API emulator", auth_check(options.api_key), state, api_router(state))


# --- runner --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = runner_args("tests.emulators.moonshot", __doc__)
    parser.add_argument("--api-key", help="the only accepted key; without it any bearer key is accepted")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="model ids for /v1/models, space- or comma-separated (default: %(default)s)")
    parser.add_argument("--generation", action="append", default=[], metavar="ID=GEN",
                        help=f"the generation a model id follows ({', '.join(GENERATION_PROFILES)}); "
                             "default: the one its name says, else k2.6")
    return parser.parse_args(argv)


def parse_generations(entries: list[str]) -> dict[str, str]:
    generations = {}
    for entry in entries:
        model, _, name = entry.partition("=")
        if name not in GENERATION_PROFILES:
            raise SystemExit(f"--generation {entry}: expected ID=GEN with GEN one of {', '.join(GENERATION_PROFILES)}")
        generations[model] = name
    return generations


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    models = tuple(m.strip() for entry in args.models for m in entry.split(",") if m.strip())
    app = create_moonshot_app(MoonshotOptions(api_key=args.api_key, models=models,
                                              generations=parse_generations(args.generation)))
    uvicorn.run(QuietDisconnects(app), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
