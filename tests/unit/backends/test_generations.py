"""The generation profiles (backends/generations.py) and the hosted body each one gets (reference §2.2, §8)."""
from __future__ import annotations

import datetime as dt

import orjson
import pytest

from backends.base import AgentRules, BackendRequest
from backends.errors import BackendRejectedError, ModelRetiredError
from backends.generations import (
    generation,
    generation_of_model,
    generation_of_template,
    normalise_history,
    reasoning_alias_block,
    reasoning_alias_document,
    sglang_parser_args,
)
from backends.hosted import MoonshotConfig, MoonshotDriver, to_moonshot_body
from backends.hosted_models import HostedCatalog
from backends.llamacpp import LlamaCppDriver, to_llamacpp_body
from backends.sglang import SglangDriver, to_sglang_body

CALL = {"role": "assistant", "tool_calls": [{"id": "get_weather_0", "type": "function",
                                             "function": {"name": "get_weather", "arguments": "{}"}}]}


def request(body: dict | None = None, thinking: bool = True, effort: str | None = None, **rules) -> BackendRequest:
    return BackendRequest(path="/v1/chat/completions", body={"messages": [], **(body or {})}, model="kimi-k2.5",
                          route="kimi-k2.5", adapter=None, thinking=thinking, effort=effort, rules=AgentRules(**rules))


@pytest.mark.parametrize("model, thinking, effort, expected", [
    ("kimi-k2.5", True, None, {"thinking": {"type": "enabled"}}),
    ("kimi-k2.5", False, None, {"thinking": {"type": "disabled"}}),
    ("kimi-k2.5", True, "high", {"thinking": {"type": "enabled"}}),
    ("kimi-k2.6", True, None, {"thinking": {"type": "enabled", "keep": "all"}}),
    ("kimi-k2.6", False, None, {"thinking": {"type": "disabled"}}),
    ("kimi-k2.7-code", True, None, {"thinking": {"type": "enabled", "keep": "all"}}),
    ("kimi-k2.7-code-highspeed", True, "low", {"thinking": {"type": "enabled", "keep": "all"}}),
    ("kimi-k3", True, None, {}),
    ("kimi-k3", True, "medium", {"reasoning_effort": "high"}),
    ("kimi-k3", True, "minimal", {"reasoning_effort": "low"}),
    ("kimi-k3", True, "max", {"reasoning_effort": "max"}),
])
def test_hosted_switch_per_generation(model, thinking, effort, expected):
    body = to_moonshot_body(request({"thinking": {"type": "enabled"}, "reasoning_effort": "high"}, thinking, effort),
                            model)
    assert {k: body[k] for k in ("thinking", "reasoning_effort") if k in body} == expected


@pytest.mark.parametrize("model", ["kimi-k2.7-code", "kimi-k3"])
def test_targets_that_always_think_cannot_take_the_instant_way_out(model):
    req = request({"messages": [CALL], "tool_choice": "required"})
    body = to_moonshot_body(req, model)
    assert body["tool_choice"] == "auto" and body["messages"][0]["reasoning_content"] == " "
    assert req.adjustments == ["tool_choice=auto", "reasoning=placeholder"]
    assert "reasoning_content" not in req.body["messages"][0]  # the client's history is untouched (fallbacks)


def test_placeholder_rule_is_never_an_empty_string():
    req = request({"messages": [CALL]}, missing_reasoning="placeholder")
    body = to_moonshot_body(req, "kimi-k2.6")
    assert body["messages"][0]["reasoning_content"].strip() == "" and body["messages"][0]["reasoning_content"]
    assert body["thinking"] == {"type": "enabled", "keep": "all"} and req.adjustments == ["reasoning=placeholder"]
    with pytest.raises(BackendRejectedError, match="route rule: reject"):
        to_moonshot_body(request({"messages": [CALL]}, missing_reasoning="reject"), "kimi-k3")


def test_self_hosted_forms():
    k26 = to_sglang_body(request(), "kimi", generation("k2.6"))
    assert k26["chat_template_kwargs"] == {"thinking": True, "preserve_thinking": True}
    assert to_sglang_body(request(thinking=False), "kimi", generation("k2.6"))["chat_template_kwargs"] == {
        "thinking": False}
    assert to_sglang_body(request(), "kimi")["chat_template_kwargs"] == {"thinking": True}
    k3 = to_llamacpp_body(request(effort="medium"), [], None, generation("k3"))
    assert k3["reasoning_effort"] == "high" and "thinking" not in k3
    assert "reasoning_effort" not in to_llamacpp_body(request(effort="high"), [], None, generation("k2.5"))


