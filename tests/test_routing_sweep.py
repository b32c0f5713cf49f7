"""The routing sweep runs on the one sweep engine (revlens.sweep.run_table): provenance, stale-row refusal,
--redo, relabelling, torn-line recovery; and a malformed routing sweep file is refused naming the field."""

import json
import warnings
from pathlib import Path

import pytest

from revlens import sweep
from revlens.routing import RoutingSweepSpec, run_routing_sweep
from revlens.sweep import SweepWarning, read_rows

DATA = Path(__file__).resolve().parents[1] / "data"
KEY = ("cell", "delta", "base", "seed")


def tiny(**train) -> dict:
    data = json.loads((DATA / "routing_sweep.json").read_text())
    data["seeds"], data["train"] = [0], {"steps": 2, "batch_size": 8, **train}
    data["cells"] = [dict(data["cells"][0], deltas=[1, 2], bases=[1e4]), dict(data["cells"][3], deltas=[2])]
    return data


@pytest.fixture()
def table(tmp_path) -> Path:
    out = tmp_path / "routing.jsonl"
    run_routing_sweep(RoutingSweepSpec.from_dict(tiny()), out, progress=False)
    return out


def test_rows_carry_provenance_that_names_their_config_and_library(table):
    rows = read_rows(table, KEY)
    spec = RoutingSweepSpec.from_dict(tiny())
    assert [r["provenance"]["config"] for r in rows] == [p.config for p in spec.planned()]
    assert {r["provenance"]["revlens"] for r in rows} == {sweep.code_fingerprint()}
    assert len({p.config for p in spec.planned()}) == 3  # each model its own config (offset, world)
    assert [p.config for p in RoutingSweepSpec.from_dict(tiny(lr=0.001)).planned()] != [p.config for p in spec.planned()]


def test_a_changed_spec_is_refused_then_redone_like_a_fresh_run(table, tmp_path):
    before = table.read_text()
    changed = RoutingSweepSpec.from_dict(tiny(steps=3))
    with pytest.raises(ValueError, match=r"3 row\(s\) do not match .*produced by a different model/train/world config"):
        run_routing_sweep(changed, table, progress=False)
    assert table.read_text() == before  # refusing touches nothing
    with pytest.warns(SweepWarning, match="dropping 3 row"):
        run_routing_sweep(changed, table, progress=False, redo=True)
    fresh = tmp_path / "fresh.jsonl"
    run_routing_sweep(changed, fresh, progress=False)
    assert table.read_text() == fresh.read_text() != before


def test_rows_of_another_library_or_without_provenance_are_refused(table, monkeypatch):
    rows = read_rows(table, KEY)
    table.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "provenance"}) + "\n" for r in rows))
    with pytest.raises(ValueError, match="unknown provenance"):
        run_routing_sweep(RoutingSweepSpec.from_dict(tiny()), table, progress=False)
    monkeypatch.setattr(sweep, "code_fingerprint", lambda: "0123456789abcdef")
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"different revlens version \(\w+, this is 0123456789abcdef\)"):
        run_routing_sweep(RoutingSweepSpec.from_dict(tiny()), table, progress=False)


def test_rows_no_longer_in_the_file_are_named(table):
    data = tiny()
    data["cells"][0]["deltas"] = [1]
    with pytest.raises(ValueError, match=r"core 2 10000.0 seeds \[0\]: delta, base, seed not in the sweep file"):
        run_routing_sweep(RoutingSweepSpec.from_dict(data), table, progress=False)
    data["cells"][1]["name"] = "alibi2"
    with pytest.raises(ValueError, match=r"alibi 2 10000.0 seeds \[0\]: cell not in the sweep file"):
        run_routing_sweep(RoutingSweepSpec.from_dict(data), table, progress=False)


