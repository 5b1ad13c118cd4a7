"""`kimi-gateway adapters …` / `backends` against canned admin-API answers (the contract in the admin API notes):
the requests sent, the tables printed, the exit codes, and where the URL comes from."""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from gateway import cli
from gateway.adapters_cli import format_table, main
from gateway.config import load_config

KEY = "adm-k3y-never-printed"
CREATED = 1795387805.1

LEGAL = {
    "name": "legal", "class": "attention", "profile": "instant", "backends": ["kt-a", "gguf"], "origin": "admin",
    "active": "3f2a9c1d",
    "versions": [
        {"version": "3f2a9c1d" + "0" * 56, "short": "3f2a9c1d", "status": "active", "source": "/adapters/legal-v2",
         "gguf": "/adapters/legal-v2.gguf", "rank": 16, "created_at": CREATED, "reason": None},
        {"version": "77aa55bb" + "1" * 56, "short": "77aa55bb", "status": "retired", "source": "/adapters/legal-v1",
         "gguf": None, "rank": 8, "created_at": CREATED - 86400, "reason": None},
    ],
    "replicas": [
        {"backend": "kt-a", "replica": "http://10.0.0.5:30000", "version": "3f2a9c1d", "state": "ready",
         "reason": None, "updated_at": CREATED},
        {"backend": "gguf", "replica": "http://10.0.0.6:8081", "version": "3f2a9c1d", "state": "ready",
         "reason": None, "updated_at": CREATED},
        {"backend": "kt-a", "replica": "http://10.0.0.5:30000", "version": "77aa55bb", "state": "unloaded",
         "reason": None, "updated_at": CREATED},
    ],
}
MEDICAL = {
    "name": "medical", "class": "gguf", "profile": None, "backends": ["gguf"], "origin": "config", "active": None,
    "versions": [
        {"version": "c0ffee00" + "2" * 56, "short": "c0ffee00", "status": "candidate", "source": None,
         "gguf": "/adapters/medical.gguf", "rank": None, "created_at": CREATED, "reason": None},
    ],
    "replicas": [
        {"backend": "gguf", "replica": "http://10.0.0.6:8081", "version": "c0ffee00", "state": "failed",
         "reason": "tensor blk.0.attn_q.lora_a: expected rank 16, found 8", "updated_at": CREATED},
        {"backend": "gguf", "replica": "http://10.0.0.7:8081", "version": "c0ffee00", "state": "loading",
         "reason": None, "updated_at": CREATED},
    ],
}
SWAPPED = {**LEGAL, "active": "9b8c7d6e", "replicas": [
    {**replica, "version": "9b8c7d6e"} for replica in LEGAL["replicas"][:2]]}
BACKENDS = {"data": [
    {"name": "kt-a", "kind": "sglang", "up": True, "in_flight": 3, "replicas": [
        {"url": "http://10.0.0.5:30000", "up": True, "in_flight": 3, "adapters": ["legal@3f2a9c1d"]}]},
    {"name": "gguf", "kind": "llamacpp", "up": True, "in_flight": 0, "replicas": [
        {"url": "http://10.0.0.6:8081", "up": True, "in_flight": 0, "adapters": ["legal@3f2a9c1d", "medical@c0ffee00"]},
        {"url": "http://10.0.0.7:8081", "up": False, "in_flight": 0, "adapters": []}]},
    {"name": "moonshot", "kind": "moonshot", "up": True, "in_flight": 1, "replicas": []},
]}


