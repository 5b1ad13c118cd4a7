"""SGLang emulator: an sglang-kt 0.7.2 server as the gateway sees it over HTTP, without GPUs.

Owns the app factory `create_sglang_app(SglangOptions)`, the routes and the runner
`python -m tests.emulators.sglang --port N ...`. Behaviour per reference/sglang-kt.md:
- `/v1/chat/completions`, `/v1/completions` (§1.3, §2.5-§2.7, §4) with bodies from `sglang_protocol`;
- `/load_lora_adapter`, `/unload_lora_adapter`, `/v1/models` (§1.1-§1.4), static KT expert mode
  (§0.1) with state in `sglang_lora`;
- `/health`, `/health_generate` (§2.1): a one-token generation through the engine, 200 when it
  finishes within `--health-timeout-s` (SGLANG_HEALTH_CHECK_TIMEOUT, default 20), else 503; 503
  at once during `--startup-delay-s`, after SIGTERM, or after `POST /_emulator/health
  {"healthy": false}`. Slow data-plane requests do not hold it (real SGLang answers as soon as any
  output arrives); `POST /_emulator/stall {"seconds": x}` holds the whole engine, and with it health;
- `/model_info`, `/server_info` (§2.2), `/metrics` (§2.3, only with `--enable-metrics`), `/flush_cache`
  (§2.4);
- timing (§2.6): a stream's response head (200, text/event-stream) goes out before prefill, and its
  first event comes after `--prefill-delay-s` plus any `delay_prefill_s` fault; a non-stream answer
  comes after the same delay; an unknown adapter is refused in-band without a prefill; a stream's events
  come `--decode-interval-s` apart (decode speed, emulator only);
- `--max-running-requests`: reported in `/server_info`, and as `internal_states[0].
  effective_max_running_requests_per_dp` (128 when unset: SGLang computes it from memory), which gateways
  read as the server's slots; `GET /_emulator/stats` (test-only): peak generations, loads, implicit reloads;
- SIGTERM as in §2.4 (runner only): `/health` answers 503 at once, requests in flight finish, new ones
  are still served, then the process exits; a second SIGTERM or SIGINT exits at once. Adapters live
  in memory only: a restarted emulator knows its `--lora-paths` and nothing loaded since;
- bearer auth with `--api-key`: 401 `{"error":"Unauthorized"}`; `/health*` and `/metrics*` open (§2);
- the `/_emulator/*` test API from `common`.

Lead's note for later work: adapter-restart behaviour belongs beside `sglang_lora.LoraRegistry`
(state) and `DrainingServer` (process lifecycle); keep the in-memory-only rule.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import PlainTextResponse, Response

from tests.emulators.common import (
    SSE_DONE,
    AuthCheck,
    Fault,
    QuietDisconnects,
    bearer_token,
    emulator_app,
    intake,
    json_response,
    raw_response,
    read_json,
    runner_args,
)
from tests.emulators.generation import chat_prompt_text, plan_text
from tests.emulators.sglang_lora import parse_lora_paths, requested_adapter
from tests.emulators.sglang_protocol import (
    UNSUPPORTED_MEDIA_TYPE,
    ChatRequestIn,
    CompletionRequestIn,
    bad_request_body,
    chat_events,
    chat_output,
    chat_response,
    completion_events,
    completion_response,
    error_body,
    prompts_of,
    status_error_body,
    stream_error_event,
    usage_body,
    validated,
)
from tests.emulators.sglang_state import (
    DEFAULT_HEALTH_TIMEOUT_S,
    FLUSH_TEXT,
    SglangOptions,
    SglangState,
    metrics_text,
    model_info_body,
    server_info_body,
)

__all__ = ["SglangOptions", "create_sglang_app", "main"]


def auth_check(api_key: str | None) -> AuthCheck:
    """Bearer auth on everything but /health*, /metrics* and the test API (§2 "Auth")."""
    def check(authorization: str | None, path: str) -> Response | None:
        if api_key is None or path.startswith(("/health", "/metrics", "/_emulator")):
            return None
        if bearer_token(authorization) == api_key:
            return None
        return json_response({"error": "Unauthorized"}, 401)
    return check


def is_json_request(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower() == "application/json"


# --- OpenAI endpoints ----------------------------------------------------------------------------

Answer = Callable[[dict[str, Any], str | None, Fault | None], Response]


def openai_router(state: SglangState) -> APIRouter:
    router = APIRouter()
    options = state.options

    async def serve(request: Request, schema: type[BaseModel], answer: Answer) -> Response:
        """Shared path: log, faults, content type, JSON, schema, LoRA checks, then `answer`."""
        body, json_error, fault = await intake(request, state.log, state.faults)
        await state.faults.delay(fault)
        if fault is not None and fault.raw_body is not None:
            return raw_response(fault)
        if fault is not None and fault.status is not None:
            return json_response(status_error_body(fault.status, fault.message, fault.type), fault.status)
        if not is_json_request(request):
            return json_response(bad_request_body(UNSUPPORTED_MEDIA_TYPE), 400)
        if json_error is not None:
            return json_response(bad_request_body(f"JSON decode error: {json_error}"), 400)
        try:
            body = validated(schema, body)
        except ValidationError as exc:
            return json_response(bad_request_body(str(exc)), 400)
        adapter = requested_adapter(body)
        try:
            state.lora.check_enabled(adapter)
        except ValueError as exc:
            return json_response(error_body(str(exc)), 400)
        try:
            state.lora.acquire(adapter)
        except ValueError as exc:  # raised in the tokenizer manager: in-band on a stream (§2.6)
            if body.get("stream"):
                return state.stream([stream_error_event(str(exc)), SSE_DONE], fault, prefill=False)
            return json_response(error_body(str(exc)), 400)
        if not body.get("stream"):
            with state.generating():
                await state.engine.first_token(state.prefill_s(fault))
        return answer(body, adapter, fault)

    def include_usage(body: dict[str, Any]) -> bool:
        return bool((body.get("stream_options") or {}).get("include_usage"))

    def answer_chat(body: dict[str, Any], adapter: str | None, fault: Fault | None) -> Response:
        output = chat_output(body, adapter, options.reasoning_parser, options.tool_call_parser)
        prompt = chat_prompt_text(body["messages"])
        usage = usage_body([output], state.cached_tokens(adapter, [prompt], [output]))
        state.record_usage([output])
        model = body.get("model", "default")
        if body.get("stream"):
            return state.stream(chat_events(output, model, usage, include_usage(body)), fault)
        return json_response(chat_response(output, model, usage, options.weight_version))

    def answer_completion(body: dict[str, Any], adapter: str | None, fault: Fault | None) -> Response:
        prompts = prompts_of(body)
        outputs = [plan_text(body, prompt, adapter=adapter) for prompt in prompts]
        usage = usage_body(outputs, state.cached_tokens(adapter, prompts, outputs))
        state.record_usage(outputs)
        model = body.get("model", "default")
        if body.get("stream"):
            return state.stream(completion_events(outputs, model, usage, include_usage(body)), fault)
        return json_response(completion_response(outputs, model, usage, options.weight_version))

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, ChatRequestIn, answer_chat)

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, CompletionRequestIn, answer_completion)

    @router.get("/v1/models")
    async def list_models() -> Response:
        cards = [base_card(state)] + state.lora.model_cards(options.served_model_name, state.created)
        return json_response({"object": "list", "data": cards})

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        if model_id == options.served_model_name:
            return json_response(base_card(state))
        error = {"message": f"The model '{model_id}' does not exist", "type": "invalid_request_error",
                 "param": "model", "code": "model_not_found"}
        return json_response({"error": error}, 404)

    return router


def base_card(state: SglangState) -> dict[str, Any]:
    name = state.options.served_model_name
    return {"id": name, "object": "model", "created": state.created, "owned_by": "sglang", "root": name,
            "parent": None, "max_model_len": state.options.context_length}


# --- LoRA admin, health, info, metrics -----------------------------------------------------------


class LoadLoraIn(BaseModel):
    lora_name: str
    lora_path: str
    pinned: bool = False


class UnloadLoraIn(BaseModel):
    lora_name: str


def server_router(state: SglangState) -> APIRouter:
    router = APIRouter()

    async def admin_body(request: Request, schema: type[BaseModel]) -> BaseModel | Response:
        body, _, error = await read_json(request)
        if error is not None:
            return json_response(bad_request_body(f"JSON decode error: {error}"), 400)
        try:
            return schema.model_validate(body)
        except ValidationError as exc:
            return json_response(bad_request_body(str(exc)), 400)

    @router.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        fault = state.faults.take(stream=False, path="/load_lora_adapter")
        await state.faults.delay(fault)
        if fault is not None and fault.raw_body is not None:
            return raw_response(fault)
        if fault is not None and fault.status is not None:
            return json_response(status_error_body(fault.status, fault.message, fault.type), fault.status)
        body = await admin_body(request, LoadLoraIn)
        if isinstance(body, Response):
            return body
        status, output = state.lora.load(body.lora_name, body.lora_path, body.pinned)
        return json_response(output, status)

    @router.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        body = await admin_body(request, UnloadLoraIn)
        if isinstance(body, Response):
            return body
        status, output = state.lora.unload(body.lora_name)
        return json_response(output, status)

    @router.get("/health")
    @router.get("/health_generate")
    async def health() -> Response:
        return Response(status_code=200 if await state.health_check() else 503)

    @router.get("/model_info")
    @router.get("/get_model_info")
    async def model_info() -> Response:
        return json_response(model_info_body(state.options))

    @router.get("/server_info")
    @router.get("/get_server_info")
    async def server_info() -> Response:
        return json_response(server_info_body(state))

    @router.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        return PlainTextResponse(FLUSH_TEXT, status_code=400 if state.in_flight else 200)

    @router.get("/metrics")
    async def metrics() -> Response:
        if not state.options.enable_metrics:
            return json_response({"detail": "Not Found"}, 404)
        return PlainTextResponse(metrics_text(state), media_type="text/plain; version=0.0.4")

    @router.post("/_emulator/health")
    async def set_health(request: Request) -> Response:
        body, _, _ = await read_json(request)
        state.healthy = bool((body or {}).get("healthy", True))
        return json_response({"healthy": state.healthy})

    @router.get("/_emulator/stats")
    async def stats() -> Response:
        """Test-only: most generations at once, adapter loads, and requests that met an unloaded adapter."""
        return json_response({"in_flight": state.in_flight, "peak_in_flight": state.peak_in_flight,
                              "loads": state.lora.loads, "implicit_reloads": state.lora.implicit_reloads,
                              "loaded": list(state.lora.loaded)})

    @router.post("/_emulator/stall")
    async def stall(request: Request) -> Response:
        body, _, _ = await read_json(request)
        seconds = (body or {}).get("seconds") if isinstance(body, dict) else None
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
            return json_response({"detail": "expected {\"seconds\": <number >= 0>}"}, 400)
        state.engine.stall(float(seconds))
        return json_response({"stalled_for_s": seconds})

    return router


def create_sglang_app(options: SglangOptions, state: SglangState | None = None) -> FastAPI:
    if state is None:
        state = SglangState(options)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.started_at = options.clock()  # a served app counts its startup delay from here
        yield

    return emulator_app("sglang-kt 0.7.2 emulator", auth_check(options.api_key), state, openai_router(state),
                        server_router(state), lifespan=lifespan)


# --- runner --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = runner_args("tests.emulators.sglang", __doc__)
    parser.add_argument("--served-model-name", default="kimi")
    parser.add_argument("--model-path", default="moonshotai/Kimi-K2.5")
    parser.add_argument("--lora-paths", nargs="*", default=[], metavar="NAME=DIR")
    parser.add_argument("--enable-lora", action="store_true", default=None)
    parser.add_argument("--max-loaded-loras", type=int)
    parser.add_argument("--max-loras-per-batch", type=int, default=8)
    parser.add_argument("--max-lora-rank", type=int)
    parser.add_argument("--static-expert-adapter", metavar="NAME")
    parser.add_argument("--reasoning-parser")
    parser.add_argument("--tool-call-parser")
    parser.add_argument("--api-key")
    parser.add_argument("--context-length", type=int, default=262144)
    parser.add_argument("--startup-delay-s", type=float, default=0.0)
    parser.add_argument("--prefill-delay-s", type=float, default=0.0,
                        help="time to each generation's first token; streams send their head before it")
    parser.add_argument("--decode-interval-s", type=float, default=0.0,
                        help="emulator only: time between a stream's events (decode speed)")
    parser.add_argument("--max-running-requests", type=int)
    parser.add_argument("--health-timeout-s", type=float, default=DEFAULT_HEALTH_TIMEOUT_S,
                        help="SGLANG_HEALTH_CHECK_TIMEOUT: how long /health waits for its one-token generation")
    parser.add_argument("--enable-metrics", action="store_true")
    parser.add_argument("--enable-cache-report", action="store_true")
    parser.add_argument("--weight-version", default="default")
    return parser.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> SglangOptions:
    return SglangOptions(
        served_model_name=args.served_model_name,
        model_path=args.model_path,
        lora_paths=parse_lora_paths(args.lora_paths),
        enable_lora=args.enable_lora,
        max_loaded_loras=args.max_loaded_loras,
        max_loras_per_batch=args.max_loras_per_batch,
        max_lora_rank=args.max_lora_rank,
        static_expert_adapter=args.static_expert_adapter,
        reasoning_parser=args.reasoning_parser,
        tool_call_parser=args.tool_call_parser,
        api_key=args.api_key,
        context_length=args.context_length,
        startup_delay_s=args.startup_delay_s,
        prefill_delay_s=args.prefill_delay_s,
        decode_interval_s=args.decode_interval_s,
        max_running_requests=args.max_running_requests,
        health_timeout_s=args.health_timeout_s,
        enable_metrics=args.enable_metrics,
        enable_cache_report=args.enable_cache_report,
        weight_version=args.weight_version,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn with SGLang's SIGTERM (§2.4): mark the server exiting (`/health` 503), keep serving,
    and exit once no request is in flight. A second SIGTERM, or SIGINT, exits the uvicorn way."""

    def __init__(self, config: uvicorn.Config, state: SglangState) -> None:
        super().__init__(config)
        self.state = state
        self._watchdog: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if sig == signal.SIGTERM and not self.state.gracefully_exiting:
            self.state.gracefully_exiting = True
            asyncio.get_running_loop().call_soon_threadsafe(self._start_watchdog)
            return
        super().handle_exit(sig, frame)

    def _start_watchdog(self) -> None:
        self._watchdog = asyncio.get_running_loop().create_task(self._exit_when_idle())

    async def _exit_when_idle(self) -> None:
        while self.state.in_flight:
            logging.getLogger(__name__).warning(
                "Gracefully exiting... Remaining number of requests %d", self.state.in_flight)
            try:
                await asyncio.wait_for(self.state.idle.wait(), 5.0)
            except TimeoutError:
                pass
        self.should_exit = True


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    options = options_from_args(args)
    state = SglangState(options)
    app = create_sglang_app(options, state)
    config = uvicorn.Config(QuietDisconnects(app), host=args.host, port=args.port, log_level="warning")
    DrainingServer(config, state).run()


if __name__ == "__main__":
    main()