def test_an_edited_group_label_relabels_rows_without_retraining(table):
    before = read_rows(table, KEY)
    data = tiny()
    data["cells"][0]["group"] = "renamed"
    with pytest.warns(SweepWarning, match=r"2 row\(s\) relabelled .*group.*no number changes"):
        run_routing_sweep(RoutingSweepSpec.from_dict(data), table, progress=False)
    after = read_rows(table, KEY)
    assert [r["group"] for r in after] == ["renamed", "renamed", before[2]["group"]]
    assert [{k: v for k, v in r.items() if k != "group"} for r in after] == \
        [{k: v for k, v in r.items() if k != "group"} for r in before]


def test_a_torn_last_line_is_dropped_and_its_model_retrained(table):
    text = table.read_text()
    table.write_text(text[:-40])
    with pytest.warns(SweepWarning, match=rf"{table.name}, line 3: incomplete last row dropped"):
        run_routing_sweep(RoutingSweepSpec.from_dict(tiny()), table, progress=False)
    assert table.read_text() == text


@pytest.mark.slow
def test_cli_redo_reaches_the_routing_sweep(table, capsys):
    from revlens.cli import main

    config = table.with_name("sweep.json")
    config.write_text(json.dumps(tiny(steps=3)))
    assert main(["sweep", str(config), "--out", str(table)]) == 2
    assert "Rerun with --redo" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SweepWarning)
        assert main(["sweep", str(config), "--out", str(table), "--redo"]) == 0
    rows = read_rows(table, KEY)
    assert [r["provenance"]["config"] for r in rows] == [p.config for p in RoutingSweepSpec.from_dict(tiny(steps=3)).planned()]


def _cell(**changes) -> dict:
    return {**tiny()["cells"][0], **changes}


@pytest.mark.parametrize("data, message", [
    ([], "holds a JSON object, got list"),
    ({**tiny(), "cells": "core"}, "'cells' must be a non-empty list"),
    ({**tiny(), "cells": []}, "'cells' must be a non-empty list"),
    ({**tiny(), "cells": ["core"]}, r"cells\[0\] must be a JSON object"),
    ({**tiny(), "cells": [{"name": "x", "objective": "inplace"}]}, "needs name, objective, deltas"),
    ({**tiny(), "cells": [_cell(deltas=3)]}, "'deltas' must be a non-empty list of positive integers"),
    ({**tiny(), "cells": [_cell(deltas=[2, "4"])]}, "'deltas' must be a non-empty list of positive integers"),
    ({**tiny(), "cells": [_cell(deltas=[0])]}, "'deltas' must be a non-empty list of positive integers"),
    ({**tiny(), "cells": [_cell(bases=[float("nan")])]}, "RoPE base"),
    ({**tiny(), "cells": [_cell(bases=100)]}, "'bases' must be a non-empty list"),
    ({**tiny(), "cells": [_cell(objective="masked")]}, "unknown objective 'masked'"),
    ({**tiny(), "cells": [_cell(name=7)]}, "'name' must be a non-empty string"),
    ({**tiny(), "cells": [_cell(model=[1])]}, "'model' must be a JSON object"),
    ({**tiny(), "cells": [_cell(model={"d_head": "big"})]}, "cell 'core': bad 'model' override"),
    ({**tiny(), "cells": [_cell(group=1)]}, "'group' must be a string"),
    ({**tiny(), "cells": [_cell(stack_size=0)]}, "stack_size"),
    ({**tiny(), "cells": [_cell(shift_positions="yes")]}, "'shift_positions' must be true or false"),
    ({**tiny(), "cells": [_cell(distractor_offsets=5)]}, "'distractor_offsets' must be a non-empty list of positive integers"),
    ({**tiny(), "cells": [_cell(distractor_offsets=[2, 5])]}, "bad 'distractor_offsets': .*hold B's offset delta=2"),
    ({**tiny(), "cells": [_cell(distractor_offsets=[5, 3])]}, "increasing distinct"),
    ({**tiny(), "cells": [_cell(distractor_offsets=[3, 68])]}, "distractor offset 68 needs more than n_ctx=68"),
    ({**tiny(), "world": {"n_fact": 64}}, "unknown 'world' keys"),
    ({**tiny(), "world": {"n_facts": 1}}, "at least 3 facts"),
    ({**tiny(), "world": [64]}, "'world' must be a JSON object"),
    ({**tiny(), "train": {"lr": "fast"}}, "bad 'train'"),
    ({**tiny(), "train": {"steps": 2, "lr": float("inf")}}, "bad 'train'"),
    ({**tiny(), "stack_size": 2.5}, "stack_size"),
    ({**tiny(), "seeds": [0, 0]}, "seed"),
    ({**tiny(), "name": "../x"}, "routing sweep name"),
])
def test_malformed_routing_sweep_files_are_refused_naming_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        RoutingSweepSpec.from_dict(data)


