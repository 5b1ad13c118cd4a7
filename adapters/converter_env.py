"""The converters' environments: the llama.cpp converter scripts (cached from the same llama-cpp-python sdist
that llama-server is built from) and the two venvs that run the converters, made by
`kimi-gateway setup converters [--dir D]` and checked by `kimi-gateway check`.

- llama.cpp venv: convert_lora_to_gguf.py needs torch, transformers (the version llama.cpp's
  requirements-convert_legacy_llama.txt pins), safetensors and gguf's own dependencies (the script puts the
  sdist's gguf-py first on sys.path, so the gguf it runs is the one matching the server).
- KT venv: convert_kt_to_sglang_adapter.py needs torch and safetensors (whose torch `save_file` imports
  numpy, so numpy too); kt-kernel is installed
  without its dependencies, since only that pure-Python script is used (run by path, so kt_kernel's
  compiled extension is never imported).
torch is pinned: on these machines torch==2.13.0 is a CPU build on local disk, while an unpinned torch
would pull a CUDA build of several GB. A venv is reused when its marker names the same requirements.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from backends.launchers import llama_build

TORCH = "torch==2.13.0"
LLAMA_CPP_REQUIREMENTS = (TORCH, "transformers==4.57.6", "safetensors==0.8.0", "gguf==0.19.0")
KT_REQUIREMENTS = (TORCH, "safetensors==0.8.0", "numpy==2.4.6")   # safetensors' torch save_file imports numpy
KT_KERNEL = "kt-kernel==0.7.2"               # installed with --no-deps
LLAMA_CPP_IMPORTS = ("torch", "transformers", "safetensors", "numpy", "yaml", "tqdm")
KT_IMPORTS = ("torch", "safetensors", "numpy")
KT_SCRIPT = "kt_kernel/sft/convert_kt_to_sglang_adapter.py"
LLAMA_SCRIPT = "convert_lora_to_gguf.py"
MARKER = ".kimi-gateway-ready"
SCRIPT_FILES = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")

Log = Callable[[str], None]


class ConverterSetupError(RuntimeError):
    """A converter environment cannot be made or is incomplete; the message says what to run."""


@dataclass(frozen=True)
class ConverterPaths:
    llama_cpp_python: Path
    kt_python: Path
    llama_cpp_dir: Path

    def config_lines(self) -> str:
        return (f"conversion:\n  llama_cpp_python: {self.llama_cpp_python}\n  kt_python: {self.kt_python}\n"
                f"  llama_cpp_dir: {self.llama_cpp_dir}\n")


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kimi-gateway"


def default_dir() -> Path:
    return cache_root() / "converters"


def scripts_dir() -> Path:
    """Keyed like the llama-server build: the sdist version (the converter must match the server's GGUF)."""
    return cache_root() / "llama-convert" / llama_build.SDIST_VERSION


def paths(directory: Path | None = None) -> ConverterPaths:
    directory = Path(directory or default_dir()).expanduser().absolute()
    return ConverterPaths(directory / "llama-cpp" / "bin" / "python", directory / "kt" / "bin" / "python",
                          scripts_dir())


# --- the llama.cpp scripts -------------------------------------------------------------------------------------

def ensure_llama_scripts(log: Log = print) -> Path:
    """convert_lora_to_gguf.py and what it imports, from the llama-cpp-python sdist; fetched once."""
    target = scripts_dir()
    if (target / LLAMA_SCRIPT).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-convert-") as tmp:
        source = llama_build.fetch_source(Path(tmp), log)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        for name in SCRIPT_FILES:
            if (source / name).is_dir():
                shutil.copytree(source / name, partial / name)
            elif (source / name).is_file():
                shutil.copy2(source / name, partial / name)
        if not (partial / LLAMA_SCRIPT).is_file():
            shutil.rmtree(partial)
            raise ConverterSetupError(f"the llama-cpp-python {llama_build.SDIST_VERSION} sdist has no {LLAMA_SCRIPT}")
        try:
            partial.rename(target)       # atomic; a parallel setup that won the race keeps its copy
        except OSError:
            shutil.rmtree(partial)
    log(f"[converters] llama.cpp converter scripts in {target}")
    return target


# --- the venvs -------------------------------------------------------------------------------------------------

def _key(requirements: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:16]


def _pip(python: Path, args: Sequence[str], log: Log, what: str) -> None:
    log(f"[converters] {what}: pip install {' '.join(args)}")
    process = subprocess.Popen([str(python), "-m", "pip", "install", "--progress-bar", "off", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in process.stdout:  # type: ignore[union-attr]
        tail = (tail + [line])[-30:]
        if line.startswith(("Collecting", "Successfully installed")):
            log(f"[converters] {what}: {line.rstrip()}")
    if process.wait() != 0:
        raise ConverterSetupError(f"{what}: pip install failed:\n" + "".join(tail))


def ensure_venv(venv: Path, requirements: Sequence[str], no_deps: Sequence[str], log: Log, what: str) -> Path:
    """A venv with exactly these requirements; made in a temp dir beside it and renamed into place."""
    python = venv / "bin" / "python"
    key = _key([*requirements, "--no-deps", *no_deps])
    marker = venv / MARKER
    if marker.is_file() and marker.read_text().strip() == key and python.exists():
        log(f"[converters] {what}: reusing {venv}")
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    partial = venv.with_name(f".{venv.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    log(f"[converters] {what}: creating {venv}")
    # A venv's scripts embed its path, so it is built at its final path: the old one moves aside first.
    if venv.exists():
        venv.rename(partial)
    try:
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            raise ConverterSetupError(f"{what}: python -m venv failed (Debian: apt-get install python3-venv): "
                                      f"{made.stderr.strip()[-300:]}")
        _pip(python, list(requirements), log, what)
        if no_deps:
            _pip(python, ["--no-deps", *no_deps], log, what)
        marker.write_text(key + "\n")
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log(f"[converters] {what}: ready ({python})")
    return python


def setup_converters(directory: Path | None = None, log: Log = print) -> ConverterPaths:
    where = paths(directory)
    ensure_llama_scripts(log)
    ensure_venv(where.llama_cpp_python.parent.parent, LLAMA_CPP_REQUIREMENTS, (), log, "llama.cpp converter venv")
    ensure_venv(where.kt_python.parent.parent, KT_REQUIREMENTS, (KT_KERNEL,), log, "KT converter venv")
    return where


# --- checks --------------------------------------------------------------------------------------------------

def missing_imports(python: str | Path, modules: Sequence[str]) -> list[str]:
    """The modules `python` cannot find (without importing them: torch alone takes seconds)."""
    probe = ("import importlib.util, sys\n"
             "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))")
    try:
        result = subprocess.run([str(python), "-c", probe, *modules], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"(cannot run {python}: {exc})"]
    if result.returncode != 0:
        return [f"(cannot run {python}: {result.stderr.strip()[-200:]})"]
    return result.stdout.split()


def kt_script(python: str | Path) -> Path | None:
    """convert_kt_to_sglang_adapter.py inside `python`'s kt-kernel; found without importing kt_kernel."""
    probe = ("import importlib.util\nspec = importlib.util.find_spec('kt_kernel')\n"
             "print(spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else '')")
    try:
        result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    package = result.stdout.strip()
    script = Path(package).parent / KT_SCRIPT if package else None
    return script if script is not None and script.is_file() else None


HOW_TO_GET = "run `kimi-gateway setup converters` (it prints the config lines to use)"


def check_llama_cpp(python: str | Path, scripts: str | Path | None) -> list[str]:
    problems = []
    if not Path(python).exists():
        return [f"conversion.llama_cpp_python: {python} does not exist; {HOW_TO_GET}"]
    if missing := missing_imports(python, LLAMA_CPP_IMPORTS):
        problems.append(f"conversion.llama_cpp_python: {python} lacks {', '.join(missing)}; {HOW_TO_GET}")
    script = Path(scripts or scripts_dir()) / LLAMA_SCRIPT
    if not script.is_file():
        problems.append(f"conversion.llama_cpp_dir: {script} does not exist; {HOW_TO_GET}")
    return problems


def check_kt(python: str | Path) -> list[str]:
    if not Path(python).exists():
        return [f"conversion.kt_python: {python} does not exist; {HOW_TO_GET}"]
    if missing := missing_imports(python, KT_IMPORTS):
        return [f"conversion.kt_python: {python} lacks {', '.join(missing)}; {HOW_TO_GET}"]
    if kt_script(python) is None:
        return [f"conversion.kt_python: {python} has no kt-kernel with {KT_SCRIPT} "
                f"(pip install --no-deps {KT_KERNEL}); {HOW_TO_GET}"]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="kimi-gateway setup converters")
    parser.add_argument("--dir", type=Path, help=f"where the two venvs go (default {default_dir()})")
    args = parser.parse_args(argv)
    try:
        where = setup_converters(args.dir, lambda m: print(m, file=sys.stderr, flush=True))
    except (ConverterSetupError, llama_build.BuildError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("# add to your gateway config:")
    print(where.config_lines(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
