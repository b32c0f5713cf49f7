"""Reversal on text: train a small MDM and a matched ARM on a reversal dataset and score every test file.

The dataset layout is the one released with Berglund et al. 2023, "The Reversal Curse" (their
``reverse_experiments`` folders), also used by SMDM (Nie et al. 2024) to compare MDMs with ARMs: a
folder of JSON-lines files, one ``{"prompt": ..., "completion": ...}`` object per line.

==============================  =====  ========================================================
file                            use    content
==============================  =====  ========================================================
p2d_prompts_train.jsonl         train  person -> description facts, name first ("p2d")
d2p_prompts_train.jsonl         train  description -> person facts, description first ("d2p")
both_prompts_train.jsonl        train  facts stated in both orders
p2d_prompts_test.jsonl          test   p2d facts, trained order, held-out paraphrases
p2d_reverse_prompts_test.jsonl  test   p2d facts asked description first: never trained
d2p_prompts_test.jsonl          test   d2p facts, trained order, held-out paraphrases
d2p_reverse_prompts_test.jsonl  test   d2p facts asked name first: never trained
validation_prompts.jsonl        test   held-out paraphrases of trained facts: the stopping signal
==============================  =====  ========================================================

Tokenizer: word level, built from the training text alone (lower-cased; words and punctuation runs
are tokens). A word-level vocabulary keeps every name and title word one token, so "as many tokens as
the gold completion" is a count of words, and the vocabulary of such a dataset is small (a few
thousand words). Words never seen in training map to ``<unk>``; a gold completion containing one
cannot be written and is scored wrong (the table reports how many there are).

Scoring rule: the model writes as many tokens as the gold completion has (the MDM fills that many
masks, most confident first; the ARM decodes greedily); correct when the decoded text starts with
the gold completion after the tokenizer's normalisation (lower case, words joined by single
spaces). ``logp`` is the exact log-probability of the gold completion (ARM: teacher-forced; MDM:
unmasking it left to right), which separates models even when both are at zero accuracy; ``rank``
is the gold completion's rank (1 = best, ties averaged) by log-probability among the distinct
completions of the same file (totals over tokens, so shorter completions are favoured).
"""

from __future__ import annotations

import hashlib
import json
import time
import unicodedata
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from revlens.atomic import folder_swap, write_json_atomic, write_text_atomic
from revlens.config import load_json
from revlens.facts import Query, answer_logprobs, answer_scores
from revlens.lm.small_pair import OBJECTIVE, Bucket, PairConfig, check_loss, new_model, optimizer_step, save_model

TRAIN_FILES: tuple[str, ...] = ("p2d_prompts_train.jsonl", "d2p_prompts_train.jsonl", "both_prompts_train.jsonl")
TEST_FILES: tuple[str, ...] = ("p2d_prompts_test.jsonl", "p2d_reverse_prompts_test.jsonl", "d2p_prompts_test.jsonl",
                               "d2p_reverse_prompts_test.jsonl", "validation_prompts.jsonl")
VALIDATION_FILE = "validation_prompts.jsonl"
SPECIAL = ("<pad>", "<s>", "</s>", "<mask>", "<unk>")


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


def read_examples(path: str | Path) -> list[Example]:
    """One file of the layout; any line that is not ``{"prompt": str, "completion": str}`` is an error naming it.

    Lines are split at newlines only (U+2028 inside a JSON string is text), text is normalised to Unicode NFC (so
    a name typed decomposed is the same word), and the text of a special token (``<mask>``, ``</s>``, ...) is
    refused: the tokenizer would read it as that token, not as words.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a reversal dataset folder needs {', '.join(TRAIN_FILES + TEST_FILES)})")
    examples = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}, line {number}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                             f"{err.start + 1}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected an object with 'prompt' and 'completion'")
        for key in ("prompt", "completion"):
            if key not in record:
                raise ValueError(f"{path}, line {number}: missing key {key!r}")
            if not isinstance(record[key], str):
                raise ValueError(f"{path}, line {number}: {key!r} must be a string, got {type(record[key]).__name__}")
            record[key] = unicodedata.normalize("NFC", record[key])
            special = next((t for t in SPECIAL if t in record[key].lower()), None)
            if special is not None:
                raise ValueError(f"{path}, line {number}: {key!r} contains the special-token text {special!r}, which "
                                 "the tokenizer would read as that token; remove or reword it")
        if not record["completion"].strip():
            raise ValueError(f"{path}, line {number}: empty 'completion'")
        examples.append(Example(record["prompt"], record["completion"]))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def read_layout(folder: str | Path) -> dict[str, list[Example]]:
    """Every training and test file of a reversal dataset folder, by file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    return {name: read_examples(folder / name) for name in TRAIN_FILES + TEST_FILES}


