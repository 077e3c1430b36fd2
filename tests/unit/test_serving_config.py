"""The one config loader: flags over service env over platform env over defaults; bad values say what to do."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from rlhf.feedback.config import FeedbackConfig
from rlhf.serving import config as cfg


def parse(argv):
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, FeedbackConfig)
    return parser.parse_args(argv)


def test_defaults_without_flags_or_env():
    config = cfg.load(FeedbackConfig, parse([]), env={})
    assert config == FeedbackConfig()


def test_precedence_flag_over_service_env_over_platform_env():
    env = {"RLHF_FEEDBACK_PORT": "7001", "RLHF_PORT": "7002", "RLHF_BUS_URL": "memory://",
           "RLHF_FEEDBACK_CREATE_TOPICS": "false"}
    assert cfg.load(FeedbackConfig, parse([]), env=env).port == 7001
    assert cfg.load(FeedbackConfig, parse(["--port", "7003"]), env=env).port == 7003
    config = cfg.load(FeedbackConfig, parse([]), env=env)
    assert config.bus_url == "memory://" and config.create_topics is False


def test_caller_defaults_sit_between_the_environment_and_the_field_defaults():
    defaults = {"port": 7004, "topic_partitions": 2}
    assert cfg.load(FeedbackConfig, parse([]), env={}, defaults=defaults).port == 7004
    assert cfg.load(FeedbackConfig, parse([]), env={"RLHF_PORT": "7002"}, defaults=defaults).port == 7002
    assert cfg.load(FeedbackConfig, parse(["--port", "7003"]), env={}, defaults=defaults).port == 7003
    assert cfg.load(FeedbackConfig, parse([]), env={}, defaults=defaults, port=7005).port == 7005
    with pytest.raises(cfg.ConfigError, match="no_such_field"):
        cfg.load(FeedbackConfig, parse([]), env={}, defaults={"no_such_field": 1})


def test_the_embedded_trainer_judges_canaries_sooner_unless_told_otherwise(monkeypatch, tmp_path):
    """`rlhf up` serves one product's few responses a second: its canary takes half the routing keys and is judged
    after 25 responses; the environment still wins, and the production defaults stay as they are."""
    from rlhf.embedded import EmbeddedConfig, build_components
    from rlhf.trainer.config import TrainerConfig

    def trainer_config() -> TrainerConfig:
        config = EmbeddedConfig(port=0, metrics_port=-1, artifact_root=str(tmp_path / "artifacts"))
        components, _, _ = build_components(config)
        (trainer,) = [c for c in components if isinstance(c.config, TrainerConfig)]
        return trainer.config

    for name in ("CANARY_PERCENT", "PROMOTE_AFTER", "AUTO_START"):
        monkeypatch.delenv(f"RLHF_TRAINER_{name}", raising=False)
        monkeypatch.delenv(f"RLHF_{name}", raising=False)
    monkeypatch.chdir(tmp_path)  # no out/demo here: the tiny initial models
    embedded = trainer_config()
    assert (embedded.canary_percent, embedded.promote_after, embedded.auto_start) == (50, 25, True)
    assert (TrainerConfig().canary_percent, TrainerConfig().promote_after, TrainerConfig().auto_start) == (10, 50, False)
    monkeypatch.setenv("RLHF_TRAINER_CANARY_PERCENT", "10")
    monkeypatch.setenv("RLHF_AUTO_START", "false")
    told = trainer_config()
    assert (told.canary_percent, told.promote_after, told.auto_start) == (10, 25, False)


def test_the_trainers_responses_first_settings_are_checked():
    """A backlog's responses-first reading: 0 records turns it off; a negative count or a pause of no time is a
    clear error naming the field and its flag."""
    from rlhf.trainer.config import TrainerConfig

    assert TrainerConfig(responses_ahead_records=0).responses_ahead_records == 0
    with pytest.raises(ValueError, match=r"^responses_ahead_records must be >= 0 \(flag --responses-ahead-records\)"):
        TrainerConfig(responses_ahead_records=-1)
    with pytest.raises(ValueError, match=r"^responses_ahead_s must be > 0 \(flag --responses-ahead-s\)"):
        TrainerConfig(responses_ahead_s=0)


def test_config_is_frozen_and_every_field_documented():
    config = FeedbackConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]
    for f in dataclasses.fields(FeedbackConfig):
        assert f.metadata.get("help"), f"{f.name} has no help"


@pytest.mark.parametrize(
    "argv, env, needle",
    [
        (["--port", "abc"], {}, "--port: expected int"),
        ([], {"RLHF_FEEDBACK_CREATE_TOPICS": "maybe"}, "RLHF_FEEDBACK_CREATE_TOPICS: expected true/false"),
        (["--max-in-flight", "1"], {}, "max_in_flight must be >= max_events_per_message (flag --max-in-flight)"),
        (["--port", "-5"], {}, "port must be >= 0"),
    ],
)
def test_bad_values_name_flag_or_variable(argv, env, needle):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(FeedbackConfig, parse(argv), env=env)
    assert needle in str(err.value)


def test_derived_values_are_computed_not_stored():
    config = FeedbackConfig(publish_timeout_s=10)
    assert config.pending_ttl_s > config.publish_timeout_s
    assert "pending_ttl_s" not in {f.name for f in dataclasses.fields(FeedbackConfig)}


def test_secrets_are_masked_in_descriptions():
    assert cfg.describe(FeedbackConfig(auth_token="t0ken"))["auth_token"] == "***"


# One vocabulary of addresses: what `deploy/local/infra.py env` prints is what every service reads, and the defaults
# are infra.py's loopback addresses, so `infra.py up` then `rlhf feedback` (or `rlhf reward`) connects with no flag.
SERVICE_CONFIGS = ["rlhf.feedback.config:FeedbackConfig", "rlhf.policy.config:PolicyConfig",
                   "rlhf.reward.config:RewardConfig"]


def _config_class(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _infra_env(*extra: str) -> dict[str, str]:
    import re
    import subprocess
    import sys
    from pathlib import Path

    infra = Path(__file__).resolve().parents[2] / "deploy" / "local" / "infra.py"
    out = subprocess.run([sys.executable, str(infra), *extra, "env"], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"}).stdout
    return dict(re.findall(r"^export (\w+)=(.*)$", out, re.MULTILINE))


@pytest.mark.parametrize("spec", SERVICE_CONFIGS)
def test_services_read_the_addresses_infra_prints(spec):
    config_cls = _config_class(spec)
    default_env = _infra_env()
    # the defaults are infra.py's default loopback addresses
    defaults = cfg.load(config_cls, env={})
    assert defaults.bus_url == f"kafka://{default_env['RLHF_KAFKA_BOOTSTRAP']}" == default_env["RLHF_BUS_URL"]
    assert defaults.cache_url == default_env["RLHF_REDIS_URL"] == default_env["RLHF_CACHE_URL"]
    # and an infra on other ports reaches every service through its printed environment alone
    moved = {k: v for k, v in _infra_env("--kafka-port", "29092", "--redis-port", "26379").items()}
    config = cfg.load(config_cls, env=moved)
    assert config.bus_url == "kafka://127.0.0.1:29092"
    assert config.cache_url == "redis://127.0.0.1:26379/0"
