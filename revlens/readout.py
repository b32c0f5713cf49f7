"""Reading a model's prediction for the masked slots of a prompt.

A masked diffusion LM like LLaDA predicts a masked token at its own position; a model trained with
shifted logits (an ARM, or Dream) predicts token i at position i - 1. Getting this wrong silently
reads the prediction for a neighbouring token, so every readout in revlens goes through here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from revlens.config import check_choice

Readout = Literal["same_position", "shifted"]
"""Where the logits for a masked token at position i are read: at i, or at i - 1 (shifted)."""
READOUT_CHOICES: tuple[str, ...] = get_args(Readout)
_READ_OFFSET = {"same_position": 0, "shifted": 1}


def read_position(mask_pos: int | Tensor, readout: Readout) -> int | Tensor:
    """Position whose logits predict the token at ``mask_pos`` (an int or a tensor of positions):
    the mask's own position, or the one before it under the shifted readout."""
    return mask_pos - _READ_OFFSET[readout]


def readable(mask_pos: int, readout: Readout) -> bool:
    """Whether a mask at ``mask_pos`` has a readout position (shifted: nothing precedes position 0)."""
    return read_position(mask_pos, readout) >= 0


def mask_positions(
    tokens: Int[Tensor, "batch pos"], mask_id: int, *, readout: Readout, causal: bool
) -> Int[Tensor, "batch n_masks"]:
    """Positions of the mask tokens, row by row, after checking the prompt is answerable.

    Raises ValueError for a row without a mask, rows with different numbers of masks, a mask at
    position 0 under the shifted readout (nothing precedes it), or -- for a causal model -- a mask
    that is not the last token (a left-to-right model cannot condition on what follows it).
    """
    check_choice("readout", readout, READOUT_CHOICES)
    is_mask = tokens == mask_id
    counts = is_mask.sum(dim=1)
    if (counts == 0).any():
        row = int((counts == 0).nonzero()[0])
        raise ValueError(f"prompt {row} has no mask token (id {mask_id}); put the mask where the answer goes")
    if (counts != counts[0]).any():
        raise ValueError(f"every prompt in a batch needs the same number of masks, got {sorted(set(counts.tolist()))}")
    positions = is_mask.nonzero()[:, 1].reshape(tokens.shape[0], -1)
    if (read_position(positions, readout) < 0).any():
        raise ValueError("a mask at position 0 cannot be read with the shifted readout: no position precedes it")
    if causal and (positions != tokens.shape[1] - 1).any():
        raise ValueError(
            "a causal (left-to-right) model can only answer a mask in the last position; "
            "found a mask with tokens after it"
        )
    return positions


def logits_at_masks(
    model: Callable[[Tensor], Tensor],
    tokens: Int[Tensor, "batch pos"],
    mask_id: int,
    *,
    readout: Readout,
    causal: bool = False,
) -> Float[Tensor, "*instance batch n_masks vocab"]:
    """The model's logits for each masked slot, taken from the right position for ``readout``.

    ``model`` returns ``[*instance, batch, seq, vocab]``: leading axes (K stacked model instances
    run as one, say) are kept."""
    positions = mask_positions(tokens, mask_id, readout=readout, causal=causal)
    logits = model(tokens)
    source = read_position(positions, readout)
    index = source[..., None].expand(*logits.shape[:-3], *source.shape, logits.shape[-1])
    return torch.gather(logits, -2, index)
