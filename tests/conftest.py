"""Shared, session-scoped fixtures: one Ray cluster and one tiny model per test session.

Expensive things are built once (CI budget): stage-specific engines belong in module-scoped
fixtures of the test module that needs them.
"""
from __future__ import annotations

import os
import tempfile

import pytest

# Scratch for vLLM's IPC sockets and caches, and a fresh Ray temp dir (docs/stack.md).
_SCRATCH = tempfile.mkdtemp(prefix="distillery-tests-")
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(_SCRATCH, "vllm-cache"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/distillery/torch_extensions"))
os.environ["DISTILLERY_RAY_TMP"] = _SCRATCH
os.environ.pop("DISTILLERY_DATA_ROOT", None)
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (2 CPUs, the machine's size)."""
    import ray

    from pipeline.stage import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random-init 4-layer Qwen2 (head_dim 64) + local tokenizer; vLLM and transformers load it."""
    from pipeline.apps.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture
def data_root(tmp_path) -> str:
    return str(tmp_path / "data")