def test_ids_templates_and_parsers():
    assert generation_of_model("kimi-k2.7-code-highspeed").name == "k2.7-code"
    assert generation_of_model("kimi-k3.1-pro").name == "k3" and generation_of_model("legal") is None
    k2 = "<|tool_calls_section_begin|> <|tool_call_begin|>"
    assert generation_of_template(k2).name == "k2.5"
    assert generation_of_template(k2 + "{% if preserve_thinking %}").name == "k2.6"
    assert generation_of_template("{% if reasoning_effort %}").name == "k3"
    assert generation_of_template("<|im_start|>") is None
    assert sglang_parser_args(generation("k2.6")) == ["--reasoning-parser", "kimi_k2", "--tool-call-parser", "kimi_k2"]
    with pytest.raises(ValueError, match="not known"):
        sglang_parser_args(generation("k3"))
    assert sglang_parser_args(generation("k3"), "kimi_k3", "kimi_k3")[1] == "kimi_k3"
    with pytest.raises(ValueError, match="unknown Kimi generation"):
        generation("k4")


def test_history_reasoning_under_both_names():
    messages = [{"role": "assistant", "reasoning": "thought", "tool_calls": []},
                {"role": "assistant", "reasoning_content": "", "tool_calls": []},
                {"role": "assistant", "reasoning": "b", "reasoning_content": "a"},
                {"role": "user", "reasoning": "not an assistant's"}]
    assert normalise_history(messages) == 3
    assert messages[0] == {"role": "assistant", "reasoning_content": "thought", "tool_calls": []}
    assert "reasoning_content" not in messages[1]
    assert messages[2] == {"role": "assistant", "reasoning_content": "a"}
    assert messages[3]["reasoning"] == "not an assistant's"
    assert normalise_history("not a list") == 0


def test_replies_show_reasoning_content():
    block = b'data: {"choices":[{"delta":{"reasoning":"x \\"reasoning\\": y"}}],"usage":{"reasoning_tokens":3}}\n\n'
    assert reasoning_alias_block(block) == block.replace(b'{"reasoning":', b'{"reasoning_content":')
    doc = {"choices": [{"message": {"reasoning": "r", "content": "c"}}]}
    reasoning_alias_document(doc)
    assert doc["choices"][0]["message"] == {"reasoning_content": "r", "content": "c"}


# --- hosted lifecycle -------------------------------------------------------------------------------

DAY = dt.date(2026, 12, 1)


def test_a_retired_unmapped_id_is_a_404_naming_the_retirement():
    catalog = HostedCatalog("hosted", {})
    with pytest.raises(ModelRetiredError, match="retired on 2026-08-31") as failure:
        catalog.resolve("kimi-k2.5", DAY)
    assert failure.value.param == "model"
    assert catalog.resolve("kimi-k2.6", DAY) == ("kimi-k2.6", None, generation("k2.6"))


def test_a_mapped_id_says_so_and_custom_routes_stay_quiet():
    catalog = HostedCatalog("hosted", {"kimi-k2.5": "kimi-k2.6", "fast": "kimi-k3", "kimi-k2.6": "kimi-k3"})
    assert catalog.resolve("kimi-k2.5", DAY) == ("kimi-k2.6", "model=kimi-k2.6", generation("k2.6"))
    assert catalog.resolve("kimi-k2.6", DAY)[1] == "model=kimi-k3"
    assert catalog.resolve("fast", DAY)[1] is None


def test_retirement_dates_listing_and_notices():
    catalog = HostedCatalog("hosted", {"kimi-k2.5": "kimi-k2.6"}, retirements={"kimi-k2.6": dt.date(2026, 12, 31)},
                            generations={"my-k3": "k3"})
    assert catalog.notices(DAY) == [("kimi-k2.6", dt.date(2026, 12, 31), 30)]
    assert catalog.resolve("kimi-k2.5", DAY)[0] == "kimi-k2.6"
    with pytest.raises(ModelRetiredError):
        catalog.resolve("kimi-k2.5", dt.date(2027, 1, 1))
    catalog.take_listing({"kimi-k3"})  # gone from the listing ahead of its date: retired now
    with pytest.raises(ModelRetiredError):
        catalog.resolve("kimi-k2.5", DAY)
    assert catalog.generation_of("my-k3").name == "k3" and catalog.generation_of("other").name == "k2.5"
    assert catalog.retirement("moonshot-v1-8k-vision-preview") == dt.date(2026, 8, 31)
    assert catalog.retirement("kimi-k2-thinking-turbo") == dt.date(2026, 5, 25)
    assert catalog.retirement("kimi-k2.50") is None


