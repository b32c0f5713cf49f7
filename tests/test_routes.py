import pytest
import torch

from revlens.routes import RouteLogger, RoutePrompts, read_routes, route_correlation, toy_routes
from revlens.stats import pearson


def test_read_routes_matches_the_cached_hooks(trained_mdm, small_world):
    forward, reverse = toy_routes(small_world, "mdm")
    readings = read_routes(trained_mdm.model, forward)
    _, cache = trained_mdm.model.run_with_cache(forward.prompts)
    scores = cache["blocks.0.attn.hook_attn_scores"][:, :, 0, 2]
    torch.testing.assert_close(readings.scores[:, 0], scores)
    torch.testing.assert_close(readings.weights[:, 0], cache["blocks.0.attn.hook_pattern"][:, :, 0, 2])
    assert readings.scores.shape == (32, 1, 2)


def test_route_correlation_is_per_head_pearson_across_facts(trained_mdm, small_world):
    forward, reverse = toy_routes(small_world, "mdm")
    rc = route_correlation(trained_mdm.model, forward, reverse)
    assert rc.score_corr.shape == rc.weight_corr.shape == (1, 2)
    expected = torch.corrcoef(torch.stack([rc.forward.scores[:, 0, 1], rc.reverse.scores[:, 0, 1]]))[0, 1]
    torch.testing.assert_close(rc.score_corr[0, 1], expected, atol=1e-5, rtol=0)


def test_toy_routes_point_at_b_for_masked_models_and_at_the_subject_for_arms(small_world):
    fwd, rev = toy_routes(small_world, "mdm")
    assert (fwd.prompts[torch.arange(32), fwd.key_pos] == rev.prompts[torch.arange(32), rev.key_pos]).all()
    assert (fwd.prompts[:, 0] == small_world.mask_id).all() and (rev.prompts[:, 2] == small_world.mask_id).all()
    fwd, rev = toy_routes(small_world, "arm")
    assert fwd.query_pos.unique().tolist() == [1] and rev.key_pos.unique().tolist() == [0]


def test_route_logger_and_mismatched_prompts(trained_arm, small_world):
    values = RouteLogger(small_world, "arm")(0, trained_arm.model)
    assert set(values) == {"route_score_corr", "route_weight_corr", "route_weight_fwd", "route_weight_rev", "route_weight_rev_max_head"}
    assert values["route_weight_rev"] <= values["route_weight_rev_max_head"] <= 1
    assert 0 <= values["route_weight_fwd"] <= 1
    fwd, rev = toy_routes(small_world, "arm")
    with pytest.raises(ValueError, match="same facts"):
        route_correlation(trained_arm.model, fwd, RoutePrompts.fixed(rev.prompts[:3], 1, 0))


def test_pearson_matches_numpy():
    x, y = torch.randn(2, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(pearson(x, y), torch.corrcoef(torch.stack([x, y]))[0, 1])


def test_route_at_reads_each_prompts_own_query_and_key_for_every_head():
    from revlens.routes import route_at

    values = torch.randn(3, 2, 5, 5)  # [batch, head, query_pos, key_pos]
    q, k = torch.tensor([0, 4, 2]), torch.tensor([1, 1, 3])
    one = route_at(values, q, k)
    assert one.shape == (3, 2) and all(torch.equal(one[b], values[b, :, q[b], k[b]]) for b in range(3))
    keys = torch.tensor([[1, 2], [0, 3], [4, 4]])  # one query, several keys per prompt
    several = route_at(values, q[:, None], keys)
    assert several.shape == (3, 2, 2)
    assert all(torch.equal(several[b, j], values[b, :, q[b], keys[b, j]]) for b in range(3) for j in range(2))
    slots = torch.tensor([[0, 1, 2], [2, 3, 4], [1, 1, 0]])  # several queries, one key per prompt
    by_slot = route_at(values, slots, k[:, None])
    assert by_slot.shape == (3, 3, 2) and torch.equal(by_slot[1, 2], values[1, :, 4, 1])
