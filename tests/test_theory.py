import math

import numpy as np
import pytest
import torch

from revlens.config import EncoderConfig
from revlens.theory import (
    absolute_score_correlation,
    direct_rope_score_correlation,
    monte_carlo_score_correlation,
    rope_rotation_matrix,
    rope_score_correlation,
    weighted_rope_score_correlation,
)
from revlens.training import init_model

SETTINGS = [(16, 2, 1e4), (64, 1, 1e4), (128, 2, 5e5), (128, 2, 1e6), (32, 4, 100.0), (8, 7, 10.0)]


@pytest.mark.parametrize("d_head, offset, base", SETTINGS)
def test_closed_form_direct_and_monte_carlo_agree(d_head, offset, base):
    closed = rope_score_correlation(d_head, offset, base)
    assert direct_rope_score_correlation(d_head, offset, base) == pytest.approx(closed, abs=1e-6)
    estimate, stderr = monte_carlo_score_correlation(d_head, offset, base, n_draws=20_000, seed=1)
    assert 0 < stderr < 0.02
    assert abs(estimate - closed) < 4 * stderr  # 4 sigma: fails by chance ~1 in 16000 per case


def test_closed_form_is_vectorised_and_has_known_values():
    assert rope_score_correlation(16, 0) == pytest.approx(1.0)
    out = rope_score_correlation(np.array([16, 128]), np.array([[1], [2]]), 1e4)
    assert out.shape == (2, 2)
    assert out[1, 0] == pytest.approx(rope_score_correlation(16, 2))
    # a single frequency pair: tr R(2D) / 2 = cos(2 D)
    assert rope_score_correlation(2, 3, 1e4) == pytest.approx(math.cos(6.0))
    # LLaDA-8B (d=128, base 5e5) and Qwen2.5 / Dream (d=128, base 1e6) at D=2 exceed the 0.4 bound
    assert rope_score_correlation(128, 2, 5e5) > 0.8 and rope_score_correlation(128, 2, 1e6) > 0.8


def test_rotation_matrix_matches_the_models_rope_and_is_orthogonal():
    r = rope_rotation_matrix(16, 2)
    torch.testing.assert_close(r @ r.T, torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)
    model = init_model(EncoderConfig(d_vocab=10, d_model=16, n_heads=1, d_head=16), seed=0).eval()
    tokens = torch.tensor([[3, 4, 5]])
    _, cache = model.run_with_cache(tokens)
    q, rq = cache["blocks.0.attn.hook_q"][0, 2, 0], cache["blocks.0.attn.hook_rot_q"][0, 2, 0]
    torch.testing.assert_close(rq.double(), r @ q.double(), atol=1e-5, rtol=0)


def test_weighted_form_reduces_to_isotropic_and_single_frequency():
    q_even = torch.ones(16, dtype=torch.float64)
    assert float(weighted_rope_score_correlation(q_even, 2)) == pytest.approx(rope_score_correlation(16, 2))
    q_low = torch.zeros(16, dtype=torch.float64)
    q_low[7] = 1.0  # all energy in the slowest pair (m = 7)
    theta = 1e4 ** (-2 * 7 / 16)
    assert float(weighted_rope_score_correlation(q_low, 2)) == pytest.approx(math.cos(4 * theta))


def test_absolute_positions_correlation_is_product_of_cosines_and_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    e_m, e_b, p0, p2 = torch.randn(4, 24, generator=g, dtype=torch.float64)
    xf, xr, yf, yr = e_m + p0, e_m + p2, e_b + p2, e_b + p0
    closed = absolute_score_correlation(xf, xr, yf, yr)
    w_q = torch.randn(20_000, 24, 8, generator=g, dtype=torch.float64)
    w_k = torch.randn(20_000, 24, 8, generator=g, dtype=torch.float64)
    s_f = ((xf @ w_q) * (yf @ w_k)).sum(-1)
    s_r = ((xr @ w_q) * (yr @ w_k)).sum(-1)
    estimate = torch.corrcoef(torch.stack([s_f, s_r]))[0, 1]
    assert abs(float(estimate) - closed) < 0.03
    assert absolute_score_correlation(e_m, e_m, e_b, e_b) == pytest.approx(1.0)


def test_alibi_and_no_positions_give_identical_scores_and_untied_gives_zero_at_init():
    from revlens.routes import RoutePrompts, route_correlation

    prompts_f = torch.tensor([[0, 1, b] for b in range(2, 12)])
    prompts_r = torch.tensor([[b, 1, 0] for b in range(2, 12)])
    fwd, rev = RoutePrompts.fixed(prompts_f, 0, 2), RoutePrompts.fixed(prompts_r, 2, 0)
    for positional in ("alibi", "none"):
        cfg = EncoderConfig(d_vocab=12, d_model=16, n_heads=2, d_head=8, positional=positional, residual=True)
        rc = route_correlation(init_model(cfg, 0).eval(), fwd, rev)
        torch.testing.assert_close(rc.forward.scores, rc.reverse.scores)
        assert torch.allclose(rc.score_corr, torch.ones(1, 2), atol=1e-5)
    # untied per-position W_Q/W_K: the forward score uses W_Q[0], W_K[2] and the reverse score
    # W_Q[2], W_K[0] -- disjoint, independently initialised matrices, hence Corr = 0 at init
    cfg = EncoderConfig(d_vocab=12, d_model=16, n_heads=1, d_head=8, untied_positions=("q", "k"))
    model = init_model(cfg, 0).eval()
    before = route_correlation(model, fwd, rev)
    with torch.no_grad():
        model.blocks[0].attn.W_Q[2] += 1.0
        model.blocks[0].attn.W_K[0] += 1.0
    after = route_correlation(model, fwd, rev)
    torch.testing.assert_close(after.forward.scores, before.forward.scores)
    assert not torch.allclose(after.reverse.scores, before.reverse.scores)


@pytest.mark.parametrize(
    "args, match",
    [
        ((15, 2), "even head size"),
        ((16, -1), "non-negative integer"),
        ((16, 1.5), "non-negative integer"),
        ((16, 2, 1.0), "base must be > 1"),
        ((0, 2), "even head size"),
    ],
)
def test_invalid_inputs_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        rope_score_correlation(*args)
