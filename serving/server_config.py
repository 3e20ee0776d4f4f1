"""Server-wide steering settings: the default steering, the admin key and the
directories vector sets may be imported from.

Set by ``vsteer serve`` flags (``configure``) or, under plain ``vllm serve``, read from
the environment: ``VSTEER_DEFAULT_STEERING`` (a JSON file, or inline JSON),
``VSTEER_ADMIN_KEY``, ``VSTEER_IMPORT_DIRS`` (``os.pathsep``-separated),
``VSTEER_MAX_UPLOAD_BYTES``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsteer.engine.spec import SteeringError, SteeringSpec

from .openai_protocol import STEERING_KEY, set_default_steering

DEFAULT_STEERING_ENV = "VSTEER_DEFAULT_STEERING"
ADMIN_KEY_ENV = "VSTEER_ADMIN_KEY"
IMPORT_DIRS_ENV = "VSTEER_IMPORT_DIRS"
MAX_UPLOAD_ENV = "VSTEER_MAX_UPLOAD_BYTES"


@dataclass
class ServerConfig:
    default_steering: dict[str, Any] | None = None
    default_steering_source: str | None = None
    admin_key: str | None = None
    import_dirs: list[Path] = field(default_factory=list)
    banner: bool = False  # print the start-up summary to stdout (vsteer serve)
    max_upload_bytes: int = 64 << 20


_config: ServerConfig | None = None


def load_default_steering(value: str) -> dict[str, Any] | None:
    """A SteeringSpec from a JSON file path (or inline JSON); raises ``ValueError`` with a
    message naming the problem."""
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_text()
        except OSError as e:
            raise ValueError(f"cannot read the default steering file {value}: {e}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"default steering {value}: not valid JSON ({e})") from None
    if isinstance(raw, dict) and set(raw) == {STEERING_KEY}:  # also accept {"steering": {...}}
        raw = raw[STEERING_KEY]
    try:
        spec = SteeringSpec.parse(raw)
    except SteeringError as e:
        raise ValueError(f"default steering {value}: {e}") from None
    return spec.to_dict() if spec is not None and not spec.is_empty else None


def configure(*, default_steering: str | dict[str, Any] | None = None, admin_key: str | None = None,
              import_dirs: list[str] | None = None, banner: bool = False) -> ServerConfig:
    """Set the server configuration (``vsteer serve``); unset parts fall back to the env."""
    global _config
    env = config_from_env()
    if isinstance(default_steering, str):
        spec, source = load_default_steering(default_steering), default_steering
    elif isinstance(default_steering, dict):
        parsed = SteeringSpec.parse(default_steering)
        spec, source = (parsed.to_dict() if parsed and not parsed.is_empty else None), "inline"
    else:
        spec, source = env.default_steering, env.default_steering_source
    dirs = [Path(d).resolve() for d in import_dirs] if import_dirs else env.import_dirs
    _config = ServerConfig(spec, source, admin_key or env.admin_key, dirs, banner, env.max_upload_bytes)
    set_default_steering(spec)
    return _config


def config_from_env() -> ServerConfig:
    raw = os.environ.get(DEFAULT_STEERING_ENV)
    spec = load_default_steering(raw) if raw else None
    dirs = [Path(d).resolve() for d in os.environ.get(IMPORT_DIRS_ENV, "").split(os.pathsep) if d.strip()]
    return ServerConfig(spec, raw if spec else None, os.environ.get(ADMIN_KEY_ENV) or None, dirs,
                        max_upload_bytes=int(os.environ.get(MAX_UPLOAD_ENV, 64 << 20)))


def get_config() -> ServerConfig:
    global _config
    if _config is None:
        _config = config_from_env()
        set_default_steering(_config.default_steering)
    return _config
