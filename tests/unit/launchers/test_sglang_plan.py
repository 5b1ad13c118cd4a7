"""`launch sglang-kt --dry-run` on seed 000's setup, corrected (tests/golden/launch/seed000.yaml): the plans are
held as golden files; and what the plan refuses, with every problem named."""
import json

import pytest

from gateway.cli import main, parser
from gateway.config import ConfigError, load_config
from gateway.launch_cli import launch_sglang
from tests.unit.launchers.golden import ROOT, check_golden, config_from
from tests.unit.launchers.hosts import GOOD_HOST


def dry_run(config, backend: str, capsys, *extra: str) -> tuple[int, str]:
    args = parser().parse_args(["launch", "sglang-kt", "--config", str(config), "--backend", backend, *extra])
    code = launch_sglang(args, host=GOOD_HOST)
    return code, capsys.readouterr().out


@pytest.mark.parametrize("backend", ["kt-a", "kt-expert", "kt-raw"])
def test_dry_run_prints_the_golden_plan(backend, tmp_path, capsys):
    config = config_from("launch/seed000.yaml", tmp_path)
    code, out = dry_run(config, backend, capsys, "--dry-run")
    plan, _, preflight = out.partition("preflight:")
    check_golden(f"launch/{backend}.txt", plan)
    assert code == 1 and "PROBLEM model_path: /models/kimi-k2.5 is not a directory" in preflight  # nothing there
    converter = "PROBLEM conversion.kt_python: /opt/kt/bin/python does not exist"   # the gateway's KT converter
    assert (converter in preflight) == (backend == "kt-expert")


def test_json_is_the_same_plan_as_data(tmp_path, capsys):
    config = config_from("launch/seed000.yaml", tmp_path)
    _, out = dry_run(config, "kt-a", capsys, "--json")
    doc = json.loads(out)
    problems = doc.pop("preflight")["problems"]
    check_golden("launch/kt-a.json", json.dumps(doc, indent=2, sort_keys=True) + "\n")
    assert [s["will_run"] for s in doc["steps"]] == [True, True] and problems


def test_the_corrected_recipe(tmp_path, capsys):
    """The three fixes of seed 000 (DESIGN.md) and the current flag names (sglang-kt.md §3.1)."""
    config = config_from("launch/seed000.yaml", tmp_path)
    _, out = dry_run(config, "kt-expert", capsys, "--json")
    doc = json.loads(out)
    argv = doc["server"]["argv"]
    int8 = doc["steps"][1]["command"]
    assert int8[int8.index("--input-type") + 1] == "bf16" and int8[int8.index("--quant-method") + 1] == "int8"
    assert doc["steps"][0]["output"] == int8[int8.index("--input-path") + 1]            # INT8 from BF16
    assert argv[argv.index("--kt-method") + 1] == "AMXINT8"
    assert argv[argv.index("--kt-weight-path") + 1] == doc["steps"][1]["output"]
    assert "convert_kt_to_sglang_adapter.py" in doc["steps"][2]["command"][1]          # not convert_lora.py
    assert not [a for a in argv if a.startswith("--kt-amx")]
    assert argv[argv.index("--reasoning-parser") + 1] == argv[argv.index("--tool-call-parser") + 1] == "kimi_k2"
    assert argv[argv.index("--kt-num-gpu-experts") + 1] == "0"                         # expert LoRA needs it
    assert argv[argv.index("--lora-paths") + 1] == f"legal-experts={doc['steps'][2]['output']}"


def test_done_steps_are_skipped(tmp_path, capsys):
    config = config_from("launch/seed000.yaml", tmp_path)
    text = config.read_text().replace("/models/kimi-k2.5-bf16", str(tmp_path / "bf16"))
    config.write_text(text)
    (tmp_path / "bf16").mkdir()
    _, out = dry_run(config, "kt-a", capsys, "--dry-run")
    assert "step 1: unpack the shipped INT4 experts to BF16 [already done, skipped]" in out
    assert "step 2: quantise the BF16 experts to INT8 CPU weights (AMXINT8) [will run]" in out


def test_an_unsupported_method_is_refused_with_the_supported_ones(tmp_path):
    config = config_from("launch/seed000.yaml", tmp_path)
    config.write_text(config.read_text().replace("kt_method: RAWINT4", "kt_method: AMXINT4"))
    with pytest.raises(ConfigError, match=r"kt_method 'AMXINT4' is not supported .*supported: AMXINT8, RAWINT4"):
        load_config(config)


