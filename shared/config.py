"""Configuration: frozen dataclasses loaded from YAML, then env vars, then CLI flags.

Precedence, lowest first: the defaults below (documented key by key in configs/config.yaml),
the YAML file (`--config`, else `SPECLORA_CONFIG`, else `<config dir>/config.yaml` if present),
`SPECLORA_<SECTION>_<KEY>` environment variables, then explicit overrides (CLI flags).
Unknown keys and bad values raise ConfigError naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from speclora.shared.paths import resolve_paths


class ConfigError(ValueError):
    """A configuration key is unknown or its value is not allowed."""


def _opt(
    default: Any,
    *,
    choices: tuple[Any, ...] | None = None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    doc: str = "",
) -> Any:
    meta = {"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "doc": doc}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Bounds:
    """A key's allowed range; request fields with the same meaning use the same one."""

    lo: float | None
    hi: float | None
    lo_open: bool = False  # lo itself is not allowed

    def __contains__(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or value <= self.hi

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}]"


def bounds(section: type, key: str) -> Bounds:
    """The range configured for `section.key` (e.g. bounds(GenerationConfig, "top_p"))."""
    meta = {f.name: f.metadata for f in dataclasses.fields(section)}[key]
    return Bounds(meta["lo"], meta["hi"], meta["lo_open"])


@dataclass(frozen=True)
class ModelsConfig:
    target: str = _opt("embedded", doc="HF repo id, mlx-lm dir, .gguf file, or 'embedded'")
    draft: str = _opt("self:4", doc="same kinds as target, 'self:N', or 'none'")
    dtype: str = _opt("float32", choices=("float32", "bfloat16", "float16"))
    buffer_cache_mb: int | None = _opt(
        None, lo=0, hi=1_000_000, doc="MLX buffer cache (MiB); null = 8 on CPU, MLX's own on Metal"
    )


@dataclass(frozen=True)
class SpeculationConfig:
    mode: str = _opt("detailed", choices=("detailed", "fast"))
    draft_tokens: int | None = _opt(None, lo=0, hi=16, doc="fixed K; null = adaptive")
    adaptive_min: int = _opt(0, lo=0, hi=16)
    adaptive_max: int = _opt(8, lo=1, hi=16)
    adaptive_start: int = _opt(4, lo=1, hi=16)
    probe_interval: int = _opt(16, lo=1, hi=10_000, doc="target-only steps between probes at K=0")
    draft_vocab_size: int = _opt(4096, lo=0, hi=1_000_000, doc="0 = full draft head")
    prefill_chunk: int = _opt(512, lo=16, hi=65_536)
    prompt_cache_entries: int = _opt(
        4, lo=0, hi=10_000, doc="finished requests' KV caches kept for reuse; 0 = off"
    )
    prompt_cache_mb: int = _opt(256, lo=1, hi=1_000_000, doc="their total size cap, MiB")


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = _opt(256, lo=1, hi=1_000_000, doc="default when a request sets none")
    max_tokens_cap: int = _opt(4096, lo=1, hi=1_000_000)
    max_prompt_tokens: int = _opt(8192, lo=1, hi=10_000_000)
    temperature: float = _opt(0.0, lo=0.0, hi=2.0)
    top_p: float = _opt(1.0, lo=0.0, hi=1.0, lo_open=True, doc="0 would keep no token")
    top_k: int = _opt(0, lo=0, hi=1_000_000)
    max_stop_strings: int = _opt(16, lo=0, hi=1024)
    max_stop_string_chars: int = _opt(256, lo=1, hi=65_536)


@dataclass(frozen=True)
class LearningConfig:
    record: bool = _opt(True)
    failure_threshold: float = _opt(0.5, lo=0.0, hi=1.0)
    buffer_cap: int = _opt(10_000, lo=1, hi=100_000_000)
    min_cases: int = _opt(8, lo=2, hi=1_000_000)
    heldout_fraction: float = _opt(0.2, lo=0.05, hi=0.9)
    promotion_margin: float = _opt(0.02, lo=0.0, hi=1.0)
    rejected_weight: float = _opt(4.0, lo=1.0, hi=1000.0)
    auto_train: bool = _opt(True)
    auto_train_idle_s: float = _opt(120.0, lo=1.0, hi=1e7)
    auto_train_min_new_cases: int = _opt(16, lo=1, hi=1_000_000)
    teacher_top_k: int = _opt(
        64, lo=0, hi=1_000_000, doc="target probs cached per position; 0 = all"
    )
    max_train_s: float = _opt(
        300.0,
        lo=0.0,
        hi=1e7,
        doc="seconds per training run, auto or manual (Train may set its own); 0 = no limit",
    )


