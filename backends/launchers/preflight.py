"""Preflight: can this host run an SGLang plan? Every problem is found and reported before anything starts,
not only the first. What the host has comes in a HostFacts object (read_host() reads the real one:
/proc/cpuinfo, /proc/meminfo, statvfs, nvidia-smi when present), so that tests can describe a bad host."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from backends.launchers.sglang_plan import SglangPlan, Step
from backends.launchers.weights import WeightsError, WeightSizes, scan_weights
from backends.sglang_launch import SglangLaunchConfig

GIB = 1024 ** 3
CPU_FLAGS = {  # kt-kernel/README.md via reference/sglang-kt.md §3.1
    "AMXINT8": ("amx_tile", "amx_int8"),
    "RAWINT4": ("avx512f", "avx512bw"),
}
RAM_USABLE = 0.95             # the OS and the server's own buffers need the rest
DEFAULT_MEM_FRACTION = 0.9    # what SGLang may take of each GPU when mem_fraction_static is unset (a check only)
FIND_SPEC = ("import importlib.util, json, sys; "
             "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))")


@dataclass(frozen=True)
class HostFacts:
    cpu_flags: frozenset[str]
    mem_total_bytes: int
    gpu_memory_mib: tuple[int, ...] | None          # one entry per GPU; None: no nvidia-smi here
    free_bytes: Callable[[str], int]                # free disk on the filesystem holding this path
    filesystem: Callable[[str], int]                # an id of that filesystem (st_dev)
    modules: Callable[[str, Sequence[str]], dict[str, bool]]   # python -> {module: importable}


def existing_parent(path: str) -> str:
    current = Path(path).absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return str(current)


def read_cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def read_mem_total(meminfo: str = "/proc/meminfo") -> int:
    for line in Path(meminfo).read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def read_gpus() -> tuple[int, ...] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(int(float(line)) for line in out.split() if line.strip())


def python_modules(python: str, modules: Sequence[str]) -> dict[str, bool]:
    try:
        out = subprocess.run([python, "-c", FIND_SPEC, *modules], capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout) if out.returncode == 0 else dict.fromkeys(modules, False)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return dict.fromkeys(modules, False)


def read_host() -> HostFacts:
    return HostFacts(
        cpu_flags=read_cpu_flags(), mem_total_bytes=read_mem_total(), gpu_memory_mib=read_gpus(),
        free_bytes=lambda path: shutil.disk_usage(existing_parent(path)).free,
        filesystem=lambda path: os.stat(existing_parent(path)).st_dev,
        modules=python_modules)


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [f"preflight: {'ok' if self.ok else f'{len(self.problems)} problem(s)'}"]
        lines += [f"  PROBLEM {p}" for p in self.problems] + [f"  note    {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def gib(count: int | float) -> str:
    return f"{count / GIB:.1f} GiB"


def is_executable(command: str) -> bool:
    return shutil.which(command) is not None if os.sep not in command else os.access(command, os.X_OK)


def check_paths(plan: SglangPlan, launch: SglangLaunchConfig, found: Findings) -> None:
    if not os.path.isdir(launch.model_path):
        found.problems.append(f"model_path: {launch.model_path} is not a directory")
    if launch.kt_scripts is not None and not os.path.isdir(launch.kt_scripts):
        found.problems.append(f"kt_scripts: {launch.kt_scripts} is not a directory")
    for step in plan.steps:
        if step.done:
            continue
        if step.script is not None and os.path.isdir(os.path.dirname(step.script)) and not os.path.isfile(step.script):
            found.problems.append(f"step {step.name}: the converter {step.script} does not exist")
        if step.input not in (None, launch.model_path) and not os.path.exists(step.input) \
                and not _made_by_earlier_step(plan, step):
            found.problems.append(f"step {step.name}: its input {step.input} does not exist")
        if os.path.lexists(step.partial):
            found.notes.append(f"step {step.name}: {step.partial} is left from an interrupted run; it is removed "
                               "and the step runs again")
    server = plan.argv[0]
    if not is_executable(server):
        found.problems.append(f"server: {server} is not an executable (launch.python / launch.server_command)")


def _made_by_earlier_step(plan: SglangPlan, step: Step) -> bool:
    return any(other.output == step.input for other in plan.steps[: plan.steps.index(step)])


def check_disk(plan: SglangPlan, sizes: WeightSizes | None, host: HostFacts, found: Findings) -> None:
    """Each weight conversion's output estimated from the model's safetensors headers, summed per filesystem."""
    if sizes is None:
        return
    estimate = {"int4-to-bf16": sizes.bf16_bytes, "bf16-to-int8": sizes.int8_bytes}
    needs: dict[int, list[tuple[Step, int]]] = {}
    for step in plan.steps:
        if not step.done and step.name in estimate:
            needs.setdefault(host.filesystem(step.output), []).append((step, estimate[step.name]))
    for steps in needs.values():
        total = sum(size for _, size in steps)
        free = host.free_bytes(steps[0][0].output)
        if total > free:
            outputs = ", ".join(f"{step.name} -> {step.output} (about {gib(size)})" for step, size in steps)
            found.problems.append(f"disk: {outputs} need about {gib(total)} on the filesystem of "
                                  f"{existing_parent(steps[0][0].output)}, which has {gib(free)} free")


def check_ram(launch: SglangLaunchConfig, sizes: WeightSizes | None, host: HostFacts, found: Findings) -> None:
    if sizes is None:
        return
    need = sizes.cpu_expert_bytes(launch.kt_method)
    if need > host.mem_total_bytes * RAM_USABLE:
        found.problems.append(f"RAM: the {launch.kt_method} CPU experts take about {gib(need)}; this host has "
                              f"{gib(host.mem_total_bytes)} (at most {RAM_USABLE:.0%} of it is usable)")


def check_cpu(launch: SglangLaunchConfig, host: HostFacts, found: Findings) -> None:
    missing = [flag for flag in CPU_FLAGS[launch.kt_method] if flag not in host.cpu_flags]
    if missing:
        needs = "AMX (Sapphire Rapids or newer)" if launch.kt_method == "AMXINT8" else "AVX512F and AVX512BW"
        found.problems.append(f"CPU: kt_method {launch.kt_method} needs {needs}; /proc/cpuinfo lacks "
                              f"{', '.join(missing)}" + ("; RAWINT4 needs only AVX512F+BW"
                                                         if launch.kt_method == "AMXINT8" else ""))


def check_gpus(launch: SglangLaunchConfig, sizes: WeightSizes | None, host: HostFacts, found: Findings) -> None:
    gpus = host.gpu_memory_mib
    if gpus is None:
        found.notes.append("GPU: nvidia-smi is not on PATH here; GPU count and memory were not checked")
        return
    if len(gpus) < launch.tp:
        found.problems.append(f"GPU: tp is {launch.tp} but nvidia-smi shows {len(gpus)} GPU(s)")
        return
    if sizes is not None:
        per_gpu = sizes.other_bytes / launch.tp
        smallest = min(gpus[: launch.tp]) * 1024 * 1024 * (launch.mem_fraction_static or DEFAULT_MEM_FRACTION)
        if per_gpu > smallest:
            found.problems.append(f"GPU: the non-expert weights take about {gib(per_gpu)} per GPU at tp "
                                  f"{launch.tp}; the smallest GPU offers {gib(smallest)} at mem_fraction_static "
                                  f"{launch.mem_fraction_static or DEFAULT_MEM_FRACTION}")


def check_software(plan: SglangPlan, launch: SglangLaunchConfig, host: HostFacts, found: Findings) -> None:
    if launch.server_command is not None:
        return  # a stand-in server: it brings its own dependencies
    if not is_executable(launch.python):
        return  # already reported by check_paths
    importable = host.modules(launch.python, ["sglang", "kt_kernel"])
    for module, package in (("sglang", "sglang-kt"), ("kt_kernel", "kt-kernel")):
        if not importable.get(module):
            found.problems.append(f"software: {launch.python} cannot import {module} (pip install {package})")


def preflight(plan: SglangPlan, launch: SglangLaunchConfig, host: HostFacts) -> Findings:
    found = Findings()
    check_paths(plan, launch, found)
    sizes = None
    if os.path.isdir(launch.model_path):
        try:
            sizes = scan_weights(Path(launch.model_path))
        except WeightsError as exc:
            found.problems.append(f"model_path: {exc}")
    check_disk(plan, sizes, host, found)
    check_ram(launch, sizes, host, found)
    check_cpu(launch, host, found)
    check_gpus(launch, sizes, host, found)
    check_software(plan, launch, host, found)
    return found
