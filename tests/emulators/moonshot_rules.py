"""Request rules of the Moonshot emulator: what the hosted API rejects, and with which error.

Owns the nested error body `{"error": {"type", "message"}}` (moonshot-api.md §4), the per-model
profiles (§0, §1 "Model IDs"), the thinking switch (§2.2), fixed sampling (§2.1), tool and
tool_choice limits (§2.2, §3 "Tool calls"), the reasoning_content-in-history rule (§3), image URLs
(§3 "Images and video"), `stop` limits and the context limit (§1, §4). No HTTP here.

Generations (§8): each model id follows one generation's profile (`GENERATION_PROFILES`), by its name or
as configured (`--generation ID=GEN`): K2.6 discards replayed reasoning unless `thinking.keep` is "all"
(the emulator records it: `replayed_reasoning`), K2.7-code accepts only `{type: enabled, keep: all}`, K3
refuses `thinking`; `thinking` with `reasoning_effort` is a 400 on every model; tool-call ids are
`functions.<name>:<idx>` on K2 and `<name>_<idx>` on K3.

Emulator choices, stricter than anything documented, so gateway tests prove the fields are
stripped: the self-hosted dialect fields in `SELF_HOSTED_FIELDS` (`chat_template_kwargs`, `min_p`,
`top_k`, ...) are rejected as unknown fields, and `reasoning_effort` outside kimi-k3.
Assumed texts (only the pattern or the meaning is documented): the messages prefixed
"Invalid request:", "tool_choice 'required' is incompatible with thinking enabled", and the function
name pattern `^[a-zA-Z_][a-zA-Z0-9_-]{0,63}$` (the stored docs lost its lower bound).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tests.emulators.generation import chat_prompt_tokens, max_tokens_of

MAX_TOOLS = 128
MAX_STOP_STRINGS = 5
MAX_STOP_BYTES = 32
FUNCTION_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_-]{0,63}$")
FIXED_SAMPLING = (("top_p", 0.95), ("n", 1), ("presence_penalty", 0), ("frequency_penalty", 0))
SELF_HOSTED_FIELDS = (
    "chat_template_kwargs", "min_p", "top_k", "repetition_penalty", "min_tokens", "lora_path",
    "separate_reasoning", "stream_reasoning", "enable_thinking", "regex", "ebnf", "ignore_eos",
    "skip_special_tokens", "stop_token_ids", "no_stop_trim", "continue_final_message", "rid",
    "return_hidden_states", "custom_logit_processor", "cache_prompt", "id_slot", "lora", "reasoning",
)
IMAGE_URL_PREFIXES = ("data:", "ms://")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


class HostedError(Exception):
    """An error the hosted API answers with: status, `error.type`, `error.message`."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message}}


def invalid(message: str) -> HostedError:
    return HostedError(400, "invalid_request_error", message)


@dataclass(frozen=True)
class ModelProfile:
    """One generation's rules (§0-§2, §8). The emulator's own table, written from reference/, not imported
    from the gateway: a gateway bug in backends/generations.py must not be mirrored here."""
    generation: str
    thinking_field: bool = True  # accepts the `thinking` object
    keep_all: bool = False  # accepts `thinking.keep: "all"` (k2.6+)
    only_keep_all: bool = False  # accepts nothing but {type: enabled, keep: all} (k2.7-code)
    discards_without_keep: bool = False  # drops replayed reasoning unless keep: all (k2.6, §8)
    always_thinks: bool = False
    reasoning_effort: bool = False  # k3
    context_length: int = 262144
    tool_id_format: str = "functions.{name}:{idx}"  # K2 ids (§8)


