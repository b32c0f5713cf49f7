"""Ship finished ``revlens text-reversal`` runs as a numbers-only table, and read such a table back.

A run folder holds ``scores.jsonl`` (every prompt, completion and foil of the dataset) and checkpoints. The folder
released with Berglund et al. 2023 has no licence, so what this repository ships of a run on it is numbers only:
:func:`ship_runs` merges run folders of the same data and configuration (they may differ only in their seeds and the
MDM's masking, and a run may train the MDM alone, whose ARM is then another run's at the same seed) into a
destination folder (``data/text_reversal/``) holding

- ``results.csv``: file x model x masking x seed x metric, with ``value``, ``half_width`` (95% over persons),
  ``steps`` and ``converged``, as each run's ``results.csv`` has them (its rows averaged over seeds are left out;
  :func:`revlens.lm.text_reversal.seed_means` recomputes them over every shipped seed);
- ``training.csv``: model x masking x seed: ``steps``, wall ``seconds``, final ``held-out accuracy``, ``converged``;
- ``history.csv``: every evaluation while training: model, masking, seed, step, loss, held-out accuracy, learning
  rate, seconds;
- ``run.json``: per run folder its exact command, masking, seeds, models and the revlens commit it was trained with;
  the (masking, seeds) shipped; the data's source (repository, commit, folder) and SHA-256 per file; the shared
  configuration; the held-out split's line indices.

Runs trained at another time (further seeds, another masking) are added to a shipped table with
``ship_runs(..., add=True)``, refused unless they share its data, source and configuration.

Before the folder is swapped in, every string written is checked (:func:`check_numbers_only`): a table cell must be a
known file, model, masking or metric name, and in ``run.json`` every string is a known name or configuration choice
but for the provenance fields (commits, repository, folder, SHA-256 digests, commands), each checked for its form
(a command must parse as the revlens command line that trained its run, no argument holding whitespace).
With ``data_dir`` the data is also checked against the runs' SHA-256, and no prompt, completion or person name of it
(two words or more) may occur anywhere in the output. :func:`check_shipped` reads a table back and checks it
against what its ``run.json`` claims; :func:`over_seeds` gives each file, model, masking and metric one value with its
interval (over persons with one seed, over seeds with several), as notebook 08 shows them.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from revlens.atomic import folder_swap, write_json_atomic, write_text_atomic
from revlens.config import load_json
from revlens.lm.corpus import WORDINGS
from revlens.lm.text_reversal import (_PER_PROMPT, HELD_OUT, MODEL_FOLDERS, SCORING, TEST_FILES, TRAIN_FILES,
                                      data_fingerprint, person_names, read_layout, seed_means)
from revlens.lm.trainer import MASKINGS, T_SAMPLINGS

FILES: tuple[str, ...] = (*TEST_FILES, HELD_OUT)
"""The ``file`` values of ``results.csv``: the scored test files and the stopping split."""
MODELS: tuple[str, ...] = tuple(MODEL_FOLDERS.values())
METRICS: tuple[str, ...] = (*_PER_PROMPT, "candidates", "gold with unknown words", "n", "lines also in training")
RESULT_COLUMNS = ["file", "model", "masking", "seed", "metric", "value", "half_width", "steps", "converged"]
TRAINING_COLUMNS = ["model", "masking", "seed", "steps", "seconds", "held-out accuracy", "converged"]
HISTORY_COLUMNS = ["model", "masking", "seed", "step", "loss", "held-out accuracy", "lr", "seconds"]
TABLES: dict[str, list[str]] = {"results.csv": RESULT_COLUMNS, "training.csv": TRAINING_COLUMNS,
                                "history.csv": HISTORY_COLUMNS}
SHIPPED_FILES = (*TABLES, "run.json")
_LABELS = {"file": FILES, "model": MODELS, "masking": MASKINGS, "metric": METRICS}
"""The string columns of the tables and the only values each may hold."""
KNOWN_NAMES = frozenset(FILES + TRAIN_FILES + MODELS + tuple(MODEL_FOLDERS) + METRICS + MASKINGS + T_SAMPLINGS
                        + tuple(WORDINGS) + (SCORING,)
                        + tuple(c for cols in TABLES.values() for c in cols))
"""Every string a shipped table may hold outside its provenance fields."""
_RUN_COLUMNS = ["file", "model", "seed", "metric", "value", "half_width", "steps", "converged"]
_VARYING = ("config.seeds", "config.pair.masking", "config.models")
"""What runs shipped together may differ in; everything else of their training.json but the models must be equal."""
_SHARED = ("config", "data", "scoring", "open_after", "vocab_size", "n_train_sequences", "held_out_lines", "n_held_out", "converged_accuracy",
           "train_test_overlap")
_HEX40, _HEX64 = re.compile(r"[0-9a-f]{40}"), re.compile(r"[0-9a-f]{64}")


def _check_commit(what: str, value: object) -> None:
    if not (isinstance(value, str) and _HEX40.fullmatch(value)):
        raise ValueError(f"{what} must be a full git commit (40 lower-case hex digits), got {value!r}")


def _check_repository(what: str, value: object) -> None:
    if not (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*", value)):
        raise ValueError(f"{what} must be a GitHub repository as owner/name, got {value!r}")


def _check_folder(what: str, value: object) -> None:
    if not (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", value)
            and ".." not in value.split("/")):
        raise ValueError(f"{what} must be a relative path inside the repository, got {value!r}")


_SOURCE_CHECKS = {"repository": _check_repository, "commit": _check_commit, "folder": _check_folder}


@dataclass(frozen=True)
class DataSource:
    """Where the dataset folder comes from: a public GitHub repository, the commit, the folder inside it."""

    repository: str  # owner/name
    commit: str  # 40 hex digits
    folder: str  # path inside the repository

    def __post_init__(self) -> None:
        for name in ("repository", "commit", "folder"):
            _SOURCE_CHECKS[name](name, getattr(self, name))


RELEASE = DataSource("lukasberglund/reversal_curse", "6af5f418755d528304e406361e86477637d21c84",
                     "data/reverse_experiments/june_version_7921032488")
"""The folder of Berglund et al. 2023 that ``docs/benchmark.md`` describes, at the commit the shipped runs used."""


@dataclass(frozen=True)
class ShippedTable:
    """A shipped table read back: the three tables (seed as int) and ``run.json``."""

    results: pd.DataFrame
    training: pd.DataFrame
    history: pd.DataFrame
    run: dict

    @property
    def shipped(self) -> dict[str, list[int]]:
        """Masking -> the seeds shipped with it, as ``run.json`` states."""
        return self.run["shipped"]


_LAUNCHER = re.compile(r"[A-Z_][A-Z0-9_]*=\S*|\S*(python|revlens|/)\S*|-[A-Za-z-]+|\d+"
                       r"|nice|nohup|time|timeout|taskset|env")
"""What may come before ``text-reversal`` in a command: environment settings, the program, a launcher's options."""
_CLI_OPTIONS = {"layers": ("pair", "n_layers"), "d_model": ("pair", "d_model"), "heads": ("pair", "n_heads"),
                "masking": ("pair", "masking"), "max_steps": ("max_steps",), "min_steps": ("min_steps",),
                "eval_every": ("eval_every",), "patience": ("patience",), "models": ("models",)}
