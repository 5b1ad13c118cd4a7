"""`kimi-gateway adapters list|show|add|swap|remove` and `kimi-gateway backends`: the admin API as commands.

Owns the argparse wiring, where the admin URL comes from (`--url`, else `--config`'s admin listener, else its
listener, else http://127.0.0.1:8080), the plain-text tables, and the exit codes: 0 done, 1 the gateway answered
with an error, 2 usage, 3 the gateway could not be reached (or did not answer in time). The admin key comes
only from $KIMI_GATEWAY_ADMIN_KEY and is never printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import httpx

from gateway.admin_client import (
    ADMIN_KEY_ENV,
    CHANGE_TIMEOUT_S,
    READ_TIMEOUT_S,
    AdminAPIError,
    AdminClient,
    GatewayNoAnswerError,
    GatewayUnreachableError,
)
from gateway.config import ConfigError, ListenConfig, load_config, resolve_secret

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_OK, EXIT_API_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
REPLICA_STATES = ("pending", "converting", "loading", "verifying", "ready", "draining", "unloaded", "failed",
                  "restart_needed")
PATH_WIDTH = 48     # keeps the versions table within 100 columns


class UsageError(Exception):
    """A command line the parser accepted but that cannot make a request (exit 2)."""


# ---------------------------------------------------------------- argparse wiring

def add_commands(commands: argparse._SubParsersAction) -> None:
    """Registers `adapters` (with its actions) and `backends` on the top-level subparsers."""
    adapters = commands.add_parser("adapters", help="list, show, add, swap or remove adapters of a running gateway")
    actions = adapters.add_subparsers(dest="action", required=True, metavar="{list,show,add,swap,remove}")
    action_parser(actions, "list", cmd_list, "one line per adapter")
    show = action_parser(actions, "show", cmd_show, "an adapter's fields, versions and replicas")
    show.add_argument("name", metavar="NAME", type=adapter_name)
    add = action_parser(actions, "add", cmd_add, "add an adapter; answers once it is loaded and verified")
    add.add_argument("name", metavar="NAME", type=adapter_name)
    add.add_argument("--source", metavar="DIR", help="PEFT adapter directory (a path on the gateway's machine)")
    add.add_argument("--gguf", metavar="FILE", help="GGUF adapter for llama.cpp (a path on the gateway's machine)")
    add.add_argument("--profile", metavar="PROFILE", help="sampling profile of its route (default: the config's)")
    add.add_argument("--backend", dest="backends", metavar="BACKEND", action="append", required=True,
                     help="a backend to load it on (repeat for several)")
    swap = action_parser(actions, "swap", cmd_swap, "load a new version, then flip traffic to it (or roll back)")
    swap.add_argument("name", metavar="NAME", type=adapter_name)
    swap.add_argument("--source", metavar="DIR", help="the new version's PEFT directory")
    swap.add_argument("--gguf", metavar="FILE", help="the new version's GGUF file")
    remove = action_parser(actions, "remove", cmd_remove, "drain, unload and forget an adapter")
    remove.add_argument("name", metavar="NAME", type=adapter_name)
    backends = commands.add_parser("backends", parents=[common_options()],
                                   help="backends and replicas of a running gateway: up, in flight, adapters")
    backends.set_defaults(run=run_command, action_run=cmd_backends, change=False)


def action_parser(actions: argparse._SubParsersAction, name: str, run: Callable, help_text: str
                  ) -> argparse.ArgumentParser:
    sub = actions.add_parser(name, help=help_text, description=help_text, parents=[common_options()])
    sub.set_defaults(run=run_command, action_run=run, change=name in ("add", "swap", "remove"))
    return sub


def common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", type=http_url, help="the gateway's admin URL (default: from --config, else "
                        f"{DEFAULT_URL}); the admin key is read from ${ADMIN_KEY_ENV}")
    common.add_argument("--config", metavar="FILE",
                        help="the gateway's config file: its admin_listen, else its listen, is the URL")
    common.add_argument("--json", action="store_true", help="print the API's JSON instead of tables")
    common.add_argument("--timeout", type=positive_seconds, metavar="SECONDS",
                        help=f"seconds to wait for an answer (default {READ_TIMEOUT_S:g}; add/swap/remove "
                             f"{CHANGE_TIMEOUT_S:g})")
    return common


def http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text) <= len("https://"):
        raise argparse.ArgumentTypeError(f"expected an http(s) URL like {DEFAULT_URL}")
    return text.rstrip("/")


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError("expected a number of seconds above 0")
    return value


def adapter_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected an adapter name")
    return text


def main(argv: Sequence[str] | None = None, transport: httpx.BaseTransport | None = None) -> int:
    """These commands alone (`adapters …`, `backends`), with an injectable transport; gateway.cli runs them too."""
    root = argparse.ArgumentParser(prog="kimi-gateway")
    add_commands(root.add_subparsers(dest="command", required=True))
    return run_command(root.parse_args(argv), transport)


# ---------------------------------------------------------------- running a command

def run_command(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    try:
        url, url_from = resolve_url(args.url, args.config)
        key = admin_key()
        if args.action_run is cmd_add and not (args.source or args.gguf):
            raise UsageError("adapters add needs --source DIR, --gguf FILE or both")
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    timeout_s = args.timeout or (CHANGE_TIMEOUT_S if args.change else READ_TIMEOUT_S)
    logging.getLogger("httpx").setLevel(logging.WARNING)   # a command's output is its table, not request logs
    try:
        with AdminClient(url, key, timeout_s=timeout_s, transport=transport) as client:
            args.action_run(client, args)
    except AdminAPIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.status == 401:   # (a 403 is the gateway's own words: its admin API is off, or the key may not)
            print(auth_hint(key), file=sys.stderr)
        return EXIT_API_ERROR
    except GatewayUnreachableError as exc:
        print(f"error: {exc}\nhint: {url_from}set --url to the gateway's admin URL, or --config to its config file",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    except GatewayNoAnswerError as exc:
        print(f"error: {exc}; it may still be working on it: see `kimi-gateway adapters list`, or wait longer "
              "with --timeout SECONDS", file=sys.stderr)
        return EXIT_UNREACHABLE
    return EXIT_OK


def resolve_url(url: str | None, config_path: str | None) -> tuple[str, str]:
    """The admin URL and, for messages, where it came from (empty for an explicit --url)."""
    if url:
        return url, ""
    if not config_path:
        return DEFAULT_URL, "that URL is the default (no --url or --config given); "
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise UsageError(f"--config: {exc}") from exc
    if config.admin_listen is not None:
        return listener_url(config.admin_listen), f"that URL is admin_listen of {config_path}; "
    return listener_url(config.listen), f"that URL is listen of {config_path} (it has no admin_listen); "


def listener_url(listen: ListenConfig) -> str:
    """Where a client reaches a listener: a wildcard bind address means this machine."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host, listen.host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{listen.port}"


