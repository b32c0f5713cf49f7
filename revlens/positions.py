"""Positional encodings shared by the model and the theory.

RoPE rotates each pair of query/key coordinates (i, i + d/2) by the angle ``pos * theta_m`` with
``theta_m = base ** (-2m / d)`` (the LLaMA / GPT-NeoX "rotate half" layout, the one LLaDA and
Dream use). ALiBi adds ``-slope_h * |i - j|`` to the scores of head h.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def rope_frequencies(d_head: int, base: float = 10000.0) -> Float[Tensor, " half"]:
    """Angular frequencies theta_m = base^(-2m/d), m = 0 .. d/2 - 1."""
    if d_head % 2:
        raise ValueError(f"RoPE needs an even head size, got d_head={d_head}")
    if base <= 1:
        raise ValueError(f"RoPE base must be > 1, got {base}")
    m = torch.arange(d_head // 2, dtype=torch.float64)
    return base ** (-2.0 * m / d_head)


def rope_cos_sin(
    n_ctx: int, d_head: int, base: float = 10000.0
) -> tuple[Float[Tensor, "pos d_head"], Float[Tensor, "pos d_head"]]:
    """cos and sin tables, duplicated over both halves, for positions 0 .. n_ctx - 1."""
    angles = torch.arange(n_ctx, dtype=torch.float64)[:, None] * rope_frequencies(d_head, base)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(
    x: Float[Tensor, "batch pos head d_head"],
    cos: Float[Tensor, "*batch pos d_head"],
    sin: Float[Tensor, "*batch pos d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate queries or keys by their position (rotate-half convention).

    ``cos``/``sin``: the tables for positions 0, 1, ... (``[pos, d_head]``, the first ``pos`` rows
    are used), or already gathered per row at each token's position id (``[batch, pos, d_head]``)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    if cos.ndim == 3:
        return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    n = x.shape[1]
    return x * cos[:n, None, :] + rotated * sin[:n, None, :]


def alibi_slopes(n_heads: int) -> Float[Tensor, " head"]:
    """Geometric head slopes 2^(-8h/n), h = 1 .. n (Press et al.)."""
    h = torch.arange(1, n_heads + 1, dtype=torch.float32)
    return 2.0 ** (-8.0 * h / n_heads)


def alibi_bias(n_ctx: int, n_heads: int) -> Float[Tensor, "head query_pos key_pos"]:
    """Symmetric distance penalty -slope_h * |i - j| added to the attention scores."""
    pos = torch.arange(n_ctx, dtype=torch.float32)
    distance = (pos[:, None] - pos[None, :]).abs()
    return -alibi_slopes(n_heads)[:, None, None] * distance
