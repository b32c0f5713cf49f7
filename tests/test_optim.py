import pytest
import torch

from revlens.optim import AdamW


def _gradient_stream(steps: int, generator: torch.Generator) -> list[list[torch.Tensor]]:
    """Gradients an embedding-like, a transposed (non-contiguous) and a dense tensor might get:
    rows that stay exactly zero for a while, subnormal squares, ordinary values."""
    stream = []
    for step in range(steps):
        embedding = torch.randn(50, 8, generator=generator)
        embedding[torch.rand(50, generator=generator) < 0.8] = 0.0  # most rows unseen this step
        embedding[:10] = 0.0 if step < steps // 2 else embedding[:10]  # some rows unseen for long
        embedding[10:12] = 3e-20 * torch.randn(2, 8, generator=generator)  # squares are subnormal
        transposed = torch.randn(8, 6, generator=generator).T
        dense = torch.randn(3, 5, generator=generator) * 10.0 ** (step % 7 - 3)
        stream.append([embedding, transposed, dense])
    return stream


@pytest.mark.parametrize(("lr", "weight_decay", "betas"), [(3e-3, 0.01, (0.9, 0.999)), (1e-1, 0.0, (0.8, 0.99))])
def test_adamw_matches_torch_foreach_adamw_bit_for_bit(lr, weight_decay, betas):
    generator = torch.Generator().manual_seed(0)
    shapes = [(50, 8), (6, 8), (3, 5)]
    ours = [torch.randn(*s, generator=generator) for s in shapes]
    theirs = [p.clone().requires_grad_() for p in ours]
    optimiser = AdamW(ours, lr=lr, betas=betas, weight_decay=weight_decay)
    reference = torch.optim.AdamW(theirs, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
    zero_second_moments = subnormal_second_moments = 0
    for grads in _gradient_stream(60, generator):
        optimiser.step(grads)
        for p, g in zip(theirs, grads):
            p.grad = g
        reference.step()
        second_moments = optimiser.exp_avg_sqs[0]
        zero_second_moments += int((second_moments == 0).sum())
        subnormal_second_moments += int(((second_moments > 0) & (second_moments < torch.finfo().tiny)).sum())
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q.detach())
    assert zero_second_moments > 0 and subnormal_second_moments > 0, "the stream must exercise both"
    for ours_state, p in zip(zip(optimiser.exp_avgs, optimiser.exp_avg_sqs), theirs):
        assert torch.equal(ours_state[0], reference.state[p]["exp_avg"])
        assert torch.equal(ours_state[1], reference.state[p]["exp_avg_sq"])


def test_adamw_refuses_settings_where_the_zero_safe_sqrt_would_change_results():
    with pytest.raises(ValueError, match="eps"):
        AdamW([torch.zeros(3)], lr=1e-3, eps=1e-12)
    with pytest.raises(ValueError, match="float32"):
        AdamW([torch.zeros(3, dtype=torch.float64)], lr=1e-3)