@dataclass(frozen=True)
class HistoryConfig:
    """The history drafter: proposals from suffix matches over the request's own tokens and
    past requests' prompts and outputs (engine.history)."""

    enabled: bool = _opt(True, doc="propose from the request's own tokens and past requests")
    max_tokens: int = _opt(
        1_000_000, lo=1_000, hi=100_000_000, doc="past requests' tokens kept per target"
    )
    max_proposal: int = _opt(24, lo=1, hi=256, doc="tokens one history proposal may hold")
    min_match: int = _opt(2, lo=1, hi=64, doc="shortest suffix match that may propose")
    max_match: int = _opt(32, lo=1, hi=64, doc="longest suffix match looked for")
    min_token_prob: float = _opt(
        0.1, lo=0.0, hi=1.0, doc="stop where the continuation's cumulative probability drops below"
    )
    spec_factor: float = _opt(
        1.0, lo=0.1, hi=64.0, doc="a proposal holds at most spec_factor * match length tokens"
    )
    persist: bool = _opt(True, doc="keep it in the data dir across restarts")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = _opt(32, lo=1, hi=1024)
    scale: float = _opt(20.0, lo=0.0, hi=1e4)
    dropout: float = _opt(0.0, lo=0.0, hi=0.9)
    layers: int = _opt(-1, lo=-1, hi=1024, doc="-1 = every draft layer")
    learning_rate: float | None = _opt(
        None, lo=1e-8, hi=1.0, doc="peak Adam rate; null = chosen from the draft's start"
    )
    steps: int = _opt(200, lo=1, hi=1_000_000)
    batch_size: int = _opt(4, lo=1, hi=4096)
    max_seq_len: int = _opt(512, lo=8, hi=65_536)


@dataclass(frozen=True)
class ServerConfig:
    socket_path: str | None = _opt(None, doc="null = <state dir>/run/speclora.sock")
    tcp_address: str | None = _opt(None, doc="host:port; null = Unix socket only")
    allow_non_loopback: bool = _opt(False)
    queue_size: int = _opt(64, lo=1, hi=100_000)
    max_active: int = _opt(8, lo=1, hi=1024, doc="generations in the engine at once")
    batch_passes: bool = _opt(
        True, doc="run the active generations' target passes of a round as one forward"
    )
    shutdown_grace_s: float = _opt(10.0, lo=0.0, hi=3600.0)
    max_message_bytes: int = _opt(4 * 1024 * 1024, lo=1024, hi=1 << 30)
    log_level: str = _opt("info", choices=("debug", "info", "warning", "error"))
    http_address: str | None = _opt(
        "127.0.0.1:8421", doc="host:port of the OpenAI-compatible HTTP API; null = off"
    )
    http_api_key_file: str | None = _opt(
        None, doc="file holding the HTTP API key; SPECLORA_API_KEY overrides"
    )
    http_allowed_hosts: tuple[str, ...] = _opt((), doc="Host names allowed besides loopback")
    http_cors_origins: tuple[str, ...] = _opt((), doc="origins allowed cross-origin; never *")
    http_max_body_bytes: int = _opt(4 * 1024 * 1024, lo=1024, hi=1 << 30)
    http_keepalive_s: float = _opt(
        5.0, lo=0.05, hi=3600.0, doc="SSE keep-alive comment after this long without tokens"
    )
    timeline_requests: int = _opt(
        5000,
        lo=1,
        hi=10_000_000,
        doc="finished requests GET /api/timeline keeps (the page's chart)",
    )


@dataclass(frozen=True)
class Config:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}  # type: ignore[misc]
_SECTION_TYPES = {
    "models": ModelsConfig,
    "speculation": SpeculationConfig,
    "generation": GenerationConfig,
    "learning": LearningConfig,
    "history": HistoryConfig,
    "lora": LoraConfig,
    "server": ServerConfig,
}


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Check one value against its field's type and bounds; return it normalised."""
    kind = str(f.type)
    nullable = "None" in kind
    meta = f.metadata
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{key}: null is not allowed")
    if "tuple" in kind:  # a list of non-empty strings; from the environment, comma-separated
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(
            isinstance(v, str) and v.strip() for v in items
        ):
            raise ConfigError(f"{key}: expected a list of non-empty strings, got {value!r}")
        return tuple(v.strip() for v in items)
    if "bool" in kind:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if "int" in kind and "float" not in kind:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif "float" in kind:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif "str" in kind and (not isinstance(value, str) or not value):
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(map(str, meta["choices"]))
        raise ConfigError(f"{key}: {value!r} is not one of {allowed}")
    allowed = Bounds(meta.get("lo"), meta.get("hi"), meta.get("lo_open", False))
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is outside {allowed}")
    return value


