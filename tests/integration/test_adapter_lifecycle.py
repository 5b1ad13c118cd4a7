"""The adapter lifecycle end to end: hot swaps under load on the real llama-server (a drained restart the
gateway runs) and on the SGLang emulator (a run-time load); SGLang restarts, replicas and two gateways;
a llama-server restarted under the gateway with another adapter list; a kill -9 in the middle of a swap.

Every answer is checked against the version its `x-kimi-adapter` header names: one text per version,
never the base model's, never a failure.
"""
from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import httpx
import orjson
import pytest

from backends.launchers.llamacpp import LlamaServerLaunch, ServerProcess, free_port
from gateway.demo import tiny_gguf
from tests.adapter_files import write_peft
from tests.integration.conftest import ROOT

ADMIN_KEY = "admin-key-for-lifecycle-tests"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
ENV = {"KIMI_GATEWAY_ADMIN_KEYS": ADMIN_KEY}
MESSAGES = [{"role": "user", "content": "Tell me about the blue river"}]


@dataclass
class Answer:
    status: int
    label: str
    text: str
    stream: bool


def ask(client: httpx.Client, base: str, model: str, stream: bool) -> Answer:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": stream}
    if not stream:
        response = client.post(f"{base}/chat/completions", json=body)
        text = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else response.text
        return Answer(response.status_code, response.headers.get("x-kimi-adapter", ""), text, False)
    with client.stream("POST", f"{base}/chat/completions", json=body) as response:
        raw = response.read()
    if response.status_code != 200:
        return Answer(response.status_code, "", raw.decode(), True)
    text = ""
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            event = orjson.loads(line[6:])
            if "error" in event:
                return Answer(599, response.headers.get("x-kimi-adapter", ""), line.decode(), True)
            for choice in event.get("choices") or ():
                text += (choice.get("delta") or {}).get("content") or ""
    return Answer(200, response.headers.get("x-kimi-adapter", ""), text, True)


def load(base: str | Sequence[str], model: str, count: int, *, during=None, after: int = 40, workers: int = 6,
         client: Callable[[], httpx.Client] = lambda: httpx.Client(timeout=60)) -> list[Answer]:
    """`count` requests (every third a stream) from `workers` threads, to `base` (or to each of several gateways
    in turn); `during()` runs once `after` answered."""
    answers: list[Answer] = []
    lock, started = threading.Lock(), threading.Event()
    turn = itertools.cycle([base] if isinstance(base, str) else base)

    def one(index: int, base: str) -> None:
        with client() as http:
            answer = ask(http, base, model, index % 3 == 0)
        with lock:
            answers.append(answer)
            if len(answers) >= after:
                started.set()
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(one, i, next(turn)) for i in range(count)]
        if during is not None:
            assert started.wait(120), "the load did not get going"
            during()
        for future in futures:
            future.result()
    return answers


def assert_one_text_per_version(answers: list[Answer], labels: int) -> dict[str, str]:
    failures = [a for a in answers if a.status != 200]
    assert not failures, failures[:3]
    texts: dict[str, set[str]] = {}
    for answer in answers:
        texts.setdefault(answer.label, set()).add(answer.text)
    assert len(texts) == labels, sorted(texts)
    assert all(len(seen) == 1 for seen in texts.values()), texts  # stream and non-stream agree, per version
    return {label: seen.pop() for label, seen in texts.items()}


def admin(base: str, method: str, path: str, **kwargs) -> httpx.Response:
    root = base.removesuffix("/v1")
    return httpx.request(method, f"{root}/admin{path}", headers=ADMIN, timeout=120, **kwargs)


# --- llama.cpp: the gateway runs llama-server and swaps by a drained restart ---------------------------------

@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tiny_models.model.parent
    return {"a": tiny_models.lora_a, "b": tiny_models.lora_b,
            "c": tiny_gguf.write_tiny_lora(root / "lora_c.gguf", tiny_models.model, seed=3, name="lora-C")}


