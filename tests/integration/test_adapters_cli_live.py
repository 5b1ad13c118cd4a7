"""`kimi-gateway adapters …` and `kimi-gateway backends`, run as processes against a real gateway process in
front of the SGLang emulator: add, list, show, swap (then a chat answers with the new version), backends,
remove; a refused add and a wrong admin key exit 1 with the gateway's status. Every value a command prints
is checked against the admin API's own answer, not against a constant.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from backends.launchers.llamacpp import free_port
from tests.adapter_files import TINY_LLAMA_MODULES, write_peft
from tests.integration.conftest import ROOT
from tests.integration.test_adapter_lifecycle import ADMIN_KEY, ENV, admin, ask, start_sglang_on

HASH8 = re.compile(r"[0-9a-f]{8}")


def cli(url: str, *argv: str, key: str = ADMIN_KEY) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KIMI_GATEWAY_ADMIN_KEY": key}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *argv, "--url", url], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.args, result.returncode, result.stdout, result.stderr[-2000:])
    assert ADMIN_KEY not in result.stdout + result.stderr
    return result.stdout


def failed(result: subprocess.CompletedProcess, status: int) -> str:
    assert result.returncode == 1, (result.args, result.returncode, result.stdout, result.stderr[-2000:])
    assert result.stderr.startswith(f"error: {status} "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return result.stderr


def table(text: str, header: str) -> list[list[str]]:
    """The rows (split on runs of 2+ spaces) under the line that starts with `header`, up to a blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def fields(text: str) -> dict[str, str]:
    """The `key: value` lines at the top of the show view."""
    found = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        found[key.strip()] = value.strip()
    return found


@pytest.fixture(scope="module")
def setup(tmp_path_factory, start_process, start_gateway) -> tuple[str, str, Path, Path]:
    """(gateway admin URL, SGLang emulator URL, adapter root, a folder outside it)."""
    base = tmp_path_factory.mktemp("adapters-cli")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    port = free_port()
    start_sglang_on(start_process, "sglang-cli", port)
    url = f"http://127.0.0.1:{port}"
    gateway = start_gateway({"adapter_roots": [str(root)],
                             "backends": [{"name": "kt", "kind": "sglang", "urls": [url]}],
                             "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}]}, name="gw-adapters-cli", env=ENV)
    return gateway.removesuffix("/v1"), url, root, outside


def label_of_chat(gateway: str, model: str) -> str:
    with httpx.Client(timeout=60) as client:
        answer = ask(client, f"{gateway}/v1", model, False)
    assert answer.status == 200 and answer.text, answer
    return answer.label


def test_add_list_show_swap_backends_remove(setup):
    gateway, replica, root, _ = setup
    v1 = write_peft(root / "cli-v1", r=8, modules=TINY_LLAMA_MODULES)
    v2 = write_peft(root / "cli-v2", r=4, modules=TINY_LLAMA_MODULES)

    shown = ok(cli(gateway, "adapters", "add", "legal", "--source", str(v1), "--backend", "kt"))
    first = admin(f"{gateway}/v1", "GET", "/adapters/legal").json()["active"]
    assert HASH8.fullmatch(first)
    top = fields(shown)
    assert (top["name"], top["class"], top["active"], top["origin"]) == ("legal", "attention", first, "admin"), shown
    assert "cli-v1" in top["source"] and top["state"] == "ready 1/1", shown
    assert label_of_chat(gateway, "legal") == f"legal@{first}"

    rows = [row for row in table(ok(cli(gateway, "adapters", "list")), "NAME") if row[0] == "legal"]
    assert rows == [["legal", "attention", first, "kt", "ready 1/1", "admin"]], rows

    detail = ok(cli(gateway, "adapters", "show", "legal"))
    versions = table(detail, "SHORT")
    assert [row[:3] for row in versions] == [[first, "active", versions[0][2]]] and "cli-v1" in versions[0][2]
    assert versions[0][3] == "8", versions
    assert table(detail, "BACKEND") == [["kt", replica, first, "ready", "-"]], detail

    swapped = ok(cli(gateway, "adapters", "swap", "legal", "--source", str(v2)))
    second = admin(f"{gateway}/v1", "GET", "/adapters/legal").json()["active"]
    assert HASH8.fullmatch(second) and second != first
    assert swapped.startswith(f"legal: active {second} (was {first}), replicas ready 1/1"), swapped
    assert label_of_chat(gateway, "legal") == f"legal@{second}"
    statuses = {row[0]: row[1] for row in table(ok(cli(gateway, "adapters", "show", "legal")), "SHORT")}
    assert statuses == {first: "retired", second: "active"}, statuses

    backends = table(ok(cli(gateway, "backends")), "BACKEND")
    assert backends == [["kt", "sglang", replica, "yes", "0", f"legal@{second}"]], backends

    assert ok(cli(gateway, "adapters", "remove", "legal")).strip() == "removed legal"
    assert "legal" in failed(cli(gateway, "adapters", "show", "legal"), 404)
    assert "legal" not in {view["name"] for view in admin(f"{gateway}/v1", "GET", "/adapters").json()["data"]}
    assert table(ok(cli(gateway, "backends")), "BACKEND")[0][5] == "-"


def test_add_outside_the_roots_exits_1_with_the_422(setup):
    gateway, _, _, outside = setup
    escapee = write_peft(outside / "cli-escapee", modules=TINY_LLAMA_MODULES)
    stderr = failed(cli(gateway, "adapters", "add", "escapee", "--source", str(escapee), "--backend", "kt"), 422)
    assert f"source: {escapee} resolves outside the adapter roots" in stderr, stderr
    assert admin(f"{gateway}/v1", "GET", "/adapters/escapee").status_code == 404


def test_wrong_admin_key_exits_1_with_the_401(setup):
    gateway = setup[0]
    stderr = failed(cli(gateway, "adapters", "list", key="not-the-admin-key"), 401)
    assert "A valid admin key is required" in stderr and "hint: the key in $KIMI_GATEWAY_ADMIN_KEY" in stderr
    assert "not-the-admin-key" not in stderr
