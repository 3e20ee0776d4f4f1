"""Every ``VSTEER_*`` environment variable, read in one place.

vsteer runs in processes it does not start itself (vLLM's engine core, its workers, Ray
actors on other nodes), so its configuration travels as environment variables, the way
vLLM's own ``VLLM_*`` settings do. ``settings()`` parses them into one typed object;
docs/configuration.md lists them (a test keeps that table and this class in step).

Call ``settings()`` where a value is needed rather than caching it at import: tests and
notebooks change the environment between engines (``set_vectors_dir``). It re-parses only
when a ``VSTEER_*`` variable changed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV_PREFIX = "VSTEER_"


class SettingsError(ValueError):
    """A ``VSTEER_*`` variable holds a value of the wrong kind; the message names it."""


class Settings(BaseModel):
    """vsteer's configuration. Field ``x`` is read from ``VSTEER_X``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    # -- where things are ---------------------------------------------------------------
    vectors_dir: Path | None = Field(None, description="vector registry directory (one sub-directory per named "
                                                        "set); the same path on every node")
    cache_dir: Path = Field(Path.home() / ".cache" / "vsteer",
                            description="where prepared local models (and the demo's vectors) are kept")
    # -- the vLLM plugin ----------------------------------------------------------------
    disable: bool = Field(False, description="1: do not load the vLLM plugin at all")
    skip_version_check: bool = Field(False, description="1: load on a vLLM version outside the tested range "
                                                        "(at your own risk)")
    layers: str | None = Field(None, description="steerable layers, e.g. 8,10,12 (default: all); smaller "
                                                 "steering tables")
    decoder_layers: str | None = Field(None, description="attribute path of the decoder-layer list for models "
                                                         "the locator does not recognise, e.g. model.layers")
    capture: bool = Field(False, description="1: hook every decoder layer for extraction capture (vsteer extract "
                                             "--engine vllm sets it for the engine it starts)")
    max_projections: int = Field(2, ge=0, le=64, description="projection directions (ablate/clamp) per layer "
                                                             "and config row in the vLLM tables")
    max_configs: int | None = Field(None, ge=1, description="config rows in each worker's steering tables: "
                                                            "distinct steering configs running at once (default: "
                                                            "max_num_seqs); the scheduler holds back requests "
                                                            "that would need more")
    max_new_configs_per_step: int = Field(64, ge=1, description="steering configs new to the running batch "
                                                                 "that one scheduler step admits; later requests "
                                                                 "wait a step (vsteer_deferred_requests_total)")
    # -- request limits -----------------------------------------------------------------
    max_vectors: int = Field(16, ge=1, description="vectors per request")
    max_strength: float = Field(1000.0, gt=0, description="largest absolute strength")
    max_inline_bytes: int = Field(1 << 20, ge=1, description="inline data per vector entry (decoded bytes)")
    max_request_inline_bytes: int = Field(8 << 20, ge=1, description="inline data per request (decoded bytes)")
    cache_bytes: int = Field(256 << 20, ge=0, description="vector bytes each process keeps cached (registry "
                                                          "sets and inline vectors)")
    # -- the server ---------------------------------------------------------------------
    admin_key: str | None = Field(None, description="key for the registry admin routes (at least 16 "
                                                    "characters; environment only, never a flag)")
    default_steering: str | None = Field(None, description="steering for requests that do not mention it: a "
                                                           "JSON file or inline JSON")
    steered_models: str | None = Field(None, description="steered models, one NAME=SPEC per line (vsteer serve "
                                                         "--steered-model; docs/server.md)")
    import_dirs: str | None = Field(None, description="extra directories the admin route may load sets from "
                                                      "by path (os.pathsep-separated)")
    max_upload_bytes: int = Field(64 << 20, ge=1, description="largest admin request body")
    new_configs_per_s: float = Field(20.0, ge=0, description="per client (API key, else address): steering "
                                                             "specs new to the server per second before 429 "
                                                             "too_many_new_configs (0: no limit)")
    new_configs_burst: int = Field(40, ge=1, description="per client: new steering specs allowed in a burst")
    metrics_refresh_s: float = Field(30.0, ge=0, description="background pull of worker counters (0: only "
                                                             "when /metrics is scraped)")
    lease_grace_s: float = Field(120.0, gt=0, description="how long a replaced vector version stays on disk "
                                                          "after the last request pinning it finished")

    @property
    def steerable_layers(self) -> set[int] | None:
        """``VSTEER_LAYERS`` as a set (None: every layer)."""
        text = (self.layers or "").strip()
        if not text or text == "all":
            return None
        try:
            return {int(x) for x in text.split(",") if x.strip()}
        except ValueError:
            raise SettingsError(f"VSTEER_LAYERS={self.layers!r}: use a comma list of layer numbers") from None

    def table_rows(self, max_num_seqs: int) -> int:
        """Config rows the worker tables hold (never more than a step can use)."""
        return min(self.max_configs or max_num_seqs, max_num_seqs)

    @property
    def import_dir_list(self) -> list[Path]:
        return [Path(d).resolve() for d in (self.import_dirs or "").split(os.pathsep) if d.strip()]

    @classmethod
    def env_name(cls, field: str) -> str:
        return ENV_PREFIX + field.upper()


def _env_snapshot() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX)))


_cached: tuple[tuple[tuple[str, str], ...], Settings] | None = None


def parse_env(env: dict[str, str]) -> Settings:
    """Settings from a mapping of environment variables; raises ``SettingsError``."""
    raw: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = env.get(Settings.env_name(name))
        if value is not None and value != "":
            raw[name] = value
    try:
        return Settings.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        raise SettingsError(f"{Settings.env_name(field)}={env.get(Settings.env_name(field))!r}: {err['msg']}") from None


def settings() -> Settings:
    """The current settings (re-read when a ``VSTEER_*`` variable changed)."""
    global _cached
    snap = _env_snapshot()
    cached = _cached
    if cached is not None and cached[0] == snap:
        return cached[1]
    parsed = parse_env(dict(snap))
    _cached = (snap, parsed)
    return parsed
