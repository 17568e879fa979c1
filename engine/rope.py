"""Rotary position embeddings as pure rotations, and the check that a model's RoPE can be re-rotated.

Hogwild! attention stores keys rotated at block-local positions and moves each query into a block's frame by
an extra rotation of (own block offset - block offset). That is exact only when the rotation angle is linear in
position with fixed frequencies: `rope_type` default, linear, llama3 or yarn. The rotations here never apply
the model's attention scaling (yarn's mscale): the model already applied it once to q and k.
"""

from __future__ import annotations

import torch

from engine.errors import UnsupportedModelError

LINEAR_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type_of(config: object) -> str:
    """The config's RoPE type; raises UnsupportedModelError for models without RoPE."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or ("rope_theta" not in params and "rope_type" not in params):
        model_type = getattr(config, "model_type", "?")
        raise UnsupportedModelError(f"model type '{model_type}' has no rotary position embeddings")
    return str(params.get("rope_type", "default"))


def check_rope(config: object) -> None:
    """Refuses RoPE variants whose angles are not a fixed linear function of position."""
    rope_type = rope_type_of(config)
    if rope_type not in LINEAR_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type '{rope_type}' changes its frequencies with the sequence length, so keys stored at "
            f"block-local positions cannot be re-rotated exactly (supported: {', '.join(LINEAR_ROPE_TYPES)})"
        )
    params = getattr(config, "rope_parameters", None) or {}
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    if partial != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer `positions` (any shape P): each (*P, D), computed in float32, then cast."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)  # (*P, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (*P, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x by the angles behind cos/sin (broadcast against x's trailing dims)."""
    return x * cos + rotate_half(x) * sin