"""Options of ``revlens text-reversal`` -> where the run's configuration records them."""


def _check_command(command: object, config: dict | None = None) -> None:
    """A command as typed: launcher words, then ``text-reversal`` and arguments that the revlens command line accepts,
    none holding whitespace (so no sentence can hide in it); with ``config`` (a run's), its seeds and the options
    above must be the run's."""
    if not isinstance(command, str) or "text-reversal" not in command:
        raise ValueError(f"each command must be the text-reversal command line that wrote its run, got {command!r}")
    try:
        words = shlex.split(command)
    except ValueError as err:
        raise ValueError(f"command {command!r} is not a shell command line ({err})") from None
    spaced = [w for w in words if re.search(r"\s", w)]
    if spaced:
        raise ValueError(f"command {command!r} has an argument with whitespace ({spaced[0]!r}); a shipped command may "
                         "only hold paths and options")
    if "text-reversal" not in words:
        raise ValueError(f"command {command!r}: no text-reversal subcommand")
    at = words.index("text-reversal")
    odd = [w for w in words[:at] if not _LAUNCHER.fullmatch(w)]
    if odd:
        raise ValueError(f"command {command!r}: {odd[0]!r} before text-reversal is neither the program, an "
                         "environment setting nor a launcher option")
    from revlens.cli import build_parser

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(errors):
            args = build_parser().parse_args(words[at:])
    except SystemExit:
        said = errors.getvalue().strip().splitlines()
        why = said[-1] if said else "it exits"
        raise ValueError(f"command {command!r} is not a revlens command line ({why})") from None
    if config is None:
        return
    seeds = list(args.seeds) if args.seeds else [args.seed]
    if seeds != list(config["seeds"]):
        raise ValueError(f"command {command!r} trains seeds {seeds}, its run folder seeds {config['seeds']}")
    for option, where in _CLI_OPTIONS.items():
        recorded = config
        for key in where:
            recorded = recorded[key]
        given = getattr(args, option)
        if option == "models":  # the command line accepts them in any order
            given, recorded = sorted(given), sorted(recorded)
        if given != recorded:
            raise ValueError(f"command {command!r} gives --{option.replace('_', '-')} {given}, but its "
                             f"run folder was trained with {recorded}")


