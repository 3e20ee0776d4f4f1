"""Server-wide steering settings: the default steering, the admin key and the
directories vector sets may be imported from.

``vsteer serve`` flags and, under plain ``vllm serve``, the environment
(``VSTEER_DEFAULT_STEERING``, ``VSTEER_ADMIN_KEY``, ``VSTEER_IMPORT_DIRS``,
``VSTEER_MAX_UPLOAD_BYTES``; see ``vsteer.engine.settings``). The admin key is read from
the environment only: a key on a command line is visible to every local user (``ps``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsteer.engine.errors import SteeringError
from vsteer.engine.settings import settings
from vsteer.engine.spec import STEERING_KEY, SteeringSpec

MIN_ADMIN_KEY_LENGTH = 16
PLACEHOLDER_KEYS = frozenset({"change-me", "changeme", "secret", "password", "admin", "test", "example"})


@dataclass
class ServerConfig:
    default_steering: dict[str, Any] | None = None
    default_steering_source: str | None = None
    admin_key: str | None = None
    import_dirs: list[Path] = field(default_factory=list)
    banner: bool = False  # print the start-up summary to stdout (vsteer serve)
    max_upload_bytes: int = 64 << 20


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
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"default steering {value}: not valid JSON ({e})") from None
    if isinstance(raw, dict) and set(raw) == {STEERING_KEY}:  # also accept {"steering": {...}}
        raw = raw[STEERING_KEY]
    try:
        spec = SteeringSpec.parse(raw)
    except SteeringError as e:
        raise ValueError(f"default steering {value}: {e}") from None
    return spec.to_dict() if spec is not None and not spec.is_empty else None


def check_admin_key(key: str | None) -> str | None:
    """Refuse placeholder and short keys (a shipped default would be a known password)."""
    if key is None:
        return None
    if key.strip().lower() in PLACEHOLDER_KEYS or len(key) < MIN_ADMIN_KEY_LENGTH:
        raise ValueError(f"VSTEER_ADMIN_KEY is a placeholder or shorter than {MIN_ADMIN_KEY_LENGTH} characters; "
                         "set a random key, e.g. `openssl rand -hex 24`")
    return key


def build_config(*, default_steering: str | dict[str, Any] | None = None, import_dirs: list[str] | None = None,
                 banner: bool = False) -> ServerConfig:
    """The configuration from ``vsteer serve`` flags, falling back to the environment."""
    s = settings()
    if isinstance(default_steering, str):
        spec, source = load_default_steering(default_steering), default_steering
    elif isinstance(default_steering, dict):
        parsed = SteeringSpec.parse(default_steering)
        spec, source = (parsed.to_dict() if parsed and not parsed.is_empty else None), "inline"
    elif s.default_steering:
        spec, source = load_default_steering(s.default_steering), s.default_steering
        source = source if spec else None
    else:
        spec, source = None, None
    dirs = [Path(d).resolve() for d in import_dirs] if import_dirs else s.import_dir_list
    return ServerConfig(spec, source, check_admin_key(s.admin_key), dirs, banner, s.max_upload_bytes)


_config: ServerConfig | None = None


def configure(**kwargs: Any) -> ServerConfig:
    """Set this process's server configuration (``vsteer serve``, before vLLM starts)."""
    global _config
    _config = build_config(**kwargs)
    return _config


def get_config() -> ServerConfig:
    """The configuration set by ``configure``, else from the environment (``vllm serve``)."""
    global _config
    if _config is None:
        _config = build_config()
    return _config
