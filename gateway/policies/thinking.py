"""pop_reasoning_switch(): the client's thinking switch, in whichever generation's form it was written, taken
out of the body so that each driver writes its target's own form (backends/generations.py).

Accepted forms (they must agree when several are sent):
- `thinking: {"type": "enabled"|"disabled"}`, with or without K2.6's `keep: "all"` (hosted K2.x);
- `chat_template_kwargs: {"thinking": bool}` (SGLang / llama.cpp), `enable_thinking` (Qwen-style SDKs);
  K2.6's `preserve_thinking` is dropped: the gateway keeps replayed reasoning wherever the target can;
- `reasoning_effort` (K3 and OpenAI: "none" is off, any other level is on and is carried to K3);
- `reasoning: {"enabled": bool, "effort": str}` (SGLang's and OpenRouter's object).
"""
from __future__ import annotations

from backends.generations import EFFORTS
from gateway.errors import InvalidRequestError

TEMPLATE_SWITCHES = ("thinking", "enable_thinking")
TEMPLATE_DROPPED = ("preserve_thinking",)


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _effort(value: object, param: str) -> str:
    if not isinstance(value, str) or value not in EFFORTS:
        raise _bad(f"`{param}` must be one of {', '.join(sorted(EFFORTS))}.", param)
    return value


def _hosted_form(switch: object) -> bool:
    kind = switch.get("type") if isinstance(switch, dict) else None
    if kind not in ("enabled", "disabled") or set(switch) - {"type", "keep"} or switch.get("keep", "all") != "all":
        raise _bad('`thinking` must be {"type": "enabled"|"disabled"} (K2.6 form: with "keep": "all").', "thinking")
    return kind == "enabled"


def _template_form(body: dict, choices: list[bool]) -> None:
    kwargs = body["chat_template_kwargs"]
    if not isinstance(kwargs, dict):
        raise _bad("`chat_template_kwargs` must be an object.", "chat_template_kwargs")
    if not any(name in kwargs for name in TEMPLATE_SWITCHES + TEMPLATE_DROPPED):
        return
    for name in TEMPLATE_SWITCHES:
        if name in kwargs:
            if not isinstance(kwargs[name], bool):
                raise _bad(f"`chat_template_kwargs.{name}` must be true or false.", f"chat_template_kwargs.{name}")
            choices.append(kwargs[name])
    rest = {k: v for k, v in kwargs.items() if k not in TEMPLATE_SWITCHES + TEMPLATE_DROPPED}
    if rest:
        body["chat_template_kwargs"] = rest
    else:
        del body["chat_template_kwargs"]


def _reasoning_object(value: object, choices: list[bool]) -> str | None:
    if not isinstance(value, dict) or set(value) - {"enabled", "effort"}:
        raise _bad('`reasoning` must be {"enabled": bool, "effort": "low"|"medium"|"high"|...}.', "reasoning")
    effort = _effort(value["effort"], "reasoning.effort") if "effort" in value else None
    if "enabled" in value:
        if not isinstance(value["enabled"], bool):
            raise _bad("`reasoning.enabled` must be true or false.", "reasoning.enabled")
        choices.append(value["enabled"])
    if effort is not None:
        choices.append(effort != "none")
    return effort


def pop_reasoning_switch(body: dict) -> tuple[bool | None, str | None]:
    """(thinking, effort): the client's choice (None: silent) and its effort level (None: none given).
    Every switch field leaves the body; disagreeing switches are a 400."""
    choices: list[bool] = []
    effort = None
    if "thinking" in body:
        choices.append(_hosted_form(body.pop("thinking")))
    if "chat_template_kwargs" in body:
        _template_form(body, choices)
    if "reasoning" in body:
        effort = _reasoning_object(body.pop("reasoning"), choices)
    if "reasoning_effort" in body:
        value = body.pop("reasoning_effort")
        if value is not None:
            given = _effort(value, "reasoning_effort")
            if effort is not None and given != effort:
                raise _bad("`reasoning_effort` and `reasoning.effort` disagree.", "reasoning_effort")
            effort = given
            choices.append(given != "none")
    if len(set(choices)) > 1:
        raise _bad("The request's thinking switches disagree (`thinking`, `chat_template_kwargs.thinking`, "
                   "`reasoning_effort`, `reasoning`).", "thinking")
    return (choices[0] if choices else None), (None if effort == "none" else effort)
