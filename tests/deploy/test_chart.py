"""The Helm chart (helm/rlhf): lint with Helm 3 and 4, strict Kubernetes schemas, values schema, and what it renders."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

import crd_schemas
from deploy_support import (CHART, EXAMPLES, KUBE_VERSIONS, NAMESPACE, RELEASE, REPO, helm_template, objects,
                            pod_specs, render, run, tools, values_args)

pytestmark = pytest.mark.deploy

CASES = [None, *EXAMPLES]
"""Default values, then each example file."""
EXTRA_CASES = {
    # Everything optional at once on top of the defaults: monitoring objects, autoscaling, the training job, Triton.
    "all-features": ("--set", "monitoring.serviceMonitor.enabled=true", "--set", "monitoring.prometheusRule.enabled=true",
                     "--set", "monitoring.dashboards.enabled=true", "--set", "trainJob.enabled=true",
                     "--set", "policy.backend=triton", "--set", "reward.autoscaling.enabled=true",
                     "--set", "reward.autoscaling.queueDepth.enabled=true",
                     "--set", "rolloutWorker.autoscaling.enabled=true", "--set", "auth.authToken=t0ken",
                     "--set", "auth.adminToken=adm1n"),
    "minimal": ("--set", "networkPolicy.enabled=false", "--set", "tests.enabled=false",
                "--set", "artifacts.persistence.enabled=false", "--set", "serviceAccount.create=false",
                "--set", "trainer.enabled=false", "--set", "rolloutWorker.enabled=false"),
}


def case_args(case: str | None) -> tuple[str, ...]:
    return EXTRA_CASES[case] if case in EXTRA_CASES else values_args(case)


ALL_CASES = [*CASES, *EXTRA_CASES]


# --------------------------------------------------------------------------------------------- lint and schemas


@pytest.mark.parametrize("example", CASES, ids=lambda e: e or "defaults")
def test_lint_strict(helm: Path, example: str | None) -> None:
    for kube_version in KUBE_VERSIONS:
        proc = run([helm, "lint", "--strict", CHART, "--kube-version", kube_version, *values_args(example)])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda e: e or "defaults")
def test_render_passes_strict_kubernetes_schemas(helm3: Path, case: str | None, kube_version: str) -> None:
    """Every object of the render: Kubernetes kinds against the strict schemas of that version (unknown fields are
    errors); custom resources against the fields of their documented API versions (crd_schemas)."""
    docs = render(helm3, *case_args(case), kube_version=kube_version)
    assert docs
    errors = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        custom = crd_schemas.SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if custom is not None:
            errors += [f"{where}: {e.message} at {list(e.absolute_path)}"
                       for e in jsonschema.Draft202012Validator(custom).iter_errors(doc)]
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where}: {e.message} at {list(e.absolute_path)}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{where}: {e.message}")
    assert not errors, "\n".join(errors)


def test_helm3_and_helm4_render_the_same(helm3: Path, helm4: Path) -> None:
    for case in ALL_CASES:
        args = case_args(case)
        assert render(helm3, *args) == render(helm4, *args), f"helm 3 and 4 differ for {case or 'defaults'}"


def unknown_or_wrong(tmp_path: Path, name: str, values: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("values, expected", [
    ({"replicas": 2}, "replicas"),  # a top-level typo
    ({"policy": {"replicas": 2}}, "replicas"),  # a component's typo
    ({"policy": {"resources": {"limit": {"cpu": "1"}}}}, "limit"),  # inside a Kubernetes object
    ({"kafka": {"sasl": {"mechanisms": "PLAIN"}}}, "mechanisms"),  # three levels down
    ({"monitoring": {"serviceMonitor": {"enable": True}}}, "enable"),
    ({"policy": {"replicaCount": "two"}}, "replicaCount"),  # a wrong type
    ({"policy": {"backend": "vllm"}}, "backend"),  # not one of the choices
    ({"feedback": {"ports": {"grpc": 70000}}}, "grpc"),  # out of range
    ({"tls": {"enabled": "yes"}}, "enabled"),
    ({"policy": {"env": {"RLHF_POLICY_MAX_BATCH_SIZE": 32}}}, "RLHF_POLICY_MAX_BATCH_SIZE"),  # env values are strings
    ({"triton": {"tolerations": [{"key": "nvidia.com/gpu", "opertor": "Exists"}]}}, "opertor"),
])
def test_values_with_unknown_keys_or_wrong_types_are_refused(helm: Path, tmp_path: Path, values: dict,
                                                             expected: str) -> None:
    path = unknown_or_wrong(tmp_path, "bad", values)
    proc = helm_template(helm, "-f", str(path))
    assert proc.returncode != 0, f"accepted {values}"
    assert "schema" in proc.stderr.lower() and expected in proc.stderr, proc.stderr


def test_every_schema_object_is_closed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                if "additionalProperties" not in node and path != "/properties/global":
                    open_objects.append(path)
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(schema, "")
    assert not open_objects, f"objects without additionalProperties: {open_objects}"


def test_values_schema_is_generated_from_build_schema() -> None:
    proc = run([sys.executable, CHART / "schema" / "build_schema.py", "--check"])
    assert proc.returncode == 0, proc.stderr


def merged(base: dict, override: dict) -> dict:
    """Helm's merge of a values file over the defaults (maps merge, anything else replaces)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def test_every_values_file_is_valid_against_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for name in ("values.yaml", *EXAMPLES):
        values = merged(defaults, yaml.safe_load((CHART / name).read_text()))
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in jsonschema.Draft202012Validator(schema).iter_errors(values)]
        assert not errors, f"{name}: {errors}"


