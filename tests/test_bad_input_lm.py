"""Bad input, faults and reruns on the real-architecture side: loaders, fact scoring, the text harness, the small pair.

Each case ends in a correct result or an error naming the file, field or fact, before any training or scoring.
"""

import dataclasses
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from revlens.facts import Fact, FactSet, Query, Relation, answer_scores, encode_query
from revlens.lm import HookedLM
from revlens.lm.analysis import score_table
from revlens.lm.hooked_lm import CONFIG_RECORD
from revlens.lm.small_pair import train_small_pair
from revlens.lm.text_reversal import HarnessConfig, read_examples, run_text_reversal, train_test_overlap
from revlens.lm.trainer import PairConfig, check_loss
from tests.lm_checkpoints import llada_checkpoint
from tests.reversal_fixture import write as write_fixture

TINY = dataclasses.replace(PairConfig(), d_model=16, n_heads=2, mlp_hidden_size=32, steps=3, batch_size=8, n_facts=20)
HARNESS = HarnessConfig(pair=PairConfig(steps=0, d_model=16, n_heads=2, mlp_hidden_size=32, batch_size=8),
                        max_steps=2, eval_every=2, patience=1)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return train_small_pair(tmp_path_factory.mktemp("pair"), TINY)


# ---- loading a model folder --------------------------------------------------------------------------------------

def _nan_weight(folder):
    state = load_file(folder / "model.safetensors")
    state["model.transformer.wte.weight"][0, 0] = math.nan
    save_file(state, folder / "model.safetensors")


def _edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


