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
from tests.image_hosts import ImageHost
from tests.integration.conftest import ROOT, llama_config

TABLE = ROOT / "docs" / "bad-input.md"
KEYS = {"KEY_ALL": "sk-all-0123456789", "KEY_TINY": "sk-tiny-0123456789", "KEY_SLOW": "sk-slow-0123456789",
        "ADMIN_KEYS": "admin-0123456789"}
ALL = {"authorization": f"Bearer {KEYS['KEY_ALL']}"}
ADMIN = {"authorization": f"Bearer {KEYS['ADMIN_KEYS']}"}
CHAT = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
IMAGE_IP = "127.0.0.3"     # the image host, the one loopback address this gateway trusts as public


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
def image_host():
    with ImageHost(IMAGE_IP) as host:
        yield host.base


@pytest.fixture(scope="module")
def gateway(llama_server, kimi_llama, tiny_models, start_gateway, roots, image_host) -> str:
    config = llama_config(llama_server, tiny_models)
    config["backends"] = config["backends"] + [{"name": "kimi-tpl", "kind": "llamacpp", "url": kimi_llama}]
    config["routes"] = config["routes"] + [{"name": "kimi-template", "targets": ["kimi-tpl"]}]
    config["routes"] = [*config["routes"], {"name": "kimi-forward", "targets": ["llama"], "image_urls": "forward"}]
    config.update({
        "adapter_roots": [str(roots[0]), str(tiny_models.model.parent)],
        "auth": {"admin_keys_env": "ADMIN_KEYS", "client_keys": [
            {"name": "all", "key_env": "KEY_ALL"},
            {"name": "tiny-only", "key_env": "KEY_TINY", "models": ["tiny-*"]},
            {"name": "slow", "key_env": "KEY_SLOW", "rpm": 1}]},
        "limits": {"max_body_bytes": 1024 * 1024, "max_messages": 64, "max_image_bytes": 64 * 1024,
                   "image_fetch_timeout_s": 2, "private_image_networks": [f"{IMAGE_IP}/32"]},
    })
    return start_gateway(config, name="gateway-bad-input", env=KEYS)


def chat(**changes) -> bytes:
    return orjson.dumps({**CHAT, **changes})


def image(*urls: str, model: str = "kimi-k2.5") -> bytes:
    return chat(model=model, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}} for url in urls]}])


def forwarded(url: str) -> bytes:
    """An image on the route with `image_urls: forward`."""
    return image(url, model="kimi-forward")


def schema(value: object) -> bytes:
    """A structured-output request to the route whose llama-server runs the Kimi template (a grammar there)."""
    return chat(model="kimi-template", response_format={"type": "json_schema", "json_schema": {"name": "s",
                                                                                                "schema": value}})


def nested(depth: int) -> dict:
    value: dict = {"type": "integer"}
    for _ in range(depth):
        value = {"type": "array", "items": value}
    return value


def completion(**changes) -> bytes:
    return orjson.dumps({"model": "kimi-k2.5", "prompt": "hi", "max_tokens": 2, **changes})


def adapter(name: str, source: Path, gguf: Path) -> tuple[str, dict, bytes]:
    """The PEFT source is the bad part; the GGUF file is a valid one, so that only the source can fail."""
    return "/admin/adapters", ADMIN, orjson.dumps({"name": name, "source": str(source), "gguf": str(gguf),
                                                   "backends": ["llama"]})


def truncated(root: Path) -> Path:
    directory = write_peft(root / "truncated")
    write_safetensors(directory / "adapter_model.safetensors", {"x.lora_A.weight": [8, 64]}, truncate_to=20)
    return directory


def without_config(root: Path) -> Path:
    directory = write_peft(root / "no-config")
    (directory / "adapter_config.json").unlink()
    return directory


def unpaired(root: Path) -> Path:
    directory = write_peft(root / "unpaired")
    write_safetensors(directory / "adapter_model.safetensors",
                      {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [8, 64]})
    return directory


