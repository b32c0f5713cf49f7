"""Training dynamics: forward/reverse losses, gradient alignment by parameter block, first-order
prediction of the reverse-loss change, and the storage path's evidence for B -> A.

Losses (arXiv 2602.02133, the gradient-alignment argument). For a masked model, L_fwd = -log p(A | "[M] r B") -- the term training
actually optimises -- and L_rev = -log p(A | "B r [M]"). For a left-to-right model the trained term
is L_fwd = -log p(B | "A r") and the reverse query L_rev = -log p(A | "B r").

One SGD step of size eta on L_fwd changes L_rev by -eta <grad L_rev, grad L_fwd> + O(eta^2): a
positive inner product means training the forward direction also trains the reverse one. We split
it over parameter blocks: **storage** (W_V, W_O, unembedding: the path that carries "B -> A"
whatever the position), **route** (W_Q, W_K: where the mask looks) and **embedding** (W_E and absolute
positions, which feed *both* the value path and the queries and keys, so they belong to neither; a
tied unembedding is W_E itself and counts here too).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.func import grad, vmap

from revlens.model import ToyTransformer, functional_logits
from revlens.objectives import READOUTS, Objective
from revlens.readout import read_position, readable
from revlens.world import EvalSet, ReversalWorld

STORAGE, ROUTE, EMBEDDING, OTHER = "storage", "route", "embedding", "other"
BLOCKS: tuple[str, ...] = (STORAGE, ROUTE, EMBEDDING, OTHER)
_STORAGE_NAMES = ("W_V", "W_O", "W_U_untied")
_EMBEDDING_NAMES = ("W_E", "W_pos")
_ROUTE_NAMES = ("W_Q", "W_K")

Params = dict[str, Tensor]


def parameter_blocks(model: ToyTransformer) -> dict[str, str]:
    """Map every parameter name to ``storage``, ``route``, ``embedding`` or ``other`` (MLP weights)."""
    out = {}
    for name, _ in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        out[name] = (
            STORAGE if leaf in _STORAGE_NAMES
            else ROUTE if leaf in _ROUTE_NAMES
            else EMBEDDING if leaf in _EMBEDDING_NAMES
            else OTHER
        )
    return out


@dataclass(frozen=True)
class LossQuery:
    """Prompts whose answer sits at a fixed slot, read at ``read_pos`` (readout applied)."""

    prompts: Int[Tensor, "n pos"]
    answers: Int[Tensor, " n"]
    read_pos: int

    @classmethod
    def from_eval_set(cls, es: EvalSet, objective: Objective) -> "LossQuery":
        readout = READOUTS[objective]
        if not readable(es.mask_pos, readout):
            raise ValueError(f"eval set {es.name!r} cannot be read by a left-to-right model (mask at position 0)")
        return cls(es.prompts, es.answers, read_position(es.mask_pos, readout))


def toy_loss_queries(world: ReversalWorld, objective: Objective) -> tuple[LossQuery, LossQuery]:
    """(forward, reverse) loss queries on the forward-only facts, as in the module docstring."""
    trained = "forward" if READOUTS[objective] == "shifted" else "inplace"
    return (
        LossQuery.from_eval_set(world.eval_set(trained), objective),
        LossQuery.from_eval_set(world.eval_set("reverse"), objective),
    )


def _nll(model: ToyTransformer, params: Params, prompts: Tensor, answers: Tensor, read_pos: int) -> Tensor:
    logits = functional_logits(model, params, prompts)[:, read_pos]
    return -logits.log_softmax(-1).gather(-1, answers[..., None])[..., 0]


def params_of(model: ToyTransformer) -> Params:
    return {name: p.detach() for name, p in model.named_parameters()}


def per_fact_losses(model: ToyTransformer, query: LossQuery, params: Params | None = None) -> Float[Tensor, " n"]:
    """-log p(answer) for each prompt."""
    with torch.no_grad():
        return _nll(model, params or params_of(model), query.prompts, query.answers, query.read_pos)


def mean_loss_grad(model: ToyTransformer, query: LossQuery, params: Params | None = None) -> Params:
    """Gradient of the fact-averaged loss with respect to every parameter."""
    return grad(lambda p: _nll(model, p, query.prompts, query.answers, query.read_pos).mean())(
        params or params_of(model)
    )


def per_fact_grads(model: ToyTransformer, query: LossQuery, params: Params | None = None) -> Params:
    """Per-fact gradients, each tensor ``[n_facts, *param_shape]``, via ``vmap`` over ``grad``."""

    def single(p: Params, prompt: Tensor, answer: Tensor) -> Tensor:
        return _nll(model, p, prompt[None], answer[None], query.read_pos)[0]

    return vmap(grad(single), in_dims=(None, 0, 0))(params or params_of(model), query.prompts, query.answers)


def per_fact_grads_loop(model: ToyTransformer, query: LossQuery) -> Params:
    """The same as :func:`per_fact_grads` with one backward pass per fact (the baseline in bench/)."""
    names = [n for n, _ in model.named_parameters()]
    rows = []
    for i in range(len(query.answers)):
        model.zero_grad()
        logits = model(query.prompts[i : i + 1])[:, query.read_pos]
        (-logits.log_softmax(-1)[0, query.answers[i]]).backward()
        rows.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    model.zero_grad()
    return {n: torch.stack([r[n] for r in rows]) for n in names}


def block_products(
    model: ToyTransformer, g_fwd: Params, g_rev: Params, batch_dims: int = 0
) -> dict[str, dict[str, Tensor]]:
    """Inner product, norms and cosine of two gradients, per block and for ``all`` parameters.

    ``batch_dims`` leading axes (e.g. facts) are kept.
    """
    blocks = parameter_blocks(model)
    out: dict[str, dict[str, Tensor]] = {}
    for block in (*BLOCKS, "all"):
        names = [n for n, b in blocks.items() if block in (b, "all")]
        if not names:
            continue

        def total(f) -> Tensor:
            return sum(f(g_fwd[n], g_rev[n]).flatten(batch_dims).sum(-1) for n in names)

        dot = total(lambda a, b: a * b)
        nf, nr = total(lambda a, b: a * a).sqrt(), total(lambda a, b: b * b).sqrt()
        out[block] = {"dot": dot, "norm_fwd": nf, "norm_rev": nr, "cos": dot / (nf * nr)}
    return out


@dataclass(frozen=True)
class FirstOrderCheck:
    eta: float
    predicted: float  # -eta <grad L_rev, grad L_fwd>
    actual: float  # L_rev(theta - eta grad L_fwd) - L_rev(theta)


def first_order_check(model: ToyTransformer, fwd: LossQuery, rev: LossQuery, etas: Sequence[float]) -> list[FirstOrderCheck]:
    """Predicted vs actual change of the mean reverse loss after one SGD step on the forward loss.

    Computed on a float64 copy of the model: for small eta the actual change is far below float32
    resolution of the loss, and rounding would swamp the second-order term being measured.
    """
    model = copy.deepcopy(model).double()
    params = params_of(model)
    g_fwd, g_rev = mean_loss_grad(model, fwd, params), mean_loss_grad(model, rev, params)
    dot = sum((g_fwd[n] * g_rev[n]).sum() for n in params)
    before = per_fact_losses(model, rev, params).mean()
    checks = []
    for eta in etas:
        stepped = {n: params[n] - eta * g_fwd[n] for n in params}
        after = per_fact_losses(model, rev, stepped).mean()
        checks.append(FirstOrderCheck(eta, float(-eta * dot), float(after - before)))
    return checks


@dataclass(frozen=True)
class StorageFactorisation:
    """Per-fact <grad_WU L_fwd, grad_WU L_rev> from autograd and its two factors."""

    autograd: Float[Tensor, " n"]
    error_dot: Float[Tensor, " n"]  # <p_fwd - e_target_fwd, p_rev - e_target_rev>
    resid_dot: Float[Tensor, " n"]  # <a_fwd, a_rev>, a = residual stream feeding the unembedding

    @property
    def factorised(self) -> Float[Tensor, " n"]:
        return self.error_dot * self.resid_dot


def storage_factorisation(model: ToyTransformer, fwd: LossQuery, rev: LossQuery) -> StorageFactorisation:
    """Check <grad_WU L_fwd, grad_WU L_rev> = <p_fwd - e, p_rev - e> * <a_fwd, a_rev> fact by fact.

    grad_WU L = a (p - e_target)^T is rank one, so the Frobenius product of two such gradients
    factorises. Needs an untied unembedding (with tying, W_U's gradient also flows via W_E).
    """
    if model.cfg.tie_embeddings or model.cfg.n_layers != 1:
        raise ValueError("the storage factorisation is derived for a one-layer model with an untied unembedding")
    g_f, g_r = per_fact_grads(model, fwd), per_fact_grads(model, rev)
    autograd = (g_f["W_U_untied"] * g_r["W_U_untied"]).flatten(1).sum(-1)
    parts = []
    with torch.no_grad():
        for q in (fwd, rev):
            logits, cache = model.run_with_cache(q.prompts, names_filter=["blocks.0.hook_resid_post"])
            resid = cache["blocks.0.hook_resid_post"][:, q.read_pos]
            probs = logits[:, q.read_pos].softmax(-1)
            parts.append((resid, probs - torch.nn.functional.one_hot(q.answers, probs.shape[-1])))
    (a_f, e_f), (a_r, e_r) = parts
    return StorageFactorisation(autograd, (e_f * e_r).sum(-1), (a_f * a_r).sum(-1))


def storage_logits(model: ToyTransformer, sources: Tensor, targets: Tensor) -> Float[Tensor, "head n_source n_target"]:
    """Logit of each target read from each source token through one head's value path alone:
    ``e_source W_V[h] W_O[h] W_U[:, target]`` (attention weight 1 on the source, no residual).
    For deeper models this is the direct path through the first layer only."""
    attn = model.blocks[0].attn
    if attn.W_V.ndim != 3:
        raise ValueError("storage_logits needs a position-shared W_V (untied per-position W_V has no single path)")
    with torch.no_grad():
        ov = torch.einsum("hmd,hdn->hmn", attn.W_V, attn.W_O)
        return torch.einsum("sm,hmn,nt->hst", model.W_E[sources], ov, model.W_U[:, targets])


def storage_evidence(model: ToyTransformer, sources: Tensor, targets: Tensor) -> dict[str, float]:
    """Storage logit of each fact's own pair (source_i -> target_i) against unrelated pairs
    (source_i -> target_j, j != i), summed over heads: mean of each and the gap in units of the
    unrelated pairs' standard deviation."""
    logits = storage_logits(model, sources, targets).sum(0)
    own = logits.diagonal()
    off = logits[~torch.eye(len(sources), dtype=torch.bool)]
    return {"own": float(own.mean()), "unrelated": float(off.mean()), "gap_sd": float((own.mean() - off.mean()) / off.std())}


class AlignmentLogger:
    """Training callback: block cosines of the averaged gradients, per-fact cosine summary,
    first-order check at a few step sizes, and the storage gap for B -> A."""

    def __init__(self, world: ReversalWorld, objective: Objective, etas: Sequence[float] = (1e-3, 1e-2, 1e-1)):
        self.fwd, self.rev = toy_loss_queries(world, objective)
        self.etas = tuple(etas)
        cut = world.n_facts - world.n_control
        self.b_ids, self.a_ids = torch.tensor(world.b_ids[:cut]), torch.tensor(world.a_ids[:cut])
        self.cache_id = f"AlignmentLogger/{objective}/{self.etas}"

    def __call__(self, step: int, model: ToyTransformer) -> dict[str, float]:
        row: dict[str, float] = {
            "L_fwd": float(per_fact_losses(model, self.fwd).mean()),
            "L_rev": float(per_fact_losses(model, self.rev).mean()),
        }
        # per-fact gradients once; the averaged-loss gradients are their means
        g_fwd, g_rev = per_fact_grads(model, self.fwd), per_fact_grads(model, self.rev)
        mean_fwd = {n: g.mean(0) for n, g in g_fwd.items()}
        mean_rev = {n: g.mean(0) for n, g in g_rev.items()}
        for block, d in block_products(model, mean_fwd, mean_rev).items():
            row[f"cos_{block}"] = float(d["cos"])
            row[f"dot_{block}"] = float(d["dot"])
        per_fact = {b: d["cos"] for b, d in block_products(model, g_fwd, g_rev, batch_dims=1).items()}
        # control: fact i's forward gradient against fact i+1's reverse gradient. If this is as high as the
        # matched cosine, the alignment is a direction all facts share, not a fact-specific one.
        g_rev_other = {n: g.roll(1, dims=0) for n, g in g_rev.items()}
        mismatched = block_products(model, g_fwd, g_rev_other, batch_dims=1)
        for block, cos in per_fact.items():
            row[f"fact_cos_{block}_mean"] = float(cos.nanmean())
            row[f"fact_cos_{block}_mismatched_mean"] = float(mismatched[block]["cos"].nanmean())
        row["fact_cos_all_frac_pos"] = float((per_fact["all"] > 0).float().mean())
        for check in first_order_check(model, self.fwd, self.rev, self.etas):
            row[f"fo_pred_{check.eta:g}"] = check.predicted
            row[f"fo_actual_{check.eta:g}"] = check.actual
        shared_values = model.blocks[0].attn.W_V.ndim == 3  # untied per-position W_V has no single path
        row["storage_BA_gap_sd"] = (
            storage_evidence(model, self.b_ids, self.a_ids)["gap_sd"] if shared_values else float("nan")
        )
        return row