def _merge(base: Config, updates: Mapping[str, Any], origin: str) -> Config:
    """Apply {section: {key: value}} to `base`, validating every key."""
    if not isinstance(updates, Mapping):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(updates).__name__}")
    sections = {}
    for section, values in updates.items():
        if section not in _SECTION_TYPES:
            allowed = ", ".join(_SECTION_TYPES)
            raise ConfigError(f"{origin}: unknown section {section!r} (allowed: {allowed})")
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping")
        cls = _SECTION_TYPES[section]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        current = getattr(base, section)
        changes = {}
        for key, value in values.items():
            if key not in fields:
                allowed = ", ".join(fields)
                raise ConfigError(f"{origin}: unknown key {section}.{key} (allowed: {allowed})")
            changes[key] = _coerce(f"{section}.{key}", fields[key], value)
        sections[section] = dataclasses.replace(current, **changes)
    config = dataclasses.replace(base, **sections)
    _check_cross_field(config)
    return config


def _check_cross_field(config: Config) -> None:
    s = config.speculation
    if s.adaptive_min > s.adaptive_max:
        raise ConfigError("speculation.adaptive_min must be <= speculation.adaptive_max")
    if not s.adaptive_min <= s.adaptive_start <= s.adaptive_max:
        raise ConfigError("speculation.adaptive_start must lie within [adaptive_min, adaptive_max]")
    h = config.history
    if h.min_match > h.max_match:
        raise ConfigError("history.min_match must be <= history.max_match")
    g = config.generation
    if g.max_tokens > g.max_tokens_cap:
        raise ConfigError("generation.max_tokens must be <= generation.max_tokens_cap")
    for key in ("tcp_address", "http_address"):
        address = getattr(config.server, key)
        if address is None:
            continue
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"server.{key}: {address!r} is not host:port")
    if "*" in config.server.http_cors_origins:
        raise ConfigError(
            "server.http_cors_origins: '*' would let every web page use the daemon; "
            "list the origins (e.g. http://localhost:3000)"
        )


def _env_updates(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """SPECLORA_<SECTION>_<KEY>=value; values parsed as YAML scalars (0.5, true, null)."""
    updates: dict[str, dict[str, Any]] = {}
    for name, raw in env.items():
        if not name.startswith("SPECLORA_") or name in ("SPECLORA_HOME", "SPECLORA_CONFIG"):
            continue
        rest = name[len("SPECLORA_") :].lower()
        for section in _SECTION_TYPES:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                try:
                    value = yaml.safe_load(raw) if raw != "" else None
                except yaml.YAMLError as exc:
                    raise ConfigError(f"{name}: not a valid value ({exc})") from None
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    # Keep model names like "self:4" strings; only numbers are parsed.
                    pass
                elif not isinstance(value, (bool, type(None))):
                    value = raw
                updates.setdefault(section, {})[key] = value
                break
    return updates


def overrides_from_flags(flags: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{"models.target": "x"} -> {"models": {"target": "x"}}, skipping None (flag not given)."""
    updates: dict[str, dict[str, Any]] = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        updates.setdefault(section, {})[key] = value
    return updates


def config_file_path(
    explicit: str | os.PathLike | None = None, env: Mapping[str, str] | None = None
) -> Path | None:
    """The YAML file to read: --config, else SPECLORA_CONFIG, else the user's file if present."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get("SPECLORA_CONFIG"):
        return Path(env["SPECLORA_CONFIG"])
    default = resolve_paths(dict(env)).config_file
    return default if default.exists() else None


def load_config(
    path: str | os.PathLike | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Build the effective Config: defaults, YAML file, env vars, then overrides."""
    env = os.environ if env is None else env
    config = Config()
    file = config_file_path(path, env)
    if file is not None:
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: invalid YAML: {exc}") from None
        config = _merge(config, data, str(file))
    config = _merge(config, _env_updates(env), "environment")
    if overrides:
        config = _merge(config, overrides, "command line")
    return config


def config_as_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain YAML-able values (lists, not tuples)."""
    return dataclasses.asdict(
        config,
        dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v for k, v in items},
    )
