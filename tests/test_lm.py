"""The real-architecture wrappers on tiny checkpoints written to disk in the public layouts."""

import json
import os
import shutil

import pytest
import torch
import transformer_lens.patching as tl_patching
from safetensors.torch import load_file, save_file

from revlens.lm import HookedLM
from revlens.patching import patch_head_out, patch_names, patch_resid_pre
from tests.lm_checkpoints import MASK_ID, VOCAB, dream_checkpoint, llada_checkpoint, reference_logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"llada": llada_checkpoint(root / "llada"), "dream": dream_checkpoint(root / "dream"),
            "qwen2": dream_checkpoint(root / "qwen2", architecture="Qwen2ForCausalLM")}


@pytest.fixture(scope="module")
def models(folders):
    return {name: HookedLM.from_pretrained(path) for name, path in folders.items()}


def tokens(batch=3, seq=8, seed=1):
    return torch.randint(0, MASK_ID, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,causal", [("llada", False), ("dream", False), ("qwen2", True)])
def test_logits_equal_independent_reference(models, folders, name, causal):
    x = tokens()
    torch.testing.assert_close(models[name](x), reference_logits(folders[name], x, causal=causal), atol=2e-5, rtol=1e-4)


def test_family_detected_from_config(models):
    assert {n: m.family.name for n, m in models.items()} == {"llada": "llada", "dream": "dream", "qwen2": "qwen2"}
    assert models["llada"].mask_token_id == MASK_ID and models["dream"].mask_token_id == MASK_ID
    assert models["qwen2"].mask_token_id is None


@pytest.mark.parametrize("name,bidirectional", [("llada", True), ("dream", True), ("qwen2", False)])
def test_bidirectionality(models, name, bidirectional):
    x = tokens()
    changed = x.clone()
    changed[:, -1] = (changed[:, -1] + 1) % MASK_ID
    first_moves = (models[name](changed)[:, 0] - models[name](x)[:, 0]).abs().max() > 1e-4
    assert bool(first_moves) == bidirectional
    assert models[name].cfg.attention_dir == ("bidirectional" if bidirectional else "causal")


def test_mask_readout_llada_in_place_dream_shifted(models):
    x = tokens()
    x[:, 4] = MASK_ID
    for name, read_at in (("llada", 4), ("dream", 3)):
        torch.testing.assert_close(models[name].mask_logits(x)[:, 0], models[name](x)[:, read_at])


def test_mask_errors(models):
    with pytest.raises(ValueError, match="no mask token"):
        models["llada"].mask_logits(tokens())
    x = tokens()
    x[:, 0] = MASK_ID
    with pytest.raises(ValueError, match="position 0"):
        models["dream"].mask_logits(x)
    with pytest.raises(ValueError, match="no mask token; score completions"):
        models["qwen2"].mask_logits(x)


def test_token_ids_outside_vocabulary_are_refused(models):
    with pytest.raises(ValueError, match="tokenizer"):
        models["llada"](torch.full((1, 4), VOCAB + 3))


@pytest.mark.parametrize("name", ["llada", "dream", "qwen2"])
def test_hooks_fire_with_documented_shapes(models, name):
    lm, x = models[name], tokens(batch=2, seq=6)
    names = ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern",
             "blocks.1.attn.hook_z", "blocks.1.hook_resid_post"]
    _, cache = lm.run_with_cache(x, names)
    assert set(names) <= set(cache.keys())
    asked = {cache[n].data_ptr() for n in names}  # anything else is a TransformerLens alias of the same tensor
    assert all(cache[k].data_ptr() in asked for k in cache.keys())
    assert cache["blocks.1.hook_resid_pre"].shape == (2, 6, 32)
    assert cache["blocks.1.attn.hook_attn_scores"].shape == (2, 4, 6, 6)
    assert cache["blocks.1.attn.hook_z"].shape == (2, 6, 4, 8)
    scores, pattern = cache["blocks.1.attn.hook_attn_scores"], cache["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(scores.softmax(-1), pattern)  # the scores hook sees pre-softmax logits
    assert scores[torch.isfinite(scores)].min() < 0


@pytest.mark.parametrize("hook", ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_attn_scores"])
@pytest.mark.parametrize("name", ["llada", "dream"])
def test_attention_hooks_are_editable(models, name, hook):
    lm, x = models[name], tokens()

    def flatten(t, hook):
        return torch.full_like(t, 1.0 / t.shape[-1]) if "pattern" in hook.name else torch.zeros_like(t)

    edited = lm.run_with_hooks(x, [(hook, flatten)])
    assert (edited - lm(x)).abs().max() > 1e-3


def test_unknown_hook_name(models):
    with pytest.raises(ValueError, match="unknown hook name 'blocks.0.attn.hook_attention'; did you mean blocks.0.attn"):
        models["llada"].run_with_cache(tokens(), ["blocks.0.attn.hook_attention"])
    with pytest.raises(ValueError, match="unknown hook name 'blocks.0.hook_resid_pr'; did you mean blocks.0.hook_resid_pre"):
        models["llada"].run_with_hooks(tokens(), [("blocks.0.hook_resid_pr", lambda t, hook: t)])


def test_run_with_cache_without_or_with_a_predicate_filter(models):
    with pytest.raises(ValueError, match="run_with_cache needs names_filter"):
        models["llada"].run_with_cache(tokens())
    _, cache = models["llada"].run_with_cache(tokens(), lambda name: name.endswith("hook_resid_pre"))
    assert {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"} <= set(cache.keys())
    assert "blocks.0.attn.hook_pattern" not in cache.keys()


@pytest.mark.parametrize("problem", ["no mask_token_id", "mask_token_id outside the vocabulary", "not json"])
def test_a_bad_masked_config_is_refused_at_load_naming_the_field(folders, tmp_path, problem):
    folder = tmp_path / "llada"
    shutil.copytree(folders["llada"], folder)
    config = json.loads((folder / "config.json").read_text())
    if problem == "no mask_token_id":
        del config["mask_token_id"]
        match = "config.json lacks 'mask_token_id', which a llada model needs"
    elif problem == "mask_token_id outside the vocabulary":
        config["mask_token_id"] = 126336
        match = r"mask_token_id 126336 of .* is outside the model's vocabulary \(ids 0..49\)"
    (folder / "config.json").write_text(json.dumps(config) if problem != "not json" else "{\"d_model\": 32,")
    if problem == "not json":
        match = "config.json, line 1, column 16: not valid JSON"
    with pytest.raises(ValueError, match=match):
        HookedLM.from_pretrained(folder)


def test_shards_outside_the_model_folder_are_refused(folders, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(folders["llada"], folder)
    (folder / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    index = {"weight_map": {"model.transformer.wte.weight": "../elsewhere.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"names shard '../elsewhere.safetensors' outside"):
        HookedLM.from_pretrained(folder)


def test_a_truncated_safetensors_file_is_named(folders, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(folders["llada"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file"):
        HookedLM.from_pretrained(folder)


def test_missing_extra_and_misshaped_weights_are_named(folders, tmp_path):
    state = load_file(folders["llada"] / "model.safetensors")
    config = (folders["llada"] / "config.json").read_text()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "model.transformer.blocks.1.up_proj.weight"},
                    "missing model.transformer.blocks.1.up_proj.weight"),
        "extra": ({**state, "model.transformer.blocks.0.q_norm.weight": torch.ones(32)},
                  "unexpected model.transformer.blocks.0.q_norm.weight"),
        "shape": ({**state, "model.transformer.blocks.0.k_proj.weight": torch.zeros(32, 32)},
                  r"model.transformer.blocks.0.k_proj.weight has shape \(32, 32\), the config expects \(16, 32\)"),
    }
    for case, (bad, message) in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        save_file(bad, folder / "model.safetensors")
        (folder / "config.json").write_text(config)
        with pytest.raises(ValueError, match=message):
            HookedLM.from_pretrained(folder)


def test_unknown_family_and_broken_contract(folders, tmp_path):
    raw = json.loads((folders["llada"] / "config.json").read_text())
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unknown model family.*GPT2LMHeadModel"):
        HookedLM.from_pretrained(tmp_path / "gpt")
    with pytest.raises(ValueError, match="unknown model family 'mamba'"):
        HookedLM.from_pretrained(folders["llada"], family="mamba")
    (tmp_path / "alibi").mkdir()
    save_file(load_file(folders["llada"] / "model.safetensors"), tmp_path / "alibi" / "model.safetensors")
    (tmp_path / "alibi" / "config.json").write_text(json.dumps({**raw, "alibi": True}))
    with pytest.raises(ValueError, match="alibi=False"):
        HookedLM.from_pretrained(tmp_path / "alibi")
    with pytest.raises(FileNotFoundError, match="config.json"):
        HookedLM.from_pretrained(tmp_path)


def test_missing_folder_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        HookedLM.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["llada", "dream", "qwen2"])
def test_batched_patching_equals_transformer_lens(models, name):
    lm = models[name]
    clean, corrupted = tokens(seed=2), tokens(seed=3)
    _, cache = lm.run_with_cache(clean, patch_names(lm, "resid_pre") + patch_names(lm, "head_out"))

    def metric(logits):
        return logits[:, -2, 7].mean()

    ours = patch_resid_pre(lm, corrupted, cache, metric, sites_per_pass=5)  # several passes, uneven last one
    theirs = tl_patching.get_act_patch_resid_pre(lm.bridge, corrupted, cache, metric)
    assert (ours - theirs).abs().max() < 1e-5
    ours = patch_head_out(lm, corrupted, cache, metric)
    theirs = tl_patching.get_act_patch_attn_head_out_all_pos(lm.bridge, corrupted, cache, metric)
    assert (ours - theirs).abs().max() < 1e-5


def test_dtype_cast_on_load(folders):
    lm = HookedLM.from_pretrained(folders["llada"], dtype=torch.bfloat16)
    assert next(lm.bridge.parameters()).dtype == torch.bfloat16
    assert lm(tokens()).shape == (3, 8, VOCAB)


REAL = {"llada": os.environ.get("REVLENS_LLADA_PATH"), "dream": os.environ.get("REVLENS_DREAM_PATH")}


@pytest.mark.real_weights
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_real_checkpoint_answers_a_capital(family):
    if not REAL[family]:
        pytest.skip(f"set REVLENS_{family.upper()}_PATH to a local {family} checkpoint folder to run this check")
    from revlens.facts import FactSet, answer_scores

    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = HookedLM.from_pretrained(REAL[family], dtype=torch.bfloat16, device=device)
    facts = FactSet.load("data/real_facts.json")
    rows = answer_scores(lm, [facts.query(i, "forward") for i in facts.subset(relation="capital")[:20]])
    assert sum(r["correct"] for r in rows) >= 10


def test_hub_name_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="could not find 'GSAI-ML/LLaDA-8B-Base' locally or download it"):
        HookedLM.from_pretrained("GSAI-ML/LLaDA-8B-Base")


def test_sharded_checkpoint_loads(folders, tmp_path, models):
    state = load_file(folders["llada"] / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((folders["llada"] / "config.json").read_text())
    x = tokens()
    torch.testing.assert_close(HookedLM.from_pretrained(tmp_path)(x), models["llada"](x))


def test_tied_output_head_is_not_required_in_the_checkpoint(folders, tmp_path):
    state = load_file(folders["qwen2"] / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, tmp_path / "model.safetensors")
    config = json.loads((folders["qwen2"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    x = tokens()
    torch.testing.assert_close(HookedLM.from_pretrained(tmp_path)(x), reference_logits(tmp_path, x, causal=True),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llada", "dream", "qwen2"])
def test_cuda_bf16_matches_cpu_and_patches_like_transformer_lens(folders, models, name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    lm = HookedLM.from_pretrained(folders[name], dtype=torch.bfloat16, device="cuda")
    x = tokens()
    assert next(lm.bridge.parameters()).device.type == "cuda"
    torch.testing.assert_close(lm(x).float().cpu(), models[name](x), atol=0.1, rtol=0.05)
    clean, corrupted = tokens(seed=2).cuda(), tokens(seed=3).cuda()
    _, cache = lm.run_with_cache(clean, patch_names(lm, "resid_pre"))

    def metric(logits):
        return logits[:, -2, 7].float().mean()

    ours = patch_resid_pre(lm, corrupted, cache, metric)
    theirs = tl_patching.get_act_patch_resid_pre(lm.bridge, corrupted, cache, metric)
    assert (ours - theirs.cpu()).abs().max() < 1e-2
