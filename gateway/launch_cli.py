"""`kimi-gateway launch sglang-kt|llama-server --config FILE --backend NAME`: start and supervise one backend
from its `launch:` block. This module only wires: the registry's adapters for the backend, the plan
(backends/launchers/sglang_plan.py), the preflight, the conversion steps and the supervisor. KT-SFT adapters
are converted by the gateway's own converter (gateway/conversion.py: `conversion.kt_python`, the conversion
cache), so a launched server and a gateway serve the same converted files."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from adapters import converter_env
from adapters.conversion import KT_TO_SGLANG, ConversionError, ToolConverter
from adapters.validation import AdapterFacts, AdapterValidationError, validate_adapter
from backends.launchers.preflight import HostFacts, preflight, read_host
from backends.launchers.sglang_plan import PlanAdapter, PlanError, SglangPlan, Step, plan_sglang
from backends.launchers.llama_plan import llama_supervisors, plan_llama
from backends.launchers.steps import StepError, run_steps
from backends.launchers.supervisor import LaunchError, ServerSpec, ServerState, Supervisor
from backends.llamacpp import LlamaCppConfig
from backends.sglang import SglangConfig
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.conversion import converter_of

EXIT_PROBLEMS = 1      # config or preflight problems, a failed step
EXIT_CRASH_LOOP = 3    # the server kept crashing: the restart limit was reached


def find_backend(config: GatewayConfig, name: str, kind: str) -> SglangConfig | LlamaCppConfig:
    for backend in config.backends:
        if backend.name == name:
            if backend.kind != kind:
                raise ConfigError(f"backend {name!r} is of kind {backend.kind!r}, not {kind!r}")
            if backend.launch is None:
                raise ConfigError(f"backends.{name} has no `launch:` block")
            return backend
    raise ConfigError(f"no backend named {name!r}; configured: {', '.join(b.name for b in config.backends)}")


async def registered_specs(config: GatewayConfig, backend: str) -> list[tuple[str, str | None, str | None]]:
    """(name, source, gguf) of every adapter registered for `backend`: the config's, and those added at run time
    to the registry (the configured store; a SQLite file that does not exist yet is not created here), with
    their active version's files."""
    found = {spec.name: (spec.name, spec.source, spec.gguf) for spec in config.adapters if backend in spec.backends}
    if config.store.kind != "sqlite" or (Path(config.state_dir).expanduser() / "registry.sqlite3").exists():
        from gateway.state import store_of

        store = store_of(config)   # the gateway's own store: SQLite in state_dir, or the fleet's PostgreSQL
        await store.open()
        try:
            for record in await store.adapters():
                if backend not in record.spec.backends:
                    continue
                active = [v for v in await store.versions(record.spec.name) if v.version == record.active]
                source, gguf = (active[0].source, active[0].gguf) if active else (record.spec.source, record.spec.gguf)
                found[record.spec.name] = (record.spec.name, source, gguf)
        finally:
            await store.close()
    return sorted(found.values())


def sglang_adapters(config: GatewayConfig, specs: Sequence[tuple[str, str | None, str | None]]
                    ) -> tuple[list[PlanAdapter], dict[str, AdapterFacts]]:
    """Each adapter's kind from its files, and the facts of those to convert: a KT-SFT output is converted
    first; a PEFT dir is served under the gateway's version label `name@hash8` (so a gateway finds it loaded), an
    expert adapter under its name."""
    adapters, kt_sft, problems = [], {}, []
    for name, source, gguf in specs:
        if source is None:
            continue
        try:
            facts = validate_adapter(source, gguf, config.adapter_roots)   # the hash the lifecycle gives the version
        except AdapterValidationError as exc:
            problems.append(f"adapter {name!r}: {exc}")
            continue
        if facts.source_format == "kt-sft":
            adapters.append(PlanAdapter(name, facts.source_path or source, "kt-sft"))
            kt_sft[name] = facts
        elif facts.touches_experts:
            adapters.append(PlanAdapter(name, facts.source_path or source, "experts"))
        else:
            adapters.append(PlanAdapter(f"{name}@{facts.content_hash[:8]}", facts.source_path or source, "attention"))
    if problems:
        raise PlanError(problems)
    return adapters, kt_sft


