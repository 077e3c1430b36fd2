"""TrainerService over gRPC: a thin adapter from the rlhf.v1 messages to the dataset, the consumer and the
reward-model trainer, and the component that owns them.

What runs: the feedback consumer (its own thread), reward-model training (a worker thread, one at a time) when
``min_new_comparisons`` new comparisons arrived or TrainRewardModel asks, and a continuous PPO run (``PPORun``: the
learner and the local rollout workers) with the canary controller that takes its versions to traffic.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid

import grpc
import grpc.aio

from rlhf.bus.base import Bus
from rlhf.cache.base import Cache
from rlhf.serving.component import ServiceComponent
from rlhf.serving.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
)
from rlhf.trainer import canary as canary_mod
from rlhf.trainer import metrics
from rlhf.trainer.buffer import RolloutBuffer, open_buffer
from rlhf.trainer.canary import CanaryController, CanarySettings
from rlhf.trainer.config import TrainerConfig
from rlhf.trainer.consume import FeedbackConsumer
from rlhf.trainer.dataset import Dataset, StoreOutcome
from rlhf.trainer.latency import LatencyWindow, WeightSync
from rlhf.trainer.reward import (
    NoBaseModel,
    RewardVersionTrainer,
    TooFewComparisons,
    version_to_proto,
)
from rlhf.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc

log = logging.getLogger(__name__)


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


KINDS = {common_pb2.MODEL_KIND_REWARD: "reward", common_pb2.MODEL_KIND_POLICY: "policy"}
RUN_STATES = {"running": trainer_pb2.RUN_STATE_RUNNING, "paused": trainer_pb2.RUN_STATE_PAUSED,
              "completed": trainer_pb2.RUN_STATE_COMPLETED, "failed": trainer_pb2.RUN_STATE_FAILED,
              "stopped": trainer_pb2.RUN_STATE_IDLE}


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, component: TrainerComponent) -> None:
        self.c = component

    async def GetStatus(self, request, context) -> trainer_pb2.TrainerStatus:
        return await asyncio.get_running_loop().run_in_executor(None, self.c.status)

    async def StartRun(self, request, context) -> trainer_pb2.TrainerStatus:
        stages = set(request.stages)
        if trainer_pb2.STAGE_SFT in stages:
            raise FailedPrecondition("stages: the trainer does not run SFT; fine-tune with `rlhf sft` and start the "
                                     "run from that policy (parent_policy_version, or policy_base_path)")
        if trainer_pb2.STAGE_REWARD_MODEL in stages:
            await self.c.train_reward_model(0)
        if stages and trainer_pb2.STAGE_PPO not in stages:
            return await self.GetStatus(request, context)
        await asyncio.get_running_loop().run_in_executor(
            None, self.c.start_run, request.parent_policy_version, int(request.ppo_steps))
        return await self.GetStatus(request, context)

    async def PauseRun(self, request, context) -> trainer_pb2.TrainerStatus:
        self.c.consumer.pause()
        if self.c.run is not None:
            self.c.run.pause()
        return await self.GetStatus(request, context)

    async def ResumeRun(self, request, context) -> trainer_pb2.TrainerStatus:
        self.c.consumer.resume()
        if self.c.run is not None:
            self.c.run.resume()
        return await self.GetStatus(request, context)

    async def TrainRewardModel(self, request, context) -> trainer_pb2.TrainRewardModelResponse:
        return await self.c.train_reward_model(request.min_comparisons)

    async def ListVersions(self, request, context) -> trainer_pb2.ListVersionsResponse:
        limit = request.limit or 100
        if limit > 1000:
            raise InvalidArgument("limit", f"is {limit}; at most 1000")
        kind = KINDS.get(request.kind) if request.kind else None
        records = self.c.dataset.versions(kind=kind, limit=limit)
        return trainer_pb2.ListVersionsResponse(versions=[version_to_proto(r) for r in records])

    async def Promote(self, request, context) -> trainer_pb2.PromoteResponse:
        if not request.version:
            raise InvalidArgument("version", "required")
        if not 1 <= request.traffic_percent <= 100:
            raise InvalidArgument("traffic_percent", f"is {request.traffic_percent}; must be in 1..100")
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(None, self.c.is_policy_version, request.version):
            record = await loop.run_in_executor(None, self.c.canary.promote, request.version,
                                                request.traffic_percent)
            return trainer_pb2.PromoteResponse(version=canary_mod.policy_version_proto(record, self.c.config.policy_name),
                                               traffic_percent=request.traffic_percent)
        try:
            mv = await loop.run_in_executor(None, self.c.reward.promote, request.version, request.traffic_percent)
        except KeyError:
            raise NotFound(f"version: {request.version} is not a version of this trainer") from None
        except ValueError as e:
            raise FailedPrecondition(str(e)) from None
        return trainer_pb2.PromoteResponse(version=mv, traffic_percent=request.traffic_percent)

    async def Rollback(self, request, context) -> trainer_pb2.RollbackResponse:
        if request.kind == common_pb2.MODEL_KIND_POLICY:
            loop = asyncio.get_running_loop()
            try:
                target = await loop.run_in_executor(None, self.c.canary.rollback)
            except LookupError as e:
                raise FailedPrecondition(str(e)) from None
            record = await loop.run_in_executor(None, self.c.policy_record, target)
            return trainer_pb2.RollbackResponse(version=canary_mod.policy_version_proto(
                record or {"version": target}, self.c.config.policy_name))
        if request.kind != common_pb2.MODEL_KIND_REWARD:
            raise InvalidArgument("kind", "must be MODEL_KIND_POLICY or MODEL_KIND_REWARD")
        try:
            mv = await asyncio.get_running_loop().run_in_executor(None, self.c.reward.rollback)
        except LookupError as e:
            raise FailedPrecondition(str(e)) from None
        return trainer_pb2.RollbackResponse(version=mv)


class TrainerComponent(ServiceComponent):
    """The trainer with its dataset, feedback consumer and reward-model trainer."""

    service_name = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name

    def __init__(self, config: TrainerConfig, *, bus: Bus | None = None, cache: Cache | None = None,
                 buffer: RolloutBuffer | None = None) -> None:
        super().__init__(config, bus=bus, cache=cache)
        self.config: TrainerConfig = config
        os.makedirs(os.path.dirname(os.path.abspath(config.dataset_path)), exist_ok=True)
        self.dataset = Dataset(config.dataset_path, heldout_share=config.heldout_share,
                               join_timeout_s=config.join_timeout_s, cache_mb=config.dataset_cache_mb,
                               checkpoint_pages=config.dataset_checkpoint_pages)
        self.reward = RewardVersionTrainer(config, self.dataset, self.bus)
        skips_history = getattr(getattr(self.bus, "config", None), "auto_offset_reset", "earliest") == "latest"
        self.consumer = FeedbackConsumer(self.bus, self.dataset, group=config.group_id,
                                         max_records=config.max_records, housekeeping_s=config.housekeeping_s,
                                         unknown_from_start=not skips_history,
                                         responses_ahead=config.responses_ahead_records,
                                         responses_ahead_s=config.responses_ahead_s, on_stored=self._on_stored)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._training: asyncio.Future | None = None
        self.buffer: RolloutBuffer = buffer if buffer is not None else open_buffer(config.rollout_buffer_url)
        self.canary = CanaryController(
            CanarySettings(canary_percent=config.canary_percent, promote_after=config.promote_after,
                           tolerance=config.promote_tolerance, sample=config.canary_sample,
                           model_name=config.policy_name, keep_versions=config.keep_versions),
            self.dataset, self._publish_model_event, self._score_texts)
        self.canary.on_served = self._observe_freshness
        self.freshness = LatencyWindow()
        """Feedback stored -> first served policy version whose reward model was trained on it (GetStatus)."""
        self.weight_sync = WeightSync(LatencyWindow(), observe=metrics.WEIGHT_SYNC_SECONDS.observe)
        """A version saved -> the learner's first rollout batch generated with it (GetStatus, the histogram)."""
        self.run = None  # a PPORun once one was started
        self._feed = None
        self._own_address = ""
        self._scorer = None
        self._run_lock = threading.Lock()
        self._serving_stop = threading.Event()
        self._serving_thread: threading.Thread | None = None

    def register(self, server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(self), server)

    async def start(self) -> None:
        if self.config.torch_num_threads:
            import torch

            torch.set_num_threads(self.config.torch_num_threads)
        self._loop = asyncio.get_running_loop()
        await self.ensure_topics()
        current = self.reward.current()
        if current is not None:
            metrics.REWARD_HELDOUT_ACCURACY.set(current.get("heldout_accuracy", 0.0))
            metrics.reward_published(current["created_at"])
        self.consumer.start()
        self._serving_thread = threading.Thread(target=self._serving_loop, name="canary", daemon=True)
        self._serving_thread.start()
        if self.config.auto_start:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.start_run, "", self.config.ppo_steps)
            except ServiceError as e:
                log.warning("no PPO run started: %s", e)

    def bound(self, address: str) -> None:
        self._own_address = address

    async def check(self) -> None:
        # Serving status and versions needs only the dataset; consumption retries by itself while the bus is down
        # (GetStatus says so, and rlhf_trainer_consuming).
        await asyncio.get_running_loop().run_in_executor(None, self.dataset.sizes)

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        self._serving_stop.set()
        if self.run is not None:
            await loop.run_in_executor(None, self.run.stop)
        if self._feed is not None:
            await loop.run_in_executor(None, self._feed.stop)
        await loop.run_in_executor(None, self.consumer.stop)
        if self._training is not None and not self._training.done():
            log.info("waiting for the reward-model training in progress to finish")
            await asyncio.wait([self._training], timeout=self.config.shutdown_grace_s)
        await loop.run_in_executor(None, self.buffer.close)
        await self.close_dependencies()

    # ------------------------------------------------------------------------------------------ PPO runs

    def reward_address(self) -> str:
        from rlhf.train.reward_client import parse_address

        return parse_address(self.config.reward_url) if self.config.reward_url else self._own_address

    def _reward_client(self):
        from rlhf.train.reward_client import RewardClient

        token = (self.config.admin_token or self.config.auth_token).split(",")[0].strip()
        return RewardClient("grpc://" + self.reward_address(), token=token)

    def _rollout_scorer(self):
        from rlhf.trainer.worker import ScoredBatch

        client = self._reward_client()

        def score(prompts, responses) -> ScoredBatch:
            scores = client(list(prompts), list(responses))
            return ScoredBatch(scores, client.last_version)

        return score

    def _score_texts(self, prompts, responses) -> list[float]:
        if self._scorer is None:
            self._scorer = self._reward_client()
        return self._scorer(list(prompts), list(responses)).tolist()

    def _publish_model_event(self, event) -> None:
        from rlhf.bus import topics

        self.bus.send(topics.MODELS, event.SerializeToString(), key=event.version.name.encode()).result(60)

    def is_policy_version(self, version: str) -> bool:
        return self.policy_record(version) is not None

    def policy_record(self, version: str) -> dict | None:
        return self.dataset.version(version, kind="policy")

    def _parent(self, requested: str) -> tuple[str, str]:
        """(version, uri) a run starts from: the requested version, else the served stable one, else
        policy_base_path."""
        from rlhf.serving.model_events import version_of_folder
        from rlhf.v1 import common_pb2 as cpb

        if requested:
            record = self.policy_record(requested)
            if record is None:
                raise NotFound(f"parent_policy_version: {requested} is not a policy version of this trainer")
            return requested, record["uri"]
        stable = self.canary.stable()
        record = self.policy_record(stable) if stable else None
        if record is not None and record.get("uri"):
            return stable, record["uri"]
        if not self.config.policy_base_path:
            raise FailedPrecondition("no parent policy: set policy_base_path (the served SFT policy's folder) or pass "
                                     "parent_policy_version")
        path = self.config.policy_base_path
        full = path if os.path.isabs(path) else os.path.join(self.config.artifact_root, path)
        if not os.path.isdir(full):
            raise FailedPrecondition(f"policy_base_path {full} is not a folder")
        mv = version_of_folder(full, name=self.config.policy_name, kind=cpb.MODEL_KIND_POLICY)
        return mv.version, path

    def start_run(self, parent_version: str = "", ppo_steps: int = 0) -> None:
        """StartRun (blocking: loads the models). Resumes the last run when it was not completed and no parent is
        asked for; FAILED_PRECONDITION while one runs."""
        from rlhf.trainer.ppo_run import COMPLETED, FAILED, RUNNING, PPORun, RunSpec
        from rlhf.trainer.prompt_feed import PromptFeed
        from rlhf.trainer.rollouts import PromptPool

        with self._run_lock:
            if self.run is not None and self.run.state not in (COMPLETED, FAILED):
                raise FailedPrecondition(f"run {self.run.spec.run_id} is {self.run.state}; pause, resume or let it "
                                         "complete (GetStatus)")
            saved = json.loads(self.dataset.get_state("ppo.run") or "null")
            if saved and not parent_version and saved.get("state") not in (COMPLETED, FAILED) and self.run is None:
                spec = RunSpec(**saved["spec"])
                state = saved.get("state", RUNNING)
            else:
                version, uri = self._parent(parent_version)
                stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
                spec = RunSpec(run_id=f"ppo-{stamp}-{uuid.uuid4().hex[:4]}", parent_version=version,
                               parent_uri=uri, ppo_steps=ppo_steps or self.config.ppo_steps)
                state = RUNNING
            if not self.canary.stable():  # the parent is what is served: the first stable version
                if self.policy_record(spec.parent_version) is None:
                    self.dataset.put_version(spec.parent_version, "policy", canary_mod.STABLE,
                                             {"uri": spec.parent_uri, "parent": "", "name": self.config.policy_name})
                self.canary.set_stable(spec.parent_version)
            pool = PromptPool(seed=self.config.ppo_seed, served_share=self.config.served_share)
            if self.config.local_workers:
                feed = PromptFeed(self.bus, pool, exclude_products=self.config.excluded_products)
                feed.start()
                if self._feed is not None:
                    self._feed.stop()
                self._feed = feed
            run = PPORun(self.config, spec, self.buffer, pool=pool, scorer_factory=self._rollout_scorer,
                         on_saved=self._on_saved, on_state=lambda st, msg: self._save_run(spec, st),
                         lineage=self._lineage)
            run.on_result = self._on_result
            run.start(state)
            self.run = run
            self._save_run(spec, run.state)
            log.info("PPO run %s %s from %s", spec.run_id, "resumed" if saved and spec.run_id == saved["spec"]["run_id"]
                     else "started", spec.parent_version)

    def _depth(self) -> int:
        return _depth_or_minus_one(self.buffer)

    def _save_run(self, spec, state: str) -> None:
        import dataclasses as dc

        self.dataset.set_state("ppo.run", json.dumps({"spec": dc.asdict(spec), "state": state}))

    def _lineage(self) -> dict:
        offsets = self.dataset.stored_offsets()
        return {"dataset_offsets": {f"{t}/{p}": o for (t, p), o in sorted(offsets.items())}}

    def _on_saved(self, saved) -> None:
        assert self.run is not None
        offsets = self.dataset.stored_offsets()
        record = {
            "name": self.config.policy_name, "uri": saved.uri,
            "parent": self.run.learner.versions[-2].version if len(self.run.learner.versions) > 1
            else self.run.spec.parent_version,
            "reward_model_version": saved.reward_model_version, "run_id": self.run.spec.run_id,
            "learner_step": saved.step,
            "data_refs": [f"{t}/{p}:0-{o}" for (t, p), o in sorted(offsets.items())],
            "labels": {k: f"{v:.6g}" for k, v in saved.metrics.items()},
        }
        self.dataset.put_version(saved.version, "policy", canary_mod.SAVED, record)
        self.weight_sync.saved(saved.version, saved.saved_at)

    def _on_result(self, result) -> None:
        """Each learner step (learner thread): weight sync, when its batch is the first of a newly saved version."""
        if result.batch is not None:
            self.weight_sync.batch(result.batch.policy_version, result.batch.created_at)

    def _serving_loop(self) -> None:
        """The canary controller's ticks (thread): promotion and rollback decisions, version gauges."""
        while not self._serving_stop.wait(self.config.housekeeping_s):
            try:
                decision = self.canary.tick()
                if decision is not None:
                    metrics.CANARY_DECISIONS.labels("promoted" if decision.promoted else "rolled_back").inc()
                self.canary.prune(self.config.artifact_root)
                canary = self.canary.canary()
                metrics.set_role("stable", self.canary.stable())
                metrics.set_role("canary", canary["version"] if canary else "")
            except Exception as e:  # noqa: BLE001 - the bus or reward service may be down: next tick retries
                log.warning("canary controller: %s", e)

    def _observe_freshness(self, record: dict, served_at: float) -> None:
        """Freshness: feedback that the version's reward model was the first served one trained on."""
        rm = record.get("reward_model_version", "")
        last = self.dataset.get_state("policy.served_reward_model") or ""
        if not rm or rm == last:
            return
        current = self.dataset.version(rm, kind="reward")
        previous = self.dataset.version(last, kind="reward") if last else None
        if current is not None:
            after = previous["created_at"] if previous is not None else 0.0
            for stored_at in self.dataset.feedback_stored_between(after, current["created_at"]):
                metrics.FRESHNESS_SECONDS.observe(max(0.0, served_at - stored_at))
                self.freshness.observe(served_at - stored_at)
        self.dataset.set_state("policy.served_reward_model", rm)

    # ------------------------------------------------------------------------------------------ reward models

    def _on_stored(self, outcome: StoreOutcome) -> None:
        """After each stored batch (consumer thread): start a training when enough new comparisons arrived."""
        if outcome.comparisons and self._loop is not None and self.reward.due():
            self._loop.call_soon_threadsafe(self._train_in_background)

    def _train_in_background(self) -> None:
        if self._training is not None and not self._training.done():
            return
        if not self.reward.due():
            return
        self._training = asyncio.ensure_future(self._train_logged())

    async def _train_logged(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.reward.train)
        except (TooFewComparisons, NoBaseModel) as e:
            log.info("reward-model training skipped: %s", e)
        except Exception:
            log.exception("reward-model training failed")

    async def train_reward_model(self, min_comparisons: int) -> trainer_pb2.TrainRewardModelResponse:
        if self.reward.training.is_set():
            raise FailedPrecondition("a reward-model training is running; wait for it (GetStatus)")
        try:
            outcome = await asyncio.get_running_loop().run_in_executor(None, self.reward.train, min_comparisons)
        except TooFewComparisons as e:
            raise FailedPrecondition(str(e)) from None
        except NoBaseModel as e:
            raise FailedPrecondition(f"{e}; set reward_base_path") from None
        return trainer_pb2.TrainRewardModelResponse(
            version=outcome.version, heldout_accuracy=outcome.heldout_accuracy, comparisons=outcome.comparisons,
            published=outcome.published, incumbent_heldout_accuracy=outcome.incumbent_accuracy,
            heldout_comparisons=outcome.heldout)

    # ------------------------------------------------------------------------------------------ status

    def status(self) -> trainer_pb2.TrainerStatus:
        """GetStatus (blocking: reads the dataset)."""
        from rlhf.bus import topics

        consuming = self.consumer.running and not self.consumer.last_error
        state = trainer_pb2.RUN_STATE_PAUSED if self.consumer.paused else trainer_pb2.RUN_STATE_RUNNING
        run = self.run.status() if self.run is not None else None
        if run is not None:
            state = RUN_STATES[run["state"]]
        current = self.reward.current()
        out = trainer_pb2.TrainerStatus(
            state=state,
            stage=trainer_pb2.STAGE_REWARD_MODEL if self.reward.training.is_set() else trainer_pb2.STAGE_UNSPECIFIED,
            reward_model_version=current["version"] if current else "",
            feedback_events_consumed=self.consumer.consumed.get(topics.FEEDBACK, 0),
            responses_consumed=self.consumer.consumed.get(topics.RESPONSES, 0),
            new_comparisons=self.reward.new_comparisons(),
            consuming=consuming,
            message=self.consumer.last_error,
        )
        if run is not None:
            out.run_id, out.step, out.total_steps = run["run_id"], run.get("step", 0), run["total_steps"]
            out.policy_version = run.get("version", "")
            out.message = run["message"] or "; ".join(run["worker_errors"]) or out.message
            if not self.reward.training.is_set():
                out.stage = trainer_pb2.STAGE_PPO
            for k, v in run.get("metrics", {}).items():
                out.metrics[k] = float(v)
            for k in ("batches_used", "dropped_stale", "skipped", "version_index"):
                out.metrics[f"run_{k}"] = float(run.get(k, 0))
            if "guard" in run:
                out.metrics["paused_by_guard"] = 1.0
            out.metrics["rollout_buffer_depth"] = float(self._depth())
            canary = self.canary.canary()
            out.metrics["canary_percent"] = float(canary["percent"]) if canary else 0.0
        if current:
            out.metrics["reward_heldout_accuracy"] = float(current.get("heldout_accuracy", 0.0))
        stored = self.dataset.stored_offsets()
        for (topic, partition), lag in sorted(self.consumer.lag.items()):
            offset = stored.get((topic, partition), 0)
            out.lag.append(trainer_pb2.PartitionLag(topic=topic, partition=partition, stored_offset=offset,
                                                    end_offset=offset + lag, lag=lag))
        for kind, n in self.dataset.sizes().items():
            out.dataset[kind] = n
        for field, window in (("freshness", self.freshness), ("weight_sync", self.weight_sync.window)):
            summary = window.summary()
            getattr(out, field).CopyFrom(trainer_pb2.LatencySummary(
                count=summary.count, p50_seconds=summary.p50_s, p95_seconds=summary.p95_s, max_seconds=summary.max_s))
        out.updated_at.GetCurrentTime()
        return out


def _depth_or_minus_one(buffer: RolloutBuffer) -> int:
    try:
        return buffer.depth()
    except Exception:  # noqa: BLE001 - the buffer may be down; the status still answers
        return -1
