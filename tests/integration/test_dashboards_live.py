"""Every PromQL expression of the Grafana dashboards (deploy/grafana/dashboards/*.json: panel targets and query
variables) and of the alert rules (deploy/prometheus/rules/*.yml) returns at least one series from a real Prometheus
that has scraped the real platform through some traffic (issue 12).

How:

1. One ``rlhf up`` for the module (a subprocess: the policy, feedback, reward and trainer services embedded on one
   gRPC port and one /metrics, tiny random-init models built on first start), a few settings through its
   ``RLHF_*`` environment so that a training takes seconds and the served-response queue can overflow.
2. Its /metrics is registered with the ``prometheus`` fixture (file_sd, scraped every 1 s) with the labels the
   deployment gives targets: ``job="rlhf"``, ``component=<service>`` (the chart's ServiceMonitor,
   deploy/prometheus/prometheus.yml) and ``namespace``. The embedded process serves every component on one address,
   so that address is registered once per component (four targets, one scrape each per second): a query that
   selects ``component="feedback"`` sees the feedback service's target, as in a deployment.
3. gRPC traffic through every service: generations (unary and streamed, valid and invalid, a burst that overflows
   the served-response queue), feedback (rankings of served responses, duplicates, invalid events over the stream
   and unary, unknown response ids, a pair of responses to different prompts that the trainer dead-letters, an
   event larger than the bus takes: INVALID_ARGUMENT), a reward-model training from the rankings (published; the
   reward service loads it), scores (cache misses then hits, an invalid call), failed version loads of both models
   (broken uri), a policy canary that is rolled back, an unimplemented trainer call (a server-side error status).
   The embedded in-process cache and bus cannot fail, so for the cache-error series a standalone ``rlhf reward``
   and ``rlhf feedback`` run beside it with their Redis down (a port that refuses connections; their bus in-process
   so that nothing reaches the shared Kafka), and for the failed-event series (``outcome="failed"``) another
   ``rlhf feedback`` whose Kafka is down (a refused port, so publishing fails for real), all registered as
   component="reward" / "feedback" targets too, and get a few calls each.
4. Each expression is evaluated with ``/api/v1/query``, polled until it returns a series (rate() needs two scrapes)
   or the deadline passes; then every one that never did is reported at once.

What is evaluated:

* Grafana variables: every templating variable (``$kind``, ``${version}``, ``[[x]]``) becomes ``.*`` (the
  dashboards' "All"); ``$__rate_interval`` / ``$__interval`` become ``1m``, ``$__range`` ``1h``. A query variable
  ``label_values(metric, label)`` is evaluated as ``count by (label) (metric)`` and must give a non-empty label.
* Dashboard expressions as written (a panel shows what the expression returns, comparisons included).
* Alert expressions without their thresholds: an alert's expression is usually ``X > 0`` or ``X == 0`` and has no
  series while all is well, so what is asserted is that ``X`` (what the alert compares) has series. The outermost
  comparison is found by :func:`condition_free` with a small PromQL tokenizer: only comparison operators at
  nesting depth 0 count (none inside ``(...)``, ``{...}``, ``[...]`` or strings); the left-hand side is kept
  (recursively, for ``a > b > c``). At depth 0, ``or`` / ``and`` (lower precedence than comparisons) split first:
  each operand is stripped alike and the set operation kept, with its ``on (...)`` modifier, so that
  ``X > 1000 and Y > 0`` is evaluated as ``X and Y`` and the label matching of the join is exercised too; an
  operand wholly in parentheses is unwrapped. ``unless`` (stripping its right side would invert it) and
  ``> bool`` (not a filter) are refused/kept as they are.
* Scoped to this test's targets: every selector gets ``namespace="<this run>"`` added (:func:`scoped`), so that
  targets of other test sessions on the shared Prometheus, or data of earlier runs, cannot satisfy a query.

What cannot be produced here would be listed in ALLOWED_EMPTY with the reason (none is, today); such a query must
stay empty (an entry whose query returns data fails the test: remove it).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULES = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml"))

COMPONENTS = ("policy", "feedback", "reward", "trainer")
"""What `rlhf up` embeds; each is a target of its own in a deployment (component=<service>)."""

GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}

QUERY_DEADLINE_S = 30.0
"""How long after the traffic a query may take to return data (the first scrape of a target comes up to 5 s after
it is registered; rate() then needs a second one)."""

ALLOWED_EMPTY: dict[tuple[str, str], str] = {
    # (file, panel title or alert name): why it cannot return data here. Empty: every query returns series.
}


# --------------------------------------------------------------------------------------------- PromQL tokens


@dataclass(frozen=True)
class Token:
    kind: str  # str, num, id, op
    text: str
    start: int
    end: int


_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<num>(?:0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)
  | (?P<id>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=,(){}\[\]:@])
""", re.VERBOSE)

