"""Every row of docs/bad-input.md, asserted against the real gateway process in front of llama-server."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from tests.adapter_files import write_peft, write_safetensors
from tests.integration.conftest import ROOT, llama_config

TABLE = ROOT / "docs" / "bad-input.md"
KEYS = {"KEY_ALL": "sk-all-0123456789", "KEY_TINY": "sk-tiny-0123456789", "KEY_SLOW": "sk-slow-0123456789",
        "ADMIN_KEYS": "admin-0123456789"}
ALL = {"authorization": f"Bearer {KEYS['KEY_ALL']}"}
ADMIN = {"authorization": f"Bearer {KEYS['ADMIN_KEYS']}"}
CHAT = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def rows() -> list[tuple[str, str, str]]:
    """(case, status, message fragment) for each row of the table."""
    found = []
    for line in TABLE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"[a-z][a-z0-9-]*", cells[0]) and cells[0] != "case":
            found.append((cells[0], cells[2], cells[3].strip("`")))
    return found


@pytest.fixture(scope="module")
def roots(tmp_path_factory, tiny_models) -> tuple[Path, Path, Path]:
    """(adapter root, a folder outside it, a valid GGUF LoRA inside the roots)."""
    base = tmp_path_factory.mktemp("bad-input")
    inside, outside = base / "adapters", base / "outside"
    inside.mkdir()
    outside.mkdir()
    return inside, outside, tiny_models.lora_a


@pytest.fixture(scope="module")
def gateway(llama_server, tiny_models, start_gateway, roots) -> str:
    config = llama_config(llama_server, tiny_models)
    config.update({
        "adapter_roots": [str(roots[0]), str(tiny_models.model.parent)],
        "auth": {"admin_keys_env": "ADMIN_KEYS", "client_keys": [
            {"name": "all", "key_env": "KEY_ALL"},
            {"name": "tiny-only", "key_env": "KEY_TINY", "models": ["tiny-*"]},
            {"name": "slow", "key_env": "KEY_SLOW", "rpm": 1}]},
        "limits": {"max_body_bytes": 1024 * 1024, "max_messages": 64},
    })
    return start_gateway(config, name="gateway-bad-input", env=KEYS)


def chat(**changes) -> bytes:
    return orjson.dumps({**CHAT, **changes})


def completion(**changes) -> bytes:
    return orjson.dumps({"model": "kimi-k2.5", "prompt": "hi", "max_tokens": 2, **changes})


def image(url: str) -> bytes:
    return chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])


def adapter(name: str, source: Path, gguf: Path) -> tuple[str, dict, bytes]:
    """The PEFT source is the bad part; the GGUF file is a valid one, so that only the source can fail."""
    return "/admin/adapters", ADMIN, orjson.dumps({"name": name, "source": str(source), "gguf": str(gguf),
                                                   "backends": ["llama"]})


def truncated(root: Path) -> Path:
    directory = write_peft(root / "truncated")
    write_safetensors(directory / "adapter_model.safetensors", {"x.lora_A.weight": [8, 64]}, truncate_to=20)
    return directory


def symlinked(root: Path, outside: Path) -> Path:
    (root / "escape").symlink_to(write_peft(outside / "target"))
    return root / "escape"


def builders(roots: tuple[Path, Path, Path]) -> dict:
    """Per HTTP row, a function making its request: (path relative to the gateway root, headers, body)."""
    root, outside, gguf = roots
    chat_path = "/v1/chat/completions"
    return {
        "malformed-json": lambda: (chat_path, ALL, b"{oops"),
        "wrong-type": lambda: (chat_path, ALL, chat(temperature="hot")),
        "unknown-field": lambda: (chat_path, ALL, chat(bogus=1)),
        "no-messages": lambda: (chat_path, ALL, orjson.dumps({"model": "kimi-k2.5"})),
        "unknown-model": lambda: (chat_path, ALL, chat(model="no-such-model")),
        "outside-allowlist": lambda: (chat_path, {"authorization": f"Bearer {KEYS['KEY_TINY']}"}, chat()),
        "no-key": lambda: (chat_path, {}, chat()),
        "wrong-key": lambda: (chat_path, {"authorization": "Bearer wrong"}, chat()),
        "oversized-body": lambda: (chat_path, ALL, chat(user="x" * (2 * 1024 * 1024))),
        "max-tokens-over-limit": lambda: (chat_path, ALL, chat(max_tokens=10_000_000)),
        "too-many-messages": lambda: (chat_path, ALL, chat(messages=[{"role": "user", "content": "hi"}] * 65)),
        "file-image": lambda: (chat_path, ALL, image("file:///etc/passwd")),
        "loopback-image": lambda: (chat_path, ALL, image("http://127.0.0.1/x.png")),
        "metadata-image": lambda: (chat_path, ALL, image("http://169.254.169.254/latest/meta-data/")),
        "image-no-vision": lambda: (chat_path, ALL, image("data:image/png;base64,iVBORw0KGgo=")),
        "temperature-over-max": lambda: (chat_path, ALL, chat(temperature=3)),
        "top-p-over-max": lambda: (chat_path, ALL, chat(top_p=1.5)),
        "penalty-under-min": lambda: (chat_path, ALL, chat(presence_penalty=-3)),
        "n-over-max": lambda: (chat_path, ALL, chat(n=129)),
        "n-decimal": lambda: (chat_path, ALL, chat(n=1.5)),
        "logit-bias-over-max": lambda: (chat_path, ALL, chat(logit_bias={"50256": 101})),
        "logit-bias-bad-key": lambda: (chat_path, ALL, chat(logit_bias={"AI": 10})),
        "top-logprobs-over-max": lambda: (chat_path, ALL, chat(logprobs=True, top_logprobs=21)),
        "logprobs-over-max": lambda: ("/v1/completions", ALL, completion(logprobs=6)),
        "best-of-over-max": lambda: ("/v1/completions", ALL, completion(best_of=21)),
        "best-of-under-n": lambda: ("/v1/completions", ALL, completion(n=2, best_of=1)),
        "best-of-unservable": lambda: ("/v1/completions", ALL, completion(best_of=3)),
        "echo-unservable": lambda: ("/v1/completions", ALL, completion(echo=True)),
        "suffix-unservable": lambda: ("/v1/completions", ALL, completion(suffix=" end")),
        "n-over-slots": lambda: (chat_path, ALL, chat(n=2)),
        "traversal-adapter": lambda: adapter("trav", root / ".." / "x", gguf),
        "symlink-escape": lambda: adapter("sym", symlinked(root, outside), gguf),
        "bad-rank": lambda: adapter("rank0", write_peft(root / "rank0", r=0, shape_r=8), gguf),
        "rank-mismatch": lambda: adapter("mismatch", write_peft(root / "mismatch", r=8, shape_r=4), gguf),
        "truncated-safetensors": lambda: adapter("trunc", truncated(root), gguf),
        "unsafe-adapter-name": lambda: adapter("../evil", root, gguf),
        "admin-no-key": lambda: ("/admin/adapters", {}, b"{}"),
    }


CONFIG_CASES = {
    "inline-secret": {"auth": {"client_keys": [{"name": "a", "key_env": "sk-live-123"}]}},
    "inline-api-key": {"backends": [{"name": "h", "kind": "moonshot", "url": "https://api.moonshot.ai/v1",
                                     "api_key_env": "K", "api_key": "sk-live-123"}]},
}


def test_every_documented_case_has_a_test():
    documented = [case for case, _, _ in rows()]
    tested = builders((Path("/"), Path("/"), Path("/"))).keys() | CONFIG_CASES.keys() | {"rate-limited"}
    assert len(documented) == len(set(documented)) >= 20
    assert set(documented) == tested


@pytest.mark.parametrize("case, status, fragment", [row for row in rows() if row[0] not in CONFIG_CASES
                                                    and row[0] != "rate-limited"])
def test_http_case(gateway, roots, case, status, fragment):
    path, headers, body = builders(roots)[case]()
    base = gateway.removesuffix("/v1")
    response = httpx.post(base + path, content=body, headers={"content-type": "application/json", **headers},
                          timeout=30)
    assert response.status_code == int(status), response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"]
    assert response.headers.get("x-request-id")  # the admin API's answers too


def test_rate_limited(gateway):
    (case, status, fragment), = [row for row in rows() if row[0] == "rate-limited"]
    headers = {"authorization": f"Bearer {KEYS['KEY_SLOW']}"}
    first = httpx.post(f"{gateway}/chat/completions", json=CHAT, headers=headers, timeout=30)
    second = httpx.post(f"{gateway}/chat/completions", json=CHAT, headers=headers, timeout=30)
    assert first.status_code == 200
    assert second.status_code == int(status) and fragment in second.json()["error"]["message"]
    assert int(second.headers["retry-after"]) >= 1


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_case(tmp_path, case):
    (_, status, fragment), = [row for row in rows() if row[0] == case]
    config = {"backends": [{"name": "b", "kind": "llamacpp", "url": "http://127.0.0.1:1"}], **CONFIG_CASES[case]}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "check", str(path)], capture_output=True,
                            text=True, cwd=ROOT)
    assert status == "exit 1" and result.returncode == 1
    assert fragment in result.stderr and "sk-live-123" not in result.stderr + result.stdout


def test_keys_never_reach_any_log(gateway, processes):
    """Every key this module set must be absent from every log the test processes wrote."""
    httpx.post(f"{gateway}/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-wrong-key-9999"},
               timeout=30)
    logs = [Path(p.log_path).read_text(errors="replace") for p in processes if p.log_path]
    assert logs
    for secret in [*KEYS.values(), "sk-wrong-key-9999"]:
        assert not any(secret in text for text in logs), f"{secret} leaked into a log"
