"""revlens.patching: batched patching equals TransformerLens' site-by-site patching, whatever the pass layout."""

import pytest
import torch
import transformer_lens.patching as tl_patching

from revlens.lm import HookedLM
from revlens.patching import (
    PASS_ELEMENTS,
    auto_sites_per_pass,
    batched_patch,
    patch_head_out,
    patch_names,
    patch_resid_pre,
    site_patch_hooks,
)
from tests.lm_checkpoints import MASK_ID, dream_checkpoint, llada_checkpoint


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("patching")
    return {"llada": HookedLM.from_pretrained(llada_checkpoint(root / "llada")),
            "dream": HookedLM.from_pretrained(dream_checkpoint(root / "dream"))}


def pair(batch=4, seq=8, changed=(2, 5)):
    """A clean batch and a corrupted one that differs from it only at the positions ``changed``."""
    g = torch.Generator().manual_seed(7)
    clean = torch.randint(0, MASK_ID, (batch, seq), generator=g)
    corrupted = clean.clone()
    corrupted[:, list(changed)] = torch.randint(0, MASK_ID, (batch, len(changed)), generator=g)
    return clean, corrupted


def metric(logits):
    return logits[:, -2].log_softmax(-1)[:, 7].mean()


@pytest.mark.parametrize("name", ["llada", "dream"])
@pytest.mark.parametrize("sites_per_pass", [None, 1, 3, 100])
def test_every_pass_layout_equals_transformer_lens(lms, name, sites_per_pass):
    lm = lms[name]
    clean, corrupted = pair()
    _, cache = lm.run_with_cache(clean, patch_names(lm, "resid_pre") + patch_names(lm, "head_out"))
    ours = patch_resid_pre(lm, corrupted, cache, metric, sites_per_pass=sites_per_pass)
    theirs = tl_patching.get_act_patch_resid_pre(lm.bridge, corrupted, cache, metric)
    assert (ours - theirs).abs().max() < 1e-5
    ours = patch_head_out(lm, corrupted, cache, metric, sites_per_pass=sites_per_pass)
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(lm.bridge, corrupted, cache, metric)
    assert (ours - theirs).abs().max() < 1e-5


def test_sites_that_patch_nothing_are_not_run_and_get_the_corrupted_metric(lms, monkeypatch):
    lm = lms["llada"]
    clean, corrupted = pair(changed=(2, 5))
    _, cache = lm.run_with_cache(clean, patch_names(lm, "resid_pre"))
    rows_run = []
    run_with_hooks = lm.run_with_hooks

    def counting(tokens, fwd_hooks):
        logits = run_with_hooks(tokens, fwd_hooks)
        rows_run.append(logits.shape[0])
        return logits

    monkeypatch.setattr(lm, "run_with_hooks", counting)
    result = patch_resid_pre(lm, corrupted, cache, metric)
    # before layer 0 only the two changed positions differ: the other six sites are the corrupted run
    unchanged = [pos for pos in range(8) if pos not in (2, 5)]
    assert torch.equal(result[0, unchanged], torch.full((6,), metric(lm(corrupted)).item()))
    n_sites = lm.cfg.n_layers * 8
    assert sum(rows_run) == (n_sites - len(unchanged)) * clean.shape[0]


def test_the_batch_is_repeated_at_the_first_patched_layer_only(lms):
    lm = lms["llada"]
    clean, corrupted = pair()
    _, cache = lm.run_with_cache(clean, patch_names(lm, "resid_pre"))
    seen = {}

    def width(name):
        def record(activation, hook):
            seen[name] = activation.shape[0]
        return record

    sites = [(1, (2,)), (1, (3,))]
    hooks = site_patch_hooks("blocks.{layer}.hook_resid_pre", cache, sites, 4, repeat_at="blocks.1.hook_resid_pre")
    spies = [(f"blocks.{layer}.hook_resid_pre", width(layer)) for layer in range(lm.cfg.n_layers)]
    lm.run_with_hooks(corrupted, spies[:1] + hooks + spies[1:])
    assert seen == {0: 4, 1: 8}  # layer 0 ran once on 4 rows; from layer 1 on, one copy per site


def test_auto_sites_per_pass_keeps_a_pass_within_its_budget(lms):
    lm = lms["llada"]
    width = max(lm.cfg.d_model, lm.cfg.d_mlp, lm.cfg.d_vocab)
    assert auto_sites_per_pass(lm, 1, 8) == PASS_ELEMENTS // (8 * width)
    assert auto_sites_per_pass(lm, 10**6, 8) == 1  # never fewer than one site
    k = auto_sites_per_pass(lm, 91, 9)
    assert k * 91 * 9 * width <= PASS_ELEMENTS < (k + 1) * 91 * 9 * width


def test_toy_encoder_patches_like_transformer_lens(trained_mdm, small_world):
    model = trained_mdm.model.eval()
    clean = small_world.eval_set("inplace")
    corrupted = clean.prompts.roll(1, dims=0)
    answers = clean.answers

    def toy_metric(logits):
        return logits[:, 0].log_softmax(-1).gather(1, answers[:, None]).mean()

    _, cache = model.run_with_cache(clean.prompts)
    theirs = tl_patching.get_act_patch_resid_pre(model, corrupted, cache, toy_metric)
    sites = [(0, (pos,)) for pos in range(3)]
    ours = batched_patch(model, corrupted, cache, toy_metric, "blocks.{layer}.hook_resid_pre", sites, sites_per_pass=2)
    assert (ours - theirs[0]).abs().max() < 1e-5
