"""`rlhf simulate`'s pure logic: request plans, annotator judgements and the feedback events built from them (each
valid by the feedback service's own validation), windows, report lines, the summary and the plot."""
from __future__ import annotations

import random
import struct
import time
import zlib
from collections import Counter

import grpc
import pytest

from rlhf.core.plot import Marker, Panel, Series, render_panels
from rlhf.feedback.validation import Limits, validate_event
from rlhf.sim import AnnotatorPool, best_response, split_prompts
from rlhf.sim import simulate as sim
from rlhf.sim.annotators import Annotator
from rlhf.v1 import common_pb2, feedback_pb2, policy_pb2, trainer_pb2

TRAIN, HELD_OUT = split_prompts(sim.HELD_OUT_SHARE_OF_WORLD, seed=0)
PROMPT = next(p for p in TRAIN if p.topic == "chemicals" and p.intent == "how")
CONFIG = sim.SimulateConfig(target="127.0.0.1:50051", minutes=1.0)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


# --------------------------------------------------------------------------------------------- configuration


def test_targets_are_host_port_and_errors_name_the_option():
    assert sim.parse_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert sim.parse_target("grpc://policy.rlhf:50052") == "policy.rlhf:50052"
    for bad in ("localhost", ":50051", "host:port", "host:0", "host:70000"):
        with pytest.raises(ValueError, match="--feedback-target .*HOST:PORT"):
            sim.parse_target(bad, "--feedback-target")


@pytest.mark.parametrize(("change", "option"), [
    ({"minutes": 0.0}, "--minutes"), ({"minutes": float("inf")}, "--minutes"), ({"concurrency": 0}, "--concurrency"),
    ({"eval_share": 1.5}, "--eval-share"), ({"report_every_s": 0.0}, "--report-every"),
    ({"window_s": -1.0}, "--window-s"), ({"max_new_tokens": 0}, "--max-new-tokens"),
    ({"reward_target": "nope"}, "--reward-target"), ({"head_to_head": -1}, "--head-to-head"),
])
def test_bad_options_say_which_option(change, option):
    with pytest.raises(ValueError, match=option):
        sim.SimulateConfig(**{"target": "127.0.0.1:50051", "minutes": 1.0, **change})


def test_each_service_defaults_to_the_target():
    c = sim.SimulateConfig(target="a:1", minutes=1.0, reward_target="b:2")
    assert (c.address("policy"), c.address("feedback"), c.address("reward"), c.address("trainer")) == \
        ("a:1", "a:1", "b:2", "a:1")
    assert "secret" not in repr(sim.SimulateConfig(target="a:1", minutes=1.0, token="secret"))  # never printed


# --------------------------------------------------------------------------------------------- plans


def test_plans_split_held_out_and_train_traffic_by_product():
    rng = random.Random(0)
    plans = [sim.plan_request(rng, TRAIN, HELD_OUT, CONFIG) for _ in range(3000)]
    held = [p for p in plans if p.held_out]
    assert abs(len(held) / len(plans) - CONFIG.eval_share) < 0.03
    held_texts = {p.text for p in HELD_OUT}
    for p in plans:
        assert p.product == (sim.EVAL_PRODUCT if p.held_out else sim.PRODUCT)
        assert (p.prompt.text in held_texts) == p.held_out
        assert p.routing_key.startswith("user-") and 0 <= int(p.routing_key[5:]) < CONFIG.num_users
    assert {p.num_samples for p in held} == {1}
    train_samples = Counter(p.num_samples for p in plans if not p.held_out)
    mix = CONFIG.feedback
    n = sum(train_samples.values())
    assert set(train_samples) == {1, 2, mix.ranking_k}
    assert abs(train_samples[1] / n - mix.rating_share) < 0.03
    assert abs(train_samples[mix.ranking_k] / n - mix.ranking_share) < 0.03
    assert train_samples[2] > train_samples[1] + train_samples[mix.ranking_k]  # mostly pairwise


def test_eval_share_zero_and_one():
    rng = random.Random(1)
    none = sim.SimulateConfig(target="a:1", minutes=1.0, eval_share=0.0)
    every = sim.SimulateConfig(target="a:1", minutes=1.0, eval_share=1.0)
    assert not any(sim.plan_request(rng, TRAIN, HELD_OUT, none).held_out for _ in range(200))
    assert all(sim.plan_request(rng, TRAIN, HELD_OUT, every).held_out for _ in range(200))


