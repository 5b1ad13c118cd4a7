"""Adapter conversion: which artifacts an adapter's backends need (`plan`), and making them with the projects'
own converters (`ToolConverter`), as a lifecycle step that runs while the version is `converting`.

- PEFT -> GGUF for llama.cpp backends: llama.cpp's convert_lora_to_gguf.py from the same sdist llama-server
  is built from, with the base model's config.json (`base_model.hf_config`), run by `conversion.llama_cpp_python`.
- KT-SFT -> SGLang adapter dir for SGLang backends: kt-kernel's convert_kt_to_sglang_adapter.py, run by
  `conversion.kt_python`. A PEFT dir is given to SGLang as it is; the hosted API needs nothing.
Each run is a subprocess with a timeout whose output goes to a temp dir beside the cache entry, is validated,
then renamed into place: the cache (`<state_dir>/converted/<content hash>/`) never holds half an artifact,
and a version converts once. A failure raises ConversionError (HTTP 422) with the tool's last lines.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Collection, Mapping, Protocol

from adapters.base_model import BaseModelDims
from adapters.kt_sft import FUSED_FILE
from adapters.models import AdapterVersion
from adapters.tool_run import run_tool
from adapters.validation import (
    AdapterFacts,
    AdapterValidationError,
    validate_gguf_lora,
    validate_peft_dir,
)

log = logging.getLogger(__name__)
GGUF_KINDS = frozenset({"llamacpp"})       # backend kinds that load a GGUF LoRA
PEFT_KINDS = frozenset({"sglang"})         # backend kinds that load a PEFT-style dir
GGUF_OUT = "adapter.gguf"
SGLANG_OUT = "sglang"


class ConversionError(AdapterValidationError):
    """A conversion that cannot run or failed; the message names the input and the tool (HTTP 422)."""


@dataclass(frozen=True)
class Step:
    artifact: str        # "gguf" | "sglang"
    tool: str            # the script that makes it

    def __str__(self) -> str:
        return f"{self.artifact} with {self.tool}"


PEFT_TO_GGUF = Step("gguf", "convert_lora_to_gguf.py")
KT_TO_SGLANG = Step("sglang", "convert_kt_to_sglang_adapter.py")


def plan(facts: AdapterFacts, backends: Mapping[str, str]) -> list[Step]:
    """The conversions an adapter needs for its backends (name -> kind), or a ConversionError naming the
    backend that cannot serve it, before anything runs."""
    steps: list[Step] = []
    for name, kind in backends.items():
        if kind in GGUF_KINDS and facts.gguf_path is None:
            if facts.source_format == "kt-sft":
                raise ConversionError(f"backend {name!r} (llama.cpp) cannot serve a KT-SFT checkpoint: its fused "
                                      "expert LoRA has no GGUF form; give `gguf` or plan it on SGLang backends only")
            if facts.touches_experts:
                raise ConversionError(f"backend {name!r} (llama.cpp) cannot serve this adapter: it adapts MoE "
                                      "experts (.mlp.experts.*), which llama.cpp's base GGUF holds fused "
                                      "(ffn_*_exps) with no per-expert tensor a LoRA could match")
            if any(module.endswith("kv_b_proj") for module in facts.target_modules):
                raise ConversionError(f"backend {name!r} (llama.cpp) cannot serve this adapter: llama.cpp's "
                                      "convert_lora_to_gguf.py cannot convert a LoRA on kv_b_proj (it splits the "
                                      "MLA kv_b_proj into attn_k_b/attn_v_b, which it does not implement for "
                                      "LoRA: NotImplementedError); train without kv_b_proj, or give `gguf`")
            if PEFT_TO_GGUF not in steps:
                steps.append(PEFT_TO_GGUF)
        if kind in PEFT_KINDS:
            if facts.source_path is None:
                raise ConversionError(f"backend {name!r} (SGLang) needs `source` (a PEFT dir or KT-SFT "
                                      "checkpoint); a GGUF cannot be converted back")
            if facts.source_format == "kt-sft" and KT_TO_SGLANG not in steps:
                steps.append(KT_TO_SGLANG)
    return steps


class Converter(Protocol):
    """Runs the planned steps; returns artifact ("gguf" | "sglang") -> the path made for it."""

    async def convert(self, facts: AdapterFacts, steps: list[Step],
                      progress: Callable[[Step, str], None] | None = None) -> dict[str, str]: ...


class Unconverted:
    """No converter configured: every artifact must be given."""

    async def convert(self, facts: AdapterFacts, steps: list[Step],
                      progress: Callable[[Step, str], None] | None = None) -> dict[str, str]:
        if steps:
            raise ConversionError(f"this adapter needs {steps[0]}, and no `conversion:` is configured "
                                  "(run `kimi-gateway setup converters`), or give that artifact explicitly")
        return {}


@dataclass(frozen=True)
class ConversionSettings:
    cache_dir: Path
    llama_cpp_python: str | None = None
    llama_cpp_dir: str | None = None         # holds convert_lora_to_gguf.py (+ conversion/, gguf-py/)
    kt_python: str | None = None
    kt_script: str | None = None             # convert_kt_to_sglang_adapter.py; found in kt_python's kt-kernel if None
    base_hf_config: str | None = None        # the base model's config.json (PEFT -> GGUF)
    base_name: str = "base"                  # written into the SGLang adapter_config.json
    timeout_s: float = 1800.0


class ToolConverter:
    def __init__(self, settings: ConversionSettings, base: BaseModelDims | None = None) -> None:
        self.settings = settings
        self.base = base

    def cached(self, facts: AdapterFacts, step: Step) -> Path:
        name = GGUF_OUT if step.artifact == "gguf" else SGLANG_OUT
        return self.settings.cache_dir / facts.content_hash / name

    def command(self, facts: AdapterFacts, step: Step) -> list[str]:
        """The argv that makes `step`'s artifact, shown with its cache entry as the output (the run writes into
        a temp dir beside it and renames); ConversionError when the converter is not there."""
        return self._argv(facts, step, self.cached(facts, step))

    async def convert(self, facts: AdapterFacts, steps: list[Step],
                      progress: Callable[[Step, str], None] | None = None) -> dict[str, str]:
        made = {}
        for step in steps:
            out = self.cached(facts, step)
            if not out.exists():
                await self._run(facts, step, out, progress)
            made[step.artifact] = str(out)
        return made

    async def _run(self, facts: AdapterFacts, step: Step, out: Path,
                   progress: Callable[[Step, str], None] | None) -> None:
        assert facts.source_path is not None
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            target = work / out.name
            argv = self._argv(facts, step, target)
            log.info("converting %s: %s", facts.source_path, " ".join(argv))
            log_path = self.settings.cache_dir / "logs" / f"{facts.content_hash[:16]}-{step.artifact}.log"
            result = await run_tool(argv, timeout_s=self.settings.timeout_s, log_path=log_path,
                                    env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
                                    on_line=(lambda line: progress(step, line)) if progress else None)
            if not result.ok:
                what = "timed out" if result.returncode is None else f"failed (exit {result.returncode})"
                raise ConversionError(f"{step.tool} {what} after {result.seconds:.1f} s; its last lines:\n"
                                      f"{result.last_lines()}")
            await asyncio.to_thread(self._check_output, step, target, work)
            target.rename(out)
            log.info("converted %s to %s in %.2f s", facts.source_path, out, result.seconds)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _argv(self, facts: AdapterFacts, step: Step, target: Path) -> list[str]:
        s = self.settings
        if step.artifact == "gguf":
            if not s.llama_cpp_python or not s.llama_cpp_dir:
                raise ConversionError("PEFT -> GGUF needs conversion.llama_cpp_python and the llama.cpp converter "
                                      "scripts: run `kimi-gateway setup converters`")
            if not s.base_hf_config:
                raise ConversionError("PEFT -> GGUF needs the base model's config.json: set base_model.hf_config")
            return [s.llama_cpp_python, str(Path(s.llama_cpp_dir) / "convert_lora_to_gguf.py"),
                    "--base", str(Path(s.base_hf_config).parent), "--outtype", "f32", "--outfile", str(target),
                    str(facts.source_path)]
        if not s.kt_python:
            raise ConversionError("KT-SFT -> SGLang needs conversion.kt_python: run `kimi-gateway setup converters`")
        script = s.kt_script
        if script is None:
            from adapters.converter_env import kt_script
            found = kt_script(s.kt_python)
            if found is None:
                raise ConversionError(f"conversion.kt_python {s.kt_python} has no kt-kernel with "
                                      "convert_kt_to_sglang_adapter.py: run `kimi-gateway setup converters`")
            script = str(found)
        return [s.kt_python, script, str(facts.source_path), str(target),
                "--base-model-name-or-path", s.base_name]

    def _check_output(self, step: Step, target: Path, work: Path) -> None:
        """The artifact must pass the same validation as one a user gives, against the base model."""
        try:
            if step.artifact == "gguf":
                if not target.is_file():
                    raise AdapterValidationError(f"{step.tool} exited 0 but wrote no {target.name}")
                validate_gguf_lora(target, target.name, self.base)
            else:
                if (target / FUSED_FILE).exists():
                    raise AdapterValidationError(f"the output still holds {FUSED_FILE}")
                validate_peft_dir(target, str(target), [str(work)], self.base, None)
        except AdapterValidationError as exc:
            raise ConversionError(f"{step.tool} wrote an output that fails validation: {exc}") from exc


def needs_step(kind: str, steps: Collection[Step]) -> bool:
    """Whether a backend of this kind waits for one of the steps (it is `converting` meanwhile)."""
    return any(step.artifact == "gguf" for step in steps) if kind in GGUF_KINDS else \
        kind in PEFT_KINDS and any(step.artifact == "sglang" for step in steps)


def with_artifacts(version: AdapterVersion, made: Mapping[str, str]) -> AdapterVersion:
    """The version served from what conversion made (its given files stay what the user registered)."""
    return replace(version, converted_source=made.get("sglang"), converted_gguf=made.get("gguf"))
