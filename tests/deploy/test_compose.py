"""deploy/compose/compose.yaml: it parses, what it names exists, and its images, ports and environment agree with the
chart and with the services' configuration dataclasses (ports read from their defaults)."""
from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml

from deploy_support import CHART, REPO, objects, render

pytestmark = pytest.mark.deploy

COMPOSE = REPO / "deploy" / "compose" / "compose.yaml"
SERVICES = ("policy", "reward", "feedback", "trainer", "rollout-worker")
VALUES_KEYS = {"policy": "policy", "reward": "reward", "feedback": "feedback", "trainer": "trainer",
               "rollout-worker": "rolloutWorker"}
CONFIGS = {
    "policy": ("rlhf.policy.config", "PolicyConfig"),
    "feedback": ("rlhf.feedback.config", "FeedbackConfig"),
    "reward": ("rlhf.reward.config", "RewardConfig"),
    "trainer": ("rlhf.trainer.config", "TrainerConfig"),
    "rollout-worker": ("rlhf.trainer.config", "RolloutWorkerConfig"),
}
PLANNED = {
    # Services whose config dataclass does not exist yet: their ports and the fields the deployment sets, as planned
    # (issue 12). Used only while the module is missing; the real dataclass replaces them when it lands.
    "reward": {"port": 50054, "metrics_port": 9104, "fields": {"model_path", "artifact_root", "device"}},
    "trainer": {"port": 50055, "metrics_port": 9105, "fields": {"dataset_path", "artifact_root"}},
    "rollout-worker": {"port": None, "metrics_port": 9106, "fields": {"reward_url", "artifact_root", "device"}},
}
PLATFORM_PLANNED = {"admin_token", "tls_cert_file", "tls_key_file", "tls_client_ca_file", "artifact_root",
                    "bus_url", "cache_url", "create_topics", "topic_partitions", "host", "auth_token"}
"""Platform-wide settings (RLHF_<FIELD>) being added to every service (TLS, admin token) or shared by them."""
ENV_PREFIXES = {"policy": "RLHF_POLICY_", "reward": "RLHF_REWARD_", "feedback": "RLHF_FEEDBACK_",
                "trainer": "RLHF_TRAINER_", "rollout-worker": "RLHF_ROLLOUT_WORKER_"}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def service_config(service: str) -> dict:
    """port, metrics_port and the field names of a service's config: from its dataclass, else the plan."""
    module_name, class_name = CONFIGS[service]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        from rlhf.serving import config as serving_config

        base = getattr(serving_config, "ServiceConfig", serving_config.ServerConfig)  # what every service shares
        planned = PLANNED[service]
        return {**planned, "fields": planned["fields"] | {f.name for f in dataclasses.fields(base)}}
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    return {"port": fields.get("port") if service != "rollout-worker" else None,
            "metrics_port": fields["metrics_port"], "fields": set(fields)}


def env_field(name: str, service: str) -> tuple[str, str]:
    """('service' or 'platform', field) of an RLHF_* variable as the config loader reads it for ``service``."""
    prefix = ENV_PREFIXES[service]
    if name.startswith(prefix):
        return "service", name.removeprefix(prefix).lower()
    other = [p for s, p in ENV_PREFIXES.items() if s != service and name.startswith(p)]
    assert not other, f"{service} is given {name}, a variable of another service"
    return "platform", name.removeprefix("RLHF_").lower()


def check_env(service: str, names: set[str], where: str) -> None:
    fields = service_config(service)["fields"]
    for name in sorted(n for n in names if n.startswith("RLHF_")):
        scope, field = env_field(name, service)
        if scope == "service":
            assert field in fields, f"{where}: {name} sets no field of the {service} config"
        else:
            assert field in fields or field in PLATFORM_PLANNED, f"{where}: {name} is no platform-wide setting"


def test_compose_parses_and_names_everything() -> None:
    spec = compose()
    assert set(spec["services"]) >= {"kafka", "redis", "prometheus", "grafana", "triton", *SERVICES}
    assert spec["services"]["triton"]["profiles"] == ["triton"]
    assert spec["services"]["kafka"]["image"].startswith("apache/kafka:")
    for name, svc in spec["services"].items():
        build = svc.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == REPO, name
            assert (context / build["dockerfile"]).is_file(), name
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"
            else:
                assert source in spec["volumes"], f"{name}: named volume {source} is not declared"
        for dependency in svc.get("depends_on", {}):
            assert dependency in spec["services"], name


def test_kafka_is_the_version_the_tests_run() -> None:
    infra = (REPO / "deploy" / "local" / "infra.py").read_text()
    version = re.search(r'^DEFAULT_KAFKA_VERSION = "([^"]+)"', infra, re.MULTILINE).group(1)
    assert compose()["services"]["kafka"]["image"] == f"apache/kafka:{version}"
    environment = compose()["services"]["kafka"]["environment"]
    assert environment["KAFKA_PROCESS_ROLES"] == "broker,controller", "KRaft, no ZooKeeper"