def _shards(duplicate: bool):
    """Two shards with an index; ``duplicate`` also puts one tensor of shard 1 into shard 2, ``not`` drops it."""
    def edit(folder):
        state = load_file(folder / "model.safetensors")
        names = sorted(state)
        first, second = names[: len(names) // 2], names[len(names) // 2 :]
        save_file({k: state[k] for k in first}, folder / "a.safetensors")
        extra = [first[0]] if duplicate else []
        save_file({k: state[k] for k in second + extra}, folder / "b.safetensors")
        weight_map = {**{k: "a.safetensors" for k in first}, **{k: "b.safetensors" for k in second}}
        if not duplicate:
            weight_map["lm_head.phantom"] = "b.safetensors"
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return edit


def _recorded_then_changed(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / CONFIG_RECORD).write_text(json.dumps({"config": config}))
    _edit_config(rope_theta=10.0)(folder)


LOADER_CASES = [
    ("nan weight", _nan_weight, "tensor model.transformer.wte.weight has NaN or infinite values"),
    ("nan config field", _edit_config(rms_norm_eps=math.nan), "field 'rms_norm_eps' is nan"),
    ("string where an integer belongs", _edit_config(n_heads="4"), "n_heads must be a positive integer"),
    ("negative rope_theta", _edit_config(rope_theta=-1.0), "rope_theta must be a finite number > 0"),
    ("tensor in two shards", _shards(duplicate=True), "which model.safetensors.index.json maps to a.safetensors"),
    ("mapped tensor missing from its shard", _shards(duplicate=False), "maps lm_head.phantom to b.safetensors, which does not hold it"),
    ("config changed under revlens' record", _recorded_then_changed, "differs from the configuration revlens saved"),
]


@pytest.mark.parametrize("case,mutate,message", LOADER_CASES, ids=[c[0] for c in LOADER_CASES])
def test_broken_model_folders_are_refused_at_load(tmp_path, case, mutate, message):
    folder = llada_checkpoint(tmp_path / "m")
    mutate(folder)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        HookedLM.from_pretrained(folder)


def test_mask_token_id_must_be_the_tokenizers(tiny_pair, tmp_path):
    folder = shutil.copytree(tiny_pair / "llada", tmp_path / "llada")
    _edit_config(mask_token_id=4)(folder)
    (folder / CONFIG_RECORD).unlink()
    with pytest.raises(ValueError, match="mask_token_id 4 is not the tokenizer's mask token '<mask>'"):
        HookedLM.from_pretrained(folder)


def test_a_folder_revlens_wrote_loads_with_its_record(tiny_pair):
    assert (tiny_pair / "llada" / CONFIG_RECORD).is_file()
    HookedLM.from_pretrained(tiny_pair / "llada")  # the record agrees with config.json


def test_non_finite_logits_are_an_error_not_a_score(tiny_pair):
    lm = HookedLM.from_pretrained(tiny_pair / "llada")
    facts = FactSet.load(tiny_pair / "world.json")
    with torch.no_grad():
        next(lm.bridge.parameters()).fill_(math.nan)
    with pytest.raises(ValueError, match="non-finite logits"):
        answer_scores(lm, [facts.query(0, "forward")])


# ---- fact sets and queries -----------------------------------------------------------------------------------------

REL = {"r": Relation("r", forward="{a} lives in {b}", reverse="{b} is home to {a}")}
FACT_SET_CASES = [
    ("duplicate fact", [Fact("r", "Ann", "Rome"), Fact("r", "Ann", "Rome")], "duplicate fact for relation 'r' and A 'Ann'"),
    ("conflicting facts", [Fact("r", "Ann", "Rome"), Fact("r", "Ann", "Oslo")], "conflicting facts"),
]


@pytest.mark.parametrize("case,facts,message", FACT_SET_CASES, ids=[c[0] for c in FACT_SET_CASES])
def test_duplicated_or_conflicting_facts_are_refused(case, facts, message):
    with pytest.raises(ValueError, match=message):
        FactSet(REL, facts)


def test_several_a_of_one_b_are_allowed():
    FactSet(REL, [Fact("r", "Ann", "Rome"), Fact("r", "Bob", "Rome")])


def test_escaped_braces_in_a_template_are_text():
    facts = FactSet({"r": Relation("r", forward="{a} {{b}} lives in {b}", reverse="{b} is home to {a}")},
                    [Fact("r", "Ann", "Rome")])
    assert facts.query(0, "forward") == Query(0, "forward", "Ann {b} lives in", "Rome", "")


def test_a_name_holding_the_mask_text_is_refused(tiny_pair):
    lm = HookedLM.from_pretrained(tiny_pair / "llada")
    facts = FactSet.load(tiny_pair / "world.json")
    query = dataclasses.replace(facts.query(0, "forward"), prefix="<mask> " + facts.query(0, "forward").prefix)
    with pytest.raises(ValueError, match="contains the mask token's text"):
        encode_query(lm, query)


def test_words_outside_the_vocabulary_are_refused_before_scoring(tiny_pair):
    lm = HookedLM.from_pretrained(tiny_pair / "llada")
    world = FactSet.load(tiny_pair / "world.json")
    fact = world.facts[0]
    facts = FactSet(world.relations, [fact, dataclasses.replace(fact, a="Zyxwvut", b=world.facts[1].b)])
    with pytest.raises(ValueError, match="cannot be written by the tokenizer.*'Zyxwvut'"):
        score_table(lm, facts)


# ---- the text harness's data ----------------------------------------------------------------------------------------

READ_CASES = [
    ("non-UTF-8 byte", b'{"prompt": "a", "completion": " b"}\n{"prompt": "\xff", "completion": " c"}\n',
     r"line 2: not UTF-8 text \(byte 0xff"),
    ("special-token text", b'{"prompt": "who is <mask>", "completion": " b"}\n', "special-token text '<mask>'"),
    ("end-of-sequence text", b'{"prompt": "a", "completion": " b </s>"}\n', "special-token text '</s>'"),
]


@pytest.mark.parametrize("case,content,message", READ_CASES, ids=[c[0] for c in READ_CASES])
def test_bad_dataset_lines_are_refused_naming_file_and_line(tmp_path, case, content, message):
    path = tmp_path / "f.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_examples(path)


def test_a_line_separator_inside_a_json_string_is_text(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b", "completion": " c"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (example,) = read_examples(path)
    assert example.prompt == "a\u2028b"


def test_names_are_read_in_nfc(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"prompt": "Who is Zoe\u0301?", "completion": " Ame\u0301lie"}) + "\n")
    (example,) = read_examples(path)
    assert example.prompt == "Who is Zo\u00e9?" and example.completion == " Am\u00e9lie"


def test_test_lines_that_occur_in_training_are_counted(tmp_path):
    from revlens.lm.text_reversal import build_text_tokenizer, read_layout

    folder = write_fixture(tmp_path / "data")
    test_line = (folder / "p2d_prompts_test.jsonl").read_text().splitlines()[0]
    with (folder / "p2d_prompts_train.jsonl").open("a") as f:
        f.write(test_line + "\n")
    layout = read_layout(folder)
    tok = build_text_tokenizer([t for ex in layout["p2d_prompts_train.jsonl"] for t in (ex.prompt, ex.completion)])
    overlap = train_test_overlap(layout, tok)
    assert overlap["p2d_prompts_test.jsonl"] == 1
    assert overlap["d2p_prompts_test.jsonl"] == 0


