"""Reading model weights from safetensors files -- never pickle.

Shared by the toy checkpoints (:mod:`revlens.checkpoint`) and the real-model loader
(:mod:`revlens.lm.hooked_lm`): a file that cannot be read, a tensor that does not fit the model and a
sharded folder whose index disagrees with its shards are errors naming the file and the tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from revlens.config import load_json


class CorruptCheckpoint(ValueError):
    """A checkpoint or weights file that is incomplete, damaged or changed since it was written."""


def read_weights(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    """The tensors of a safetensors file; a damaged or truncated file is a ValueError naming it."""
    try:
        return load_file(str(path), device=device)
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for bad files
        raise CorruptCheckpoint(f"{path} is not a readable safetensors file (truncated or damaged?): {err}") from None


def load_weights(
    model: torch.nn.Module,
    state: dict[str, Tensor],
    source: str,
    *,
    not_stored: frozenset[str] = frozenset(),
    assign: bool = False,
) -> None:
    """Copy ``state`` into ``model``; a missing, unexpected or mis-shaped tensor is an error naming it.

    ``not_stored`` names model entries a checkpoint legitimately omits (a tied output head);
    ``assign=True`` adopts the tensors themselves (for modules built on the meta device).
    """
    expected = {k: v for k, v in model.state_dict().items() if k not in not_stored}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"missing {', '.join(missing)}"] if missing else []
        parts += [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        raise ValueError(f"{source} does not match the model config: {'; '.join(parts)}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{source}: weight {name} has shape {tuple(tensor.shape)}, "
                f"the config expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=not not_stored, assign=assign)


def read_safetensors_folder(folder: Path, device: str | torch.device = "cpu",
                            dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``.

    Shards are read straight onto ``device`` and cast one at a time, so an 8B model is never held
    twice in host memory. An index naming a shard outside ``folder`` (``../x``, an absolute path)
    is refused, and a damaged file is an error naming it. The index's weight map is honoured: a
    tensor in a shard it is not mapped to, or mapped to a shard that lacks it, is an error (never a
    silent choice between two copies). A tensor with a NaN or infinite value is an error naming it.
    """
    index = folder / "model.safetensors.index.json"
    weight_map: dict[str, str] | None = None
    if index.exists():
        content = load_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} lacks a 'weight_map' of tensor name to shard file")
        shards = sorted(set(weight_map.values()))
        root = folder.resolve()
        for shard in shards:
            if Path(shard).is_absolute() or not (folder / shard).resolve().is_relative_to(root):
                raise ValueError(f"{index} names shard {shard!r} outside {folder}; refusing to read it")
    elif (folder / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        found = sorted(p.name for p in folder.glob("*")) or ["nothing"]
        raise FileNotFoundError(
            f"{folder} has no model.safetensors or model.safetensors.index.json (found {', '.join(found[:8])}); "
            "revlens loads safetensors only (no pickled .bin weights)"
        )
    state: dict[str, Tensor] = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{folder / shard} (a shard listed in the index) does not exist")
        tensors = read_weights(folder / shard, device=str(device))
        stray = sorted(k for k in tensors if weight_map is not None and weight_map.get(k) != shard)
        if stray:
            raise ValueError(f"{folder / shard} holds {stray[0]}, which {index.name} maps to "
                             f"{weight_map.get(stray[0]) or 'no shard'}" + (f" (and {len(stray) - 1} more such tensors)"
                                                                           if len(stray) > 1 else "")
                             + "; fix the index or the shards")
        for name, tensor in tensors.items():
            state[name] = tensor if dtype is None else tensor.to(dtype)
            if state[name].is_floating_point() and not bool(torch.isfinite(state[name]).all()):
                cast = f" after the cast to {dtype}" if dtype is not None else ""
                raise ValueError(f"{folder / shard}: tensor {name} has NaN or infinite values{cast}; "
                                 "the checkpoint is broken")
    missing = sorted(set(weight_map or ()) - set(state))
    if missing:
        raise ValueError(f"{index} maps {missing[0]} to {weight_map[missing[0]]}, which does not hold it"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return state