def test_images_agree_with_the_chart() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    spec = compose()["services"]
    for name in (*SERVICES, "demo"):
        assert spec[name]["image"] == f"{values['image']['repository']}:{app_version}-cpu", name
        assert spec[name]["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert spec[name]["build"]["args"]["VARIANT"] == "cpu"
    assert spec["triton"]["image"] == f"{values['triton']['image']['repository']}:{app_version}"
    assert spec["triton"]["build"]["dockerfile"] == "deploy/docker/triton.Dockerfile"


@pytest.mark.parametrize("service", SERVICES)
def test_ports_agree_with_the_chart_and_the_configs(helm3: Path, service: str) -> None:
    config = service_config(service)
    values = yaml.safe_load((CHART / "values.yaml").read_text())[VALUES_KEYS[service]]
    spec = compose()["services"][service]
    env = spec["environment"]
    prefix = ENV_PREFIXES[service]
    # The chart's defaults are the services' own defaults.
    assert values["ports"]["metrics"] == config["metrics_port"]
    assert env[f"{prefix}METRICS_PORT"] == str(config["metrics_port"])
    if config["port"] is not None:
        assert values["ports"]["grpc"] == config["port"]
        assert env[f"{prefix}PORT"] == str(config["port"])
        assert spec["ports"] == [f"127.0.0.1:{config['port']}:{config['port']}"]
        assert spec["healthcheck"]["test"] == ["CMD", "grpc-health", f"127.0.0.1:{config['port']}"]
    else:
        assert "ports" not in spec and "grpc" not in values["ports"]
    # Prometheus scrapes the metrics port, as the ServiceMonitor scrapes the Service's.
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "rlhf"]
    targets = {t: c["labels"]["component"] for c in job["static_configs"] for t in c["targets"]}
    assert targets[f"{service}:{config['metrics_port']}"] == service
    # And the chart renders the same ports into its ConfigMap, Service and container.
    docs = render(helm3)
    data = objects(docs, "ConfigMap")["rlhf-config"]["data"]
    assert data[f"{prefix}METRICS_PORT"] == str(config["metrics_port"])
    ports = {p["name"]: p["port"] for p in objects(docs, "Service")[f"rlhf-{service}"]["spec"]["ports"]}
    assert ports["metrics"] == config["metrics_port"]
    if config["port"] is not None:
        assert data[f"{prefix}PORT"] == str(config["port"]) and ports["grpc"] == config["port"]


@pytest.mark.parametrize("service", SERVICES)
def test_compose_environment_names_config_fields(service: str) -> None:
    env = compose()["services"][service]["environment"]
    check_env(service, set(env), f"compose {service}")
    assert env["RLHF_HOST"] == "0.0.0.0"


def chart_env(docs: list[dict], component: str) -> set[str]:
    """The environment variable names a component's container gets: its env and the ConfigMap it reads."""
    names: set[str] = set()
    configmaps = objects(docs, "ConfigMap")
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet") and \
                doc["metadata"]["labels"]["app.kubernetes.io/component"] == component:
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            names |= {e["name"] for e in container.get("env", [])}
            for source in container.get("envFrom", []):
                names |= set(configmaps[source["configMapRef"]["name"]]["data"])
    return names


@pytest.mark.parametrize("example", [None, "values-cpu.yaml", "values-gpu-triton.yaml", "values-external-tls.yaml"])
def test_chart_environment_names_config_fields(helm3: Path, example: str | None) -> None:
    args = () if example is None else ("-f", str(CHART / example))
    docs = render(helm3, *args)
    for service in SERVICES:
        names = chart_env(docs, service)
        assert {"RLHF_BUS_URL", "RLHF_CACHE_URL", "RLHF_HOST", "RLHF_ARTIFACT_ROOT"} <= names, service
        # The ConfigMap is shared: each service ignores the other services' prefixed variables.
        own = {n for n in names if not any(n.startswith(p) for s, p in ENV_PREFIXES.items() if s != service)}
        check_env(service, own, f"chart {service} ({example or 'defaults'})")


def test_chart_and_compose_point_the_rollout_worker_at_the_reward_service(helm3: Path) -> None:
    data = objects(render(helm3), "ConfigMap")["rlhf-config"]["data"]
    reward_port = service_config("reward")["port"]
    assert data["RLHF_ROLLOUT_WORKER_REWARD_URL"] == f"rlhf-reward.rlhf.svc:{reward_port}"
    assert compose()["services"]["rollout-worker"]["environment"]["RLHF_ROLLOUT_WORKER_REWARD_URL"] == \
        f"reward:{reward_port}"


def test_triton_profile_matches_the_chart(helm3: Path) -> None:
    spec = compose()["services"]
    triton = spec["triton"]
    assert triton["ports"] == ["127.0.0.1:8000:8000", "127.0.0.1:8001:8001", "127.0.0.1:8002:8002"]
    assert triton["environment"]["RLHF_MODEL_ROOT"] == spec["policy"]["environment"]["RLHF_ARTIFACT_ROOT"]
    assert spec["policy"]["environment"]["RLHF_POLICY_TRITON_URL"] == "triton:8001"
    chart = objects(render(helm3, "--set", "policy.backend=triton"), "Deployment")["rlhf-triton"]
    chart_args = chart["spec"]["template"]["spec"]["containers"][0]["args"]
    for flag in ("--model-control-mode=explicit", "--strict-readiness=false", "--grpc-port=8001"):
        assert flag in triton["command"] and flag in chart_args, flag
    assert triton["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_grafana_is_provisioned_with_our_dashboards_and_datasource() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("."))
    provider = yaml.safe_load((REPO / "deploy" / "grafana" / "provisioning" / "dashboards" / "rlhf.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts["../grafana/dashboards"] == path
    datasource = yaml.safe_load(
        (REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    prometheus = compose()["services"]["prometheus"]
    assert "../prometheus/rules:/etc/prometheus/rules:ro" in prometheus["volumes"]


def test_services_run_hardened() -> None:
    spec = compose()["services"]
    for name in SERVICES:
        svc = spec[name]
        assert svc["user"] == "10001:10001" and svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert "/tmp" in svc["tmpfs"], name
