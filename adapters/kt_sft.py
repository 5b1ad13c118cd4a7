"""KT-SFT checkpoints: the directory KTransformers' SFT writes (`fused_expert_lora.safetensors` with 3-D
`layers.{L}.experts.{gate|up|down}_lora_{a|b}` tensors of shape [E, ...], plus optionally the non-expert
PEFT half), checked from headers only before convert_kt_to_sglang_adapter.py runs on it
(reference/sglang-kt.md §3.4). SGLang refuses such a directory unconverted (§1.7)."""
from __future__ import annotations

import re
from pathlib import Path

from adapters.base_model import BaseModelDims, module_shape

FUSED_FILE = "fused_expert_lora.safetensors"
FUSED_KEY = re.compile(r"^layers\.(?P<layer>\d+)\.experts\.(?P<proj>gate|up|down)_lora_(?P<part>a|b)$")


def is_kt_sft(directory: Path) -> bool:
    return (directory / FUSED_FILE).is_file()


def check_fused(shapes: dict[str, list[int]], rank: int, base: BaseModelDims | None, shown: str) -> list[str]:
    """Problems with the fused expert tensors (empty: fine). `a` is [E, r, in], `b` is [E, out, r]; the
    converter requires one rank and one expert count across them."""
    problems: list[str] = []
    experts: set[int] = set()
    parts: dict[tuple[str, str], set[str]] = {}
    for key, shape in sorted(shapes.items()):
        match = FUSED_KEY.match(key)
        if match is None:
            problems.append(f"{shown}: unexpected tensor {key!r} (want layers.L.experts.{{gate,up,down}}_lora_{{a,b}})")
            continue
        if len(shape) != 3:
            problems.append(f"{shown}: {key} must be 3-D [experts, ...], found shape {shape}")
            continue
        is_a = match["part"] == "a"
        found_rank = shape[1] if is_a else shape[2]
        if found_rank != rank:
            problems.append(f"{shown}: {key} has rank {found_rank}, but adapter_config.json says r={rank}")
        experts.add(shape[0])
        parts.setdefault((match["layer"], match["proj"]), set()).add(match["part"])
        if base is None:
            continue
        layer = int(match["layer"])
        if layer >= base.num_hidden_layers:
            problems.append(f"{shown}: {key} is for layer {layer}, but the base model has {base.num_hidden_layers}")
            continue
        if base.n_routed_experts is not None and shape[0] != base.n_routed_experts:
            problems.append(f"{shown}: {key} has {shape[0]} experts, the base model has {base.n_routed_experts}")
        expected = module_shape(base, f"layers.{layer}.mlp.experts.0.{match['proj']}_proj")
        if expected.absent:
            problems.append(f"{shown}: {key} adapts experts in layer {layer}, but {expected.absent}")
            continue
        found, want, side = (shape[2], expected.inp, "in") if is_a else (shape[1], expected.out, "out")
        if want is not None and found != want:
            problems.append(f"{shown}: {key} has shape {shape}: its {side} dimension is {found}, but the base "
                            f"model's expert {match['proj']}_proj expects {want}")
    if not shapes:
        problems.append(f"{shown}: holds no tensors")
    if len(experts) > 1:
        problems.append(f"{shown}: inconsistent expert counts {sorted(experts)}")
    for (layer, proj), seen in sorted(parts.items()):
        if seen != {"a", "b"}:
            problems.append(f"{shown}: layers.{layer}.experts.{proj}_lora_{min(seen)} has no "
                            f"{proj}_lora_{'b' if 'a' in seen else 'a'}")
    return problems