def conversion_steps(converter: ToolConverter, kt_sft: dict[str, AdapterFacts]) -> dict[str, Step]:
    """The plan's step for each KT-SFT adapter: the gateway converter's command and cache entry. Without
    `conversion.kt_python` there is none (the plan says what to set); with one that lacks kt-kernel, the command
    names the script it would run and the preflight says how to get it."""
    if not converter.settings.kt_python:
        return {}
    steps = {}
    for name, facts in kt_sft.items():
        output = str(converter.cached(facts, KT_TO_SGLANG))
        try:
            command = converter.command(facts, KT_TO_SGLANG)
            script: str | None = command[1]
        except ConversionError:
            script = None
            command = [converter.settings.kt_python, f"<site-packages of {converter.settings.kt_python}>/"
                       f"{converter_env.KT_SCRIPT}", str(facts.source_path), output, "--base-model-name-or-path",
                       converter.settings.base_name]
        steps[name] = Step(f"adapter-{name}", f"convert the KT-SFT adapter {name} to SGLang's composite form "
                           "(conversion.kt_python, into the conversion cache)", command, output,
                           done=os.path.isdir(output), input=str(facts.source_path), script=script)
    return steps


def conversion_problems(converter: ToolConverter, plan: SglangPlan) -> list[str]:
    """What the KT converter Python lacks, when the plan has a KT-SFT conversion still to run."""
    if not any(step.name.startswith("adapter-") and not step.done for step in plan.steps):
        return []
    return converter_env.check_kt(converter.settings.kt_python) if converter.settings.kt_python else []


def build_sglang_plan(config: GatewayConfig, backend: SglangConfig, replica: int
                      ) -> tuple[SglangPlan, ToolConverter, dict[str, AdapterFacts]]:
    specs = asyncio.run(registered_specs(config, backend.name))
    adapters, kt_sft = sglang_adapters(config, specs)
    converter = converter_of(config, None)
    plan = plan_sglang(backend, adapters, replica=replica, conversions=conversion_steps(converter, kt_sft))
    return plan, converter, kt_sft


async def run_conversions(plan: SglangPlan, converter: ToolConverter, kt_sft: dict[str, AdapterFacts],
                          log_path: Path, *, echo: bool = True) -> list[str]:
    """The plan's steps not yet done: the weight conversions (run_steps), then each KT-SFT adapter through the
    gateway's converter (its timeout, log, output validation and cache). The names of those that ran."""
    adapter_steps = {f"adapter-{name}": name for name in kt_sft}
    ran = await run_steps([s for s in plan.steps if s.name not in adapter_steps], log_path, echo=echo)
    for step in plan.steps:
        if step.name not in adapter_steps or os.path.isdir(step.output):
            continue

        def progress(_, line: str, name: str = step.name) -> None:
            if echo:
                print(f"[{name}] {line}", file=sys.stderr, flush=True)
        try:
            await converter.convert(kt_sft[adapter_steps[step.name]], [KT_TO_SGLANG], progress)
        except ConversionError as exc:
            raise StepError(f"step {step.name} failed: {exc}") from exc
        ran.append(step.name)
    return ran


def logs_dir(config: GatewayConfig) -> Path:
    return Path(config.state_dir).expanduser() / "logs"


