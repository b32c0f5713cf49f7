"""Notebook 07's fact-level helpers: per-slot scoring of step patching, the order-agreement nulls, namesakes."""

import itertools

import pandas as pd
import pytest
import torch

from revlens.lm.denoising import SlotCounts, StepPatching, _cluster_permutation, namesake_agreement, order_agreement
from revlens.stats import wilson_interval


# ---- per-slot scoring of patching at a step ------------------------------------------------------------------
def two_step_patching(step):
    """Three pairs, two slots, one grid site (1 layer x 1 position), one named site, one head.

    Clean answers [10, 11] everywhere; pair 0 commits slot 0 first in both runs, pair 1 slot 0 in the clean run
    and slot 1 in the corrupted run, pair 2 slot 1 in both. The corrupted run is wrong everywhere except pair 2's
    slot 1. The named site "fix now" turns the token committed at ``step`` into the clean one and commits the
    clean run's slot at step 0."""
    clean = torch.tensor([[10, 11]] * 3)
    clean_commit = torch.tensor([[0, 1], [0, 1], [1, 0]])
    corrupted = torch.tensor([[20, 21], [20, 21], [20, 11]])
    corrupted_commit = torch.tensor([[0, 1], [1, 0], [1, 0]])
    fixed = corrupted.clone()
    fixed_commit = clean_commit if step == 0 else corrupted_commit
    now = fixed_commit == step
    fixed[now] = clean[now]
    patched = torch.stack([corrupted, fixed, corrupted])  # grid site, "fix now", head
    commits = torch.stack([corrupted_commit, fixed_commit, corrupted_commit])
    return StepPatching(step, clean, clean_commit, corrupted, corrupted_commit, patched, commits, 1, 1, 1,
                        ("fix now",))


def test_slot_counts_normalise_and_interval_through_the_corrupted_rate():
    counts = SlotCounts(hits=12, base=2, n=22)
    assert counts.fraction == pytest.approx(0.5)  # (12 - 2) / (22 - 2): half of what could be recovered
    low, high = counts.interval()
    wlow, whigh = wilson_interval(12, 22)
    assert low == pytest.approx((wlow * 22 - 2) / 20) and high == pytest.approx((whigh * 22 - 2) / 20)
    assert SlotCounts(3, 3, 3).fraction != SlotCounts(3, 3, 3).fraction  # nothing to recover: NaN
    assert SlotCounts(0, 0, 0).interval()[0] != SlotCounts(0, 0, 0).interval()[0]


def test_wilson_interval_stays_in_the_unit_interval():
    for n in (1, 7, 36, 80):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0


def test_step_patching_scores_the_slot_committed_now_and_later():
    first, last = two_step_patching(0), two_step_patching(1)
    assert first.same_first.tolist() == [True, False, True]
    now, later = first.recovery("now").extra["fix now"], first.recovery("later").extra["fix now"]
    assert (now.hits, now.base, now.n) == (3, 1, 3) and now.fraction == 1.0  # pair 2's slot 1 was right already
    assert (later.hits, later.base, later.n) == (0, 0, 3) and later.fraction == 0.0
    both = first.recovery("open").extra["fix now"]  # the mixture, capped near one half
    assert (both.hits, both.base, both.n) == (3, 1, 6) and both.fraction == pytest.approx(0.4)
    assert first.extra["fix now"] == pytest.approx(0.4) and first.scored == 6 and first.open_slots == 2
    assert first.corrupted_agreement == pytest.approx(1 / 6)
    last_now = last.recovery("now").extra["fix now"]  # one open slot per pair, the corrupted run's last
    assert (last_now.hits, last_now.base, last_now.n) == (3, 0, 3) and last.scored == 3 and last.open_slots == 1
    assert last.recovery("later").extra["fix now"].n == 0
    same = last.recovery("now", last.same_first).extra["fix now"]
    assert same.n == 2
    slot0 = first.recovery(0).extra["fix now"]  # slot 0 of every pair: committed now in pairs 0 and 1
    assert (slot0.hits, slot0.base, slot0.n) == (2, 0, 3)
    assert last.recovery(0).extra["fix now"].n == 2  # slot 0 is still open at step 1 in pairs 1 and 2
    rec = first.recovery("now")
    assert rec.resid_pre.shape == (1, 1) and rec.head_out.shape == (1, 1)
    assert float(rec.resid_pre[0, 0]) == 0.0  # the unpatched grid site recovers nothing
    with pytest.raises(ValueError, match="choose 'open', 'now', 'later' or an answer slot"):
        first.recovery(2)


