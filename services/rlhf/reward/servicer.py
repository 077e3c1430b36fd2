"""RewardService over gRPC: a thin adapter from the rlhf.v1 messages to :class:`RewardScorer` and
:class:`RewardVersions`, and the component that owns the models, the bus, the cache and the model-event follower."""
from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import grpc.aio

from rlhf.bus.base import Bus
from rlhf.cache.base import Cache, CacheError
from rlhf.reward import metrics
from rlhf.reward.config import RewardConfig
from rlhf.reward.engine import EngineMetrics, ScoringEngine
from rlhf.reward.inputs import InputBuilder
from rlhf.reward.service import RewardScorer
from rlhf.reward.versions import PROBE, LoadedReward, RewardVersions
from rlhf.serving.component import ServiceComponent
from rlhf.serving.errors import InvalidArgument
from rlhf.serving.model_events import ModelEventFollower, group_id, version_of_folder
from rlhf.v1 import common_pb2, reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)

FALLBACK_CONTEXT = 2048
"""Context of a model whose config and tokenizer name none."""


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, scorer: RewardScorer, versions: RewardVersions) -> None:
        self.scorer = scorer
        self.versions = versions

    async def Score(self, request: reward_pb2.ScoreRequest,
                    context: grpc.aio.ServicerContext) -> reward_pb2.ScoreResponse:
        return await self.scorer.score(request, context.time_remaining())

    async def GetRewardModel(self, request: reward_pb2.GetRewardModelRequest,
                             context: grpc.aio.ServicerContext) -> reward_pb2.GetRewardModelResponse:
        return self.versions.describe()

    async def LoadRewardModel(self, request: reward_pb2.LoadRewardModelRequest,
                              context: grpc.aio.ServicerContext) -> reward_pb2.GetRewardModelResponse:
        if not request.HasField("version"):
            raise InvalidArgument("version", "required: the version id and the uri of its weights")
        await self.versions.load(request.version)
        return self.versions.describe()


def load_version(config: RewardConfig, loop: asyncio.AbstractEventLoop, version: common_pb2.ModelVersion,
                 path: str) -> LoadedReward:
    """A version from its folder, on the configured device, with its engine (blocking)."""
    from rlhf.core.models import load_reward_model
    from rlhf.core.runtime import model_context, resolve_device, resolve_dtype

    reward_model = load_reward_model(path, dtype=resolve_dtype(config.dtype))
    context = model_context(reward_model.model.config, config.context_limit)
    if not context:
        own = int(getattr(reward_model.tokenizer, "model_max_length", 0) or 0)
        context = own if 0 < own < 1_000_000 else FALLBACK_CONTEXT
    reward_model.max_length = context
    reward_model.model.to(resolve_device(config.device))
    reward_model.model.eval()
    inputs = InputBuilder(reward_model)
    inputs.check(PROBE)  # the fast formatting and tokenizing give the core's texts and ids, or are off
    engine = ScoringEngine(
        reward_model, loop=loop, name=version.version, max_batch_size=config.max_batch_size,
        max_wait_s=config.max_wait_s, max_queue=config.max_queue, bucket_ratio=config.bucket_ratio,
        metrics=EngineMetrics(
            batch_size=metrics.BATCH_SIZE.labels(version.version),
            forward_seconds=metrics.FORWARD_SECONDS.labels(version.version),
            padding=metrics.PADDING.labels(version.version),
            queue_depth=metrics.QUEUE_DEPTH,
        ),
    )
    return LoadedReward(version=version, model=reward_model, engine=engine, context=context, inputs=inputs)


class RewardComponent(ServiceComponent):
    """The reward service with its models, bus, cache and model-event follower."""

    service_name = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name

    def __init__(self, config: RewardConfig, *, bus: Bus | None = None, cache: Cache | None = None) -> None:
        super().__init__(config, bus=bus, cache=cache)
        self.config: RewardConfig = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self.versions = RewardVersions(self._load, artifact_root=config.artifact_root, model_name=config.model_name,
                                       drain_timeout_s=config.drain_timeout_s)
        self.scorer = RewardScorer(config, self.versions, self.cache, cache_ttl_s=config.score_cache_ttl_s)
        self.follower: ModelEventFollower | None = None
        self._startup: asyncio.Task | None = None

    def register(self, server: grpc.aio.Server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(self.scorer, self.versions), server)

    def _load(self, version: common_pb2.ModelVersion, path: str) -> LoadedReward:
        assert self._loop is not None, "start() first"
        return load_version(self.config, self._loop, version, path)

    async def start(self) -> None:
        if self.config.torch_num_threads:
            import torch

            torch.set_num_threads(self.config.torch_num_threads)
        self._loop = asyncio.get_running_loop()
        await self.ensure_topics()
        # Loading takes seconds: the server answers meanwhile, health NOT_SERVING.
        self._startup = asyncio.create_task(self._load_then_follow(), name="reward-startup")

    async def _load_then_follow(self) -> None:
        if self.config.model_path:
            path = self.versions.resolve_path(self.config.model_path)
            version = version_of_folder(path, name=self.config.model_name, kind=common_pb2.MODEL_KIND_REWARD,
                                        version=self.config.initial_version, uri=self.config.model_path)
            try:
                await self.versions.load(version)
            except Exception:  # noqa: BLE001 - health stays NOT_SERVING; LoadRewardModel or an event may load one
                log.exception("the initial reward model %s could not be loaded", path)
        if self.config.follow_model_events:
            self.follower = ModelEventFollower(
                self.bus, self.versions.apply_events,
                group=group_id(self.config.models_group_prefix, self.config.replica),
                on_unreadable=metrics.MODEL_EVENTS.labels("failed").inc,
            )
            self.follower.start(asyncio.get_running_loop())

    async def check(self) -> None:
        await self.versions.check()
        try:
            await self.cache.ping()
        except CacheError as exc:  # scoring degrades without the score cache; it does not stop
            log.warning("score cache unavailable (%s): every item is scored by the model until it is back", exc)

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._startup
        if self.follower is not None:
            await loop.run_in_executor(None, self.follower.stop)
        await self.versions.close()
        await self.close_dependencies()