async def supervise(supervisors: Sequence[Supervisor], files: Sequence[str] = ()) -> int:
    """Start every server (health-gated), then keep them up until SIGTERM/SIGINT, which is forwarded to each
    (SIGTERM: the server drains) before this returns; a signal during a long start cancels it. A crash loop
    ends the launch with EXIT_CRASH_LOOP."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    try:
        starting = asyncio.gather(*(s.start(files) for s in supervisors))
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
        try:
            await starting
        except asyncio.CancelledError:
            await asyncio.gather(*(s.stop() for s in supervisors))
            return 0
        except LaunchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            await asyncio.gather(*(s.stop() for s in supervisors))
            return EXIT_PROBLEMS
        for s in supervisors:
            print(f"[launch] {s.spec.name} is ready ({s.spec.health_url}, pid {s.pid})", file=sys.stderr, flush=True)
        ended = [asyncio.create_task(s.wait()) for s in supervisors]
        await asyncio.wait([stopping, *ended], return_when=asyncio.FIRST_COMPLETED)
        failed = [s for s in supervisors if s.state == ServerState.FAILED]
        await asyncio.gather(*(s.stop() for s in supervisors))
        for task in ended:
            task.cancel()
        if failed:
            print(f"error: {', '.join(s.spec.name for s in failed)} kept crashing; gave up after "
                  f"{failed[0].spec.restart.max_crashes} restarts (see {failed[0].spec.log_path})", file=sys.stderr)
            return EXIT_CRASH_LOOP
        return 0
    finally:
        stopping.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def sglang_supervisor(plan: SglangPlan, backend: SglangConfig, logs: Path) -> Supervisor:
    launch = backend.launch
    assert launch is not None
    spec = ServerSpec(name=backend.name, argv=lambda _files: plan.argv, health_url=plan.health_url,
                      log_path=logs / f"{backend.name}.log", env=plan.env, ready_timeout_s=launch.ready_timeout_s,
                      stop_grace_s=launch.stop_grace_s, restart=launch.restart.policy(),
                      log_max_bytes=launch.log.max_bytes, log_backups=launch.log.backups, echo=True)
    return Supervisor(spec)


def launch_sglang(args: argparse.Namespace, host: HostFacts | None = None) -> int:
    config = load_config(args.config)
    backend = find_backend(config, args.backend, "sglang")
    try:
        plan, converter, kt_sft = build_sglang_plan(config, backend, args.replica)
    except PlanError as exc:
        print(f"error: backends.{backend.name} cannot be launched:\n{exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    findings = preflight(plan, backend.launch, host or read_host())
    findings.problems += conversion_problems(converter, plan)
    if args.json:
        print(json.dumps({**plan.as_dict(), "preflight": {"problems": findings.problems, "notes": findings.notes}},
                         indent=2))
    elif args.dry_run:
        print(plan.text() + "\n" + findings.text(), end="")
    if args.dry_run or args.json:
        return 0 if findings.ok or args.skip_preflight else EXIT_PROBLEMS
    if not findings.ok:
        if not args.skip_preflight:
            print("error: preflight found problems; nothing was started\n" + findings.text(), file=sys.stderr)
            return EXIT_PROBLEMS
        print("warning: --skip-preflight: starting despite\n" + findings.text(), file=sys.stderr)
    if kt_sft:   # the converted output is validated against the base model, as the gateway does
        from gateway.state import base_model_dims

        converter = converter_of(config, base_model_dims(config))
    try:
        asyncio.run(run_conversions(plan, converter, kt_sft, logs_dir(config) / f"{backend.name}-steps.log"))
    except StepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    return asyncio.run(supervise([sglang_supervisor(plan, backend, logs_dir(config))]))


def launch_llama(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    backend = find_backend(config, args.backend, "llamacpp")
    specs = asyncio.run(registered_specs(config, backend.name))
    loras = [gguf for _, _, gguf in specs if gguf]
    try:
        plan = plan_llama(backend, loras, state_dir=config.state_dir)
    except PlanError as exc:
        print(f"error: backends.{backend.name} cannot be launched:\n{exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    elif args.dry_run:
        print(plan.text(), end="")
    if args.dry_run or args.json:
        return 0
    plan.write_files()
    return asyncio.run(supervise(llama_supervisors(plan, backend, logs_dir(config))))


def add_commands(commands: argparse._SubParsersAction) -> None:
    launch = commands.add_parser("launch", help="start and supervise a backend from its config `launch:` block")
    kinds = launch.add_subparsers(dest="launch_kind", required=True)
    for kind, run, help_text in (
            ("sglang-kt", launch_sglang, "SGLang + KTransformers: weight/adapter conversions, preflight, server"),
            ("llama-server", launch_llama, "llama.cpp llama-server with every registered GGUF adapter")):
        command = kinds.add_parser(kind, help=help_text)
        command.add_argument("--config", required=True)
        command.add_argument("--backend", required=True, help="the backend's name in the config")
        command.add_argument("--dry-run", action="store_true", help="print the plan and run nothing")
        command.add_argument("--json", action="store_true", help="the plan as JSON (implies --dry-run)")
        if kind == "sglang-kt":
            command.add_argument("--replica", type=int, default=0,
                                 help="which of the backend's URLs this host serves (default 0)")
            command.add_argument("--skip-preflight", action="store_true",
                                 help="start even if the preflight finds problems (they are printed)")
        command.set_defaults(run=run)

