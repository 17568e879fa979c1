"""Loading a Hugging Face decoder for Hogwild! attention, and refusing the ones it cannot run exactly."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.attention import ATTENTION_NAME, hogwild_attention
from engine.config import DEFAULT_MODEL, EngineConfig
from engine.errors import LOAD_FAILED_PREFIX, InvalidRequestError, ModelNotFoundError, UnsupportedModelError
from engine.prompts import InsertedText
from engine.rope import check_rope

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
Progress = Callable[[str], None]


@dataclass
class LoadedModel:
    """A causal LM whose attention layers call `hogwild_attention`, plus what the engine needs to drive it."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    inv_freq: torch.Tensor  # (D/2,) float32: the model's own RoPE frequencies
    num_layers: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    eos_token_ids: frozenset[int]

    @functools.cached_property
    def inserted_text(self) -> InsertedText:
        """The encoder of the texts the engine inserts, shared by admission's bounds and every session."""
        return InsertedText(self.tokenizer)


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """Defaults: cuda + bfloat16 when a GPU is present, else cpu + float32.

    float32 on CPU because most CPUs have no bfloat16 matrix units: there bfloat16 matmuls run through
    conversions, and a prompt prefill of the default model measured 2.4x slower than in float32.
    """
    try:
        chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        message = f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)"
        raise InvalidRequestError(message, "device") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelNotFoundError("device 'cuda' was requested but no CUDA GPU is available")
    return chosen, getattr(torch, dtype or ("bfloat16" if chosen.type == "cuda" else "float32"))


def check_architecture(config: object) -> int:
    """Refuses what Hogwild! attention cannot honour; returns the usable context length in tokens."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    check_rope(config)
    context = int(getattr(config, "max_position_embeddings", 0) or 0)
    if context <= 0:
        raise UnsupportedModelError("the model config does not state max_position_embeddings")
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if window and (model_type == "mistral" or "sliding_attention" in layer_types):
        context = min(context, int(window))  # sessions that fit the window never need the window
    return context


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, hogwild_attention)


def resolve_model_path(model: str, progress: Progress | None = None) -> str:
    """'default' -> the converted embedded model folder; a local folder or hub id is passed through."""
    if model == DEFAULT_MODEL:
        from engine.default_model import ensure_default_model

        return str(ensure_default_model(progress))
    if os.path.isdir(model) or (not Path(model).is_absolute() and "/" in model and not model.startswith(".")):
        return model
    raise ModelNotFoundError(f"model '{model}' is neither a local folder nor a hub id (owner/name)")


def load_model(config: EngineConfig, progress: Progress | None = None) -> LoadedModel:
    """Loads tokenizer and weights, checks the architecture first, registers the attention function."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    say = progress or log.info
    device, dtype = resolve_device_dtype(config.device, config.dtype)
    path = resolve_model_path(config.model, say)
    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{LOAD_FAILED_PREFIX} '{config.model}': {exc}") from exc
    context = check_architecture(model_config)
    register_attention()
    say(f"loading {config.model} on {device} as {str(dtype).removeprefix('torch.')}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTENTION_NAME)
        model.to(device).eval()
    except Exception as exc:  # missing or unreadable files, a truncated weights file, too little device memory
        log.debug("loading %s failed", path, exc_info=True)  # the traceback, for HOGWILD_LOG_LEVEL=debug
        reason = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        raise ModelNotFoundError(f"{LOAD_FAILED_PREFIX} '{config.model}': {reason}") from exc
    rotary = model.model.rotary_emb
    say("model loaded")
    return LoadedModel(
        name=model_name(config.model, path),
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        inv_freq=rotary.inv_freq.detach().to(device, torch.float32),
        num_layers=model_config.num_hidden_layers,
        num_kv_heads=model_config.num_key_value_heads,
        head_dim=getattr(model_config, "head_dim", None)
        or model_config.hidden_size // model_config.num_attention_heads,
        context_length=context,
        eos_token_ids=_eos_ids(model, tokenizer),
    )


def model_name(requested: str, path: str) -> str:
    """The id served to clients: the default model's name, a hub id as given, or a local folder's name."""
    if requested == DEFAULT_MODEL:
        from engine.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return Path(path).resolve().name if os.path.isdir(path) else requested  # "." names its folder too


def _eos_ids(model: torch.nn.Module, tokenizer: object) -> frozenset[int]:
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