def test_plans_are_reproducible_from_the_seed():
    def plans(seed):
        rng = random.Random(seed)
        return [sim.plan_request(rng, TRAIN, HELD_OUT, CONFIG) for _ in range(50)]

    assert plans(3) == plans(3) and plans(3) != plans(4)


# --------------------------------------------------------------------------------------------- judgements, events


def test_judgements_by_number_of_samples():
    rng = random.Random(0)
    annotator = Annotator("a", temperature=0.5)
    good, bad = best_response(PROMPT), "I cannot help with that."
    ratings = [sim.judge(annotator, PROMPT, [good], rng, scale_share=0.5) for _ in range(200)]
    assert all(j.kind == "rating" for j in ratings)
    scales = [j.scale for j in ratings if j.scale is not None]
    thumbs = [j.thumb_up for j in ratings if j.scale is None]
    assert scales and thumbs and all(1 <= s <= 5 for s in scales)
    assert sum(thumbs) / len(thumbs) > 0.9 and sum(s >= 4 for s in scales) / len(scales) > 0.9  # a great answer
    bad_thumbs = [sim.judge(annotator, PROMPT, [bad], rng, scale_share=0.0).thumb_up for _ in range(200)]
    assert sum(bad_thumbs) / len(bad_thumbs) < 0.1

    pairs = [sim.judge(annotator, PROMPT, [bad, good], rng) for _ in range(200)]
    assert all(j.kind == "pairwise" and sorted(j.order) == [0, 1] for j in pairs)
    assert sum(j.order[0] == 1 for j in pairs) / len(pairs) > 0.9  # the better one chosen, nearly always
    assert {j.strength for j in pairs} <= {"slight", "clear", "strong"}
    assert Counter(j.strength for j in pairs).most_common(1)[0][0] == "strong"  # 5 units of gold apart

    ranking = sim.judge(annotator, PROMPT, [bad, good, "Fire keeps people warm."], rng)
    assert ranking.kind == "ranking" and sorted(ranking.order) == [0, 1, 2]
    with pytest.raises(ValueError):
        sim.judge(annotator, PROMPT, [], rng)


def test_feedback_events_are_valid_and_name_the_served_responses():
    rng = random.Random(5)
    pool = AnnotatorPool()
    now = time.time()
    limits = Limits()
    for texts in ([best_response(PROMPT)], ["a.", "b."], ["a.", "b.", "c."], ["a.", "b.", "c.", "d."]):
        for _ in range(20):
            ids = [f"resp-{i}-{rng.randrange(10**6)}" for i in range(len(texts))]
            annotator = rng.choice(pool.annotators)
            judgement = sim.judge(annotator, PROMPT, texts, rng)
            event = sim.feedback_event(judgement, ids, event_id=f"sim-run-{rng.randrange(10**9)}",
                                       annotator_id=f"sim-{annotator.id}", prompt_id="prompt-1", created_at_s=now,
                                       metadata={"simulator": "rlhf simulate", "topic": PROMPT.topic})
            checked = validate_event(event, limits, now_s=now)
            assert checked.kind == judgement.kind
            assert event.product == sim.PRODUCT and event.prompt_id == "prompt-1"
            assert abs(event.created_at.ToNanoseconds() / 1e9 - now) < 1e-3
            if judgement.kind == "rating":
                assert checked.response_ids == ids[:1]
                assert event.rating.WhichOneof("value") == ("scale" if judgement.scale is not None else "thumb")
            else:  # best first, as the annotator ordered them
                assert checked.response_ids == [ids[i] for i in judgement.order]
            if judgement.kind == "pairwise":
                assert event.pairwise.strength != feedback_pb2.PREFERENCE_STRENGTH_UNSPECIFIED


# --------------------------------------------------------------------------------------------- windows and lines


