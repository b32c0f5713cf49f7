"""Each ablation switch does what it says, and the sweep runner is resumable."""

import copy
import json

import pytest
import torch

from revlens.config import EncoderConfig
from revlens.objectives import BERT_MASK_RATE, make_loss_batch
from revlens.sweep import SweepSpec, read_rows, run_sweep
from revlens.training import init_model
from tests.sweeps import TINY


def cfg(**kw) -> EncoderConfig:
    return EncoderConfig(d_vocab=20, d_model=16, n_heads=2, d_head=8, **kw)


def test_untied_route_weights_get_no_gradient_from_other_positions():
    model = init_model(cfg(untied_positions=("q", "k")), 0)
    tokens = torch.tensor([[3, 4, 5], [6, 7, 8]])
    model(tokens)[:, 2].logsumexp(-1).sum().backward()  # a loss read at position 2 only
    attn = model.blocks[0].attn
    assert attn.W_Q.grad[2].abs().sum() > 0
    assert attn.W_Q.grad[:2].abs().sum() == 0  # queries of positions 0 and 1 play no part
    assert attn.W_K.grad.abs().sum(dim=(1, 2, 3)).gt(0).all()  # every key is attended from position 2


def test_untied_values_make_the_value_path_position_specific():
    model = init_model(cfg(untied_positions=("v",)), 0).eval()
    assert model.blocks[0].attn.W_V.shape == (3, 2, 16, 8)
    _, cache = model.run_with_cache(torch.tensor([[3, 4, 5], [5, 4, 3]]))
    v = cache["blocks.0.attn.hook_v"]
    # token 5 at position 2 and at position 0 gets different value vectors
    assert not torch.allclose(v[0, 2], v[1, 0])
    shared = init_model(cfg(), 0).eval()
    _, cache = shared.run_with_cache(torch.tensor([[3, 4, 5], [5, 4, 3]]))
    torch.testing.assert_close(cache["blocks.0.attn.hook_v"][0, 2], cache["blocks.0.attn.hook_v"][1, 0])


def test_tying_trains_one_tensor():
    model = init_model(cfg(tie_embeddings=True), 0)
    names = {n for n, _ in model.named_parameters()}
    assert "W_E" in names and "W_U_untied" not in names
    model(torch.tensor([[3, 4, 5]]))[0, 1, 7].backward()
    assert model.W_E.grad[7].abs().sum() > 0  # the unembedding row of token 7 is W_E[7]


def test_bert_masks_a_fixed_fraction():
    tokens = torch.full((4000, 3), 5)
    batch = make_loss_batch("bert", tokens, 0, torch.Generator().manual_seed(0))
    rate = (batch.inputs == 0).float().mean().item()
    assert abs(rate - BERT_MASK_RATE) < 0.01
    assert torch.allclose(batch.weights[batch.inputs == 0], torch.tensor(1 / (3 * BERT_MASK_RATE)))


def test_depth_width_and_residual_switches():
    deep = init_model(cfg(n_layers=3, attn_only=False), 0)
    assert len(deep.blocks) == 3 and "blocks.2.mlp.hook_post" in deep.hook_dict
    flat = init_model(cfg(residual=False), 0).eval()
    _, cache = flat.run_with_cache(torch.tensor([[3, 4, 5]]))
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], cache["blocks.0.hook_attn_out"])


def tiny_spec() -> SweepSpec:
    return SweepSpec.from_dict(copy.deepcopy(TINY))


def test_sweep_is_resumable_and_tidy(tmp_path):
    spec = tiny_spec()
    out = tmp_path / "table.jsonl"
    run_sweep(spec, out, progress=False)
    rows = read_rows(out)
    assert [(r["setting"], r["seed"]) for r in rows] == [("MDM", 0), ("MDM", 1), ("ARM", 0), ("ARM", 1)]
    assert rows[2]["inplace_acc"] is None and 0 <= rows[0]["reverse_acc"] <= 1
    assert {"cos_all_init", "route_score_corr_final", "chance"} <= set(rows[0])
    # drop one setting's rows: only that setting is re-run, and its numbers come back the same
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    run_sweep(spec, out, progress=False)
    assert read_rows(out) == rows


@pytest.mark.slow
def test_parallel_sweep_trains_the_same_rows_in_file_order(tmp_path, monkeypatch):
    spec = tiny_spec()
    run_sweep(spec, tmp_path / "sequential.jsonl", progress=False)
    rows = read_rows(tmp_path / "sequential.jsonl")
    monkeypatch.setenv("REVLENS_CACHE", str(tmp_path / "fresh_cache"))  # the workers must retrain, not reload
    out = tmp_path / "parallel.jsonl"
    run_sweep(spec, out, progress=False, jobs=2)
    assert read_rows(out) == rows
    assert list((tmp_path / "fresh_cache" / "runs").glob("*"))  # trained by the workers, not reloaded


def test_bad_sweep_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="lacks seeds"):
        SweepSpec.from_dict({"name": "x", "settings": []})
    with pytest.raises(ValueError, match="unknown keys"):
        SweepSpec.from_dict({"name": "x", "seeds": [0], "settings": [{"name": "a", "objective": "mdm", "modle": {}}]})
    with pytest.raises(ValueError, match="unique"):
        SweepSpec.from_dict({"name": "x", "seeds": [0], "settings": [{"name": "a", "objective": "mdm"}] * 2})
    with pytest.raises(ValueError, match=r"unknown top-level keys \['trian'\]"):
        SweepSpec.from_dict({"name": "x", "seeds": [0], "trian": {"steps": 5}, "settings": [{"name": "a", "objective": "mdm"}]})
    with pytest.raises(ValueError, match="'seeds' must be a non-empty list of integers, got \\['a'\\]"):
        SweepSpec.from_dict({"name": "x", "seeds": ["a"], "settings": [{"name": "a", "objective": "mdm"}]})
    with pytest.raises(ValueError, match=r"settings\[0\] needs a non-empty string 'name'"):
        SweepSpec.from_dict({"name": "x", "seeds": [0], "settings": [{"objective": "mdm"}]})
    with pytest.raises(ValueError, match="setting 'a': bad model override: .*n_layerz"):
        SweepSpec.from_dict({"name": "x", "seeds": [0], "settings": [{"name": "a", "objective": "mdm", "model": {"n_layerz": 2}}]})
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        SweepSpec.from_dict({"name": "x", "seeds": [0], "train": {"steps": 0}, "settings": [{"name": "a", "objective": "mdm"}]})
    broken = tmp_path / "spec.json"
    broken.write_text('{"name": "x",\n "seeds": [0,]}')
    with pytest.raises(ValueError, match=rf"{broken}, line 2, column 14: not valid JSON"):
        SweepSpec.load(broken)