COMPARISONS = {"==", "!=", ">", "<", ">=", "<="}
SET_OPERATORS = {"and", "or", "unless"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = SET_OPERATORS | GROUPING | {"bool", "offset", "atan2"}
AGGREGATORS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
               "quantile", "limitk", "limit_ratio"}
CLOSING = {"(": ")", "{": "}", "[": "]"}


def tokenize(expr: str) -> list[Token]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot tokenize PromQL at {pos}: {expr[pos:pos + 30]!r} in {expr!r}")
        kind = m.lastgroup
        if kind not in ("ws", "comment"):
            text = m.group()
            if kind == "id" and text.lower() in ("inf", "nan"):
                kind = "num"
            out.append(Token(kind, text, m.start(), m.end()))
        pos = m.end()
    return out


def _depths(tokens: list[Token]) -> list[int]:
    """Nesting depth of each token (brackets of any kind; a closing bracket has its opening one's depth)."""
    depths, stack = [], []
    for t in tokens:
        if t.kind == "op" and t.text in CLOSING:
            depths.append(len(stack))
            stack.append(CLOSING[t.text])
        elif t.kind == "op" and t.text in CLOSING.values():
            if not stack or stack.pop() != t.text:
                raise ValueError(f"unbalanced {t.text!r} at {t.start}")
            depths.append(len(stack))
        else:
            depths.append(len(stack))
    if stack:
        raise ValueError(f"unclosed bracket(s): {''.join(reversed(stack))}")
    return depths


def _skip_group(tokens: list[Token], i: int) -> int:
    """Index after the bracket group that starts at ``tokens[i]`` (which must be an opening bracket)."""
    depth = 0
    for j in range(i, len(tokens)):
        if tokens[j].kind == "op" and tokens[j].text in CLOSING:
            depth += 1
        elif tokens[j].kind == "op" and tokens[j].text in CLOSING.values():
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError("unclosed bracket")


def _operator_end(tokens: list[Token], i: int) -> int:
    """Index after a binary operator at ``tokens[i]`` and its modifiers (bool, on/ignoring (...), group_x (...))."""
    j = i + 1
    if j < len(tokens) and tokens[j].text.lower() == "bool":
        j += 1
    if j < len(tokens) and tokens[j].text.lower() in ("on", "ignoring"):
        j = _skip_group(tokens, j + 1)
    if j < len(tokens) and tokens[j].text.lower() in ("group_left", "group_right"):
        j += 1
        if j < len(tokens) and tokens[j].text == "(":
            j = _skip_group(tokens, j)
    return j


def _is_binary_operator(tokens: list[Token], i: int) -> bool:
    t = tokens[i]
    if t.kind == "id":
        return t.text.lower() in SET_OPERATORS
    return t.kind == "op" and t.text in COMPARISONS


def condition_free(expr: str) -> str:
    """An alert expression without the thresholds of its outermost comparisons (see the module docstring)."""
    tokens = tokenize(expr)
    if not tokens:
        raise ValueError("empty expression")
    depths = _depths(tokens)
    top = [i for i, t in enumerate(tokens) if depths[i] == 0 and _is_binary_operator(tokens, i)]
    for level in (("or",), ("and", "unless")):
        at = [i for i in top if tokens[i].text.lower() in level]
        if not at:
            continue
        if any(tokens[i].text.lower() == "unless" for i in at):
            raise ValueError(f"`unless` at the top of {expr!r}: its right side cannot be stripped of thresholds")
        parts, begin = [], 0
        for i in at:
            end = _operator_end(tokens, i)
            parts.append(condition_free(expr[tokens[begin].start:tokens[i].start]))
            parts.append(expr[tokens[i].start:tokens[end - 1].end])
            begin = end
        parts.append(condition_free(expr[tokens[begin].start:]))
        return " ".join(p.strip() for p in parts)
    comparisons = [i for i in top if tokens[i].kind == "op"]
    if comparisons:
        i = comparisons[-1]  # left-associative: the last one at depth 0 is the outermost
        if i + 1 < len(tokens) and tokens[i + 1].text.lower() == "bool":
            return expr.strip()  # `X > bool 0` keeps every series: not a filter
        left = expr[:tokens[i].start]
        left_tokens = tokenize(left)
        if len(left_tokens) == 1 and left_tokens[0].kind == "num":
            raise ValueError(f"a number left of the comparison in {expr!r}: put the series on the left")
        return condition_free(left)
    if tokens[0].text == "(" and _skip_group(tokens, 0) == len(tokens):
        return condition_free(expr[tokens[0].end:tokens[-1].start])
    return expr.strip()


