"""Bad arguments to denoising generation and step patching: an error naming the argument, never a silent run."""

import math

import pytest
import torch

from revlens.lm import HookedLM
from revlens.lm.generation import patch_generation
from revlens.patching import RESID_PRE, resid_pre_sites
from tests.lm_checkpoints import MASK_ID, llada_checkpoint

SEQ = 8


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return HookedLM.from_pretrained(llada_checkpoint(tmp_path_factory.mktemp("gen") / "llada", seed=4))


def prompts(batch=2, seq=SEQ, masks=(3, 5)):
    x = torch.randint(0, MASK_ID, (batch, seq), generator=torch.Generator().manual_seed(0))
    x[:, list(masks)] = MASK_ID
    return x


GENERATE_CASES = [
    ("infinite temperature", {"temperature": math.inf}, "must be >= 0 and finite"),
    ("NaN temperature", {"temperature": math.nan}, "must be >= 0 and finite"),
    ("negative temperature", {"temperature": -1.0}, "must be >= 0 and finite"),
    ("temperature as text", {"temperature": "hot"}, "temperature='hot' must be >= 0 and finite"),
    ("steps as a float", {"steps": 2.0}, "steps must be an integer, got 2.0"),
    ("steps as a bool", {"steps": True}, "steps must be an integer, got True"),
    ("seed beyond torch's range", {"seed": 2**70}, r"seed=1180591620717411303424 must be in \[0, 9223372036854775807\] \(an integer\)"),
    ("negative seed", {"seed": -1}, r"seed=-1 must be in \[0,"),
    ("block_length as a float", {"block_length": 1.0}, "block_length=1.0 must be >= 1 \\(an integer\\)"),
    ("NaN eps", {"eps": math.nan, "schedule": "dream"}, "eps must be a finite number"),
    ("gen_length on a masked prompt", {"gen_length": 2}, "already holds mask tokens .* gen_length=2 would append more"),
    ("gen_length as a float", {"gen_length": 2.5, "masked": False}, "gen_length=2.5 must be >= 1 \\(an integer\\)"),
]


@pytest.mark.parametrize("case,kwargs,message", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_bad_generation_arguments_are_refused(lm, case, kwargs, message):
    kwargs = dict(kwargs)
    x = prompts() if kwargs.pop("masked", True) else prompts(masks=())
    steps = kwargs.pop("steps", 2)
    with pytest.raises(ValueError, match=message):
        lm.generate(x, steps, **kwargs)


def test_a_finite_temperature_still_samples(lm):
    trace = lm.generate(prompts(), 2, temperature=1, seed=3)
    assert not (trace.answer == MASK_ID).any()


@pytest.fixture(scope="module")
def runs(lm):
    names = [RESID_PRE.format(layer=layer) for layer in range(lm.cfg.n_layers)]
    clean = lm.generate(prompts(), 2, cache_names=names, cache_steps=[0, 1])
    return clean, names


PATCH_CASES = [
    ("clean cache of another step count", lambda lm, names: lm.generate(prompts(), 1, cache_names=names, cache_steps=[0]),
     "comes from a run of 1 steps, the corrupted run has 2"),
    ("clean cache of another prompt length", lambda lm, names: lm.generate(prompts(seq=SEQ + 2), 2, cache_names=names,
                                                                          cache_steps=[0, 1]),
     r"holds \[batch, seq\] = \[2, 10\], the corrupted run \[2, 8\]"),
    ("clean cache of another batch", lambda lm, names: lm.generate(prompts(batch=3), 2, cache_names=names,
                                                                  cache_steps=[0, 1]),
     r"holds \[batch, seq\] = \[3, 8\], the corrupted run \[2, 8\]"),
]


@pytest.mark.parametrize("case,make_clean,message", PATCH_CASES, ids=[c[0] for c in PATCH_CASES])
def test_patching_from_a_mismatched_clean_run_is_refused(lm, runs, case, make_clean, message):
    corrupted, names = runs
    clean = make_clean(lm, names)
    with pytest.raises(ValueError, match=message):
        patch_generation(lm, corrupted, clean.cache, RESID_PRE, resid_pre_sites(lm.cfg.n_layers, SEQ), 0)


SITE_CASES = [
    ("layer out of range", [(9, (0,))], "layer in 0..1"),
    ("site not a pair", [(0,)], "a site is \\(layer, index\\)"),
    ("index not a tuple", [(0, 3)], "index a tuple, got \\(0, 3\\)"),
]


@pytest.mark.parametrize("case,sites,message", SITE_CASES, ids=[c[0] for c in SITE_CASES])
def test_bad_patch_sites_are_refused(lm, runs, case, sites, message):
    clean, _ = runs
    with pytest.raises(ValueError, match=message):
        patch_generation(lm, clean, clean.cache, RESID_PRE, sites, 0)


def test_sites_per_pass_must_be_a_positive_integer(lm, runs):
    clean, _ = runs
    with pytest.raises(ValueError, match="sites_per_pass=0 must be >= 1 \\(an integer\\)"):
        patch_generation(lm, clean, clean.cache, RESID_PRE, resid_pre_sites(lm.cfg.n_layers, SEQ), 0, sites_per_pass=0)