GENERATION_PROFILES = {
    "k2.5": ModelProfile("k2.5"),
    "k2.6": ModelProfile("k2.6", keep_all=True, discards_without_keep=True),
    "k2.7-code": ModelProfile("k2.7-code", keep_all=True, only_keep_all=True, always_thinks=True),
    "k3": ModelProfile("k3", thinking_field=False, always_thinks=True, reasoning_effort=True,
                       context_length=1048576, tool_id_format="{name}_{idx}"),
}
ID_PREFIXES = (("kimi-k3", "k3"), ("kimi-k2.7-code", "k2.7-code"), ("kimi-k2.6", "k2.6"), ("kimi-k2.5", "k2.5"))
PROFILES = {model: GENERATION_PROFILES[name] for model, name in (
    ("kimi-k2.5", "k2.5"), ("kimi-k2.6", "k2.6"), ("kimi-k2.7-code", "k2.7-code"),
    ("kimi-k2.7-code-highspeed", "k2.7-code"), ("kimi-k3", "k3"))}


def profile_of(model: str, generations: dict[str, str] | None = None) -> ModelProfile:
    """A configured generation for the id (`--generation ID=GEN`), else the one its name says, else K2.6's."""
    if generations and model in generations:
        return GENERATION_PROFILES[generations[model]]
    for prefix, name in ID_PREFIXES:
        if model.startswith(prefix):
            return GENERATION_PROFILES[name]
    return GENERATION_PROFILES["k2.6"]


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_model(body: Any, models: tuple[str, ...]) -> str:
    if not isinstance(body, dict):
        raise invalid("Invalid request: the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("Invalid request: model is required")
    if model not in models:
        raise HostedError(404, "resource_not_found_error", f"Not found the model {model} or Permission denied")
    return model


def check_fields(body: dict[str, Any], profile: ModelProfile) -> None:
    if "thinking" in body and "reasoning_effort" in body:  # §8 (HKUDS/nanobot#3939), whatever the model
        raise invalid("Invalid request: cannot specify both thinking and reasoning_effort")
    if "functions" in body:
        raise invalid("Invalid request: functions is not supported, use tools instead")
    for name in SELF_HOSTED_FIELDS:
        if name in body:
            raise invalid(f"Invalid request: unknown field {name}")
    if "reasoning_effort" in body and not profile.reasoning_effort:
        raise invalid("Invalid request: unknown field reasoning_effort")
    if profile.reasoning_effort and body.get("reasoning_effort") not in (None, "low", "high", "max"):
        raise invalid("Invalid request: reasoning_effort must be one of low, high, max")


def thinking_enabled(body: dict[str, Any], model: str, profile: ModelProfile) -> bool:
    """The `thinking` object: default on; only enabled/disabled; `keep: "all"` on k2.6+ (§2.2)."""
    thinking = body.get("thinking")
    if thinking is None:
        return True
    if not profile.thinking_field:
        raise invalid(f"Invalid request: thinking is not supported for model {model}, use reasoning_effort")
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
        raise invalid("Invalid request: thinking.type must be 'enabled' or 'disabled'")
    extra = set(thinking) - {"type", "keep"}
    if extra or ("keep" in thinking and not (profile.keep_all and thinking["keep"] == "all")):
        raise invalid(f"Invalid request: unsupported thinking options: {sorted(set(thinking) - {'type'})}")
    if profile.only_keep_all and thinking != {"type": "enabled", "keep": "all"}:
        raise invalid(f'Invalid request: model {model} only accepts thinking {{"type": "enabled", "keep": "all"}}')
    if profile.always_thinks and thinking["type"] == "disabled":
        raise invalid(f"Invalid request: thinking cannot be disabled for model {model}")
    return thinking["type"] == "enabled"


def check_sampling(body: dict[str, Any], thinking: bool) -> None:
    """Fixed values: a different one is a 400, never a silent override (§2.1)."""
    temperature = body.get("temperature")
    if temperature is not None:
        if not is_number(temperature) or not 0 <= temperature <= 1:
            raise invalid("Invalid request: temperature must be a number in [0, 1]")
        fixed = 1.0 if thinking else 0.6
        if abs(temperature - fixed) > 1e-9:
            raise invalid(f"invalid temperature: only {fixed:g} is allowed for this model")
    for name, fixed in FIXED_SAMPLING:
        value = body.get(name)
        if value is not None and (not is_number(value) or abs(value - fixed) > 1e-9):
            raise invalid(f"invalid {name}: only {fixed:g} is allowed for this model")


def check_tools(body: dict[str, Any], thinking: bool) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("Invalid request: tools must be an array")
        if len(tools) > MAX_TOOLS:
            raise invalid(f"Invalid request: too many tools: {len(tools)}, at most {MAX_TOOLS} are allowed")
        for index, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or tool.get("type") != "function":
                raise invalid(f"Invalid request: tools[{index}] must be a function tool")
            name = function.get("name")
            if not isinstance(name, str) or not FUNCTION_NAME.match(name):
                raise invalid(f"Invalid request: tools[{index}].function.name {name!r} "
                              f"must match {FUNCTION_NAME.pattern}")
    check_tool_choice(body.get("tool_choice"), thinking)


def check_tool_choice(choice: Any, thinking: bool) -> None:
    """While thinking only none/auto/null are accepted (§2.2)."""
    if choice is None or choice in ("none", "auto"):
        return
    if choice == "required":
        if thinking:
            raise invalid("tool_choice 'required' is incompatible with thinking enabled")
        return
    if isinstance(choice, dict) and choice.get("type") == "function" and (choice.get("function") or {}).get("name"):
        if thinking:
            raise invalid("tool_choice 'specified' is incompatible with thinking enabled")
        return
    raise invalid("Invalid request: tool_choice must be 'none', 'auto', 'required' or a function")


def check_messages(messages: Any, thinking: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise invalid("Invalid request: messages must be a non-empty array")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in MESSAGE_ROLES:
            raise invalid(f"Invalid request: messages[{index}] has an invalid role")
        if thinking and message["role"] == "assistant" and message.get("tool_calls") \
                and not message.get("reasoning_content"):
            raise invalid(
                f"thinking is enabled but reasoning_content is missing in assistant tool call message at index {index}"
            )
        check_media(message.get("content"))


def check_media(content: Any) -> None:
    """Images/videos must be base64 `data:` or `ms://<file_id>` URLs (§3 "Images and video")."""
    if not isinstance(content, list):
        return
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("image_url", "video_url"):
            continue
        ref = part.get(part["type"])
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str) or not url.startswith(IMAGE_URL_PREFIXES):
            raise invalid("unsupported image url")


def check_output_options(body: dict[str, Any], profile: ModelProfile) -> None:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
                              or any(not isinstance(s, str) or len(s.encode()) > MAX_STOP_BYTES for s in stops)):
        raise invalid(f"Invalid request: stop accepts at most {MAX_STOP_STRINGS} strings "
                      f"of at most {MAX_STOP_BYTES} bytes each")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict)
                                        or response_format.get("type") not in RESPONSE_FORMATS):
        raise invalid("Invalid request: response_format.type must be one of text, json_object, json_schema")
    max_tokens = max_tokens_of(body)
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise invalid("Invalid request: max_tokens must be a positive integer")
    if chat_prompt_tokens(body["messages"]) + (max_tokens or 0) > profile.context_length:
        raise invalid(f"Your request exceeded model token limit : {profile.context_length}")


def replayed_reasoning(body: dict[str, Any], profile: ModelProfile, thinking: bool) -> str | None:
    """What the server does with the reasoning of earlier assistant turns (§8): "kept", "discarded" (K2.6
    with thinking on and no `keep: "all"`: billed, unused), or None when the history carries none."""
    replayed = [m for m in body.get("messages") or () if isinstance(m, dict) and m.get("role") == "assistant"
                and m.get("reasoning_content")]
    if not replayed:
        return None
    keep = (body.get("thinking") or {}).get("keep") == "all"
    return "discarded" if thinking and profile.discards_without_keep and not keep else "kept"


def check_chat_request(body: Any, models: tuple[str, ...],
                       generations: dict[str, str] | None = None) -> tuple[str, bool]:
    """Apply every rule in the hosted API's order of concern: (model, thinking on?)."""
    model = check_model(body, models)
    profile = profile_of(model, generations)
    check_fields(body, profile)
    thinking = thinking_enabled(body, model, profile)
    check_sampling(body, thinking)
    check_messages(body.get("messages"), thinking)
    check_tools(body, thinking)
    check_output_options(body, profile)
    return model, thinking
