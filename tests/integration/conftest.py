"""Real processes for integration tests: llama-server (built from the llama-cpp-python sdist), the SGLang and
Moonshot emulators, and the gateway itself started as `kimi-gateway serve --config`."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import Callable

import openai
import pytest
import yaml

from backends.launchers.llama_build import BuildError, ensure_llama_server
from backends.launchers.llamacpp import LlamaServerLaunch, ServerProcess, free_port
from gateway.demo.tiny_gguf import DemoModels, write_demo_set

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="session")
def llama_binary() -> Path:
    try:
        return ensure_llama_server(lambda message: print(message, file=sys.stderr, flush=True))
    except BuildError as exc:
        pytest.fail(f"llama-server is needed for integration tests and could not be had: {exc}. "
                    "Run scripts/build-llama-server, or set KIMI_GATEWAY_LLAMA_SERVER to a llama-server binary.")


@pytest.fixture(scope="session")
def converters():
    """The converter venvs and llama.cpp's converter scripts (`kimi-gateway setup converters`), made once into
    the user cache and reused by every later session."""
    from adapters import converter_env

    try:
        where = converter_env.setup_converters(log=lambda message: print(message, file=sys.stderr, flush=True))
    except (converter_env.ConverterSetupError, BuildError, OSError) as exc:
        pytest.fail(f"the converter venvs are needed and could not be made: {exc}. "
                    "Run `kimi-gateway setup converters` (it installs from PyPI) and try again.")
    problems = (converter_env.check_llama_cpp(where.llama_cpp_python, where.llama_cpp_dir)
                + converter_env.check_kt(where.kt_python))
    if problems:
        pytest.fail("the converter venvs are incomplete: " + "; ".join(problems))
    return where


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> DemoModels:
    return write_demo_set(tmp_path_factory.mktemp("models"))


SECRET_ENV = re.compile(r"KEYS?$|SECRET|TOKEN")


@pytest.fixture(scope="session")
def secrets() -> set[str]:
    """Every key handed to a test process (env vars named *KEY, *KEYS, *SECRET*, *TOKEN*)."""
    return set()


@pytest.fixture(scope="session")
def processes(secrets):
    """Every process a test starts, stopped at the end of the session whatever happened; then the leak
    search: no key any test process was given may appear in any log those processes wrote."""
    started: list[ServerProcess] = []
    yield started
    # A gateway drains on SIGTERM for `shutdown.grace_s` and stops at once on a second one: signal every process
    # first, so that stop()'s own SIGTERM is the second and the session does not wait out each grace in turn.
    for process in started:
        if process.process is not None and process.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.process.pid, signal.SIGTERM)
    for process in reversed(started):
        process.stop()
    logs = {p.log_path: Path(p.log_path).read_text(errors="replace") for p in started if p.log_path}
    leaks = [f"{path.name} contains a key" for path, text in logs.items() for secret in secrets if secret in text]
    assert not leaks, leaks


@pytest.fixture(scope="session")
def start_process(processes, secrets, tmp_path_factory) -> Callable[..., ServerProcess]:
    logs = tmp_path_factory.mktemp("logs")

    def start(name: str, argv: list[str], health_url: str, env: dict[str, str] | None = None,
              timeout_s: float = 60.0) -> ServerProcess:
        for variable, value in (env or {}).items():
            if SECRET_ENV.search(variable):
                secrets.update(part.strip() for part in value.split(",") if len(part.strip()) >= 8)
        process = ServerProcess(argv, health_url, log_path=logs / f"{name}.log", env=env)
        processes.append(process)
        return process.start().wait_ready(timeout_s)
    return start


@pytest.fixture(scope="session")
def llama_server(llama_binary, tiny_models, start_process) -> str:
    """One slot (`-np 1`) so that /slots shows exactly what the last request brought."""
    launch = LlamaServerLaunch(llama_binary, tiny_models.model, (tiny_models.lora_a, tiny_models.lora_b),
                               port=free_port(), alias="tiny", threads=1, extra=("-np", "1"))
    start_process("llama-server", launch.argv(), f"{launch.url}/health")
    return launch.url


@pytest.fixture(scope="session")
def kimi_llama(llama_binary, tmp_path_factory, start_process) -> str:
    """A llama-server running the Kimi chat template (as real K2.5 GGUFs do), with one LoRA."""
    models = write_demo_set(tmp_path_factory.mktemp("kimi-models"), chat_template="kimi")
    launch = LlamaServerLaunch(llama_binary, models.model, (models.lora_a,), port=free_port(), alias="tiny-kimi",
                               threads=1, extra=("-np", "1"))
    start_process("llama-server-kimi", launch.argv(), f"{launch.url}/health")
    return launch.url


@pytest.fixture(scope="session")
def start_gateway(start_process, tmp_path_factory) -> Callable[[dict], str]:
    """Write a config and run the real gateway process on it; returns its base URL (…/v1)."""
    configs = tmp_path_factory.mktemp("configs")

    def start(config: dict, name: str = "gateway", env: dict[str, str] | None = None) -> str:
        port = free_port()
        config = {**config, "listen": {"host": "127.0.0.1", "port": port},
                  "state_dir": str(configs / f"{name}-state")}
        path = configs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)]
        start_process(name, argv, f"http://127.0.0.1:{port}/healthz", env={"PYTHONPATH": str(ROOT), **(env or {})})
        return f"http://127.0.0.1:{port}/v1"
    return start


def start_moonshot(start_process, name: str, api_key: str) -> str:
    """The Moonshot emulator on a free port, accepting `api_key`; returns its base URL (no /v1)."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.emulators.moonshot", "--port", str(port), "--api-key", api_key]
    start_process(name, argv, f"http://127.0.0.1:{port}/_emulator/requests", env={"PYTHONPATH": str(ROOT)})
    return f"http://127.0.0.1:{port}"


def sdk(base_url: str, api_key: str = "none") -> openai.OpenAI:
    """The real OpenAI SDK, with its own retries off: the gateway does the retrying."""
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)


def llama_config(llama_url: str, models: DemoModels, **extra) -> dict:
    config = {
        "adapter_roots": [str(models.model.parent)],
        "backends": [{"name": "llama", "kind": "llamacpp", "url": llama_url}],
        "adapters": [
            {"name": "tiny-a", "gguf": str(models.lora_a), "backends": ["llama"]},
            {"name": "tiny-b", "gguf": str(models.lora_b), "profile": "instant", "backends": ["llama"]},
        ],
        "routes": [
            {"name": "kimi-k2.5", "targets": ["llama"]},
            {"name": "tiny-ab", "experiment": {"sticky_by": "user", "variants": {"tiny-a": 50, "tiny-b": 50}}},
        ],
    }
    config.update(extra)
    return config


os.environ.setdefault("OPENAI_LOG", "")  # the SDK must not log request bodies during tests
