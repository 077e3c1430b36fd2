"""Alert rules (deploy/prometheus/rules), their promtool unit tests, the compose Prometheus config, and the Grafana
dashboards (deploy/grafana/dashboards): syntax checked by promtool, metric and label names checked against the
metrics the services define."""
from __future__ import annotations

import importlib
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from deploy_support import REPO, run

pytestmark = pytest.mark.deploy

RULES = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((REPO / "deploy" / "prometheus" / "tests").glob("*.yml"))
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
RUNBOOK = REPO / "deploy" / "RUNBOOK.md"

METRIC_MODULES = ("rlhf.policy.metrics", "rlhf.feedback.ingest", "rlhf.serving.interceptors", "rlhf.serving.server",
                  "rlhf.reward.metrics", "rlhf.trainer.metrics")
C, G, H = "counter", "gauge", "histogram"
PLANNED_METRICS = {
    # Metrics of services being built, as announced (used only while their module is not there to import).
    "rlhf.reward.metrics": {
        "rlhf_reward_requests": (C, {"version"}), "rlhf_reward_request_errors": (C, {"version", "code"}),
        "rlhf_reward_request_duration_seconds": (H, {"version"}), "rlhf_reward_items": (C, {"version"}),
        "rlhf_reward_batch_size": (H, {"version"}), "rlhf_reward_queue_depth": (G, set()),
        "rlhf_reward_cache_hits": (C, set()), "rlhf_reward_cache_misses": (C, set()),
        "rlhf_reward_cache_errors": (C, {"operation"}), "rlhf_reward_score": (H, {"version"}),
        "rlhf_reward_version_loads": (C, {"outcome"}), "rlhf_reward_model_info": (G, {"version"}),
    },
    "rlhf.trainer.metrics": {
        "rlhf_trainer_records_consumed": (C, {"topic"}), "rlhf_trainer_records_stored": (C, {"kind"}),
        "rlhf_trainer_dead_letters": (C, {"reason"}), "rlhf_trainer_consumer_lag": (G, {"topic", "partition"}),
        "rlhf_trainer_dataset_size": (G, {"kind"}), "rlhf_trainer_consuming": (G, set()),
        "rlhf_trainer_reward_trainings": (C, {"outcome"}), "rlhf_trainer_reward_training_duration_seconds": (H, set()),
        "rlhf_trainer_reward_heldout_accuracy": (G, set()), "rlhf_trainer_seconds_since_reward_published": (G, set()),
    },
}
STANDARD = {"up": set(), "process_start_time_seconds": set()}
"""Series every target has: Prometheus' own `up`, prometheus_client's process collector."""
TARGET_LABELS = {"job", "instance", "component", "namespace", "pod", "service", "endpoint", "container"}
"""Labels that targets carry (deploy/prometheus/prometheus.yml, the chart's ServiceMonitor)."""


def exported_metrics() -> dict[str, set[str]]:
    """Every series name the services export (counters with _total, histograms with _bucket/_sum/_count), with its
    label names, read from the services' own metric definitions."""
    from prometheus_client.metrics import MetricWrapperBase

    out: dict[str, set[str]] = dict(STANDARD)

    def add(name: str, kind: str, labels: set[str]) -> None:
        if kind == "counter":
            out[f"{name}_total"] = labels
        elif kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = out[f"{name}_count"] = labels
        else:
            out[name] = labels

    for module_name in METRIC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            for name, (kind, labels) in PLANNED_METRICS[module_name].items():
                add(name, kind, labels)
            continue
        for value in vars(module).values():
            for metric in (value.values() if isinstance(value, dict) else (value,)):  # a dict of metrics too
                if isinstance(metric, MetricWrapperBase):
                    add(metric._name, metric._type, set(metric._labelnames))
    return out


# --------------------------------------------------------------------------------------------- rules


def alert_rules() -> list[dict]:
    return [rule for path in RULES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def test_promtool_check_rules(promtool: Path) -> None:
    assert RULES
    proc = run([promtool, "check", "rules", *RULES])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_fire_and_resolve(promtool: Path) -> None:
    assert RULE_TESTS
    proc = run([promtool, "test", "rules", *RULE_TESTS], timeout_s=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every alert has a test case, and each case sees it fire and then resolve.
    tests = [t for path in RULE_TESTS for t in yaml.safe_load(path.read_text())["tests"]]
    for rule in alert_rules():
        cases = [c for t in tests for c in t.get("alert_rule_test", []) if c["alertname"] == rule["alert"]]
        fired = [c["eval_time"] for c in cases if c["exp_alerts"]]
        assert fired, f"{rule['alert']} is never tested firing"
        assert any(not c["exp_alerts"] for c in cases if _seconds(c["eval_time"]) > _seconds(fired[0])), \
            f"{rule['alert']} is never tested resolving"


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smhd])", duration))


