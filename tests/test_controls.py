import pytest
import torch

from revlens.controls import attention_control_hooks, controlled_pattern
from revlens.evaluation import answer_metrics, evaluate, evaluate_under_control
from revlens.world import EvalSet


def _pattern(batch=3, heads=2, n=4, causal=False):
    scores = torch.randn(batch, heads, n, n, generator=torch.Generator().manual_seed(0))
    if causal:
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1)


def test_uniform_control_replaces_only_the_chosen_rows():
    pattern = _pattern()
    out = controlled_pattern(pattern, 2, "uniform", causal=False)
    assert torch.equal(out[..., [0, 1, 3], :], pattern[..., [0, 1, 3], :])
    torch.testing.assert_close(out[..., 2, :], torch.full((3, 2, 4), 0.25))


def test_uniform_control_respects_the_causal_mask():
    out = controlled_pattern(_pattern(causal=True), [1, 3], "uniform", causal=True)
    torch.testing.assert_close(out[..., 1, :], torch.tensor([0.5, 0.5, 0, 0]).expand(3, 2, 4))
    torch.testing.assert_close(out[..., 3, :], torch.full((3, 2, 4), 0.25))


def test_shuffled_control_permutes_a_row_among_visible_keys():
    pattern = _pattern(causal=True)
    out = controlled_pattern(pattern, 2, "shuffled", causal=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[..., 2, 3], torch.zeros(3, 2))
    torch.testing.assert_close(out[..., 2, :].sort(-1).values, pattern[..., 2, :].sort(-1).values)
    assert not torch.equal(out[..., 2, :], pattern[..., 2, :])


def test_controls_refuse_bad_arguments(trained_mdm):
    with pytest.raises(ValueError, match="unknown attention control 'flat'"):
        controlled_pattern(_pattern(), 0, "flat", causal=False)
    with pytest.raises(ValueError, match=r"query positions \[4\]"):
        controlled_pattern(_pattern(), 4, "uniform", causal=False)
    with pytest.raises(ValueError, match="layers"):
        attention_control_hooks(trained_mdm.model, 0, layers=[3])


def test_uniform_attention_erases_position_so_inplace_and_reverse_coincide(trained_mdm, small_world):
    """Under a uniform pattern a one-layer RoPE model sees "[M] r B" and "B r [M]" as the same bag of
    values: the two sets' metrics must agree exactly, while the model's own pattern tells them apart."""
    controlled = evaluate_under_control(trained_mdm.model, small_world, "mdm")
    assert controlled["inplace_logp_uniform"] == pytest.approx(controlled["reverse_logp_uniform"], abs=1e-6)
    plain = evaluate(trained_mdm.model, small_world, "mdm")
    assert plain["inplace_logp"] != pytest.approx(plain["reverse_logp"], abs=1e-3)


def test_control_on_an_unreadable_set_is_nan(trained_arm, small_world):
    out = evaluate_under_control(trained_arm.model, small_world, "arm", sets=("inplace", "reverse"))
    assert out["inplace_acc_uniform"] != out["inplace_acc_uniform"]  # NaN: an ARM cannot read position 0
    assert 0.0 <= out["reverse_acc_uniform"] <= 1.0


def test_answer_metrics_on_hand_made_logits():
    # vocab: 0 mask, 1 r, A = {2, 3}, B = {4, 5}; answers are A tokens
    es = EvalSet("reverse", torch.zeros(3, 3, dtype=torch.long), 2, torch.tensor([2, 3, 2]), torch.tensor([2, 3]))
    logits = torch.tensor(
        [
            [0.0, 0.0, 5.0, 1.0, 0.0, 0.0],  # correct, margin 4
            [0.0, 0.0, 1.0, 2.0, 3.0, 0.0],  # B token wins; within A the answer (3) wins; margin -1, rank 2
            [0.0, 0.0, 1.0, 2.0, 0.0, 0.0],  # wrong A wins; margin -1, rank 2
        ]
    )
    m = answer_metrics(logits, es)
    assert m["acc"] == pytest.approx(1 / 3)
    assert m["acc_in_type"] == pytest.approx(2 / 3)
    assert m["argmax_in_type"] == pytest.approx(2 / 3)
    assert m["margin"] == pytest.approx((4 - 1 - 1) / 3)
    assert m["rank"] == 2.0
    tied = answer_metrics(torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]), EvalSet("r", es.prompts[:1], 2, torch.tensor([2]), es.candidates))
    assert tied["rank"] == 2.0 and tied["margin"] == 0.0  # a tie is not a win


def test_type_logit_split_is_exact(trained_mdm, small_world):
    from revlens.attribution import type_logit_split

    es = small_world.eval_set("reverse")
    split = type_logit_split(trained_mdm.model, es.prompts, 2, small_world.alphabet("A"), small_world.alphabet("B"))
    torch.testing.assert_close(split.direct + split.by_key.sum(-1), split.total, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(split.by_key_head.sum(1), split.by_key)


def test_type_logit_split_with_absolute_positions_and_untied_values(small_world):
    from revlens.attribution import type_logit_split
    from revlens.config import EncoderConfig
    from revlens.training import init_model

    cfg = EncoderConfig(d_vocab=small_world.d_vocab, d_model=32, n_heads=2, d_head=16, positional="absolute",
                        untied_positions=("v",))
    model = init_model(cfg, 0).eval()
    es = small_world.eval_set("inplace")
    split = type_logit_split(model, es.prompts, 0, small_world.alphabet("A"), small_world.alphabet("B"))
    torch.testing.assert_close(split.direct + split.by_key.sum(-1), split.total, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one-layer attention-only"):
        type_logit_split(init_model(cfg.replace(n_layers=2), 0), es.prompts, 0, small_world.alphabet("A"),
                         small_world.alphabet("B"))


def test_spearman_uses_average_ranks_for_ties():
    from revlens.stats import average_ranks, spearman

    assert average_ranks(torch.tensor([0.5, 1.0, 1.0, 0.2])).tolist() == [2.0, 3.5, 3.5, 1.0]
    # ten tied values: any tiny perturbation of the ties must not change the statistic
    x = torch.tensor([1.0] * 10 + [0.1, 0.2])
    y = torch.arange(12.0)
    shuffled_y = torch.cat([y[:10].flip(0), y[10:]])
    assert spearman(x, y).item() == pytest.approx(spearman(x, shuffled_y).item(), abs=1e-12)


def test_init_noise_switch_perturbs_at_rounding_level(monkeypatch):
    from revlens.config import EncoderConfig
    from revlens.training import init_model

    cfg = EncoderConfig(d_vocab=20)
    clean = init_model(cfg, 3)
    monkeypatch.setenv("REVLENS_INIT_NOISE", "1e-7")
    noisy = init_model(cfg, 3)
    for p, q in zip(clean.parameters(), noisy.parameters()):
        rel = ((p - q).abs() / p.abs().clamp_min(1e-30)).max().item()
        assert 0 < rel < 1e-6
    monkeypatch.setenv("REVLENS_INIT_NOISE", "big")
    with pytest.raises(ValueError, match="REVLENS_INIT_NOISE must be a number"):
        init_model(cfg, 3)
    monkeypatch.setenv("REVLENS_INIT_NOISE", "0.5")
    with pytest.raises(ValueError, match="rounding-level"):
        init_model(cfg, 3)
