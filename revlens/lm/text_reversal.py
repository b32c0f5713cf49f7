"""Reversal on text: train a small MDM and a matched ARM on a reversal dataset and score every test file.

The dataset layout is the one released with Berglund et al. 2023, "The Reversal Curse" (their
``reverse_experiments`` folders), also used by SMDM (Nie et al. 2024, "Scaling up Masked Diffusion Models on
Text") to compare MDMs with ARMs: a folder of JSON-lines files, one ``{"prompt": ..., "completion": ...}`` object
per line. Three groups of persons, each person one fact (a name and a description); "p2d" lines name the person
first (person -> description), "d2p" lines end with the name (description -> person). What each file holds, as
written by the release's generator and checked line by line on its ``june_version_7921032488`` folder (30 persons
per group, 30 training and 10 test paraphrase templates per direction; see ``docs/benchmark.md``):

==================================  ======  ====================================================================
file                                lines   content
==================================  ======  ====================================================================
p2d_prompts_train.jsonl             900     p2d group, p2d order only: 30 persons x 30 templates
d2p_prompts_train.jsonl             900     d2p group, d2p order only; the completion opens with the name
both_prompts_train.jsonl            1800    both group, trained both ways: 30 x 30 p2d lines, then 30 x 30 d2p
p2d_prompts_test.jsonl              300     p2d group, trained order, 10 held-out templates per person
d2p_prompts_test.jsonl              300     d2p group, trained order, held-out templates; completion = the name
both_prompts_test.jsonl             600     both group, both orders, held-out templates (10 + 10 per person)
p2d_reverse_prompts_test.jsonl      300     p2d group asked d2p-wise (never trained); completion = the name
d2p_reverse_prompts_test.jsonl      300     d2p group asked p2d-wise (never trained); completion = description
validation_prompts.jsonl            300     the prompts of p2d_reverse_prompts_test, completion = first name only
==================================  ======  ====================================================================

So ``validation_prompts.jsonl`` is not a held-out set of trained facts: it asks the untrained (reverse) direction
of the p2d group, the quantity the reversal curse says stays at chance. It is scored as a test file and never
read while training. The release also holds ``all.jsonl`` and ``all_prompts_train.jsonl`` (both the three
training files concatenated), ``unrealized_examples.jsonl`` (the same bytes as ``p2d_reverse_prompts_test``) and
``*_reverse_prompts_test_randomized.jsonl`` (the reverse prompts with another line's completion of the same
file); the harness reads none of them. No test prompt is a training prompt.

Persons: a line's person is the full name it contains. Names are read from the layout itself: the completions of
``p2d_reverse_prompts_test`` and ``d2p_prompts_test`` (the generator writes them as the bare name, first and last
word) and the two capitalised opening words of training completions (a d2p line's completion opens with the
name). A training line must name exactly one person, else the reader stops naming the line; a test line naming
none (``validation_prompts`` answers with the first name only) is assigned the one person whose name starts with
its completion, else keyed by its completion.

Stopping: a seeded :data:`HELD_OUT_FRACTION` of each person's training paraphrases of each direction (at least
one where there are two or more) is held out of training as the stopping split; its answer is the name on a
name-last line (as the release's d2p test asks) and the completion on a name-first line, and a line is held out
only if its answer stays in training through another paraphrase (a reworded description seen nowhere else
cannot be recalled). Each model trains until this trained-direction accuracy has not improved for ``patience``
evaluations, after at least ``min_steps``, then on at a tenth of the learning rate until it has not improved for
``patience`` evaluations again (``lr_decays`` such decays); one ending below :data:`CONVERGED_ACCURACY` is flagged "not
converged" in ``results.csv``, ``training.json`` and on the command's last line. Test files are never read while
training.

Tokenizer: word level, built from the trained lines alone (lower-cased; words and punctuation runs are tokens).
A word-level vocabulary keeps every name and title word one token, so "as many tokens as the gold completion" is
a count of words. Words never seen in training map to ``<unk>``; a gold completion containing one cannot be
written and is scored wrong (the table reports how many there are).

Scoring rule: the model writes as many tokens as the gold completion has (the MDM fills that many masks, most
confident first; the ARM decodes greedily). A completion that does not end its line (the bare names: in training
a name is followed by the rest of its sentence) is cut short, and the MDM gets :func:`continuation_length` more
open masks after its slots, which it reads and does not write, as LLaDA generates into a longer masked block; the
ARM is free to continue anyway. Without them the MDM is told the text ends after the name, and it writes the
sentence's closing punctuation into the name's last slot. It is correct when the decoded text starts with the
gold completion after the tokenizer's normalisation (lower case, words joined by single spaces). ``logp`` is the exact
log-probability of the gold completion (ARM: teacher-forced; MDM: unmasking it left to right), which separates
models even when both are at zero accuracy; ``rank`` is the gold completion's rank (1 = best, ties averaged) by
log-probability among the distinct completions of the same file (totals over tokens, so shorter completions are
favoured; the MDM's probabilities exclude its mask token, which it is never allowed to write); ``foil_logp`` is the log-probability of a foil, another person's completion from the same file, in the
same prompt (a model that stores nothing about the person beats it about half the time). Means and 95% intervals
are over persons (each person's prompts averaged first), and over seeds in the rows averaged over seeds.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import sys
import time
import unicodedata
import weakref
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from revlens.atomic import folder_swap, write_json_atomic, write_text_atomic
from revlens.config import load_json
from revlens.stats import mean_ci
from revlens.facts import Query, _finite, _slot_logprobs, answer_logprobs, answer_scores, encode_query
from revlens.lm.trainer import (OBJECTIVE, Bucket, PairConfig, check_loss, load_training_state, new_model,
                                optimizer_step, save_model, save_training_state)

TRAIN_FILES: tuple[str, ...] = ("p2d_prompts_train.jsonl", "d2p_prompts_train.jsonl", "both_prompts_train.jsonl")
TEST_FILES: tuple[str, ...] = ("p2d_prompts_test.jsonl", "p2d_reverse_prompts_test.jsonl", "d2p_prompts_test.jsonl",
                               "d2p_reverse_prompts_test.jsonl", "both_prompts_test.jsonl", "validation_prompts.jsonl")
NAME_ANSWER_FILES: tuple[str, ...] = ("p2d_reverse_prompts_test.jsonl", "d2p_prompts_test.jsonl")
"""The files whose completions are the bare names of their group's persons (the release writes them so)."""
HELD_OUT = "held-out training paraphrases"
"""The stopping split's name in the tables: held-out paraphrases of the trained direction (see the module doc)."""
HELD_OUT_FRACTION = 0.2
"""Share of each person's paraphrases per direction held out for stopping: 6 of the release's 30, leaving 24."""
SPLIT_SEED = 0
"""Seed of the held-out split, the same for every model seed, so seeds differ in initialisation and batches only."""
CONVERGED_ACCURACY = 0.9
"""Held-out trained-direction accuracy a model must end at to count as having memorised its training facts. A
model that has memorised answers every trained-direction prompt but for the odd held-out template it cannot
map; 0.9 allows a tenth of them and still tells memorised (near 1) from learning (the curve rises through it);
below it a zero on the reverse files could be a model that learned nothing."""
SPECIAL = ("<pad>", "<s>", "</s>", "<mask>", "<unk>")
MDM_LABEL, ARM_LABEL = "MDM (LLaDA arch.)", "ARM (LLaMA arch.)"
ARM_AT_MDM, MDM_AT_ARM = "ARM at the MDM's budget", "MDM at the ARM's budget"
_PUNCTUATION = ".,;:!?\"'"
SCORING = "startswith; MDM: mask token never written, open masks after an answer that does not end its line"
"""The scoring rule's name in ``training.json``: a run folder scored by another rule is not reused."""


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


