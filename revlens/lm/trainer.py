"""Build, train and save small LLaDA- and LLaMA-architecture models from scratch: the configuration, the
objectives' batches, one optimiser step, a fixed-budget training loop, saving as a model folder.

:class:`PairConfig` sets a model's shape and its training (learning rate, batch size, masking, t sampling,
clipping); :func:`new_model` builds a freshly initialised LLaDA-architecture MDM (``llada``) or LLaMA-architecture
ARM (``llama``, see :data:`OBJECTIVE`); :func:`optimizer_step` takes one AdamW step on a batch of one length
:class:`Bucket` under the model's objective (:mod:`revlens.objectives`), and :func:`train_model` a fixed number
of them; :func:`save_model` writes the folder :class:`revlens.lm.HookedLM` loads; :func:`save_training_state` and
:func:`load_training_state` keep what a killed training needs to go on exactly as if it had not stopped. The
shipped small pair (:mod:`revlens.lm.small_pair`) and the text-reversal harness (:mod:`revlens.lm.text_reversal`)
train with these.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from revlens.atomic import folder_swap, save_safetensors_atomic, temporary_beside
from revlens.config import check_choice
from revlens.lm.corpus import WORDINGS
from revlens.lm.llada import LLaDAConfig, LLaDAModelLM
from revlens.objectives import MDM_MASK_EPS, make_loss_batch, masked_batch, sample_span_mask, weighted_token_loss


MASKINGS = ("token", "entity")
T_SAMPLINGS = ("uniform", "stratified")
OBJECTIVE = {"llada": "mdm", "llama": "arm"}


@dataclass(frozen=True)
class PairConfig:
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_hidden_size: int = 384
    rope_theta: float = 10000.0
    steps: int = 8000  # MDM steps (masked models need several times an ARM's steps to memorise)
    arm_steps: int | None = None  # ARM steps; None = ``steps``
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    n_facts: int = 240
    mask_eps: float = MDM_MASK_EPS  # LLaDA's floor on the masking probability
    masking: str = "token"  # "token": independent per token; "entity": each name/title masked whole
    wording: str = "reworded"  # reverse templates, see revlens.lm.corpus.make_world
    t_sampling: str = "uniform"  # "stratified": one t per batch row, evenly spread over (0, 1] (MDLM)
    grad_clip: float | None = None  # clip the gradient's global norm (None: no clipping)

    def __post_init__(self) -> None:
        check_choice("masking", self.masking, MASKINGS)
        check_choice("t_sampling", self.t_sampling, T_SAMPLINGS)
        check_choice("wording", self.wording, tuple(WORDINGS))

    def steps_for(self, objective: str) -> int:
        return self.arm_steps if objective == "arm" and self.arm_steps is not None else self.steps


def _llada_config(pc: PairConfig, vocab_size: int, tok, max_len: int = 64) -> LLaDAConfig:
    return LLaDAConfig(d_model=pc.d_model, n_heads=pc.n_heads, n_layers=pc.n_layers,
                       mlp_hidden_size=pc.mlp_hidden_size, vocab_size=vocab_size, rope_theta=pc.rope_theta,
                       max_sequence_length=max_len, mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)


def _llama_config(pc: PairConfig, vocab_size: int, tok, max_len: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=pc.d_model, intermediate_size=pc.mlp_hidden_size,
                       num_hidden_layers=pc.n_layers, num_attention_heads=pc.n_heads, num_key_value_heads=pc.n_heads,
                       rope_theta=pc.rope_theta, max_position_embeddings=max_len, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"])


@dataclass(frozen=True)
class Bucket:
    """Tokenised sentences of one length, with each token's entity-span id (see ``entity_units``)."""

    tokens: Int[Tensor, "n pos"]
    units: Int[Tensor, "n pos"]


def check_loss(loss: float, step: int, pc: PairConfig, desc: str) -> float:
    """``loss`` unless it is NaN or infinite: training has diverged, and every later step and score would be
    meaningless (a NaN model answers nothing and scores accuracy 0), so stop with the step and the rate."""
    if not math.isfinite(loss):
        raise ValueError(f"{desc}: training diverged at step {step} (loss {loss}) with lr {pc.lr}; nothing was saved "
                         "for this model: lower the learning rate (--lr)")
    return loss