def test_promtool_check_compose_config(promtool: Path) -> None:
    proc = run([promtool, "check", "config", REPO / "deploy" / "prometheus" / "prometheus.yml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, re.MULTILINE):
        anchor = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(anchor)
    return anchors


def test_every_alert_has_summary_description_severity_and_a_runbook_section() -> None:
    anchors = github_anchors(RUNBOOK.read_text())
    rules = alert_rules()
    assert len(rules) >= 8
    for rule in rules:
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        url = annotations["runbook_url"]
        base, anchor = url.split("#", 1)
        assert base == "https://github.com/rlhf-platform/rlhf-platform/blob/main/deploy/RUNBOOK.md", \
            "the chart replaces this base with monitoring.runbookBaseUrl"
        assert anchor == rule["alert"].lower() and anchor in anchors, f"{rule['alert']}: no section #{anchor}"


def test_rules_use_only_exported_metrics_and_labels() -> None:
    metrics = exported_metrics()
    for rule in alert_rules():
        check_expression(rule["expr"], metrics, rule["alert"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_local_prometheus_of_infra_py_loads_the_rules(tmp_path: Path) -> None:
    """deploy/local/infra.py's Prometheus (its own state dir and port, not the shared one) loads every rule."""
    infra = REPO / "deploy" / "local" / "infra.py"
    port = free_port()
    ports = [f"--prometheus-port={port}", f"--kafka-port={free_port()}", f"--kafka-controller-port={free_port()}",
             f"--redis-port={free_port()}"]
    base = [sys.executable, str(infra), "--state", str(tmp_path / "infra"), *ports]
    up = subprocess.run([*base, "up", "prometheus"], capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        deadline = time.monotonic() + 30
        loaded: list[dict] = []
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5) as resp:
                loaded = [r for g in json.load(resp)["data"]["groups"] for r in g["rules"]]
            if loaded:
                break
            time.sleep(0.5)
        assert {r["name"] for r in loaded} == {r["alert"] for r in alert_rules()}
        assert all(r["health"] in ("ok", "unknown") for r in loaded), [r for r in loaded if r["health"] == "err"]
    finally:
        subprocess.run([*base, "down"], capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------------- dashboards


GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def dashboard_queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables replaced) of every panel target and query variable."""
    out = []
    variables = {f"${v['name']}": ".*" for v in board["templating"]["list"] if v["type"] == "query"}
    def expand(expr: str) -> str:
        for name in sorted({**GRAFANA_VARIABLES, **variables}, key=len, reverse=True):
            expr = expr.replace(name, {**GRAFANA_VARIABLES, **variables}[name])
        return expr
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], expand(target["expr"])))
    return out


def test_dashboards_structure() -> None:
    assert {p.stem for p in DASHBOARDS} == {"serving", "feedback", "reward", "training"}
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] not in uids and board["title"].startswith("RLHF / ")
        uids.add(board["uid"])
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (path.name, panel["title"])
            assert panel["targets"], (path.name, panel["title"])
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24, (path.name, panel["title"])


@pytest.mark.parametrize("name, metric", [("serving", "rlhf_policy_requests_total"),
                                          ("reward", "rlhf_reward_requests_total")])
def test_versioned_dashboards_have_a_version_variable_that_every_versioned_panel_uses(name: str, metric: str) -> None:
    board = json.loads((REPO / "deploy" / "grafana" / "dashboards" / f"{name}.json").read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    version = variables["version"]
    assert version["query"]["query"] == f"label_values({metric}, version)"
    assert version["includeAll"] and version["multi"] and version["allValue"] == ".*"
    metrics = exported_metrics()
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            for series, _ in re.findall(r"\b(rlhf_[a-z_]+)(\{[^}]*\})?", target["expr"]):
                # The current reward version is shown whatever versions are selected.
                if "version" in metrics.get(series, set()) and series != "rlhf_reward_model_info":
                    assert 'version=~"$version"' in target["expr"], (panel["title"], target["expr"])


def test_dashboard_queries_parse(promtool: Path, tmp_path: Path) -> None:
    """Each query, as a recording rule, through promtool's PromQL parser."""
    rules = []
    for path in DASHBOARDS:
        for i, (title, expr) in enumerate(dashboard_queries(json.loads(path.read_text()))):
            rules.append({"record": f"dashboard:{path.stem}:{i}", "expr": expr})
    assert len(rules) > 30
    file = tmp_path / "dashboards.yml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    proc = run([promtool, "check", "rules", file])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboards_use_only_exported_metrics_and_labels() -> None:
    metrics = exported_metrics()
    for path in DASHBOARDS:
        for title, expr in dashboard_queries(json.loads(path.read_text())):
            check_expression(expr, metrics, f"{path.name}: {title}")


def test_issue_12_serving_panels_are_there() -> None:
    board = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "serving.json").read_text())
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    for needed in ("rlhf_policy_requests_total", "rlhf_policy_request_errors_total",
                   "rlhf_policy_request_duration_seconds_bucket", "rlhf_policy_time_to_first_token_seconds_bucket",
                   "rlhf_policy_generated_tokens_total", "rlhf_policy_batch_size", "rlhf_policy_queue_depth",
                   "rlhf_policy_traffic_percent"):
        assert needed in exprs, needed
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (version, le) (rate(rlhf_policy_time_to_first_token" in exprs


# --------------------------------------------------------------------------------------------- PromQL names


PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
    "unless", "rate", "irate", "increase", "histogram_quantile", "time", "vector", "label_values", "bool", "offset",
    "group", "topk", "bottomk", "quantile", "stddev", "changes", "delta", "deriv", "abs", "clamp_min", "clamp_max",
    "max_over_time", "min_over_time", "avg_over_time", "count_over_time", "last_over_time", "absent", "le",
}


def check_expression(expr: str, metrics: dict[str, set[str]], where: str) -> None:
    """Every series an expression selects is exported, and every label it matches on is one that series has."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may contain anything
    for match in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", stripped):
        name, selector = match.group(1), match.group(2)
        if name in PROMQL_WORDS or _inside_grouping(stripped, match.start()):
            continue
        assert name in metrics, f"{where}: {name} is not a metric the services export"
        if selector:
            used = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", selector))
            unknown = used - metrics[name] - TARGET_LABELS
            assert not unknown, f"{where}: {name} has no label(s) {sorted(unknown)}"
    for labels in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", stripped):
        for label in (x.strip() for x in labels.split(",") if x.strip()):
            known = TARGET_LABELS | {"le"} | set().union(*metrics.values())
            assert label in known, f"{where}: grouping label {label} is on no exported series"


def _inside_grouping(text: str, position: int) -> bool:
    """Whether `position` is inside the parentheses of a by/on/without/ignoring clause."""
    opening = text.rfind("(", 0, position)
    closing = text.rfind(")", 0, position)
    if opening < closing:
        return False
    return bool(re.search(r"\b(by|on|without|ignoring|group_left|group_right)\s*$", text[:opening]))


@pytest.mark.parametrize("expr, message", [
    ('sum(rate(rlhf_policy_requestz_total[5m]))', "is not a metric"),
    ('sum(rate(rlhf_feedback_events_total{version="v1"}[5m]))', "has no label"),
    ('sum by (versoin) (rate(rlhf_policy_requests_total[5m]))', "grouping label versoin"),
])
def test_the_name_check_catches_mistakes(expr: str, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_expression(expr, exported_metrics(), "example")


@pytest.mark.parametrize("module_name", sorted(PLANNED_METRICS))
def test_planned_metrics_agree_with_the_module_when_it_is_there(module_name: str) -> None:
    """The fallback list of a service being built must say what its module defines, once the module exists."""
    from prometheus_client.metrics import MetricWrapperBase

    try:
        module = importlib.import_module(module_name)
    except ImportError:
        pytest.skip(f"{module_name} is not there yet: the planned list stands in for it")
    defined = {v._name: (v._type, set(v._labelnames)) for v in vars(module).values() if isinstance(v, MetricWrapperBase)}
    for name, planned in PLANNED_METRICS[module_name].items():
        assert defined.get(name) == planned, f"{name}: planned {planned}, {module_name} defines {defined.get(name)}"
