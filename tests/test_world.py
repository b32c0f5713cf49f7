import pytest
import torch

from revlens.world import EVAL_SETS, ReversalWorld


def test_no_reverse_sentence_of_a_forward_only_fact_reaches_training():
    world = ReversalWorld.generate(n_facts=60, n_control=12, seed=1)
    sentences = {tuple(s) for s in world.training_sentences().tolist()}
    cut = world.n_facts - world.n_control
    r = world.relation_id
    for a, b in zip(world.a_ids[:cut], world.b_ids[:cut]):
        assert (a, r, b) in sentences
        assert (b, r, a) not in sentences
        # B never appears before the relation for a forward-only fact, in any sentence
        assert not any(s[0] == b for s in sentences)
    for a, b in zip(world.a_ids[cut:], world.b_ids[cut:]):
        assert (a, r, b) in sentences and (b, r, a) in sentences
    assert len(sentences) == world.n_facts + world.n_control


def test_alphabets_are_disjoint_and_facts_are_a_bijection():
    world = ReversalWorld.generate(n_facts=30, n_control=5, seed=0)
    assert set(world.a_ids).isdisjoint(world.b_ids)
    assert len(set(world.a_ids)) == len(set(world.b_ids)) == 30
    assert max(world.b_ids) < world.d_vocab and min(world.a_ids) >= 2


def test_eval_sets_have_the_documented_shape_and_answers():
    world = ReversalWorld.generate(n_facts=30, n_control=5, seed=0)
    fwd, inplace, rev, crev = (world.eval_set(n) for n in EVAL_SETS)
    m, r = world.mask_id, world.relation_id
    assert world.decode(fwd.prompts[:1])[0].endswith("r [M]")
    assert (fwd.prompts[:, 2] == m).all() and (fwd.prompts[:, 1] == r).all()
    assert (inplace.prompts[:, 0] == m).all() and (inplace.prompts[:, 2] == fwd.answers).all()
    assert (rev.prompts[:, 0] == fwd.answers).all() and (rev.answers == inplace.answers).all()
    assert len(fwd.answers) == 25 and len(crev.answers) == 5
    assert world.chance == pytest.approx(1 / 30)


def test_world_is_seeded_and_round_trips_through_json(tmp_path):
    a = ReversalWorld.generate(20, 4, seed=7)
    assert a == ReversalWorld.generate(20, 4, seed=7)
    assert a != ReversalWorld.generate(20, 4, seed=8)
    a.save(tmp_path / "w.json")
    assert ReversalWorld.load(tmp_path / "w.json") == a


@pytest.mark.parametrize("n_facts, n_control", [(1, 0), (10, 10), (10, 0), (10, 11)])
def test_world_too_small_for_the_splits_is_an_error(n_facts, n_control):
    with pytest.raises(ValueError, match="n_facts|n_control"):
        ReversalWorld.generate(n_facts, n_control)


def test_unknown_eval_set_and_corrupt_world_file(tmp_path):
    world = ReversalWorld.generate(10, 2)
    with pytest.raises(ValueError, match="unknown evaluation set 'backwards'"):
        world.eval_set("backwards")
    data = world.to_dict()
    data["facts"][0][0] = "Z9"
    with pytest.raises(ValueError, match="outside its vocabulary"):
        ReversalWorld.from_dict(data)
    assert torch.equal(world.training_sentences(), ReversalWorld.from_dict(world.to_dict()).training_sentences())


def test_shipped_world_file_is_the_notebooks_world():
    from pathlib import Path

    shipped = ReversalWorld.load(Path(__file__).parents[1] / "data" / "toy_world.json")
    assert shipped == ReversalWorld.generate(n_facts=200, n_control=40, seed=0)