def bad_offsets(root: Path, name: str, offsets: list) -> Path:
    """A PEFT dir whose lora_A entry has these `data_offsets` (its lora_B is a good one)."""
    directory = write_peft(root / name)
    header = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
              {"dtype": "F32", "shape": [8, 64], "data_offsets": offsets},
              "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
              {"dtype": "F32", "shape": [64, 8], "data_offsets": [2048, 4096]}}
    raw = orjson.dumps(header)
    (directory / "adapter_model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4096)
    return directory


def not_gguf(root: Path) -> Path:
    path = root / "not-gguf.gguf"
    path.write_text("this is not a GGUF file")
    return path


def symlinked(root: Path, outside: Path) -> Path:
    (root / "escape").symlink_to(write_peft(outside / "target"))
    return root / "escape"


def builders(roots: tuple[Path, Path, Path], images: str = f"http://{IMAGE_IP}:1") -> dict:
    """Per HTTP row, a function making its request: (path relative to the gateway root, headers, body).
    `images` is the image host (tests/image_hosts.py)."""
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
        "too-many-image-urls": lambda: (chat_path, ALL, image(*(f"{images}/ok.png?{i}" for i in range(33)))),
        "image-redirect-private": lambda: (chat_path, ALL, image(f"{images}/redirect?to=http%3A%2F%2F127.0.0.2%2Fx.png")),
        "image-redirect-loop": lambda: (chat_path, ALL, image(f"{images}/loop")),
        "image-too-large": lambda: (chat_path, ALL, image(f"{images}/big.png")),
        "image-not-an-image": lambda: (chat_path, ALL, image(f"{images}/page.html")),
        "image-fake-type": lambda: (chat_path, ALL, image(f"{images}/fake.png")),
        "image-compressed": lambda: (chat_path, ALL, image(f"{images}/gzip.png")),
        "image-http-error": lambda: (chat_path, ALL, image(f"{images}/missing.png")),
        "image-slow": lambda: (chat_path, ALL, image(f"{images}/slow.png")),
        "image-backslash": lambda: (chat_path, ALL, forwarded("http://example.com\\@127.0.0.1/x.png")),
        "image-userinfo": lambda: (chat_path, ALL, forwarded("http://user@example.com/x.png")),
        "image-control-char": lambda: (chat_path, ALL, forwarded("http://exam\tple.com/x.png")),
        "image-percent-host": lambda: (chat_path, ALL, forwarded("http://exa%6dple.com/x.png")),
        "image-decimal-host": lambda: (chat_path, ALL, forwarded("http://2130706433/x.png")),
        "image-octal-host": lambda: (chat_path, ALL, forwarded("http://0177.0.0.1/x.png")),
        "image-hex-host": lambda: (chat_path, ALL, forwarded("http://0x7f.1/x.png")),
        "image-short-host": lambda: (chat_path, ALL, forwarded("http://127.1/x.png")),
        "image-mapped-ipv6": lambda: (chat_path, ALL, forwarded("http://[::ffff:127.0.0.1]/x.png")),
        "image-mapped-ipv6-hex": lambda: (chat_path, ALL, forwarded("http://[::ffff:7f00:1]/x.png")),
        "image-non-ascii-host": lambda: (chat_path, ALL, forwarded("http://\uff45xample.com/x.png")),
        "image-bad-punycode": lambda: (chat_path, ALL, forwarded("http://xn--zz.example/x.png")),
        "image-port": lambda: (chat_path, ALL, forwarded("http://example.com:8080/x.png")),
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
        "missing-adapter-config": lambda: adapter("noconfig", without_config(root), gguf),
        "unpaired-lora": lambda: adapter("unpaired", unpaired(root), gguf),
        "unsafe-adapter-name": lambda: adapter("../evil", root, gguf),
        "admin-no-key": lambda: ("/admin/adapters", {}, b"{}"),
        "admin-malformed-json": lambda: ("/admin/adapters", ADMIN, b"{oops"),
        "admin-not-an-object": lambda: ("/admin/adapters", ADMIN, b"[]"),
        "admin-duplicate-key": lambda: ("/admin/adapters", ADMIN,
                                        b'{"name": "a", "name": "b", "gguf": "x.gguf", "backends": ["llama"]}'),
        "admin-wrong-content-type": lambda: ("/admin/adapters", {**ADMIN, "content-type": "text/plain"}, b"{}"),
        "admin-oversized-body": lambda: ("/admin/adapters", ADMIN, orjson.dumps({"name": "x" * (2 * 1024 * 1024)})),
        "admin-wrong-method": lambda: ("/admin/backends", ADMIN, b"{}"),
        "admin-number-as-string": lambda: ("/admin/routes/strict", ADMIN, orjson.dumps(
            {"name": "strict", "targets": ["llama"], "timeout_s": "30"}), "PUT"),
        "admin-unknown-field": lambda: ("/admin/adapters", ADMIN, orjson.dumps(
            {"name": "extra", "gguf": str(gguf), "backends": ["llama"], "rank": 8})),
        "bad-offsets": lambda: adapter("offsets", bad_offsets(root, "offsets", ["a", 1]), gguf),
        "size-mismatch": lambda: adapter("size", bad_offsets(root, "size", [0, 16]), gguf),
        "not-gguf": lambda: adapter("notgguf", write_peft(root / "good-for-not-gguf"), not_gguf(root)),
        "feedback-malformed-json": lambda: ("/v1/feedback", ALL, b"{oops"),
        "feedback-score-string": lambda: ("/v1/feedback", ALL, b'{"request_id": "r", "score": "0.5"}'),
        "deadline-header-garbage": lambda: (chat_path, {**ALL, "x-kimi-deadline-ms": "soon"}, chat()),
        "priority-header-garbage": lambda: (chat_path, {**ALL, "x-kimi-priority": "urgent"}, chat()),
        "no-key-oversized-body": lambda: (chat_path, {}, chat(user="x" * (2 * 1024 * 1024))),
        "malformed-tool-choice": lambda: (chat_path, ALL, chat(tool_choice={"type": "function", "function": "f"})),
        "malformed-json-schema": lambda: (chat_path, ALL, chat(response_format={"type": "json_schema",
                                                                                "json_schema": "trip"})),
        "schema-too-deep": lambda: (chat_path, ALL, schema(nested(100))),
        "schema-too-many-alternatives": lambda: (chat_path, ALL, schema({"enum": list(range(5000))})),
        "schema-repetition-too-large": lambda: (chat_path, ALL, schema({"type": "string", "minLength": 10**6})),
        "openapi-no-admin-key": lambda: ("/openapi.json", {}, None),
    }


