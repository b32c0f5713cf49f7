import pytest
import torch

from revlens.config import EncoderConfig
from revlens.dynamics import (
    AlignmentLogger,
    LossQuery,
    block_products,
    first_order_check,
    mean_loss_grad,
    parameter_blocks,
    per_fact_grads,
    per_fact_grads_loop,
    per_fact_losses,
    storage_evidence,
    storage_factorisation,
    toy_loss_queries,
)
from revlens.training import init_model


@pytest.mark.parametrize(
    "kw",
    [{}, {"positional": "absolute", "attn_only": False}, {"tie_embeddings": True, "n_layers": 2}, {"untied_positions": ("q", "v")}],
)
def test_blocks_partition_the_parameters(kw):
    model = init_model(EncoderConfig(d_vocab=20, d_model=16, n_heads=2, d_head=8, **kw), 0)
    blocks = parameter_blocks(model)
    assert set(blocks) == {n for n, _ in model.named_parameters()}
    assert set(blocks.values()) <= {"storage", "route", "embedding", "other"}
    assert {n.rsplit(".", 1)[-1] for n, b in blocks.items() if b == "route"} == {"W_Q", "W_K"}
    # W_E (and absolute positions) feed both the values and the queries/keys: a block of their own
    assert {n for n, b in blocks.items() if b == "embedding"} == {"W_E"} | ({"W_pos"} if "W_pos" in blocks else set())
    assert (any(b == "other" for b in blocks.values())) == (not model.cfg.attn_only)
    # the "all" products are the sums of the block products
    g = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    h = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    prods = block_products(model, g, h)
    parts = sum(prods[b]["dot"] for b in ("storage", "route", "embedding", "other") if b in prods)
    torch.testing.assert_close(parts, prods["all"]["dot"])


@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_storage_factorisation_matches_autograd(objective, trained_mdm, trained_arm, small_world, small_cfg):
    for model in (trained_mdm.model if objective == "mdm" else trained_arm.model, init_model(small_cfg, 1).eval()):
        f = storage_factorisation(model, *toy_loss_queries(small_world, objective))
        torch.testing.assert_close(f.autograd, f.factorised, rtol=1e-4, atol=1e-7)
        assert f.autograd.abs().max() > 0
    tied = init_model(small_cfg.replace(tie_embeddings=True), 0)
    with pytest.raises(ValueError, match="untied unembedding"):
        storage_factorisation(tied, *toy_loss_queries(small_world, "mdm"))


def test_per_fact_gradients_match_a_loop_of_backward_passes(trained_arm, small_world):
    fwd, _ = toy_loss_queries(small_world, "arm")
    fast = per_fact_grads(trained_arm.model, fwd)
    slow = per_fact_grads_loop(trained_arm.model, fwd)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-5, rtol=1e-4)
    # the mean of per-fact gradients is the gradient of the mean loss
    mean = mean_loss_grad(trained_arm.model, fwd)
    torch.testing.assert_close(fast["W_E"].mean(0), mean["W_E"], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("at", ["init", "trained"])
def test_first_order_prediction_error_shrinks_with_the_step(at, small_world, small_cfg, trained_mdm):
    model = init_model(small_cfg, 0).eval() if at == "init" else trained_mdm.model
    fwd, rev = toy_loss_queries(small_world, "mdm")
    checks = first_order_check(model, fwd, rev, etas=[1.0, 1e-1, 1e-2, 1e-3])
    rel_err = [abs(c.actual - c.predicted) / abs(c.predicted) for c in checks]
    assert rel_err[0] > rel_err[1] > rel_err[2] > rel_err[3]
    assert rel_err[3] < 1e-2
    assert next(model.parameters()).dtype == torch.float32  # the check does not touch the model
    assert all(c.predicted != 0 for c in checks)


def test_loss_queries_follow_the_readout(small_world):
    fwd, rev = toy_loss_queries(small_world, "arm")
    assert fwd.read_pos == 1 and rev.read_pos == 1
    assert (fwd.prompts[:, 0] == torch.tensor(small_world.a_ids[:32])).all()
    fwd, rev = toy_loss_queries(small_world, "mdm")
    assert fwd.read_pos == 0 and rev.read_pos == 2
    with pytest.raises(ValueError, match="cannot be read by a left-to-right model"):
        LossQuery.from_eval_set(small_world.eval_set("inplace"), "arm")


def test_trained_mdm_stores_b_to_a_and_logger_reports(trained_mdm, trained_arm, small_world):
    a, b = torch.tensor(small_world.a_ids[:32]), torch.tensor(small_world.b_ids[:32])
    assert storage_evidence(trained_mdm.model, b, a)["gap_sd"] > 2.0
    assert storage_evidence(trained_arm.model, a, b)["gap_sd"] > 2.0  # the ARM stores A -> B
    row = AlignmentLogger(small_world, "mdm")(0, trained_mdm.model)
    assert {"cos_storage", "cos_route", "cos_embedding", "cos_all", "fo_pred_0.01", "storage_BA_gap_sd"} <= set(row)
    assert per_fact_losses(trained_mdm.model, toy_loss_queries(small_world, "mdm")[0]).mean() < 0.5


def test_logger_mismatched_control_pairs_each_fact_with_another_facts_reverse(trained_mdm, small_world):
    """The control cosine is fact i's forward gradient against fact i-1's reverse gradient, not its own."""
    logger = AlignmentLogger(small_world, "mdm")
    row = logger(0, trained_mdm.model)
    g_fwd, g_rev = per_fact_grads(trained_mdm.model, logger.fwd), per_fact_grads(trained_mdm.model, logger.rev)
    shifted = {n: torch.cat([g[-1:], g[:-1]]) for n, g in g_rev.items()}
    expected = block_products(trained_mdm.model, g_fwd, shifted, batch_dims=1)["all"]["cos"].nanmean()
    matched = block_products(trained_mdm.model, g_fwd, g_rev, batch_dims=1)["all"]["cos"].nanmean()
    assert row["fact_cos_all_mismatched_mean"] == pytest.approx(float(expected), abs=1e-6)
    assert row["fact_cos_all_mean"] == pytest.approx(float(matched), abs=1e-6)
    assert abs(float(expected) - float(matched)) > 1e-3  # the two are different pairings
