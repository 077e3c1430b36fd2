"""Schemas of the custom resources the chart renders, for the fields it uses, closed (unknown fields are errors).

kubernetes-validate knows Kubernetes' own kinds only. For the others these schemas list the fields of the documented
API versions that the chart may emit, with their types, so that a misspelt or misplaced field fails a test instead
of being pruned silently by the API server (CRDs drop unknown fields). Sources:

* ServiceMonitor and PrometheusRule, ``monitoring.coreos.com/v1``: prometheus-operator v0.93.0,
  ``pkg/apis/monitoring/v1/servicemonitor_types.go`` (ServiceMonitorSpec), ``types.go`` (Endpoint, Scheme:
  ``+kubebuilder:validation:Enum=http;https;HTTP;HTTPS``, NamespaceSelector), ``prometheus_types.go``
  (RelabelConfig and its action enum), ``prometheusrule_types.go`` (PrometheusRuleSpec, RuleGroup, Rule).
* TrainJob and TrainingRuntime, ``trainer.kubeflow.org/v1alpha1``: Kubeflow Trainer v2.3.0,
  ``pkg/apis/trainer/v1alpha1/trainjob_types.go`` (TrainJobSpec, RuntimeRef, Trainer) and
  ``trainingruntime_types.go`` (TrainingRuntimeSpec, MLPolicy, TorchMLPolicySource, JobSetTemplateSpec). The fields
  used exist in every v2 release (v2.0 .. v2.3); ``numProcPerNode`` is an integer there (main makes it int-or-string).
  The JobSet ``replicatedJobs[].template`` is a batch/v1 JobTemplateSpec: the tests validate it as a Job with
  Kubernetes' own strict schema (see ``job_from_replicated_job``).
"""
from __future__ import annotations

from typing import Any

J = dict[str, Any]

STRING: J = {"type": "string"}
STRING_MAP: J = {"type": "object", "additionalProperties": {"type": "string"}}
DURATION: J = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}


def closed(properties: J, required: list[str] | None = None) -> J:
    out: J = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = required
    return out


METADATA = closed({
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
    "namespace": STRING,
    "labels": STRING_MAP,
    "annotations": STRING_MAP,
}, required=["name"])

LABEL_SELECTOR = closed({
    "matchLabels": STRING_MAP,
    "matchExpressions": {"type": "array", "items": closed({
        "key": STRING,
        "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        "values": {"type": "array", "items": STRING},
    }, required=["key", "operator"])},
})


def resource(api_version: str, kind: str, spec: J) -> J:
    return closed({
        "apiVersion": {"const": api_version},
        "kind": {"const": kind},
        "metadata": METADATA,
        "spec": spec,
    }, required=["apiVersion", "kind", "metadata", "spec"])


RELABEL_ACTIONS = ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap", "LabelMap",
                   "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase", "uppercase",
                   "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual"]
RELABEL_CONFIG = closed({
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": STRING,
    "targetLabel": STRING,
    "regex": STRING,
    "modulus": {"type": "integer"},
    "replacement": STRING,
    "action": {"enum": RELABEL_ACTIONS},
})

SERVICE_MONITOR = resource("monitoring.coreos.com/v1", "ServiceMonitor", closed({
    "jobLabel": STRING,
    "targetLabels": {"type": "array", "items": STRING},
    "podTargetLabels": {"type": "array", "items": STRING},
    "endpoints": {"type": "array", "minItems": 1, "items": closed({
        "port": STRING,
        "path": STRING,
        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": RELABEL_CONFIG},
        "metricRelabelings": {"type": "array", "items": RELABEL_CONFIG},
    })},
    "selector": LABEL_SELECTOR,
    "namespaceSelector": closed({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": STRING}}),
}, required=["endpoints", "selector"]))

RULE = closed({
    "record": STRING,
    "alert": STRING,
    "expr": {"type": ["string", "integer"]},
    "for": DURATION,
    "keep_firing_for": DURATION,
    "labels": STRING_MAP,
    "annotations": STRING_MAP,
}, required=["expr"])

PROMETHEUS_RULE = resource("monitoring.coreos.com/v1", "PrometheusRule", closed({
    "groups": {"type": "array", "items": closed({
        "name": {"type": "string", "minLength": 1},
        "labels": STRING_MAP,
        "interval": DURATION,
        "query_offset": DURATION,
        "rules": {"type": "array", "items": RULE},
        "partial_response_strategy": STRING,
        "limit": {"type": "integer"},
    }, required=["name"])},
}))

ENV_VAR: J = {"type": "object", "required": ["name"]}  # core/v1 EnvVar, checked by Kubernetes' schema (see tests)
RESOURCES: J = {"type": "object"}  # core/v1 ResourceRequirements, idem

TRAIN_JOB = resource("trainer.kubeflow.org/v1alpha1", "TrainJob", closed({
    "runtimeRef": closed({
        "name": {"type": "string", "minLength": 1},
        "apiGroup": {"const": "trainer.kubeflow.org"},
        "kind": {"enum": ["TrainingRuntime", "ClusterTrainingRuntime"]},
    }, required=["name"]),
    "trainer": closed({
        "image": STRING,
        "command": {"type": "array", "items": STRING},
        "args": {"type": "array", "items": STRING},
        "env": {"type": "array", "items": ENV_VAR},
        "numNodes": {"type": "integer", "minimum": 1},
        "resourcesPerNode": RESOURCES,
        "numProcPerNode": {"type": "integer", "minimum": 1},
    }),
    "suspend": {"type": "boolean"},
}, required=["runtimeRef"]))

TRAINING_RUNTIME = resource("trainer.kubeflow.org/v1alpha1", "TrainingRuntime", closed({
    "mlPolicy": closed({
        "numNodes": {"type": "integer", "minimum": 1},
        "torch": closed({"numProcPerNode": {"type": ["integer", "string"]}}),
    }),
    "template": closed({
        "metadata": closed({"labels": STRING_MAP, "annotations": STRING_MAP}),
        "spec": closed({
            "replicatedJobs": {"type": "array", "minItems": 1, "items": closed({
                "name": {"type": "string", "minLength": 1},
                "replicas": {"type": "integer", "minimum": 1},
                # batch/v1 JobTemplateSpec: validated as a Job by Kubernetes' schema.
                "template": closed({"metadata": {"type": "object"}, "spec": {"type": "object"}}, required=["spec"]),
            }, required=["name", "template"])},
        }, required=["replicatedJobs"]),
    }, required=["spec"]),
}, required=["template"]))

SCHEMAS: dict[tuple[str, str], J] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): TRAIN_JOB,
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): TRAINING_RUNTIME,
}


def job_from_replicated_job(runtime: J, job: J) -> J:
    """A batch/v1 Job with the JobTemplateSpec of one of a TrainingRuntime's replicated jobs, for Kubernetes' schema."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{runtime['metadata']['name']}-{job['name']}",
                     **({"labels": job["template"]["metadata"]["labels"]} if job["template"].get("metadata") else {})},
        "spec": job["template"]["spec"],
    }


def pod_env_holder(env: list[J], resources: J) -> J:
    """A Pod whose one container has the TrainJob's trainer env and resources, for Kubernetes' schema."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "trainjob-trainer"},
        "spec": {"containers": [{"name": "node", "image": "x", "env": env, "resources": resources}]},
    }