CONFIG_CASES = {
    "missing-adapter-root": {"adapter_roots": ["/nonexistent/kgw-adapters"]},
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
def test_http_case(gateway, roots, image_host, case, status, fragment):
    path, headers, body, *method = builders(roots, image_host)[case]()   # (method: POST, GET without a body)
    base = gateway.removesuffix("/v1")
    if body is None:
        response = httpx.get(base + path, headers=headers, timeout=30)
    else:
        response = httpx.request(method[0] if method else "POST", base + path, content=body,
                                 headers={"content-type": "application/json", **headers}, timeout=30)
    assert response.status_code == int(status), response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"]
    assert response.headers.get("x-request-id")  # the admin API's answers too
    if case == "admin-wrong-method":
        assert response.headers["allow"] == "GET, HEAD"
    if case.startswith("image-") and case != "image-no-vision":   # the param names the content part
        assert error["param"] == "messages[0].content[0].image_url" and error["type"] == "invalid_request_error"


def test_unauthenticated_body_is_never_waited_for(gateway):
    """Headers announcing 1 GB and a first 64 KiB: the 401 comes at once, and the gateway hangs up rather
    than take the rest."""
    import socket
    import time

    port = int(gateway.removesuffix("/v1").rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000000000\r\n\r\n" + b'{"model": "kimi-k2.5", "user": "' + b"x" * 65536)
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 401 ") and time.monotonic() - started < 2, head[:200]
        assert b"connection: close" in head.lower()
        sock.settimeout(5)
        try:
            while sock.recv(65536):  # the rest of the 401, then the gateway's end of the connection
                pass
        except ConnectionResetError:
            pass  # closed with our unread bytes in its buffer: a reset is a hang-up too
        assert time.monotonic() - started < 5


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