def scoped(expr: str, label: str, value: str) -> str:
    """``expr`` with ``label="value"`` added to every vector selector."""
    tokens = tokenize(expr)
    matcher = f'{label}="{value}"'
    inserts: list[tuple[int, str]] = []
    frames: list[str] = []  # per open bracket: "labels" (a by/on/... list), "{", "(" or "["
    for i, t in enumerate(tokens):
        prev = tokens[i - 1] if i else None
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if t.kind == "op" and t.text in CLOSING:
            if t.text == "(" and prev is not None and prev.text.lower() in GROUPING:
                frames.append("labels")
            else:
                frames.append(t.text)
            if t.text == "{":
                closes = nxt is not None and nxt.text == "}"
                inserts.append((t.end, matcher if closes else matcher + ", "))
            continue
        if t.kind == "op" and t.text in CLOSING.values():
            frames.pop()
            continue
        if t.kind != "id" or (frames and frames[-1] in ("labels", "{")):
            continue
        name = t.text.lower()
        if name in KEYWORDS:
            continue
        if nxt is not None and nxt.text == "(":
            continue  # a function or an aggregation
        if name in AGGREGATORS and nxt is not None and nxt.text.lower() in ("by", "without"):
            continue
        if nxt is not None and nxt.text == "{":
            continue  # the matcher goes into its braces
        inserts.append((t.end, "{" + matcher + "}"))
    out, last = [], 0
    for pos, text in sorted(inserts):
        out += [expr[last:pos], text]
        last = pos
    out.append(expr[last:])
    return "".join(out)


# --------------------------------------------------------------------------------------------- the queries


@dataclass(frozen=True)
class Query:
    file: str
    name: str  # panel title, variable name or alert name
    expr: str  # as written
    promql: str  # what is evaluated, before scoping
    label: str = ""  # label_values(): the label that must be there

    @property
    def key(self) -> tuple[str, str]:
        return self.file, self.name


_LABEL_VALUES = re.compile(
    r"^\s*label_values\(\s*(?:(?P<metric>.+?)\s*,\s*)?(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$", re.DOTALL)


def _expand(expr: str, variables: set[str]) -> str:
    def value(name: str) -> str:
        if name in GRAFANA_INTERVALS:
            return GRAFANA_INTERVALS[name]
        if name in variables:
            return ".*"
        raise AssertionError(f"unknown Grafana variable ${name} in {expr!r}")

    out = re.sub(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)\]\]|\$(\w+)",
                 lambda m: value(m.group(1) or m.group(2) or m.group(3)), expr)
    assert "$" not in out, f"a Grafana variable left in {out!r}"
    return out


def dashboard_queries(path: Path) -> list[Query]:
    board = json.loads(path.read_text())
    templating = board.get("templating", {}).get("list", [])
    variables = {v["name"] for v in templating if v.get("type") != "datasource"}
    out = []
    for v in templating:
        if v.get("type") != "query":
            continue
        raw = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = _LABEL_VALUES.match(raw)
        assert m, f"{path.name}: variable {v['name']}: only label_values(...) queries are understood, not {raw!r}"
        metric = _expand(m["metric"], variables) if m["metric"] else f'{{{m["label"]}!=""}}'
        out.append(Query(path.name, f"${v['name']}", raw, f"count by ({m['label']}) ({metric})", m["label"]))

    def panels(items: list[dict]) -> Iterator[dict]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(board.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append(Query(path.name, panel["title"], target["expr"], _expand(target["expr"], variables)))
    for annotation in board.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            out.append(Query(path.name, f"annotation {annotation['name']}", annotation["expr"],
                             _expand(annotation["expr"], variables)))
    return out


def rule_queries(path: Path) -> list[Query]:
    out = []
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule["record"]
            promql = condition_free(rule["expr"]) if "alert" in rule else rule["expr"]
            out.append(Query(path.name, name, rule["expr"], promql))
    return out


def all_queries() -> list[Query]:
    return [q for p in DASHBOARDS for q in dashboard_queries(p)] + [q for p in RULES for q in rule_queries(p)]


# --------------------------------------------------------------------------------------------- parser checks


@pytest.mark.parametrize("expr, stripped", [
    ('up{job="rlhf"} == 0', 'up{job="rlhf"}'),
    ('sum by (a) (rate(x{le=">"}[5m])) / sum(y) > 0.05', 'sum by (a) (rate(x{le=">"}[5m])) / sum(y)'),
    ('a > 1000\nand\nb > 0', 'a and b'),
    ('(a < 1) and on (n, j) (min by (n) (time() - (p and on (n) group by (n) (q))) > 86400)',
     'a and on (n, j) min by (n) (time() - (p and on (n) group by (n) (q)))'),
    ('max(x) > bool 0', 'max(x) > bool 0'),
    ('a > b > 3', 'a'),
    ('rate(x[5m])', 'rate(x[5m])'),
    ('(x > 1) or y', 'x or y'),
])
def test_condition_free_strips_the_outermost_comparisons(expr, stripped):
    assert condition_free(expr) == stripped


def test_condition_free_refuses_unless():
    with pytest.raises(ValueError, match="unless"):
        condition_free("a > 0 unless b")


@pytest.mark.parametrize("expr, expected", [
    ('sum by (job, le) (rate(m_bucket{a=~"x"}[1m]))', 'sum by (job, le) (rate(m_bucket{ns="t", a=~"x"}[1m]))'),
    ('max by (version) (m) == 1', 'max by (version) (m{ns="t"}) == 1'),
    ('time() - (p{j="r"} and on (n, i) group by (n, i) (q))',
     'time() - (p{ns="t", j="r"} and on (n, i) group by (n, i) (q{ns="t"}))'),
    ('sum without (instance) (m{}) offset 5m', 'sum without (instance) (m{ns="t"}) offset 5m'),
    ('{__name__="up"}', '{ns="t", __name__="up"}'),
])
def test_scoped_adds_the_matcher_to_every_selector(expr, expected):
    assert scoped(expr, "ns", "t") == expected


def test_every_dashboard_and_rule_query_is_understood():
    queries = all_queries()
    assert len(queries) > 60 and {q.file for q in queries} >= {p.name for p in DASHBOARDS} | {p.name for p in RULES}
    names = {q.key for q in queries}
    stale = set(ALLOWED_EMPTY) - names
    assert not stale, f"ALLOWED_EMPTY names queries that no longer exist: {sorted(stale)}"
    for q in queries:
        scoped(q.promql, "namespace", "x")  # tokenizes and balances


# --------------------------------------------------------------------------------------------- the platform


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             service: Service | None = None) -> object:
    """The first truthy value of ``predicate()`` (a gRPC error counts as not yet); fails at once when ``service``
    exits."""
    deadline = time.monotonic() + timeout
    while True:
        if service is not None:
            service.check_alive(what)
        try:
            value = predicate()
        except grpc.RpcError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.1)