def optimizer_step(model: torch.nn.Module, objective: str, buckets: list[Bucket], sizes: Tensor, mask_id: int,
                   pc: PairConfig, gen: torch.Generator, opt: torch.optim.Optimizer) -> float:
    """One AdamW step on a batch from one length bucket (drawn in proportion to ``sizes``); returns the loss."""
    bucket = buckets[int(torch.multinomial(sizes, 1, generator=gen))]
    rows = torch.randint(len(bucket.tokens), (pc.batch_size,), generator=gen)
    if objective == "mdm" and pc.t_sampling == "stratified":
        seq_len = bucket.tokens.shape[1]
        units = bucket.units[rows] if pc.masking == "entity" else torch.arange(seq_len).expand(len(rows), -1)
        mask, rate = sample_span_mask(units, gen, pc.mask_eps, stratified=True)
        batch = masked_batch(bucket.tokens[rows], mask, rate, mask_id)
    elif objective == "mdm" and pc.masking == "entity":
        mask, rate = sample_span_mask(bucket.units[rows], gen, pc.mask_eps)
        batch = masked_batch(bucket.tokens[rows], mask, rate, mask_id)
    else:
        batch = make_loss_batch(objective, bucket.tokens[rows], mask_id, gen, pc.mask_eps)
    loss = weighted_token_loss(model(batch.inputs).logits, batch.targets, batch.weights)
    opt.zero_grad()
    loss.backward()
    if pc.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), pc.grad_clip)
    opt.step()
    return loss.item()


def train_model(model: torch.nn.Module, objective: str, buckets: list[Bucket], mask_id: int,
                pc: PairConfig, desc: str, every: int = 0,
                checkpoint: Callable[[int, list[float]], None] | None = None) -> list[float]:
    """Train ``model`` for ``pc.steps_for(objective)`` AdamW steps under a one-cycle learning rate (5% warm-up), on
    batches drawn from one length bucket at a time (bucket chosen in proportion to its size): the fixed-budget loop
    of the shipped small pair. (The text-reversal harness trains with the same steps until a plateau instead,
    :func:`revlens.lm.text_reversal.train_until_flat`.)

    With ``pc.masking == "entity"`` the masked objective masks each entity's tokens together. ``checkpoint(step,
    losses)`` is called every ``every`` steps and after the last, with the model in eval mode (it must not
    change the weights; the training draws do not depend on it).
    """
    steps = pc.steps_for(objective)
    gen = torch.Generator().manual_seed(pc.seed)
    sizes = torch.tensor([len(b.tokens) for b in buckets], dtype=torch.float)
    opt = torch.optim.AdamW(model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=pc.lr, total_steps=steps, pct_start=0.05)
    losses = []
    model.train()
    for step in tqdm(range(1, steps + 1), desc=desc, mininterval=5):
        losses.append(check_loss(optimizer_step(model, objective, buckets, sizes, mask_id, pc, gen, opt), step, pc, desc))
        sched.step()
        if checkpoint is not None and (step == steps or (every and step % every == 0)):
            model.eval()
            checkpoint(step, losses)
            model.train()
    model.eval()
    return losses


def save_model(model: torch.nn.Module, folder: Path, tok) -> None:
    """config.json (+ its record, see :data:`revlens.lm.hooked_lm.CONFIG_RECORD`) + model.safetensors + tokenizer
    files, the layout :class:`revlens.lm.HookedLM` loads. The folder is built beside ``folder`` and swapped in whole,
    so a kill leaves the old model or the new one; a tensor with NaN or infinite values is refused, naming it."""
    from revlens.lm.hooked_lm import save_config

    state = model.state_dict()
    broken = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise ValueError(f"refusing to save {folder}: tensor {broken[0]} has NaN or infinite values "
                         f"({len(broken)} tensor(s) in all); training diverged")
    with folder_swap(folder) as tmp:
        save_safetensors_atomic(state, tmp / "model.safetensors")
        save_config(tmp, model.config.to_dict())
        tok.save_pretrained(str(tmp))


def save_training_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                        **progress) -> None:
    """Write, atomically, all that resuming a training needs: the weights, the optimiser's moments, the batch
    generator's state and ``progress`` (step, history, counters: tensors and plain values only). A training
    resumed from it with :func:`load_training_state` takes the same batches and reaches the same weights, bit for
    bit, as one that never stopped."""
    with temporary_beside(Path(path)) as tmp:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                    "progress": progress}, tmp)


def load_training_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                        gen: torch.Generator) -> dict:
    """Load a state written by :func:`save_training_state` into ``model``, ``opt`` and ``gen``; returns its
    ``progress``. Read with ``weights_only=True``: a state file can hold tensors and plain values, never code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
    except Exception as err:
        raise ValueError(f"cannot resume from {path}: {type(err).__name__}: {err}; delete it (or pass --overwrite) "
                         "to train from the start") from err
    return state["progress"]


def new_model(family: str, pc: PairConfig, tok, max_len: int = 64) -> torch.nn.Module:
    """A freshly initialised LLaDA-architecture MDM (``llada``) or LLaMA-architecture ARM (``llama``), seeded by ``pc.seed``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(pc.seed)
    if family == "llama":
        return LlamaForCausalLM(_llama_config(pc, len(tok), tok, max_len))
    model = LLaDAModelLM(_llada_config(pc, len(tok), tok, max_len))
    model.init_weights()
    return model
