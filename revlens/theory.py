"""Closed forms for the correlation of forward and reverse attention routes.

Set-up (arXiv 2602.02133, the correlated-routes argument). The mask attends to B with logit ``S_fwd = q^T R(+D) k / sqrt(d)`` in
"[M] r B" and ``S_rev = q^T R(-D) k / sqrt(d)`` in "B r [M]": the *same* ``q = W_Q e_M`` and
``k = W_K e_B`` (weights are shared across positions), rotated by opposite relative offsets.
For independent isotropic q, k (e.g. Gaussian W_Q, W_K at initialisation)

    E[S_fwd S_rev] = E[q^T R(D) k k^T R(D) q] / d = E[q^T R(2D) q] / d = tr R(2D) / d
    Var S_fwd      = E[q^T q] / d = 1

so ``Corr(S_fwd, S_rev) = tr R(2D) / d = (2/d) sum_m cos(2 D theta_m)``, theta_m = base^(-2m/d).

The other encodings, same argument:

* **ALiBi / no positions**: the bias depends on |i - j| only, so S_fwd = S_rev and Corr = 1.
* **Learned absolute**: the query input is e_M + p_i and the key input e_B + p_j; for Gaussian
  W_Q, W_K, Corr = cos(x_fwd, x_rev) * cos(y_fwd, y_rev) with x the query inputs and y the key
  inputs -- it depends on how large the position vectors are relative to the token embeddings,
  not on a frequency spectrum.
* **Per-position (untied) W_Q, W_K**: forward and reverse use independent matrices, Corr = 0 at
  initialisation; anything larger must be learned.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from jaxtyping import Float
from numpy.typing import ArrayLike
from torch import Tensor

from revlens.positions import apply_rope, rope_cos_sin, rope_frequencies
from revlens.stats import pearson

PAPER_BOUND = 0.4
"""The lower bound on Corr(S_fwd, S_rev) stated in arXiv 2602.02133."""


def _check_rope_args(d_head: np.ndarray, offset: np.ndarray, base: np.ndarray) -> None:
    if np.any(d_head != np.round(d_head)) or np.any(d_head < 2) or np.any(d_head % 2):
        raise ValueError(f"RoPE needs a positive even head size, got d_head={d_head.tolist()}")
    if np.any(offset != np.round(offset)) or np.any(offset < 0):
        raise ValueError(f"offset must be a non-negative integer, got {offset.tolist()}")
    if np.any(base <= 1):
        raise ValueError(f"RoPE base must be > 1, got {base.tolist()}")


def rope_score_correlation(d_head: ArrayLike, offset: ArrayLike, base: ArrayLike = 10000.0) -> float | np.ndarray:
    """Corr(S_fwd, S_rev) = tr R(2*offset) / d_head for isotropic q, k under RoPE.

    Broadcasts over ``d_head``, ``offset`` and ``base``; returns a float for scalar inputs.
    """
    d, off, b = (np.asarray(x, dtype=np.float64) for x in (d_head, offset, base))
    _check_rope_args(d, off, b)
    d, off, b = np.broadcast_arrays(d, off, b)
    out = np.empty(d.shape)
    for size in np.unique(d):  # one vectorised sum per distinct head size
        sel = d == size
        m = np.arange(int(size) // 2)
        theta = b[sel][:, None] ** (-2.0 * m / size)
        out[sel] = (2.0 / size) * np.cos(2.0 * off[sel][:, None] * theta).sum(-1)
    return float(out) if out.ndim == 0 else out


def weighted_rope_score_correlation(
    q: Float[Tensor, "... d_head"], offset: int, base: float = 10000.0
) -> Float[Tensor, "..."]:
    """Corr over isotropic keys for a *fixed* query q: q^T R(2*offset) q / |q|^2.

    This is a weighted mean of cos(2 * offset * theta_m) with weights |q_m|^2 / |q|^2, the share of
    the query's energy in frequency pair m -- it equals the isotropic formula when q's energy is
    spread evenly, and departs from it when a trained query concentrates in a few frequencies.
    """
    d = q.shape[-1]
    theta = rope_frequencies(d, base).to(q.dtype)
    half = d // 2
    energy = q[..., :half] ** 2 + q[..., half:] ** 2
    return (energy * torch.cos(2 * offset * theta)).sum(-1) / energy.sum(-1)


def absolute_score_correlation(
    query_fwd: Float[Tensor, " d"], query_rev: Float[Tensor, " d"], key_fwd: Float[Tensor, " d"], key_rev: Float[Tensor, " d"]
) -> float:
    """Corr over Gaussian W_Q, W_K with absolute positions: cos(x_f, x_r) * cos(y_f, y_r).

    ``query_*`` are the query-side inputs (e_M + p_i), ``key_*`` the key-side inputs (e_B + p_j).
    """
    cos = torch.nn.functional.cosine_similarity
    return float(cos(query_fwd, query_rev, dim=0) * cos(key_fwd, key_rev, dim=0))


def rope_rotation_matrix(d_head: int, offset: int, base: float = 10000.0) -> Float[Tensor, "d_head d_head"]:
    """The explicit matrix R(offset) that :func:`revlens.positions.apply_rope` applies.

    Built by rotating the identity, so it checks the model's RoPE against the formula.
    """
    n = offset + 1
    cos, sin = rope_cos_sin(n, d_head, base)
    basis = torch.eye(d_head).expand(1, n, d_head, d_head)  # "heads" axis = basis vector e_j
    rotated = apply_rope(basis, cos, sin)  # rotated[0, p, j] = R(p) e_j
    return rotated[0, offset].T.double()


def direct_rope_score_correlation(d_head: int, offset: int, base: float = 10000.0) -> float:
    """The correlation from explicit rotation matrices, tr(R(D) R(D)) / d, with no cosine sum."""
    r = rope_rotation_matrix(d_head, offset, base)
    # S_fwd = q^T R(D) k, S_rev = q^T R(-D) k = q^T R(D)^T k, so E[S_fwd S_rev] = tr(R(D) R(D)).
    return float(torch.trace(r @ r) / d_head)


def monte_carlo_score_correlation(
    d_head: int,
    offset: int,
    base: float = 10000.0,
    n_draws: int = 10_000,
    seed: int = 0,
    n_groups: int = 20,
) -> tuple[float, float]:
    """Pearson Corr(S_fwd, S_rev) over ``n_draws`` isotropic (q, k) pairs, with its standard error.

    q, k are the images of fixed unit embeddings under Gaussian W_Q, W_K, i.e. standard normal
    vectors. The standard error is from ``n_groups`` equal batches (batch means), which makes no
    normality assumption about the products S_fwd * S_rev.
    """
    if n_draws < 2 * n_groups:
        raise ValueError(f"n_draws={n_draws} is too small for {n_groups} groups")
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_draws, d_head, generator=gen, dtype=torch.float64)
    k = torch.randn(n_draws, d_head, generator=gen, dtype=torch.float64)
    r = rope_rotation_matrix(d_head, offset, base)
    s_fwd = torch.einsum("nd,de,ne->n", q, r, k) / math.sqrt(d_head)
    s_rev = torch.einsum("nd,ed,ne->n", q, r, k) / math.sqrt(d_head)
    n_used = n_draws - n_draws % n_groups
    groups = torch.stack([s_fwd[:n_used], s_rev[:n_used]]).reshape(2, n_groups, -1)
    per_group = pearson(groups[0], groups[1])
    return float(pearson(s_fwd, s_rev)), float(per_group.std() / math.sqrt(n_groups))
