"""deploy/: the Dockerfile, docker-compose.yml, its configs and the systemd units agree with the code: config
files load as strict GatewayConfigs, ports and probe paths match, the launch unit's command parses."""
import re
import shlex
from pathlib import Path

import yaml

from backends.sglang_launch import SglangLaunchConfig
from gateway.api.health import router as health_router
from gateway.cli import parser
from gateway.config import ListenConfig, load_config
from gateway.launch_cli import EXIT_CRASH_LOOP, EXIT_PROBLEMS

DEPLOY = Path(__file__).parents[3] / "deploy"
HEALTH_ROUTES = {route.path for route in health_router.routes}


def unit(name: str) -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def test_dockerfile_is_slim_non_root_with_a_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.count("FROM python:3.11-slim") == 2                 # build stage + runtime stage
    user = re.search(r"^USER (\S+)", text, re.M).group(1)
    assert not user.startswith(("0", "root"))
    default_port = ListenConfig().port
    assert f"EXPOSE {default_port}" in text
    health = re.search(r"KIMI_GATEWAY_HEALTH_URL=(\S+)", text).group(1)
    assert health == f"http://127.0.0.1:{default_port}/healthz" and "/healthz" in HEALTH_ROUTES
    assert "HEALTHCHECK" in text and 'CMD ["serve", "--config", "/etc/kimi-gateway/gateway.yaml"]' in text


def test_compose_wires_the_gateway_llama_server_prometheus_and_grafana():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"gateway", "llama-server", "prometheus", "grafana"}
    config = load_config(DEPLOY / "compose" / "gateway.yaml")
    assert services["gateway"]["ports"] == [f"{config.listen.port}:{config.listen.port}"]
    assert "./compose/gateway.yaml:/etc/kimi-gateway/gateway.yaml:ro" in services["gateway"]["volumes"]
    for name in ("KIMI_GATEWAY_ADMIN_KEYS", "MOONSHOT_API_KEY"):   # every env name the config refers to
        assert name in services["gateway"]["environment"]
    assert config.auth.admin_keys_env in services["gateway"]["environment"]
    llama = services["llama-server"]["command"]
    [backend_url] = config.backend("gguf").endpoints
    assert backend_url == f"http://llama-server:{llama[llama.index('--port') + 1]}"
    assert llama[llama.index("--cache-ram") + 1] == "0" and "--metrics" in llama
    assert llama[llama.index("--lora") + 1] == config.adapters[0].gguf


def test_prometheus_scrapes_the_gateway_and_grafana_gets_the_dashboards():
    prometheus = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    config = load_config(DEPLOY / "compose" / "gateway.yaml")
    assert jobs["kimi-gateway"]["static_configs"][0]["targets"] == [f"gateway:{config.listen.port}"]
    assert jobs["kimi-gateway"]["metrics_path"] == "/metrics" and "/metrics" in HEALTH_ROUTES
    grafana = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["grafana"]
    provider = yaml.safe_load((DEPLOY / "grafana-provisioning" / "dashboards" / "kimi-gateway.yml").read_text())
    dashboards = provider["providers"][0]["options"]["path"]
    assert f"../grafana:{dashboards}:ro" in grafana["volumes"]
    assert list((DEPLOY.parent / "grafana").glob("*.json"))
    datasource = yaml.safe_load((DEPLOY / "grafana-provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_the_sglang_unit_runs_kimi_gateway_launch():
    entries = unit("kimi-gateway-sglang@.service")
    [exec_start] = entries["ExecStart"]
    argv = shlex.split(exec_start.replace("%i", "kt-a"))
    assert argv[0].endswith("/kimi-gateway")
    args = parser().parse_args(argv[1:])
    assert (args.command, args.launch_kind, args.backend, args.config) == (
        "launch", "sglang-kt", "kt-a", "/etc/kimi-gateway/gateway.yaml")
    assert int(entries["TimeoutStopSec"][0]) > SglangLaunchConfig.model_fields["stop_grace_s"].default
    assert {EXIT_PROBLEMS, EXIT_CRASH_LOOP} <= {int(c) for c in entries["RestartPreventExitStatus"][0].split()}
    assert entries["KillSignal"] == ["SIGTERM"]


def test_the_gateway_unit_and_the_example_config():
    entries = unit("kimi-gateway.service")
    args = parser().parse_args(shlex.split(entries["ExecStart"][0])[1:])
    assert args.command == "serve"
    config = load_config(DEPLOY / "kimi-gateway.example.yaml")
    launch = config.backend("kt-a").launch
    assert launch.kt_method == "AMXINT8" and launch.tp == 2