# ---- the order-agreement nulls -------------------------------------------------------------------------------
def order_table(inplace, reverse, persons, relations=None, first_names=None):
    """A commit-order table in the shape of commit_order_table, step-0 rows only (two-slot answers)."""
    rows = []
    for fact, (a, b, person) in enumerate(zip(inplace, reverse, persons)):
        relation = relations[fact] if relations else "r"
        first = first_names[fact] if first_names else fact
        for direction, slot in (("inplace", a), ("reverse", b)):
            rows += [{"fact": fact, "direction": direction, "relation": relation, "person": person, "slot": s,
                      "gold": (first if s == 0 else 1000 + person), "step": 0 if s == slot else 1} for s in (0, 1)]
    return pd.DataFrame(rows)


def test_cluster_permutation_moves_whole_clusters():
    labels = ["p", "p", "q", "q", "r", "s", "s", "t"]
    perm = _cluster_permutation(labels, torch.Generator().manual_seed(1))
    assert sorted(perm.tolist()) == list(range(len(labels)))
    clusters = {label: [i for i, x in enumerate(labels) if x == label] for label in labels}
    for members in clusters.values():  # a cluster's facts land, in order, on one cluster of the same size
        assert perm[members].tolist() in list(clusters.values())


def test_order_agreement_person_null_is_wider_when_persons_share_orders():
    gen = torch.Generator().manual_seed(0)
    person_slots = torch.randint(0, 2, (60,), generator=gen).tolist()
    inplace = [s for s in person_slots for _ in range(2)]  # a person's two facts share their order
    reverse = inplace[:]
    persons = [p for p in range(60) for _ in range(2)]
    result = order_agreement(order_table(inplace, reverse, persons), "inplace", "reverse", shuffles=500,
                             cluster="person")
    assert result["facts"] == 120 and result["clusters"] == 60 and result["observed"] == 1.0
    assert result["shuffled >= observed"] == 0.0 and result["clusters shuffled >= observed"] == 0.0
    fact_range = result["shuffled 97.5%"] - result["shuffled 2.5%"]
    person_range = result["clusters shuffled 97.5%"] - result["clusters shuffled 2.5%"]
    assert person_range > 1.2 * fact_range  # about sqrt(2) wider: half as many independent units
    assert "clusters" not in order_agreement(order_table(inplace, reverse, persons), "inplace", "reverse", 50)


# ---- namesakes -------------------------------------------------------------------------------------------------
def brute_force_namesakes(table, first, second, slot):
    starts = table[table.step == 0].pivot_table(index="fact", columns="direction", values="slot")
    info = table.groupby("fact")[["person", "relation"]].first()
    token = table[table.slot == slot].groupby("fact").gold.first()
    hits = pairs = 0
    for i, j in itertools.product(starts.index, repeat=2):
        if (info.person[i] != info.person[j] and info.relation[i] == info.relation[j] and token[i] == token[j]):
            pairs += 1
            hits += starts[first][i] == starts[second][j]
    return hits, pairs