# ---- reading run folders and checking they belong together ----------------------------------------------------

def _read_run(folder: Path) -> tuple[dict, pd.DataFrame]:
    """A finished run folder's training.json and results.csv (without seed-mean rows), checked against each other."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a run folder")
    record_path, results_path = folder / "training.json", folder / "results.csv"
    if not (record_path.is_file() and results_path.is_file()):
        raise ValueError(f"{folder} is not a finished text-reversal run (it needs training.json and results.csv)")
    record = load_json(record_path)
    if not isinstance(record, dict) or not isinstance(record.get("models"), dict) or "config" not in record:
        raise ValueError(f"{record_path}: not a text-reversal training record")
    results = pd.read_csv(results_path, dtype={"seed": str})
    if list(results.columns) != _RUN_COLUMNS:
        raise ValueError(f"{results_path}: columns {list(results.columns)}, expected {_RUN_COLUMNS}")
    results = results[results.seed != "mean"]
    seeds = record["config"]["seeds"]
    if sorted(record["models"]) != sorted(f"seed{s}" for s in seeds):
        raise ValueError(f"{record_path}: models of {sorted(record['models'])}, but the configuration's seeds are "
                         f"{seeds}")
    expected = {(MODEL_FOLDERS[name], str(s)) for s in seeds for name in record["models"][f"seed{s}"]}
    found = set(results[["model", "seed"]].itertuples(index=False, name=None))
    if found != expected:
        raise ValueError(f"{results_path}: models and seeds {sorted(found)} differ from training.json's "
                         f"{sorted(expected)}")
    for s in seeds:
        for name, entry in record["models"][f"seed{s}"].items():
            rows = results[(results.model == MODEL_FOLDERS[name]) & (results.seed == str(s))]
            if not ((rows.steps == entry["steps"]).all() and (rows.converged == entry["converged"]).all()):
                raise ValueError(f"{results_path}: steps or converged of {MODEL_FOLDERS[name]}, seed {s} differ "
                                 "from training.json's")
    return record, results


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            out |= _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: value}


def _shared_fields(folders: list[Path], records: list[dict]) -> None:
    """Refuse runs that differ in anything but their seeds and masking, naming the first field that differs."""
    first = _flatten({k: records[0].get(k) for k in _SHARED})
    for folder, record in zip(folders[1:], records[1:]):
        other = _flatten({k: record.get(k) for k in _SHARED})
        for field in sorted(set(first) | set(other)):
            if field in _VARYING or first.get(field, "(missing)") == other.get(field, "(missing)"):
                continue
            a, b = (repr(v.get(field, "(missing)"))[:60] for v in (first, other))
            raise ValueError(f"{folder} and {folders[0]} differ in {field} ({b} vs {a}); runs shipped together must "
                             "share the data and the configuration, and differ only in seeds and masking")


# ---- shipping ----------------------------------------------------------------------------------------------------

def ship_runs(runs: Sequence[str | Path], dest: str | Path, *, commands: Sequence[str], source: DataSource,
              revlens_commit: str, data_dir: str | Path | None = None, overwrite: bool = False,
              add: bool = False) -> ShippedTable:
    """Merge finished run folders (same data and configuration; any seeds and maskings, each (masking, seed) once)
    into the numbers-only table ``dest`` (see the module doc) and return it as read back by :func:`check_shipped`.

    ``commands``: the command line that wrote each run, in the order of ``runs``; ``source``: where the data
    folder comes from (:data:`RELEASE` for the released one); ``revlens_commit``: the revlens commit the runs were
    trained with (recorded per run); ``data_dir``: the data folder itself, to check it is the runs' data and that
    none of its sentences is written. An existing non-empty ``dest`` is replaced only with ``overwrite``; with
    ``add`` the runs are added to the table ``dest`` already holds instead (runs trained at another time, e.g.
    further seeds): they must share its data, source and configuration and add only (masking, seed) pairs it does
    not hold. Nothing is written on any error.
    """
    folders = [Path(r) for r in runs]
    if not folders:
        raise ValueError("no run folders to ship")
    if len(commands) != len(folders):
        raise ValueError(f"one command per run folder: {len(folders)} folders, {len(commands)} commands")
    if not isinstance(source, DataSource):
        raise TypeError(f"source must be a DataSource (repository, commit, folder), got {type(source).__name__}")
    if add and overwrite:
        raise ValueError("add keeps what dest holds and overwrite replaces it: pass one of them")
    _check_commit("revlens_commit", revlens_commit)
    read = [_read_run(f) for f in folders]
    records = [record for record, _ in read]
    for command, record in zip(commands, records):
        _check_command(command, record["config"])
    _shared_fields(folders, records)
    layout = None if data_dir is None else _runs_data(Path(data_dir), records[0])
    dest = Path(dest)
    earlier = _table_to_extend(dest, records[0], source) if add else None
    if not add:
        _check_dest(dest, folders, overwrite)
    shipped = _shipped_pairs(folders, records, {} if earlier is None else earlier.shipped)
    results = pd.concat([r.assign(masking=rec["config"]["pair"]["masking"]) for rec, r in read], ignore_index=True)
    results["seed"] = results.seed.astype(int)
    training, history = _training_tables(records)
    run = {"data": {"repository": source.repository, "commit": source.commit, "folder": source.folder,
                    "sha256": records[0]["data"]},
           "shipped": shipped,
           "runs": [{"command": c, "masking": r["config"]["pair"]["masking"], "seeds": r["config"]["seeds"],
                     "models": r["config"]["models"], "revlens_commit": revlens_commit}
                    for c, r in zip(commands, records)],
           "config": _without_varying(records[0]["config"])}
    run |= {k: records[0].get(k) for k in _SHARED if k not in ("config", "data")}
    if earlier is not None:
        run["runs"] = earlier.run["runs"] + run["runs"]
        results = pd.concat([earlier.results, results], ignore_index=True)
        training = pd.concat([earlier.training, training], ignore_index=True)
        history = pd.concat([earlier.history, history], ignore_index=True)
    with folder_swap(dest) as tmp:
        write_text_atomic(tmp / "results.csv", _ordered(results, RESULT_COLUMNS).to_csv(index=False))
        write_text_atomic(tmp / "training.csv", _ordered(training, TRAINING_COLUMNS).to_csv(index=False))
        write_text_atomic(tmp / "history.csv", _ordered(history, HISTORY_COLUMNS).to_csv(index=False))
        write_json_atomic(tmp / "run.json", run, indent=1)
        check_numbers_only(tmp)
        if layout is not None:
            check_no_sentences(tmp, layout)
    return check_shipped(dest)


def _table_to_extend(dest: Path, record: dict, source: DataSource) -> ShippedTable:
    """The table in ``dest`` that runs with ``record``'s data and configuration may be added to, refused (naming the
    first field that differs) when it was shipped from other data, another source or another configuration."""
    earlier = check_shipped(dest)
    run = earlier.run
    if run["data"]["sha256"] != record["data"]:
        raise ValueError(f"{dest} was shipped from other data (SHA-256 differs); add runs of that data only")
    if {k: run["data"][k] for k in ("repository", "commit", "folder")} != {
            "repository": source.repository, "commit": source.commit, "folder": source.folder}:
        raise ValueError(f"{dest} names another source ({run['data']['repository']} at {run['data']['commit'][:12]}, "
                         f"{run['data']['folder']}); add runs of the same source only")
    first = _flatten({"config": run["config"]} | {k: run.get(k) for k in _SHARED if k not in ("config", "data")})
    other = _flatten({"config": _without_varying(record["config"])}
                     | {k: record.get(k) for k in _SHARED if k not in ("config", "data")})
    for field in sorted(set(first) | set(other)):
        if first.get(field, "(missing)") != other.get(field, "(missing)"):
            a, b = (repr(v.get(field, "(missing)"))[:60] for v in (first, other))
            raise ValueError(f"the runs and {dest} differ in {field} ({b} vs {a}); runs added to a table must share "
                             "its data and configuration, and differ only in seeds and masking")
    return earlier


def _shipped_pairs(folders: list[Path], records: list[dict],
                  earlier: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Masking -> seeds over ``earlier`` (a table's) and all runs, refusing a (masking, seed) held twice."""
    shipped: dict[str, list[int]] = {m: list(seeds) for m, seeds in (earlier or {}).items()}
    for folder, record in zip(folders, records):
        masking = record["config"]["pair"]["masking"]
        for seed in record["config"]["seeds"]:
            if seed in shipped.get(masking, []):
                raise ValueError(f"{folder}: masking {masking!r}, seed {seed} is also in an earlier run folder or the "
                                 "table; ship each (masking, seed) once")
            shipped.setdefault(masking, []).append(seed)
    return {m: sorted(shipped[m]) for m in MASKINGS if m in shipped}