def test_amxint8_without_its_paths_is_a_config_error(tmp_path):
    config = config_from("launch/seed000.yaml", tmp_path)
    config.write_text(config.read_text().replace("      bf16_path: /models/kimi-k2.5-bf16\n", "", 1))
    with pytest.raises(ConfigError, match=r"backends\[0\]\.launch.*AMXINT8 needs bf16_path"):
        load_config(config)


def test_an_expert_adapter_on_a_shared_server_is_refused_with_every_problem(tmp_path, capsys):
    config = config_from("launch/seed000.yaml", tmp_path)
    text = config.read_text().replace("backends: [kt-expert]", "backends: [kt-a, kt-expert]")
    config.write_text(text.replace("max_loaded_adapters: 8\n    launch:\n      python: /opt/kt/bin/python\n"
                                   "      model_path: /models/kimi-k2.5\n      kt_method: AMXINT8",
                                   "max_loaded_adapters: 4\n    launch:\n      python: /opt/kt/bin/python\n"
                                   "      model_path: /models/kimi-k2.5\n      kt_method: AMXINT8", 1))
    code = main(["launch", "sglang-kt", "--config", str(config), "--backend", "kt-a", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 1
    assert "adapter 'legal-experts' touches the MoE experts: it needs an SGLang backend dedicated to it" in err
    assert "max_loaded_adapters (4) must be >= launch.max_loras_per_batch (8)" in err


def test_unknown_backend_and_wrong_kind(tmp_path, capsys):
    config = config_from("launch/seed000.yaml", tmp_path)
    assert main(["launch", "sglang-kt", "--config", str(config), "--backend", "nope", "--dry-run"]) == 1
    assert "no backend named 'nope'; configured: kt-a, kt-expert, kt-raw" in capsys.readouterr().err
    assert main(["launch", "llama-server", "--config", str(config), "--backend", "kt-a", "--dry-run"]) == 1
    assert "backend 'kt-a' is of kind 'sglang', not 'llamacpp'" in capsys.readouterr().err


def test_adapters_registered_at_run_time_are_planned_too(tmp_path, capsys):
    """The registry in state_dir (what `adapters add` wrote) is read, not only the config's `adapters:`."""
    import asyncio

    from adapters.models import AdapterSpec
    from adapters.store import open_store

    config = config_from("launch/seed000.yaml", tmp_path)
    state = tmp_path / "state"
    config.write_text(config.read_text().replace("/var/lib/kimi-gateway-golden", str(state)).replace(
        "  - {name: legal-attn, source:", "  - {name: other, source:").replace("backends: [kt-a, kt-raw]}",
                                                                                "backends: [kt-raw]}"))
    source = ROOT / "tests" / "golden" / "launch" / "adapters" / "legal-attn"

    async def register() -> None:
        store = open_store(str(state))
        await store.open()
        await store.add_adapter(AdapterSpec(name="late", source=str(source), backends=("kt-a",)), "admin")
        await store.close()
    asyncio.run(register())
    _, out = dry_run(config, "kt-a", capsys, "--json")
    assert list(json.loads(out)["server"]["lora_paths"]) == ["late@559998dd"]


@pytest.mark.parametrize("extra, parsers", [
    ("", ("kimi_k2", "kimi_k2")),
    ("    generation: k2.6\n", ("kimi_k2", "kimi_k2")),
    ("    generation: k3\n    reasoning_parser: kimi_k3\n    tool_call_parser: kimi_k3_tools\n", ("kimi_k3", "kimi_k3_tools")),
])
def test_the_server_gets_its_generations_parsers(tmp_path, capsys, extra, parsers):
    """backends/generations.py names each generation's parsers; a generation without known ones needs them set."""
    config = config_from("launch/seed000.yaml", tmp_path)
    text = config.read_text()
    anchor = "  - name: kt-a\n    kind: sglang\n"
    assert anchor in text
    config.write_text(text.replace(anchor, anchor + extra, 1))
    _, out = dry_run(config, "kt-a", capsys, "--json")
    argv = json.loads(out)["server"]["argv"]
    assert (argv[argv.index("--reasoning-parser") + 1], argv[argv.index("--tool-call-parser") + 1]) == parsers
