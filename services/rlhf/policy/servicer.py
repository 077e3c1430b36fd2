"""PolicyService over gRPC: a thin adapter from the rlhf.v1 messages to :class:`PolicyService` and
:class:`PolicyManager`, and the component that owns the backend, the bus, the cache and the model-event follower."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from rlhf.bus.base import Bus
from rlhf.cache.base import Cache
from rlhf.policy import metrics
from rlhf.policy.backend import PolicyBackend
from rlhf.policy.config import PolicyConfig
from rlhf.policy.manager import PolicyManager
from rlhf.policy.recording import ResponseRecorder
from rlhf.policy.service import PolicyService
from rlhf.serving.errors import InvalidArgument
from rlhf.serving.component import ServiceComponent
from rlhf.serving.model_events import ModelEventFollower, group_id, version_of_folder
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, service: PolicyService, manager: PolicyManager) -> None:
        self.service = service
        self.manager = manager

    async def Generate(self, request: policy_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> policy_pb2.GenerateResponse:
        return await self.service.generate(request, context.time_remaining())

    async def GenerateStream(self, request: policy_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[policy_pb2.GenerateStreamResponse]:
        stream = self.service.stream(request, context.time_remaining())
        async with contextlib.aclosing(stream):
            async for message in stream:
                yield message

    async def GetPolicy(self, request: policy_pb2.GetPolicyRequest,
                        context: grpc.aio.ServicerContext) -> policy_pb2.GetPolicyResponse:
        return self.manager.describe()

    async def LoadPolicy(self, request: policy_pb2.LoadPolicyRequest,
                         context: grpc.aio.ServicerContext) -> policy_pb2.GetPolicyResponse:
        if not request.HasField("version"):
            raise InvalidArgument("version", "required: the version id and the uri of its weights")
        await self.manager.load(request.version, request.traffic_percent)
        return self.manager.describe()

    async def SetTrafficSplit(self, request: policy_pb2.SetTrafficSplitRequest,
                              context: grpc.aio.ServicerContext) -> policy_pb2.GetPolicyResponse:
        await self.manager.set_split(request.candidate_version, request.traffic_percent)
        return self.manager.describe()

    async def Rollback(self, request: policy_pb2.RollbackPolicyRequest,
                       context: grpc.aio.ServicerContext) -> policy_pb2.GetPolicyResponse:
        await self.manager.rollback()
        return self.manager.describe()


def make_backend(config: PolicyConfig) -> PolicyBackend:
    if config.backend == "triton":
        from rlhf.policy.triton_backend import TritonBackend

        return TritonBackend(config)
    from rlhf.policy.torch_backend import TorchBackend

    return TorchBackend(
        device=config.device, dtype=config.dtype, torch_num_threads=config.torch_num_threads,
        max_batch_size=config.max_batch_size, max_wait_s=config.max_wait_s, max_queue=config.max_queue,
        context_limit=config.context_limit,
    )


def initial_version(config: PolicyConfig, path: str) -> common_pb2.ModelVersion:
    """The ModelVersion of ``model_path``: its id from the config, the manifest, or the folder name."""
    return version_of_folder(path, name=config.model_name, kind=common_pb2.MODEL_KIND_POLICY,
                             version=config.initial_version, uri=config.model_path)


class PolicyComponent(ServiceComponent):
    """The policy service with its backend, bus, cache and model-event follower."""

    service_name = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name

    def __init__(self, config: PolicyConfig, *, bus: Bus | None = None, cache: Cache | None = None,
                 backend: PolicyBackend | None = None) -> None:
        super().__init__(config, bus=bus, cache=cache)
        self.config: PolicyConfig = config
        self.backend = backend if backend is not None else make_backend(config)
        self.manager = PolicyManager(
            self.backend, artifact_root=config.artifact_root, model_name=config.model_name,
            max_standby_versions=config.max_standby_versions, drain_timeout_s=config.drain_timeout_s,
        )
        self.recorder = ResponseRecorder(
            self.bus, self.cache, ttl_s=config.record_ttl_s, queue_size=config.record_queue_size,
            batch_size=config.record_batch_size,
        )
        self.service = PolicyService(config, self.manager, self.recorder)
        self.follower: ModelEventFollower | None = None
        self._startup: asyncio.Task | None = None

    def register(self, server: grpc.aio.Server) -> None:
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(self.service, self.manager), server)

    async def start(self) -> None:
        await self.ensure_topics()  # recording degrades without the bus; serving does not need it
        await self.backend.start()
        self.recorder.start()
        # Loading takes seconds (minutes on Triton): the server answers meanwhile, health NOT_SERVING.
        self._startup = asyncio.create_task(self._load_then_follow(), name="policy-startup")

    async def _load_then_follow(self) -> None:
        if self.config.model_path:
            path = self.manager.resolve_path(self.config.model_path)
            try:
                await self.manager.load(initial_version(self.config, path), 100)
            except Exception:  # noqa: BLE001 - health stays NOT_SERVING; LoadPolicy or an event may still load one
                log.exception("the initial policy %s could not be loaded", path)
        if self.config.follow_model_events:
            self.follower = ModelEventFollower(
                self.bus, self.manager.apply_events, group=group_id(self.config.models_group_prefix, self.config.replica),
                on_unreadable=metrics.MODEL_EVENTS.labels("failed").inc,
            )
            self.follower.start(asyncio.get_running_loop())

    async def check(self) -> None:
        await self.backend.check()
        await self.manager.check()

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._startup
        if self.follower is not None:
            await loop.run_in_executor(None, self.follower.stop)
        await self.manager.close()
        await self.recorder.close(self.config.shutdown_grace_s)
        await self.backend.close()
        await self.close_dependencies()