# ---- the text harness's run folder -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    data = write_fixture(root / "data")
    out = root / "run"
    results = run_text_reversal(data, out, HARNESS)
    return data, out, results


@pytest.mark.slow
def test_the_run_reports_its_train_test_overlap(text_run):
    _, out, results = text_run
    assert set(results[results.metric == "lines also in training"].value) == {0.0}
    assert json.loads((out / "training.json").read_text())["train_test_overlap"]["p2d_prompts_test.jsonl"] == 0


def test_a_rerun_of_the_same_run_returns_it_without_training(text_run, monkeypatch):
    import revlens.lm.text_reversal as harness

    data, out, results = text_run
    monkeypatch.setattr(harness, "_train_and_score", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert run_text_reversal(data, out, HARNESS).equals(results)


def test_another_configuration_into_the_same_folder_is_refused_before_training(text_run, monkeypatch):
    import revlens.lm.text_reversal as harness

    data, out, _ = text_run
    monkeypatch.setattr(harness, "_train_and_score", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ValueError, match="holds a text-reversal run of another configuration"):
        run_text_reversal(data, out, dataclasses.replace(HARNESS, max_steps=3))


@pytest.mark.parametrize("content", ["file", "foreign folder"])
def test_the_harness_never_overwrites_what_it_did_not_write(tmp_path, content):
    data = write_fixture(tmp_path / "data")
    out = tmp_path / "out"
    if content == "file":
        out.write_text("keep me")
        message = "exists and is not a folder"
    else:
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
        message = "not a text-reversal run; refusing to overwrite it"
    with pytest.raises(ValueError, match=message):
        run_text_reversal(data, out, HARNESS)
    assert (out.read_text() if content == "file" else (out / "notes.txt").read_text()) == "keep me"


@pytest.mark.slow
def test_a_run_killed_midway_leaves_the_old_folder_untouched(text_run, tmp_path, monkeypatch):
    import revlens.lm.text_reversal as harness

    data, finished, _ = text_run
    out = shutil.copytree(finished, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(harness, "evaluate_models", killed)
    with pytest.raises(KeyboardInterrupt):
        run_text_reversal(data, out, dataclasses.replace(HARNESS, max_steps=3), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # beside it only the staging folder a rerun resumes from (its trained seed kept, its states dropped)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.partial", "run"]
    partial = tmp_path / ".run.partial"
    assert (partial / "partial.json").is_file() and (partial / "seed0" / "training.json").is_file()
    assert not list(partial.rglob("*.pt"))


# ---- the small pair's folder and training ---------------------------------------------------------------------------

def test_divergence_stops_training_naming_the_step_and_rate():
    with pytest.raises(ValueError, match="training diverged at step 7 \\(loss nan\\) with lr 0.002"):
        check_loss(math.nan, 7, PairConfig(), "train llada")
    assert check_loss(1.5, 7, PairConfig(), "train llada") == 1.5


def test_a_diverging_small_pair_saves_nothing(tmp_path):
    out = tmp_path / "pair"
    with pytest.raises(ValueError, match="training diverged|NaN or infinite"):
        train_small_pair(out, dataclasses.replace(TINY, lr=1e30), ("llada",))
    assert not (out / "llada").exists()


def test_the_small_pair_refuses_a_folder_of_other_content(tmp_path):
    out = tmp_path / "pair"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="does not hold a small pair"):
        train_small_pair(out, TINY, ("llada",))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_retraining_one_model_with_another_recipe_refuses_to_leave_the_old_pair_beside_it(tiny_pair, tmp_path):
    out = shutil.copytree(tiny_pair, tmp_path / "pair")
    (out / "switches.jsonl").write_text("{}\n")
    other = dataclasses.replace(TINY, lr=1e-3)
    with pytest.raises(ValueError, match="describe\\(s\\) a pair trained with another configuration"):
        train_small_pair(out, other, ("llada",))
    assert (out / "llama").is_dir() and (out / "switches.jsonl").is_file()
    train_small_pair(out, other, ("llada",), overwrite=True)
    assert not (out / "llama").exists() and not (out / "switches.jsonl").exists()
    assert json.loads((out / "training.json").read_text())["config"]["lr"] == 1e-3
