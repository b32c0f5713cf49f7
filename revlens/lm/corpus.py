"""A synthetic corpus for training small LLaDA-architecture MDMs and matched ARMs on CPU.

Facts pair a person (two words: first and last name) with a book they wrote or a company they
founded (two words each), stated through templated sentences. As in the toy world, most facts
(``forward_only``) are seen only in forward sentences ("A wrote B"); ``control`` facts are also
seen in reverse sentences ("B was written by A"), which teaches the reverse templates themselves.
The reversal-curse question is whether a model answers the reverse query of forward-only facts.

The tokenizer is word level (every word one token, BOS ``<s>`` prepended), saved as a standard
``tokenizer.json`` that transformers loads; entities are therefore exactly two tokens long.
"""

from __future__ import annotations

import random

from revlens.config import check_choice
from revlens.facts import Fact, FactSet, Relation

FIRST = ("ada alan boris clara dmitri elena felix greta hugo irene jonas karla lukas mira nils olga "
         "pavel rosa sven tanja ugo vera wim yara").split()
LAST = ("abbot brandt castell dorn ekman falk gruber holm ivers jansen kessler lind moreau nagel "
        "olsen petrov quist roth sauer thorne ulrich varga weber zeller").split()
BOOK_ADJ = ("silent golden hidden broken distant frozen burning hollow quiet scarlet endless "
            "bitter crimson wandering fallen").split()
BOOK_NOUN = ("river garden mirror harbor forest tower winter lantern island orchard shadow compass "
             "meadow voyage empire").split()
FIRM_HEAD = ("apex birch cobalt delta ember falcon granite harbor indigo juniper kestrel lumen "
             "marble nova onyx").split()
FIRM_TAIL = "labs works systems dynamics industries group partners foundry motors studios".split()
SPECIAL = ("<pad>", "<s>", "</s>", "<mask>")
TEMPLATE_WORDS = "wrote is the author of was written by founded founder . a book company".split()

REWORDED = {
    "wrote": Relation("wrote", forward="{a} wrote {b} .", reverse="{b} was written by {a} ."),
    "wrote_author": Relation("wrote_author", forward="{a} is the author of {b} .", reverse="the author of {b} is {a} ."),
    "founded": Relation("founded", forward="{a} founded {b} .", reverse="{b} was founded by {a} ."),
    "founded_founder": Relation("founded_founder", forward="{a} is the founder of {b} .",
                                reverse="the founder of {b} is {a} ."),
}
# The same facts with reverse templates that keep the forward sentence's words ("B wrote A", as the toy's
# "B r A" keeps its relation token): separates the reworded template from the word order itself.
SAME_WORDS = {name: Relation(name, forward=r.forward, reverse=r.forward.replace("{a}", "{x}").replace("{b}", "{a}")
                             .replace("{x}", "{b}"))
              for name, r in REWORDED.items()}
WORDINGS = {"reworded": REWORDED, "same_words": SAME_WORDS}
# each fact is stated through both templates of its kind
KINDS = {"wrote": ("wrote", "wrote_author"), "founded": ("founded", "founded_founder")}


def make_world(n_facts: int = 240, control_fraction: float = 0.25, seed: int = 0,
               wording: str = "reworded") -> FactSet:
    """``n_facts`` person -> book/company facts, half of each kind; a seeded fraction are control facts.

    ``wording`` picks the reverse templates: ``reworded`` ("B was written by A") or ``same_words``
    ("B wrote A"); the facts, split and forward sentences do not depend on it.
    """
    check_choice("wording", wording, tuple(WORDINGS))
    rng = random.Random(seed)
    people = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], n_facts)
    books = rng.sample([f"{a} {n}" for a in BOOK_ADJ for n in BOOK_NOUN], n_facts // 2)
    firms = rng.sample([f"{h} {t}" for h in FIRM_HEAD for t in FIRM_TAIL], n_facts - n_facts // 2)
    objects = [("wrote", b) for b in books] + [("founded", f) for f in firms]
    n_control = round(control_fraction * n_facts)
    facts = []
    for k, (person, (kind, obj)) in enumerate(zip(people, objects)):
        split = "control" if rng.random() < n_control / n_facts else "forward_only"
        for relation in KINDS[kind]:
            facts.append(Fact(relation, person, obj, split))
    return FactSet(dict(WORDINGS[wording]), facts,
                   description=f"synthetic person->book/company world, seed {seed}, {wording} reverse templates")


def training_statements(world: FactSet) -> list[tuple[int, str]]:
    """(fact, template) of every training sentence: forward for every fact, reverse for control facts only."""
    return [(i, "forward") for i in range(len(world.facts))] + [(i, "reverse") for i in world.subset(split="control")]


def training_sentences(world: FactSet) -> list[str]:
    """Forward sentences of every fact; reverse sentences of control facts only."""
    return [world.sentence(i, template) for i, template in training_statements(world)]


def entity_units(ids: list[int], entities: list[list[int]]) -> list[int]:
    """Span id per token for whole-entity masking: the tokens of each occurrence of an entity (given as
    token ids) share the id of their first position; every other token is its own span."""
    units = list(range(len(ids)))
    for entity in entities:
        for start in range(len(ids) - len(entity) + 1):
            if ids[start : start + len(entity)] == entity:
                units[start : start + len(entity)] = [start] * len(entity)
    return units


def vocabulary() -> list[str]:
    words = FIRST + LAST + BOOK_ADJ + BOOK_NOUN + FIRM_HEAD + FIRM_TAIL + TEMPLATE_WORDS
    return list(SPECIAL) + sorted(set(words))


def build_tokenizer():
    """Word-level fast tokenizer over :func:`vocabulary`, BOS prepended, words joined by spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", mask_token="<mask>")

