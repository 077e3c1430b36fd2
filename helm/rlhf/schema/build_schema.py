#!/usr/bin/env python3
"""Writes helm/rlhf/values.schema.json, the schema Helm checks every values file against (install, upgrade,
template, lint).

    python helm/rlhf/schema/build_schema.py          write it
    python helm/rlhf/schema/build_schema.py --check  exit 1 when the committed file differs (a test runs this)

Every object is closed (``additionalProperties: false``): an unknown key anywhere is refused, as is a wrong type.
Values that are Kubernetes objects (resources, affinity, tolerations, security contexts, NetworkPolicy peers, ...)
are checked against Kubernetes' own definitions, copied without their descriptions from the strict 1.31 schemas that
PyPI ``kubernetes-validate`` bundles (closed objects too). Maps whose keys are free (labels, annotations, env) are
checked for their value type.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parents[1]
OUT = CHART / "values.schema.json"
K8S_VERSION = "1.31.0"

J = dict[str, Any]


# --------------------------------------------------------------------------------------------- building blocks


def obj(properties: J, required: list[str] | None = None, description: str | None = None) -> J:
    out: J = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = required
    if description:
        out["description"] = description
    return out


def string(**kw: Any) -> J:
    return {"type": "string", **kw}


def integer(minimum: int | None = None, maximum: int | None = None) -> J:
    out: J = {"type": "integer"}
    if minimum is not None:
        out["minimum"] = minimum
    if maximum is not None:
        out["maximum"] = maximum
    return out


def boolean() -> J:
    return {"type": "boolean"}


def enum(*values: str) -> J:
    return {"type": "string", "enum": list(values)}


def string_map(key_pattern: str | None = None) -> J:
    out: J = {"type": "object", "additionalProperties": {"type": "string"}}
    if key_pattern:
        out["propertyNames"] = {"pattern": key_pattern}
    return out


def k8s(name: str) -> J:
    return {"$ref": f"#/$defs/io.k8s.api.{name}"}


def array(items: J) -> J:
    return {"type": "array", "items": items}


PORT = integer(1, 65535)
DURATION = string(pattern=r"^([0-9]+(ms|s|m|h))+$")
QUANTITY = {"$ref": "#/$defs/io.k8s.apimachinery.pkg.api.resource.Quantity"}
ENV = string_map(r"^[A-Za-z_][A-Za-z0-9_]*$")
LABELS = string_map()


def probe(with_type: bool) -> J:
    props: J = {
        "initialDelaySeconds": integer(0),
        "periodSeconds": integer(1),
        "timeoutSeconds": integer(1),
        "failureThreshold": integer(1),
    }
    if with_type:
        props["type"] = {**enum("grpc", "tcp"), "description": "grpc: grpc.health.v1 (native probe); tcp: the port accepts connections"}
    return obj(props, required=["periodSeconds", "timeoutSeconds", "failureThreshold"])


def placement() -> J:
    return {
        "nodeSelector": LABELS,
        "tolerations": array(k8s("core.v1.Toleration")),
        "affinity": k8s("core.v1.Affinity"),
    }


def pod_extras() -> J:
    return {"podAnnotations": LABELS, "podLabels": LABELS, "terminationGracePeriodSeconds": integer(0)}


SERVICE = obj({"type": enum("ClusterIP", "NodePort", "LoadBalancer"), "annotations": LABELS})
PDB = obj({"enabled": boolean(), "maxUnavailable": {"oneOf": [integer(0), string(pattern=r"^[0-9]+%$")]}})


def autoscaling(metric_required: bool) -> J:
    return obj({
        "enabled": boolean(),
        "minReplicas": integer(1),
        "maxReplicas": integer(1),
        "targetCPUUtilizationPercentage": integer(1, 100),
        "queueDepth": obj({
            "enabled": boolean(),
            "metric": string(pattern=r"^$|^[a-zA-Z_:][a-zA-Z0-9_:]*$") if not metric_required else string(minLength=1),
            "averageValue": QUANTITY,
        }),
    })


def ports(*names: str) -> J:
    return obj({n: PORT for n in names}, required=list(names))


def service_component(*, grpc: bool, model: bool, replicas: bool, hpa: bool, gpu: bool, extra: J | None = None) -> J:
    props: J = {
        "enabled": boolean(),
        "ports": ports("grpc", "metrics") if grpc else ports("metrics"),
        "env": ENV,
        "resources": k8s("core.v1.ResourceRequirements"),
        "startupProbe": probe(False),
        "readinessProbe": probe(False),
        "livenessProbe": probe(grpc),
        **pod_extras(),
        **placement(),
    }
    if grpc:
        props["service"] = SERVICE
    if replicas:
        props["replicaCount"] = integer(0)
        props["pdb"] = PDB
        props["topologySpreadConstraints"] = array(k8s("core.v1.TopologySpreadConstraint"))
    if hpa:
        props["autoscaling"] = autoscaling(False)
    if model:
        props["modelPath"] = string(description="save_pretrained folder, relative to the artifact volume")
    if gpu:
        props["device"] = string(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
        props["gpu"] = integer(0)
    props.update(extra or {})
    return obj(props)


def secret_name() -> J:
    return string(pattern=r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


PEERS = array(k8s("networking.v1.NetworkPolicyPeer"))


# --------------------------------------------------------------------------------------------- the values


def values_schema() -> J:
    return obj({
        "nameOverride": string(),
        "fullnameOverride": string(),
        "commonLabels": LABELS,
        "image": obj({
            "repository": string(minLength=1),
            "tag": string(),
            "variant": enum("cpu", "cuda"),
            "pullPolicy": enum("Always", "IfNotPresent", "Never"),
        }, required=["repository", "variant"]),
        "imagePullSecrets": array(k8s("core.v1.LocalObjectReference")),
        "serviceAccount": obj({
            "create": boolean(), "name": string(), "annotations": LABELS, "automountServiceAccountToken": boolean(),
        }),
        "podSecurityContext": k8s("core.v1.PodSecurityContext"),
        "securityContext": k8s("core.v1.SecurityContext"),
        "tmpDir": obj({"sizeLimit": QUANTITY}),
        "config": obj({"createTopics": boolean(), "topicPartitions": integer(1), "env": ENV}),
        "kafka": obj({
            "bootstrapServers": string(pattern=r"^\s*[^,:\s]+:[0-9]+(\s*,\s*[^,:\s]+:[0-9]+)*\s*$"),
            "securityProtocol": enum("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
            "sasl": obj({
                "mechanism": enum("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
                "existingSecret": secret_name(), "usernameKey": string(), "passwordKey": string(),
            }),
            "tls": obj({
                "caSecret": secret_name(), "caKey": string(minLength=1), "clientCertSecret": secret_name(),
                "checkHostname": boolean(),
            }),
            "options": string_map(r"^[a-z_]+$"),
        }, required=["bootstrapServers"]),
        "redis": obj({
            "host": string(minLength=1),
            "port": PORT,
            "db": integer(0),
            "tls": obj({"enabled": boolean(), "caSecret": secret_name(), "caKey": string(minLength=1)}),
            "auth": obj({"existingSecret": secret_name(), "usernameKey": string(), "passwordKey": string()}),
            "options": string_map(r"^[a-z_]+$"),
        }, required=["host", "port"]),
        "auth": obj({
            "existingSecret": secret_name(), "authTokenKey": string(minLength=1), "adminTokenKey": string(minLength=1),
            "authToken": string(), "adminToken": string(),
        }),
        "tls": obj({
            "enabled": boolean(), "existingSecret": secret_name(), "cert": string(), "key": string(), "ca": string(),
            "requireClientCert": boolean(), "serverName": string(),
        }),
        "artifacts": obj({
            "mountPath": string(pattern=r"^/"),
            "persistence": obj({
                "enabled": boolean(), "existingClaim": secret_name(),
                "accessModes": array(enum("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")),
                "size": QUANTITY, "storageClassName": string(), "keep": boolean(), "annotations": LABELS,
            }),
        }),
        "policy": service_component(grpc=True, model=True, replicas=True, hpa=True, gpu=True,
                                    extra={"backend": enum("torch", "triton")}),
        "reward": service_component(grpc=True, model=True, replicas=True, hpa=True, gpu=True),
        "feedback": service_component(grpc=True, model=False, replicas=True, hpa=False, gpu=False),
        "trainer": service_component(grpc=True, model=False, replicas=False, hpa=False, gpu=False, extra={
            "gpu": integer(0),
            "dataPath": string(pattern=r"^/"),
            "persistence": obj({
                "accessModes": array(enum("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod")),
                "size": QUANTITY, "storageClassName": string(),
            }),
        }),
        "rolloutWorker": service_component(grpc=False, model=False, replicas=True, hpa=True, gpu=True),
        "triton": obj({
            "image": obj({
                "repository": string(minLength=1), "tag": string(),
                "pullPolicy": enum("Always", "IfNotPresent", "Never"),
            }),
            "gpu": integer(0),
            "modelRepository": string(pattern=r"^/"),
            "extraArgs": array(string(pattern=r"^--")),
            "ports": ports("http", "grpc", "metrics"),
            "shmSize": QUANTITY,
            "resources": k8s("core.v1.ResourceRequirements"),
            "startupProbe": probe(False),
            "readinessProbe": probe(False),
            "livenessProbe": probe(False),
            "service": SERVICE,
            **pod_extras(),
            **placement(),
        }),
        "trainJob": obj({
            "enabled": boolean(),
            "name": string(pattern=r"^$|^[a-z]([-a-z0-9]*[a-z0-9])?$", maxLength=63),
            "stage": enum("sft", "rm", "ppo"),
            "args": array(string()),
            "numNodes": integer(1),
            "numProcPerNode": integer(1),
            "resourcesPerNode": k8s("core.v1.ResourceRequirements"),
            "env": ENV,
            **placement(),
        }),
        "monitoring": obj({
            "runbookBaseUrl": string(pattern=r"^https?://"),
            "serviceMonitor": obj({
                "enabled": boolean(), "namespace": string(), "labels": LABELS,
                "interval": DURATION, "scrapeTimeout": DURATION,
            }),
            "prometheusRule": obj({
                "enabled": boolean(), "namespace": string(), "labels": LABELS, "additionalRuleLabels": LABELS,
            }),
            "dashboards": obj({
                "enabled": boolean(), "namespace": string(), "label": string(minLength=1),
                "labelValue": string(), "labels": LABELS, "annotations": LABELS,
            }),
        }),
        "networkPolicy": obj({
            "enabled": boolean(),
            "clients": PEERS,
            "adminClients": PEERS,
            "prometheus": PEERS,
            "dns": obj({"to": PEERS, "ports": array(k8s("networking.v1.NetworkPolicyPort"))}),
            "kafkaPeers": PEERS,
            "redisPeers": PEERS,
            "extraEgress": array(k8s("networking.v1.NetworkPolicyEgressRule")),
        }),
        "tests": obj({
            "enabled": boolean(), "waitSeconds": integer(1), "resources": k8s("core.v1.ResourceRequirements"),
        }),
        # Helm passes `global` to every chart (subcharts included); accept it but nothing in it is read.
        "global": {"type": "object"},
    })


# --------------------------------------------------------------------------------------------- Kubernetes definitions


def k8s_definitions() -> J:
    import importlib.resources

    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
    return json.loads((root / "_definitions.json").read_text())["$defs"]


def strip(node: Any) -> Any:
    """Drop descriptions and Kubernetes' extension keywords (Helm's validator does not need them)."""
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description" and not k.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            found.add(ref.removeprefix("#/$defs/"))
        for v in node.values():
            found |= refs(v)
    elif isinstance(node, list):
        for v in node:
            found |= refs(v)
    return found


def build() -> J:
    schema = values_schema()
    available = k8s_definitions()
    defs: J = {}
    todo = refs(schema)
    while todo:
        name = todo.pop()
        if name in defs:
            continue
        defs[name] = strip(available[name])
        todo |= refs(defs[name]) - set(defs)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "rlhf chart values",
        "description": "Generated by helm/rlhf/schema/build_schema.py; edit that file, not this one.",
        **schema,
        "$defs": dict(sorted(defs.items())),
    }


def render() -> str:
    return json.dumps(build(), indent=1, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when values.schema.json is not what this writes")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__).relative_to(CHART.parents[1])}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