# ---- persons and the held-out split ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Person:
    """Who a line is about, and whether the name comes first (in the prompt: p2d order) or last (d2p order)."""

    name: str
    name_first: bool


def person_names(layout: dict[str, list[Example]]) -> list[str]:
    """The persons' full names: bare-name completions of :data:`NAME_ANSWER_FILES`, and two capitalised words
    opening a training completion (a d2p line's completion opens with the name)."""
    names = {_words(ex.completion) for name in NAME_ANSWER_FILES for ex in layout[name]}
    for name in TRAIN_FILES:
        for ex in layout[name]:
            opening = [w.strip(_PUNCTUATION) for w in ex.completion.split()[:2]]
            if len(opening) == 2 and all(w[:1].isupper() for w in opening):
                names.add(" ".join(opening))
    return sorted(n for n in names if n)


def _words(text: str) -> str:
    return " ".join(text.split()).strip(_PUNCTUATION + " ")


def line_persons(examples: list[Example], names: list[str], file: str, training: bool) -> list[Person | None]:
    """The person of every line (see the module doc); a training line naming none or several is an error naming
    it; a test line naming none gets the one person whose name starts with its completion, else None."""
    pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")(?!\w)")
    out: list[Person | None] = []
    for number, ex in enumerate(examples, start=1):
        found = sorted({m for m in pattern.findall(ex.prompt + "\n" + ex.completion)} if names else set())
        if len(found) == 1:
            out.append(Person(found[0], bool(pattern.search(ex.prompt))))
            continue
        if len(found) > 1 and training:
            raise ValueError(f"{file}, line {number}: names several persons ({', '.join(found)}); a training line "
                             "must state one fact")
        if training:
            raise ValueError(f"{file}, line {number}: names no person of the layout (names come from the "
                             f"completions of {' and '.join(NAME_ANSWER_FILES)} and the capitalised openings of "
                             "training completions); every training line must name its person")
        answer = _words(ex.completion)
        starts = [n for n in names if answer and (n == answer or n.startswith(answer + " "))]
        out.append(Person(starts[0], False) if len(starts) == 1 else None)
    return out


def training_persons(layout: dict[str, list[Example]], names: list[str]) -> dict[str, list[Person | None]]:
    """Per training file, the person of every line (:func:`line_persons`): computed once per run and passed to
    the split, the held-out queries and :func:`continuation_length`."""
    return {file: line_persons(layout[file], names, file, training=True) for file in TRAIN_FILES}


def _without(items: list, indices: list[int]) -> list:
    """``items`` but those at ``indices``."""
    drop = set(indices)
    return [item for i, item in enumerate(items) if i not in drop]


def line_answer(ex: Example, person: Person) -> str:
    """What a held-out line asks: the name on a name-last line whose completion opens with it, else the completion."""
    if not person.name_first and ex.completion.strip().startswith(person.name):
        return " " + person.name
    return ex.completion


def held_out_split(layout: dict[str, list[Example]], names: list[str], fraction: float = HELD_OUT_FRACTION,
                   seed: int = SPLIT_SEED, *, persons: dict[str, list[Person | None]] | None = None
                   ) -> dict[str, list[int]]:
    """Per training file, the sorted line indices held out for stopping (see the module doc).

    For each person and direction with n >= 2 lines, ``max(1, round(fraction * n))`` lines drawn in a seeded
    order, skipping any whose answer would leave training with it. Deterministic: the draw is seeded by ``seed``,
    the file, the person and the direction, not by the order of the persons. ``persons``: the lines' persons
    (:func:`training_persons`), computed when not given."""
    persons = training_persons(layout, names) if persons is None else persons
    out: dict[str, list[int]] = {}
    for file in TRAIN_FILES:
        examples = layout[file]
        units: dict[Person, list[int]] = defaultdict(list)
        for i, person in enumerate(persons[file]):
            units[person].append(i)
        held: list[int] = []
        for person, lines in units.items():
            if len(lines) < 2:
                continue
            key = {i: _words(line_answer(examples[i], person)).lower() for i in lines}
            left = Counter(key.values())
            order = lines[:]
            random.Random(f"{seed}:{file}:{person.name}:{person.name_first}").shuffle(order)
            chosen: list[int] = []
            for i in order:
                if len(chosen) == max(1, round(fraction * len(lines))):
                    break
                if left[key[i]] >= 2:
                    chosen.append(i)
                    left[key[i]] -= 1
            held += chosen
        out[file] = sorted(held)
    return out