def admin_key() -> str | None:
    key = resolve_secret(ADMIN_KEY_ENV)
    if key is not None and not (key.isascii() and key.isprintable()):
        raise UsageError(f"${ADMIN_KEY_ENV} holds characters an HTTP header cannot carry")
    return key


def auth_hint(key: str | None) -> str:
    if key is None:
        return f"hint: ${ADMIN_KEY_ENV} is not set: export it with one of the gateway's admin keys"
    return f"hint: the key in ${ADMIN_KEY_ENV} is not one of this gateway's admin keys (auth.admin_keys_env)"


def emit(args: argparse.Namespace, body: Any, render: Callable[[Any], str]) -> None:
    print(json.dumps(body, indent=2) if args.json else render(body))


# ---------------------------------------------------------------- the commands

def cmd_list(client: AdminClient, args: argparse.Namespace) -> None:
    emit(args, client.list_adapters(), lambda body: adapters_table(body.get("data") or []))


def cmd_show(client: AdminClient, args: argparse.Namespace) -> None:
    emit(args, client.get_adapter(args.name), adapter_detail)


def cmd_add(client: AdminClient, args: argparse.Namespace) -> None:
    body = {"name": args.name, "source": args.source, "gguf": args.gguf, "profile": args.profile,
            "backends": args.backends}
    emit(args, client.add_adapter({k: v for k, v in body.items() if v is not None}), adapter_detail)


def cmd_swap(client: AdminClient, args: argparse.Namespace) -> None:
    body = {k: v for k, v in (("source", args.source), ("gguf", args.gguf)) if v is not None}
    if args.json:
        emit(args, client.swap_adapter(args.name, body), adapter_detail)
        return
    before = client.get_adapter(args.name).get("active")
    started = time.monotonic()
    view = client.swap_adapter(args.name, body)
    print(swap_line(view, before, time.monotonic() - started))


def cmd_remove(client: AdminClient, args: argparse.Namespace) -> None:
    client.remove_adapter(args.name)
    if not args.json:
        print(f"removed {args.name}")


def cmd_backends(client: AdminClient, args: argparse.Namespace) -> None:
    emit(args, client.list_backends(), lambda body: backends_table(body.get("data") or []))


# ---------------------------------------------------------------- rendering (tolerant of missing and extra fields)

