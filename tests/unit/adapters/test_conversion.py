"""Choosing what to convert (plan), KT-SFT checkpoints recognised and checked, and the conversion step's
handling of what a tool does: crash, time out, write a bad output (all leaving nothing in the cache).
The real converters run in tests/integration/test_conversion_live.py; here a stand-in Python script plays the
tool, to provoke what the real ones do not do on demand (a wrong output)."""
import asyncio
import json
import sys
import textwrap
from pathlib import Path

import pytest

from adapters.base_model import dims_from_hf_config
from adapters.conversion import (
    KT_TO_SGLANG,
    PEFT_TO_GGUF,
    ConversionError,
    ConversionSettings,
    ToolConverter,
    Unconverted,
    plan,
)
from adapters.tool_run import run_tool
from adapters.validation import AdapterValidationError, validate_adapter
from gateway.demo import tiny_gguf
from tests.adapter_files import (
    KIMI_MINI,
    KIMI_MINI_ATTENTION,
    TINY_LLAMA_MODULES,
    kt_sft_matrices,
    write_kt_sft,
    write_peft,
)


@pytest.fixture
def kimi_base(tmp_path):
    path = tmp_path / "kimi-config.json"
    path.write_text(json.dumps(KIMI_MINI))
    return dims_from_hf_config(path)


def facts_of(tmp_path, kind: str):
    root = [str(tmp_path)]
    if kind == "peft":
        return validate_adapter(str(write_peft(tmp_path / "p", r=4, modules=TINY_LLAMA_MODULES)), None, root)
    if kind == "experts":
        return validate_adapter(str(write_peft(tmp_path / "e", experts=True)), None, root)
    if kind == "kt":
        return validate_adapter(str(write_kt_sft(tmp_path / "k")), None, root)
    if kind == "kv_b":   # Kimi's MLA attention, as the KT recipe trains it (reference/sglang-kt.md §3.5)
        return validate_adapter(str(write_peft(tmp_path / "m", r=4, modules=KIMI_MINI_ATTENTION,
                                               target_modules=["q_a_proj", "kv_b_proj"])), None, root)
    model = tiny_gguf.write_tiny_model(tmp_path / "m.gguf")
    return validate_adapter(None, str(tiny_gguf.write_tiny_lora(tmp_path / "l.gguf", model, seed=1, name="l")), root)


@pytest.mark.parametrize("kind, backends, steps", [
    ("peft", {"gguf": "llamacpp"}, [PEFT_TO_GGUF]),
    ("peft", {"kt": "sglang"}, []),                                     # SGLang loads a PEFT dir as it is
    ("peft", {"kt": "sglang", "gguf": "llamacpp", "api": "moonshot"}, [PEFT_TO_GGUF]),
    ("peft", {"api": "moonshot"}, []),
    ("kt", {"kt": "sglang"}, [KT_TO_SGLANG]),
    ("gguf", {"gguf": "llamacpp"}, []),
])
def test_plan_makes_what_the_backends_need(tmp_path, kind, backends, steps):
    assert plan(facts_of(tmp_path, kind), backends) == steps


@pytest.mark.parametrize("kind, backends, why", [
    ("experts", {"gguf": "llamacpp"}, "backend 'gguf' \\(llama.cpp\\) cannot serve this adapter: it adapts MoE"),
    ("kt", {"kt": "sglang", "gguf": "llamacpp"}, "backend 'gguf' \\(llama.cpp\\) cannot serve a KT-SFT"),
    ("gguf", {"kt": "sglang"}, "backend 'kt' \\(SGLang\\) needs `source`"),
    ("kv_b", {"gguf": "llamacpp"}, "cannot convert a LoRA on kv_b_proj"),
])
def test_plan_refuses_what_a_target_cannot_serve(tmp_path, kind, backends, why):
    with pytest.raises(ConversionError, match=why):
        plan(facts_of(tmp_path, kind), backends)


async def test_unconverted_names_the_missing_step(tmp_path):
    facts = facts_of(tmp_path, "peft")
    with pytest.raises(ConversionError, match="needs gguf with convert_lora_to_gguf.py, and no `conversion:`"):
        await Unconverted().convert(facts, [PEFT_TO_GGUF])
    assert await Unconverted().convert(facts, []) == {}


# --- KT-SFT checkpoints ----------------------------------------------------------------------------------------

def test_kt_sft_checkpoint_is_an_expert_adapter(tmp_path, kimi_base):
    facts = validate_adapter(str(write_kt_sft(tmp_path / "k")), None, [str(tmp_path)], kimi_base)
    assert (facts.source_format, facts.adapter_class, facts.rank) == ("kt-sft", "experts", 4)
    alone = validate_adapter(str(write_kt_sft(tmp_path / "f", attention=False)), None, [str(tmp_path)], kimi_base)
    assert alone.adapter_class == "experts" and alone.content_hash != facts.content_hash


