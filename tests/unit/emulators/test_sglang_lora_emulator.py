"""The SGLang emulator's LoRA surface: selection, load/unload, LRU, reload, /v1/models, static KT mode
(sglang-kt.md §0.1, §1.1-§1.4, §1.6, §2.6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.emulators.sglang import SglangOptions, create_sglang_app
from tests.emulators.sglang_lora import kt_nonexpert_cache_dir
from tests.unit.emulators.helpers import client_for, sse_payloads, user, write_adapter

NEVER_LOADED = "Got LoRA adapter that has never been loaded: {name}\nAll loaded adapters: {names}."
STATIC_REQUEST = (
    "This server has KT expert LoRA statically paired with adapter 'neko'. Every request in the batch "
    "must select exactly that adapter; base, mixed, and other-adapter requests are not supported."
)


def lora_options(tmp_path: Path, **kwargs) -> SglangOptions:
    return SglangOptions(lora_paths={"neko": write_adapter(tmp_path / "neko")}, **kwargs)


def success_output(loaded: dict[str, str]) -> dict:
    return {"rid": None, "http_worker_ipc": None, "success": True, "error_message": "", "loaded_adapters": loaded}


async def content_of(client, body: dict) -> str:
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


# --- selection -----------------------------------------------------------------------------------


async def test_adapter_in_model_changes_output_and_base_part_is_not_validated(tmp_path):
    async with client_for(create_sglang_app(lora_options(tmp_path))) as client:
        base = await content_of(client, {"model": "kimi", "messages": user("hi")})
        adapted = await content_of(client, {"model": "kimi:neko", "messages": user("hi")})
        other_base_name = await content_of(client, {"model": "not-the-served-name:neko", "messages": user("hi")})
        via_field = await content_of(client, {"model": "kimi", "lora_path": "neko", "messages": user("hi")})
    assert adapted != base
    assert adapted == other_base_name == via_field


async def test_adapter_in_model_wins_over_lora_path(tmp_path):
    async with client_for(create_sglang_app(lora_options(tmp_path))) as client:
        ok = await client.post("/v1/chat/completions",
                               json={"model": "kimi:neko", "lora_path": "ghost", "messages": user("hi")})
        bad = await client.post("/v1/chat/completions",
                                json={"model": "kimi:ghost", "lora_path": "neko", "messages": user("hi")})
    assert ok.status_code == 200
    assert bad.status_code == 400 and "never been loaded: ghost" in bad.json()["message"]


async def test_unknown_adapter_is_a_flat_400_without_stream(tmp_path):
    async with client_for(create_sglang_app(lora_options(tmp_path))) as client:
        response = await client.post("/v1/chat/completions", json={"model": "kimi:ghost", "messages": user("hi")})
    assert response.status_code == 400
    assert response.json() == {"object": "error", "type": "BadRequest", "param": None, "code": 400,
                               "message": NEVER_LOADED.format(name="ghost", names="dict_keys(['neko'])")}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_unknown_adapter_on_a_stream_is_an_error_event_under_200(tmp_path, path):
    body = {"model": "kimi:ghost", "messages": user("hi"), "prompt": "hi", "stream": True}
    async with client_for(create_sglang_app(lora_options(tmp_path))) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 200
    assert sse_payloads(response.text) == [
        {"error": {"object": "error", "type": "BadRequestError", "param": None, "code": 400,
                   "message": NEVER_LOADED.format(name="ghost", names="dict_keys(['neko'])")}},
        "[DONE]",
    ]


@pytest.mark.parametrize("stream", [False, True])
async def test_adapter_request_without_lora_enabled_is_rejected_before_streaming(stream):
    async with client_for(create_sglang_app(SglangOptions())) as client:
        response = await client.post("/v1/chat/completions",
                                     json={"model": "kimi:neko", "messages": user("hi"), "stream": stream})
    assert response.status_code == 400
    assert response.json()["message"] == (
        "LoRA adapter 'neko' was requested, but LoRA is not enabled. Please launch the server with "
        "--enable-lora flag and preload adapters using --lora-paths or /load_lora_adapter endpoint."
    )


# --- load / unload -------------------------------------------------------------------------------


async def test_load_and_unload_return_lora_update_output(tmp_path):
    extra = write_adapter(tmp_path / "extra")
    options = lora_options(tmp_path)
    async with client_for(create_sglang_app(options)) as client:
        loaded = await client.post("/load_lora_adapter", json={"lora_name": "extra", "lora_path": extra})
        unloaded = await client.post("/unload_lora_adapter", json={"lora_name": "extra"})
    assert loaded.status_code == 200
    assert loaded.json() == success_output({"neko": options.lora_paths["neko"], "extra": extra})
    assert unloaded.status_code == 200
    assert unloaded.json() == success_output({"neko": options.lora_paths["neko"]})


async def test_loading_a_loaded_name_fails(tmp_path):
    async with client_for(create_sglang_app(lora_options(tmp_path))) as client:
        response = await client.post("/load_lora_adapter",
                                     json={"lora_name": "neko", "lora_path": str(tmp_path / "neko")})
    assert response.status_code == 400
    body = response.json()
    assert body["success"] is False
    assert body["error_message"] == "Failed to load LoRA adapter neko because it is already loaded"
    assert body["loaded_adapters"] == {"neko": str(tmp_path / "neko")}  # a scheduler-side failure: the map


async def test_loading_a_loaded_path_under_a_new_name_succeeds(tmp_path):
    """Only the name must be new; the same path under another name is a warning in SGLang (§1.2)."""
    async with client_for(create_sglang_app(lora_options(tmp_path))) as client:
        response = await client.post("/load_lora_adapter",
                                     json={"lora_name": "neko2", "lora_path": str(tmp_path / "neko")})
    assert response.status_code == 200 and set(response.json()["loaded_adapters"]) == {"neko", "neko2"}


async def test_unloading_an_unknown_name_fails(tmp_path):
    async with client_for(create_sglang_app(lora_options(tmp_path))) as client:
        response = await client.post("/unload_lora_adapter", json={"lora_name": "ghost"})
    assert response.status_code == 400
    assert response.json() == {"rid": None, "http_worker_ipc": None, "success": False, "loaded_adapters": None,
                               "error_message": "LoRA with name ghost does not exist. Loaded LoRAs: dict_keys(['neko'])"}


@pytest.mark.parametrize("endpoint, body", [
    ("/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"}),
    ("/unload_lora_adapter", {"lora_name": "x"}),
])
async def test_load_and_unload_need_enable_lora(endpoint, body):
    async with client_for(create_sglang_app(SglangOptions())) as client:
        response = await client.post(endpoint, json=body)
    assert response.status_code == 400
    assert response.json()["error_message"] == "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."


async def test_enable_lora_without_paths_allows_runtime_loading(tmp_path):
    path = write_adapter(tmp_path / "late")
    async with client_for(create_sglang_app(SglangOptions(enable_lora=True))) as client:
        response = await client.post("/load_lora_adapter", json={"lora_name": "late", "lora_path": path})
    assert response.status_code == 200 and response.json()["loaded_adapters"] == {"late": path}


@pytest.mark.parametrize("setup, expected", [
    (lambda d: str(d / "does-not-exist"), "Repo id must be in the form"),
    (lambda d: (d / "empty").mkdir() or str(d / "empty"), "No such file or directory"),
    (lambda d: write_adapter(d / "nor", r=None), "'r'"),
    (lambda d: write_adapter(d / "noalpha", lora_alpha=None), "'lora_alpha'"),
    (lambda d: write_adapter(d / "nomods", target_modules=None), "'target_modules'"),
    (lambda d: write_adapter(d / "ia3", peft_type="IA3"), "peft_type must be 'lora'"),
])
async def test_bad_adapter_paths_fail_with_400(tmp_path, setup, expected):
    path = setup(tmp_path)
    async with client_for(create_sglang_app(SglangOptions(enable_lora=True))) as client:
        response = await client.post("/load_lora_adapter", json={"lora_name": "bad", "lora_path": path})
    assert response.status_code == 400
    body = response.json()
    assert body["success"] is False and expected in body["error_message"]
    assert body["loaded_adapters"] == {}


async def test_adapter_that_adds_tokens_is_rejected(tmp_path):
    path = write_adapter(tmp_path / "tok")
    (tmp_path / "tok" / "added_tokens.json").write_text('{"<x>": 163842}')
    async with client_for(create_sglang_app(SglangOptions(enable_lora=True))) as client:
        response = await client.post("/load_lora_adapter", json={"lora_name": "tok", "lora_path": path})
    assert response.status_code == 400
    assert response.json()["error_message"] == (
        "LoRA serving currently doesn't support adapters that add tokens to the vocabulary")


async def test_rank_above_max_lora_rank_is_rejected(tmp_path):
    path = write_adapter(tmp_path / "big", r=64)
    async with client_for(create_sglang_app(SglangOptions(enable_lora=True, max_lora_rank=16))) as client:
        response = await client.post("/load_lora_adapter", json={"lora_name": "big", "lora_path": path})
    assert response.status_code == 400
    assert response.json()["error_message"].startswith(
        "LoRA adapter big with rank 64 is incompatible with the current LoRA memory pool configuration.")


async def test_load_body_validation_is_a_flat_bad_request():
    async with client_for(create_sglang_app(SglangOptions(enable_lora=True))) as client:
        response = await client.post("/load_lora_adapter", json={"lora_name": "x"})
    assert response.status_code == 400 and response.json()["type"] == "Bad Request"


# --- LRU eviction and implicit reload ------------------------------------------------------------


async def test_loading_past_max_loaded_loras_evicts_the_least_recently_used(tmp_path):
    paths = {name: write_adapter(tmp_path / name) for name in ("a", "b", "c")}
    options = SglangOptions(enable_lora=True, max_loaded_loras=2, max_loras_per_batch=2)
    async with client_for(create_sglang_app(options)) as client:
        for name in ("a", "b"):
            await client.post("/load_lora_adapter", json={"lora_name": name, "lora_path": paths[name]})
        await content_of(client, {"model": "kimi:a", "messages": user("touch a")})
        response = await client.post("/load_lora_adapter", json={"lora_name": "c", "lora_path": paths["c"]})
        ids = [card["id"] for card in (await client.get("/v1/models")).json()["data"]]
    assert response.status_code == 200
    assert response.json()["loaded_adapters"] == {"a": paths["a"], "c": paths["c"]}
    assert ids == ["kimi", "a", "c"]


async def test_pinned_adapters_are_not_evicted(tmp_path):
    paths = {name: write_adapter(tmp_path / name) for name in ("a", "b", "c")}
    options = SglangOptions(enable_lora=True, max_loaded_loras=2, max_loras_per_batch=2)
    async with client_for(create_sglang_app(options)) as client:
        await client.post("/load_lora_adapter", json={"lora_name": "a", "lora_path": paths["a"], "pinned": True})
        await client.post("/load_lora_adapter", json={"lora_name": "b", "lora_path": paths["b"]})
        response = await client.post("/load_lora_adapter", json={"lora_name": "c", "lora_path": paths["c"]})
    assert response.json()["loaded_adapters"] == {"a": paths["a"], "c": paths["c"]}


async def test_max_loaded_loras_below_max_loras_per_batch_is_a_startup_error():
    with pytest.raises(ValueError, match="max-loaded-loras"):
        create_sglang_app(SglangOptions(enable_lora=True, max_loaded_loras=2))


async def test_evicted_adapter_is_reloaded_implicitly(tmp_path):
    paths = {name: write_adapter(tmp_path / name) for name in ("a", "b", "c")}
    options = SglangOptions(enable_lora=True, max_loaded_loras=2, max_loras_per_batch=2)
    async with client_for(create_sglang_app(options)) as client:
        for name in ("a", "b", "c"):
            await client.post("/load_lora_adapter", json={"lora_name": name, "lora_path": paths[name]})
        await content_of(client, {"model": "kimi:a", "messages": user("hi")})
        ids = [card["id"] for card in (await client.get("/v1/models")).json()["data"]]
    assert ids == ["kimi", "c", "a"]


async def test_unloaded_adapter_is_reloaded_by_a_request(tmp_path):
    async with client_for(create_sglang_app(lora_options(tmp_path))) as client:
        await client.post("/unload_lora_adapter", json={"lora_name": "neko"})
        assert [c["id"] for c in (await client.get("/v1/models")).json()["data"]] == ["kimi"]
        await content_of(client, {"model": "kimi:neko", "messages": user("hi")})
        assert [c["id"] for c in (await client.get("/v1/models")).json()["data"]] == ["kimi", "neko"]


async def test_reset_restores_startup_adapters(tmp_path):
    async with client_for(create_sglang_app(lora_options(tmp_path))) as client:
        await client.post("/unload_lora_adapter", json={"lora_name": "neko"})
        await client.post("/_emulator/reset")
        assert [c["id"] for c in (await client.get("/v1/models")).json()["data"]] == ["kimi", "neko"]


# --- /v1/models ----------------------------------------------------------------------------------


async def test_models_list_leaks_adapter_paths_in_root(tmp_path):
    options = lora_options(tmp_path, served_model_name="kimi", context_length=4096)
    async with client_for(create_sglang_app(options)) as client:
        body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    base, card = body["data"]
    assert {k: base[k] for k in ("id", "object", "owned_by", "root", "parent", "max_model_len")} == {
        "id": "kimi", "object": "model", "owned_by": "sglang", "root": "kimi", "parent": None, "max_model_len": 4096}
    assert set(card) == {"id", "object", "created", "owned_by", "root", "parent", "max_model_len"}
    assert card["id"] == "neko" and card["root"] == options.lora_paths["neko"]
    assert card["parent"] == "kimi" and card["max_model_len"] is None


async def test_model_lookup_knows_only_the_served_name(tmp_path):
    async with client_for(create_sglang_app(lora_options(tmp_path))) as client:
        assert (await client.get("/v1/models/kimi")).json()["id"] == "kimi"
        response = await client.get("/v1/models/neko")
    assert response.status_code == 404
    assert response.json() == {"error": {"message": "The model 'neko' does not exist", "type": "invalid_request_error",
                                         "param": "model", "code": "model_not_found"}}


# --- static KT expert adapter --------------------------------------------------------------------


def static_options(tmp_path: Path) -> SglangOptions:
    return lora_options(tmp_path, static_expert_adapter="neko")


async def test_static_mode_refuses_load_and_unload(tmp_path):
    other = write_adapter(tmp_path / "other")
    async with client_for(create_sglang_app(static_options(tmp_path))) as client:
        load = await client.post("/load_lora_adapter", json={"lora_name": "other", "lora_path": other})
        unload = await client.post("/unload_lora_adapter", json={"lora_name": "neko"})
    assert load.status_code == 400 and unload.status_code == 400
    assert load.json()["error_message"] == (
        "Dynamic LoRA loading is disabled because KT expert LoRA is statically paired with adapter 'neko'. "
        "Restart the server to change this adapter.")
    assert unload.json()["error_message"].startswith("LoRA unloading is disabled because ")
    assert unload.json()["error_message"].endswith("Restart the server to remove or change this adapter.")


@pytest.mark.parametrize("model", ["kimi", "kimi:other"])
async def test_static_mode_rejects_requests_not_selecting_the_adapter(tmp_path, model):
    async with client_for(create_sglang_app(static_options(tmp_path))) as client:
        response = await client.post("/v1/chat/completions", json={"model": model, "messages": user("hi")})
        streamed = await client.post("/v1/chat/completions",
                                     json={"model": model, "messages": user("hi"), "stream": True})
        ok = await client.post("/v1/chat/completions", json={"model": "kimi:neko", "messages": user("hi")})
    assert response.status_code == 400 and response.json()["message"] == STATIC_REQUEST
    assert sse_payloads(streamed.text)[0]["error"]["message"] == STATIC_REQUEST
    assert ok.status_code == 200


async def test_static_mode_card_root_is_the_nonexpert_cache_dir(tmp_path):
    options = static_options(tmp_path)
    async with client_for(create_sglang_app(options)) as client:
        card = (await client.get("/v1/models")).json()["data"][1]
    assert card["id"] == "neko"
    assert card["root"] == kt_nonexpert_cache_dir(options.lora_paths["neko"]) != options.lora_paths["neko"]


async def test_static_mode_needs_the_adapter_alone_in_lora_paths(tmp_path):
    with pytest.raises(ValueError, match="Only one merged KT composite"):
        create_sglang_app(SglangOptions(lora_paths={"neko": write_adapter(tmp_path / "n")},
                                        static_expert_adapter="other"))
