"""The rollout worker running ahead of the learner (rlhf.trainer.worker, rlhf.trainer.learner): it runs ahead as far as
the staleness bound allows and no further, admission counts the batches the learner holds for its next checkpoint
(used or dropped) as behind it, a waiting worker starts when the learner publishes,
a batch is importance-weighted whenever the learner's weights moved since its version, versions after the first are
written from the weights alone, a restarted learner redoes several pending batches once each, and the default
TrainerConfig's publish_every / checkpoint_every / max_staleness bound the lead."""
from __future__ import annotations

import dataclasses
import os
import threading
import time

import pytest
import torch

from rlhf.core.models import load_causal_lm, read_manifest
from rlhf.trainer.config import TrainerConfig
from rlhf.trainer.ppo_run import worker_settings
from rlhf.trainer.rollouts import PoolPrompt, PromptPool, prompt_id_of
from rlhf.trainer.worker import RolloutWorker, ScoredBatch
from unit.core.ppo_testing import PROMPTS, one_torch_thread
from unit.test_trainer_learner import config, make_loop, yes_fraction


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def fill(worker: RolloutWorker) -> int:
    """Batches the worker adds before admission stops it."""
    n = 0
    while worker.step() is not None:
        n += 1
        assert n < 100
    return n


def test_the_worker_runs_ahead_within_the_bound_and_nothing_it_generates_is_dropped(tmp_path):
    loop = make_loop(tmp_path, config(), max_staleness=1, publish_every=4, checkpoint_every=4)
    loop.learner.publish_progress("running")
    assert fill(loop.worker) == 8  # consumed at steps 0..7, under versions 0 and 1: at most 1 version old
    for _ in range(3):
        assert loop.learner.step().used and fill(loop.worker) == 0  # a batch now would be consumed under version 2
    assert loop.buffer.progress().held == 3 and loop.buffer.depth() == 8  # held for the checkpoint of step 4
    assert loop.learner.step().saved is not None
    assert loop.learner.version_index == 1 and loop.buffer.depth() == 4  # checkpointed and acknowledged
    assert fill(loop.worker) == 4  # with version 1: consumed at steps 8..11, under version 2
    while (result := loop.learner.step()) is not None:
        assert result.used and result.staleness <= 1
    assert loop.learner.dropped_stale == 0 and loop.learner.batches_used == 12


def test_a_dropped_batch_held_for_the_checkpoint_does_not_block_a_synchronous_worker(tmp_path):
    loop = make_loop(tmp_path, config(), max_staleness=0, worker_staleness=5)  # a worker that ignores the bound
    strict = RolloutWorker(dataclasses.replace(loop.worker.settings, max_staleness=0, worker_index=1, name="w-1"),
                           loop.buffer, loop.worker.pool, loop.worker.scorer)
    loop.learner.publish_progress("running")
    assert loop.worker.step() is not None and loop.worker.step() is not None  # both sampled by version 0
    assert loop.learner.step().used  # version 1
    dropped = loop.learner.step()
    assert not dropped.used and dropped.staleness == 1
    assert loop.buffer.depth() == 1 and loop.buffer.progress().held == 1  # held until the next checkpoint
    batch = strict.step()  # the held batch is behind the learner: version 1's batch is admitted
    assert batch is not None and batch.policy_version_index == 1
    used = loop.learner.step()
    assert used.used and used.staleness == 0 and "importance_weight" not in used.metrics
    assert loop.buffer.depth() == 0, "the drop is acknowledged with this checkpoint"