def train_test_overlap(layout: dict[str, list[Example]], tok) -> dict[str, int]:
    """Per test file, how many of its lines (prompt and completion, normalised by ``tok``) are also a training line:
    such a line measures memorised text, not a held-out paraphrase or an untrained direction."""
    def text(ex: Example) -> str:
        return normalise(tok, ex.prompt + " " + ex.completion)

    trained = {text(ex) for name in TRAIN_FILES for ex in layout[name]}
    return {name: sum(text(ex) in trained for ex in layout[name]) for name in TEST_FILES}


def data_fingerprint(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of the layout: a run folder is reused only for the data it was trained on."""
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in TRAIN_FILES + TEST_FILES}


def build_text_tokenizer(texts: list[str]):
    """Word-level fast tokenizer over the words of ``texts`` (lower-cased), BOS prepended, ``<unk>`` otherwise."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Lowercase()
    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))})
    vocab = {w: i for i, w in enumerate(list(SPECIAL) + [w for w in words if w not in SPECIAL])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizer
    core.pre_tokenizer = splitter
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   mask_token="<mask>", unk_token="<unk>")


def normalise(tok, text: str) -> str:
    """``text`` as the tokenizer writes it back (lower case, words and punctuation joined by spaces)."""
    return tok.decode(tok(text, add_special_tokens=False)["input_ids"]).strip()


def is_correct_text(tok, predicted: str, gold: str) -> bool:
    """The scoring rule: ``predicted`` starts with ``gold``, both normalised by ``tok``; a gold answer with a
    word outside the vocabulary can never be written, so it is never correct."""
    if tok.unk_token_id in tok(gold, add_special_tokens=False)["input_ids"]:
        return False
    return normalise(tok, predicted).startswith(normalise(tok, gold))


def training_buckets(layout: dict[str, list[Example]], tok) -> list[Bucket]:
    """Training examples (prompt then completion, BOS first) grouped by token count; every token its own span."""
    by_len: dict[int, list[list[int]]] = {}
    for name in TRAIN_FILES:
        for ex in layout[name]:
            ids = tok(ex.prompt)["input_ids"] + tok(ex.completion, add_special_tokens=False)["input_ids"]
            by_len.setdefault(len(ids), []).append(ids)
    return [Bucket(torch.tensor(v), torch.arange(n).expand(len(v), n).clone()) for n, v in sorted(by_len.items())]


def queries(examples: list[Example], file: str) -> list[Query]:
    return [Query(i, file, ex.prompt.rstrip(), ex.completion.strip(), "") for i, ex in enumerate(examples)]


def score_file(lm, examples: list[Example], file: str, with_rank: bool = True) -> pd.DataFrame:
    """One row per example: correct (rule above), gold logp, gold rank among the file's completions, OOV flag."""
    tok = lm.tokenizer
    qs = queries(examples, file)
    table = pd.DataFrame(answer_scores(lm, qs, rule="startswith"))
    table["correct"] = [is_correct_text(tok, p, q.answer) for p, q in zip(table.predicted, qs)]
    table["gold_has_unk"] = [tok.unk_token_id in tok(q.answer, add_special_tokens=False)["input_ids"] for q in qs]
    if with_rank:
        table["rank"] = gold_ranks(lm, qs).numpy()
    table["file"] = file
    return table


def gold_ranks(lm, qs: list[Query]) -> torch.Tensor:
    """Rank of each query's gold answer among the distinct answers of ``qs`` by log-probability (ties averaged)."""
    candidates = sorted({q.answer for q in qs})
    index = {c: k for k, c in enumerate(candidates)}
    grid = [replace(q, answer=c) for q in qs for c in candidates]
    logp = answer_logprobs(lm, grid).reshape(len(qs), len(candidates))
    return rank_of(logp, torch.tensor([index[q.answer] for q in qs]))


