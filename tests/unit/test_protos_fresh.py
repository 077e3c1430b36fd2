"""The committed stubs are exactly what protos/generate.py makes from protos/ (so they are never stale or
edited by hand), and the API keeps the conventions it promises."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stubs_match_protos(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools comes with the test extra: pip install -e '.[test]'")
    written = _generator().generate(tmp_path)
    committed_dir = ROOT / "services" / "rlhf" / "v1"
    fresh = {p.name: p.read_text() for p in written}
    committed = {p.name: p.read_text() for p in committed_dir.iterdir() if p.suffix in {".py", ".pyi"}}
    assert sorted(fresh) == sorted(committed), "stub files differ: run `python protos/generate.py`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `python protos/generate.py` and commit the result"


def test_enums_start_unspecified_and_one_package():
    from rlhf.v1 import common_pb2, events_pb2, feedback_pb2, policy_pb2, reward_pb2, trainer_pb2

    modules = [common_pb2, events_pb2, feedback_pb2, policy_pb2, reward_pb2, trainer_pb2]
    enums = []
    for module in modules:
        assert module.DESCRIPTOR.package == "rlhf.v1"
        enums += list(module.DESCRIPTOR.enum_types_by_name.values())
        for message in module.DESCRIPTOR.message_types_by_name.values():
            enums += list(message.enum_types)
    assert enums
    for enum in enums:
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), f"{enum.full_name} starts with {zero}"


def test_all_four_services_exist():
    from rlhf.v1 import feedback_pb2, policy_pb2, reward_pb2, trainer_pb2

    names = {
        s.full_name
        for m in (feedback_pb2, policy_pb2, reward_pb2, trainer_pb2)
        for s in m.DESCRIPTOR.services_by_name.values()
    }
    assert names == {"rlhf.v1.FeedbackService", "rlhf.v1.PolicyService", "rlhf.v1.RewardService",
                     "rlhf.v1.TrainerService"}
