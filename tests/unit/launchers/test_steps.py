"""The conversion steps run for real, with stand-ins for the kt-kernel scripts that are not on PyPI
(tests/emulators/kt_scripts: their exact CLIs, refusing any other flag): each step gets exactly the flags of
reference/sglang-kt.md §3.2/§3.4, writes into `.partial`, is renamed into place, and is skipped once done."""
import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from backends.launchers.sglang_plan import PlanAdapter, plan_sglang
from backends.launchers.steps import StepError, run_steps
from gateway.config import load_config
from tests.unit.launchers.golden import ROOT, config_from

SCRIPTS = ROOT / "tests" / "emulators" / "kt_scripts"
SFT = ROOT / "tests" / "golden" / "launch" / "adapters" / "legal-experts-sft"


@pytest.fixture
def config(tmp_path):
    model = tmp_path / "kimi-k2.5"
    model.mkdir()
    (model / "config.json").write_text("{}")
    path = config_from("launch/seed000.yaml", tmp_path)
    path.write_text(path.read_text().replace("/models/kimi-k2.5-", f"{tmp_path}/kimi-k2.5-").replace(
        "/models/kimi-k2.5", str(model)).replace("/opt/ktransformers/kt-kernel/scripts", str(SCRIPTS)).replace(
        "/opt/kt/bin/python", sys.executable).replace("/models/adapters-sglang", str(tmp_path / "adapters")))
    return load_config(path)


def expert_plan(config):
    backend = next(b for b in config.backends if b.name == "kt-expert")
    return plan_sglang(backend, [PlanAdapter("legal-experts", str(SFT), "kt-sft")], state_dir=config.state_dir)


def recorded_argv(directory: str) -> list[str]:
    return json.loads((Path(directory) / "standin-argv.json").read_text())


def test_each_step_gets_exactly_its_flags_and_lands_in_place(config, tmp_path):
    plan = expert_plan(config)
    ran = asyncio.run(run_steps(plan.steps, tmp_path / "steps.log", echo=False))
    assert ran == ["int4-to-bf16", "bf16-to-int8", "adapter-legal-experts"]
    bf16, int8, adapter = (step.output for step in plan.steps)
    model = config.backends[0].launch.model_path
    assert recorded_argv(bf16) == ["--model-dir", model, "--output-dir", bf16 + ".partial"]
    assert recorded_argv(int8) == ["--input-path", bf16, "--input-type", "bf16", "--output", int8 + ".partial",
                                   "--quant-method", "int8", "--threadpool-count", "2", "--cpuinfer-threads", "64"]
    assert recorded_argv(adapter) == [str(SFT), adapter + ".partial", "--base-model-name-or-path", model]
    assert not [p for p in tmp_path.rglob("*.partial")]
    assert "[bf16-to-int8] converted" in (tmp_path / "steps.log").read_text()


def test_a_second_run_skips_what_is_done(config, tmp_path):
    plan = expert_plan(config)
    asyncio.run(run_steps(plan.steps, tmp_path / "steps.log", echo=False))
    assert asyncio.run(run_steps(expert_plan(config).steps, tmp_path / "steps.log", echo=False)) == []
    assert all(step.done for step in expert_plan(config).steps)


def test_a_failed_step_leaves_no_output_and_the_rerun_resumes_there(config, tmp_path, monkeypatch):
    plan = expert_plan(config)
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
    plan = expert_plan(config)
    wrong = plan.steps[1].__class__(**{**plan.steps[1].__dict__, "command": [
        sys.executable, str(SCRIPTS / "convert_cpu_weights.py"), "--base_path", "x", "--output_dir", "y"]})
    with pytest.raises(StepError, match="exit code 2"):
        asyncio.run(run_steps([wrong], tmp_path / "steps.log", echo=False))