def test_config_refuses_a_mapping_onto_a_retired_id():
    base = {"name": "hosted", "kind": "moonshot", "url": "http://h", "api_key_env": "K"}
    with pytest.raises(ValueError, match="models.kimi-k2.6: 'kimi-k2.5' was retired on 2026-08-31"):
        MoonshotConfig(**base, models={"kimi-k2.6": "kimi-k2.5"})
    with pytest.raises(ValueError, match="generation"):
        MoonshotConfig(**base, generations={"x": "k9"})
    config = MoonshotConfig(**base, models={"kimi-k2.5": "kimi-k2.6"}, retirements={"kimi-k2.6": "2026-12-31"})
    assert config.catalog().retirement("kimi-k2.6") == dt.date(2026, 12, 31)


@pytest.mark.parametrize("model, thinking, sent, adjusted", [
    ("kimi-k2.6", True, {"temperature": 0.6, "top_p": 0.95}, ["temperature=1"]),
    ("kimi-k2.6", False, {"temperature": 0.6, "presence_penalty": 0.5}, ["presence_penalty=0"]),
    ("kimi-k2.5", False, {"temperature": 1.0}, ["temperature=0.6"]),
    ("kimi-k3", True, {"temperature": 1.0, "frequency_penalty": 0}, []),
])
def test_fixed_sampling_per_generation_and_mode_is_left_to_the_server_and_said(model, thinking, sent, adjusted):
    req = request(sent, thinking)
    body = to_moonshot_body(req, model)
    assert not set(sent) & set(body) and req.adjustments == adjusted


# --- drivers: where the generation comes from ----------------------------------------------------------


class Served:
    """A transport answering GETs from a table (and counting them)."""

    def __init__(self, answers: dict) -> None:
        self.answers, self.gets = answers, []

    async def request(self, method, path, body=b"", headers=None):
        self.gets.append(path)
        answer = self.answers[path]

        class Reply:
            status, headers = 200, {}

            async def read(self):
                return orjson.dumps(answer)

            async def aclose(self):
                pass
        return Reply()

    async def probe(self, path, headers=None) -> int:
        return 200

    async def aclose(self) -> None:
        pass


KIMI_26_TEMPLATE = "<|tool_calls_section_begin|><|tool_call_begin|>{% if preserve_thinking %}{% endif %}"


async def test_llama_cpp_reads_the_generation_from_the_template():
    transport = Served({"/lora-adapters": [], "/props": {"chat_template": KIMI_26_TEMPLATE}})
    driver = LlamaCppDriver("gguf", [transport])
    await driver.start()
    assert driver.generation.name == "k2.6"
    body = driver.to_body(request(), 0)
    assert body["chat_template_kwargs"] == {"thinking": True, "preserve_thinking": True}
    pinned = LlamaCppDriver("gguf", [transport], gen=generation("k2.5"))
    await pinned.start()
    assert pinned.generation.name == "k2.5"  # configured wins over the template


async def test_sglang_says_when_the_server_runs_other_parsers(caplog):
    transport = Served({"/v1/models": {"data": [{"id": "kimi"}]},
                        "/server_info": {"reasoning_parser": None, "tool_call_parser": "kimi_k2"}})
    driver = SglangDriver("kt", [transport], served_model=None, gen=generation("k2.6"),
                          parsers={"reasoning_parser": "kimi_k2", "tool_call_parser": "kimi_k2"})
    await driver.start()
    assert "runs reasoning_parser=None, not 'kimi_k2'" in caplog.text and "tool_call_parser" not in caplog.text


async def test_hosted_models_are_read_at_start_and_again_when_due(monkeypatch):
    transport = Served({"/v1/models": {"data": [{"id": "kimi-k2.6"}]}})
    catalog = HostedCatalog("hosted", {"kimi-k2.5": "kimi-k2.6"}, retirements={"kimi-k2.6": dt.date(2099, 1, 1)})
    driver = MoonshotDriver("hosted", [transport], api_key="k", models={}, catalog=catalog, refresh_s=3600)
    await driver.start()
    assert driver.available == {"kimi-k2.6"} and transport.gets == ["/v1/models"]
    await driver.health()
    assert transport.gets == ["/v1/models"]  # not due yet
    driver.refresh_s = 0
    await driver.health()
    assert transport.gets == ["/v1/models", "/v1/models"]
    assert driver.retirements()[0][0] == "kimi-k2.6" and driver.retirements()[0][1] > 20000