def timeline() -> sim.Timeline:
    served = [sim.Served(0.5, "v1", True, 1.0, 0.5), sim.Served(1.0, "v1", False, -1.0, None),
              sim.Served(6.0, "v1", True, 2.0, 1.5), sim.Served(7.0, "v2", True, 3.0, 2.5),
              sim.Served(8.0, "v2", False, 0.0, 0.0), sim.Served(9.0, "v1", False, 0.5, None)]
    snapshots = [sim.Snapshot(0.0, 0, "", "v1"),
                 sim.Snapshot(6.5, 10, "v2", "v1", ppo_step=4, kl=0.25, trainer_policy_version="v2",
                              feedback_consumed=3)]
    return sim.Timeline(served=served, errors=[(2.0, "UNAVAILABLE"), (7.5, "UNAVAILABLE"), (8.0, "DEADLINE_EXCEEDED")],
                        feedback_sent=[1.0, 1.1, 7.0], feedback_accepted=[1.2, 7.1], snapshots=snapshots, requests=9)


def test_window_bounds():
    assert sim.window_bounds(0.0, 5.0) == []
    assert sim.window_bounds(3.0, 5.0) == [(0.0, 3.0)]
    assert sim.window_bounds(10.0, 5.0) == [(0.0, 5.0), (5.0, 10.0)]
    assert sim.window_bounds(13.0, 5.0) == [(0.0, 5.0), (5.0, 10.0), (10.0, 13.0)]
    assert sim.window_bounds(12.0, 5.0) == [(0.0, 5.0), (5.0, 12.0)]  # a short tail joins the window before


def test_summarize_a_window():
    w = sim.summarize(timeline(), 5.0, 10.0)
    assert w.responses == 4 and w.versions == {"v1": 0.5, "v2": 0.5}
    assert (w.gold_held_out, w.n_held_out) == (2.5, 2) and (w.gold_train, w.n_train) == (0.25, 2)
    assert (w.reward, w.n_reward) == (pytest.approx(4.0 / 3), 3)  # unscored responses left out
    assert (w.feedback_sent, w.feedback_accepted) == (1, 1)
    assert w.generate_errors == {"UNAVAILABLE": 1, "DEADLINE_EXCEEDED": 1}
    assert (w.canary_percent, w.candidate, w.ppo_step, w.kl) == (10, "v2", 4, 0.25)  # the last state before its end
    first = sim.summarize(timeline(), 0.0, 5.0)
    assert first.versions == {"v1": 1.0} and first.gold_train == -1.0 and first.ppo_step is None
    empty = sim.summarize(timeline(), 20.0, 25.0)
    assert empty.responses == 0 and empty.gold_held_out is None and empty.versions == {}


def test_progress_bar():
    assert sim.progress_bar(0.0, 10) == "[..........]"
    assert sim.progress_bar(0.5, 10) == "[#####.....]"
    assert sim.progress_bar(1.7, 10) == "[##########]"


def test_report_line():
    t = timeline()
    line = sim.format_report(9.0, 20.0, sim.summarize(t, 0.0, 10.0), sim.summarize(t, 0.0, float("inf")))
    assert "\n" not in line
    assert line.startswith("0:09 [#########...........]  45% | ")
    assert "served v1 67%, v2 33%" in line
    assert "canary 10% (v2)" in line
    assert "gold held-out +2.00 (n=3) train -0.17 (n=3)" in line
    assert "reward" in line
    assert "feedback 3 sent, 2 accepted" in line
    assert "generate errors 3 (UNAVAILABLE 2, DEADLINE_EXCEEDED 1)" in line
    assert "ppo step 4 kl 0.250 (v2)" in line
    # Nothing served yet, no trainer running PPO, GetPolicy not answering: said so, PPO left out
    quiet = sim.summarize(sim.Timeline(snapshots=[sim.Snapshot(0.0)]), 0.0, 1.0)
    line = sim.format_report(1.0, 20.0, quiet, quiet)
    assert "served nothing yet" in line and "canary ?" in line and "ppo" not in line and "reward" not in line
    assert "generate errors 0" in line


def test_version_changes_are_changes_of_the_split_not_of_the_samples():
    def snap(t, stable, candidate="", percent=0):
        return sim.Snapshot(t, percent, candidate, stable)

    snapshots = [
        snap(0.0, "v1", "v2", 0),  # v2 loaded, on standby (pinned requests only): not serving
        snap(2.0, "v1", "v2", 10),  # the canary starts
        snap(4.0, "v1", "v2", 50),  # more traffic: the same versions serve
        sim.Snapshot(5.0),  # GetPolicy did not answer: no change
        snap(6.0, "v2"),  # promoted
        snap(8.0, "v1"),  # rolled back
    ]
    changes = sim.version_changes(snapshots)
    assert [(c.t, c.serving, c.added, c.removed) for c in changes] == [
        (2.0, ("v1", "v2"), ("v2",), ()), (6.0, ("v2",), (), ("v1",)), (8.0, ("v1",), ("v1",), ("v2",))]
    assert [c.label for c in changes] == ["+v2", "-v1", "+v1 -v2"]
    assert sim.version_changes(snapshots[:1]) == [] and sim.version_changes([]) == []
    assert sim.serving_versions(sim.Snapshot(0.0)) is None


