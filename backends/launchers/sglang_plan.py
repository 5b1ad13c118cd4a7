"""SglangPlan: what `kimi-gateway launch sglang-kt` does for one SGLang backend, as data. It holds the weight
and adapter conversion steps (each with its command, its output and whether that output is already there) and
then the exact `sglang.launch_server` argv. The flag names are those of sglang-kt 0.7.2
(reference/sglang-kt.md §3.1: `--kt-weight-path`/`--kt-method`, not the removed `--kt-amx-*`).

Two weight paths, by `kt_method` (§3.2, §3.5):
- AMXINT8: the shipped INT4 experts are unpacked to BF16 (there is no INT4 input type for
  convert_cpu_weights.py), then quantised with `convert_cpu_weights.py --input-type bf16 --quant-method int8`;
  SGLang gets `--kt-method AMXINT8 --kt-weight-path <INT8 output>`.
- RAWINT4: KTransformers' current documented path; the native INT4 folder is both the model and the CPU
  weights. Nothing is converted.

Adapters (§0.1, §1.7, §3.4): attention-only adapters are preloaded with `--enable-lora --lora-paths
name=dir`; a KT-SFT output (`fused_expert_lora.safetensors`) is converted with
`convert_kt_to_sglang_adapter.py` and served by a backend dedicated to it (`expert_adapter: NAME`), the only
adapter that server may have. That conversion is the gateway's own (adapters/conversion.py, run by
`conversion.kt_python` into the conversion cache): the caller hands its step in, so that a launched server and a
gateway convert an adapter the same way, once.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Sequence
from urllib.parse import urlsplit

from backends.sglang import SglangConfig
from backends.sglang_launch import SglangLaunchConfig

AdapterKind = Literal["attention", "experts", "kt-sft"]   # kt-sft: KT training output, converted first
KT_SFT_MARKER = "fused_expert_lora.safetensors"
PARTIAL_SUFFIX = ".partial"
DEFAULT_BF16_SCRIPT = "convert_moe_to_bf16.py"
INT8_SCRIPT = "convert_cpu_weights.py"


class PlanError(ValueError):
    """The config asks for something SGLang-KT cannot do; `problems` lists every one."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(f"- {p}" for p in problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class PlanAdapter:
    name: str           # the name requests select (the gateway's label `name@hash8`, or the expert adapter's name)
    source: str         # its directory
    kind: AdapterKind


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    command: list[str]
    output: str           # written into `output + .partial`, renamed into place when the command succeeds
    done: bool            # the output is already there: the step is skipped
    input: str | None = None
    script: str | None = None   # the converter script the command runs (preflight checks it exists)

    @property
    def partial(self) -> str:
        return self.output + PARTIAL_SUFFIX


@dataclass(frozen=True)
class SglangPlan:
    backend: str
    kt_method: str
    steps: list[Step]
    argv: list[str]
    env: dict[str, str]
    health_url: str
    lora_paths: dict[str, str] = field(default_factory=dict)
    expert_adapter: str | None = None

    def as_dict(self) -> dict:
        return {
            "backend": self.backend, "kt_method": self.kt_method,
            "steps": [{**asdict(step), "will_run": not step.done} for step in self.steps],
            "server": {"argv": self.argv, "env": self.env, "health_url": self.health_url,
                       "lora_paths": self.lora_paths, "expert_adapter": self.expert_adapter},
        }

    def text(self) -> str:
        lines = [f"SGLang-KT launch plan for backend {self.backend!r} (kt_method {self.kt_method})", ""]
        for number, step in enumerate(self.steps, 1):
            status = "already done, skipped" if step.done else "will run"
            lines += [f"step {number}: {step.what} [{status}]", f"  output: {step.output}",
                      f"  $ {shlex.join(step.command)}", ""]
        if not self.steps:
            lines += ["no conversion steps: the weights are served as they are", ""]
        env = " ".join(f"{key}={shlex.quote(value)}" for key, value in sorted(self.env.items()))
        lines += [f"server (health {self.health_url}):", f"  $ {env + ' ' if env else ''}{shlex.join(self.argv)}"]
        return "\n".join(lines) + "\n"


