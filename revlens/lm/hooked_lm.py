"""One hooked interface over LLaDA, Dream and matched ARMs (Qwen2 / LLaMA), built on TransformerLens.

Every family is wrapped by TransformerLens's own bridge adapter, so all of them expose the same
hook names (``blocks.{l}.hook_resid_pre``, ``blocks.{l}.attn.hook_attn_scores`` (pre-softmax),
``blocks.{l}.attn.hook_pattern``, ``blocks.{l}.attn.hook_z`` [batch, pos, head, d_head], ...) and
the same ``run_with_cache`` / ``run_with_hooks``. What differs by family is kept here:

* where the prediction for a masked slot is read (LLaDA: at the mask; Dream and ARMs: one
  position earlier), see :mod:`revlens.readout`;
* whether the model has a mask token at all (ARMs do not: they only complete text);
* for Dream, attention is routed through :mod:`revlens.lm.hf_attention` so its scores and pattern
  hooks are pre-softmax and editable, as for LLaDA.

Loading reads ``config.json`` + safetensors (single or sharded) from a local folder, or downloads
those files by hub name when a network is available. No third-party modeling code is downloaded
or run; ``trust_remote_code`` is passed only to the tokenizer loader, and only when asked for.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from revlens.atomic import write_json_atomic
from revlens.config import check_finite, check_token_ids, load_json
from revlens.hooks import check_hook_names
from revlens.lm.families import (
    Family,
    build_module,
    config_fields,
    detect_family,
    get_family,
    not_stored,
    rebuild_buffers,
    tie_if_needed,
)
from revlens.lm.hf_attention import install_hooked_attention, make_bidirectional
from revlens.readout import logits_at_masks, read_position
from revlens.weights import load_weights, read_safetensors_folder

HookFn = Callable[[Tensor, Any], Tensor | None]


CONFIG_RECORD = "revlens_config.json"
"""Written by revlens beside a config.json it saves: the configuration the weights were trained with. Fields the
weights cannot show (``rope_theta``, ``rms_norm_eps``, a head count whose product with the head size is unchanged)
are checked against it at load; folders revlens did not write have no such record and only the weight shapes are
checked against their config."""


def save_config(folder: Path, config: dict[str, Any]) -> None:
    """Write ``config.json`` and its :data:`CONFIG_RECORD` atomically."""
    write_json_atomic(folder / "config.json", config)
    write_json_atomic(folder / CONFIG_RECORD, {"config": config})


def _numbers(raw: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, float]]:
    """(dotted field name, value) of every float in a config, nested objects included (``rope_parameters``)."""
    for key, value in raw.items():
        if isinstance(value, float):
            yield prefix + key, value
        elif isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}.")


def check_config(path: Path, raw: dict[str, Any], family: Family) -> None:
    """Refuse a config.json whose structural fields have the wrong type, or any NaN or infinite number in it,
    naming the field; and, where revlens wrote the folder, one that differs from its :data:`CONFIG_RECORD`."""
    for key, value in _numbers(raw):
        if not math.isfinite(value):
            raise ValueError(f"{path}: field {key!r} is {value}; it must be a finite number")
    for key, kind in config_fields(family).items():
        value = raw.get(key)
        if value is None:
            continue
        try:
            if kind is int and (type(value) is not int or value < 1):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
            if kind is float:
                check_finite(key, value, 0, strict=True)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    record = path.parent / CONFIG_RECORD
    if record.exists():
        recorded = load_json(record)
        recorded = recorded.get("config") if isinstance(recorded, dict) else None
        if not isinstance(recorded, dict):
            raise ValueError(f"{record} lacks a 'config' object")
        differing = sorted(k for k in set(raw) | set(recorded) if raw.get(k) != recorded.get(k))
        if differing:
            raise ValueError(f"{path} differs from the configuration revlens saved these weights with ({record}) in "
                             f"{', '.join(differing)}; the same weights under another config give wrong logits: "
                             "restore those fields")


def _resolve(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name_or_path} is not a model folder (config.json + safetensors)")
    from huggingface_hub import snapshot_download

    try:  # weights, configs and tokenizer files only: never modeling code
        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # offline, unknown repo, ...
        raise FileNotFoundError(
            f"could not find {name_or_path!r} locally or download it ({type(err).__name__}); "
            "pass a local folder with config.json and safetensors"
        ) from err


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> Any:
    """The folder's tokenizer, without running remote code unless ``trust_remote_code``.

    A ``tokenizer.json`` declared as a plain fast tokenizer (LLaDA, our small pair) is loaded directly;
    otherwise transformers' AutoTokenizer decides. When the declared class is remote code (Dream's
    ``DreamTokenizer``, a Qwen2 BPE) and remote code is not allowed, the folder's ``tokenizer.json`` or
    its ``vocab.json`` + ``merges.txt`` (read by transformers' own ``Qwen2Tokenizer``) are used.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_path = folder / "tokenizer_config.json"
    declared = (load_json(config_path) or {}).get("tokenizer_class") if config_path.exists() else None
    has_json = (folder / "tokenizer.json").exists()
    if has_json and declared in (None, "PreTrainedTokenizerFast", "TokenizersBackend"):
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (ValueError, OSError):
        if trust_remote_code:
            raise
        if has_json:
            return PreTrainedTokenizerFast.from_pretrained(str(folder))
        if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():  # Dream: a Qwen2 BPE
            from transformers import Qwen2Tokenizer

            return Qwen2Tokenizer.from_pretrained(str(folder))
        raise


class HookedLM:
    """A TransformerLens bridge over one model, with the family's readout and mask conventions."""

    def __init__(self, bridge: Any, family: Family, tokenizer: Any = None, mask_token_id: int | None = None,
                 source: str = "module") -> None:
        if family.masked and mask_token_id is None:
            raise ValueError(f"a {family.name} model needs a mask_token_id (set it in config.json)")
        if family.masked and (type(mask_token_id) is not int or not 0 <= mask_token_id < bridge.cfg.d_vocab):
            raise ValueError(f"mask_token_id {mask_token_id!r} of {source} is outside the model's vocabulary "
                             f"(ids 0..{bridge.cfg.d_vocab - 1})")
        self.bridge = bridge
        self.family = family
        self.tokenizer = tokenizer
        self.mask_token_id = mask_token_id if family.masked else None
        self.source = source
        self.raw_config: dict[str, Any] | None = None  # config.json, when loaded from a folder
        self.bridge.eval()
        if tokenizer is not None and len(tokenizer) > self.cfg.d_vocab:
            raise ValueError(f"mismatched tokenizer: it has {len(tokenizer)} tokens, the model's vocabulary {self.cfg.d_vocab}")

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, hf_config: Any, family: str | Family, *, tokenizer: Any = None,
                    mask_token_id: int | None = None, source: str = "module") -> "HookedLM":
        """Wrap an in-memory module of the family's layout (it is modified in place by the bridge)."""
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        family = get_family(family) if isinstance(family, str) else family
        if family.name == "dream" and not getattr(module, "_revlens_bidirectional", False):
            make_bidirectional(module)
            module._revlens_bidirectional = True
        module.eval()
        bridge = build_bridge_from_module(module, family.architecture, hf_config=hf_config)
        if family.name == "dream":
            install_hooked_attention(module, bridge)
            bridge.cfg.attention_dir = "bidirectional"  # the adapter inherits Qwen2's "causal"
        if mask_token_id is None:
            mask_token_id = getattr(hf_config, "mask_token_id", None)
        return cls(bridge, family, tokenizer, mask_token_id, source)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, family: str | None = None,
                        dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        trust_remote_code: bool = False) -> "HookedLM":
        """Load config.json + safetensors (+ tokenizer) from a folder, or by hub name when online.

        ``family`` overrides detection from config.json; ``dtype`` casts the stored weights
        (default: keep them, e.g. bf16 for the released 7-8B models).
        """
        folder = _resolve(name_or_path)
        config_path = folder / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{folder} has no config.json")
        raw = load_json(config_path)
        if not isinstance(raw, dict):
            raise ValueError(f"{config_path} must hold a JSON object")
        detected = detect_family(raw) if family is None else get_family(family)
        check_config(config_path, raw, detected)
        if detected.masked and raw.get("mask_token_id") is None:  # no silent default: the id differs per model
            raise ValueError(f"{config_path} lacks 'mask_token_id', which a {detected.name} model needs")
        try:
            module, hf_config = build_module(detected, raw)
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"{config_path}: not a valid {detected.name} config: {err}") from None
        state = read_safetensors_folder(folder, device, dtype)
        load_weights(module, state, f"weights in {folder}", not_stored=not_stored(detected, module), assign=True)
        rebuild_buffers(detected, module, device)
        tie_if_needed(detected, module)
        tokenizer = None
        if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            tokenizer = load_tokenizer(folder, trust_remote_code)
        mask_id = raw.get("mask_token_id") if detected.masked else None
        tokenizer_mask = getattr(tokenizer, "mask_token_id", None)
        if detected.masked and tokenizer_mask is not None and tokenizer_mask != mask_id:
            raise ValueError(f"{config_path}: mask_token_id {mask_id!r} is not the tokenizer's mask token "
                             f"{tokenizer.mask_token!r} (id {tokenizer_mask}); set mask_token_id to {tokenizer_mask}")
        lm = cls.from_module(module, hf_config, detected, tokenizer=tokenizer, mask_token_id=mask_id, source=str(folder))
        lm.raw_config = raw
        return lm

    def reinitialised(self, seed: int = 0) -> "HookedLM":
        """The same architecture, tokenizer and mask token, freshly initialised: the untrained reference."""
        if self.raw_config is None:
            raise ValueError("reinitialised() needs a model loaded with from_pretrained (its config.json)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module, hf_config = build_module(self.family, self.raw_config, meta=False)
        return HookedLM.from_module(module.to(self.cfg.device), hf_config, self.family, tokenizer=self.tokenizer,
                                    mask_token_id=self.mask_token_id, source=f"{self.source} (re-initialised, seed {seed})")

    # ---- the TransformerLens surface ------------------------------------------------------------
    @property
    def cfg(self) -> Any:
        return self.bridge.cfg

    @property
    def hook_names(self) -> list[str]:
        return sorted(self.bridge.hook_dict)

    def check_hook_names(self, names: Iterable[str]) -> list[str]:
        """``names`` as a list; an unknown one is a ValueError with the closest valid names (see ``.hook_names``)."""
        names = list(names)
        check_hook_names(self.hook_names, names)
        return names

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [batch, seq], got {tuple(tokens.shape)} {tokens.dtype}")
        check_token_ids(tokens, self.cfg.d_vocab, hint=" - is the tokenizer the model's own?")
        return tokens.to(self.cfg.device)

    @torch.no_grad()
    def __call__(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
        return self.bridge(self._check_tokens(tokens))

    @torch.no_grad()
    def run_with_cache(self, tokens: Int[Tensor, "batch pos"],
                       names_filter: str | Sequence[str] | Callable[[str], bool] | None = None) -> tuple[Tensor, Any]:
        """Logits and a cache of exactly the hooks named (never the full cache: an 8B model's would not fit).

        ``names_filter`` is a hook name, a list of names or a predicate on names, as in TransformerLens.
        """
        if names_filter is None:
            raise ValueError("run_with_cache needs names_filter (a hook name, a list of names or a predicate): "
                             f"the full cache of a large model would not fit; e.g. {self.hook_names[:2]} (see .hook_names)")
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        elif callable(names_filter):
            names_filter = [name for name in self.hook_names if names_filter(name)]
        return self.bridge.run_with_cache(self._check_tokens(tokens), names_filter=self.check_hook_names(names_filter))

    @torch.no_grad()
    def run_with_hooks(self, tokens: Int[Tensor, "batch pos"], fwd_hooks: Sequence[tuple[str, HookFn]]) -> Tensor:
        self.check_hook_names(name for name, _ in fwd_hooks)
        return self.bridge.run_with_hooks(self._check_tokens(tokens), fwd_hooks=list(fwd_hooks))

    # ---- masks and readout ----------------------------------------------------------------------
    def read_position(self, answer_pos: int | Tensor) -> int | Tensor:
        """Position whose logits predict the token at ``answer_pos`` for this family."""
        return read_position(answer_pos, self.family.readout)

    def mask_logits(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch n_masks vocab"]:
        """Logits for every mask token of each prompt, read at the family's position."""
        if not self.family.masked:
            raise ValueError(f"{self.family.name} is a left-to-right model with no mask token; "
                             "score completions instead (revlens.facts.answer_scores does both)")
        return logits_at_masks(self, tokens, int(self.mask_token_id), readout=self.family.readout, causal=False)

    def encode(self, text: str, *, special_tokens: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model was loaded without a tokenizer; pass token ids")
        return list(self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def __repr__(self) -> str:
        c = self.cfg
        return (f"HookedLM({self.family.name}: {c.n_layers} layers, {c.n_heads} heads, d_model={c.d_model}, "
                f"vocab={c.d_vocab}, mask_token_id={self.mask_token_id}, from {self.source})")

    def generate(self, tokens: Int[Tensor, "batch pos"], steps: int, **kwargs: Any) -> Any:
        """Denoise the masks step by step, with optional step-indexed hooks and caches: see
        :func:`revlens.lm.generation.generate`."""
        from revlens.lm.generation import generate

        return generate(self, tokens, steps, **kwargs)
