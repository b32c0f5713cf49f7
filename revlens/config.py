"""Model configuration for the hooked toy encoder, and the checks every module applies to its inputs.

One dataclass describes every architecture the notebooks compare, so an ablation is a changed
field rather than a copied class. The field names ``n_layers``, ``n_heads``,
``n_key_value_heads`` and ``device`` are the ones ``transformer_lens.patching`` reads.

The ``check_*`` functions (options, numbers, seeds, file names, token ids) are shared by the toy
library and :mod:`revlens.lm`; this module imports no other revlens module and not torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from jaxtyping import Int
    from torch import Tensor

AttentionDir = Literal["bidirectional", "causal"]
Positional = Literal["rotary", "absolute", "alibi", "none"]

ATTENTION_DIRS: tuple[str, ...] = ("bidirectional", "causal")
POSITIONALS: tuple[str, ...] = ("rotary", "absolute", "alibi", "none")
UNTIEABLE_PROJECTIONS: tuple[str, ...] = ("q", "k", "v")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming the option, the bad value and the allowed values."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")


def load_json(path: str | Path) -> Any:
    """A JSON file's content; a file that is missing or not JSON is an error naming it (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a JSON file (not UTF-8 text: {err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None


def check_finite(name: str, value: Any, minimum: float | None = None, *, strict: bool = False) -> None:
    """Raise a ValueError unless ``value`` is a finite real number (``> minimum`` if strict, else ``>=``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


MAX_SEED = 2**63 - 1  # the largest seed torch.manual_seed and torch.Generator accept


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """Raise a ValueError unless ``value`` is an integer (not a bool) in ``[low, high]``."""
    if type(value) is not int or value < low or (high is not None and value > high):
        where = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be {where} (an integer)")


def check_token_ids(tokens: Int[Tensor, "batch pos"], d_vocab: int, hint: str = "") -> None:
    """Refuse token ids outside [0, d_vocab): an embedding lookup would fail obscurely or wrap silently."""
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= d_vocab):
        raise ValueError(f"token ids must lie in [0, {d_vocab}), got {int(tokens.min())}..{int(tokens.max())}{hint}")


def number_option(kind: type[int] | type[float], low: float | None = None, high: float | None = None, *,
                  strict: bool = False) -> Callable[[str], Any]:
    """An argparse ``type=`` for a numeric option: the text as ``kind``, finite and in range, else a clear error.

    The one place the command line checks the numbers it is given: ``nan``, ``inf``, ``1e999`` or a
    seed torch cannot take is refused while the arguments are read, before any work starts.
    ``low`` is inclusive (exclusive if ``strict``), ``high`` inclusive.
    """
    what = "an integer" if kind is int else "a finite number"
    if low is not None and high is not None and not strict:
        what += f" in [{low}, {high}]"
    else:
        what += "".join(f" {op} {bound}" for op, bound in ((">" if strict else ">=", low), ("<=", high)) if bound is not None)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            value = None
        ok = value is not None and math.isfinite(value) and (low is None or (value > low if strict else value >= low))
        if not ok or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def check_fields(cls: type, data: Any) -> dict[str, Any]:
    """``data`` if it is a mapping whose keys are all fields of the dataclass ``cls``; else an error naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} settings must be a JSON object of fields, got {data!r}")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(map(str, unknown))}")
    return data


def check_file_name(what: str, value: Any) -> str:
    """``value`` if it can name a file inside a folder (letters, digits, ``_``, ``-``, ``.``; no ``/`` or ``..``).

    Sweep and report names become file names: ``"../x"`` would write outside the folder meant for them.
    """
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value) or ".." in value:
        raise ValueError(f"{what} {value!r} must be a plain name (letters, digits, '_', '-', '.'; no '/' or '..'), "
                         "since it names files")
    return value


def check_seeds(value: Any) -> tuple[int, ...]:
    """A non-empty list of distinct non-negative integer seeds, as a tuple; a repeated seed would duplicate rows."""
    if not isinstance(value, list) or not value or not all(type(s) is int for s in value):
        raise ValueError(f"'seeds' must be a non-empty list of integers, got {value!r}")
    if not all(0 <= s <= MAX_SEED for s in value):
        raise ValueError(f"'seeds' must lie in [0, {MAX_SEED}] (torch's seed range), got {value}")
    if len(set(value)) != len(value):
        raise ValueError(f"'seeds' must be distinct, got {value}")
    return tuple(value)


@dataclass(frozen=True)
class EncoderConfig:
    """Shape and ablation switches of a :class:`revlens.model.ToyTransformer`.

    ``untied_positions`` names the projections (subset of ``q``, ``k``, ``v``) that get a separate
    weight matrix per position instead of one shared matrix; empty means the standard Transformer.
    ``tie_embeddings`` makes the unembedding the transpose of the embedding (one tensor).
    """

    d_vocab: int
    n_ctx: int = 3
    d_model: int = 64
    n_heads: int = 4
    d_head: int = 16
    n_layers: int = 1
    attention_dir: AttentionDir = "bidirectional"
    positional: Positional = "rotary"
    rotary_base: float = 10000.0
    attn_only: bool = True
    d_mlp: int = 256
    residual: bool = True
    tie_embeddings: bool = False
    untied_positions: tuple[str, ...] = ()
    device: str = "cpu"
    n_key_value_heads: int | None = field(default=None)

    def __post_init__(self) -> None:
        check_choice("attention_dir", self.attention_dir, ATTENTION_DIRS)
        check_choice("positional", self.positional, POSITIONALS)
        for name in ("d_vocab", "n_ctx", "d_model", "n_heads", "d_head", "n_layers", "d_mlp"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:  # not a bool, a float or a string either
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("attn_only", "residual", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a device name such as 'cpu', got {self.device!r}")
        if self.positional == "rotary" and self.d_head % 2:
            raise ValueError(f"rotary positions need an even d_head, got {self.d_head}")
        check_finite("rotary_base", self.rotary_base, 1, strict=True)
        if not isinstance(self.untied_positions, (tuple, list, set, frozenset)) or not all(
            isinstance(p, str) for p in self.untied_positions
        ):
            raise ValueError(f"untied_positions must be a list of projection names, got {self.untied_positions!r}")
        untied = tuple(sorted(set(self.untied_positions)))
        for proj in untied:
            check_choice("untied projection", proj, UNTIEABLE_PROJECTIONS)
        object.__setattr__(self, "untied_positions", untied)
        if self.n_key_value_heads not in (None, self.n_heads):
            raise ValueError("grouped-query attention is not supported by the toy encoder")

    def replace(self, **changes: Any) -> "EncoderConfig":
        """A copy with some fields changed (and re-validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["untied_positions"] = list(self.untied_positions)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderConfig":
        data = dict(check_fields(cls, data))
        untied = data.get("untied_positions", ())
        data["untied_positions"] = tuple(untied) if isinstance(untied, list) else untied  # JSON has lists only
        return cls(**data)
