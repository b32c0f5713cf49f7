"""Denoising generation, step-indexed hooks, caches and patching on tiny LLaDA- and Dream-shaped checkpoints."""

import math

import pytest
import torch

from revlens.lm import HookedLM
from revlens.lm.generation import generate, patch_generation
from revlens.patching import RESID_PRE, resid_pre_sites
from tests.lm_checkpoints import MASK_ID, VOCAB, dream_checkpoint, llada_checkpoint

SEQ, SLOTS = 11, 6
SLOT_POSITIONS = [2, 3, 5, 6, 8, 9]  # masks between prompt tokens, none at position 0 (Dream reads at i - 1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return {"llada": HookedLM.from_pretrained(llada_checkpoint(root / "llada", seed=4)),
            "dream": HookedLM.from_pretrained(dream_checkpoint(root / "dream", seed=5)),
            "qwen2": HookedLM.from_pretrained(dream_checkpoint(root / "qwen2", architecture="Qwen2ForCausalLM"))}


def prompts(batch=3, seed=0):
    x = torch.randint(0, MASK_ID, (batch, SEQ), generator=torch.Generator().manual_seed(seed))
    x[:, SLOT_POSITIONS] = MASK_ID
    return x


# ---- an independent plain loop, one prompt and one step at a time, written from the samplers' rules ----------
def reference_counts(block, k, schedule, eps=1e-3):
    """Tokens unmasked at each of a block's k steps."""
    if schedule == "llada":  # the linear schedule spread evenly, remainder to the first steps
        return [block // k + (1 if i < block % k else 0) for i in range(k)]
    t = torch.linspace(1.0, eps, k + 1, dtype=torch.float64).tolist()
    counts, masked = [], block
    for i in range(k):
        take = masked if i == k - 1 else math.floor(masked * (1 - t[i + 1] / t[i]))
        counts.append(take)
        masked -= take
    return counts


def reference_generate(lm, prompt, steps, block_length, remasking, temperature, schedule, seed, batch=1, row=0):
    """Per step, the list of (position, token) committed, in commit order, for one prompt [seq], row ``row`` of a
    batch of ``batch`` (the documented noise: per step, Gumbel uniforms [batch, slots, vocab], then remasking
    uniforms [batch, slots], float64, from a generator seeded with seed * 1_000_003 + step)."""
    shift = 1 if lm.family.name == "dream" else 0  # Dream reads slot i at i - 1
    x = prompt.clone()
    slots = [i for i in range(len(x)) if x[i] == MASK_ID]
    block = block_length or len(slots)
    n_blocks = len(slots) // block
    counts = [c for _ in range(n_blocks) for c in reference_counts(block, steps // n_blocks, schedule)]
    is_open = {p: True for p in slots}
    history = []
    for step in range(steps):
        current = slots[(step // (steps // n_blocks)) * block:][:block]
        logits = lm(x[None])[0].float()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        gumbel = torch.rand((batch, len(slots), VOCAB), generator=gen, dtype=torch.float64)[row] if temperature else None
        random_rank = torch.rand((batch, len(slots)), generator=gen, dtype=torch.float64)[row] if remasking == "random" else None
        candidates = []
        for j, pos in enumerate(slots):
            slot_logits = logits[pos - shift].clone()
            slot_logits[MASK_ID] = -float("inf")
            p = torch.softmax(slot_logits, -1)
            if temperature:
                token = int(torch.argmax(slot_logits.double() / temperature - torch.log(-torch.log(gumbel[j]))))
            else:
                token = int(torch.argmax(slot_logits))
            score = {"low_confidence": float(p[token]), "random": float(random_rank[j]) if random_rank is not None else 0.0,
                     "margin": float(p.topk(2).values[0] - p.topk(2).values[1]),
                     "entropy": float((p[p > 0] * p[p > 0].log()).sum())}[remasking]
            if is_open[pos] and pos in current:
                candidates.append((score, pos, token))
        candidates.sort(key=lambda c: -c[0])
        committed = [(pos, token) for _, pos, token in candidates[: counts[step]]]
        for pos, token in committed:
            x[pos] = token
            is_open[pos] = False
        history.append(committed)
    return history


SETTINGS = [  # (steps, block_length, remasking, temperature, schedule)
    (6, None, "low_confidence", 0.0, None), (4, None, "low_confidence", 0.0, None), (3, 2, "low_confidence", 0.0, None),
    (6, None, "random", 0.0, None), (4, 3, "random", 1.0, None), (2, 3, "low_confidence", 0.7, None),
    (4, None, "low_confidence", 0.0, "dream"), (4, 3, "low_confidence", 0.0, "dream"), (6, 3, "random", 0.0, "llada"),
    (3, None, "margin", 0.0, None), (5, None, "entropy", 0.0, "dream"),
]


@pytest.mark.parametrize("name", ["llada", "dream"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_generation_equals_plain_loop(models, name, setting):
    steps, block, remasking, temperature, schedule = setting
    lm, x = models[name], prompts()
    trace = lm.generate(x, steps, block_length=block, remasking=remasking, temperature=temperature,
                        schedule=schedule, seed=3)
    family_schedule = schedule or name
    for row in range(x.shape[0]):
        expected = reference_generate(lm, x[row], steps, block, remasking, temperature, family_schedule, seed=3,
                                      batch=x.shape[0], row=row)
        got = [list(zip(r.positions[row].tolist(), r.tokens[row].tolist())) for r in trace.records]
        assert got == expected
    assert trace.states.shape == (steps + 1, 3, SEQ)
    assert not (trace.states[-1] == MASK_ID).any()
    assert sorted(trace.commit_step[0].tolist()) == sorted(s for s, r in enumerate(expected) for _ in r)


def test_trace_records_probabilities_states_and_targets(models):
    lm, x = models["llada"], prompts()
    targets = torch.randint(0, MASK_ID, (3, SLOTS), generator=torch.Generator().manual_seed(9))
    trace = lm.generate(x, 3, targets=targets)
    for r in trace.records:
        logits = lm(trace.states[r.step]).float()
        logits[..., MASK_ID] = -float("inf")
        p = logits.softmax(-1)
        rows = torch.arange(3)[:, None]
        torch.testing.assert_close(r.probability, p[rows, r.positions, r.tokens])
        torch.testing.assert_close(r.confidence, r.probability)  # low-confidence remasking ranks by probability
        assert (r.confidence[:, :-1] >= r.confidence[:, 1:]).all()  # most confident first
        assert (trace.states[r.step + 1][rows, r.positions] == r.tokens).all()
        logp = logits.log_softmax(-1)[rows, trace.slots, targets]
        torch.testing.assert_close(trace.target_logprob[r.step], logp)
    assert (trace.states[0] == x).all()


def test_gen_length_appends_masks_and_blocks_are_semi_autoregressive(models):
    lm = models["llada"]
    x = torch.randint(0, MASK_ID, (2, 4), generator=torch.Generator().manual_seed(2))
    trace = lm.generate(x, 4, gen_length=8, block_length=4)
    assert trace.slots.tolist() == [list(range(4, 12))] * 2
    assert trace.commit_step[:, :4].max() < trace.commit_step[:, 4:].min()  # block 0 finishes before block 1


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_batched_equals_one_prompt_at_a_time_and_is_seeded(models, name):
    lm, x = models[name], prompts(batch=4)
    batched = lm.generate(x, 3, temperature=1.0, remasking="random", seed=1)
    again = lm.generate(x, 3, temperature=1.0, remasking="random", seed=1)
    other = lm.generate(x, 3, temperature=1.0, remasking="random", seed=2)
    assert torch.equal(batched.states, again.states)
    assert not torch.equal(batched.states, other.states)
    greedy = lm.generate(x, 3)
    for row in range(4):
        assert torch.equal(lm.generate(x[row : row + 1], 3).states[:, 0], greedy.states[:, row])


# ---- step-indexed hooks and caches -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec,expected", [([0, 3], [0, 3]), (2, [2]), (lambda s: s % 2 == 1, [1, 3, 5]), (None, list(range(6)))])
def test_hooks_fire_exactly_at_requested_steps(models, spec, expected):
    lm, x = models["llada"], prompts()
    seen = []

    def record(activation, hook):
        seen.append(activation.clone())

    trace = lm.generate(x, 6, fwd_hooks=[("blocks.1.hook_resid_pre", record)], hook_steps=spec)
    assert len(seen) == len(expected)
    for activation, step in zip(seen, expected):  # each call saw the state before its step, as one forward pass does
        _, cache = lm.run_with_cache(trace.states[step], ["blocks.1.hook_resid_pre"])
        torch.testing.assert_close(activation, cache["blocks.1.hook_resid_pre"])


def test_per_hook_steps_and_editing_hook_changes_only_later_steps(models):
    lm, x = models["dream"], prompts()
    plain = lm.generate(x, 6)
    fired = []
    zero = ("blocks.0.attn.hook_pattern", lambda t, hook: torch.full_like(t, 1.0 / t.shape[-1]), [3])
    count = ("blocks.0.hook_resid_pre", lambda t, hook: fired.append(1), [0, 5])
    edited = lm.generate(x, 6, fwd_hooks=[zero, count])
    assert len(fired) == 2
    assert torch.equal(edited.states[:4], plain.states[:4])  # nothing before step 3 changes
    assert not torch.equal(edited.states[4:], plain.states[4:])


def test_per_step_cache_shapes_values_and_memory(models):
    lm, x = models["llada"], prompts()
    names = ["blocks.0.attn.hook_pattern", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"]
    trace = lm.generate(x, 6, cache_names=names, cache_steps=[1, 4])
    assert trace.cache.steps == [1, 4]
    assert trace.cache[1]["blocks.0.attn.hook_pattern"].shape == (3, 4, SEQ, SEQ)
    assert trace.cache[4]["blocks.1.hook_resid_pre"].shape == (3, SEQ, 32)
    assert trace.cache[4]["blocks.1.attn.hook_z"].shape == (3, SEQ, 4, 8)
    assert trace.cache.stack("blocks.1.hook_resid_pre").shape == (2, 3, SEQ, 32)
    assert trace.cache.nbytes_per_step == {s: 4 * 3 * (4 * SEQ * SEQ + SEQ * 32 + SEQ * 32) for s in (1, 4)}
    for step in (1, 4):
        _, cache = lm.run_with_cache(trace.states[step], names)
        for name in names:
            assert torch.equal(trace.cache[step][name], cache[name])
    with pytest.raises(KeyError, match=r"step 2 was not cached \(cached steps: \[1, 4\]\)"):
        trace.cache[2]


# ---- patching at a step ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llada", "dream"])
@pytest.mark.parametrize("step", [0, 2, 5])
def test_patching_with_the_clean_activation_restores_the_clean_trajectory(models, name, step):
    lm, x = models[name], prompts()
    clean = lm.generate(x, 6, remasking="random", temperature=1.0, seed=4,
                        cache_names=[RESID_PRE.format(layer=l) for l in range(2)], cache_steps=[step])
    sites = resid_pre_sites(2, SEQ)
    patched = patch_generation(lm, clean, clean.cache, RESID_PRE, sites, step, sites_per_pass=7)
    assert patched.answer.shape == (len(sites), 3, SLOTS)
    assert (patched.answer == clean.answer).all()
    assert (patched.commit_step == clean.commit_step).all()


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_patching_a_corrupted_token_at_every_step_restores_the_clean_trajectory(models, name):
    """The corrupted prompt differs at one position; its token enters only through its embedding there."""
    lm, clean_x = models[name], prompts()
    corrupted_x = clean_x.clone()
    corrupted_x[:, 4] = (clean_x[:, 4] + 1) % MASK_ID
    names = [RESID_PRE.format(layer=0)]
    clean = lm.generate(clean_x, 6, cache_names=names)
    corrupted = lm.generate(corrupted_x, 6, targets=clean.answer)
    assert not torch.equal(corrupted.answer, clean.answer)  # the control: the corruption matters
    patched = patch_generation(lm, corrupted, clean.cache, RESID_PRE, [(0, (4,)), (0, (7,))], range(6))
    assert torch.equal(patched.answer[0], clean.answer) and torch.equal(patched.commit_step[0], clean.commit_step)
    assert not torch.equal(patched.answer[1], clean.answer)  # another position does not restore it
    at_slots = patched.target_logprob[0]  # the clean answer's log-probability along the restored run
    assert at_slots.shape == (6, 3, SLOTS)
    whole = patch_generation(lm, corrupted, clean.cache, RESID_PRE, [(0, (slice(None),))], 0)  # at step 0 only
    assert whole.steps == (0,)
    at_zero = clean.commit_step == 0  # the whole clean forward pass at step 0 commits exactly what clean did
    assert torch.equal(whole.commit_step[0] == 0, at_zero) and torch.equal(whole.answer[0][at_zero], clean.answer[at_zero])


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_rerun_from_step_equals_full_rerun_with_the_patch_hook(models, name):
    lm = models[name]
    clean_x, corrupted_x = prompts(seed=0), prompts(seed=1)
    config = dict(remasking="random", temperature=0.8, seed=7, block_length=3)
    step = 3
    clean = lm.generate(clean_x, 6, cache_names=[RESID_PRE.format(layer=1)], cache_steps=[step], **config)
    corrupted = lm.generate(corrupted_x, 6, **config)
    sites = [(1, (p,)) for p in range(SEQ)]
    patched = patch_generation(lm, corrupted, clean.cache, RESID_PRE, sites, step, sites_per_pass=4)
    source = clean.cache[step][RESID_PRE.format(layer=1)]
    for k, (_, (pos,)) in enumerate(sites):
        def patch(activation, hook, pos=pos):
            activation = activation.clone()
            activation[:, pos] = source[:, pos]
            return activation

        full = lm.generate(corrupted_x, 6, fwd_hooks=[(RESID_PRE.format(layer=1), patch, [step])], **config)
        assert torch.equal(patched.answer[k], full.answer)
        assert torch.equal(patched.commit_step[k], full.commit_step)


# ---- bad arguments ---------------------------------------------------------------------------------------------
def test_bad_arguments_are_refused_with_clear_messages(models):
    lm, x = models["llada"], prompts()
    cases = [
        (dict(tokens=torch.randint(0, MASK_ID, (2, 5)), steps=2), "prompt 0 has no mask token .* or pass gen_length"),
        (dict(steps=6, block_length=4), "block_length=4 does not divide the generation length 6"),
        (dict(steps=0), r"steps=0 is out of range: need 1 <= steps <= 6"),
        (dict(steps=7), r"steps=7 is out of range"),
        (dict(steps=5, block_length=3), "steps=5 is not a multiple of the number of blocks 2"),
        (dict(steps=2, remasking="lowest"), "unknown remasking 'lowest'"),
        (dict(steps=2, schedule="cosine"), "unknown schedule 'cosine'"),
        (dict(steps=2, temperature=-1.0), "temperature=-1.0 must be >= 0"),
        (dict(steps=2, fwd_hooks=[("blocks.0.hook_resid_pre", print)], hook_steps=[0, 2]), r"hook steps \[2\] outside .* 0..1"),
        (dict(steps=2, cache_names=[]), "cache_names is empty"),
        (dict(steps=2, cache_steps=[0]), "cache_steps needs cache_names"),
        (dict(steps=2, targets=torch.zeros(3, 2, dtype=torch.long)), r"targets must hold one token per slot, shape \(3, 6\)"),
        (dict(steps=2, gen_length=0), "gen_length=0 must be >= 1"),
    ]
    for kwargs, message in cases:
        kwargs = {"tokens": x, **kwargs}
        with pytest.raises(ValueError, match=message):
            generate(lm, **kwargs)
    with pytest.raises(ValueError, match="unknown hook name 'blocks.0.hook_attention'; did you mean"):
        generate(lm, x, 2, cache_names=["blocks.0.hook_attention"])
    uneven = x.clone()
    uneven[0, 1] = MASK_ID
    with pytest.raises(ValueError, match="same number of masks"):
        generate(lm, uneven, 2)
    with pytest.raises(ValueError, match="no mask token: it has no denoising steps"):
        generate(models["qwen2"], x, 2)
    first = x.clone()
    first[:, 0], first[:, 2] = MASK_ID, 7
    with pytest.raises(ValueError, match="position 0 cannot be read with the shifted readout"):
        generate(models["dream"], first, 2)
    trace = generate(lm, x, 2, cache_names=[RESID_PRE.format(layer=0)], cache_steps=[0])
    with pytest.raises(ValueError, match=r"patched steps \[2\] outside"):
        patch_generation(lm, trace, trace.cache, RESID_PRE, [(0, (1,))], 2)
    with pytest.raises(KeyError, match="step 1 was not cached"):
        patch_generation(lm, trace, trace.cache, RESID_PRE, [(0, (1,))], 1)
    with pytest.raises(KeyError, match=r"the clean cache at step 0 lacks \['blocks.1.hook_resid_pre'\]"):
        patch_generation(lm, trace, trace.cache, RESID_PRE, [(1, (1,))], 0)


# ---- the notebook's fact-level helpers -------------------------------------------------------------------------
def test_wilson_interval_and_order_agreement():
    import pandas as pd

    from revlens.lm.denoising import order_agreement
    from revlens.stats import wilson_interval

    low, high = wilson_interval(5, 10)
    assert abs(low - 0.2366) < 1e-3 and abs(high - 0.7634) < 1e-3  # the textbook Wilson interval for 5 / 10
    assert abs(wilson_interval(0, 20)[0]) < 1e-12 and wilson_interval(20, 20)[1] > 0.999
    slots = [0, 1] * 20
    rows = [{"fact": f, "direction": d, "step": 0, "slot": s}
            for f, s in enumerate(slots) for d in ("inplace", "reverse")]
    same = order_agreement(pd.DataFrame(rows), "inplace", "reverse")
    assert same["observed"] == 1.0 and same["shuffled 97.5%"] < 0.8  # identical orders beat random pairings
    flipped = [dict(r, slot=1 - r["slot"]) if r["direction"] == "reverse" else r for r in rows]
    assert order_agreement(pd.DataFrame(flipped), "inplace", "reverse")["observed"] == 0.0


def test_patch_by_step_on_the_shipped_pair_is_normalised():
    """Shapes and counts of the notebook's step patching; patching the whole layer-0 stream at step 0 fixes step 0."""
    from revlens.facts import FactSet
    from revlens.lm.analysis import patching_pairs
    from revlens.lm.denoising import commit_order_table, patch_by_step
    from revlens.lm.small_pair import SMALL_PAIR_DIR

    lm = HookedLM.from_pretrained(SMALL_PAIR_DIR / "llada")
    world = FactSet.load(SMALL_PAIR_DIR / "world.json")
    pairs = patching_pairs(lm, world, world.subset(split="control")[:24])
    results = patch_by_step(lm, pairs, [0, 1], {"everything": (0, (slice(None),))}, sites_per_pass=5)
    first = results[0]  # at step 0 the whole clean forward pass is restored, so the token committed then is clean's
    assert first.extra["everything"] >= (0.5 - first.corrupted_agreement) / (1 - first.corrupted_agreement) - 1e-6
    for r in results:
        assert r.resid_pre.shape == (lm.cfg.n_layers, pairs.clean.shape[1]) and r.head_out.shape == (lm.cfg.n_layers, lm.cfg.n_heads)
        assert r.open_slots == 2 - r.step and r.scored == r.open_slots * len(pairs.facts)
    table = commit_order_table(lm, world, pairs.facts, ("reverse",))
    assert sorted(table.groupby("fact").step.apply(sorted).map(tuple).unique()) == [(0, 1)]  # one token per step
