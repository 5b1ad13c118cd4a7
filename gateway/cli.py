"""`kimi-gateway`: serve, check, demo, hash-key, the admin API as commands, launch and setup (docs/reference.md
lists every command and option)."""
from __future__ import annotations

import argparse
import logging
import sys

from gateway.adapters_cli import add_commands as add_admin_commands
from gateway.config import ConfigError, GatewayConfig, check_adapter_roots, load_config
from gateway.conversion import add_commands as add_setup_commands
from gateway.conversion import conversion_problems
from gateway.experiments_cli import add_commands as add_experiment_commands
from gateway.launch_cli import add_commands as add_launch_commands


def route_table(config: GatewayConfig) -> str:
    """One line per route: model name -> targets in fallback order (adapter@backend), profile."""
    from gateway.routing import RouteTable

    table = RouteTable(config)
    lines = []
    for route in table.routes():
        if route.experiment is not None:
            variants = ", ".join(f"{name} {weight}" for name, weight in route.experiment.variants.items())
            where = f"experiment [{variants}] sticky by {route.experiment.sticky_by}"
            if route.experiment.shadow:
                where += ", shadow " + ", ".join(f"{n} {f:g}" for n, f in route.experiment.shadow.items())
        else:
            where = " -> ".join(f"{t.adapter}@{t.backend}" if t.adapter else t.backend for t in route.targets)
        profile = route.profile or config.sampling.default_profile
        lines.append(f"  {route.name:<24} {where}   (profile {profile})")
    return "routes:\n" + "\n".join(lines)


def load_checked(path: str) -> GatewayConfig:
    """The config, with its adapters' files validated too (against the base model when one is configured) and
    its converter Pythons checked: what `check` reports is what stops `serve`."""
    from adapters.lifecycle import check_config_adapters
    from adapters.validation import AdapterValidationError
    from gateway.state import base_model_dims

    config = load_config(path)
    try:
        check_adapter_roots(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        check_config_adapters(config.adapters, config.adapter_roots, base_model_dims(config),
                              {b.name: getattr(b, "max_lora_rank", None) for b in config.backends},
                              {b.name: b.kind for b in config.backends})
    except AdapterValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if problems := conversion_problems(config):
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return config


def env_needed(config: GatewayConfig) -> list[tuple[str, str, bool]]:
    """(key path, variable, whether `serve` stops without it) for each env var the config names."""
    needed = [(f"auth.client_keys[{i}].key_env", key.key_env, True) for i, key in enumerate(config.auth.client_keys or ())]
    if config.store.kind == "postgres":
        needed.append(("store.dsn_env", config.store.dsn_env, True))
    if config.shared.kind == "redis":
        needed.append(("shared.url_env", config.shared.url_env, True))
    if config.tracing is not None and config.tracing.headers_env:
        needed.append(("tracing.headers_env", config.tracing.headers_env, True))
    needed += [(f"backends[{i}].api_key_env", b.api_key_env, False) for i, b in enumerate(config.backends)
               if b.api_key_env]
    return needed


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 1 on what makes the config unusable; an env var that is not set *here* is only noted (the check
    may run where the secrets are not), with whether `serve` would stop on it."""
    from gateway.config import resolve_secret

    config = load_checked(args.file)
    print(f"{args.file}: ok, {len(config.backends)} backends, {len(config.adapters)} adapters, "
          f"{len(config.routes)} routes, sampling mode {config.sampling.mode}")
    for where, variable, fatal in env_needed(config):
        if resolve_secret(variable) is None:
            print(f"note: {where}: the environment variable {variable} is not set here; `serve` "
                  + ("would stop on it" if fatal else "would call that backend without a key"))
    print(route_table(config))
    from gateway.generation_report import generation_table

    print(generation_table(config))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.server import serve

    config = load_checked(args.config)
    host, port = args.host or config.listen.host, args.port if args.port is not None else config.listen.port
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: expected 1 or more")
    if args.workers > 1:
        from gateway.workers import serve_workers

        serve_workers(args.config, config, host=host, port=port, workers=args.workers, http=args.http)
        return 0
    serve(config, host=host, port=port, http=args.http)
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    """Reads a client key on stdin (so it stays out of shell history) and prints its key-file entry."""
    import hashlib

    key = sys.stdin.readline().strip()
    if not key:
        print("error: no key on standard input", file=sys.stderr)
        return 1
    print(f"- {{name: {args.name}, sha256: {hashlib.sha256(key.encode()).hexdigest()}, models: [\"*\"]}}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo.run import run_demo

    return run_demo(port=args.port, workdir=args.workdir)


DESCRIPTION = ("An OpenAI-compatible gateway for Kimi K2.5 and its LoRA adapters: serve it, check a config, run "
               "the demo, manage adapters, backends and experiments of a running gateway, launch SGLang-KT or "
               "llama-server backends, set up the adapter converters.")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="kimi-gateway", description=DESCRIPTION)
    commands = root.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a config and print the route table")
    check.add_argument("file")
    check.set_defaults(run=cmd_check)
    serve_cmd = commands.add_parser("serve", help="run the gateway")
    serve_cmd.add_argument("--config", required=True)
    serve_cmd.add_argument("--host")
    serve_cmd.add_argument("--port", type=int)
    serve_cmd.add_argument("--workers", type=int, default=1,
                           help="gateway processes on the same port (metrics added up across them)")
    serve_cmd.add_argument("--http", choices=("lean", "uvicorn"), default="lean",
                           help="the HTTP server under the app: the gateway's own (lean, the default: less CPU per "
                                "request, bench/README.md) or uvicorn with httptools")
    serve_cmd.set_defaults(run=cmd_serve)
    hash_key = commands.add_parser("hash-key", help="print a key-file entry for the client key read on stdin")
    hash_key.add_argument("--name", default="client")
    hash_key.set_defaults(run=cmd_hash_key)
    demo = commands.add_parser("demo", help="build/find llama-server, make a tiny model + 2 adapters, serve them")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--workdir", help="where the demo's model, adapters and config go (default: user cache)")
    demo.set_defaults(run=cmd_demo)
    add_admin_commands(commands)
    add_setup_commands(commands)
    add_experiment_commands(commands)
    add_launch_commands(commands)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