@pytest.mark.parametrize("change, why", [
    (lambda t: t.pop("layers.1.experts.up_lora_b"), "up_lora_a has no up_lora_b"),
    (lambda t: t.update({"layers.1.experts.up_lora_b": t["layers.1.experts.up_lora_b"][:, :, :3]}),
     "has rank 3, but adapter_config.json says r=4"),
    (lambda t: t.update({"layers.1.experts.gate_lora_a": t["layers.1.experts.gate_lora_a"][:3]}),
     "has 3 experts, the base model has 4"),
    (lambda t: t.update({"layers.1.experts.down_lora_a": t["layers.1.experts.down_lora_a"][:, :, :20]}),
     "its in dimension is 20, but the base model's expert down_proj expects 24"),
    (lambda t: t.update({"layers.0.experts.gate_lora_a": t["layers.1.experts.gate_lora_a"],
                         "layers.0.experts.gate_lora_b": t["layers.1.experts.gate_lora_b"]}), "layer 0"),
    (lambda t: t.update({"layers.1.experts.gate_proj": t["layers.1.experts.gate_lora_a"]}), "unexpected tensor"),
])
def test_bad_kt_sft_checkpoints_are_refused(tmp_path, kimi_base, change, why):
    tensors = kt_sft_matrices()
    change(tensors)
    with pytest.raises(AdapterValidationError, match=why):
        validate_adapter(str(write_kt_sft(tmp_path / "k", fused=tensors)), None, [str(tmp_path)], kimi_base)


# --- running a tool --------------------------------------------------------------------------------------------

async def test_run_tool_keeps_the_last_lines_and_the_whole_log(tmp_path):
    seen = []
    result = await run_tool([sys.executable, "-c", "import sys\nfor i in range(50): print('line', i)\nsys.exit(3)"],
                            timeout_s=30, log_path=tmp_path / "log", on_line=seen.append)
    assert (result.returncode, result.ok) == (3, False)
    assert result.tail[-1] == "line 49" and len(result.tail) == 20 and len(seen) == 50
    assert (tmp_path / "log").read_text().count("\n") == 50


async def test_run_tool_kills_the_process_group_at_the_timeout(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time\nchild = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)'])\nopen({str(pid_file)!r}, 'w').write(str(child.pid))\nprint('started', flush=True)\n"
              "time.sleep(60)")
    result = await run_tool([sys.executable, "-c", script], timeout_s=1.5, log_path=tmp_path / "log")
    assert result.returncode is None and result.tail == ("started", "(killed after 1.5 s)")
    child = Path(f"/proc/{pid_file.read_text()}")
    for _ in range(100):  # SIGKILL is delivered asynchronously; then it is gone or a zombie awaiting its reaper
        if not child.exists() or _state(child) == "Z":
            break
        await asyncio.sleep(0.05)
    assert not child.exists() or _state(child) == "Z"


def _state(proc: Path) -> str:
    try:
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# --- the conversion step, with stand-in tools ------------------------------------------------------------------

def stand_in(tmp_path, body: str) -> str:
    """A 'Python' that ignores the converter script and runs `body` with the same argv."""
    script = tmp_path / "tool.py"
    script.write_text(textwrap.dedent(body))
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nshift\nexec {sys.executable} {script} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def converter(tmp_path, python: str, timeout_s: float = 30) -> ToolConverter:
    config = tmp_path / "base" / "config.json"
    config.parent.mkdir(exist_ok=True)
    tiny_gguf.write_tiny_hf_config(config)
    return ToolConverter(ConversionSettings(cache_dir=tmp_path / "cache", llama_cpp_python=python,
                                            llama_cpp_dir=str(tmp_path), base_hf_config=str(config),
                                            timeout_s=timeout_s))


def cache_entries(tmp_path) -> list[str]:
    cache = tmp_path / "cache"
    return sorted(p.name for p in cache.iterdir() if p.name != "logs") if cache.exists() else []


@pytest.mark.parametrize("body, why", [
    ("import sys\nprint('Loading base model')\nprint('ValueError: boom', file=sys.stderr)\nsys.exit(1)",
     "convert_lora_to_gguf.py failed \\(exit 1\\) after .* its last lines:\nLoading base model\nValueError: boom"),
    ("import time\nprint('working', flush=True)\ntime.sleep(30)", "timed out .*\nworking\n\\(killed after 1 s\\)"),
    ("import sys\nout = sys.argv[sys.argv.index('--outfile') + 1]\nopen(out, 'wb').write(b'GGUF' + b'\\0' * 20)",
     "wrote an output that fails validation: .* is truncated or corrupt"),
    ("pass", "exited 0 but wrote no adapter.gguf"),
])
async def test_a_failing_tool_leaves_nothing_in_the_cache(tmp_path, body, why):
    facts = facts_of(tmp_path, "peft")
    tool = converter(tmp_path, stand_in(tmp_path, body), timeout_s=1)
    with pytest.raises(ConversionError, match=why):
        await tool.convert(facts, [PEFT_TO_GGUF])
    assert cache_entries(tmp_path) == [facts.content_hash]
    assert list((tmp_path / "cache" / facts.content_hash).iterdir()) == []  # no temp dir, no half artifact


async def test_a_conversion_runs_once_per_version(tmp_path):
    runs = tmp_path / "runs"
    body = f"""
    import shutil, sys
    open({str(runs)!r}, 'a').write('x')
    out = sys.argv[sys.argv.index('--outfile') + 1]
    shutil.copy({str(tmp_path / 'l.gguf')!r}, out)
    """
    facts = facts_of(tmp_path, "peft")
    facts_of(tmp_path, "gguf")   # writes l.gguf, a valid LoRA for the tiny model, which the stand-in copies
    tool = converter(tmp_path, stand_in(tmp_path, body))
    made = await tool.convert(facts, [PEFT_TO_GGUF])
    again = await tool.convert(facts, [PEFT_TO_GGUF])
    assert made == again == {"gguf": str(tmp_path / "cache" / facts.content_hash / "adapter.gguf")}
    assert runs.read_text() == "x"