def test_run_summary_and_final_line():
    t = timeline()
    windows = [sim.summarize(t, a, b) for a, b in sim.window_bounds(10.0, 5.0)]
    summary = sim.summarize_run(t, windows, 10.0, interrupted=False)
    assert summary["first_window_gold_held_out"] == 1.0 and summary["last_window_gold_held_out"] == 2.5
    assert summary["gold_held_out_change"] == 1.5
    assert summary["versions_seen"] == {"v1": 4, "v2": 2}
    assert summary["version_changes"] == [{"t": 6.5, "serving": ["v1", "v2"], "added": ["v2"], "removed": []}]
    assert (summary["requests"], summary["responses"], summary["feedback_sent"]) == (9, 6, 3)
    assert summary["generate_errors"] == {"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1}
    line = sim.format_summary(summary, len(windows), "out/simulate")
    assert "held-out gold +1.00 -> +2.50 (+1.50) over 2 window(s)" in line and "versions seen: v1, v2" in line
    nothing = sim.summarize_run(sim.Timeline(), [], 1.0, interrupted=True)
    assert nothing["gold_held_out_change"] is None
    assert "no held-out responses" in sim.format_summary(nothing, 0, "out") and "(interrupted)" in \
        sim.format_summary(nothing, 0, "out")


def test_the_trainers_freshness_and_weight_sync_go_into_the_summary():
    assert sim.trainer_latency(None) is None
    status = trainer_pb2.TrainerStatus(
        freshness=trainer_pb2.LatencySummary(count=40, p50_seconds=61.25, p95_seconds=170.0, max_seconds=201.0))
    latency = sim.trainer_latency(status)
    assert latency == {"freshness": {"count": 40, "p50_s": 61.25, "p95_s": 170.0, "max_s": 201.0},
                       "weight_sync": {"count": 0, "p50_s": 0.0, "p95_s": 0.0, "max_s": 0.0}}
    line = sim.format_latency(latency)
    assert "freshness p50 61.2s p95 170.0s (40 observed)" in line and "weight sync: none observed" in line


def test_trainer_and_policy_state_from_their_replies():
    without_ppo = trainer_pb2.TrainerStatus(feedback_events_consumed=7, metrics={"rm_accuracy": 0.7})
    assert sim.trainer_view(without_ppo) == {"ppo_step": None, "kl": None, "trainer_policy_version": "",
                                             "feedback_consumed": 7}
    with_ppo = trainer_pb2.TrainerStatus(step=12, metrics={"kl": 0.5}, policy_version="policy-3")
    assert sim.trainer_view(with_ppo) == {"ppo_step": 12, "kl": 0.5, "trainer_policy_version": "policy-3",
                                          "feedback_consumed": 0}

    def loaded(version, role, percent):
        return policy_pb2.LoadedPolicy(version=common_pb2.ModelVersion(version=version), role=role,
                                       traffic_percent=percent)

    stable_only = policy_pb2.GetPolicyResponse(policies=[loaded("v1", policy_pb2.POLICY_ROLE_STABLE, 100)])
    assert sim.policy_split(stable_only) == ("v1", "", 0)
    canary = policy_pb2.GetPolicyResponse(policies=[loaded("v2", policy_pb2.POLICY_ROLE_CANDIDATE, 20),
                                                    loaded("v1", policy_pb2.POLICY_ROLE_STABLE, 80),
                                                    loaded("v0", policy_pb2.POLICY_ROLE_STANDBY, 0)])
    assert sim.policy_split(canary) == ("v1", "v2", 20)
    assert sim.policy_split(policy_pb2.GetPolicyResponse()) == ("", "", 0)  # nothing loaded yet


# --------------------------------------------------------------------------------------------- start-up probes


def test_probe_outcomes_say_what_to_do():
    def outcome(code, reachable=True, required=True):
        return sim.probe_outcome(code, "details", reachable, "h:1", "RewardService", "--reward-target", required)

    assert outcome(None) == sim.ProbeResult(True)
    with pytest.raises(sim.SimulateError, match=r"cannot reach h:1: start the platform with `rlhf up`"):
        outcome(grpc.StatusCode.UNAVAILABLE, reachable=False)
    with pytest.raises(sim.SimulateError, match="serves no rlhf.v1.RewardService: pass --reward-target"):
        outcome(grpc.StatusCode.UNIMPLEMENTED)
    with pytest.raises(sim.SimulateError, match="--token or set RLHF_AUTH_TOKEN"):
        outcome(grpc.StatusCode.UNAUTHENTICATED, required=False)
    optional = outcome(grpc.StatusCode.UNIMPLEMENTED, required=False)
    assert not optional.usable and "--reward-target" in optional.note
    not_ready = outcome(grpc.StatusCode.UNAVAILABLE)  # there, answering, but no model loaded yet
    assert not_ready.usable and "not ready" in not_ready.note


# --------------------------------------------------------------------------------------------- plot


def test_plot_is_a_png_with_the_version_changes_marked():
    t = timeline()
    windows = [sim.summarize(t, a, b) for a, b in sim.window_bounds(10.0, 5.0)]
    assert png_size(sim.render_plot(windows, sim.version_changes(t.snapshots))) == (640, 3 * (200 + 24 + 18) + 20)
    assert png_size(sim.render_plot([], [])) == (640, 746)  # nothing collected (Ctrl-C at once): still a figure


def test_panel_markers_are_drawn_and_widen_the_x_axis():
    def pixels(panel: Panel) -> bytes:
        data = render_panels([panel], width=200, panel_height=80)
        raw = zlib.decompress(data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8])
        return raw

    line = Series("y", [0.0, 1.0], [0.0, 1.0])
    plain = pixels(Panel("p", [line]))
    marked = pixels(Panel("p", [line], markers=[Marker(0.5, "v2")]))
    assert plain != marked
    assert pixels(Panel("p", [line], markers=[Marker(float("nan"))])) == plain  # an undefined x is skipped
    assert pixels(Panel("p", [line], markers=[Marker(3.0)])) != pixels(Panel("p", [line], markers=[Marker(1.0)]))