def openai_error(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class Gateway:
    """A scripted admin API: (method, path) -> (status, body); records every request it gets."""

    def __init__(self, answers: dict[tuple[str, str], tuple[int, object]]) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, body = self.answers.get((request.method, request.url.raw_path.decode()),
                                        (404, openai_error("no such path", "invalid_request_error")))
        if isinstance(body, Exception):
            raise body
        if body is None:
            return httpx.Response(status)
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    def run(self, *argv: str) -> int:
        return main(list(argv), transport=httpx.MockTransport(self.handle))

    def sent(self) -> list[tuple[str, str, object]]:
        return [(r.method, r.url.raw_path.decode(), json.loads(r.content) if r.content else None)
                for r in self.requests]


@pytest.fixture(autouse=True)
def admin_key(monkeypatch):
    monkeypatch.setenv("KIMI_GATEWAY_ADMIN_KEY", KEY)


def local(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_list_sends_the_admin_key_and_prints_one_row_per_adapter(capsys):
    gateway = Gateway({("GET", "/admin/adapters"): (200, {"data": [LEGAL, MEDICAL]})})
    assert gateway.run("adapters", "list") == 0
    assert gateway.sent() == [("GET", "/admin/adapters", None)]
    assert gateway.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert (gateway.requests[0].url.host, gateway.requests[0].url.port) == ("127.0.0.1", 8080)
    assert capsys.readouterr().out.splitlines() == [
        "NAME     CLASS      ACTIVE    BACKENDS    STATE                    ORIGIN",
        "legal    attention  3f2a9c1d  kt-a, gguf  ready 2/2                admin",
        "medical  gguf       -         gguf        loading 1/2, failed 1/2  config",
    ]



def test_show_prints_fields_versions_and_replicas(capsys):
    gateway = Gateway({("GET", "/admin/adapters/legal"): (200, LEGAL)})
    assert gateway.run("adapters", "show", "legal") == 0
    assert gateway.sent() == [("GET", "/admin/adapters/legal", None)]
    assert capsys.readouterr().out.splitlines() == [
        "name:     legal",
        "class:    attention",
        "profile:  instant",
        "backends: kt-a, gguf",
        "origin:   admin",
        "active:   3f2a9c1d",
        "source:   /adapters/legal-v2",
        "gguf:     /adapters/legal-v2.gguf",
        "state:    ready 2/2",
        "",
        "versions:",
        "SHORT     STATUS   SOURCE/GGUF                                   RANK  CREATED",
        f"3f2a9c1d  active   /adapters/legal-v2 + /adapters/legal-v2.gguf  16    {local(CREATED)}",
        f"77aa55bb  retired  /adapters/legal-v1                            8     {local(CREATED - 86400)}",
        "",
        "replicas:",
        "BACKEND  REPLICA                VERSION   STATE     REASON",
        "kt-a     http://10.0.0.5:30000  3f2a9c1d  ready     -",
        "gguf     http://10.0.0.6:8081   3f2a9c1d  ready     -",
        "kt-a     http://10.0.0.5:30000  77aa55bb  unloaded  -",
    ]


def test_show_names_failures_and_has_no_active_files_before_a_version_serves(capsys):
    failed_version = {**MEDICAL["versions"][0], "status": "failed", "reason": "verification: empty answer"}
    gateway = Gateway({("GET", "/admin/adapters/medical"): (200, {**MEDICAL, "versions": [failed_version]})})
    assert gateway.run("adapters", "show", "medical") == 0
    out = capsys.readouterr().out.splitlines()
    assert "active:   -" in out and not any(line.startswith(("source:", "gguf:")) for line in out)
    assert "state:    loading 1/2, failed 1/2" in out
    assert out[out.index("versions:") + 1].split() == ["SHORT", "STATUS", "SOURCE/GGUF", "RANK", "CREATED", "REASON"]
    assert out[out.index("versions:") + 2].endswith("  verification: empty answer")
    assert "gguf     http://10.0.0.6:8081  c0ffee00  failed   tensor blk.0.attn_q.lora_a: expected rank 16, found 8" \
        in out


def test_rendering_tolerates_extra_and_missing_fields(capsys):
    view = {"name": "future", "class": "experts", "loaded": {"kt-a": True}, "shard": 3, "tags": ["a", "b"],
            "versions": [{"short": "abcd1234", "status": "active", "extra": {"x": 1}}],
            "replicas": [{"backend": "kt-a", "state": "ready", "weight": 0.5}]}
    gateway = Gateway({("GET", "/admin/adapters"): (200, {"data": [view], "next": None}),
                       ("GET", "/admin/adapters/future"): (200, view)})
    assert gateway.run("adapters", "list") == 0
    assert gateway.run("adapters", "show", "future") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["future", "experts", "-", "-", "ready", "1/1", "-"]
    assert "shard:    3" in out and "tags:     a, b" in out and not any("loaded" in line for line in out)
    assert "kt-a     -        -        ready  -" in out


def test_long_paths_keep_the_show_view_within_100_columns(capsys):
    deep = "/srv/adapters/" + "team-legal/" * 8 + "legal-v3"
    version = {**LEGAL["versions"][0], "source": deep, "gguf": deep + ".gguf"}
    gateway = Gateway({("GET", "/admin/adapters/legal"): (200, {**LEGAL, "versions": [version]})})
    assert gateway.run("adapters", "show", "legal") == 0
    out = capsys.readouterr().out.splitlines()
    row = out[out.index("versions:") + 2]
    assert len(row) <= 100 and "…" in row and row.split()[-2] == local(CREATED).split()[0]
    assert f"source:   {deep}" in out   # the field itself is never shortened


def test_add_posts_the_contract_body_and_prints_the_show_view(capsys):
    gateway = Gateway({("POST", "/admin/adapters"): (201, LEGAL)})
    assert gateway.run("adapters", "add", "legal", "--source", "/adapters/legal-v2", "--gguf",
                       "/adapters/legal-v2.gguf", "--profile", "instant", "--backend", "kt-a", "--backend", "gguf") == 0
    assert gateway.sent() == [("POST", "/admin/adapters", {
        "name": "legal", "source": "/adapters/legal-v2", "gguf": "/adapters/legal-v2.gguf", "profile": "instant",
        "backends": ["kt-a", "gguf"]})]
    assert gateway.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert gateway.requests[0].extensions["timeout"]["read"] == 600
    out = capsys.readouterr().out
    assert out.startswith("name:     legal\n") and "replicas:\nBACKEND  REPLICA" in out


def test_add_leaves_out_what_was_not_given(capsys):
    gateway = Gateway({("POST", "/admin/adapters"): (201, MEDICAL)})
    assert gateway.run("adapters", "add", "medical", "--gguf", "/adapters/medical.gguf", "--backend", "gguf") == 0
    assert gateway.sent() == [("POST", "/admin/adapters",
                               {"name": "medical", "gguf": "/adapters/medical.gguf", "backends": ["gguf"]})]


def test_add_needs_files_and_a_backend_before_sending_anything(capsys):
    gateway = Gateway({})
    assert gateway.run("adapters", "add", "legal", "--backend", "kt-a") == 2
    assert "needs --source DIR, --gguf FILE or both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        gateway.run("adapters", "add", "legal", "--source", "/adapters/legal")
    assert usage.value.code == 2 and "--backend" in capsys.readouterr().err
    assert gateway.requests == []


def test_swap_posts_the_new_files_and_prints_the_new_active_version(capsys):
    gateway = Gateway({("GET", "/admin/adapters/legal"): (200, LEGAL),
                       ("POST", "/admin/adapters/legal/swap"): (200, SWAPPED)})
    assert gateway.run("adapters", "swap", "legal", "--source", "/adapters/legal-v3") == 0
    assert gateway.sent() == [("GET", "/admin/adapters/legal", None),
                              ("POST", "/admin/adapters/legal/swap", {"source": "/adapters/legal-v3"})]
    assert gateway.requests[1].extensions["timeout"]["read"] == 600
    line = capsys.readouterr().out.strip()
    assert line.startswith("legal: active 9b8c7d6e (was 3f2a9c1d), replicas ready 2/2, took ")
    assert line.endswith(" s") and float(line.split("took ")[1][:-2]) < 5


def test_swap_timeout_is_configurable_and_a_silent_gateway_exits_3(capsys):
    gateway = Gateway({("GET", "/admin/adapters/legal"): (200, LEGAL),
                       ("POST", "/admin/adapters/legal/swap"): (0, httpx.ReadTimeout("timed out"))})
    assert gateway.run("adapters", "swap", "legal", "--gguf", "/adapters/legal-v3.gguf", "--timeout", "1.5") == 3
    assert gateway.requests[1].extensions["timeout"]["read"] == 1.5
    assert gateway.sent()[1][2] == {"gguf": "/adapters/legal-v3.gguf"}
    err = capsys.readouterr().err
    assert "no answer from the gateway at http://127.0.0.1:8080 within 1.5 s" in err and "--timeout" in err


def test_swap_to_the_same_files_says_unchanged(capsys):
    gateway = Gateway({("GET", "/admin/adapters/legal"): (200, LEGAL),
                       ("POST", "/admin/adapters/legal/swap"): (200, LEGAL)})
    assert gateway.run("adapters", "swap", "legal") == 0
    assert gateway.sent()[1] == ("POST", "/admin/adapters/legal/swap", {})
    assert "legal: active 3f2a9c1d (unchanged" in capsys.readouterr().out


def test_remove_sends_delete(capsys):
    gateway = Gateway({("DELETE", "/admin/adapters/legal"): (204, None)})
    assert gateway.run("adapters", "remove", "legal") == 0
    assert gateway.sent() == [("DELETE", "/admin/adapters/legal", None)]
    assert capsys.readouterr().out == "removed legal\n"


def test_names_are_one_path_segment(capsys):
    gateway = Gateway({("GET", "/admin/adapters/a%2F..%3Fx"): (200, LEGAL)})
    assert gateway.run("adapters", "show", "a/..?x") == 0
    assert gateway.sent() == [("GET", "/admin/adapters/a%2F..%3Fx", None)]


@pytest.mark.parametrize("argv, method, path, status, body", [
    (["adapters", "list"], "GET", "/admin/adapters", 401,
     openai_error("A valid admin key is required (Authorization: Bearer <admin key>).", "authentication_error")),
    (["adapters", "show", "ghost"], "GET", "/admin/adapters/ghost", 404,
     openai_error("Adapter 'ghost' not found.", "invalid_request_error", "adapter_not_found")),
    (["adapters", "add", "legal", "--source", "/adapters/l", "--backend", "kt-a"], "POST", "/admin/adapters", 409,
     openai_error("Adapter 'legal' already exists.", "invalid_request_error", "conflict")),
    (["adapters", "add", "bad", "--source", "/adapters/bad", "--backend", "kt-a"], "POST", "/admin/adapters", 422,
     openai_error("/adapters/bad/adapter_config.json: r: expected 16, found 8", "invalid_request_error")),
    (["adapters", "remove", "legal"], "DELETE", "/admin/adapters/legal", 409,
     openai_error("Adapter 'legal' is a variant of experiment 'legal-ab'.", "invalid_request_error", "conflict")),
    (["backends"], "GET", "/admin/backends", 503,
     openai_error("backend 'kt-a' failed to load the adapter; rolled back", "service_unavailable_error")),
])
def test_api_errors_exit_1_with_status_and_message(capsys, argv, method, path, status, body):
    gateway = Gateway({(method, path): (status, body)})
    assert gateway.run(*argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[0] == f"error: {status} {body['error']['message']}"


def test_swap_rolled_back_exits_1(capsys):
    gateway = Gateway({("GET", "/admin/adapters/legal"): (200, LEGAL), ("POST", "/admin/adapters/legal/swap"): (
        502, openai_error("kt-a: verification failed; rolled back to 3f2a9c1d", "bad_gateway_error"))})
    assert gateway.run("adapters", "swap", "legal", "--source", "/adapters/legal-v3") == 1
    assert capsys.readouterr().err == "error: 502 kt-a: verification failed; rolled back to 3f2a9c1d\n"


def test_unset_admin_key_sends_no_header_and_says_how_to_set_it(capsys, monkeypatch):
    monkeypatch.delenv("KIMI_GATEWAY_ADMIN_KEY")
    gateway = Gateway({("GET", "/admin/adapters"): (401, openai_error("A valid admin key is required.", "auth"))})
    assert gateway.run("adapters", "list") == 1
    assert "authorization" not in gateway.requests[0].headers
    assert "$KIMI_GATEWAY_ADMIN_KEY is not set" in capsys.readouterr().err


def test_a_wrong_admin_key_is_named_but_never_printed(capsys):
    disabled = "The admin API is disabled: set KIMI_GATEWAY_ADMIN_KEYS to one or more comma-separated admin keys."
    gateway = Gateway({("GET", "/admin/adapters"): (401, openai_error("A valid admin key is required.", "auth")),
                       ("GET", "/admin/adapters/legal"): (403, openai_error(disabled, "permission_error"))})
    assert gateway.run("adapters", "list") == 1
    assert "not one of this gateway's admin keys" in capsys.readouterr().err
    assert gateway.run("adapters", "show", "legal", "--json") == 1
    assert capsys.readouterr().err == f"error: 403 {disabled}\n"
    for argv in (["adapters", "list"], ["adapters", "show", "legal"], ["backends"]):
        gateway.run(*argv)
        out, err = capsys.readouterr()
        assert KEY not in out + err


def test_an_admin_key_a_header_cannot_carry_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setenv("KIMI_GATEWAY_ADMIN_KEY", "clé")
    gateway = Gateway({})
    assert gateway.run("adapters", "list") == 2
    assert gateway.requests == [] and "clé" not in capsys.readouterr().err


def test_error_bodies_that_are_not_openai_shaped(capsys):
    gateway = Gateway({("GET", "/admin/adapters"): (502, "<html>Bad Gateway</html>"),
                       ("GET", "/admin/backends"): (422, {"detail": [{"loc": ["body", "name"]}]}),
                       ("GET", "/admin/adapters/x"): (200, "not json")})
    assert gateway.run("adapters", "list") == 1
    assert gateway.run("backends") == 1
    assert gateway.run("adapters", "show", "x") == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: 502 <html>Bad Gateway</html>"
    assert err[1] == "error: 422 [{'loc': ['body', 'name']}]"
    assert err[2].startswith("error: 200 the answer to GET /admin/adapters/x is not JSON")


def test_json_prints_the_raw_answer(capsys):
    gateway = Gateway({("GET", "/admin/adapters"): (200, {"data": [LEGAL, MEDICAL]}),
                       ("GET", "/admin/adapters/legal"): (200, LEGAL),
                       ("POST", "/admin/adapters/legal/swap"): (200, SWAPPED),
                       ("GET", "/admin/backends"): (200, BACKENDS)})
    for argv, expected in ((["adapters", "list"], {"data": [LEGAL, MEDICAL]}), (["adapters", "show", "legal"], LEGAL),
                           (["adapters", "swap", "legal", "--gguf", "/g"], SWAPPED), (["backends"], BACKENDS)):
        assert gateway.run(*argv, "--json") == 0
        assert json.loads(capsys.readouterr().out) == expected
    assert ("GET", "/admin/adapters/legal", None) == gateway.sent()[1] and len(gateway.requests) == 4


def test_backends_table_has_a_row_per_replica(capsys):
    gateway = Gateway({("GET", "/admin/backends"): (200, BACKENDS)})
    assert gateway.run("backends") == 0
    assert gateway.sent() == [("GET", "/admin/backends", None)]
    assert capsys.readouterr().out.splitlines() == [
        "BACKEND   KIND      REPLICA                UP   IN FLIGHT  ADAPTERS",
        "kt-a      sglang    http://10.0.0.5:30000  yes  3          legal@3f2a9c1d",
        "gguf      llamacpp  http://10.0.0.6:8081   yes  0          legal@3f2a9c1d, medical@c0ffee00",
        "gguf      llamacpp  http://10.0.0.7:8081   no   0          -",
        "moonshot  moonshot  -                      yes  1          -",
    ]


def test_empty_lists(capsys):
    empty = (200, {"data": []})
    gateway = Gateway({("GET", "/admin/adapters"): empty, ("GET", "/admin/backends"): empty})
    assert gateway.run("adapters", "list") == 0 and gateway.run("backends") == 0
    assert capsys.readouterr().out == "no adapters\nno backends\n"


def test_connection_refused_exits_3_naming_the_url_and_how_to_set_it(capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    assert main(["adapters", "list", "--url", url]) == 3
    err = capsys.readouterr().err
    assert f"cannot reach the gateway at {url}: Connection refused" in err and "--url" in err


def test_the_top_level_cli_runs_these_commands(capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    assert cli.main(["adapters", "remove", "legal", "--url", url]) == 3
    assert cli.main(["backends", "--url", url]) == 3
    assert capsys.readouterr().err.count(f"cannot reach the gateway at {url}") == 2
    for argv in (["adapters"], ["adapters", "show"], ["adapters", "list", "--url", "127.0.0.1:8080"],
                 ["adapters", "swap", "legal", "--timeout", "0"], ["adapters", "remove", ""]):
        with pytest.raises(SystemExit) as usage:
            cli.main(argv)
        assert usage.value.code == 2


BACKEND_ONLY = """
backends:
  - {name: gguf, kind: llamacpp, url: "http://127.0.0.1:8081"}
"""


@pytest.mark.parametrize("listeners, host, port", [
    ("listen: {host: 0.0.0.0, port: 9000}\nadmin_listen: {host: 127.0.0.2, port: 9191}\n", "127.0.0.2", 9191),
    ("listen: {host: 0.0.0.0, port: 9000}\nadmin_listen: {host: 0.0.0.0, port: 9191}\n", "127.0.0.1", 9191),
    ("listen: {host: 10.1.2.3, port: 9000}\n", "10.1.2.3", 9000),
    ("listen: {host: '::', port: 9000}\n", "::1", 9000),
    ("", "127.0.0.1", 8080),
])
def test_url_comes_from_the_config_admin_listener_else_its_listener(tmp_path, listeners, host, port):
    config = tmp_path / "gateway.yaml"
    config.write_text(listeners + BACKEND_ONLY)
    load_config(config)   # a valid config, as `serve` would load it
    gateway = Gateway({("GET", "/admin/adapters"): (200, {"data": []})})
    assert gateway.run("adapters", "list", "--config", str(config)) == 0
    assert (gateway.requests[0].url.host, gateway.requests[0].url.port) == (host, port)
    assert gateway.run("adapters", "list", "--config", str(config), "--url", "http://gw.internal:7000/") == 0
    assert str(gateway.requests[1].url) == "http://gw.internal:7000/admin/adapters"


def test_unreachable_url_from_a_config_says_where_it_came_from(tmp_path, capsys):
    port = closed_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(f"admin_listen: {{host: 127.0.0.1, port: {port}}}\n" + BACKEND_ONLY)
    assert main(["adapters", "list", "--config", str(config)]) == 3
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}" in err and f"admin_listen of {config}" in err


def test_a_bad_config_is_a_usage_error(tmp_path, capsys):
    gateway = Gateway({})
    assert gateway.run("adapters", "list", "--config", str(tmp_path / "missing.yaml")) == 2
    (tmp_path / "bad.yaml").write_text("listen: {port: 9000}\n")
    assert gateway.run("adapters", "list", "--config", str(tmp_path / "bad.yaml")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: --config: ") and "cannot read" in err[0]
    assert "backends" in err[1] and gateway.requests == []


def test_format_table_aligns_and_marks_missing_cells():
    assert format_table(("A", "LONGER", "C"), [("x", None, True), ("yy", [], 0)]).splitlines() == [
        "A   LONGER  C",
        "x   -       yes",
        "yy  -       0",
    ]
