"""Front-end pieces that need no engine: the resolver cache follows the vector directory,
and client cache salts can never enter the steered namespace."""

from __future__ import annotations

import pytest
import torch

from vsteer.engine import SteeringError, SteeringVectorSet, VectorRegistry
from vsteer.serving import set_vectors_dir
from vsteer.serving.keys import SALT_PREFIX
from vsteer.serving.resolvers import resolver_for
from vsteer.serving.steering_request import SteeringRequest, user_salt


def cache_salt(client_salt, resolved, prompt_len):
    return SteeringRequest.of({}, resolved).cache_salt(client_salt, prompt_len)


def test_resolver_cache_is_keyed_by_vector_directory(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    VectorRegistry(first).add("a", SteeringVectorSet("a", {1: torch.ones(128)}))
    VectorRegistry(second).add("b", SteeringVectorSet("b", {2: torch.ones(128)}))
    monkeypatch.setenv("VSTEER_VECTORS_DIR", "")
    set_vectors_dir(first)
    assert resolver_for(128, 4).resolve({"vectors": [{"name": "a"}]}) is not None
    set_vectors_dir(second)
    assert resolver_for(128, 4).resolve({"vectors": [{"name": "b"}]}) is not None
    with pytest.raises(SteeringError, match="unknown steering vector 'a'"):
        resolver_for(128, 4).resolve({"vectors": [{"name": "a"}]})


def test_client_salts_cannot_enter_the_steered_namespace(tmp_path, monkeypatch):
    monkeypatch.setenv("VSTEER_VECTORS_DIR", "")  # restored after the test
    VectorRegistry(tmp_path).add("a", SteeringVectorSet("a", {1: torch.ones(128)}))
    set_vectors_dir(tmp_path)
    resolved = resolver_for(128, 4).resolve({"vectors": [{"name": "a"}]})
    steered = cache_salt(None, resolved, 10)
    assert steered.startswith(SALT_PREFIX)
    assert user_salt(steered) != steered and not user_salt(steered).startswith(SALT_PREFIX)
    assert user_salt("my-tenant") == "my-tenant" and user_salt(None) is None
    # prompt-relative rules also separate by prompt length; "all" does not
    generated = resolver_for(128, 4).resolve({"vectors": [{"name": "a"}], "positions": "generated"})
    assert cache_salt(None, generated, 10) != cache_salt(None, generated, 11)
    assert cache_salt(None, resolved, 10) == cache_salt(None, resolved, 11)


def test_prompt_length_counts_embeds_prompts():
    """Prompt-relative salts need the prompt length also for prompt-embeds requests."""
    from types import SimpleNamespace

    from vsteer.serving.frontend import _prompt_len

    assert _prompt_len(SimpleNamespace(prompt_token_ids=[1, 2, 3], prompt_embeds=None)) == 3
    assert _prompt_len(SimpleNamespace(prompt_token_ids=None, prompt_embeds=torch.zeros(7, 16))) == 7
    assert _prompt_len(SimpleNamespace(prompt_token_ids=None, prompt_embeds=None)) == 0
