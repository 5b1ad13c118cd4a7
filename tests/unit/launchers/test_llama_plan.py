"""`launch llama-server --dry-run`: the argv of every replica (reference/llamacpp.md §4-5) and router mode's
presets file (§6), from a config with a `launch:` block and registered GGUF adapters."""
import json

import yaml

from backends.launchers.llama_plan import first_shard, presets_ini
from gateway.cli import main


def write_config(tmp_path, **launch) -> str:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("Kimi-K2.5-UD-Q2_K_XL-00001-of-00008.gguf", "a.gguf", "b.gguf"):
        (models / name).write_bytes(b"GGUF")
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    config = {
        "state_dir": str(tmp_path / "state"), "adapter_roots": [str(models)],
        "backends": [{"name": "gguf", "kind": "llamacpp", "urls": ["http://127.0.0.1:8081", "http://127.0.0.1:8082"],
                      "launch": {"binary": str(binary),
                                 "model": str(models / "Kimi-K2.5-UD-Q2_K_XL-00003-of-00008.gguf"),
                                 "ctx_size": 16384, "args": ["-ngl", "99"], **launch}}],
        "adapters": [{"name": "legal-a", "gguf": str(models / "a.gguf"), "backends": ["gguf"]},
                     {"name": "legal-b", "gguf": str(models / "b.gguf"), "backends": ["gguf"]}],
        "routes": [{"name": "kimi-k2.5", "targets": ["gguf"]}],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_every_replica_gets_the_model_every_adapter_and_no_prompt_cache(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["launch", "llama-server", "--config", config, "--backend", "gguf", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    models = tmp_path / "models"
    assert plan["model"] == str(models / "Kimi-K2.5-UD-Q2_K_XL-00001-of-00008.gguf")   # the first shard
    assert [s["url"] for s in plan["servers"]] == ["http://127.0.0.1:8081", "http://127.0.0.1:8082"]
    argv = plan["servers"][1]["argv"]
    assert argv[argv.index("-m") + 1] == plan["model"]
    assert argv[argv.index("--lora") + 1] == f"{models / 'a.gguf'},{models / 'b.gguf'}"   # one list, comma form
    assert argv[argv.index("--cache-ram") + 1] == "0"
    assert argv[argv.index("--ctx-size") + 1] == "16384" and argv[argv.index("-ngl") + 1] == "99"
    assert {"--jinja", "--metrics"} <= set(argv)
    assert (argv[argv.index("--host") + 1], argv[argv.index("--port") + 1]) == ("127.0.0.1", "8082")
    assert plan["servers"][1]["health_url"] == "http://127.0.0.1:8082/health"
    assert not (tmp_path / "state").exists()          # a dry run writes nothing


def test_router_mode_writes_a_presets_file_per_adapter(tmp_path, capsys):
    config = write_config(tmp_path, router=True, alias="kimi")
    assert main(["launch", "llama-server", "--config", config, "--backend", "gguf", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--models-preset" in out and "--no-models-autoload" in out and "-m " not in out
    ini = presets_ini("/m.gguf", ["/a.gguf", "/b.gguf"], "kimi")
    assert ini.startswith("[*]\ncache-ram = 0\n")
    assert "[kimi]\nmodel = /m.gguf\n" in ini and "[kimi:a]\nmodel = /m.gguf\nlora = /a.gguf\n" in ini


def test_a_missing_model_and_adapter_are_each_named(tmp_path, capsys):
    config = write_config(tmp_path)
    (tmp_path / "models" / "Kimi-K2.5-UD-Q2_K_XL-00001-of-00008.gguf").unlink()
    (tmp_path / "models" / "b.gguf").unlink()
    assert main(["launch", "llama-server", "--config", config, "--backend", "gguf", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "Kimi-K2.5-UD-Q2_K_XL-00001-of-00008.gguf is not a file" in err
    assert f"adapter file {tmp_path / 'models' / 'b.gguf'} does not exist" in err


def test_first_shard():
    assert first_shard("/m/K-00004-of-00008.gguf") == "/m/K-00001-of-00008.gguf"
    assert first_shard("/m/tiny.gguf") == "/m/tiny.gguf"
