"""Bad hosts: each gives a precise error before anything starts, and a host with several problems gets all of
them. The model is a header-only safetensors file of Kimi K2.5's size class (no tensor data is read)."""
import json
import struct
from pathlib import Path

import pytest

from backends.launchers.preflight import read_cpu_flags
from backends.launchers.sglang_plan import plan_sglang
from backends.launchers.weights import scan_weights
from gateway.config import load_config
from tests.unit.launchers.golden import config_from
from tests.unit.launchers.hosts import GOOD_HOST, TIB, host
from backends.launchers.preflight import preflight

GIB = 1024 ** 3
# Experts: 5.6e11 parameters packed 8 per int32 (the shipped INT4); the rest 20 GiB of BF16.
EXPERT_SHAPE, OTHER_SHAPE = [1_000_000, 70_000], [5 * 1024 ** 3, 2]


def header_only_model(directory: Path) -> Path:
    directory.mkdir(parents=True)
    tensors = {"language_model.model.layers.1.mlp.experts.0.gate_proj.weight_packed": ("I32", EXPERT_SHAPE),
               "language_model.model.layers.1.mlp.experts.0.gate_proj.weight_scale": ("BF16", [1_000_000, 17_500]),
               "language_model.model.layers.0.self_attn.q_a_proj.weight": ("BF16", OTHER_SHAPE)}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = {"I32": 4, "BF16": 2}[dtype] * shape[0] * shape[1]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    (directory / "model-00001-of-00001.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    (directory / "config.json").write_text("{}")
    return directory


@pytest.fixture
def setup(tmp_path):
    """seed000.yaml with the model, outputs, scripts and Python made real under tmp_path."""
    model = header_only_model(tmp_path / "kimi-k2.5")
    scripts = Path(__file__).parents[2] / "emulators" / "kt_scripts"
    config = config_from("launch/seed000.yaml", tmp_path)
    text = config.read_text().replace("/models/kimi-k2.5-", f"{tmp_path}/kimi-k2.5-").replace(
        "/models/kimi-k2.5", str(model)).replace("/opt/ktransformers/kt-kernel/scripts", str(scripts)).replace(
        "/opt/kt/bin/python", "python3").replace("/models/adapters-sglang", str(tmp_path / "adapters"))
    config.write_text(text)
    return load_config(config)


def findings(config, backend="kt-a", **host_changes):
    backend = next(b for b in config.backends if b.name == backend)
    plan = plan_sglang(backend, [])
    return preflight(plan, backend.launch, host(**host_changes) if host_changes else GOOD_HOST)


def test_sizes_come_from_the_headers(setup):
    sizes = scan_weights(Path(setup.backends[0].launch.model_path))
    assert sizes.expert_params == 1_000_000 * 70_000 * 8
    assert sizes.other_bytes == 20 * GIB
    assert sizes.expert_bytes == 1_000_000 * 70_000 * 4 + 1_000_000 * 17_500 * 2


def test_a_good_host_passes(setup):
    found = findings(setup)
    assert found.ok, found.problems


def test_missing_model_path(setup, tmp_path):
    backend = setup.backends[0]
    broken = backend.model_copy(update={"launch": backend.launch.model_copy(
        update={"model_path": str(tmp_path / "nowhere")})})
    plan = plan_sglang(broken, [])
    found = preflight(plan, broken.launch, GOOD_HOST)
    assert f"model_path: {tmp_path / 'nowhere'} is not a directory" in found.problems


def test_too_little_disk_for_the_conversions(setup, tmp_path):
    found = findings(setup, free_bytes=lambda path: 1 * TIB)
    [problem] = found.problems
    assert problem.startswith(f"disk: int4-to-bf16 -> {tmp_path}/kimi-k2.5-bf16 (about 1063.1 GiB), "
                              f"bf16-to-int8 -> {tmp_path}/kimi-k2.5-int8 (about 552.0 GiB) need about 1615.1 GiB")
    assert problem.endswith("which has 1024.0 GiB free")


def test_disk_counts_only_steps_still_to_run(setup, tmp_path):
    (tmp_path / "kimi-k2.5-bf16").mkdir()
    found = findings(setup, free_bytes=lambda path: 600 * GIB)
    assert found.ok, found.problems   # the INT8 output alone (about 552 GiB) fits


def test_too_little_ram_for_the_cpu_experts(setup):
    found = findings(setup, mem_total_bytes=512 * GIB)
    assert found.problems == ["RAM: the AMXINT8 CPU experts take about 532.0 GiB; this host has 512.0 GiB "
                              "(at most 95% of it is usable)"]


def test_a_cpu_without_amx_for_amxint8(setup):
    found = findings(setup, cpu_flags=frozenset({"avx512f", "avx512bw"}))
    assert found.problems == ["CPU: kt_method AMXINT8 needs AMX (Sapphire Rapids or newer); /proc/cpuinfo lacks "
                              "amx_tile, amx_int8; RAWINT4 needs only AVX512F+BW"]
    assert findings(setup, "kt-raw", cpu_flags=frozenset({"avx512f", "avx512bw"})).ok


def test_tp_larger_than_the_gpu_count(setup):
    found = findings(setup, gpu_memory_mib=(81920,))
    assert found.problems == ["GPU: tp is 2 but nvidia-smi shows 1 GPU(s)"]


def test_gpus_too_small_for_the_non_expert_weights(setup):
    found = findings(setup, gpu_memory_mib=(8192, 8192))
    assert found.problems == ["GPU: the non-expert weights take about 10.0 GiB per GPU at tp 2; the smallest GPU "
                              "offers 7.2 GiB at mem_fraction_static 0.9"]


def test_no_nvidia_smi_is_a_note_not_a_problem(setup):
    found = findings(setup, gpu_memory_mib=None)
    assert found.ok and any("nvidia-smi is not on PATH" in note for note in found.notes)


def test_sglang_not_importable(setup):
    found = findings(setup, modules=lambda python, modules: {"sglang": False, "kt_kernel": True})
    assert found.problems == ["software: python3 cannot import sglang (pip install sglang-kt)"]


def test_every_problem_is_reported_not_only_the_first(setup):
    found = findings(setup, free_bytes=lambda path: 1 * TIB, mem_total_bytes=256 * GIB,
                     cpu_flags=frozenset(), gpu_memory_mib=(81920,))
    assert [p.split(":")[0] for p in found.problems] == ["disk", "RAM", "CPU", "GPU"]


def test_a_missing_converter_script(setup, tmp_path):
    empty = tmp_path / "scripts"
    empty.mkdir()
    backend = setup.backends[0]
    broken = backend.model_copy(update={"launch": backend.launch.model_copy(update={"kt_scripts": str(empty)})})
    found = preflight(plan_sglang(broken, []), broken.launch, GOOD_HOST)
    assert found.problems == [f"step int4-to-bf16: the converter {empty}/convert_moe_to_bf16.py does not exist",
                              f"step bf16-to-int8: the converter {empty}/convert_cpu_weights.py does not exist"]


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw amx_tile amx_int8\n\n")
    assert {"amx_tile", "amx_int8", "avx512f"} <= read_cpu_flags(str(cpuinfo))
