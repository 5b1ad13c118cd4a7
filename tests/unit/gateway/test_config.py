"""Config loading: a wrong config names the file, the key path and what was expected."""
from pathlib import Path

import pytest
import yaml

from gateway.config import ConfigError, load_config

EXAMPLE = Path(__file__).parents[3] / "deploy" / "kimi-gateway.example.yaml"
MINIMAL = """
backends:
  - {name: gguf, kind: llamacpp, url: "http://127.0.0.1:8081"}
adapters:
  - {name: a, gguf: /adapters/a.gguf, backends: [gguf]}
routes:
  - {name: base, targets: [gguf]}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_example_config_loads():
    config = load_config(EXAMPLE)
    assert [b.name for b in config.backends] == ["kt-a", "gguf", "moonshot"]
    assert config.backend("gguf").endpoints == ("http://10.0.0.6:8081", "http://10.0.0.7:8081")
    assert config.sampling.profiles["instant"].thinking is False


def test_minimal_config_gets_kimi_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    thinking = config.sampling.profiles["thinking"]
    assert (thinking.temperature, thinking.top_p, thinking.min_p) == (1.0, 0.95, 0.01)
    assert config.sampling.profiles["instant"].temperature == 0.6


def test_image_url_settings(tmp_path):
    config = load_config(write(tmp_path, MINIMAL.replace("routes:", "limits: {image_urls: forward, "
                                                         "private_image_networks: [10.1.0.0/16]}\nroutes:")
                               .replace("targets: [gguf]", "targets: [gguf], image_urls: fetch")))
    assert config.limits.image_urls == "forward" and config.routes[0].image_urls == "fetch"
    assert str(config.limits.private_image_networks[0]) == "10.1.0.0/16"
    assert load_config(write(tmp_path, MINIMAL)).limits.image_urls == "fetch"   # the default


@pytest.mark.parametrize("change, expected", [
    (("url: \"http://127.0.0.1:8081\"", "url: \"http://127.0.0.1:8081\", colour: red"), "backends[0].colour: unknown key"),
    (("targets: [gguf]", "targets: [nope]"), "routes[0].targets[0]: 'nope' is not a backend"),
    (("backends: [gguf]", "backends: [ghost]"), "adapters[0].backends[0]: 'ghost' is not a backend"),
    (("kind: llamacpp", "kind: vllm"), "backends[0].kind: 'vllm' is not a backend kind (one of sglang, llamacpp, moonshot)"),
    (("name: base", "name: a"), "the name 'a' is used twice"),
    (("url: \"http://127.0.0.1:8081\"", "url: \"ftp://x\""), "backends[0].url: expected an http(s) URL"),
    (("targets: [gguf]", "targets: [gguf], experiment: {variants: {a: 1}}"), "exactly one of `targets` or `experiment`"),
    (("targets: [gguf]", "targets: [gguf], image_urls: download"), "routes[0].image_urls: Input should be 'fetch' or"),
    (("routes:", "limits: {private_image_networks: [10.0.0.300/8]}\nroutes:"), "limits.private_image_networks[0]"),
    (("routes:", "limits: {image_url_ports: [0]}\nroutes:"), "limits.image_url_ports[0]"),
])
def test_wrong_config_names_file_path_and_expectation(tmp_path, change, expected):
    path = write(tmp_path, MINIMAL.replace(*change))
    with pytest.raises(ConfigError) as failure:
        load_config(path)
    assert str(failure.value).startswith(str(path))
    assert expected in str(failure.value)


def test_adapter_on_llamacpp_needs_gguf(tmp_path):
    with pytest.raises(ConfigError, match=r"adapters\[0\]: backend 'gguf' is llamacpp, so the adapter needs `gguf` "
                                          r"\(a GGUF LoRA file, or `source` with conversion.llama_cpp_python set"):
        load_config(write(tmp_path, MINIMAL.replace("gguf: /adapters/a.gguf, ", "")))


def test_moonshot_serves_no_adapters(tmp_path):
    text = MINIMAL.replace("backends:\n", "backends:\n  - {name: hosted, kind: moonshot, url: \"https://api.moonshot.ai/v1\", api_key_env: K}\n")
    with pytest.raises(ConfigError, match="'hosted' is a moonshot backend, which serves no LoRA"):
        load_config(write(tmp_path, text.replace("backends: [gguf]", "backends: [hosted]")))


def test_unreadable_and_non_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "backends: [\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n"))


@pytest.mark.parametrize("text, expected", [
    (MINIMAL + "routes:\n  - {name: other, targets: [gguf]}\n", "line 8, column 1: the key 'routes' is given twice"),
    (MINIMAL.replace("{name: base, targets: [gguf]}", "{name: base, name: b2, targets: [gguf]}"),
     "the key 'name' is given twice"),
    ("backends: [\n", "not valid YAML at line 2, column 1: expected the node content"),
    ("backends:\n  - name: a\n\tkind: llamacpp\n", "at line 3, column 1: found character '\\t'"),
    ("", "the file is empty"),
])
def test_a_yaml_mistake_is_one_line_naming_where(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as failure:
        load_config(path)
    assert expected in str(failure.value) and "\n" not in str(failure.value)


def test_a_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_bytes(b"backends: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


@pytest.mark.parametrize("change, expected", [
    (("routes:", "shared: {kind: local, url_env: REDIS_URL}\nroutes:"), "shared: `url_env` is for kind: redis"),
    (("url: \"http://127.0.0.1:8081\"", "url: \"http://127.0.0.1:8081\", outliers: {ejection_s: 30}"),
     "backends[0].outliers: ejection_s (30) is longer than max_ejection_s (10)"),
    (("routes:\n", "routes:\n  - {name: ab, experiment: {variants: {ab: 1}}}\n"),
     "routes[0].experiment.variants: 'ab' is this experiment itself"),
    (("targets: [gguf]", "targets: [gguf], deadline_ms: 86400001"), "routes[0].deadline_ms"),
])
def test_more_wrong_keys_are_named(tmp_path, change, expected):
    with pytest.raises(ConfigError) as failure:
        load_config(write(tmp_path, MINIMAL.replace(*change)))
    assert expected in str(failure.value)


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_an_adapter_root_that_is_not_a_directory_stops_check_and_serve_on_one_line(tmp_path, capsys, kind):
    """`serve` loads its config through `load_checked`, as `check` does (tests/integration/test_startup_errors.py
    runs the real `serve`)."""
    from gateway.cli import load_checked, main

    present, root = tmp_path / "adapters", tmp_path / "no-such-dir"
    present.mkdir()
    if kind == "a file":
        root.write_text("not a directory")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "adapter_roots": [str(present), str(root)],
        "backends": [{"name": "llama", "kind": "llamacpp", "url": "http://127.0.0.1:9"}],
        "routes": [{"name": "kimi", "targets": ["llama"]}]}))
    what = "does not exist" if kind == "missing" else "is not a directory"
    assert main(["check", str(path)]) == 1
    assert capsys.readouterr().err == f"error: {path}: adapter_roots[1]: {root} {what}\n"
    with pytest.raises(ConfigError, match=f"^{path}: adapter_roots\\[1\\]: {root} {what}$"):
        load_checked(str(path))


def test_a_tilde_adapter_root_is_the_home_directory(tmp_path, capsys, monkeypatch):
    from gateway.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "adapters").mkdir()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "adapter_roots": ["~/adapters"],
        "backends": [{"name": "llama", "kind": "llamacpp", "url": "http://127.0.0.1:9"}],
        "routes": [{"name": "kimi", "targets": ["llama"]}]}))
    assert main(["check", str(path)]) == 0, capsys.readouterr().err
    (tmp_path / "adapters").rmdir()
    assert main(["check", str(path)]) == 1
    assert capsys.readouterr().err.endswith("adapter_roots[0]: ~/adapters does not exist\n")