def test_a_worker_waiting_on_the_bound_starts_when_the_learner_publishes(tmp_path):
    loop = make_loop(tmp_path, config())  # synchronous: one batch, then wait for the update
    loop.worker.settings = dataclasses.replace(loop.worker.settings, idle_s=600.0)  # only a publication wakes it
    loop.learner.publish_progress("running")
    stop = threading.Event()
    thread = threading.Thread(target=loop.worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while loop.worker.batches_added < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.worker.batches_added == 1
        assert loop.learner.step().used  # publishes version 1 (with the acknowledgement)
        while loop.worker.batches_added < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.worker.batches_added == 2, "woken by the publication, long before its 600 s wait ends"
    finally:
        stop.set()
        loop.learner.publish_progress("paused")  # wakes the wait; the loop sees stop
        thread.join(120)
    assert not thread.is_alive()


def test_a_batch_of_the_current_version_is_weighted_once_the_weights_moved(tmp_path):
    loop = make_loop(tmp_path, config(), max_staleness=0, publish_every=2, checkpoint_every=2)
    loop.learner.publish_progress("running")
    assert fill(loop.worker) == 2  # both sampled by version 0, both used before version 1
    first, second = loop.learner.step(), loop.learner.step()
    assert first.staleness == second.staleness == 0
    assert "importance_weight" not in first.metrics, "sampled by exactly these weights: on-policy"
    w = second.metrics["importance_weight"]  # one update later: the learner's weights are not the sampler's
    assert 0 < w <= config().importance_clip and w != 1.0
    assert second.saved is not None and loop.learner.version_step == 2
    assert fill(loop.worker) == 2
    assert "importance_weight" not in loop.learner.step().metrics  # version 1's first batch: on-policy again


def test_versions_after_the_first_are_the_folder_save_pretrained_writes(tmp_path):
    loop = make_loop(tmp_path, config())
    loop.learner.publish_progress("running")
    saved = []
    for _ in range(3):
        assert loop.worker.step() is not None
        saved.append(loop.learner.step().saved)
    root = tmp_path / "artifacts"
    first, *later = (os.path.join(root, v.uri) for v in saved)
    assert loop.learner._writer._files is not None, "later versions take the weights-only path"
    for path in later:
        assert sorted(os.listdir(path)) == sorted(os.listdir(first))
        for name in os.listdir(first):
            if name not in ("model.safetensors", "manifest.json"):
                with open(os.path.join(first, name), "rb") as a, open(os.path.join(path, name), "rb") as b:
                    assert a.read() == b.read(), name
    model, _ = load_causal_lm(later[-1])
    for (name, a), (_, b) in zip(model.state_dict().items(), loop.learner.trainer.policy.state_dict().items()):
        assert torch.equal(a, b), name
    manifest = read_manifest(later[-1])
    assert manifest.version == saved[-1].version and manifest.parent == saved[-2].version
    # The worker took each new version by its weights alone, and holds the last.
    assert loop.worker.holder.version == saved[-2].version  # it generated the third batch with version 2
    loop.worker.step()
    assert loop.worker.holder.version == saved[-1].version
    for a, b in zip(loop.worker.holder.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_restarted_learner_redoes_several_pending_batches_each_once(tmp_path):
    cfg = config()
    loop = make_loop(tmp_path, cfg, max_staleness=3, publish_every=4, checkpoint_every=4)
    loop.learner.publish_progress("running")
    assert fill(loop.worker) == 16
    used = [loop.learner.step() for _ in range(7)]  # a checkpoint at step 4; steps 5-7 held, not acknowledged
    assert all(r.used for r in used) and loop.buffer.depth() == 12
    reference = {k: v.clone() for k, v in loop.learner.trainer.model.state_dict().items()}

    again = make_loop(tmp_path, cfg, max_staleness=3, publish_every=4, checkpoint_every=4, buffer=loop.buffer)
    assert again.learner.resume() and again.learner.trainer.global_step == 4
    redo = [again.learner.step() for _ in range(3)]
    assert [r.batch_id for r in redo] == [r.batch_id for r in used[4:]]
    assert all(r.used for r in redo) and again.learner.skipped == 0
    for k, v in again.learner.trainer.model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    nxt = again.learner.step()  # then the batches never delivered
    assert nxt.used and nxt.batch_id not in {r.batch_id for r in used}
    assert again.learner.batches_used == 8 and again.learner.skipped == 0


def test_the_default_config_lets_a_worker_run_two_versions_of_updates_ahead(tmp_path):
    defaults = TrainerConfig()
    assert (defaults.publish_every, defaults.checkpoint_every, defaults.max_staleness) == (4, 4, 1)
    loop = make_loop(tmp_path, config(), max_staleness=defaults.max_staleness,
                     publish_every=defaults.publish_every, checkpoint_every=defaults.checkpoint_every)
    c = dataclasses.replace(defaults, artifact_root=str(tmp_path / "artifacts"), ppo_batch_size=8,
                            ppo_response_length=6, ppo_seed=3)
    pool = PromptPool(seed=3, served_share=0.0)
    pool.add(PoolPrompt(prompt_id_of(p), p, "dataset") for p in PROMPTS)
    worker = RolloutWorker(worker_settings(c), loop.buffer, pool, lambda ps, rs: ScoredBatch(yes_fraction(ps, rs),
                                                                                             "reward-test"))
    loop.learner.publish_progress("running")
    assert fill(worker) == (defaults.max_staleness + 1) * defaults.publish_every
    results = [loop.learner.step() for _ in range(4)]
    assert [r.saved is not None for r in results] == [False, False, False, True]  # a version every 4 updates
    assert loop.buffer.depth() == 4, "acknowledged with the checkpoint of step 4"
