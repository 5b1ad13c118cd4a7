"""`kimi-gateway check` and `serve` on a config or an environment that cannot work: a non-zero exit, one line
that names the key path (or the store) and the problem, and no traceback; real processes, real PostgreSQL."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from backends.launchers.llamacpp import free_port
from tests.integration.conftest import ROOT
from tests.services import dsn_of

BASE = {"backends": [{"name": "one", "kind": "llamacpp", "url": "http://127.0.0.1:9"}],
        "routes": [{"name": "kimi", "targets": ["one"]}]}


def run(tmp_path, command: str, config: dict | str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "gateway.yaml"
    path.write_text(config if isinstance(config, str) else json.dumps({"state_dir": str(tmp_path / "state"),
                                                                        **config}))
    argv = [sys.executable, "-m", "gateway.cli", command, *(("--config",) if command == "serve" else ()), str(path)]
    if command == "serve":
        argv += ["--port", str(free_port())]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(argv, capture_output=True, text=True, env=environment, timeout=120, cwd=ROOT)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The lines that say what went wrong (plain `error:` lines, or JSON log lines at level error)."""
    lines = []
    for line in result.stderr.splitlines():
        if line.startswith("error:"):
            lines.append(line)
        elif line.startswith("{") and json.loads(line).get("level") == "error":
            lines.append(json.loads(line)["message"])
    return [line for line in lines if line != "Application startup failed. Exiting."]


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize("config, fragment", [
    ({**BASE, "conversion": {"llama_cpp_pyton": "/usr/bin/python3"}}, "conversion.llama_cpp_pyton: unknown key"),
    ({**BASE, "store": {"kind": "postgres"}}, "store: a postgres store needs `dsn_env`"),
    ({**BASE, "shared": {"kind": "local", "url_env": "REDIS_URL"}}, "shared: `url_env` is for kind: redis"),
    ({**BASE, "experiments": {"retention_days": 0}}, "experiments.retention_days"),
    ({**BASE, "admission": {"max_queue": "many"}}, "admission.max_queue"),
    ({**BASE, "backends": [{**BASE["backends"][0], "outliers": {"ejection_s": 60}}]},
     "backends[0].outliers: ejection_s (60) is longer than max_ejection_s (10)"),
    ({**BASE, "backends": [{**BASE["backends"][0], "retry": {"budget": {"ratio": -1}}}]},
     "backends[0].retry.budget.ratio"),
    ({**BASE, "backends": [{**BASE["backends"][0], "launch": {"modle": "x.gguf"}}]},
     "backends[0].launch.modle: unknown key"),
    ({**BASE, "tracing": {"endpoint": "otel:4318"}}, "tracing.endpoint: expected an http(s) URL"),
    ({**BASE, "adapter_roots": ["/nonexistent/kgw-adapter-root"]},
     "adapter_roots[0]: /nonexistent/kgw-adapter-root does not exist"),
    ({**BASE, "routes": [BASE["routes"][0], {"name": "e", "experiment": {"variants": {"kimi": 10 ** 400}}}]},
     "routes[1].experiment.variants.kimi: Input should be less than or equal to 1000000"),
    ("backends:\n  - {name: one, kind: llamacpp, url: 'http://127.0.0.1:9'}\nroutes: []\nroutes: []\n",
     "not valid YAML at line 4, column 1: the key 'routes' is given twice"),
])
def test_a_bad_config_fails_fast_on_one_line(tmp_path, command, config, fragment):
    result = run(tmp_path, command, config)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and fragment in lines[0], result.stderr


@pytest.mark.parametrize("dsn, fragment", [
    (None, "store.dsn_env: the environment variable KGW_TEST_DSN (the PostgreSQL DSN) is not set"),
    ("not a dsn", "cannot start: the PostgreSQL DSN is not valid"),
    (dsn_of("kgw_no_such_database"), 'cannot start: PostgreSQL refused the connection: database "kgw_no_such_data'),
])
def test_a_store_that_cannot_work_stops_serve_on_one_line(tmp_path, dsn, fragment):
    env = {"KGW_TEST_DSN": dsn} if dsn is not None else {}
    config = {**BASE, "store": {"kind": "postgres", "dsn_env": "KGW_TEST_DSN"}}
    if dsn is None:
        os.environ.pop("KGW_TEST_DSN", None)
    result = run(tmp_path, "serve", config, env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and fragment in lines[0], result.stderr