def base_text(base: str) -> str:
    with httpx.Client(timeout=60) as client:
        answer = ask(client, base, "kimi-k2.5", False)
    assert answer.status == 200 and answer.label == ""
    return answer.text


def test_swap_under_load_on_a_managed_llama_server(llama_binary, tiny_models, loras, start_gateway):
    port = free_port()
    base = start_gateway({
        "adapter_roots": [str(tiny_models.model.parent)],
        "backends": [{"name": "llama", "kind": "llamacpp", "url": f"http://127.0.0.1:{port}",
                      "launch": {"binary": str(llama_binary), "model": str(tiny_models.model), "threads": 1,
                                 "parallel": 2}}],
        "adapters": [{"name": "tiny-a", "gguf": str(loras["a"]), "backends": ["llama"]}],
        "routes": [{"name": "kimi-k2.5", "targets": ["llama"]}],
    }, name="gateway-llama-managed", env=ENV)
    plain = base_text(base)
    swap_took: list[float] = []

    def swap() -> None:
        started = time.monotonic()
        response = admin(base, "POST", "/adapters/tiny-a/swap", json={"gguf": str(loras["c"])})
        swap_took.append(time.monotonic() - started)
        assert response.status_code == 200, response.text
        assert response.json()["changed"] is True

    answers = load(base, "tiny-a", 200, during=swap)
    texts = assert_one_text_per_version(answers, labels=2)
    assert plain not in texts.values()  # never the base model answering for the adapter
    view = admin(base, "GET", "/adapters/tiny-a").json()
    active = [v for v in view["versions"] if v["status"] == "active"]
    assert [v["gguf"] for v in active] == [str(loras["c"])]
    assert f"tiny-a@{view['active']}" in texts
    assert {r["state"] for r in view["replicas"] if r["version"] == view["active"]} == {"ready"}
    print(f"\nllama.cpp swap (drained restart) took {swap_took[0]:.3f} s under load", file=sys.stderr)


# --- SGLang: run-time loads, restarts, replicas, two gateways ----------------------------------------------