def _runs_data(data_dir: Path, record: dict) -> dict:
    """The layout of ``data_dir``, refused unless its SHA-256 are those the run was trained on."""
    found = data_fingerprint(data_dir)
    if found != record["data"]:
        differing = sorted(k for k in found if found[k] != record["data"].get(k))
        raise ValueError(f"{data_dir} is not the data the runs were trained on (SHA-256 differs: "
                         f"{', '.join(differing)})")
    return read_layout(data_dir)


def _check_dest(dest: Path, folders: list[Path], overwrite: bool) -> None:
    """Refuse a destination that is a file, is not empty (unless ``overwrite``), or holds one of the run folders."""
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ValueError(f"{dest} is not empty; pass overwrite=True to replace it as a whole")
    for folder in folders:
        if dest.resolve() == folder.resolve() or dest.resolve() in folder.resolve().parents:
            raise ValueError(f"{dest} holds the run folder {folder}; ship into another folder")


def _without_varying(config: dict) -> dict:
    """The configuration shared by the shipped runs: without its seeds, models and the MDM's masking (see ``runs``)."""
    shared = {k: v for k, v in config.items() if k not in ("seeds", "models")}
    shared["pair"] = {k: v for k, v in config["pair"].items() if k not in ("masking", "seed")}
    return shared