def weight_steps(launch: SglangLaunchConfig) -> list[Step]:
    if launch.kt_method != "AMXINT8":
        return []
    assert launch.bf16_path and launch.kt_weight_path and launch.kt_scripts  # the config model checked
    scripts = Path(launch.kt_scripts)
    bf16_partial = launch.bf16_path + PARTIAL_SUFFIX
    if launch.bf16_command:
        bf16 = [arg.replace("{input}", launch.model_path).replace("{output}", bf16_partial)
                for arg in launch.bf16_command]
        bf16_script = None
    else:
        bf16_script = str(scripts / DEFAULT_BF16_SCRIPT)
        bf16 = [launch.python, bf16_script, "--model-dir", launch.model_path, "--output-dir", bf16_partial]
    int8_script = str(scripts / INT8_SCRIPT)
    int8 = [launch.python, int8_script, "--input-path", launch.bf16_path, "--input-type", "bf16",
            "--output", launch.kt_weight_path + PARTIAL_SUFFIX, "--quant-method", "int8",
            "--threadpool-count", str(launch.kt_threadpool_count)]   # the NUMA split must match the server's
    if launch.convert_threads or launch.kt_cpuinfer:
        int8 += ["--cpuinfer-threads", str(launch.convert_threads or launch.kt_cpuinfer)]
    return [
        Step("int4-to-bf16", "unpack the shipped INT4 experts to BF16", bf16, launch.bf16_path,
             done=os.path.isdir(launch.bf16_path), input=launch.model_path, script=bf16_script),
        Step("bf16-to-int8", "quantise the BF16 experts to INT8 CPU weights (AMXINT8)", int8,
             launch.kt_weight_path, done=os.path.isdir(launch.kt_weight_path), input=launch.bf16_path,
             script=int8_script),
    ]


def served_dirs(adapters: Sequence[PlanAdapter], conversions: Mapping[str, Step]) -> tuple[dict[str, str], list[str]]:
    """Every adapter's served directory by name (a KT-SFT output: its conversion's), and the KT-SFT adapters that
    have no conversion step."""
    served, unconverted = {}, []
    for adapter in adapters:
        if adapter.kind != "kt-sft":
            served[adapter.name] = adapter.source
        elif adapter.name in conversions:
            served[adapter.name] = conversions[adapter.name].output
        else:
            unconverted.append(adapter.name)
    return served, unconverted


def check_adapters(backend: SglangConfig, launch: SglangLaunchConfig, adapters: Sequence[PlanAdapter]) -> list[str]:
    """What SGLang-KT 0.7.2 refuses at start-up, said before anything runs (§0.1, §1.5)."""
    problems = []
    experts = [a for a in adapters if a.kind != "attention"]
    where = f"backends.{backend.name}"
    if backend.expert_adapter is None:
        problems += [f"adapter {a.name!r} touches the MoE experts: it needs an SGLang backend dedicated to it "
                     f"(`expert_adapter: {a.name}`); {where} serves attention-only adapters" for a in experts]
    else:
        others = [a.name for a in adapters if a.name != backend.expert_adapter]
        if others:
            problems.append(f"{where} is dedicated to the expert adapter {backend.expert_adapter!r}; SGLang-KT "
                            f"allows no other adapter beside it: {', '.join(others)}")
        if not any(a.name == backend.expert_adapter for a in adapters):
            problems.append(f"{where}.expert_adapter {backend.expert_adapter!r} is not a registered adapter of "
                            "this backend")
        if launch.kt_num_gpu_experts not in (None, 0):
            problems.append(f"{where}.launch.kt_num_gpu_experts must be 0 with an expert adapter (KT expert LoRA "
                            "runs every expert on the CPU)")
        if launch.kt_gpu_prefill_token_threshold is not None:
            problems.append(f"{where}.launch.kt_gpu_prefill_token_threshold cannot be used with an expert adapter")
        if launch.max_running_requests is not None and launch.max_running_requests < 2:
            problems.append(f"{where}.launch.max_running_requests must be >= 2 with an expert adapter")
    lora_count = len([a for a in adapters if a.kind == "attention"])
    if backend.max_loaded_adapters is not None:
        if backend.max_loaded_adapters < launch.max_loras_per_batch:
            problems.append(f"{where}.max_loaded_adapters ({backend.max_loaded_adapters}) must be >= "
                            f"launch.max_loras_per_batch ({launch.max_loras_per_batch}) (--max-loaded-loras)")
        if lora_count > backend.max_loaded_adapters:
            problems.append(f"{where}: {lora_count} adapters to preload exceed max_loaded_adapters "
                            f"({backend.max_loaded_adapters})")
    if not adapters and backend.expert_adapter is None and backend.max_lora_rank is None:
        pass  # no LoRA at all: a base-model server
    return problems