def rank_of(scores: Float[Tensor, "n candidates"], gold: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
    """1-based rank of ``scores[i, gold[i]]`` in row i, highest first; ties share the average of their ranks."""
    value = scores[torch.arange(len(gold)), gold][:, None]
    return 1 + (scores > value).sum(-1) + 0.5 * ((scores == value).sum(-1) - 1)


@dataclass(frozen=True)
class HarnessConfig:
    """Model shape (shared by both models) and the stopping rule."""

    pair: PairConfig = PairConfig(steps=0)  # d_model, n_layers, ..., lr, batch_size, seed, mask_eps
    max_steps: int = 40000
    eval_every: int = 250
    patience: int = 4  # stop after this many evaluations without a better validation accuracy
    warmup: int = 100


def _wrap(model: torch.nn.Module, family: str, folder: Path, tok):
    from revlens.lm import HookedLM

    save_model(model, folder, tok)
    return HookedLM.from_pretrained(folder, family=family)


def train_until_flat(family: str, buckets: list[Bucket], layout: dict[str, list[Example]], tok, hc: HarnessConfig,
                     folder: Path, start: tuple[torch.nn.Module, torch.optim.Optimizer, int] | None = None,
                     stop_at: int | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer, int, list[dict]]:
    """Train one model until its validation accuracy has not improved for ``patience`` evaluations.

    Constant learning rate after a linear warm-up, so training can be continued (``start``) to a fixed
    step (``stop_at``) without a schedule that depends on the end. Returns the model, its optimiser,
    the step reached and the validation history.
    """
    pc, objective = hc.pair, OBJECTIVE[family]
    mask_id = tok.mask_token_id
    if start is None:
        model = new_model(family, pc, tok, max_len=max(b.tokens.shape[1] for b in buckets) + 64)
        opt = torch.optim.AdamW(model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
        step = 0
    else:
        model, opt, step = start
    gen = torch.Generator().manual_seed(pc.seed + step)
    sizes = torch.tensor([len(b.tokens) for b in buckets], dtype=torch.float)
    limit = stop_at if stop_at is not None else hc.max_steps
    history: list[dict] = []
    best, since_best = -1.0, 0
    bar = tqdm(total=limit, initial=step, desc=f"train {family} ({objective})", mininterval=5)
    while step < limit:
        for group in opt.param_groups:
            group["lr"] = pc.lr * min(1.0, (step + 1) / hc.warmup)
        model.train()
        loss = optimizer_step(model, objective, buckets, sizes, mask_id, pc, gen, opt)
        step += 1
        check_loss(loss, step, pc, f"train {family} ({objective})")
        bar.update(1)
        if step % hc.eval_every == 0 or step == limit:
            model.eval()
            val = score_file(_wrap(model, family, folder, tok), layout[VALIDATION_FILE], VALIDATION_FILE, False)
            history.append({"step": step, "loss": loss, "validation accuracy": float(val.correct.mean())})
            bar.set_postfix(val=f"{history[-1]['validation accuracy']:.3f}")
            if stop_at is None:
                best, since_best = (history[-1]["validation accuracy"], 0) if history[-1]["validation accuracy"] > best \
                    else (best, since_best + 1)
                if since_best >= hc.patience:
                    break
    bar.close()
    model.eval()
    return model, opt, step, history


def run_text_reversal(data_dir: str | Path, out_dir: str | Path, hc: HarnessConfig = HarnessConfig(),
                      overwrite: bool = False) -> pd.DataFrame:
    """Train the MDM and the ARM on ``data_dir`` and score every test file; writes ``out_dir``:

    ``results.csv`` (tidy: file x model x metric), ``scores.jsonl`` (one row per example and model),
    ``training.json`` (budgets, histories, times, the data's SHA-256, the train/test overlap) and the checkpoints
    ``llada/``, ``llama/`` and, when the MDM needed more steps than the ARM, ``llama_at_mdm_budget/``.

    The run is built in a temporary folder beside ``out_dir`` and swapped in whole when it is finished, so a kill
    leaves the previous folder untouched. Into an existing folder: a finished run of the same configuration and
    data is returned as it is (nothing retrains); another run, or a folder this harness did not write, is refused
    before anything trains unless ``overwrite`` (which replaces the whole folder).
    """
    out, data_dir = Path(out_dir), Path(data_dir)
    layout = read_layout(data_dir)
    record: dict = {"config": asdict(hc), "data": data_fingerprint(data_dir)}
    finished = finished_text_run(out, record, overwrite)
    if finished is not None:
        return finished
    tok = build_text_tokenizer([t for name in TRAIN_FILES for ex in layout[name] for t in (ex.prompt, ex.completion)])
    buckets = training_buckets(layout, tok)
    record |= {"vocab_size": len(tok), "n_train_sequences": int(sum(len(b.tokens) for b in buckets)),
               "train_test_overlap": train_test_overlap(layout, tok), "models": {}}
    with folder_swap(out) as tmp:
        results = _train_and_score(layout, tok, buckets, hc, tmp, record)
    return results


def finished_text_run(out: Path, record: dict, overwrite: bool) -> pd.DataFrame | None:
    """The results of ``out`` when it is a finished run with ``record``'s configuration and data; None when ``out``
    may be (re)written: new, empty, or replaced with ``overwrite``. Anything else is refused, naming what differs."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()) or overwrite:
        return None
    found = load_json(out / "training.json") if (out / "training.json").is_file() else None
    if not (isinstance(found, dict) and isinstance(found.get("models"), dict) and (out / "results.csv").is_file()):
        raise ValueError(f"{out} is a non-empty folder that is not a text-reversal run; refusing to overwrite it: "
                         "choose a new --out, or pass --overwrite to replace the whole folder")
    differing = [what for key, what in (("config", "configuration"), ("data", "dataset")) if found.get(key) != record[key]]
    if differing:
        raise ValueError(f"{out} holds a text-reversal run of another {' and '.join(differing)}; choose a new --out, "
                         "or pass --overwrite to replace it")
    return pd.read_csv(out / "results.csv")


def _train_and_score(layout: dict[str, list[Example]], tok, buckets: list[Bucket], hc: HarnessConfig, out: Path,
                     record: dict) -> pd.DataFrame:
    """Train both models into ``out``, score every test file and write the tables (see :func:`run_text_reversal`)."""
    trained: dict[str, tuple] = {}
    for family in ("llada", "llama"):
        started = time.time()
        model, opt, step, history = train_until_flat(family, buckets, layout, tok, hc, out / family)
        trained[family] = (model, opt, step)
        record["models"][family] = {"steps": step, "seconds": round(time.time() - started, 1), "history": history}
    models = {"MDM (LLaDA arch.)": ("llada", out / "llada"), "ARM (LLaMA arch.)": ("llama", out / "llama")}
    mdm_steps, arm_steps = trained["llada"][2], trained["llama"][2]
    if mdm_steps > arm_steps:  # the ARM also at the MDM's budget, so it does not lose for lack of training
        started = time.time()  # llama/ already holds the ARM at its own stop; training goes on from there
        _, _, step, history = train_until_flat("llama", buckets, layout, tok, hc, out / "llama_at_mdm_budget",
                                               start=trained["llama"], stop_at=mdm_steps)
        record["models"]["llama_at_mdm_budget"] = {"steps": step, "seconds": round(time.time() - started, 1),
                                                   "history": history}
        models[f"ARM at the MDM's {mdm_steps} steps"] = ("llama", out / "llama_at_mdm_budget")
    scores = evaluate_models(models, layout)
    write_text_atomic(out / "scores.jsonl", scores.to_json(orient="records", lines=True))
    results = summarise(scores, record["train_test_overlap"])
    write_text_atomic(out / "results.csv", results.to_csv(index=False))
    write_json_atomic(out / "training.json", record)
    return results


def evaluate_models(models: dict[str, tuple[str, Path]], layout: dict[str, list[Example]]) -> pd.DataFrame:
    """Every test file scored by every model folder: one row per example and model."""
    from revlens.lm import HookedLM

    tables = []
    for label, (family, folder) in models.items():
        lm = HookedLM.from_pretrained(folder, family=family)
        for name in TEST_FILES:
            tables.append(score_file(lm, layout[name], name).assign(model=label))
    return pd.concat(tables, ignore_index=True)


def summarise(scores: pd.DataFrame, overlap: dict[str, int] | None = None) -> pd.DataFrame:
    """Tidy table: file x model x metric (accuracy, mean gold logp, mean gold rank, candidates, OOV golds, n, and
    with ``overlap`` (:func:`train_test_overlap`) the file's lines also in training)."""
    rows = []
    for (file, model), group in scores.groupby(["file", "model"], sort=False):
        metrics = {"accuracy": group.correct.mean(), "mean gold logp": group.logp.mean(),
                   "mean gold rank": group["rank"].mean(), "candidates": group.gold.nunique(),
                   "gold with unknown words": int(group.gold_has_unk.sum()), "n": len(group)}
        if overlap is not None:
            metrics["lines also in training"] = overlap[file]
        rows += [{"file": file, "model": model, "metric": k, "value": float(v)} for k, v in metrics.items()]
    return pd.DataFrame(rows)