def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Plain columns two spaces apart; None shows as '-'; the last column is not padded."""
    cells = [list(headers)] + [[cell_text(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells)


def cell_text(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    return str(value)


def shorten(text: str | None, width: int = PATH_WIDTH) -> str | None:
    """Long paths keep their head and tail: '/adapters/le…/legal-v2.gguf'."""
    if text is None or len(text) <= width:
        return text
    head = (width - 1) // 3
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def replica_summary(view: dict[str, Any]) -> str:
    """'ready 2/2' or 'loading 1/2, failed 1/2': replicas of the active version, and of others unless unloaded."""
    active = view.get("active")
    replicas = [r for r in view.get("replicas") or [] if r.get("version") == active or r.get("state") != "unloaded"]
    if not replicas:
        return "-"
    counts: dict[str, int] = {}
    for replica in replicas:
        state = str(replica.get("state"))
        counts[state] = counts.get(state, 0) + 1
    order = {state: i for i, state in enumerate(REPLICA_STATES)}
    ranked = sorted(counts, key=lambda state: order.get(state, len(order)))
    return ", ".join(f"{state} {counts[state]}/{len(replicas)}" for state in ranked)


def adapters_table(views: list[dict[str, Any]]) -> str:
    if not views:
        return "no adapters"
    return format_table(("NAME", "CLASS", "ACTIVE", "BACKENDS", "STATE", "ORIGIN"), (
        (v.get("name"), v.get("class"), v.get("active"), v.get("backends"), replica_summary(v), v.get("origin"))
        for v in views))


SHOWN_FIELDS = ("name", "class", "profile", "backends", "origin", "active")


def adapter_detail(view: dict[str, Any]) -> str:
    versions = view.get("versions") or []
    active = next((v for v in versions if v.get("short") == view.get("active")), {})
    fields = [(key, view.get(key)) for key in SHOWN_FIELDS]
    if active:
        fields += [("source", active.get("source")), ("gguf", active.get("gguf"))]
    fields.append(("state", replica_summary(view)))
    fields += [(key, value) for key, value in view.items()
               if key not in SHOWN_FIELDS and key not in ("versions", "replicas") and is_scalar(value)]
    width = max(len(key) for key, _ in fields) + 2
    lines = [f"{key + ':':<{width}}{cell_text(value)}" for key, value in fields]
    return "\n".join(lines + ["", versions_table(versions), "", replicas_table(view.get("replicas") or [])])


def is_scalar(value: Any) -> bool:
    scalar = (str, int, float, bool, type(None))
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))


def versions_table(versions: list[dict[str, Any]]) -> str:
    if not versions:
        return "versions: none"
    headers = ["SHORT", "STATUS", "SOURCE/GGUF", "RANK", "CREATED"]
    with_reason = any(v.get("reason") for v in versions)
    rows = []
    for v in versions:
        row = [v.get("short") or str(v.get("version", ""))[:8], v.get("status"), shorten(version_files(v)),
               v.get("rank"), timestamp(v.get("created_at"))]
        rows.append(row + [v.get("reason")] if with_reason else row)
    return "versions:\n" + format_table(headers + ["REASON"] * with_reason, rows)


def version_files(version: dict[str, Any]) -> str | None:
    files = [path for path in (version.get("source"), version.get("gguf")) if path]
    return " + ".join(files) or None


def timestamp(seconds: Any) -> str | None:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def replicas_table(replicas: list[dict[str, Any]]) -> str:
    if not replicas:
        return "replicas: none"
    return "replicas:\n" + format_table(("BACKEND", "REPLICA", "VERSION", "STATE", "REASON"), (
        (r.get("backend"), r.get("replica"), r.get("version"), r.get("state"), r.get("reason")) for r in replicas))


def swap_line(view: dict[str, Any], before: str | None, took_s: float) -> str:
    active = view.get("active")
    change = "unchanged: the files hash to the active version" if active == before else f"was {before or '-'}"
    return (f"{view.get('name')}: active {active or '-'} ({change}), replicas {replica_summary(view)}, "
            f"took {took_s:.1f} s")


def backends_table(backends: list[dict[str, Any]]) -> str:
    """One row per replica (a backend with none gets one row of its own)."""
    if not backends:
        return "no backends"
    rows = []
    for b in backends:
        for r in b.get("replicas") or [{"url": None, "up": b.get("up"), "in_flight": b.get("in_flight")}]:
            rows.append((b.get("name"), b.get("kind"), r.get("url"), r.get("up"), r.get("in_flight"),
                         r.get("adapters")))
    return format_table(("BACKEND", "KIND", "REPLICA", "UP", "IN FLIGHT", "ADAPTERS"), rows)