RLHF_ENV = {
    "PYTHONUNBUFFERED": "1",
    "RLHF_TORCH_NUM_THREADS": "1",  # one thread is much faster for tiny models (INFRA-NOTES)
    # A served-response queue this small overflows on one request of 8 samples (rlhf_policy_record_failures_total
    # {sink="queue"}); the rankings below ask 3 samples at a time, one call after the other, and all get recorded.
    "RLHF_POLICY_RECORD_QUEUE_SIZE": "4",
    # The trainer: no training by itself (the test asks for one), a training of seconds, always published (so the
    # reward service loads it and the policy sees a model event), lag metrics refreshed often.
    "RLHF_TRAINER_MIN_NEW_COMPARISONS": "0",
    "RLHF_TRAINER_HELDOUT_SHARE": "0.5",
    "RLHF_TRAINER_MIN_HELDOUT": "2",
    "RLHF_TRAINER_GATE_TOLERANCE": "1.0",
    "RLHF_TRAINER_RM_EPOCHS": "1",
    "RLHF_TRAINER_RM_BATCH_SIZE": "8",
    "RLHF_TRAINER_RM_MAX_LENGTH": "64",
    "RLHF_TRAINER_HOUSEKEEPING_S": "0.5",
}

_ANNOUNCED = re.compile(r"serving \S.* on (\S+):(\d+) \(metrics on (\d+)\)")
"""rlhf.serving.server's line once it listens (every command logs it, `rlhf up` included)."""


