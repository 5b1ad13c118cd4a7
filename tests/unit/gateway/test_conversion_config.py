"""The `conversion:` block: `kimi-gateway check` names a converter Python that lacks what its converter needs,
and `setup converters` is a command. (The venvs themselves are made and used in
tests/integration/test_conversion_live.py.)"""
import sys

import yaml

from gateway.cli import main, parser


def write(tmp_path, conversion: dict) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "conversion": conversion,
        "backends": [{"name": "llama", "kind": "llamacpp", "url": "http://127.0.0.1:9"}],
        "routes": [{"name": "kimi-k2.5", "targets": ["llama"]}]}))
    return str(path)


def test_check_names_a_converter_python_that_lacks_its_packages(tmp_path, capsys):
    # This test's own Python has no torch or transformers: exactly what a half-made venv looks like.
    path = write(tmp_path, {"llama_cpp_python": sys.executable, "llama_cpp_dir": str(tmp_path),
                            "kt_python": str(tmp_path / "nowhere" / "python")})
    assert main(["check", path]) == 1
    err = capsys.readouterr().err
    assert f"conversion.llama_cpp_python: {sys.executable} lacks torch, transformers" in err
    assert f"conversion.llama_cpp_dir: {tmp_path}/convert_lora_to_gguf.py does not exist" in err
    assert f"conversion.kt_python: {tmp_path}/nowhere/python does not exist" in err
    assert err.count("run `kimi-gateway setup converters`") == 3


def test_check_passes_without_a_conversion_block(tmp_path, capsys):
    assert main(["check", write(tmp_path, {})]) == 0


def test_unknown_conversion_keys_are_config_errors(tmp_path, capsys):
    assert main(["check", write(tmp_path, {"llama_python": "/x"})]) == 1
    assert "conversion.llama_python" in capsys.readouterr().err


def test_setup_converters_is_a_command():
    args = parser().parse_args(["setup", "converters", "--dir", "/tmp/x"])
    assert (args.what, str(args.dir)) == ("converters", "/tmp/x")


def test_a_peft_adapter_on_llama_cpp_is_converted_only_with_a_converter(tmp_path):
    from gateway.config import ConfigError, load_config

    def config(conversion: dict) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({
            "conversion": conversion,
            "backends": [{"name": "gguf", "kind": "llamacpp", "url": "http://127.0.0.1:9"}],
            "adapters": [{"name": "legal", "source": "/adapters/legal", "backends": ["gguf"]}]}))
        return str(path)

    assert load_config(config({"llama_cpp_python": "/opt/convert/bin/python"})).adapters[0].gguf is None
    try:
        load_config(config({}))
    except ConfigError as exc:
        assert "needs `gguf` (a GGUF LoRA file, or `source` with conversion.llama_cpp_python set" in str(exc)
    else:
        raise AssertionError("a PEFT-only adapter on llama.cpp without a converter must be refused")


def test_serve_stops_on_what_check_reports_on_one_line(tmp_path, capsys):
    """`serve` refuses a converter Python that `check` refuses, before it listens, on one line."""
    from gateway.cli import load_checked
    from gateway.config import ConfigError

    path = write(tmp_path, {"llama_cpp_python": str(tmp_path / "nowhere" / "python")})
    try:
        load_checked(path)
    except ConfigError as exc:
        assert "conversion.llama_cpp_python" in str(exc) and "\n" not in str(exc)
    else:
        raise AssertionError("load_checked took a converter Python that does not exist")
    assert main(["serve", "--config", path, "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}/nowhere/python does not exist" in err


def test_check_notes_the_env_vars_serve_needs_that_are_not_set_here(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KGW_CHECK_DSN", raising=False)
    monkeypatch.delenv("KGW_CHECK_HOSTED", raising=False)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "store": {"kind": "postgres", "dsn_env": "KGW_CHECK_DSN"},
        "backends": [{"name": "hosted", "kind": "moonshot", "url": "https://api.moonshot.ai/v1",
                      "api_key_env": "KGW_CHECK_HOSTED"}]}))
    assert main(["check", str(path)]) == 0     # the check may run where the secrets are not
    out = capsys.readouterr().out
    assert "note: store.dsn_env: the environment variable KGW_CHECK_DSN is not set here; `serve` would stop" in out
    assert "note: backends[0].api_key_env: the environment variable KGW_CHECK_HOSTED is not set here" in out
