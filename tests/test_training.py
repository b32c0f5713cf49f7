import math

import pytest
import torch
import transformer_lens.patching as patching

from revlens.checkpoint import load_run, save_run
from revlens.evaluation import evaluate, evaluate_instances
from revlens.model import stack_parameters
from revlens.training import TrainConfig, init_model, train


def test_short_mdm_run_learns_the_forward_direction(trained_mdm, small_world):
    metrics = evaluate(trained_mdm.model, small_world, "mdm")
    assert metrics["forward_acc"] >= 0.95
    assert metrics["inplace_acc"] >= 0.95
    assert metrics == pytest.approx(trained_mdm.metrics, nan_ok=True)
    assert [row["step"] for row in trained_mdm.history] == [0, 200, 400]


def test_short_arm_run_learns_forward_and_cannot_answer_inplace(trained_arm, small_world):
    metrics = trained_arm.metrics
    assert metrics["forward_acc"] >= 0.95 and metrics["control_reverse_acc"] >= 0.95
    assert math.isnan(metrics["inplace_acc"])


def test_same_seed_gives_identical_weights(small_world, small_cfg):
    cfg = TrainConfig("mdm", steps=30, batch_size=32, log_every=30)
    a, b = (train(small_cfg, small_world, cfg, seeds=(5,), progress=False)[0] for _ in range(2))
    (c,) = train(small_cfg, small_world, cfg, seeds=(6,), progress=False)
    for (name, p), q, r in zip(a.model.named_parameters(), b.model.parameters(), c.model.parameters()):
        assert torch.equal(p, q), name
        assert not torch.equal(p, r), name


@pytest.mark.parametrize(
    ("changes", "objective"),
    [
        ({}, "mdm"),
        ({"attention_dir": "causal"}, "arm"),
        ({"untied_positions": ("q", "k", "v"), "tie_embeddings": True}, "bert"),
        ({"positional": "absolute", "n_layers": 2, "attn_only": False}, "mdm"),
        ({"positional": "alibi"}, "mdm"),
    ],
)
def test_batched_seeds_match_training_each_alone_bit_for_bit(small_world, small_cfg, changes, objective):
    """Seeds stacked and vmapped give exactly the weights of the plain one-model loop."""
    model_cfg = small_cfg.replace(**changes)
    cfg = TrainConfig(objective, steps=30, batch_size=32, log_every=30)
    together = train(model_cfg, small_world, cfg, seeds=(1, 2, 3), progress=False)
    for run in together:
        (alone,) = train(model_cfg, small_world, cfg, seeds=(run.seed,), progress=False)
        for (name, p), q in zip(run.model.named_parameters(), alone.model.parameters()):
            assert torch.equal(p, q), name
        for row, alone_row in zip(run.history, alone.history, strict=True):
            assert row == pytest.approx(alone_row, rel=0, abs=0, nan_ok=True)


def test_stacked_evaluation_equals_evaluating_each_model(trained_mdm, small_world, small_cfg):
    models = [trained_mdm.model, init_model(small_cfg, 1), init_model(small_cfg, 2)]
    params = stack_parameters(models)
    together = evaluate_instances(models[0], params, small_world, "mdm")
    for row, model in zip(together, models, strict=True):
        assert row == pytest.approx(evaluate(model, small_world, "mdm"), rel=0, abs=0, nan_ok=True)
    assert together[0]["forward_acc"] != together[1]["forward_acc"]  # the instances really differ
    params["W_E"] = params["W_E"][:2]
    with pytest.raises(ValueError, match="same number of instances"):
        evaluate_instances(models[0], params, small_world, "mdm")


def test_callbacks_are_logged(small_world, small_cfg):
    cfg = TrainConfig("arm", steps=20, batch_size=16, log_every=10)
    (run,) = train(small_cfg.replace(attention_dir="causal"), small_world, cfg,
                   callbacks=[lambda step, model: {"twice_step": 2.0 * step}], progress=False)
    assert [r["twice_step"] for r in run.history] == [0.0, 20.0, 40.0]


def test_checkpoint_round_trip_and_mismatch_errors(trained_mdm, small_world, tmp_path):
    folder = save_run(trained_mdm, small_world, tmp_path / "ck")
    run, world = load_run(folder)
    assert world == small_world
    for p, q in zip(run.model.parameters(), trained_mdm.model.parameters()):
        assert torch.equal(p, q)
    assert (folder / "metrics.json").read_text().count("\"forward_acc\"") == 1

    import json

    (folder / "checksums.json").unlink()  # a hand-edited checkpoint (an edit with checksums is refused: test_run_cache.py)
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["d_model"] = 48
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has shape"):
        load_run(folder)
    meta["model"]["d_model"] = 32
    meta["model"]["positional"] = "absolute"
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="missing W_pos"):
        load_run(folder)
    with pytest.raises(FileNotFoundError, match="not a revlens checkpoint"):
        load_run(tmp_path / "nowhere")


def test_transformer_lens_patching_runs_and_matches_a_manual_patch(trained_mdm, small_world):
    model = trained_mdm.model.eval()
    clean = small_world.eval_set("inplace")
    corrupt = clean.prompts.roll(1, dims=0)  # other facts' B: the answer changes
    answers = clean.answers

    def metric(logits):
        return logits[:, 0].log_softmax(-1).gather(1, answers[:, None]).mean()

    _, cache = model.run_with_cache(clean.prompts)
    result = patching.get_act_patch_resid_pre(model, corrupt, cache, metric)
    assert result.shape == (1, 3)

    def patch_pos2(act, hook):
        act[:, 2] = cache["blocks.0.hook_resid_pre"][:, 2]
        return act

    manual = metric(model.run_with_hooks(corrupt, fwd_hooks=[("blocks.0.hook_resid_pre", patch_pos2)]))
    torch.testing.assert_close(result[0, 2], manual)
    # patching B's position restores the clean answer; patching the relation token does not
    assert result[0, 2] > metric(model(corrupt)) + 1.0
    heads = patching.get_act_patch_attn_head_out_by_pos(model, corrupt, cache, metric)
    assert heads.shape == (1, 3, 2)


def test_patching_refuses_a_model_in_training_mode(trained_mdm, small_world):
    model = trained_mdm.model
    prompts = small_world.eval_set("inplace").prompts
    _, cache = model.run_with_cache(prompts)
    model.train()
    try:
        with pytest.raises(ValueError, match="evaluation"):
            patching.get_act_patch_resid_pre(model, prompts, cache, lambda logits: logits.sum())
    finally:
        model.eval()
