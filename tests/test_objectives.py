import pytest
import torch
import torch.nn.functional as F

from revlens.objectives import (
    make_loss_batch,
    masked_batch,
    next_token_batch,
    sample_loss_batches,
    sample_mdm_mask,
    weighted_token_loss,
)
from revlens.readout import logits_at_masks


def test_mdm_loss_is_cross_entropy_on_masked_positions_weighted_by_one_over_t():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 20, (6, 3), generator=g)
    logits = torch.randn(6, 3, 20, generator=g)
    mask = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    t = torch.tensor([0.2, 0.5, 1.0, 0.1, 0.7, 0.9])
    batch = masked_batch(tokens, mask, t, mask_id=0)
    assert (batch.inputs[mask] == 0).all() and torch.equal(batch.inputs[~mask], tokens[~mask])
    expected = 0.0
    for b in range(6):
        for i in range(3):
            if mask[b, i]:
                expected += F.cross_entropy(logits[b, i], tokens[b, i]) / t[b]
    expected = expected / (6 * 3)  # LLaDA: sum over masked tokens / (batch * seq_len)
    torch.testing.assert_close(weighted_token_loss(logits, batch.targets, batch.weights), expected)


def test_mdm_mask_rate_follows_t():
    tokens = torch.zeros(20000, 3, dtype=torch.long)
    mask, t = sample_mdm_mask(tokens.shape, torch.Generator().manual_seed(0))
    assert (t > 0).all() and (t <= 1).all()
    assert abs(t.mean().item() - 0.5) < 0.01
    low, high = t < 0.2, t > 0.8
    assert mask[low].float().mean() < 0.15 and mask[high].float().mean() > 0.85
    # weighting by 1/t makes the expected weight of every position 1 / seq_len
    weights = masked_batch(tokens + 5, mask, t, 0).weights
    assert abs(weights.mean().item() * 3 - 1.0) < 0.05


def test_mdm_mask_floor_bounds_the_weight_as_llada_does():
    """p = (1 - eps) t + eps: the rate never falls below eps, so no weight exceeds 1 / (eps * seq_len)."""
    shape = (200000, 3)
    _, p_floor = sample_mdm_mask(shape, torch.Generator().manual_seed(1), eps=1e-3)
    _, t = sample_mdm_mask(shape, torch.Generator().manual_seed(1), eps=0.0)
    torch.testing.assert_close(p_floor, (1 - 1e-3) * t + 1e-3)
    assert p_floor.min() >= 1e-3 and t.min() < 1e-3  # without the floor 1/t reaches past 1000
    assert (1 / p_floor).max() <= 1000.0 + 1e-3
    with pytest.raises(ValueError, match="mask_eps"):
        sample_mdm_mask(shape, torch.Generator(), eps=1.0)
    with pytest.raises(ValueError, match="mask_eps"):
        sample_mdm_mask(shape, torch.Generator(), eps=float("nan"))


def test_next_token_batch_scores_each_position_on_the_following_token():
    tokens = torch.tensor([[5, 1, 9]])
    batch = next_token_batch(tokens)
    assert batch.targets[0, :2].tolist() == [1, 9]
    assert batch.weights.tolist() == [[0.5, 0.5, 0.0]]


def test_unknown_objective_is_named():
    with pytest.raises(ValueError, match="unknown objective 'gpt'"):
        make_loss_batch("gpt", torch.zeros(2, 3, dtype=torch.long), 0, torch.Generator())


def test_readout_picks_the_right_position():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float).reshape(2, 3, 4)
    model = lambda tokens: logits  # noqa: E731
    prompts = torch.tensor([[5, 1, 0], [6, 1, 0]])
    same = logits_at_masks(model, prompts, 0, readout="same_position")
    shifted = logits_at_masks(model, prompts, 0, readout="shifted", causal=True)
    torch.testing.assert_close(same[:, 0], logits[:, 2])
    torch.testing.assert_close(shifted[:, 0], logits[:, 1])


@pytest.mark.parametrize(
    "prompts, kw, match",
    [
        ([[5, 1, 6]], {"readout": "same_position"}, "has no mask token"),
        ([[0, 1, 6]], {"readout": "shifted"}, "position 0"),
        ([[5, 0, 6]], {"readout": "shifted", "causal": True}, "last position"),
        ([[0, 1, 6], [0, 0, 6]], {"readout": "same_position"}, "same number of masks"),
        ([[0, 1, 6]], {"readout": "diagonal"}, "unknown readout"),
    ],
)
def test_unanswerable_prompts_are_clear_errors(prompts, kw, match):
    with pytest.raises(ValueError, match=match):
        logits_at_masks(lambda t: torch.zeros(*t.shape, 8), torch.tensor(prompts), 0, **kw)


def test_weighted_loss_equals_cross_entropy_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 3, 50, generator=g, requires_grad=True)
    targets = torch.randint(50, (8, 3), generator=g)
    weights = torch.rand(8, 3, generator=g)
    ours = weighted_token_loss(logits, targets, weights)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    reference = (weights.flatten() * ce).sum() / 8
    (grad_ref,) = torch.autograd.grad(reference, logits)
    assert torch.equal(ours, reference) and torch.equal(grad_ours, grad_ref)


@pytest.mark.parametrize("objective", ["mdm", "bert", "arm"])
def test_stacked_batches_equal_one_generator_at_a_time(objective):
    sentences = torch.randint(2, 30, (50, 3), generator=torch.Generator().manual_seed(1))
    stacked = sample_loss_batches(objective, sentences, 16, 0, [torch.Generator().manual_seed(s) for s in (4, 5)])
    for k, seed in enumerate((4, 5)):
        g = torch.Generator().manual_seed(seed)
        alone = make_loss_batch(objective, sentences[torch.randint(50, (16,), generator=g)], 0, g)
        for field in ("inputs", "targets", "weights"):
            assert torch.equal(getattr(stacked, field)[k], getattr(alone, field)), field


def test_readout_keeps_leading_instance_axes():
    logits = torch.randn(4, 2, 3, 7)
    prompts = torch.tensor([[5, 0, 1], [6, 1, 0]])
    with pytest.raises(ValueError, match="same number of masks"):
        logits_at_masks(lambda tokens: logits, torch.tensor([[0, 0, 1], [6, 1, 0]]), 0, readout="same_position")
    picked = logits_at_masks(lambda tokens: logits, prompts, 0, readout="same_position")
    assert picked.shape == (4, 2, 1, 7)
    assert torch.equal(picked[:, 0, 0], logits[:, 0, 1]) and torch.equal(picked[:, 1, 0], logits[:, 1, 2])
