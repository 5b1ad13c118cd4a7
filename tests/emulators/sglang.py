"""SGLang emulator: an sglang-kt 0.7.2 server as the gateway sees it over HTTP, without GPUs.

Owns the app factory `create_sglang_app(SglangOptions)`, the routes and the runner
`python -m tests.emulators.sglang --port N ...`. Behaviour per reference/sglang-kt.md:
- `/v1/chat/completions`, `/v1/completions` (§1.3, §2.5-§2.7, §4) with bodies from `sglang_protocol`;
- `/load_lora_adapter`, `/unload_lora_adapter`, `/v1/models` (§1.1-§1.4), static KT expert mode
  (§0.1) with state in `sglang_lora`;
- `/health`, `/health_generate` (§2.1; 503 during `--startup-delay-s` or after
  `POST /_emulator/health {"healthy": false}`), `/model_info`, `/server_info` (§2.2), `/metrics`
  (§2.3, only with `--enable-metrics`), `/flush_cache` (§2.4);
- bearer auth with `--api-key`: 401 `{"error":"Unauthorized"}`; `/health*` and `/metrics*` open (§2);
- the `/_emulator/*` test API from `common`.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import PlainTextResponse, Response

from tests.emulators.common import (
    LOGGED_PATHS,
    SSE_DONE,
    AuthCheck,
    BearerAuthMiddleware,
    Fault,
    QuietDisconnects,
    bearer_token,
    emulator_router,
    intake,
    json_response,
    read_json,
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
                return state.stream([stream_error_event(str(exc)), SSE_DONE], fault)
            return json_response(error_body(str(exc)), 400)
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
        return Response(status_code=503 if state.starting() or not state.healthy else 200)

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

    return router


def create_sglang_app(options: SglangOptions) -> FastAPI:
    state = SglangState(options)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.started_at = options.clock()  # a served app counts its startup delay from here
        yield

    app = FastAPI(title="sglang-kt 0.7.2 emulator", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.add_middleware(BearerAuthMiddleware, check=auth_check(options.api_key), log=state.log,
                       logged_paths=LOGGED_PATHS)
    app.include_router(emulator_router(state.faults, state.log, state.reset))
    app.include_router(openai_router(state))
    app.include_router(server_router(state))
    return app


# --- runner --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.emulators.sglang", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
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
        enable_metrics=args.enable_metrics,
        enable_cache_report=args.enable_cache_report,
        weight_version=args.weight_version,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    app = create_sglang_app(options_from_args(args))
    uvicorn.run(QuietDisconnects(app), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