def test_chart_files_are_the_deploy_sources() -> None:
    assert tools.sync_chart(check=True) == [], "run: python deploy/local/tools.py sync-chart"


@pytest.mark.parametrize("values, message", [
    ({"policy": {"backend": "triton", "replicaCount": 2}}, "one Triton server serves one policy replica"),
    ({"policy": {"gpu": 1}}, "needs image.variant cuda"),
    ({"kafka": {"securityProtocol": "SASL_SSL"}}, "needs kafka.sasl.mechanism"),
    ({"tls": {"enabled": True}}, "tls.enabled needs"),
])
def test_inconsistent_values_fail_with_a_message(helm3: Path, tmp_path: Path, values: dict, message: str) -> None:
    proc = helm_template(helm3, "-f", str(unknown_or_wrong(tmp_path, "inconsistent", values)))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------- what the render holds


def test_default_render_has_every_service(helm3: Path) -> None:
    docs = render(helm3)
    assert set(objects(docs, "Deployment")) == {"rlhf-policy", "rlhf-reward", "rlhf-feedback", "rlhf-rollout-worker"}
    assert set(objects(docs, "StatefulSet")) == {"rlhf-trainer"}
    assert "rlhf-triton" not in objects(docs, "Deployment"), "Triton only with policy.backend=triton"
    trainer = objects(docs, "StatefulSet")["rlhf-trainer"]
    assert trainer["spec"]["replicas"] == 1
    (claim,) = trainer["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in trainer["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/rlhf"
    config = objects(docs, "ConfigMap")["rlhf-config"]["data"]
    assert config["RLHF_TRAINER_DATASET_PATH"].startswith("/var/lib/rlhf/")
    artifacts = objects(docs, "PersistentVolumeClaim")["rlhf-artifacts"]
    assert artifacts["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("rlhf-policy", "rlhf-reward", "rlhf-rollout-worker"):
        volumes = objects(docs, "Deployment")[name]["spec"]["template"]["spec"]["volumes"]
        assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "rlhf-artifacts"}} in volumes, name


def test_long_release_names_give_valid_object_names(helm3: Path) -> None:
    release = "a-very-long-release-name-for-the-platform-xyz"
    proc = run([helm3, "template", release, CHART, "--namespace", "ml", "--kube-version", KUBE_VERSIONS[0],
                *values_args("values-gpu-triton.yaml")])
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        if doc["kind"] == "StatefulSet":
            assert len(name) <= 52, f"{name}: the revision-hash label of its pods would pass 63 characters"
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config"))
    host = config["data"]["RLHF_POLICY_TRITON_URL"].split(":")[0]
    assert host in {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}


