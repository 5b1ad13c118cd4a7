"""deploy/helm/kimi-gateway rendered with Helm's own template engine (helm-python-sdk binds Helm's Go SDK;
no helm binary or cluster needed), then checked against the code: the ConfigMap's config loads as a
GatewayConfig, the container port is its listen port, the probes hit the app's health routes, every `*_env`
name in the config is set from a Secret, and stopping outlasts the longest stream."""
from pathlib import Path

import pytest
import yaml

from gateway.api.health import router as health_router
from gateway.config import GatewayConfig

try:
    import helm_python
except ImportError:  # a missing tool fails, with how to get it
    pytest.fail("helm-python-sdk is needed to render the Helm chart: pip install 'helm-python-sdk==0.2.2' "
                "(it is in the test extras)", pytrace=False)

CHART = Path(__file__).parents[3] / "deploy" / "helm" / "kimi-gateway"


def render(values: dict | None = None) -> dict[str, dict]:
    """kind -> the rendered object, with the chart's default values (plus `values`)."""
    with helm_python.Chart.load(str(CHART)) if hasattr(helm_python.Chart, "load") else helm_python.Chart(str(CHART)) as chart:
        manifests = chart.render(values, name="kg", namespace="prod")
    objects = [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]
    return {obj["kind"]: obj for obj in objects}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict]:
    return render()


def gateway_config(rendered) -> GatewayConfig:
    return GatewayConfig.model_validate(yaml.safe_load(rendered["ConfigMap"]["data"]["gateway.yaml"]))


def container(rendered) -> dict:
    [gateway] = rendered["Deployment"]["spec"]["template"]["spec"]["containers"]
    return gateway


def env_names(config: GatewayConfig) -> set[str]:
    """Every environment-variable name the config refers to (the `*_env` keys), at any depth."""
    names = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_env") and isinstance(value, str):
                    names.add(value)
                walk(value)
        elif isinstance(node, (list, tuple)):
            for item in node:
                walk(item)
    walk(config.model_dump())
    return names


def test_every_object_is_there(rendered):
    assert set(rendered) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}


def test_the_config_map_holds_a_valid_strict_config(rendered):
    config = gateway_config(rendered)
    assert [b.name for b in config.backends] == ["kt-a", "gguf", "moonshot"]
    mounts = {m["name"]: m["mountPath"] for m in container(rendered)["volumeMounts"]}
    assert mounts["config"] == "/etc/kimi-gateway" and container(rendered)["args"] == [
        "serve", "--config", "/etc/kimi-gateway/gateway.yaml"]
    assert mounts["state"] == config.state_dir


def test_ports_agree_with_the_config_listen_port(rendered):
    config = gateway_config(rendered)
    [port] = container(rendered)["ports"]
    assert port == {"name": "http", "containerPort": config.listen.port}
    [service_port] = rendered["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == "http"


def test_probes_hit_the_app_health_routes(rendered):
    routes = {route.path for route in health_router.routes}
    gateway = container(rendered)
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert {gateway[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe", "startupProbe")} <= routes


def test_every_secret_env_name_in_the_config_is_set_from_a_secret(rendered):
    config = gateway_config(rendered)
    env = {e["name"]: e for e in container(rendered)["env"]}
    assert env_names(config) == {"KIMI_GATEWAY_ADMIN_KEYS", "MOONSHOT_API_KEY"}
    for name in env_names(config):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert not [e for e in env.values() if "value" in e]   # no secret value in the chart


def test_stopping_drains_longer_than_the_longest_stream(rendered):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    spec = rendered["Deployment"]["spec"]["template"]["spec"]
    [gateway] = spec["containers"]
    assert gateway["lifecycle"]["preStop"]["exec"]["command"][-1] == f"sleep {values['preStopSleepSeconds']}"
    assert spec["terminationGracePeriodSeconds"] > values["preStopSleepSeconds"] + values["longestStreamSeconds"]
    first_byte_s = gateway_config(rendered).backends[0].timeouts.first_byte_s
    assert values["longestStreamSeconds"] >= first_byte_s


def test_a_grace_period_shorter_than_a_stream_does_not_render():
    with pytest.raises(helm_python.HelmError, match="terminationGracePeriodSeconds must be longer"):
        render({"terminationGracePeriodSeconds": 300})


def test_several_replicas_a_budget_and_an_autoscaler(rendered):
    hpa, pdb = rendered["HorizontalPodAutoscaler"]["spec"], rendered["PodDisruptionBudget"]["spec"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert hpa["scaleTargetRef"]["name"] == rendered["Deployment"]["metadata"]["name"]
    assert pdb["maxUnavailable"] < hpa["minReplicas"]
    assert pdb["selector"]["matchLabels"] == rendered["Deployment"]["spec"]["selector"]["matchLabels"]


def test_without_autoscaling_the_deployment_sets_replicas():
    objects = render({"autoscaling": {"enabled": False}, "replicaCount": 4})
    assert objects["Deployment"]["spec"]["replicas"] == 4 and "HorizontalPodAutoscaler" not in objects


def test_the_pod_runs_as_non_root(rendered):
    spec = rendered["Deployment"]["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert container(rendered)["securityContext"]["allowPrivilegeEscalation"] is False


def test_helm_lint_is_clean():
    report = helm_python.lint(str(CHART), strict=True)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] > 1] == []
