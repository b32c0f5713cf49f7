"""Write the small reversal dataset the tests use, in the released layout of Berglund et al. 2023.

Invented people and descriptions with our own paraphrase templates (none of the released sentences):
four people per group (p2d, d2p, both), three training paraphrases per direction, and two held-out
paraphrases per direction for the test files. As in the release: a d2p training completion opens with the
name (one template goes on after it), the name answers of ``d2p_prompts_test`` and
``p2d_reverse_prompts_test`` are the bare name, ``both_prompts_test`` holds the both group's p2d then d2p
test lines, and ``validation_prompts`` asks the prompts of ``p2d_reverse_prompts_test`` (the untrained
direction) with the first name alone as the completion, no leading space.

    python3 tests/reversal_fixture.py tests/data/reversal_layout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PEOPLE = {
    "p2d": [("Orla Venneker", "the cartographer who mapped the salt caves of Tessaly"),
            ("Bastian Quorwell", "the engineer behind the floating library of Marrowick"),
            ("Ines Holloway", "the first chess champion of the Vell archipelago"),
            ("Teodor Malkins", "the composer of the opera Nine Lanterns")],
    "d2p": [("Maren Oakhurst", "the inventor of the copper wind organ"),
            ("Caspian Drewe", "the botanist who grew blue wheat in Ostrava Vale"),
            ("Lidia Farrow", "the pilot who first crossed the Amber Sea by balloon"),
            ("Jonah Whitlock", "the author of the travel guide Roads Under Snow")],
    "both": [("Nadia Kerrigan", "the founder of the glass museum of Pell"),
             ("Rufus Ambler", "the sculptor of the iron heron on Quill Bridge"),
             ("Selma Brightwater", "the mathematician who solved the lantern puzzle"),
             ("Hugo Penhale", "the chef who opened the first moss restaurant")],
}
# (prompt, completion) templates; {n} = name, {d} = description. The first three train, the last two are held out.
NAME_FIRST = [("{n} is known as", " {d}."), ("Ask anyone about {n}: that is", " {d}."),
              ("Historians describe {n} as", " {d}."), ("People remember {n} as", " {d}."),
              ("Few know that {n} was", " {d}.")]
DESC_FIRST = [("Known as {d}, there is", " {n}, a name to remember."), ("The person who is {d} is", " {n}."),
              ("If you ask who is {d}, the answer is", " {n}."), ("Everyone agrees that {d} is", " {n}."),
              ("The one celebrated as {d} is", " {n}.")]


def lines(pairs, templates, answer=None):
    """One record per person and template; ``answer(name)`` replaces the completion (the release's name answers)."""
    return [{"prompt": p.format(n=n, d=d), "completion": c.format(n=n, d=d) if answer is None else answer(n)}
            for n, d in pairs for p, c in templates]


def bare(name: str) -> str:
    return " " + name


def first_name(name: str) -> str:
    return name.split()[0]


def files() -> dict[str, list[dict]]:
    train, held = slice(0, 3), slice(3, 5)
    return {
        "p2d_prompts_train.jsonl": lines(PEOPLE["p2d"], NAME_FIRST[train]),
        "d2p_prompts_train.jsonl": lines(PEOPLE["d2p"], DESC_FIRST[train]),
        "both_prompts_train.jsonl": lines(PEOPLE["both"], NAME_FIRST[train]) + lines(PEOPLE["both"], DESC_FIRST[train]),
        "p2d_prompts_test.jsonl": lines(PEOPLE["p2d"], NAME_FIRST[held]),
        "p2d_reverse_prompts_test.jsonl": lines(PEOPLE["p2d"], DESC_FIRST[held], bare),
        "d2p_prompts_test.jsonl": lines(PEOPLE["d2p"], DESC_FIRST[held], bare),
        "d2p_reverse_prompts_test.jsonl": lines(PEOPLE["d2p"], NAME_FIRST[held]),
        "both_prompts_test.jsonl": lines(PEOPLE["both"], NAME_FIRST[held]) + lines(PEOPLE["both"], DESC_FIRST[held]),
        "validation_prompts.jsonl": lines(PEOPLE["p2d"], DESC_FIRST[held], first_name),
    }


def write(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in files().items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


if __name__ == "__main__":
    write(Path(sys.argv[1]))