def test_existing_artifact_claim_is_used(helm3: Path) -> None:
    docs = render(helm3, "--set", "artifacts.persistence.existingClaim=models")
    assert "rlhf-artifacts" not in objects(docs, "PersistentVolumeClaim")
    volumes = objects(docs, "Deployment")["rlhf-policy"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "models"}} in volumes


@pytest.mark.parametrize("args", [("--set", "policy.backend=triton"), values_args("values-gpu-triton.yaml")],
                         ids=["set-backend", "gpu-example"])
def test_triton_backend_renders_a_gpu_triton_the_policy_points_at(helm3: Path, args: tuple[str, ...]) -> None:
    docs = render(helm3, *args)
    triton = objects(docs, "Deployment")["rlhf-triton"]
    (container,) = triton["spec"]["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert "--model-control-mode=explicit" in container["args"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RLHF_MODEL_ROOT"] == "/artifacts"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["artifacts"] == "/artifacts" and mounts["shm"] == "/dev/shm"
    service = objects(docs, "Service")["rlhf-triton"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    # The policy service points at it.
    config = objects(docs, "ConfigMap")["rlhf-config"]["data"]
    assert config["RLHF_POLICY_BACKEND"] == "triton"
    assert config["RLHF_POLICY_TRITON_URL"] == "rlhf-triton:8001"
    policy = objects(docs, "Deployment")["rlhf-policy"]
    assert policy["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [{"configMapRef": {"name": "rlhf-config"}}]
    # and may reach it.
    netpol = objects(docs, "NetworkPolicy")
    egress_ports = {p["port"] for rule in netpol["rlhf-policy"]["spec"]["egress"] for p in rule.get("ports", [])
                    if any(peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "triton"
                           for peer in rule.get("to", []))}
    assert 8001 in egress_ports
    ingress = netpol["rlhf-triton"]["spec"]["ingress"][0]
    assert ingress["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "policy"


def test_hardened_pods(helm3: Path) -> None:
    for case in ALL_CASES:
        for owner, spec in pod_specs(render(helm3, *case_args(case))):
            where = f"{case or 'defaults'}: {owner}"
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert spec["automountServiceAccountToken"] is False, where
            assert spec["enableServiceLinks"] is False, where
            tmp = [v for v in spec["volumes"] if v["name"] == "tmp"]
            assert tmp and "emptyDir" in tmp[0], where
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, where
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["capabilities"] == {"drop": ["ALL"]}, where
                assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], where


def test_every_container_has_requests_and_limits(helm3: Path) -> None:
    for case in ALL_CASES:
        docs = render(helm3, *case_args(case))
        for owner, spec in pod_specs(docs):
            for c in spec["containers"]:
                res = c.get("resources", {})
                if owner.startswith("TrainingRuntime"):
                    continue  # the TrainJob's resourcesPerNode (checked below) set them
                assert res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory"), (case, owner)
                assert res.get("limits", {}).get("cpu") and res.get("limits", {}).get("memory"), (case, owner)
        for job in objects(docs, "TrainJob").values():
            res = job["spec"]["trainer"]["resourcesPerNode"]
            assert res["requests"] and res["limits"], case


def test_every_values_example_sets_resources() -> None:
    for name in EXAMPLES:
        values = yaml.safe_load((CHART / name).read_text())
        for key in ("policy", "reward", "feedback", "trainer", "rolloutWorker", "tests"):
            assert values[key]["resources"]["requests"] and values[key]["resources"]["limits"], (name, key)
        if values["policy"].get("backend") == "triton":
            assert values["triton"]["resources"]["limits"], name


def test_standard_labels_everywhere(helm3: Path) -> None:
    wanted = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
              "app.kubernetes.io/managed-by", "app.kubernetes.io/part-of", "app.kubernetes.io/component",
              "helm.sh/chart"}
    for case in ALL_CASES:
        for doc in render(helm3, *case_args(case)):
            missing = wanted - set(doc["metadata"].get("labels", {}))
            assert not missing, f"{case}: {doc['kind']}/{doc['metadata']['name']} lacks {missing}"
            assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


GRPC_WORKLOADS = {"policy": 50052, "reward": 50054, "feedback": 50053, "trainer": 50055}


def containers_by_component(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
            out[component] = doc["spec"]["template"]["spec"]["containers"][0]
    return out


def test_native_grpc_probes_and_a_startup_probe(helm3: Path) -> None:
    containers = containers_by_component(render(helm3))
    for component, port in GRPC_WORKLOADS.items():
        c = containers[component]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port, "service": ""}, (component, probe)
        # Sized for model loading: the startup budget is minutes, readiness reacts in seconds.
        startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
        assert startup >= 120, component
        assert c["readinessProbe"]["periodSeconds"] * c["readinessProbe"]["failureThreshold"] <= 30, component
    for component in ("policy", "reward", "trainer"):
        c = containers[component]
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600, component
    worker = containers["rollout-worker"]
    assert worker["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}


def test_with_tls_the_probes_check_health_over_tls(helm3: Path) -> None:
    docs = render(helm3, *values_args("values-external-tls.yaml"))
    containers = containers_by_component(docs)
    for component, port in GRPC_WORKLOADS.items():
        c = containers[component]
        command = c["readinessProbe"]["exec"]["command"]
        assert command[:2] == ["grpc-health", "--tls"] and command[-1] == f"127.0.0.1:{port}", command
        assert "--cert" in command, "requireClientCert: the probe presents the pod's certificate"
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["RLHF_TLS_CERT_FILE"] == "/etc/rlhf/tls/tls.crt"
        assert env["RLHF_TLS_CLIENT_CA_FILE"] == "/etc/rlhf/tls/ca.crt"
        assert {"name": "tls", "mountPath": "/etc/rlhf/tls", "readOnly": True} in c["volumeMounts"]
    test_job = objects(docs, "Job")["rlhf-test-health"]
    assert "--tls" in test_job["spec"]["template"]["spec"]["containers"][0]["command"]


def test_external_kafka_and_redis_with_secrets(helm3: Path) -> None:
    docs = render(helm3, *values_args("values-external-tls.yaml"))
    env = containers_by_component(docs)["feedback"]["env"]
    by_name = {e["name"]: e for e in env}
    names = [e["name"] for e in env]
    # The URLs refer to secrets defined before them in the list (Kubernetes expands $(VAR) of earlier variables).
    assert names.index("KAFKA_SASL_PASSWORD") < names.index("RLHF_BUS_URL")
    assert names.index("REDIS_PASSWORD") < names.index("RLHF_CACHE_URL")
    assert by_name["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "rlhf-kafka-sasl", "key": "password"}
    bus = by_name["RLHF_BUS_URL"]["value"]
    assert bus.startswith("kafka://b-1.kafka.example.internal:9096,b-2.")
    assert "security_protocol=SASL_SSL" in bus and "sasl_mechanism=SCRAM-SHA-512" in bus
    assert "sasl_password=$(KAFKA_SASL_PASSWORD)" in bus and "ssl_cafile=/etc/rlhf/kafka-ca/ca.crt" in bus
    cache = by_name["RLHF_CACHE_URL"]["value"]
    assert cache == "rediss://:$(REDIS_PASSWORD)@master.redis.example.internal:6380/0?ssl_ca_certs=/etc/rlhf/redis-ca/ca.crt"
    assert by_name["RLHF_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "rlhf-tokens"
    assert by_name["RLHF_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "rlhf-tokens"
    assert "Secret" not in {d["kind"] for d in docs}, "existing secrets are named, none is made"
    # The bus URL parses as the services parse it.
    from rlhf.bus.kafka import KafkaConfig

    parsed = KafkaConfig.from_url(bus.replace("$(KAFKA_SASL_USERNAME)", "u").replace("$(KAFKA_SASL_PASSWORD)", "p"))
    assert parsed.security_protocol == "SASL_SSL" and parsed.sasl_username == "u" and parsed.ssl_check_hostname is True


def test_tokens_given_as_values_go_into_a_secret(helm3: Path) -> None:
    docs = render(helm3, *EXTRA_CASES["all-features"])
    secret = objects(docs, "Secret")["rlhf-auth"]
    assert set(secret["data"]) == {"auth-token", "admin-token"}
    env = {e["name"]: e for e in containers_by_component(docs)["policy"]["env"]}
    assert env["RLHF_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "rlhf-auth", "key": "auth-token", "optional": True}
    assert "RLHF_AUTH_TOKEN" not in {e["name"] for e in containers_by_component(render(helm3))["policy"]["env"]}


def test_services_have_named_grpc_and_metrics_ports(helm3: Path) -> None:
    docs = render(helm3)
    services = objects(docs, "Service")
    containers = containers_by_component(docs)
    for component, grpc_port in GRPC_WORKLOADS.items():
        ports = {p["name"]: p for p in services[f"rlhf-{component}"]["spec"]["ports"]}
        assert ports["grpc"]["port"] == grpc_port and ports["grpc"]["targetPort"] == "grpc"
        assert ports["grpc"]["appProtocol"] == "grpc"
        assert ports["metrics"]["targetPort"] == "metrics"
        container_ports = {p["name"]: p["containerPort"] for p in containers[component]["ports"]}
        assert container_ports == {"grpc": grpc_port, "metrics": ports["metrics"]["port"]}
    assert {p["name"] for p in services["rlhf-rollout-worker"]["spec"]["ports"]} == {"metrics"}


def test_network_policies_deny_by_default(helm3: Path) -> None:
    docs = render(helm3)
    netpols = objects(docs, "NetworkPolicy")
    deny = netpols["rlhf-default-deny"]["spec"]
    assert deny == {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "rlhf", "app.kubernetes.io/instance": "rlhf"}},
                    "policyTypes": ["Ingress", "Egress"]}
    # Every pod is covered by the deny policy and by a policy of its own.
    for owner, spec in pod_specs(docs):
        doc = next(d for d in docs if f"{d['kind']}/{d['metadata']['name']}" == owner)
        labels = doc["spec"]["template"]["metadata"]["labels"]
        own = [n for n, p in netpols.items()
               if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == labels["app.kubernetes.io/component"]]
        assert own, owner
    # Who may call the reward service: rollout workers, the trainer, `helm test`; not product clients.
    peers = netpols["rlhf-reward"]["spec"]["ingress"][0]["from"]
    components = {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in peers if "podSelector" in p}
    assert components == {"rollout-worker", "trainer", "test"}
    assert all("namespaceSelector" not in p for p in peers)
    # Egress to Kafka uses the ports of kafka.bootstrapServers.
    gpu = objects(render(helm3, *values_args("values-external-tls.yaml")), "NetworkPolicy")
    kafka_rule = gpu["rlhf-feedback"]["spec"]["egress"][0]
    assert kafka_rule["ports"] == [{"port": 9096, "protocol": "TCP"}]
    assert kafka_rule["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]


def test_a_policy_with_no_peers_admits_nobody(helm3: Path) -> None:
    """An empty `from` admits every source: with no clients, no test Job and no Prometheus, the rule is left out."""
    docs = render(helm3, "--set-json", "networkPolicy.clients=[]", "--set-json", "networkPolicy.prometheus=[]",
                  "--set", "tests.enabled=false")
    feedback = objects(docs, "NetworkPolicy")["rlhf-feedback"]["spec"]
    assert "ingress" not in feedback and "Ingress" in feedback["policyTypes"]
    for name, policy in objects(docs, "NetworkPolicy").items():
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{name}: an ingress rule without peers admits everyone"


def test_autoscalers_and_disruption_budgets(helm3: Path) -> None:
    docs = render(helm3, *values_args("values-gpu-triton.yaml"))
    deployments = objects(docs, "Deployment")
    hpas = objects(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"rlhf-reward", "rlhf-rollout-worker"}
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert "replicas" not in deployments[name]["spec"], "an autoscaled Deployment leaves replicas to the HPA"
    metrics = hpas["rlhf-reward"]["spec"]["metrics"]
    assert metrics[0]["resource"]["name"] == "cpu"
    assert metrics[1] == {"type": "Pods", "pods": {"metric": {"name": "rlhf_reward_queue_depth"},
                                                   "target": {"type": "AverageValue", "averageValue": "128"}}}
    for name, pdb in objects(docs, "PodDisruptionBudget").items():
        selector = pdb["spec"]["selector"]["matchLabels"]
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items(), name
    # Every HPA-capable service scales on its queue when asked.
    all_docs = render(helm3, *EXTRA_CASES["all-features"])
    assert set(objects(all_docs, "HorizontalPodAutoscaler")) == {"rlhf-reward", "rlhf-rollout-worker"}


def test_service_account_mounts_no_token(helm3: Path) -> None:
    (sa,) = objects(render(helm3), "ServiceAccount").values()
    assert sa["automountServiceAccountToken"] is False


def test_helm_test_job_checks_every_grpc_service(helm3: Path) -> None:
    docs = render(helm3)
    job = objects(docs, "Job")["rlhf-test-health"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    addresses = [a for a in container["command"] if re.match(r"^[a-z0-9.-]+:\d+$", a)]
    assert sorted(addresses) == sorted(f"rlhf-{c}.{NAMESPACE}.svc:{p}" for c, p in GRPC_WORKLOADS.items())
    assert container["command"][0] == "grpc-health"


def test_monitoring_objects_behind_flags(helm3: Path) -> None:
    assert not {"ServiceMonitor", "PrometheusRule"} & {d["kind"] for d in render(helm3)}
    docs = render(helm3, *values_args("values-gpu-triton.yaml"))
    (monitor,) = objects(docs, "ServiceMonitor").values()
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/part-of"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    # Every Service with a metrics port is selected (the trainer's headless one has none).
    selected = set(monitor["spec"]["selector"]["matchExpressions"][0]["values"])
    for service in objects(docs, "Service").values():
        has_metrics = any(p["name"] == "metrics" for p in service["spec"]["ports"])
        assert (service["metadata"]["labels"]["app.kubernetes.io/component"] in selected) == has_metrics or \
            service["metadata"]["name"].endswith("-headless")
        assert service["metadata"]["labels"]["app.kubernetes.io/part-of"] == "rlhf"


def test_prometheus_rule_is_the_rule_files(helm3: Path) -> None:
    docs = render(helm3, *values_args("values-gpu-triton.yaml"), "--set",
                  "monitoring.runbookBaseUrl=https://runbooks.example.org/rlhf.md")
    (rule,) = objects(docs, "PrometheusRule").values()
    expected = []
    for path in sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml")):
        expected += yaml.safe_load(path.read_text())["groups"]
    got = rule["spec"]["groups"]
    assert [g["name"] for g in got] == [g["name"] for g in expected]
    for g_got, g_exp in zip(got, expected):
        for r_got, r_exp in zip(g_got["rules"], g_exp["rules"], strict=True):
            assert r_got["expr"] == r_exp["expr"] and r_got["alert"] == r_exp["alert"]
            assert r_got["labels"] == {**r_exp["labels"], "team": "ml-platform"}
            anchor = r_exp["annotations"]["runbook_url"].split("#", 1)[1]
            assert r_got["annotations"]["runbook_url"] == f"https://runbooks.example.org/rlhf.md#{anchor}"
            assert r_got["annotations"]["summary"] == r_exp["annotations"]["summary"]


def test_prometheus_rule_groups_pass_promtool(helm3: Path, promtool: Path, tmp_path: Path) -> None:
    (rule,) = objects(render(helm3, *values_args("values-gpu-triton.yaml")), "PrometheusRule").values()
    path = tmp_path / "rendered-rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = run([promtool, "check", "rules", path])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboards_ship_as_labelled_config_maps(helm3: Path) -> None:
    sources = {p.name: p.read_text() for p in (REPO / "deploy" / "grafana" / "dashboards").glob("*.json")}
    assert set(sources) == {"serving.json", "feedback.json", "reward.json", "training.json"}
    docs = render(helm3, "--set", "monitoring.dashboards.enabled=true")
    maps = [d for d in docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    assert {name for m in maps for name in m["data"]} == set(sources)
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = m["data"].items()
        assert json.loads(text) == json.loads(sources[name])
    custom = render(helm3, "--set", "monitoring.dashboards.enabled=true", "--set", "monitoring.dashboards.label=dash",
                    "--set", "monitoring.dashboards.labelValue=rlhf", "--set", "monitoring.dashboards.namespace=grafana")
    maps = [d for d in custom if d["kind"] == "ConfigMap" and "dash" in d["metadata"]["labels"]]
    assert len(maps) == len(sources) and all(m["metadata"]["labels"]["dash"] == "rlhf" for m in maps)
    assert all(m["metadata"]["namespace"] == "grafana" for m in maps)


def test_train_job_runs_torchrun_on_the_chart_runtime(helm3: Path) -> None:
    docs = render(helm3, *values_args("values-gpu-triton.yaml"))
    (job,) = objects(docs, "TrainJob").values()
    (runtime,) = objects(docs, "TrainingRuntime").values()
    assert job["metadata"]["name"] == "sft-run-1"
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": runtime["metadata"]["name"]}
    assert job["spec"]["trainer"]["numNodes"] == 2 and job["spec"]["trainer"]["numProcPerNode"] == 8
    assert job["spec"]["trainer"]["args"][:2] == ["--data", "/artifacts/data/demonstrations.jsonl"]
    (replicated,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    # The Trainer's torch plugin configures the job and container named `node` of the ancestor step `trainer`.
    assert replicated["name"] == "node"
    assert replicated["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    (container,) = replicated["template"]["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "node"
    assert container["command"] == ["torchrun", "--module", "rlhf", "sft"]
    # The pod template is a batch/v1 JobTemplateSpec: Kubernetes' strict schemas check it, and the trainer env.
    for kube_version in KUBE_VERSIONS:
        kubernetes_validate.validate(crd_schemas.job_from_replicated_job(runtime, replicated), kube_version, strict=True)
        kubernetes_validate.validate(crd_schemas.pod_env_holder(job["spec"]["trainer"]["env"],
                                                                job["spec"]["trainer"]["resourcesPerNode"]),
                                     kube_version, strict=True)


def test_custom_resource_schemas_catch_unknown_fields() -> None:
    """The closed schemas are not vacuous: a field outside the API version is an error."""
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"},
               "spec": {"selector": {}, "endpoints": [{"port": "metrics", "intervall": "15s"}]}}
    assert list(jsonschema.Draft202012Validator(crd_schemas.SERVICE_MONITOR).iter_errors(monitor))
    job = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": {"name": "x"},
           "spec": {"runtimeRef": {"name": "r"}, "podSpecOverrides": []}}
    assert list(jsonschema.Draft202012Validator(crd_schemas.TRAIN_JOB).iter_errors(job))


def test_notes_render(helm3: Path, tmp_path: Path) -> None:
    """NOTES.txt renders for every case (`helm template` skips NOTES: a copy of the chart wraps it in a ConfigMap)."""
    chart = tmp_path / "rlhf"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n"
        '{{ include (print $.Template.BasePath "/NOTES.txt") . | indent 4 }}\n'
    )
    for case in ALL_CASES:
        proc = run([helm3, "template", RELEASE, chart, "--namespace", NAMESPACE, "--show-only",
                    "templates/zz-notes.yaml", *case_args(case)])
        assert proc.returncode == 0, proc.stderr
        notes = yaml.safe_load(proc.stdout)["data"]["notes"]
        assert f"helm test {RELEASE} -n {NAMESPACE}" in notes
        if "policy.enabled=false" not in case_args(case):
            assert f"rlhf-policy.{NAMESPACE}.svc:50052" in notes
        if case == "values-external-tls.yaml":
            assert "-cacert ca.crt -cert client.crt" in notes and "WARNING" not in notes
        if case is None:
            assert "WARNING: no product token" in notes
