"""Config: defaults documented, precedence, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from speclora.shared.config import Config, ConfigError, config_as_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def test_documented_default_file_matches_dataclass_defaults() -> None:
    documented = yaml.safe_load((REPO / "configs" / "config.yaml").read_text())
    assert documented == config_as_dict(Config())


def test_every_key_is_in_configuration_doc() -> None:
    doc = (REPO / "docs" / "CONFIGURATION.md").read_text()
    for section, values in config_as_dict(Config()).items():
        for key in values:
            assert f"{section}.{key}" in doc, f"{section}.{key} missing from docs/CONFIGURATION.md"


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("models:\n  draft: 'self:2'\nlora:\n  rank: 4\n")
    env = {"SPECLORA_LORA_RANK": "16", "SPECLORA_LEARNING_AUTO_TRAIN": "false"}
    config = load_config(file, env=env, overrides={"lora": {"rank": 32}})
    assert config.models.draft == "self:2"
    assert config.learning.auto_train is False  # on by default
    assert config.lora.rank == 32
    assert dataclasses.is_dataclass(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lora.rank = 1  # type: ignore[misc]


def test_env_config_path(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("speculation:\n  mode: fast\n")
    assert load_config(env={"SPECLORA_CONFIG": str(file)}).speculation.mode == "fast"


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("lora:\n  rnak: 3\n", "lora.rnak"),
        ("nonsense:\n  a: 1\n", "nonsense"),
        ("models:\n  dtype: int4\n", "models.dtype"),
        ("lora:\n  rank: 0\n", "lora.rank"),
        ("lora:\n  rank: 2.5\n", "lora.rank"),
        ("learning:\n  failure_threshold: 1.5\n", "learning.failure_threshold"),
        ("learning:\n  auto_train: 'yes'\n", "learning.auto_train"),
        ("server:\n  tcp_address: 'localhost'\n", "server.tcp_address"),
        ("speculation:\n  adaptive_min: 9\n  adaptive_max: 4\n", "adaptive_min"),
        ("models: [1, 2]\n", "models"),
        ("generation:\n  temperature: .nan\n", "generation.temperature"),
        ("generation:\n  top_p: 0\n", "generation.top_p"),  # no token would be left
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, yaml_text: str, needle: str) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(yaml_text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(file, env={})


def test_bad_env_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"speculation\.mode"):
        load_config(env={"SPECLORA_SPECULATION_MODE": "turbo"})


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", env={})


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("generation", "top_p", 1e-6),
        ("generation", "top_p", 1.0),
        ("generation", "temperature", 0.0),
        ("generation", "temperature", 2.0),
        ("speculation", "draft_tokens", 16),
        ("speculation", "draft_tokens", 0),
    ],
)
def test_a_default_the_config_accepts_is_a_valid_request(
    section: str, key: str, value: float
) -> None:
    """Requests that leave a field unset take the configured default; the request validation
    must accept every value the config does (it once refused top_p: 0, which the config took)."""
    from speclora.daemon.requests import generation_request

    config = load_config(env={}, overrides={section: {key: value}})
    request = generation_request(config, "r1", prompt="hi")
    got = request.draft_tokens if key == "draft_tokens" else getattr(request.sampling, key)
    assert got == value