def _training_tables(records: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """training.csv (one row per model, masking and seed) and history.csv (one row per evaluation) of the runs."""
    rows, history = [], []
    for record in records:
        masking = record["config"]["pair"]["masking"]
        for seed in record["config"]["seeds"]:
            for name, entry in record["models"][f"seed{seed}"].items():
                labels = {"model": MODEL_FOLDERS[name], "masking": masking, "seed": seed}
                rows.append(labels | {k: entry[k] for k in ("steps", "seconds", "held-out accuracy", "converged")})
                history += [labels | {k: h[k] for k in HISTORY_COLUMNS[3:]} for h in entry["history"]]
    return pd.DataFrame(rows), pd.DataFrame(history, columns=HISTORY_COLUMNS)


def _ordered(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``table``'s ``columns`` sorted by masking, seed, model, file, metric and step, in the library's orders."""
    keys = [c for c in ("masking", "seed", "model", "file", "metric", "step") if c in columns]
    rank = {c: {v: i for i, v in enumerate(values)} for c, values in _LABELS.items()}
    return table[columns].sort_values(keys, kind="mergesort", key=lambda s: s.map(rank[s.name]) if s.name in rank
                                      else s).reset_index(drop=True)


# ---- checks --------------------------------------------------------------------------------------------------

def check_numbers_only(folder: str | Path) -> None:
    """Refuse a table folder that could hold a sentence: other files than :data:`SHIPPED_FILES`, other columns, a
    string cell that is not a known label of its column, a non-numeric cell elsewhere, or a ``run.json`` string that
    is neither a known name (:data:`KNOWN_NAMES`) nor a provenance field of the right form."""
    folder = Path(folder)
    present = sorted(p.name for p in folder.iterdir())
    if present != sorted(SHIPPED_FILES):
        raise ValueError(f"{folder}: holds {present}; a shipped table is exactly {sorted(SHIPPED_FILES)}")
    for name, columns in TABLES.items():
        table = pd.read_csv(folder / name, dtype=str, keep_default_na=False)
        if list(table.columns) != columns:
            raise ValueError(f"{folder / name}: columns {list(table.columns)}, expected {columns}")
        for column in columns:
            cells = set(table[column])
            if column in _LABELS:
                bad = sorted(cells - set(_LABELS[column]))
            elif column == "converged":
                bad = sorted(cells - {"True", "False"})
            else:
                bad = sorted(c for c in cells if not re.fullmatch(r"-?(\d+(\.\d*)?(e[-+]?\d+)?|inf)?|nan", c, re.I))
            if bad:
                raise ValueError(f"{folder / name}: column {column!r} holds {bad[0][:60]!r}, which is not a known "
                                 f"{'name' if column in _LABELS else 'value'} of it; nothing else may be shipped")
    run = load_json(folder / "run.json")
    if not isinstance(run, dict):
        raise ValueError(f"{folder / 'run.json'}: not an object")
    for path, value in _strings(run):
        where = ".".join(map(str, path))
        if len(path) == 3 and path[0] == "runs" and path[2] == "revlens_commit":
            _check_commit(where, value)
        elif len(path) == 2 and path[0] == "data" and path[1] in _SOURCE_CHECKS:
            _SOURCE_CHECKS[path[1]](f"run.json: {where}", value)
        elif len(path) == 3 and path[0] == "runs" and path[2] == "command":
            _check_command(value)
        elif path[:2] == ("data", "sha256") and len(path) == 3:
            if not _HEX64.fullmatch(value):
                raise ValueError(f"run.json: {where} is not a SHA-256 digest: {value[:60]!r}")
        elif value not in KNOWN_NAMES:
            raise ValueError(f"run.json: {where} holds {value[:60]!r}, which is not a known name; nothing else may "
                             "be shipped")


def _strings(value: object, path: tuple = ()) -> list[tuple[tuple, str]]:
    """(path, string) of every string in a JSON value; a key is checked as a string at its own path + ("<key>",)."""
    if isinstance(value, str):
        return [(path, value)]
    out: list[tuple[tuple, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", key) and key not in KNOWN_NAMES:
                out.append((path + ("<key>",), key))
            out += _strings(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _strings(item, path + (i,))
    return out


def _words_only(text: str) -> str:
    return " " + " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split()) + " "


def check_no_sentences(folder: str | Path, layout: dict) -> None:
    """Refuse a folder whose files contain a prompt, a completion or a person's name of ``layout`` (each of two words
    or more, compared as lower-case words), naming the file and the source file of the text (not the text)."""
    folder = Path(folder)
    texts = {_words_only(p.read_text()): p.name for p in sorted(folder.iterdir())}
    phrases = {_words_only(name): "the persons' names" for name in person_names(layout)}
    for source, examples in layout.items():
        for ex in examples:
            for text in (ex.prompt, ex.completion):
                phrases.setdefault(_words_only(text), source)
    for phrase, source in phrases.items():
        if len(phrase.split()) < 2:
            continue
        for text, name in texts.items():
            if phrase in text:
                raise ValueError(f"{folder / name} contains a text of {source} ({len(phrase.split())} words); "
                                 "nothing of the dataset may be shipped")


def check_shipped(dest: str | Path) -> ShippedTable:
    """Read a shipped table and check it (:func:`check_numbers_only`) against its ``run.json``: every table holds
    exactly the (masking, seed) pairs it claims; every model of a (masking, seed) has every file and metric row in
    ``results.csv`` and one row in ``training.csv``, and both the MDM and the ARM are there."""
    dest = Path(dest)
    if not (dest / "run.json").is_file():
        raise FileNotFoundError(f"{dest}: no shipped table here (run.json missing); write one with ship_runs")
    check_numbers_only(dest)
    run = load_json(dest / "run.json")
    shipped = run.get("shipped")
    if not isinstance(shipped, dict) or not shipped or not all(
            isinstance(s, list) and s and all(isinstance(k, int) for k in s) for s in shipped.values()):
        raise ValueError(f"{dest / 'run.json'}: 'shipped' must map each masking to its seeds, got {shipped!r}")
    claimed = {(m, s) for m, seeds in shipped.items() for s in seeds}
    claimed_runs = {(r["masking"], s) for r in run.get("runs", []) for s in r["seeds"]}
    if claimed_runs != claimed:
        raise ValueError(f"{dest / 'run.json'}: 'runs' ship {sorted(claimed_runs)} but 'shipped' says "
                         f"{sorted(claimed)}")
    tables = {name: pd.read_csv(dest / name) for name in TABLES}
    for name, table in tables.items():
        found = set(zip(table.masking, table.seed.astype(int)))
        if found != claimed:
            raise ValueError(f"{dest / name}: (masking, seed) pairs {sorted(found)}, but run.json claims "
                             f"{sorted(claimed)}")
    results, training = tables["results.csv"], tables["training.csv"]
    arm_seeds = set(training[training.model == MODELS[1]].seed)
    for (masking, seed), group in training.groupby(["masking", "seed"]):
        models = set(group.model)
        if len(group) != len(models) or MODELS[0] not in models or seed not in arm_seeds:
            raise ValueError(f"{dest / 'training.csv'}: masking {masking}, seed {seed} has models "
                             f"{sorted(group.model)}; expected each once, {MODELS[0]} among them, and {MODELS[1]} at "
                             "this seed here or under another masking (its training does not depend on the masking)")
        rows = results[(results.masking == masking) & (results.seed == seed)]
        if set(rows.model) != models:
            raise ValueError(f"{dest / 'results.csv'}: masking {masking}, seed {seed} has models "
                             f"{sorted(set(rows.model))}, training.csv {sorted(models)}")
        for model, per in rows.groupby("model"):
            missing = sorted(set(FILES) - set(per.file))
            if missing or per.duplicated(["file", "metric"]).any() or "accuracy" not in set(per.metric):
                raise ValueError(f"{dest / 'results.csv'}: {model}, masking {masking}, seed {seed}: "
                                 + ("missing files " + ", ".join(missing) if missing else "duplicated or missing rows"))
    return ShippedTable(results, training, tables["history.csv"], run)


def over_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """Per file x model x masking x metric of a shipped ``results.csv``: the value and its 95% half-width, over
    persons where a model has one seed (its run's own interval), else the mean over its seeds with the interval over
    seeds; ``interval`` says which, ``seeds`` how many."""
    parts = []
    for (masking, model), rows in results.groupby(["masking", "model"], sort=False):
        n = rows.seed.nunique()
        if n == 1:
            part = rows.drop(columns="seed").assign(interval="persons")
        else:
            part = seed_means(rows, ["file", "model", "masking", "metric"]).drop(columns="seed")
            part = part.assign(interval="seeds")
        parts.append(part.assign(seeds=n))
    columns = ["file", "model", "masking", "metric", "value", "half_width", "interval", "seeds", "steps", "converged"]
    return pd.concat(parts, ignore_index=True)[columns]