def test_the_shipped_table_covers_its_sweep_file_with_provenance():
    """data/routing.jsonl: one row per planned model, each with the config hash the sweep file gives it (the
    library fingerprint changes with any edit and is not compared), in the sweep file's order, which is the
    order a fresh run writes and notebook 06's groupings print."""
    spec = RoutingSweepSpec.from_dict(json.loads((DATA / "routing_sweep.json").read_text()))
    rows = read_rows(DATA / "routing.jsonl", KEY)
    assert [(tuple(r[k] for k in KEY), r["provenance"]["config"], r["group"]) for r in rows] == \
        [(p.key, p.config, p.labels["group"]) for p in spec.planned()]


def test_a_cell_with_chosen_distractor_offsets_has_its_own_config_and_rows_that_name_them(tmp_path):
    """The optional field changes nothing for cells without it (the shipped table's hashes, checked above,
    stay); a cell with it hashes differently, trains on its layout and its rows record the offsets."""
    plain = RoutingSweepSpec.from_dict(tiny())
    data = tiny()
    data["cells"][0]["distractor_offsets"] = [3, 6, 7]
    chosen = RoutingSweepSpec.from_dict(data)
    assert chosen.cells[0].distractor_offsets == (3, 6, 7) and plain.cells[0].distractor_offsets is None
    assert [p.config for p in chosen.planned()][:2] != [p.config for p in plain.planned()][:2]
    assert [p.config for p in chosen.planned()][2] == [p.config for p in plain.planned()][2]  # the other cell
    world = chosen.world_for(2, 0, distractor_offsets=chosen.cells[0].distractor_offsets)
    assert set((world.training_data()[1][:, 2:]).unique().tolist()) == {3, 6, 7}
    out = tmp_path / "t.jsonl"
    run_routing_sweep(chosen, out, progress=False)
    rows = read_rows(out, KEY)
    assert [r.get("distractor_offsets") for r in rows] == [[3, 6, 7], [3, 6, 7], None]
    assert rows[1]["reverse_acc_dm1"] is not None and rows[1]["reverse_acc_dp1"] is not None  # delta 2: B at 1, at 3
    assert rows[0]["reverse_acc_dm1"] is None  # delta 1 has no held-out offset below it


def test_the_matched_full_mdm_sweep_is_the_full_mdm_cell_trained_three_times_longer():
    """The control for the full objective's weaker transfer: the same cell, world, seeds and settings, but 900
    steps instead of 300, so its in-place accuracy can reach the in-place-only model's; beside it, the core
    in-place-only cell at base 1e4 trained as long (the control for the training length)."""
    import json
    from pathlib import Path

    data = Path(__file__).parents[1] / "data"
    routing = json.loads((data / "routing_sweep.json").read_text())
    matched = json.loads((data / "routing_mdm_matched_sweep.json").read_text())
    cells = {c["name"]: c for c in matched["cells"]}
    assert list(cells) == ["mdm-full-900", "inplace-900"]
    original = {c["name"]: c for c in routing["cells"]}
    for name, source, drop in (("mdm-full-900", "mdm-full", ()), ("inplace-900", "core", ("bases",))):
        assert {k: v for k, v in cells[name].items() if k not in ("name", "group", "train")} == {
            k: v for k, v in original[source].items() if k not in ("name", "group", "train", *drop)}
        assert cells[name]["train"] == {**original[source].get("train", {}), "steps": 900}
    assert 1e4 in original["core"]["bases"] and routing["train"]["steps"] == 300
    assert all(matched[k] == routing[k] for k in ("world", "train", "seeds", "stack_size"))