def server_argv(backend: SglangConfig, launch: SglangLaunchConfig, host: str, port: int,
                lora_paths: dict[str, str]) -> list[str]:
    weights = launch.kt_weight_path if launch.kt_method == "AMXINT8" else launch.model_path
    argv = list(launch.server_command or (launch.python, "-m", "sglang.launch_server"))
    argv += ["--model-path", launch.model_path, "--trust-remote-code"]
    if backend.served_model_name:
        argv += ["--served-model-name", backend.served_model_name]
    argv += ["--host", host, "--port", str(port), "--tensor-parallel-size", str(launch.tp),
             "--kt-method", launch.kt_method, "--kt-weight-path", str(weights)]
    gpu_experts = 0 if backend.expert_adapter is not None else launch.kt_num_gpu_experts
    optional = [("--kt-cpuinfer", launch.kt_cpuinfer), ("--kt-threadpool-count", launch.kt_threadpool_count),
                ("--kt-num-gpu-experts", gpu_experts),
                ("--kt-max-deferred-experts-per-token", launch.kt_max_deferred_experts_per_token),
                ("--kt-gpu-prefill-token-threshold", launch.kt_gpu_prefill_token_threshold),
                ("--context-length", launch.context_length), ("--mem-fraction-static", launch.mem_fraction_static),
                ("--max-running-requests", launch.max_running_requests)]
    argv += [arg for flag, value in optional if value is not None for arg in (flag, str(value))]
    argv += [*backend.parser_args(), "--enable-metrics"]   # the generation's parsers (§4, backends/generations.py)
    if lora_paths or backend.max_lora_rank is not None:
        argv += ["--enable-lora", "--lora-backend", launch.lora_backend,
                 "--max-loras-per-batch", str(launch.max_loras_per_batch)]
        if backend.max_loaded_adapters is not None:
            argv += ["--max-loaded-loras", str(backend.max_loaded_adapters)]
        if backend.max_lora_rank is not None:
            argv += ["--max-lora-rank", str(backend.max_lora_rank)]
        if lora_paths:
            argv += ["--lora-paths", *(f"{name}={path}" for name, path in lora_paths.items())]
        else:  # run-time loads only: SGLang then needs the rank and the modules up front (§1.5)
            argv += ["--lora-target-modules", "all"]
    return argv + list(launch.args)


def replica_address(backend: SglangConfig, launch: SglangLaunchConfig, replica: int) -> tuple[str, int, str]:
    urls = backend.endpoints
    if not 0 <= replica < len(urls):
        raise PlanError([f"backends.{backend.name} has {len(urls)} URL(s); replica {replica} does not exist"])
    address = urlsplit(urls[replica])
    port = address.port or (443 if address.scheme == "https" else 80)
    host = launch.host or address.hostname or "127.0.0.1"
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return host, port, f"http://{probe_host}:{port}/health"


def plan_sglang(backend: SglangConfig, adapters: Sequence[PlanAdapter], *, replica: int = 0,
                conversions: Mapping[str, Step] | None = None) -> SglangPlan:
    """The plan for one replica of `backend`; PlanError lists every config-level problem. `conversions`: the
    conversion step of each KT-SFT adapter, by name (gateway/launch_cli.py makes them with the gateway's
    converter)."""
    launch = backend.launch
    if launch is None:
        raise PlanError([f"backends.{backend.name} has no `launch:` block"])
    problems = check_adapters(backend, launch, adapters)
    conversions = conversions or {}
    served, unconverted = served_dirs(adapters, conversions)
    problems += [f"adapter {name!r} is a KT-SFT checkpoint: converting it needs `conversion.kt_python` (run "
                 "`kimi-gateway setup converters`, which prints the line)" for name in unconverted]
    if problems:
        raise PlanError(problems)
    host, port, health_url = replica_address(backend, launch, replica)
    converting = [conversions[a.name] for a in adapters if a.name in conversions]
    return SglangPlan(backend=backend.name, kt_method=launch.kt_method, steps=[*weight_steps(launch), *converting],
                      argv=server_argv(backend, launch, host, port, served), env=dict(launch.env),
                      health_url=health_url, lora_paths=served, expert_adapter=backend.expert_adapter)
