"""`kimi-gateway launch sglang-kt|llama-server --config FILE --backend NAME`: start and supervise one backend
from its `launch:` block. This module only wires: the registry's adapters for the backend, the plan
(backends/launchers/sglang_plan.py), the preflight, the conversion steps and the supervisor."""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Sequence

from adapters.validation import AdapterValidationError, validate_adapter
from backends.launchers.preflight import HostFacts, preflight, read_host
from backends.launchers.sglang_plan import KT_SFT_MARKER, PlanAdapter, PlanError, SglangPlan, plan_sglang
from backends.launchers.llama_plan import llama_supervisors, plan_llama
from backends.launchers.steps import StepError, run_steps
from backends.launchers.supervisor import LaunchError, ServerSpec, ServerState, Supervisor
from backends.llamacpp import LlamaCppConfig
from backends.sglang import SglangConfig
from gateway.config import ConfigError, GatewayConfig, load_config

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


def sglang_adapters(config: GatewayConfig, specs: Sequence[tuple[str, str | None, str | None]]) -> list[PlanAdapter]:
    """Each adapter's kind from its files: a KT-SFT output is converted first; a PEFT dir is served under the
    gateway's version label `name@hash8` (so a gateway finds it loaded), an expert adapter under its name."""
    adapters, problems = [], []
    for name, source, gguf in specs:
        if source is None:
            continue
        if (Path(source) / KT_SFT_MARKER).is_file():
            adapters.append(PlanAdapter(name, source, "kt-sft"))
            continue
        try:
            facts = validate_adapter(source, gguf, config.adapter_roots)   # the hash the lifecycle gives the version
        except AdapterValidationError as exc:
            problems.append(f"adapter {name!r}: {exc}")
            continue
        if facts.touches_experts:
            adapters.append(PlanAdapter(name, facts.source_path or source, "experts"))
        else:
            adapters.append(PlanAdapter(f"{name}@{facts.content_hash[:8]}", facts.source_path or source, "attention"))
    if problems:
        raise PlanError(problems)
    return adapters


def build_sglang_plan(config: GatewayConfig, backend: SglangConfig, replica: int) -> SglangPlan:
    specs = asyncio.run(registered_specs(config, backend.name))
    return plan_sglang(backend, sglang_adapters(config, specs), state_dir=config.state_dir, replica=replica)


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
        plan = build_sglang_plan(config, backend, args.replica)
    except PlanError as exc:
        print(f"error: backends.{backend.name} cannot be launched:\n{exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    findings = preflight(plan, backend.launch, host or read_host())
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
    try:
        asyncio.run(run_steps(plan.steps, logs_dir(config) / f"{backend.name}-steps.log"))
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

