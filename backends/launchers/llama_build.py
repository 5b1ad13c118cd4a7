"""find_llama_server(): PATH, $KIMI_GATEWAY_LLAMA_SERVER, the user cache, or a one-time CPU build from the
llama.cpp source vendored in the llama-cpp-python sdist on PyPI (about 9 minutes on 2 cores).

`python -m backends.launchers.llama_build` builds (or reuses) and prints the binary's path.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_VERSION = os.environ.get("KIMI_GATEWAY_LLAMA_SDIST_VERSION", "0.3.36")
# Portable flags: a cached binary may meet another CPU model, where -march=native would not run.
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF")
ENV_VAR = "KIMI_GATEWAY_LLAMA_SERVER"
PROGRESS = re.compile(r"^\[\s*(\d+)%\]")


class BuildError(RuntimeError):
    """llama-server could not be found or built; the message says what to install or set."""


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "kimi-gateway" / "llama-server"


def cached_binary() -> Path:
    key = hashlib.sha256("".join(f"{flag} " for flag in CMAKE_FLAGS).encode()).hexdigest()[:12]
    return cache_dir() / f"{SDIST_VERSION}-{key}" / "llama-server"


def find_llama_server() -> Path | None:
    """The env var wins (an explicit choice), then the build cache, then PATH."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise BuildError(f"${ENV_VAR} is {explicit!r}, which is not an executable file")
        return Path(explicit)
    cached = cached_binary()
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    on_path = shutil.which("llama-server")
    return Path(on_path) if on_path else None


def ensure_llama_server(log=print) -> Path:
    found = find_llama_server()
    return found if found is not None else build(log)


def _require_tools() -> None:
    missing = [tool for tool in ("cmake", "make", "cc", "c++") if shutil.which(tool) is None]
    if missing:
        raise BuildError(f"cannot build llama-server: {', '.join(missing)} missing "
                         "(Debian: apt-get install cmake build-essential), or set "
                         f"${ENV_VAR} to an existing llama-server binary")


def fetch_source(work: Path, log) -> Path:
    """Download the sdist into `work`, unpack it, and return its vendor/llama.cpp (also used for the converter)."""
    log(f"[llama-server] fetching the llama-cpp-python {SDIST_VERSION} sdist from PyPI")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                             "llama-cpp-python", f"llama-cpp-python=={SDIST_VERSION}", "-d", str(work)],
                            capture_output=True, text=True)
    archives = list(work.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise BuildError(f"cannot build llama-server: pip could not download llama-cpp-python=={SDIST_VERSION} "
                         f"(is PyPI reachable?): {result.stderr.strip()[-300:]}")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(work, filter="data")
    source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if source is None or not (source / "CMakeLists.txt").is_file():
        raise BuildError("cannot build llama-server: the sdist has no vendor/llama.cpp")
    return source


def _compile(source: Path, build_dir: Path, log) -> Path:
    launcher = ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"] if shutil.which("ccache") else []
    configure = subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *CMAKE_FLAGS, *launcher],
                               capture_output=True, text=True)
    if configure.returncode != 0:
        raise BuildError(f"cmake configure failed:\n{configure.stdout[-2000:]}{configure.stderr[-2000:]}")
    jobs = str(os.cpu_count() or 2)
    log(f"[llama-server] compiling with {jobs} jobs (about 9 minutes on 2 cores, once; cached afterwards)")
    process = subprocess.Popen(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", jobs],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    shown = -1
    for line in process.stdout:  # type: ignore[union-attr]
        tail = (tail + [line])[-40:]
        match = PROGRESS.match(line)
        if match and int(match.group(1)) > shown:
            shown = int(match.group(1))
            log(f"[llama-server] build {shown}%")
    if process.wait() != 0:
        raise BuildError("llama-server build failed:\n" + "".join(tail))
    return build_dir / "bin" / "llama-server"


def build(log=print) -> Path:
    _require_tools()
    target = cached_binary()
    with tempfile.TemporaryDirectory(prefix="llama-build-") as tmp:
        work = Path(tmp)
        built = _compile(fetch_source(work, log), work / "build", log)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.replace(target)  # atomic: a concurrent reader never sees half a binary
    log(f"[llama-server] built {target}")
    return target


def main() -> int:
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)
    try:
        print(ensure_llama_server(log))
    except BuildError as exc:
        log(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