class Service:
    """One `python -m rlhf <command>` process on free ports (port 0: no race with other sessions; the ports are read
    from its log), in a folder of its own (so that no out/demo models of the checkout are picked up), with none of
    the caller's RLHF_* environment (no shared Kafka/Redis settings) but RLHF_ENV."""

    def __init__(self, name: str, args: list[str], root: Path) -> None:
        self.name = name
        self.log = root / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
        env.update(RLHF_ENV)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rlhf", *args, "--port", "0", "--metrics-port", "0", "--health-interval-s",
                 "0.5"], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.address = self.metrics_address = ""
        self.channel: grpc.Channel | None = None

    def check_alive(self, what: str) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"rlhf {self.name} exited ({self.proc.returncode}) while waiting for {what}:\n"
                                 f"{self.log.read_text()[-4000:]}")

    def ready(self, timeout: float = 120, serving: bool = True) -> Service:
        """Wait until it listens and its health (all services) is SERVING; NOT_SERVING with ``serving=False`` (a
        service whose dependency is down on purpose: health tells the truth)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        m = wait_for(lambda: _ANNOUNCED.search(self.log.read_text()), timeout, f"{self.name} listening", self)
        self.address, self.metrics_address = f"{m[1]}:{m[2]}", f"{m[1]}:{m[3]}"
        self.channel = grpc.insecure_channel(self.address)
        health = health_pb2_grpc.HealthStub(self.channel)
        want = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == want, timeout,
                 f"{self.name} {health_pb2.HealthCheckResponse.ServingStatus.Name(want)}", self)
        return self

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class Platform:
    service: Service
    root: Path
    artifact_root: Path
    timings: dict[str, float]

    @property
    def channel(self) -> grpc.Channel:
        assert self.service.channel is not None
        return self.service.channel

    @property
    def policy_path(self) -> Path:
        return self.artifact_root / "policy-init"  # what `rlhf up` builds on first start (rlhf.bootstrap)

    @property
    def reward_path(self) -> Path:
        return self.artifact_root / "reward-init"


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> Iterator[Platform]:
    """The one `rlhf up` of the module, SERVING."""
    started = time.monotonic()
    root = tmp_path_factory.mktemp("dashboards-live")
    service = Service("up", ["up", "--artifact-root", str(root / "artifacts")], root)
    try:
        service.ready()
        platform = Platform(service, root, root / "artifacts", {})
        platform.timings["rlhf up until SERVING"] = time.monotonic() - started
        yield platform
    finally:
        service.stop()


# --------------------------------------------------------------------------------------------- traffic


PROMPTS = ["What is the safest way to store chemicals?", "How do I boil an egg?", "Tell me about the moon.",
           "Which plants grow in the shade?", "How can I sleep better?", "What is a good first programming language?"]


def drive_traffic(p: Platform) -> dict[str, object]:
    """Calls on every service so that the series the dashboards and rules select exist."""
    from rlhf.v1 import (
        common_pb2, feedback_pb2, feedback_pb2_grpc, policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc,
        trainer_pb2, trainer_pb2_grpc,
    )

    run = uuid.uuid4().hex[:8]
    policy = policy_pb2_grpc.PolicyServiceStub(p.channel)
    feedback = feedback_pb2_grpc.FeedbackServiceStub(p.channel)
    reward = reward_pb2_grpc.RewardServiceStub(p.channel)
    trainer = trainer_pb2_grpc.TrainerServiceStub(p.channel)
    seen: dict[str, object] = {}

    def code_of(call: Callable[[], object]) -> grpc.StatusCode:
        try:
            call()
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    def sampling(seed: int, tokens: int = 8) -> common_pb2.SamplingParams:
        return common_pb2.SamplingParams(temperature=1.0, seed=seed, max_new_tokens=tokens)

    def event(name: str, **kind) -> feedback_pb2.FeedbackEvent:
        # Fixed ids: the trainer's held-out split is a hash of them (the process and its dataset are this test's own).
        e = feedback_pb2.FeedbackEvent(event_id=f"live-{name}", product="live", annotator_id="sim", **kind)
        e.created_at.GetCurrentTime()
        return e

    # 1. policy: K answers per prompt (the rankings below), streams, invalid requests, a queue-overflowing burst
    served = []  # (prompt, [response ids])
    for i in range(16):
        reply = policy.Generate(policy_pb2.GenerateRequest(
            prompt=PROMPTS[i % len(PROMPTS)], num_samples=3, sampling=sampling(i), product="live",
            routing_key=f"user-{i}"), timeout=30)
        served.append((PROMPTS[i % len(PROMPTS)], [s.response_id for s in reply.samples]))
    for i in range(3):
        for _ in policy.GenerateStream(policy_pb2.GenerateRequest(prompt=PROMPTS[i], sampling=sampling(100 + i)),
                                       timeout=30):
            pass
    seen["invalid generate"] = code_of(lambda: policy.Generate(policy_pb2.GenerateRequest(prompt=""), timeout=10))
    seen["pinned unknown version"] = code_of(lambda: policy.Generate(
        policy_pb2.GenerateRequest(prompt="hi", version="no-such-version"), timeout=10))
    burst = policy.Generate(policy_pb2.GenerateRequest(prompt=PROMPTS[0], num_samples=8, sampling=sampling(7)),
                            timeout=30)
    seen["burst samples"] = len(burst.samples)

    # 2. feedback: rankings of what was served (comparisons for the trainer), over a stream, with duplicates and
    #    invalid events in it; unknown response ids; a pair of responses to two prompts (dead-lettered by the
    #    trainer); a demonstration; invalid unary calls; an event larger than the bus takes (INVALID_ARGUMENT)
    rankings = [event(f"rank-{i}", ranking=feedback_pb2.Ranking(response_ids=ids)) for i, (_, ids) in enumerate(served)]
    invalid = [event("bad-ranking", ranking=feedback_pb2.Ranking(response_ids=[served[0][1][0]])),
               feedback_pb2.FeedbackEvent(event_id="bad id with spaces")]
    messages = [rankings[:8], rankings[8:] + invalid, rankings[:3]]  # the last: duplicates
    acks = [a for r in feedback.SubmitStream(iter(feedback_pb2.SubmitStreamRequest(events=m) for m in messages),
                                             timeout=60) for a in r.acks]
    seen["stream acks"] = sorted(feedback_pb2.SubmitStatus.Name(a.status) for a in acks)
    unknown = feedback.Submit(feedback_pb2.SubmitRequest(event=event(
        "unknown", rating=feedback_pb2.Rating(response_id=f"never-served-{run}", thumb=feedback_pb2.THUMB_UP))),
        timeout=30)
    seen["unknown ids"] = list(unknown.unknown_response_ids)
    feedback.Submit(feedback_pb2.SubmitRequest(event=event("two-prompts", pairwise=feedback_pb2.PairwisePreference(
        chosen_response_id=served[0][1][0], rejected_response_id=served[1][1][0]))), timeout=30)
    feedback.Submit(feedback_pb2.SubmitRequest(event=event("demo", demonstration=feedback_pb2.Demonstration(
        prompt=PROMPTS[1], response="Put it in boiling water for eight minutes."))), timeout=30)
    seen["invalid submit"] = code_of(lambda: feedback.Submit(feedback_pb2.SubmitRequest(
        event=feedback_pb2.FeedbackEvent(event_id="live-no-kind")), timeout=10))
    # 40 messages of 32 KiB: each text is valid (64 x max_text_bytes are allowed) but the event is 1.25 MiB, over the
    # bus's largest record (1 MiB, as Kafka's default max_request_size): INVALID_ARGUMENT, never published.
    huge = feedback_pb2.Demonstration(
        messages=common_pb2.Conversation(messages=[
            common_pb2.ChatMessage(role="user" if j % 2 == 0 else "assistant", content="x" * 32 * 1024)
            for j in range(40)]),
        response="ok")
    seen["oversized submit"] = code_of(lambda: feedback.Submit(
        feedback_pb2.SubmitRequest(event=event("huge", demonstration=huge)), timeout=30))

    # 3. trainer: the rankings stored as comparisons, a reward model trained from them and published; the reward
    #    service loads it (the policy sees the event and ignores it: not its model); an unimplemented call
    # Every ranking joined its served responses (none was lost by the small record queue): all become comparisons.
    assert not [a for a in acks if a.unknown_response_ids], acks

    def stored() -> trainer_pb2.TrainerStatus | None:
        status = trainer.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
        return status if status.new_comparisons >= len(rankings) else None

    seen["comparisons"] = wait_for(stored, 30, "the trainer stored the rankings", p.service).new_comparisons
    trained = trainer.TrainRewardModel(trainer_pb2.TrainRewardModelRequest(min_comparisons=len(served) // 2),
                                       timeout=120)
    seen["trained"] = (trained.version.version, trained.published, trained.comparisons, trained.heldout_comparisons)
    assert trained.published, trained
    wait_for(lambda: reward.GetRewardModel(reward_pb2.GetRewardModelRequest(), timeout=10).version.version
             == trained.version.version, 60, "the reward service serves the new version", p.service)
    seen["start run"] = code_of(lambda: trainer.StartRun(trainer_pb2.StartRunRequest(), timeout=10))
    trainer.ListVersions(trainer_pb2.ListVersionsRequest(), timeout=10)

    # 4. reward: misses, then hits of the same items; an invalid call; a failed version load (broken uri)
    items = [reward_pb2.ScoreItem(prompt=prompt, response=f"answer {j}") for j, (prompt, _) in enumerate(served[:6])]
    for _ in range(3):
        reply = reward.Score(reward_pb2.ScoreRequest(items=items), timeout=30)
    seen["score cache hits"] = reply.cache_hits
    seen["invalid score"] = code_of(lambda: reward.Score(reward_pb2.ScoreRequest(), timeout=10))
    seen["broken reward load"] = code_of(lambda: reward.LoadRewardModel(reward_pb2.LoadRewardModelRequest(
        version=common_pb2.ModelVersion(name="reward", version=f"broken-{run}", kind=common_pb2.MODEL_KIND_REWARD,
                                        uri=str(p.artifact_root / "no-such-model"))), timeout=60))

    # 5. policy versions: a failed load (broken uri); a canary of the same weights under another version, given
    #    traffic, then rolled back
    seen["broken policy load"] = code_of(lambda: policy.LoadPolicy(policy_pb2.LoadPolicyRequest(
        version=common_pb2.ModelVersion(name="policy", version=f"broken-{run}", kind=common_pb2.MODEL_KIND_POLICY,
                                        uri=str(p.artifact_root / "no-such-model")), traffic_percent=10), timeout=60))
    canary = f"canary-{run}"
    policy.LoadPolicy(policy_pb2.LoadPolicyRequest(version=common_pb2.ModelVersion(
        name="policy", version=canary, kind=common_pb2.MODEL_KIND_POLICY, uri=str(p.policy_path)),
        traffic_percent=50), timeout=60)
    versions = {policy.Generate(policy_pb2.GenerateRequest(prompt=PROMPTS[2], routing_key=f"canary-{i}",
                                                           sampling=sampling(i, 4)), timeout=30).policy_version
                for i in range(12)}
    seen["canary served by"] = sorted(versions)
    policy.Rollback(policy_pb2.RollbackPolicyRequest(), timeout=60)
    return seen


def drive_bus_down_traffic(feedback_service: Service) -> dict[str, object]:
    """Calls on the feedback service whose Kafka is down: publishing fails, the events are FAILED (UNAVAILABLE)."""
    from rlhf.v1 import feedback_pb2, feedback_pb2_grpc

    feedback = feedback_pb2_grpc.FeedbackServiceStub(feedback_service.channel)
    event = feedback_pb2.FeedbackEvent(event_id="live-bus-down", product="live", annotator_id="sim",
                                       rating=feedback_pb2.Rating(response_id="r-1", thumb=feedback_pb2.THUMB_UP))
    event.created_at.GetCurrentTime()
    try:
        feedback.Submit(feedback_pb2.SubmitRequest(event=event), timeout=30)
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    return {"bus down: submit": code}


def drive_cache_down_traffic(reward_service: Service, feedback_service: Service) -> dict[str, object]:
    """Calls on the services whose Redis is down: every cache operation fails and is counted, nothing else does."""
    from rlhf.v1 import feedback_pb2, feedback_pb2_grpc, reward_pb2, reward_pb2_grpc

    reward = reward_pb2_grpc.RewardServiceStub(reward_service.channel)
    items = [reward_pb2.ScoreItem(prompt=prompt, response="an answer") for prompt in PROMPTS[:3]]
    hits = [reward.Score(reward_pb2.ScoreRequest(items=items), timeout=30).cache_hits for _ in range(2)]
    feedback = feedback_pb2_grpc.FeedbackServiceStub(feedback_service.channel)
    event = feedback_pb2.FeedbackEvent(event_id="live-redis-down", product="live", annotator_id="sim",
                                       rating=feedback_pb2.Rating(response_id="r-1", thumb=feedback_pb2.THUMB_DOWN))
    event.created_at.GetCurrentTime()
    statuses = [feedback_pb2.SubmitStatus.Name(feedback.Submit(feedback_pb2.SubmitRequest(event=event),
                                                               timeout=30).status) for _ in range(2)]
    return {"redis down: score cache hits": hits, "redis down: submit": statuses}


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening) while the block runs."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


# --------------------------------------------------------------------------------------------- the test


def _scrapes(result: list[dict], target: dict) -> float:
    """Scrapes of ``target`` (the labels of an ``up`` series) in a count_over_time(up[...]) result, 0 if none."""
    return next((float(s["value"][1]) for s in result if s["metric"] == target), 0.0)


@pytest.mark.integration
@pytest.mark.slow
def test_every_dashboard_and_alert_query_returns_series_from_the_scraped_platform(platform, prometheus):
    t0 = time.monotonic()
    namespace = f"dashboards-live-{uuid.uuid4().hex[:8]}"
    queries = all_queries()
    with contextlib.ExitStack() as stack:
        # A reward and a feedback service of their own whose Redis is down (a port that refuses connections), for
        # the cache-error series: the embedded in-process cache cannot fail. They start now and are ready while the
        # embedded platform gets its traffic. Their bus is in-process too, so that nothing reaches the shared Kafka.
        cache_url = f"redis://127.0.0.1:{stack.enter_context(refused_port())}/0"
        # And a feedback service whose Kafka is down (another refused port), for the failed events: the embedded bus
        # cannot fail either. No topics to create; a metadata wait of 1 s, so that its sends fail within seconds.
        bus_url = f"kafka://127.0.0.1:{stack.enter_context(refused_port())}?max_block_s=1"
        bus_down = Service("feedback-kafka-down", ["feedback", "--bus-url", bus_url, "--cache-url", "memory://",
                                                   "--create-topics", "false", "--publish-timeout-s", "10"],
                           platform.root)
        stack.callback(bus_down.stop)
        redis_down = {
            "reward": Service("reward-redis-down", ["reward", "--bus-url", "memory://", "--cache-url", cache_url,
                                                    "--model-path", str(platform.reward_path)], platform.root),
            "feedback": Service("feedback-redis-down", ["feedback", "--bus-url", "memory://", "--cache-url",
                                                        cache_url], platform.root),
        }
        for service in redis_down.values():
            stack.callback(service.stop)
        # One target per component on the one address of the embedded process (see the module docstring).
        for component in COMPONENTS:
            stack.enter_context(prometheus.target("rlhf", platform.service.metrics_address, component=component,
                                                  namespace=namespace))
        seen = drive_traffic(platform)
        for component, service in redis_down.items():
            service.ready()
            stack.enter_context(prometheus.target("rlhf", service.metrics_address, component=component,
                                                  namespace=namespace))
        seen.update(drive_cache_down_traffic(redis_down["reward"], redis_down["feedback"]))
        bus_down.ready(serving=False)  # its health says NOT_SERVING: Kafka, which it needs for every ack, is down
        stack.enter_context(prometheus.target("rlhf", bus_down.metrics_address, component="feedback",
                                              namespace=namespace))
        seen.update(drive_bus_down_traffic(bus_down))
        platform.timings["traffic"] = time.monotonic() - t0
        expected_codes = {
            "invalid generate": grpc.StatusCode.INVALID_ARGUMENT, "invalid submit": grpc.StatusCode.INVALID_ARGUMENT,
            "invalid score": grpc.StatusCode.INVALID_ARGUMENT, "oversized submit": grpc.StatusCode.INVALID_ARGUMENT,
            "start run": grpc.StatusCode.FAILED_PRECONDITION, "broken reward load": grpc.StatusCode.FAILED_PRECONDITION,
            "broken policy load": grpc.StatusCode.FAILED_PRECONDITION, "bus down: submit": grpc.StatusCode.UNAVAILABLE,
        }
        for what, code in expected_codes.items():
            assert seen[what] == code, f"{what}: {seen[what]} (traffic: {seen})"
        assert {"SUBMIT_STATUS_ACCEPTED", "SUBMIT_STATUS_DUPLICATE", "SUBMIT_STATUS_REJECTED"} <= set(
            seen["stream acks"]), seen
        # Redis down degrades, never fails: scores from the model, feedback deduplicated on the replica.
        assert seen["redis down: score cache hits"] == [0, 0], seen
        assert seen["redis down: submit"] == ["SUBMIT_STATUS_ACCEPTED", "SUBMIT_STATUS_DUPLICATE"], seen

        # Two scrapes of every target after the traffic (rate() needs two samples), then every query until it
        # returns a series (at most QUERY_DEADLINE_S).
        t1 = time.monotonic()
        scrapes_at_end = prometheus.query(f'count_over_time(up{{namespace="{namespace}"}}[1m])')
        prometheus.wait_for(
            f'count_over_time(up{{namespace="{namespace}"}}[1m])', timeout=QUERY_DEADLINE_S,
            predicate=lambda now: len(now) == len(COMPONENTS) + len(redis_down) + 1 and all(
                float(s["value"][1]) >= 2 + _scrapes(scrapes_at_end, s["metric"]) for s in now))
        wanted = [q for q in queries if q.key not in ALLOWED_EMPTY]
        results: dict[Query, list[dict]] = {}
        errors: dict[Query, str] = {}
        deadline = time.monotonic() + QUERY_DEADLINE_S
        while True:
            for q in wanted:
                if q in results or q in errors:
                    continue
                try:
                    result = prometheus.query(scoped(q.promql, "namespace", namespace))
                except AssertionError as e:  # Prometheus rejected it: no point in polling
                    errors[q] = str(e)
                    continue
                if q.label:
                    result = [r for r in result if r["metric"].get(q.label)]
                if result:
                    results[q] = result
            if len(results) + len(errors) == len(wanted) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        platform.timings["scrapes and queries"] = time.monotonic() - t1
        scrapes = prometheus.query(f'count_over_time(up{{namespace="{namespace}"}}[1m])')
        allowed_with_data = [q for q in queries if q.key in ALLOWED_EMPTY
                             and prometheus.query(scoped(q.promql, "namespace", namespace))]
    platform.timings["test"] = time.monotonic() - t0

    missing = [q for q in wanted if q not in results and q not in errors]
    report = []
    for q in missing:
        report.append(f"- {q.file} / {q.name}: no series for\n    {scoped(q.promql, 'namespace', namespace)}")
    for q, message in errors.items():
        report.append(f"- {q.file} / {q.name}: {message}")
    for q in allowed_with_data:
        report.append(f"- {q.file} / {q.name} returns data now: remove it from ALLOWED_EMPTY")
    print(f"\n{len(results)}/{len(wanted)} queries returned series ({len(ALLOWED_EMPTY)} allowed empty); "
          f"scrapes per target: {[int(float(s['value'][1])) for s in scrapes]}; reward model trained (version, "
          f"published, comparisons, held out): {seen['trained']}; timings: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in platform.timings.items()))
    assert not report, (f"{len(report)} of {len(queries)} dashboard/rule queries failed against the live "
                        f"platform (traffic: {seen}):\n" + "\n".join(report))