def split_layout(layout: dict[str, list[Example]], names: list[str], held: dict[str, list[int]], *,
                 persons: dict[str, list[Person | None]] | None = None
                 ) -> tuple[dict[str, list[Example]], list[Example], list[Person]]:
    """The layout with the held-out lines taken out of its training files, the held-out lines as queries (their
    answers, see :func:`line_answer`) and their persons. ``persons``: the persons of the training files' lines
    (:func:`training_persons`), computed when not given."""
    persons = training_persons(layout, names) if persons is None else persons
    trained = dict(layout)
    validation, held_persons = [], []
    for file in TRAIN_FILES:
        trained[file] = _without(layout[file], held[file])
        line_person = persons[file]
        for i in held[file]:
            validation.append(Example(layout[file][i].prompt, line_answer(layout[file][i], line_person[i])))
            held_persons.append(line_person[i])
    return trained, validation, held_persons


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


# ---- tokenizer, scoring rule, training sequences --------------------------------------------------------------

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


def layout_tokenizer(layout: dict[str, list[Example]]):
    """:func:`build_text_tokenizer` over the training files' prompts and completions."""
    return build_text_tokenizer([t for name in TRAIN_FILES for ex in layout[name] for t in (ex.prompt, ex.completion)])


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
    """Training examples (prompt then completion, BOS first) grouped by token count. Span ids: every prompt token
    its own, the whole completion one span, so ``masking="entity"`` masks the completion as a whole (DiffER's
    fix) while ``"token"`` masks tokens independently."""
    by_len: dict[int, list[tuple[list[int], list[int]]]] = defaultdict(list)
    for name in TRAIN_FILES:
        for ex in layout[name]:
            prompt = tok(ex.prompt)["input_ids"]
            completion = tok(ex.completion, add_special_tokens=False)["input_ids"]
            units = list(range(len(prompt))) + [len(prompt)] * len(completion)
            by_len[len(prompt) + len(completion)].append((prompt + completion, units))
    return [Bucket(torch.tensor([ids for ids, _ in v]), torch.tensor([u for _, u in v])) for _, v in sorted(by_len.items())]


# ---- scoring ---------------------------------------------------------------------------------------------------

def queries(examples: list[Example], file: str) -> list[Query]:
    return [Query(i, file, ex.prompt.rstrip(), ex.completion.strip(), "") for i, ex in enumerate(examples)]


_ROW_BUDGET = 1 << 24
"""Logit entries (rows x positions x vocabulary) one scoring forward pass may hold: bounds memory, not results."""


def per_candidate_logprobs(lm, prompts: list[str], candidates: list[str]) -> Float[Tensor, "prompts candidates"]:
    """The reference scorer: every (prompt, candidate) pair on its own row (:func:`revlens.facts.answer_logprobs`),
    the prompt recomputed for each candidate and each of an MDM's unmasking passes run per candidate."""
    grid = [Query(i, "", p, c, "") for i, p in enumerate(prompts) for c in candidates]
    return answer_logprobs(lm, grid).reshape(len(prompts), len(candidates))


@torch.no_grad()
def candidate_logprobs(lm, prompts: list[str], candidates: list[str]) -> Float[Tensor, "prompts candidates"]:
    """Log-probability of every candidate completion after every prompt, equal to :func:`per_candidate_logprobs`.

    Batched: the ARM runs each prompt once and continues every candidate from its key-value cache (candidates
    share the prompt prefix); the MDM's left-to-right unmasking runs one pass per distinct partly unmasked
    candidate (all candidates of a length share the fully masked pass, those with a common first word the next,
    and so on) instead of one per candidate and token. A model built in memory without a folder is scored by the
    reference scorer."""
    first = [encode_query(lm, Query(0, "", p, candidates[0], "")) for p in prompts]
    prefixes = [e.prompt[: e.answer_start] for e in first]
    answers = [encode_query(lm, Query(0, "", prompts[0], c, "")).answer for c in candidates]
    if lm.family.masked:
        return _masked_grid(lm, prefixes, answers)
    module = _plain_causal(lm)
    if module is None:
        return per_candidate_logprobs(lm, prompts, candidates)
    return _causal_grid(lm, module, prefixes, answers)


