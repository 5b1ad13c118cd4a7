"""State and self-description of the SGLang emulator.

Owns `SglangOptions` (the launch flags the emulator understands), `SglangState` (adapters,
faults, request log, prompt cache, counters, in-flight requests, health, graceful exit), `Engine`
(the scheduler's timing: prefill and stalls) and the bodies that describe the server:
`/model_info`, `/server_info` (sglang-kt.md §2.2) and `/metrics` (§2.3).

Everything lives in this process's memory and nothing is written to disk, so a restart forgets
every adapter loaded at runtime (only `--lora-paths` come back), like the real server.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import StreamingResponse

from tests.emulators.common import Fault, FaultInjector, RequestLog, faulty_events
from tests.emulators.generation import Output, PromptCache
from tests.emulators.sglang_lora import LoraRegistry, LoraSettings
from tests.emulators.sglang_protocol import fault_stream_error_event

DEFAULT_HEALTH_TIMEOUT_S = 20.0  # SGLANG_HEALTH_CHECK_TIMEOUT (§2.1)

FLUSH_TEXT = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)


@dataclass(frozen=True)
class SglangOptions:
    served_model_name: str = "kimi"
    model_path: str = "moonshotai/Kimi-K2.5"
    lora_paths: Mapping[str, str] = field(default_factory=dict)  # name -> dir
    enable_lora: bool | None = None  # None: on when lora_paths is given (§1.5)
    max_loaded_loras: int | None = None
    max_loras_per_batch: int = 8
    max_lora_rank: int | None = None
    static_expert_adapter: str | None = None
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    api_key: str | None = None
    context_length: int = 262144
    startup_delay_s: float = 0.0
    prefill_delay_s: float = 0.0  # every generation's time to its first token (after the head on streams)
    decode_interval_s: float = 0.0  # between a stream's events (decode speed); 0: back to back
    max_running_requests: int | None = None  # --max-running-requests; /server_info reports the effective cap
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S
    enable_metrics: bool = False
    enable_cache_report: bool = False
    weight_version: str = "default"
    sleep: Callable[[float], Awaitable[Any]] = field(default=asyncio.sleep, compare=False)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)


class Engine:
    """The scheduler as the HTTP side sees it. A request's prefill holds only that request; a stall
    (`POST /_emulator/stall`, e.g. a huge unchunked prefill) holds every generation until it ends,
    health probes included, which is how a real `/health` times out (§2.1)."""

    def __init__(self, clock: Callable[[], float], sleep: Callable[[float], Awaitable[Any]]) -> None:
        self.clock, self.sleep = clock, sleep
        self.stalled_until = 0.0

    def stall(self, seconds: float) -> None:
        self.stalled_until = max(self.stalled_until, self.clock() + seconds)

    async def first_token(self, prefill_s: float = 0.0) -> None:
        while (left := self.stalled_until - self.clock()) > 0:
            await self.sleep(left)
        if prefill_s > 0:
            await self.sleep(prefill_s)


class SglangState:
    """Everything the emulator remembers between requests."""

    def __init__(self, options: SglangOptions) -> None:
        self.options = options
        enabled = bool(options.lora_paths) if options.enable_lora is None else options.enable_lora
        self.lora = LoraRegistry(LoraSettings(
            enabled=enabled,
            initial=dict(options.lora_paths) if enabled else {},
            max_loaded_loras=options.max_loaded_loras,
            max_loras_per_batch=options.max_loras_per_batch,
            max_lora_rank=options.max_lora_rank,
            static_adapter=options.static_expert_adapter,
        ))
        self.faults = FaultInjector(options.sleep)
        self.log = RequestLog()
        self.cache = PromptCache()
        self.counters: Counter[str] = Counter()
        self.engine = Engine(options.clock, options.sleep)
        self.in_flight = 0
        self.peak_in_flight = 0   # test-only (/_emulator/stats): the most generations at once
        self.idle = asyncio.Event()
        self.idle.set()
        self.healthy = True  # False: `POST /_emulator/health {"healthy": false}`, an unhealthy server
        self.gracefully_exiting = False  # SIGTERM received (§2.4)
        self.started_at = options.clock()
        self.created = int(time.time())

    def reset(self) -> None:
        self.lora.reset()
        self.cache.clear()
        self.counters.clear()
        self.healthy = True
        self.engine.stalled_until = 0.0

    def starting(self) -> bool:
        return self.options.clock() - self.started_at < self.options.startup_delay_s

    def record_usage(self, outputs: list[Output]) -> None:
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += sum(o.prompt_tokens for o in outputs)
        self.counters["generation_tokens"] += sum(o.completion_tokens for o in outputs)

    def cached_tokens(self, adapter: str | None, prompts: list[str], outputs: list[Output]) -> int | None:
        """`prompt_tokens_details.cached_tokens` exists only with --enable-cache-report (§2.6)."""
        if not self.options.enable_cache_report:
            return None
        return sum(self.cache.cached_tokens(adapter, p, o.prompt_tokens) for p, o in zip(prompts, outputs))

    def prefill_s(self, fault: Fault | None) -> float:
        return self.options.prefill_delay_s + (fault.prefill_s if fault is not None else 0.0)

    @contextmanager
    def generating(self) -> Iterator[None]:
        """One request in `rid_to_state`: what `/flush_cache` and a graceful exit wait for."""
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self.idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def tracked(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        with self.generating():
            async for event in events:
                yield event

    def stream(self, events: list[bytes], fault: Fault | None, prefill: bool = True) -> StreamingResponse:
        """The head goes out at once; the first event waits for the engine and the prefill (§2.6)."""
        error = fault_stream_error_event(fault.message, fault.type, fault.stream_error_code) \
            if fault is not None else b""
        prefill_s = self.prefill_s(fault) if prefill else 0.0

        async def before_first() -> None:
            await self.engine.first_token(prefill_s)
        return StreamingResponse(self.tracked(faulty_events(events, fault, error, before_first,
                                                            self.options.decode_interval_s)),
                                 media_type="text/event-stream")

    async def health_check(self) -> bool:
        """`/health`: a one-token generation that must finish within the health timeout (§2.1)."""
        if self.starting() or self.gracefully_exiting or not self.healthy:
            return False
        try:
            async with asyncio.timeout(self.options.health_timeout_s):
                await self.engine.first_token()
        except TimeoutError:
            return False
        return True


def model_info_body(options: SglangOptions) -> dict[str, Any]:
    return {
        "model_path": options.model_path,
        "tokenizer_path": options.model_path,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": options.weight_version,
        "has_image_understanding": True,
        "has_audio_understanding": False,
        "model_type": "kimi_k25",
        "architectures": ["KimiK25ForConditionalGeneration"],
    }


def server_info_body(state: SglangState) -> dict[str, Any]:
    """A plausible subset of `ServerArgs` plus `internal_states` and `version` (§2.2)."""
    options = state.options
    return {
        "model_path": options.model_path,
        "served_model_name": options.served_model_name,
        "context_length": options.context_length,
        "enable_lora": state.lora.settings.enabled,
        "lora_paths": dict(options.lora_paths),
        "max_loaded_loras": options.max_loaded_loras,
        "max_loras_per_batch": options.max_loras_per_batch,
        "max_lora_rank": options.max_lora_rank,
        "lora_backend": "csgmv",
        "reasoning_parser": options.reasoning_parser,
        "tool_call_parser": options.tool_call_parser,
        "enable_metrics": options.enable_metrics,
        "enable_cache_report": options.enable_cache_report,
        "kt_expert_lora_path": options.static_expert_adapter and options.lora_paths.get(options.static_expert_adapter),
        "max_running_requests": options.max_running_requests,
        # The scheduler's cap (ServerArgs' value, else what it computed from memory; 128 is a typical figure).
        "internal_states": [{"last_gen_throughput": 0.0, "weight_version": options.weight_version,
                             "effective_max_running_requests_per_dp": options.max_running_requests or 128}],
        "version": "0.7.2",
    }


def metrics_text(state: SglangState) -> str:
    """A few real `sglang:` series (§2.3); no per-adapter label exists (§0.4)."""
    name = state.options.served_model_name
    scheduler = f'engine_type="unified",model_name="{name}",moe_ep_rank="0",pp_rank="0",tp_rank="0"'
    series = [
        ("sglang:num_running_reqs", "gauge", scheduler, state.in_flight),
        ("sglang:num_queue_reqs", "gauge", scheduler, 0),
        ("sglang:prompt_tokens_total", "counter", f'model_name="{name}"', state.counters["prompt_tokens"]),
        ("sglang:generation_tokens_total", "counter", f'model_name="{name}"', state.counters["generation_tokens"]),
        ("sglang:num_requests_total", "counter", f'model_name="{name}"', state.counters["requests"]),
    ]
    if state.lora.settings.enabled:
        series += [
            ("sglang:lora_pool_slots_total", "gauge", scheduler, state.options.max_loras_per_batch),
            ("sglang:lora_pool_slots_used", "gauge", scheduler, 0),
        ]
    lines = []
    for metric, kind, labels, value in series:
        family = metric.removesuffix("_total") if kind == "counter" else metric
        lines += [f"# HELP {family} {family}", f"# TYPE {family} {kind}", f"{metric}{{{labels}}} {float(value)}"]
    return "\n".join(lines) + "\n"
