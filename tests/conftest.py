"""Shared fixtures: the converted default model, tiny random models of each family, and the `gpu` marker skip.

The default model is converted into the user cache (or $HOGWILD_CACHE_DIR) so that it happens once per
machine, not once per test run; tiny models are built once per session in a temporary folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tiny_models import build_tiny_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when no CUDA device is present; torch is imported only if such tests exist."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model as a Hugging Face folder, converted from its packaged GGUF on first use."""
    from engine.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def tiny_model_factory(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`factory(family, **config_overrides)` returns a tiny model folder, built once per distinct arguments."""
    built: dict[str, Path] = {}

    def factory(family: str, **config_overrides: Any) -> Path:
        key = json.dumps([family, config_overrides], sort_keys=True, default=repr)
        if key not in built:
            out_dir = tmp_path_factory.mktemp(f"tiny-{family}")
            built[key] = build_tiny_model(family, out_dir, default_model_dir, **config_overrides)
        return built[key]

    return factory


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory: Callable[..., Path]) -> Path:
    """The tiny Llama model folder with default settings."""
    return tiny_model_factory("llama")