def test_namesake_agreement_counts_pairs_of_other_persons_sharing_the_token():
    gen = torch.Generator().manual_seed(3)
    n_persons = 30
    names = torch.randint(0, 4, (n_persons,), generator=gen).tolist()
    persons = [p for p in range(n_persons) for _ in range(2)]
    relations = [r for _ in range(n_persons) for r in ("wrote", "founded")]
    first_names = [names[p] for p in persons]
    inplace = torch.randint(0, 2, (2 * n_persons,), generator=gen).tolist()
    reverse = torch.randint(0, 2, (2 * n_persons,), generator=gen).tolist()
    table = order_table(inplace, reverse, persons, relations, first_names)
    result = namesake_agreement(table, "inplace", "reverse", 0, shuffles=200)
    hits, pairs = brute_force_namesakes(table, "inplace", "reverse", 0)
    assert result["pairs"] == pairs and result["observed"] == pytest.approx(hits / pairs)
    assert result["facts"] == sum(names.count(names[p]) > 1 for p in persons)
    same = namesake_agreement(table, "inplace", "inplace", 0, shuffles=50)  # one direction against itself
    assert same["pairs"] == pairs and same["observed"] == pytest.approx(
        brute_force_namesakes(table, "inplace", "inplace", 0)[0] / pairs)
    lasts = namesake_agreement(table, "inplace", "reverse", 1, shuffles=50)  # every last name is unique here
    assert lasts["pairs"] == 0 and lasts["facts"] == 0


def test_namesake_agreement_sees_an_order_set_by_the_first_name():
    gen = torch.Generator().manual_seed(4)
    n_persons = 40
    names = torch.randint(0, 5, (n_persons,), generator=gen).tolist()
    by_name = torch.randint(0, 2, (5,), generator=gen).tolist()
    persons = [p for p in range(n_persons) for _ in range(2)]
    relations = [r for _ in range(n_persons) for r in ("wrote", "founded")]
    order = [by_name[names[p]] for p in persons]  # the first name alone sets both queries' orders
    table = order_table(order, order, persons, relations, [names[p] for p in persons])
    result = namesake_agreement(table, "inplace", "reverse", 0, shuffles=300)
    assert result["observed"] == 1.0 and result["shuffled 97.5%"] < 0.9 and result["shuffled >= observed"] == 0.0
    with pytest.raises(ValueError, match="disagree on the answer's token"):
        namesake_agreement(order_table(order, order, persons, relations, list(range(2 * n_persons))),
                           "inplace", "reverse", 0, shuffles=10)


@pytest.mark.slow
def test_patching_the_whole_clean_pass_fixes_the_token_committed_then_on_the_shipped_pair():
    """What notebook 07 takes as given: at step 0 the whole clean pass commits the clean run's slot with its token,
    and at the last step it restores the last token wherever both runs committed the same slot first."""
    from revlens.facts import FactSet
    from revlens.lm import HookedLM
    from revlens.lm.analysis import patching_pairs
    from revlens.lm.denoising import patch_by_step
    from revlens.lm.small_pair import SMALL_PAIR_DIR

    lm = HookedLM.from_pretrained(SMALL_PAIR_DIR / "llada")
    world = FactSet.load(SMALL_PAIR_DIR / "world.json")
    pairs = patching_pairs(lm, world, world.subset(split="forward_only")[:40])
    first, last = patch_by_step(lm, pairs, [0, 1], {"whole": (0, (slice(None),))})
    now = first.recovery("now").extra["whole"]
    assert now.n == len(pairs.facts) and now.hits == now.n
    assert first.recovery("now").extra["whole"].n + first.recovery("later").extra["whole"].n == 2 * len(pairs.facts)
    assert 0 < int(last.same_first.sum()) < len(pairs.facts)  # both kinds of pairs occur
    same = last.recovery("now", last.same_first).extra["whole"]
    assert same.n == int(last.same_first.sum()) and same.hits == same.n
    whole = first.n_layers * first.seq  # the first named site comes after the grid
    assert ((first.patched_commit_step[whole] == 0) == (first.clean_commit_step == 0)).all()
    assert (first.recovery("now").head_out <= 1).all() and (first.recovery("now").resid_pre <= 1).all()
