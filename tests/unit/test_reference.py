"""docs/reference.md against the code, both ways: every metric (with its type and labels), HTTP route, CLI
command (with its options), config key and `x-kimi-*` header the code has is in the reference, and everything
the reference names exists in the code. A new metric, route, command, option, key or header fails here until
it is documented; a removed one fails until its row goes.

`python -m tests.unit.test_reference` prints what the code has, in the reference's order (a start for new rows).
"""
from __future__ import annotations

import argparse
import re
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).parents[2]
REFERENCE = ROOT / "docs" / "reference.md"
SOURCES = ("gateway", "adapters", "backends")
TICKED = re.compile(r"`([^`]+)`")

# --- what the code has ----------------------------------------------------------------------------------------


def code_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Exposed name -> (type, labels), from the collectors gateway/metrics.py declares."""
    from gateway.metrics import Metrics

    found = {}
    for collector in Metrics().registry._collector_to_names:
        name = collector._name + ("_total" if collector._type == "counter" else "")
        found[name] = (collector._type, tuple(collector._labelnames))
    return found


def code_routes() -> set[str]:
    """`METHOD /path` for every route the gateway answers: the data plane and the FastAPI control plane."""
    from fastapi.routing import APIRoute

    from gateway.app import create_app
    from gateway.config import GatewayConfig

    app = create_app(GatewayConfig(backends=[{"name": "b", "kind": "llamacpp", "url": "http://127.0.0.1:9"}]))
    routes = {f"{method.upper()} {path}" for path, operations in app.control.openapi()["paths"].items()
              for method in operations}
    hidden = [route for route in app.control.routes if isinstance(route, APIRoute) and not route.include_in_schema]
    return routes | {f"{method} {route.path}" for route in hidden for method in route.methods if method != "HEAD"}


def code_commands() -> dict[str, set[str]]:
    """`kimi-gateway <command …>` -> its options, for every leaf command of the CLI."""
    from gateway.cli import parser

    found: dict[str, set[str]] = {}

    def walk(command: argparse.ArgumentParser, path: str) -> None:
        subcommands = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if not subcommands:
            found[path] = {option for action in command._actions for option in action.option_strings
                           if option.startswith("--") and option != "--help"}
            return
        for name, sub in subcommands[0].choices.items():
            walk(sub, f"{path} {name}")
    walk(parser(), "kimi-gateway")
    return found


def _models(annotation) -> list[tuple[type[BaseModel], str]]:
    """The config models inside an annotation, each with what its path gets: "" (a block), "[]" (a list of
    them) or ".<name>" (a mapping of them)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _models(args[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    if origin in (typing.Union, types.UnionType):
        return [found for arg in args for found in _models(arg)]
    if origin is tuple and args:
        return [(model, "[]" + tail) for model, tail in _models(args[0])]
    if origin is dict:
        return [(model, ".<name>" + tail) for model, tail in _models(args[1])]
    return []


def code_config_keys() -> set[str]:
    """Every key path of the config file: `listen.port`, `auth.client_keys[].rpm`, `sampling.profiles.<name>.top_p`,
    and per backend kind `backends[sglang].launch.kt_method`."""
    from gateway.config import GatewayConfig

    found: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            path = f"{prefix}.{name}" if prefix else name
            found.append(path)
            inner = _models(field.annotation)
            for sub, tail in inner:
                where = path + tail
                if len(inner) > 1 and "kind" in sub.model_fields:   # a union over `kind`: one path per kind
                    where = where.replace("[]", f"[{typing.get_args(sub.model_fields['kind'].annotation)[0]}]")
                walk(sub, where)
    walk(GatewayConfig, "")
    return set(found)


def code_headers() -> set[str]:
    return {header.lower() for package in SOURCES for path in (ROOT / package).rglob("*.py")
            for header in re.findall(r"x-kimi-[a-z0-9-]*[a-z0-9]", path.read_text(), re.IGNORECASE)}


# --- what the reference says ----------------------------------------------------------------------------------


def sections() -> dict[str, list[list[str]]]:
    """`## heading` -> its table rows, each a list of cells (header and separator rows left out)."""
    found: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("## "):
            current = found.setdefault(line[3:].strip(), [])
        elif line.startswith("|") and not re.match(r"^\|[\s:|-]+\|$", line):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if cells and cells[0] not in ("metric", "route", "command", "key", "header"):
                current.append(cells)
    return found


def rows(section: str) -> list[tuple[list[str], list[str]]]:
    """(names in the first cell, all cells) per row of a section's tables."""
    table = sections().get(section)
    assert table, f"{REFERENCE} has no table under `## {section}`"
    return [(TICKED.findall(cells[0]), cells) for cells in table]


def expand(name: str, kinds: set[str]) -> set[str]:
    """`backends[*].url` stands for the key in every backend kind."""
    return {name.replace("[*]", f"[{kind}]") for kind in kinds} if "[*]" in name else {name}


def backend_kinds() -> set[str]:
    from backends.factory import KINDS

    return set(KINDS)


# --- the checks -----------------------------------------------------------------------------------------------


def test_every_metric_is_in_the_reference_with_its_type_and_labels():
    code = code_metrics()
    documented = {}
    for names, cells in rows("Metrics"):
        for name in names:
            labels = tuple(re.findall(r"[a-z_]+", cells[2].replace("—", "")))
            documented[name] = (cells[1], labels)
    assert sorted(set(code) - set(documented)) == [], "metrics missing from docs/reference.md"
    assert sorted(set(documented) - set(code)) == [], "docs/reference.md names metrics the code lacks"
    wrong = {name: (documented[name], code[name]) for name in code if documented[name] != code[name]}
    assert wrong == {}, "type or labels differ (documented, code)"


def test_every_route_is_in_the_reference():
    code = code_routes()
    documented = {name for names, _ in rows("HTTP routes") for name in names}
    assert sorted(code - documented) == [], "routes missing from docs/reference.md"
    assert sorted(documented - code) == [], "docs/reference.md names routes the gateway does not answer"


def test_every_command_and_option_is_in_the_reference():
    code = code_commands()
    documented = {name: " ".join(cells) for names, cells in rows("Commands") for name in names}
    assert sorted(set(code) - set(documented)) == [], "commands missing from docs/reference.md"
    assert sorted(set(documented) - set(code)) == [], "docs/reference.md names commands the CLI lacks"
    missing = {name: sorted(option for option in options if f"`{option}" not in documented[name])
               for name, options in code.items()}
    assert {name: options for name, options in missing.items() if options} == {}, "options missing"


def test_every_config_key_is_in_the_reference():
    code, kinds = code_config_keys(), backend_kinds()
    documented = {key for names, _ in rows("Config keys") for name in names for key in expand(name, kinds)}
    assert sorted(documented - code) == [], "docs/reference.md names config keys the config model lacks"
    # A block (a key with keys under it) is documented by its keys; every other key by its own row.
    leaves = {key for key in code if not any(other.startswith((key + ".", key + "[")) for other in code)}
    assert sorted(leaves - documented) == [], "config keys missing from docs/reference.md"


def test_every_x_kimi_header_is_in_the_reference():
    code = code_headers()
    documented = {name.lower() for names, _ in rows("Headers") for name in names if name.lower().startswith("x-kimi")}
    assert sorted(code - documented) == [], "x-kimi-* headers missing from docs/reference.md"
    assert sorted(documented - code) == [], "docs/reference.md names x-kimi-* headers the code never reads or sets"


def test_collectors_are_written_only_by_the_recorders():
    """docs/observability.md: no module but gateway/metrics.py touches a collector."""
    writes = re.compile(r"\bmetrics\.[a-z_]+\.(?:labels|inc|set|dec|observe)\(")
    found = [f"{path.relative_to(ROOT)}:{number}" for package in SOURCES for path in (ROOT / package).rglob("*.py")
             if path != ROOT / "gateway" / "metrics.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if writes.search(line)]
    assert found == []


@pytest.mark.parametrize("command", ["kimi-gateway", "kimi-gateway experiments", "kimi-gateway launch sglang-kt"])
def test_help_texts_name_no_internal_documents(command, capsys):
    """--help speaks to users: no pointer to files they do not have (DESIGN.md lives outside the repository)."""
    from gateway.cli import parser

    with pytest.raises(SystemExit):
        parser().parse_args([*command.split()[1:], "--help"])
    assert "DESIGN.md" not in capsys.readouterr().out


if __name__ == "__main__":
    for name, (kind, labels) in code_metrics().items():
        print(f"| `{name}` | {kind} | {', '.join(labels) or '—'} | |")
    for route in sorted(code_routes(), key=lambda r: r.split()[::-1]):
        print(f"| `{route}` | |")
    for command, options in code_commands().items():
        print(f"| `{command}` | {' '.join(f'`{o}`' for o in sorted(options))} | |")
    for key in sorted(code_config_keys()):
        print(f"| `{key}` | |")
    print(sorted(code_headers()))
