"""TrainerService over gRPC: a thin adapter from the rlhf.v1 messages to the dataset, the consumer and the
reward-model trainer, and the component that owns them.

What runs: the feedback consumer (its own thread), and reward-model training (a worker thread, one at a time) when
``min_new_comparisons`` new comparisons arrived or TrainRewardModel asks. Continuous PPO (StartRun, policy versions)
belongs to the learner and rollout workers, which are not part of this service yet: those calls say so.
"""
from __future__ import annotations

import asyncio
import logging
import os

import grpc
import grpc.aio

from rlhf.bus.base import Bus
from rlhf.cache.base import Cache
from rlhf.serving.component import ServiceComponent
from rlhf.serving.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError
from rlhf.trainer import metrics
from rlhf.trainer.config import TrainerConfig
from rlhf.trainer.consume import FeedbackConsumer
from rlhf.trainer.dataset import Dataset, StoreOutcome
from rlhf.trainer.reward import NoBaseModel, RewardVersionTrainer, TooFewComparisons, version_to_proto
from rlhf.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc

log = logging.getLogger(__name__)


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


KINDS = {common_pb2.MODEL_KIND_REWARD: "reward", common_pb2.MODEL_KIND_POLICY: "policy"}


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, component: TrainerComponent) -> None:
        self.c = component

    async def GetStatus(self, request, context) -> trainer_pb2.TrainerStatus:
        return await asyncio.get_running_loop().run_in_executor(None, self.c.status)

    async def StartRun(self, request, context) -> trainer_pb2.TrainerStatus:
        raise Unimplemented("continuous PPO runs are not part of this trainer yet; it consumes feedback and trains "
                            "reward models (TrainRewardModel)")

    async def PauseRun(self, request, context) -> trainer_pb2.TrainerStatus:
        self.c.consumer.pause()
        return await self.GetStatus(request, context)

    async def ResumeRun(self, request, context) -> trainer_pb2.TrainerStatus:
        self.c.consumer.resume()
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
        try:
            mv = await loop.run_in_executor(None, self.c.reward.promote, request.version, request.traffic_percent)
        except KeyError:
            raise NotFound(f"version: {request.version} is not a version of this trainer") from None
        except ValueError as e:
            raise FailedPrecondition(str(e)) from None
        return trainer_pb2.PromoteResponse(version=mv, traffic_percent=request.traffic_percent)

    async def Rollback(self, request, context) -> trainer_pb2.RollbackResponse:
        if request.kind != common_pb2.MODEL_KIND_REWARD:
            raise FailedPrecondition("kind: this trainer publishes reward-model versions only so far; roll policies "
                                     "back with PolicyService.Rollback")
        try:
            mv = await asyncio.get_running_loop().run_in_executor(None, self.c.reward.rollback)
        except LookupError as e:
            raise FailedPrecondition(str(e)) from None
        return trainer_pb2.RollbackResponse(version=mv)


class TrainerComponent(ServiceComponent):
    """The trainer with its dataset, feedback consumer and reward-model trainer."""

    service_name = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name

    def __init__(self, config: TrainerConfig, *, bus: Bus | None = None, cache: Cache | None = None) -> None:
        super().__init__(config, bus=bus, cache=cache)
        self.config: TrainerConfig = config
        os.makedirs(os.path.dirname(os.path.abspath(config.dataset_path)), exist_ok=True)
        self.dataset = Dataset(config.dataset_path, heldout_share=config.heldout_share,
                               join_timeout_s=config.join_timeout_s)
        self.reward = RewardVersionTrainer(config, self.dataset, self.bus)
        skips_history = getattr(getattr(self.bus, "config", None), "auto_offset_reset", "earliest") == "latest"
        self.consumer = FeedbackConsumer(self.bus, self.dataset, group=config.group_id,
                                         max_records=config.max_records, housekeeping_s=config.housekeeping_s,
                                         unknown_from_start=not skips_history, on_stored=self._on_stored)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._training: asyncio.Future | None = None

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

    async def check(self) -> None:
        # Serving status and versions needs only the dataset; consumption retries by itself while the bus is down
        # (GetStatus says so, and rlhf_trainer_consuming).
        await asyncio.get_running_loop().run_in_executor(None, self.dataset.sizes)

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.consumer.stop)
        if self._training is not None and not self._training.done():
            log.info("waiting for the reward-model training in progress to finish")
            await asyncio.wait([self._training], timeout=self.config.shutdown_grace_s)
        await self.close_dependencies()

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
        except Exception:  # noqa: BLE001 - counted as failed; the next batch may try again
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
        if current:
            out.metrics["reward_heldout_accuracy"] = float(current.get("heldout_accuracy", 0.0))
        stored = self.dataset.stored_offsets()
        for (topic, partition), lag in sorted(self.consumer.lag.items()):
            offset = stored.get((topic, partition), 0)
            out.lag.append(trainer_pb2.PartitionLag(topic=topic, partition=partition, stored_offset=offset,
                                                    end_offset=offset + lag, lag=lag))
        for kind, n in self.dataset.sizes().items():
            out.dataset[kind] = n
        out.updated_at.GetCurrentTime()
        return out