def test_dense_markers_keep_their_lines_but_not_labels_that_would_overlap():
    def pixels(*markers: Marker) -> bytes:
        data = render_panels([Panel("p", [Series("y", [0.0, 10.0], [0.0, 1.0])], markers=list(markers))],
                             width=400, panel_height=80)
        return zlib.decompress(data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8])

    # v3 at 5.1 would be drawn over v2's label: its line is drawn, its label is not, in whichever order they come
    assert pixels(Marker(5.0, "v2"), Marker(5.1, "v3")) == pixels(Marker(5.0, "v2"), Marker(5.1, ""))
    assert pixels(Marker(5.1, "v3"), Marker(5.0, "v2")) == pixels(Marker(5.0, "v2"), Marker(5.1, ""))
    assert pixels(Marker(5.0, "v2"), Marker(5.1, "")) != pixels(Marker(5.0, "v2"))
    # far enough apart, both labels are drawn
    assert pixels(Marker(2.0, "v2"), Marker(8.0, "v3")) != pixels(Marker(2.0, "v2"), Marker(8.0, ""))


def test_paired_win_rate_counts_ties_half_and_refuses_unpaired_lists():
    assert sim.paired_win_rate([1.0, 2.0, 0.0, 5.0], [0.0, 2.0, 1.0, 4.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert sim.paired_win_rate([0.3] * 3, [0.3] * 3) == 0.5  # a version against itself with the same seeds
    for ours, theirs in (([1.0], [1.0, 2.0]), ([], [])):
        with pytest.raises(ValueError, match="same number"):
            sim.paired_win_rate(ours, theirs)


def test_head_to_head_line():
    h = sim.HeadToHead("sft-1", "ppo-v0040", 72, 0.75, -0.25, 0.5, 2.5)
    assert sim.format_head_to_head(h) == ("rlhf simulate: head-to-head on 72 held-out answers: ppo-v0040 wins 75.0% "
                                          "against sft-1 by gold utility (-0.25 -> +0.50); the trainer's KL at its "
                                          "last step 2.50")