def start_sglang_on(start_process, name: str, port: int) -> ServerProcess:
    argv = [sys.executable, "-m", "tests.emulators.sglang", "--port", str(port), "--served-model-name", "kimi",
            "--enable-lora", "--max-loaded-loras", "8"]
    return start_process(name, argv, f"http://127.0.0.1:{port}/health", env={"PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def peft(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("lifecycle-peft")
    return root, {name: write_peft(root / name, r=8 if name != "v2" else 4) for name in ("v1", "v2", "v3")}


def sglang_config(urls: list[str], root: Path, source: Path) -> dict:
    return {"adapter_roots": [str(root)],
            "backends": [{"name": "kt", "kind": "sglang", "urls": urls}],
            "adapters": [{"name": "legal", "source": str(source), "backends": ["kt"]}],
            "routes": [{"name": "kimi-k2.5", "targets": ["kt"]}]}


def test_swap_under_load_on_sglang(start_process, start_gateway, peft):
    root, dirs = peft
    port = free_port()
    start_sglang_on(start_process, "sglang-swap", port)
    base = start_gateway(sglang_config([f"http://127.0.0.1:{port}"], root, dirs["v1"]), name="gw-sglang-swap", env=ENV)

    def swap() -> None:
        response = admin(base, "POST", "/adapters/legal/swap", json={"source": str(dirs["v2"])})
        assert response.status_code == 200, response.text

    answers = load(base, "legal", 200, during=swap)
    texts = assert_one_text_per_version(answers, labels=2)
    loaded = [card["id"] for card in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"] if card.get("parent")]
    view = admin(base, "GET", "/adapters/legal").json()
    assert loaded == [f"legal@{view['active']}"]  # the old version was unloaded after its requests drained
    assert set(texts) == {f"legal@{v['short']}" for v in view["versions"]}
    old = [v for v in view["versions"] if v["status"] == "retired"]
    assert len(old) == 1 and {r["state"] for r in view["replicas"] if r["version"] == old[0]["short"]} == {"unloaded"}


def test_sglang_restart_and_replicas_give_no_client_errors(start_process, start_gateway, peft):
    root, dirs = peft
    ports = [free_port(), free_port()]
    servers = [start_sglang_on(start_process, f"sglang-replica-{i}", port) for i, port in enumerate(ports)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    base = start_gateway(sglang_config(urls, root, dirs["v1"]), name="gw-sglang-replicas", env=ENV)
    before = load(base, "legal", 40)
    assert_one_text_per_version(before, labels=1)
    for url in urls:  # loaded on every replica, not just the first
        assert [c["id"] for c in httpx.get(f"{url}/v1/models").json()["data"] if c.get("parent")] == [before[0].label]
    servers[1].stop()                      # a restart: the emulator forgets every run-time adapter
    start_sglang_on(start_process, "sglang-replica-1-restarted", ports[1])
    after = load(base, "legal", 60)

    def loaded() -> list[list[str]]:
        return [[c["id"] for c in httpx.get(f"{url}/v1/models").json()["data"] if c.get("parent")] for url in urls]

    # The restarted replica gets the adapter again once the gateway sees it back; on a loaded machine the 60
    # requests can all land before that, so more traffic is sent (up to 30 s) until it has, or time runs out.
    deadline = time.monotonic() + 30
    while loaded() != [[before[0].label]] * 2 and time.monotonic() < deadline:
        after += load(base, "legal", 4)
    assert_one_text_per_version(before + after, labels=1)    # no client error, one text per version, throughout
    assert loaded() == [[before[0].label]] * 2


def test_single_sglang_restart_reloads_while_requests_wait(start_process, start_gateway, peft):
    root, dirs = peft
    port = free_port()
    server = start_sglang_on(start_process, "sglang-single", port)
    base = start_gateway(sglang_config([f"http://127.0.0.1:{port}"], root, dirs["v1"]), name="gw-sglang-single",
                         env=ENV)
    first = load(base, "legal", 12)
    server.stop()
    start_sglang_on(start_process, "sglang-single-restarted", port)
    again = load(base, "legal", 30)  # the first of these finds the adapter gone: reloaded, then answered
    assert_one_text_per_version(first + again, labels=1)


def test_two_gateways_in_front_of_one_sglang(start_process, start_gateway, peft):
    root, dirs = peft
    port = free_port()
    start_sglang_on(start_process, "sglang-shared", port)
    config = sglang_config([f"http://127.0.0.1:{port}"], root, dirs["v3"])
    first = start_gateway(config, name="gw-shared-1", env=ENV)
    second = start_gateway(config, name="gw-shared-2", env=ENV)  # its load answers "already loaded"
    answers = load(first, "legal", 30) + load(second, "legal", 30)
    assert_one_text_per_version(answers, labels=1)
    view = admin(second, "GET", "/adapters/legal").json()
    assert {r["state"] for r in view["replicas"]} == {"ready"}


# --- llama.cpp restarted under the gateway with another adapter list -------------------------------------

def test_llama_server_restarted_with_another_lora_list_never_answers_with_the_base(
        llama_binary, tiny_models, loras, start_process, start_gateway):
    port = free_port()

    def llama(name: str, files: tuple[Path, ...]) -> ServerProcess:
        launch = LlamaServerLaunch(llama_binary, tiny_models.model, files, port=port, threads=1)
        return start_process(name, launch.argv(), f"{launch.url}/health")

    server = llama("llama-list-1", (loras["a"], loras["b"]))
    base = start_gateway({
        "adapter_roots": [str(tiny_models.model.parent)],
        "backends": [{"name": "llama", "kind": "llamacpp", "url": f"http://127.0.0.1:{port}"}],
        "adapters": [{"name": "tiny-a", "gguf": str(loras["a"]), "backends": ["llama"]},
                     {"name": "tiny-b", "gguf": str(loras["b"]), "backends": ["llama"]}],
        "routes": [{"name": "kimi-k2.5", "targets": ["llama"]}],
    }, name="gw-llama-relist", env=ENV)
    plain = base_text(base)
    text_b = assert_one_text_per_version(load(base, "tiny-b", 9), labels=1)
    server.stop()
    server = llama("llama-list-2", (loras["b"],))  # b is id 0 now, and a is gone
    b_again = load(base, "tiny-b", 12)
    assert assert_one_text_per_version(b_again, labels=1) == text_b
    with httpx.Client(timeout=60) as client:
        gone = [ask(client, base, "tiny-a", i % 2 == 0) for i in range(4)]
    assert all(a.status == 503 and plain not in a.text for a in gone), gone
    server.stop()
    llama("llama-list-3", (loras["c"], loras["b"]))  # another file at a's old id 0
    with httpx.Client(timeout=60) as client:
        still_gone = [ask(client, base, "tiny-a", i % 2 == 0) for i in range(4)]
        b_third = [ask(client, base, "tiny-b", i % 2 == 0) for i in range(6)]
    assert all(a.status == 503 for a in still_gone), still_gone
    assert {a.text for a in b_third} == set(text_b.values()) and {a.status for a in b_third} == {200}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = {r["state"] for r in admin(base, "GET", "/adapters/tiny-a").json()["replicas"]}
        if states == {"restart_needed"}:
            break
        time.sleep(0.5)
    assert states == {"restart_needed"}


# --- a kill -9 in the middle of a swap ---------------------------------------------------------------------

def kill_during_swap(processes, base: str, emulator: str, source: Path, config_name: str) -> None:
    """Start a swap to `source` through `base` with the new version's verification probes slowed down, and kill
    the gateway (the process started on `config_name`) with -9 while it waits on them."""
    httpx.post(f"{emulator}/_emulator/faults", json={"delay_first_byte_s": 3.0, "count": 3}).raise_for_status()

    def doomed_swap() -> None:
        with pytest.raises(httpx.HTTPError):  # the gateway dies under it
            admin(base, "POST", "/adapters/legal/swap", json={"source": str(source)})
    swap = threading.Thread(target=doomed_swap)
    swap.start()
    time.sleep(1.0)
    gateway = next(p for p in reversed(processes) if p.argv[-1].endswith(config_name))
    os.killpg(gateway.process.pid, signal.SIGKILL)
    gateway.process.wait()
    swap.join()


def test_kill_during_swap_then_restart_serves_the_old_or_the_new_version(start_process, start_gateway, peft,
                                                                          processes):
    root, dirs = peft
    port = free_port()
    emulator = f"http://127.0.0.1:{port}"
    start_sglang_on(start_process, "sglang-kill", port)
    config = sglang_config([emulator], root, dirs["v1"])
    base = start_gateway(config, name="gw-kill", env=ENV)
    before = assert_one_text_per_version(load(base, "legal", 6), labels=1)
    kill_during_swap(processes, base, emulator, dirs["v2"], "gw-kill.yaml")
    base = start_gateway(config, name="gw-kill", env=ENV)
    after = assert_one_text_per_version(load(base, "legal", 9), labels=1)
    assert after == before  # the old version: the flip had not happened
    view = admin(base, "GET", "/adapters/legal").json()
    statuses = {v["short"]: (v["status"], v["reason"]) for v in view["versions"]}
    assert [s for s, _ in statuses.values()].count("active") == 1
    assert ("failed", "interrupted by a gateway restart") in statuses.values()
    # The interrupted version can be swapped in for real now.
    assert admin(base, "POST", "/adapters/legal/swap", json={"source": str(dirs["v2"])}).status_code == 200
    assert assert_one_text_per_version(load(base, "legal", 9), labels=1) != before
