"""Tiny random-weight decoders of each supported family, saved as Hugging Face folders for tests.

Every model has 2 layers, hidden size 64, 4 query heads and 2 KV heads of size 16 (GQA ratio 2), an MLP of 128,
the default model's tokenizer and vocabulary, and 4096 positions. Weights are float32 and depend only on the
family and the config overrides (a fixed seed), so two builds with the same arguments are identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_MODEL_SEED = 0
TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

_TINY_SHAPE: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
}

# Settings that keep every layer on full attention, which the default of some families does not.
_FAMILY_SETTINGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {"use_sliding_window": False},
    "qwen3": {"use_sliding_window": False},
    "mistral": {"sliding_window": None},
}


def build_tiny_model(family: str, out_dir: Path, tokenizer_dir: Path, **config_overrides: Any) -> Path:
    """Save a tiny `family` model with `tokenizer_dir`'s tokenizer into `out_dir` and return `out_dir`.

    `config_overrides` are passed to the family's config class last, so they win over the tiny shape
    (e.g. rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if family not in _FAMILY_SETTINGS:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {TINY_FAMILIES}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**_TINY_SHAPE, **_FAMILY_SETTINGS[family], **config_overrides},
    )
    torch.manual_seed(TINY_MODEL_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