def _by_length(seqs: list[list[int]]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(seqs):
        groups[len(s)].append(i)
    return groups


_PLAIN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _plain_causal(lm):
    """The causal model of ``lm``'s folder without the hook bridge (whose attention keeps no key-value cache),
    loaded once per ``lm``; None when ``lm`` was not loaded from a folder."""
    if lm in _PLAIN:
        return _PLAIN[lm]
    if lm.raw_config is None or not Path(lm.source).is_dir():
        return None
    from revlens.checkpoint import load_weights
    from revlens.lm.families import build_module, not_stored, rebuild_buffers, tie_if_needed
    from revlens.lm.hooked_lm import read_safetensors_folder

    device = lm.cfg.device
    module, _ = build_module(lm.family, lm.raw_config)
    state = read_safetensors_folder(Path(lm.source), device, next(lm.bridge.parameters()).dtype)
    load_weights(module, state, f"weights in {lm.source}", not_stored=not_stored(lm.family, module), assign=True)
    rebuild_buffers(lm.family, module, device)
    tie_if_needed(lm.family, module)
    _PLAIN[lm] = module.eval()
    return _PLAIN[lm]


def _causal_grid(lm, module, prefixes: list[list[int]], answers: list[list[int]]) -> Float[Tensor, "prompts candidates"]:
    """ARM: per prompt one pass, then all candidates of one length in one pass from the repeated cache."""
    out = torch.zeros(len(prefixes), len(answers))
    device, vocab = lm.cfg.device, lm.cfg.d_vocab
    for plen, rows in _by_length(prefixes).items():
        for alen, cols in _by_length(answers).items():
            cands = torch.tensor([answers[c] for c in cols])
            per = max(1, _ROW_BUDGET // (len(cols) * alen * vocab))
            for start in range(0, len(rows), per):
                chunk = rows[start : start + per]
                first = module(torch.tensor([prefixes[r] for r in chunk], device=device), use_cache=True)
                last = _finite(lm, first.logits[:, -1]).float().log_softmax(-1).cpu()  # [chunk, vocab]
                logp = last[:, cands[:, 0]]  # the first candidate token, read from the prompt's last position
                if alen > 1:
                    cache = first.past_key_values
                    cache.batch_repeat_interleave(len(cols))
                    rest = module(cands[:, :-1].repeat(len(chunk), 1).to(device), cache=cache).logits
                    rest = _finite(lm, rest).float().log_softmax(-1).cpu()
                    gold = rest.gather(-1, cands[:, 1:].repeat(len(chunk), 1)[..., None]).squeeze(-1)
                    logp = logp + gold.sum(-1).reshape(len(chunk), len(cols))
                out[torch.tensor(chunk)[:, None], torch.tensor(cols)] = logp
    return out


def _masked_grid(lm, prefixes: list[list[int]], answers: list[list[int]]) -> Float[Tensor, "prompts candidates"]:
    """MDM: the gold-unmasking passes of all candidates of one length, each distinct partly unmasked answer once
    (the j-th pass of a candidate is shared by every candidate with the same first j tokens)."""
    out = torch.zeros(len(prefixes), len(answers))
    mask, vocab = int(lm.mask_token_id), lm.cfg.d_vocab
    for plen, rows in _by_length(prefixes).items():
        for alen, cols in _by_length(answers).items():
            for j in range(alen):  # one batch per number of open masks (a batch needs the same count per row)
                states: dict[tuple[int, ...], int] = {}
                state_of = torch.tensor([states.setdefault(tuple(answers[c][:j]), len(states)) for c in cols])
                token = torch.tensor([answers[c][j] for c in cols])
                fills = torch.full((len(states), alen), mask)
                for known, k in states.items():
                    fills[k, :j] = torch.tensor(known, dtype=torch.long)
                per = max(1, _ROW_BUDGET // (len(states) * (plen + alen) * vocab))
                for start in range(0, len(rows), per):
                    chunk = rows[start : start + per]
                    prompts = torch.tensor([prefixes[r] for r in chunk]).repeat_interleave(len(states), 0)
                    logp = _slot_logprobs(lm, torch.cat([prompts, fills.repeat(len(chunk), 1)], 1), 0)
                    index = (torch.tensor(chunk)[:, None], torch.tensor(cols))
                    out[index] += logp.reshape(len(chunk), len(states), -1)[:, state_of, token]
    return out


def rank_of(scores: Float[Tensor, "n candidates"], gold: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
    """1-based rank of ``scores[i, gold[i]]`` in row i, highest first; ties share the average of their ranks."""
    value = scores[torch.arange(len(gold)), gold][:, None]
    return 1 + (scores > value).sum(-1) + 0.5 * ((scores == value).sum(-1) - 1)


def foil_indices(answers: list[str], persons: list[Person | None], file: str) -> list[int]:
    """Per line, the index into ``sorted(set(answers))`` of its foil: another person's completion from the same
    file (another completion where persons are unknown), drawn seeded by the file and line."""
    candidates = sorted(set(answers))
    key = [p.name if p is not None else _words(a) for a, p in zip(answers, persons)]
    foils = []
    for i, (answer, who) in enumerate(zip(answers, key)):
        others = sorted({a for a, k in zip(answers, key) if k != who and _words(a).lower() != _words(answer).lower()})
        if not others:
            raise ValueError(f"{file}: line {i + 1} has no foil (every line of the file is about the same person); "
                             "a test file needs lines about at least two persons")
        foils.append(candidates.index(random.Random(f"{file}:{i}").choice(others)))
    return foils


class WritesWords:
    """An MDM that never writes its mask token, asked with ``open_after`` open masks after the answer slots.

    The mask token's logit is set far below the others, so the probabilities are renormalised over the
    vocabulary's words: an early model can rank the mask token first, and a slot "filled" with it would still count
    as open (a batch would then hold prompts with different numbers of masks). ``open_after`` masks are appended
    to every input and their logits dropped: they stand for the rest of a line the answer does not end (see
    :func:`ends_line`), which the model reads but is not asked to write."""

    def __init__(self, lm, open_after: int = 0) -> None:
        if open_after < 0:
            raise ValueError(f"open_after must be >= 0, got {open_after}")
        self.lm, self.open_after = lm, open_after

    def __getattr__(self, name: str):
        return getattr(self.lm, name)

    def mask_logits(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch n_masks vocab"]:
        tail = torch.full((tokens.shape[0], self.open_after), int(self.lm.mask_token_id), dtype=tokens.dtype,
                          device=tokens.device)
        logits = self.lm.mask_logits(torch.cat([tokens, tail], 1))
        logits = logits[:, : logits.shape[1] - self.open_after].clone()  # the answer slots' logits only
        logits[..., self.lm.mask_token_id] = torch.finfo(logits.dtype).min / 2
        return logits


_LINE_END = re.compile(r"[.?!][\"')\]]*\s*$")


def ends_line(completion: str) -> bool:
    """Whether a completion ends its line as the training lines end (with sentence punctuation). The release's
    bare-name completions do not: in training a name is followed by the rest of its sentence."""
    return bool(_LINE_END.search(completion))


def continuation_length(trained: dict[str, list[Example]], names: list[str], tok, *,
                        persons: dict[str, list[Person | None]] | None = None) -> int:
    """The most common number of tokens after the name (the smaller on a tie) in the training lines whose
    completion opens with it (name-last lines): the open masks an MDM gets after an answer that does not end its
    line (0 when there is no such line). In the release it is 1: the closing full stop.

    Without them an MDM is told that the text ends right after the name, where every training line it saw ends
    with punctuation; it then writes the punctuation into the name's last slot. (Read on the held-out split of an
    exploratory token-masked MDM at step 3700: name answers 0.03 with no open mask, 0.82 with one, 0.67 with the
    median count, 4; the most common count was adopted.) An ARM is free to go on anyway. ``persons``: the persons
    of ``trained``'s training lines (:func:`training_persons`), computed when not given."""
    persons = training_persons(trained, names) if persons is None else persons
    after: Counter[int] = Counter()
    for file in TRAIN_FILES:
        for ex, person in zip(trained[file], persons[file]):
            if not person.name_first and ex.completion.strip().startswith(person.name):
                n_completion = len(tok(ex.completion, add_special_tokens=False)["input_ids"])
                after[n_completion - len(tok(" " + person.name, add_special_tokens=False)["input_ids"])] += 1
    return min(after, key=lambda k: (-after[k], k)) if after else 0


def score_file(lm, examples: list[Example], file: str, names: list[str] | None = None,
               with_rank: bool = True, open_after: int = 0, with_logp: bool = True,
               persons: list[Person | None] | None = None) -> pd.DataFrame:
    """One row per example: correct (rule above), gold logp, OOV flag, and with ``with_rank`` the person, the gold
    rank among the file's distinct completions and a foil's log-probability (:func:`foil_indices`). An MDM is
    scored as :class:`WritesWords`, with ``open_after`` open masks after every answer that does not end its line
    (column ``open_after``). ``with_logp=False``: the gold logp is NaN, its passes skipped. ``persons``: the
    persons of ``examples`` (``line_persons(examples, names, file, training=False)``), computed when not given."""
    qs = queries(examples, file)
    after = [0 if not lm.family.masked or ends_line(q.answer) else open_after for q in qs]
    candidates = sorted({q.answer for q in qs})
    parts = []
    for n_after in sorted(set(after)):
        rows = [i for i, a in enumerate(after) if a == n_after]
        scorer = WritesWords(lm.lm if isinstance(lm, WritesWords) else lm, n_after) if lm.family.masked else lm
        part = pd.DataFrame(answer_scores(scorer, [qs[i] for i in rows], rule="startswith", with_logp=with_logp),
                            index=rows)
        if with_rank:
            part["grid"] = list(candidate_logprobs(scorer, [qs[i].prefix for i in rows], candidates))
        parts.append(part.assign(open_after=n_after))
    table = pd.concat(parts).sort_index()
    tok = lm.tokenizer
    table["correct"] = [is_correct_text(tok, p, q.answer) for p, q in zip(table.predicted, qs)]
    table["gold_has_unk"] = [tok.unk_token_id in tok(q.answer, add_special_tokens=False)["input_ids"] for q in qs]
    if with_rank:
        if persons is None:
            persons = line_persons(examples, names or [], file, training=False)
        grid = torch.stack(table.pop("grid").tolist())
        gold = torch.tensor([candidates.index(q.answer) for q in qs])
        foil = torch.tensor(foil_indices([q.answer for q in qs], persons, file))
        rows = torch.arange(len(qs))
        table["rank"] = rank_of(grid, gold).numpy()
        table["person"] = [p.name if p is not None else q.answer for p, q in zip(persons, qs)]
        table["foil"] = [candidates[k] for k in foil.tolist()]
        table["foil_logp"] = grid[rows, foil].numpy()
        table["gold_minus_foil"] = (grid[rows, gold] - grid[rows, foil]).numpy()
    table["file"] = file
    return table.reset_index(drop=True)


def gold_ranks(lm, qs: list[Query]) -> Float[Tensor, " n"]:
    """Rank of each query's gold answer among the distinct answers of ``qs`` by log-probability (ties averaged)."""
    candidates = sorted({q.answer for q in qs})
    logp = candidate_logprobs(lm, [q.prefix for q in qs], candidates)
    return rank_of(logp, torch.tensor([candidates.index(q.answer) for q in qs]))


# ---- training ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HarnessConfig:
    """Model shape and objective switches (``pair``, shared by both models; ``pair.masking``: ``"token"`` or
    ``"entity"``, the completion masked as one span), the seeds, the stopping rule and which models to train
    (``models``: both, or the MDM alone, e.g. for another masking whose ARM, which no masking touches, is already
    trained; the budgets at the other model's step count need both)."""

    pair: PairConfig = PairConfig(steps=0)  # d_model, n_layers, ..., lr, batch_size, mask_eps, masking; seed unused
    seeds: tuple[int, ...] = (0,)
    max_steps: int = 40000
    min_steps: int = 2000  # no stop before this step (or max_steps), however flat the held-out accuracy
    eval_every: int = 250
    patience: int = 4  # evaluations without a better held-out accuracy that make a plateau
    lr_decays: int = 1  # on a plateau, divide the learning rate by lr_decay this many times before stopping
    lr_decay: float = 10.0
    warmup: int = 100
    held_out_fraction: float = HELD_OUT_FRACTION
    models: tuple[str, ...] = ("llada", "llama")

    def __post_init__(self) -> None:
        models = tuple(self.models)
        if models not in (("llada", "llama"), ("llada",), ("llama",)):
            raise ValueError(f"models must be ('llada', 'llama'), ('llada',) or ('llama',), got {self.models!r}")
        object.__setattr__(self, "models", models)
        seeds = tuple(self.seeds)
        if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) and s >= 0 for s in seeds):
            raise ValueError(f"seeds must be distinct integers >= 0, at least one, got {self.seeds!r}")
        object.__setattr__(self, "seeds", seeds)
        if not (isinstance(self.lr_decays, int) and self.lr_decays >= 0 and self.lr_decay > 1):
            raise ValueError(f"lr_decays must be an integer >= 0 and lr_decay > 1, got {self.lr_decays!r}, "
                             f"{self.lr_decay!r}")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction!r}")


def _wrap(model: torch.nn.Module, family: str, folder: Path, tok):
    from revlens.lm import HookedLM

    save_model(model, folder, tok)
    return HookedLM.from_pretrained(folder, family=family)


def held_out_accuracy(lm, validation: list[Example], open_after: int = 0) -> float:
    """Share of the held-out training paraphrases answered under the scoring rule: the stopping signal."""
    return float(score_file(lm, validation, HELD_OUT, with_rank=False, open_after=open_after,
                            with_logp=False).correct.mean())


class Training(NamedTuple):
    """A model in training: its optimiser, the step reached, the history, the learning rate's scale and the wall
    seconds this training took (summed over the runs of a resumed one)."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    step: int
    history: list[dict]
    lr_scale: float
    seconds: float = 0.0


def train_until_flat(family: str, buckets: list[Bucket], validation: list[Example], tok, hc: HarnessConfig,
                     folder: Path, pc: PairConfig | None = None, start: Training | None = None,
                     stop_at: int | None = None, snapshot: tuple[int, Path] | None = None, open_after: int = 0,
                     state: Path | None = None) -> Training:
    """Train one model until its held-out trained-direction accuracy has reached a plateau ``lr_decays + 1``
    times (and at least ``min_steps``), or to ``stop_at``; the model as it ends is saved in ``folder``.

    A plateau is ``patience`` evaluations without a better held-out accuracy than the best so far. The learning
    rate rises linearly over the warm-up and is then constant; at each of the first ``lr_decays`` plateaus it is
    divided by ``lr_decay`` and the count restarts (at a constant rate of 2e-3 the held-out accuracy of a
    memorising token-masked MDM jumped by up to a quarter between evaluations). Continued from ``start`` to ``stop_at`` (the other model's budget),
    a model keeps the rate it ended with. ``snapshot=(step, path)`` also saves the model as it is at that step.
    ``pc`` defaults to ``hc.pair``; ``open_after``: see :func:`score_file`. History rows: step, loss, held-out
    accuracy, learning rate, seconds (the snapshot's row marked).

    ``state``: a file where the whole training state is written at every evaluation
    (:func:`revlens.lm.trainer.save_training_state`). When it exists the training resumes from it, taking the same
    batches and reaching the same weights as if it had never stopped; a finished training is returned as it ended.
    """
    pc = pc or hc.pair
    objective = OBJECTIVE[family]
    if start is None:
        model = new_model(family, pc, tok, max_len=max(b.tokens.shape[1] for b in buckets) + 64)
        opt = torch.optim.AdamW(model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
        step, scale = 0, 1.0
    else:
        model, opt, step, scale = start.model, start.opt, start.step, start.lr_scale
    gen = torch.Generator().manual_seed(pc.seed + step)
    sizes = torch.tensor([len(b.tokens) for b in buckets], dtype=torch.float)
    limit = stop_at if stop_at is not None else hc.max_steps
    history: list[dict] = []
    best, since_best, decays_left, spent = -1.0, 0, hc.lr_decays, 0.0
    desc = f"train {family} ({objective}, seed {pc.seed})"
    if state is not None and Path(state).is_file():
        saved = load_training_state(Path(state), model, opt, gen)
        step, history, scale, spent = saved["step"], saved["history"], saved["lr_scale"], saved["seconds"]
        best, since_best, decays_left = saved["best"], saved["since_best"], saved["decays_left"]
        if saved["done"]:
            model.eval()
            return Training(model, opt, step, history, scale, spent)
        print(f"{desc}: resuming at step {step} from {state}", file=sys.stderr)
    began = time.time() - spent
    bar = tqdm(total=limit, initial=step, desc=desc, mininterval=5)
    while step < limit:
        lr = pc.lr * scale * min(1.0, (step + 1) / hc.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        loss = optimizer_step(model, objective, buckets, sizes, tok.mask_token_id, pc, gen, opt)
        step += 1
        check_loss(loss, step, pc, desc)
        bar.update(1)
        if snapshot is not None and step == snapshot[0]:
            model.eval()
            history.append({"step": step, "loss": loss, "held-out accuracy":
                            held_out_accuracy(_wrap(model, family, snapshot[1], tok), validation, open_after),
                            "lr": lr, "seconds": round(time.time() - began, 1), "snapshot": True})
        if step % hc.eval_every == 0 or step == limit:
            model.eval()
            accuracy = held_out_accuracy(_wrap(model, family, folder, tok), validation, open_after)
            history.append({"step": step, "loss": loss, "held-out accuracy": accuracy, "lr": lr,
                            "seconds": round(time.time() - began, 1)})
            bar.set_postfix(held_out=f"{accuracy:.3f}", lr=f"{lr:.0e}")
            done = step == limit
            if stop_at is None:
                best, since_best = (accuracy, 0) if accuracy > best else (best, since_best + 1)
                if since_best >= hc.patience and step >= hc.min_steps:
                    if decays_left:
                        decays_left, since_best, scale = decays_left - 1, 0, scale / hc.lr_decay
                    else:
                        done = True
            if state is not None:
                save_training_state(Path(state), model, opt, gen, step=step, history=history, lr_scale=scale,
                                    seconds=time.time() - began, best=best, since_best=since_best,
                                    decays_left=decays_left, done=done)
            if done:
                break
    bar.close()
    model.eval()
    return Training(model, opt, step, history, scale, time.time() - began)


def _entry(step: int, seconds: float | None, history: list[dict]) -> dict:
    """A model's training record: its budget (steps, wall seconds), history, final held-out accuracy, convergence."""
    final = history[-1]["held-out accuracy"] if history else float("nan")
    return {"steps": step, "seconds": None if seconds is None else round(seconds, 1), "held-out accuracy": final,
            "converged": bool(final >= CONVERGED_ACCURACY), "history": history}


def train_seed(buckets: list[Bucket], validation: list[Example], tok, hc: HarnessConfig, seed: int, out: Path,
               open_after: int = 0) -> dict[str, dict]:
    """Both models of one seed, each to its own plateau, and each also at the other's step count: the one that
    stopped first is trained on to the other's step, the one that went on is saved when it passed it. Folders under
    ``out``: ``llada``, ``llama`` and ``llama_at_mdm_budget`` or ``llada_at_arm_budget`` (none when equal). With one
    model in ``hc.models``, that model alone to its plateau.

    Resumable: each training keeps its state in ``out/.resume`` (see :func:`train_until_flat`), so a killed seed
    goes on from its last evaluation when called again; a finished seed writes its record to ``out/training.json``
    (and drops the states), which a later call returns without training."""
    finished, states = out / "training.json", out / ".resume"
    if finished.is_file():
        return load_json(finished)
    pc = replace(hc.pair, seed=seed)
    if len(hc.models) == 1:
        family = hc.models[0]
        alone = train_until_flat(family, buckets, validation, tok, hc, out / family, pc, open_after=open_after,
                                 state=states / f"{family}.pt")
        record = {family: _entry(alone.step, alone.seconds, alone.history)}
    else:
        record = _train_both(buckets, validation, tok, hc, pc, out, open_after)
    write_json_atomic(finished, record)
    shutil.rmtree(states, ignore_errors=True)
    return record


def _train_both(buckets: list[Bucket], validation: list[Example], tok, hc: HarnessConfig, pc: PairConfig, out: Path,
                open_after: int) -> dict[str, dict]:
    """The MDM and the ARM of one seed at both budgets (see :func:`train_seed`)."""
    states = out / ".resume"
    mdm = train_until_flat("llada", buckets, validation, tok, hc, out / "llada", pc, open_after=open_after,
                           state=states / "llada.pt")
    record = {"llada": _entry(mdm.step, mdm.seconds, mdm.history)}
    arm = train_until_flat("llama", buckets, validation, tok, hc, out / "llama", pc,
                           snapshot=(mdm.step, out / "llama_at_mdm_budget"), open_after=open_after,
                           state=states / "llama.pt")
    record["llama"] = _entry(arm.step, arm.seconds, [h for h in arm.history if not h.get("snapshot")])
    snap = [h for h in arm.history if h.get("snapshot")]
    if snap and arm.step > mdm.step:  # the ARM went past the MDM's step count: its state there is the ARM at that budget
        record["llama_at_mdm_budget"] = _entry(mdm.step, snap[0]["seconds"], snap)
    elif snap:  # the ARM stopped at the MDM's step count: the snapshot is the ARM itself
        shutil.rmtree(out / "llama_at_mdm_budget", ignore_errors=True)
    for short, long_, name, at in (("llama", "llada", "llama_at_mdm_budget", arm), ("llada", "llama", "llada_at_arm_budget", mdm)):
        if record[short]["steps"] < record[long_]["steps"]:
            more = train_until_flat(short, buckets, validation, tok, hc, out / name, pc, start=at,
                                    stop_at=record[long_]["steps"], open_after=open_after, state=states / f"{name}.pt")
            record[name] = _entry(more.step, record[short]["seconds"] + more.seconds, more.history)
    return record


# ---- the run folder -----------------------------------------------------------------------------------------------

def run_text_reversal(data_dir: str | Path, out_dir: str | Path, hc: HarnessConfig = HarnessConfig(),
                      overwrite: bool = False) -> pd.DataFrame:
    """Train the MDM and the ARM at every seed on ``data_dir`` and score every test file; writes ``out_dir``:

    ``results.csv`` (tidy: file x model x seed x metric, with the 95% half-width, the model's steps and whether it
    converged; rows with seed "mean" average the seeds), ``scores.jsonl`` (one row per example, model and seed),
    ``training.json`` (configuration, held-out split, budgets, histories, the data's SHA-256, the train/test
    overlap) and the checkpoints ``seed<k>/{llada,llama}/`` plus the one trained on to the other's budget.

    The run is built in ``.<out_dir's name>.partial`` beside ``out_dir`` and swapped in whole when it is finished,
    so a kill leaves the previous folder untouched, and the same call again resumes the killed run from its last
    evaluation (:func:`train_seed`), with the same result as a run never stopped; a partial run of another
    configuration, dataset, scoring rule or library source is refused, naming what differs. Into an existing
    folder: a finished run of the same configuration and data is returned as it is (nothing retrains); another run,
    or a folder this harness did not write, is refused before anything trains. ``overwrite`` replaces the whole
    folder and discards any partial run.
    """
    out, data_dir = Path(out_dir), Path(data_dir)
    layout = read_layout(data_dir)
    record: dict = {"config": json.loads(json.dumps(asdict(hc))), "data": data_fingerprint(data_dir),
                    "scoring": SCORING}
    finished = finished_text_run(out, record, overwrite)
    if finished is not None:
        return finished
    staging = partial_text_run(out, record | {"source": harness_source()}, overwrite)
    names = person_names(layout)
    persons = training_persons(layout, names)
    held = held_out_split(layout, names, hc.held_out_fraction, persons=persons)
    trained, validation, _ = split_layout(layout, names, held, persons=persons)
    tok = layout_tokenizer(trained)
    buckets = training_buckets(trained, tok)
    open_after = continuation_length(trained, names, tok,
                                     persons={file: _without(persons[file], held[file]) for file in TRAIN_FILES})
    record |= {"open_after": open_after, "vocab_size": len(tok), "n_train_sequences": int(sum(len(b.tokens) for b in buckets)),
               "held_out_lines": held, "n_held_out": len(validation), "converged_accuracy": CONVERGED_ACCURACY,
               "train_test_overlap": train_test_overlap(trained, tok), "models": {}}
    with folder_swap(out, staging=staging) as tmp:
        results = _train_and_score(layout | {HELD_OUT: validation}, names, tok, buckets, hc, tmp, record)
        (tmp / PARTIAL_RECORD).unlink()
    return results


PARTIAL_RECORD = "partial.json"
"""The identity of a partial run (configuration, dataset, scoring rule, library source), in its staging folder."""


def harness_source() -> str:
    """Fingerprint of the whole ``revlens`` source: a killed run is resumed only by the code that began it."""
    from revlens.provenance import source_fingerprint

    return source_fingerprint(Path(__file__).parents[1])


def partial_text_run(out: Path, identity: dict, overwrite: bool) -> Path:
    """The staging folder of a run into ``out``, ready to build in: a killed run's, to resume, when it was begun
    with ``identity``; a new one otherwise (a killed run of another identity is refused unless ``overwrite``,
    which discards any partial run)."""
    staging = out.parent / f".{out.name}.partial"
    found = staging / PARTIAL_RECORD
    if staging.exists() and overwrite:
        shutil.rmtree(staging)
    elif found.is_file():
        begun = load_json(found)
        differing = _differing(begun if isinstance(begun, dict) else {}, identity)
        if differing:
            raise ValueError(f"{staging} holds an interrupted run of another {' and '.join(differing)}; rerun it "
                             "with what began it to resume, or pass --overwrite to discard it")
        print(f"resuming the interrupted run in {staging}", file=sys.stderr)
    elif staging.exists() and any(staging.iterdir()):
        raise ValueError(f"{staging} exists and is not a partial text-reversal run; remove it, or pass --overwrite")
    staging.mkdir(parents=True, exist_ok=True)
    write_json_atomic(found, identity)
    return staging


RUN_IDENTITY: tuple[tuple[str, str], ...] = (("config", "configuration"), ("data", "dataset"),
                                             ("scoring", "scoring rule"), ("source", "revlens source"))
"""What makes a run the same run (record key, its name in messages); a finished run is matched on the first three."""


def _differing(found: dict, expected: dict, keys: tuple[tuple[str, str], ...] = RUN_IDENTITY) -> list[str]:
    """The names of the identity ``keys`` whose value in ``found`` is not the one ``expected`` holds."""
    return [what for key, what in keys if found.get(key) != expected[key]]


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
    differing = _differing(found, record, RUN_IDENTITY[:3])
    if differing:
        raise ValueError(f"{out} holds a text-reversal run of another {' and '.join(differing)}; choose a new --out, "
                         "or pass --overwrite to replace it")
    return pd.read_csv(out / "results.csv", dtype={"seed": str})


MODEL_FOLDERS = {"llada": MDM_LABEL, "llama": ARM_LABEL, "llama_at_mdm_budget": ARM_AT_MDM,
                 "llada_at_arm_budget": MDM_AT_ARM}
"""Checkpoint folder of a seed -> model label in the tables."""


def _train_and_score(layout: dict[str, list[Example]], names: list[str], tok, buckets: list[Bucket],
                     hc: HarnessConfig, out: Path, record: dict) -> pd.DataFrame:
    """Train every seed's models into ``out``, score every test file and write the tables (see
    :func:`run_text_reversal`); ``layout[HELD_OUT]`` is the stopping split."""
    models = []
    for seed in hc.seeds:
        trained = train_seed(buckets, layout[HELD_OUT], tok, hc, seed, out / f"seed{seed}", record["open_after"])
        record["models"][f"seed{seed}"] = trained
        models += [ScoredModel(MODEL_FOLDERS[name], seed, name.split("_")[0], out / f"seed{seed}" / name,
                               entry["steps"], entry["converged"]) for name, entry in trained.items()]
    scores = evaluate_models(models, layout, names, record["open_after"])
    write_text_atomic(out / "scores.jsonl", scores.to_json(orient="records", lines=True))
    results = summarise(scores, record["train_test_overlap"])
    write_text_atomic(out / "results.csv", results.to_csv(index=False))
    write_json_atomic(out / "training.json", record)
    return results


@dataclass(frozen=True)
class ScoredModel:
    label: str
    seed: int
    family: str
    folder: Path
    steps: int
    converged: bool


def evaluate_models(models: list[ScoredModel], layout: dict[str, list[Example]], names: list[str],
                    open_after: int = 0) -> pd.DataFrame:
    """Every test file (and the held-out split, without ranks) scored by every model: one row per example and model
    (``open_after``: see :func:`score_file`)."""
    from revlens.lm import HookedLM

    persons = {name: line_persons(layout[name], names or [], name, training=False) for name in TEST_FILES}
    files = TEST_FILES + ((HELD_OUT,) if HELD_OUT in layout else ())
    tables = []
    with tqdm(total=len(models) * sum(len(layout[name]) for name in files), desc="score", unit="prompt",
              mininterval=5) as bar:
        for m in models:
            lm = HookedLM.from_pretrained(m.folder, family=m.family)
            labels = {"model": m.label, "seed": m.seed, "steps": m.steps, "converged": m.converged}
            for name in files:
                bar.set_postfix_str(f"{m.label} seed {m.seed}, {name}")
                tables.append(score_file(lm, layout[name], name, names, with_rank=name != HELD_OUT,
                                         open_after=open_after, persons=persons.get(name)).assign(**labels))
                bar.update(len(layout[name]))
    return pd.concat(tables, ignore_index=True)


_PER_PROMPT = {"accuracy": "correct", "mean gold logp": "logp", "mean gold rank": "rank",
               "gold - foil (nats)": "gold_minus_foil", "gold beats foil": "gold_beats_foil"}


def summarise(scores: pd.DataFrame, overlap: dict[str, int] | None = None) -> pd.DataFrame:
    """Tidy table: file x model x seed x metric with ``half_width`` (95%), ``steps`` and ``converged``.

    Per-prompt metrics (accuracy, mean gold logp, mean gold rank, gold - foil in nats, share of prompts where gold
    beats foil) are means over persons, each person's prompts averaged first, the interval over persons; counts
    (candidates, gold with unknown words, n and, with ``overlap`` (:func:`train_test_overlap`), the file's lines also
    in training) have none. With several seeds, rows with seed "mean" average the seeds' values, interval over
    seeds (steps: the mean; converged: every seed's model converged)."""
    scores = scores.copy()
    if "foil_logp" in scores:
        scores["gold_beats_foil"] = (scores.gold_minus_foil > 0).where(scores.gold_minus_foil.notna())
    if "person" not in scores:
        scores["person"] = scores.gold
    scores["person"] = scores.person.fillna(scores.gold)
    rows = []
    for (file, model, seed), group in scores.groupby(["file", "model", "seed"], sort=False):
        labels = {"file": file, "model": model, "seed": str(seed), "steps": float(group.steps.iloc[0]),
                  "converged": bool(group.converged.iloc[0])}
        for metric, column in _PER_PROMPT.items():
            if column in group and group[column].notna().any():
                mean, half = mean_ci(group.groupby("person")[column].mean().astype(float))
                rows.append(labels | {"metric": metric, "value": mean, "half_width": half})
        counts = {"candidates": group.gold.nunique(), "gold with unknown words": int(group.gold_has_unk.sum()),
                  "n": len(group)}
        if overlap is not None and file in overlap:
            counts["lines also in training"] = overlap[file]
        rows += [labels | {"metric": k, "value": float(v), "half_width": float("nan")} for k, v in counts.items()]
    table = pd.DataFrame(rows)
    if table.seed.nunique() > 1:
        table = pd.concat([table, seed_means(table, ["file", "model", "metric"])], ignore_index=True)
    return table[["file", "model", "seed", "metric", "value", "half_width", "steps", "converged"]]


def seed_means(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Rows with seed "mean": per group of ``by`` (which must include "metric"), the mean of the seeds' values with
    the 95% half-width over seeds (none for counts), the mean steps, converged when every seed's model converged."""
    means = []
    for key, group in table.groupby(by, sort=False):
        mean, half = mean_ci(group.value)
        labels = dict(zip(by, key))
        means.append(labels | {"seed": "mean", "steps": group.steps.mean(), "converged": bool(group.converged.all()),
                               "value": mean, "half_width": half if labels["metric"] in _PER_PROMPT else float("nan")})
    return pd.DataFrame(means)


def not_converged(results: pd.DataFrame) -> list[str]:
    """"<model>, seed <k> (held-out accuracy a < threshold)" for every model of ``results`` that did not converge."""
    rows = results[(results.file == HELD_OUT) & (results.metric == "accuracy") & (results.seed.astype(str) != "mean")]
    return [f"{r.model}, seed {r.seed} (held-out accuracy {r.value:.3f} < {CONVERGED_ACCURACY})"
            for r in rows.itertuples() if not _truthy(r.converged)]


def _truthy(value) -> bool:
    return value is True or str(value).lower() == "true"
