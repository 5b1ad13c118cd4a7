"""The live fuzz run: 2,000+ generated requests, valid and adversarial, against the real gateway process in
front of a real llama-server. The gateway must stay healthy, answer every request with a success or an
OpenAI-shaped error, give no 500 without a request id, and keep its memory bounded."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import llama_config
from tests.unit.gateway.test_fuzz import REQUEST

REQUESTS = 2000
RSS_GROWTH_LIMIT_KB = 20 * 1024
VALID = st.fixed_dictionaries({
    "model": st.sampled_from(["kimi-k2.5", "tiny-a", "tiny-b", "tiny-ab"]),
    "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=60)}),
                         min_size=1, max_size=3),
    "max_tokens": st.integers(1, 4), "stream": st.booleans(), "temperature": st.floats(0, 2)})


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_live_fuzz(llama_server, tiny_models, start_gateway, processes):
    url = start_gateway(llama_config(llama_server, tiny_models, limits={"max_tokens": 8}), name="gateway-fuzz")
    gateway = next(p for p in processes if p.health_url.startswith(url.removesuffix("/v1")))
    client = httpx.Client(timeout=30)
    statuses: dict[int, int] = {}
    for _ in range(20):  # warm up before the first RSS reading
        client.post(f"{url}/chat/completions", json={"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2})
    before = rss_kb(gateway.process.pid)

    @given(body=VALID | REQUEST, path=st.sampled_from(["/chat/completions", "/completions"]))
    @settings(max_examples=REQUESTS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def one_request(body, path):
        response = client.post(url + path, content=json.dumps(body, ensure_ascii=False).encode(),
                               headers={"content-type": "application/json"})
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code in (200, 400, 403, 404, 413, 422, 429, 503), response.text
        if response.status_code != 200:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert response.headers["x-request-id"]

    one_request()
    after = rss_kb(gateway.process.pid)
    client.close()
    assert sum(statuses.values()) >= REQUESTS
    assert statuses.get(200, 0) > 100 and sum(v for k, v in statuses.items() if k >= 400) > 100, statuses
    assert httpx.get(url.removesuffix("/v1") + "/healthz", timeout=10).status_code == 200
    assert after - before < RSS_GROWTH_LIMIT_KB, f"RSS grew {after - before} kB over {REQUESTS} requests"
    print(f"live fuzz: {statuses}, RSS {before} kB -> {after} kB")
