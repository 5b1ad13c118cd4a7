"""Route resolution: base routes, adapter routes, sticky weighted experiments."""
from collections import Counter

import pytest

from gateway.config import GatewayConfig, RouteConfig
from gateway.errors import ModelNotFoundError, ServiceUnavailableError
from gateway.routing import RouteTable, Target, pick_variant

CONFIG = GatewayConfig.model_validate({
    "backends": [{"name": "kt", "kind": "sglang", "url": "http://127.0.0.1:1"},
                 {"name": "gguf", "kind": "llamacpp", "url": "http://127.0.0.1:2"}],
    "adapters": [{"name": "a", "source": "/x/a", "gguf": "/x/a.gguf", "backends": ["kt", "gguf"]},
                 {"name": "b", "source": "/x/b", "profile": "instant", "backends": ["kt"]}],
    "routes": [{"name": "kimi", "targets": ["kt", "gguf"]},
               {"name": "ab", "experiment": {"variants": {"a": 90, "b": 10}}}],
})


def test_base_and_adapter_routes():
    table = RouteTable(CONFIG)
    assert table.resolve("kimi").route.targets == (Target("kt", None), Target("gguf", None))
    adapter = table.resolve("a").route
    assert adapter.targets == (Target("kt", "a", "a"), Target("gguf", "a", "a")) and adapter.adapter == "a"
    assert table.resolve("b").route.profile == "instant"


def test_unknown_model_is_404():
    with pytest.raises(ModelNotFoundError):
        RouteTable(CONFIG).resolve("nope")


def test_experiment_is_sticky_and_weighted():
    table = RouteTable(CONFIG)
    first = table.resolve("ab", lambda by: "user-7").variant
    assert all(table.resolve("ab", lambda by: "user-7").variant == first for _ in range(20))
    picks = Counter(table.resolve("ab", lambda by: f"user-{i}").variant for i in range(2000))
    assert 1650 < picks["a"] < 1950 and picks["a"] + picks["b"] == 2000
    assert table.resolve("ab", lambda by: "user-7").route.name == first


def test_zero_weight_is_never_picked():
    assert {pick_variant("e", {"a": 0, "b": 5}, f"k{i}") for i in range(200)} == {"b"}


def test_image_url_mode_per_route_and_experiment():
    config = GatewayConfig.model_validate({**CONFIG.model_dump(), "routes": [
        {"name": "kimi", "targets": ["kt"]},
        {"name": "open", "targets": ["kt"], "image_urls": "forward"},
        {"name": "ab", "experiment": {"variants": {"a": 1, "open": 1}}},
        {"name": "ab-fetch", "experiment": {"variants": {"open": 1}}, "image_urls": "fetch"}]})
    table = RouteTable(config)
    assert table.resolve("kimi").route.image_urls is None            # limits.image_urls applies
    assert table.resolve("a").route.image_urls is None               # adapters too
    assert table.resolve("open").route.image_urls == "forward"
    modes = {table.resolve("ab", lambda by: f"u{i}").route.image_urls for i in range(50)}
    assert modes == {None, "forward"}                                # each variant keeps its own
    assert table.resolve("ab-fetch").route.image_urls == "fetch"     # an experiment that says so wins


@pytest.mark.parametrize("variant_routes", [
    [],                                                                  # the variant's route is gone
    [RouteConfig(name="b2", experiment={"variants": {"a": 1}})],         # it became an experiment itself
])
def test_an_experiment_whose_variant_is_not_servable_is_a_503_not_a_crash(variant_routes):
    """The admin API refuses both (409); a route written by another writer must still not crash a request."""
    routes = [RouteConfig(name="ab", experiment={"variants": {"b2": 1}}), *variant_routes]
    table = RouteTable(CONFIG, routes=routes)
    with pytest.raises(ServiceUnavailableError) as error:
        table.resolve("ab", lambda by: "user-1")
    assert "'b2'" in error.value.message and error.value.status_code == 503
