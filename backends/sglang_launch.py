"""SglangLaunchConfig: the `launch:` block of an SGLang backend, read by `kimi-gateway launch sglang-kt`
(backends/launchers/sglang_plan.py turns it into steps and an argv). Names follow reference/sglang-kt.md §3."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from backends.config import Strict
from backends.launch_config import LogConfig, RestartConfig

# The weight paths the launcher knows how to prepare (sglang-kt.md §3.1-§3.5).
KT_METHODS = ("AMXINT8", "RAWINT4")


class SglangLaunchConfig(Strict):
    python: str = "python3"                      # the SGLang-KT environment's Python
    server_command: tuple[str, ...] | None = None   # replaces `<python> -m sglang.launch_server` (a stand-in)
    model_path: str                              # Kimi K2.5 as shipped (native INT4, compressed-tensors)
    kt_method: str
    bf16_path: str | None = None                 # AMXINT8: the INT4 -> BF16 output
    kt_weight_path: str | None = None            # AMXINT8: convert_cpu_weights.py output; RAWINT4: model_path
    kt_scripts: str | None = None                # AMXINT8: kt-kernel/scripts (convert_moe_to_bf16.py, convert_cpu_weights.py);
    # KT-SFT adapters are converted by the gateway's converter (`conversion.kt_python`), not from here
    bf16_command: tuple[str, ...] | None = None  # INT4 -> BF16, with {input} and {output}; default convert_moe_to_bf16.py
    host: str | None = None                      # default: the backend URL's host
    tp: int = Field(1, ge=1)
    kt_cpuinfer: int | None = Field(None, ge=1)
    kt_threadpool_count: int = Field(2, ge=1)
    kt_num_gpu_experts: int | None = Field(None, ge=0)
    kt_max_deferred_experts_per_token: int | None = Field(None, ge=0)
    kt_gpu_prefill_token_threshold: int | None = Field(None, ge=1)
    context_length: int | None = Field(None, ge=1)
    mem_fraction_static: float | None = Field(None, gt=0, lt=1)
    max_running_requests: int | None = Field(None, ge=1)
    lora_backend: Literal["triton", "csgmv"] = "triton"   # KT's docs use triton
    max_loras_per_batch: int = Field(8, ge=1)
    convert_threads: int | None = Field(None, ge=1)        # convert_cpu_weights.py --cpuinfer-threads
    args: tuple[str, ...] = ()                   # more launch_server flags, appended as given
    env: dict[str, str] = Field(default_factory=dict)
    ready_timeout_s: float = Field(3600.0, gt=0)  # loading ~600 GB of weights takes a while
    stop_grace_s: float = Field(600.0, gt=0)     # SIGTERM drains running requests (sglang-kt.md §2.4)
    restart: RestartConfig = RestartConfig()
    log: LogConfig = LogConfig()

    @field_validator("kt_method")
    @classmethod
    def _supported_method(cls, method: str) -> str:
        if method not in KT_METHODS:
            raise ValueError(f"kt_method {method!r} is not supported by `kimi-gateway launch`; supported: "
                             f"{', '.join(KT_METHODS)} (AMXINT8: INT4 -> BF16 -> INT8 CPU experts; RAWINT4: the "
                             "shipped INT4 weights as they are)")
        return method

    @field_validator("bf16_command")
    @classmethod
    def _command_has_placeholders(cls, command: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if command is not None and not all(any(f"{{{p}}}" in arg for arg in command) for p in ("input", "output")):
            raise ValueError("bf16_command must contain {input} and {output}")
        return command

    @model_validator(mode="after")
    def _paths_for_the_method(self) -> SglangLaunchConfig:
        if self.kt_method == "AMXINT8":
            missing = [key for key in ("bf16_path", "kt_weight_path", "kt_scripts") if getattr(self, key) is None]
            if missing:
                raise ValueError(f"kt_method AMXINT8 needs {', '.join(missing)} (the BF16 and INT8 outputs and "
                                 "kt-kernel's scripts directory)")
        elif self.bf16_path is not None or self.bf16_command is not None:
            raise ValueError("bf16_path/bf16_command are for kt_method AMXINT8; RAWINT4 serves model_path as is")
        elif self.kt_weight_path not in (None, self.model_path):
            raise ValueError("kt_method RAWINT4 serves the native weights: kt_weight_path is model_path "
                             "(leave it out)")
        return self
