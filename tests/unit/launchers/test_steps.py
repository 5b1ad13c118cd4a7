"""The conversion steps run for real, with stand-ins for the kt-kernel scripts (tests/emulators/kt_scripts:
their exact CLIs, refusing any other flag): each weight step gets exactly the flags of reference/sglang-kt.md
§3.2, writes into `.partial`, is renamed into place, and is skipped once done; a KT-SFT adapter is converted by
the gateway's own converter (`conversion.kt_python`, adapters/conversion.py) into the conversion cache (§3.4)."""
import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from adapters.conversion import KT_TO_SGLANG
from backends.launchers.steps import StepError, run_steps
from gateway.config import load_config
from gateway.conversion import converter_of
from gateway.launch_cli import build_sglang_plan, run_conversions
from tests.unit.launchers.golden import ROOT, config_from

SCRIPTS = ROOT / "tests" / "emulators" / "kt_scripts"
SFT = ROOT / "tests" / "golden" / "launch" / "adapters" / "legal-experts-sft"


def kt_python(tmp_path: Path) -> Path:
    """A Python whose kt-kernel holds the stand-in converter where the wheel has the real one
    (kt_kernel/sft/convert_kt_to_sglang_adapter.py), found the way `setup converters`' venv is."""
    site = tmp_path / "kt-site"
    (site / "kt_kernel" / "sft").mkdir(parents=True)
    (site / "kt_kernel" / "__init__.py").write_text("")
    shutil.copy(SCRIPTS / "convert_kt_to_sglang_adapter.py", site / "kt_kernel" / "sft")
    python = tmp_path / "kt-python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return python


@pytest.fixture
def config(tmp_path):
    model = tmp_path / "kimi-k2.5"
    model.mkdir()
    (model / "config.json").write_text("{}")
    path = config_from("launch/seed000.yaml", tmp_path)
    path.write_text(path.read_text().replace("/models/kimi-k2.5-", f"{tmp_path}/kimi-k2.5-").replace(
        "/models/kimi-k2.5", str(model)).replace("/opt/ktransformers/kt-kernel/scripts", str(SCRIPTS)).replace(
        "/opt/kt/bin/python", sys.executable).replace("/var/lib/kimi-gateway-golden", str(tmp_path / "state")).replace(
        f"kt_python: {sys.executable}", f"kt_python: {kt_python(tmp_path)}"))
    return load_config(path)


def expert_plan(config):
    return build_sglang_plan(config, next(b for b in config.backends if b.name == "kt-expert"), 0)


def convert(config, tmp_path) -> list[str]:
    plan, converter, kt_sft = expert_plan(config)
    return asyncio.run(run_conversions(plan, converter, kt_sft, tmp_path / "steps.log", echo=False))


def recorded_argv(directory: str) -> list[str]:
    return json.loads((Path(directory) / "standin-argv.json").read_text())


def test_each_step_gets_exactly_its_flags_and_lands_in_place(config, tmp_path):
    ran = convert(config, tmp_path)
    assert ran == ["int4-to-bf16", "bf16-to-int8", "adapter-legal-experts"]
    plan, converter, _ = expert_plan(config)
    bf16, int8, adapter = (step.output for step in plan.steps)
    model = config.backends[0].launch.model_path
    assert recorded_argv(bf16) == ["--model-dir", model, "--output-dir", bf16 + ".partial"]
    assert recorded_argv(int8) == ["--input-path", bf16, "--input-type", "bf16", "--output", int8 + ".partial",
                                   "--quant-method", "int8", "--threadpool-count", "2", "--cpuinfer-threads", "64"]
    # the gateway's converter: its cache entry, written in a temp dir beside it, validated, renamed into place
    assert Path(adapter).parent.parent == Path(config.state_dir) / "converted"
    argv = recorded_argv(adapter)
    assert argv[0] == str(SFT) and Path(argv[1]).name == "sglang" and Path(argv[1]).parent.parent == Path(adapter).parent
    assert argv[2:] == ["--base-model-name-or-path", model]
    assert not [p for p in tmp_path.rglob("*.partial")]
    assert "[bf16-to-int8] converted" in (tmp_path / "steps.log").read_text()


def test_the_launcher_and_the_gateway_share_one_conversion(config, tmp_path):
    """A gateway on the same config finds the launcher's conversion in its cache: nothing runs again (the
    converter is gone, and the call still answers with the launcher's output)."""
    convert(config, tmp_path)
    plan, converter, kt_sft = expert_plan(config)
    assert converter.settings.kt_python == config.conversion.kt_python
    os.remove(tmp_path / "kt-site" / "kt_kernel" / "sft" / "convert_kt_to_sglang_adapter.py")
    gateway = converter_of(config, None)
    made = asyncio.run(gateway.convert(kt_sft["legal-experts"], [KT_TO_SGLANG]))
    assert f"legal-experts={made['sglang']}" == plan.argv[plan.argv.index("--lora-paths") + 1]
    assert all(step.done for step in plan.steps)


def test_a_second_run_skips_what_is_done(config, tmp_path):
    convert(config, tmp_path)
    assert convert(config, tmp_path) == []
    assert all(step.done for step in expert_plan(config)[0].steps)


def test_a_failed_step_leaves_no_output_and_the_rerun_resumes_there(config, tmp_path, monkeypatch):
    plan = expert_plan(config)[0]
    plan.steps[:] = plan.steps[:2]   # the weight steps
    monkeypatch.setenv("STANDIN_FAIL", "1")
    with pytest.raises(StepError, match=r"step int4-to-bf16 failed with exit code 1: .*\n.*killed half-way"):
        asyncio.run(run_steps(plan.steps, tmp_path / "steps.log", echo=False))
    bf16 = plan.steps[0].output
    assert not os.path.exists(bf16) and os.path.isdir(bf16 + ".partial")   # interrupted: only the partial
    monkeypatch.delenv("STANDIN_FAIL")
    assert asyncio.run(run_steps(plan.steps, tmp_path / "steps.log", echo=False))[0] == "int4-to-bf16"
    assert os.path.isdir(bf16) and not os.path.exists(bf16 + ".partial")


def test_the_stand_in_refuses_flags_the_real_script_lacks(config, tmp_path):
    """The seed's wrong call (`--base_path --output_dir`) fails against the real CLI, as it would."""
    plan = expert_plan(config)[0]
    wrong = plan.steps[1].__class__(**{**plan.steps[1].__dict__, "command": [
        sys.executable, str(SCRIPTS / "convert_cpu_weights.py"), "--base_path", "x", "--output_dir", "y"]})
    with pytest.raises(StepError, match="exit code 2"):
        asyncio.run(run_steps([wrong], tmp_path / "steps.log", echo=False))
