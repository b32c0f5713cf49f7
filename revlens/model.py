"""A small hooked Transformer encoder (or decoder, with a causal mask) for the toy experiments.

Built on TransformerLens's ``HookedRootModule`` / ``HookPoint`` so that ``run_with_cache``,
``run_with_hooks`` and ``transformer_lens.patching`` work unchanged. Hook names follow
TransformerLens::

Only hooks that fire exist (no ``hook_rot_q`` without RoPE, no ``hook_mlp_out`` without an MLP).

    hook_embed, hook_pos_embed (absolute positions only)
    blocks.{l}.hook_resid_pre
    blocks.{l}.attn.hook_q / hook_k / hook_v     [batch, pos, head, d_head], before RoPE
    blocks.{l}.attn.hook_rot_q / hook_rot_k     after RoPE (rotary positions only)
    blocks.{l}.attn.hook_attn_scores            [batch, head, query, key], PRE-softmax,
                                                 after ALiBi and the causal mask (-inf)
    blocks.{l}.attn.hook_pattern                [batch, head, query, key], softmax of the scores
    blocks.{l}.attn.hook_z                      [batch, pos, head, d_head]
    blocks.{l}.hook_attn_out, blocks.{l}.hook_resid_mid
    blocks.{l}.mlp.hook_pre / hook_post, blocks.{l}.hook_mlp_out (with an MLP)
    blocks.{l}.hook_resid_post

Weights use TransformerLens's layout: ``W_Q`` is ``[head, d_model, d_head]`` (with a leading
``pos`` axis when that projection is untied per position), ``W_O`` is ``[head, d_head, d_model]``,
``W_E`` is ``[d_vocab, d_model]``, ``W_U`` is ``[d_model, d_vocab]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.func import functional_call
from transformer_lens.hook_points import HookPoint

from revlens.config import EncoderConfig, check_token_ids
from revlens.hooks import StrictHookedRootModule
from revlens.positions import alibi_bias, apply_rope, rope_cos_sin


def _normal(*shape: int, std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * std)


class Attention(nn.Module):
    """Multi-head attention returning its pre-softmax scores through ``hook_attn_scores``."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        for proj in ("q", "k", "v"):
            shape = (cfg.n_heads, cfg.d_model, cfg.d_head)
            if proj in cfg.untied_positions:
                shape = (cfg.n_ctx, *shape)
            setattr(self, f"W_{proj.upper()}", _normal(*shape, std=cfg.d_model**-0.5))
        self.W_O = _normal(cfg.n_heads, cfg.d_head, cfg.d_model, std=(cfg.n_heads * cfg.d_head) ** -0.5)
        if cfg.positional == "rotary":
            cos, sin = rope_cos_sin(cfg.n_ctx, cfg.d_head, cfg.rotary_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.positional == "alibi":
            self.register_buffer("alibi", alibi_bias(cfg.n_ctx, cfg.n_heads), persistent=False)
        causal = torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", causal, persistent=False)
        rotary_hooks = ("rot_q", "rot_k") if cfg.positional == "rotary" else ()
        for name in ("q", "k", "v", *rotary_hooks, "attn_scores", "pattern", "z"):
            setattr(self, f"hook_{name}", HookPoint())

    def _project(
        self, x: Float[Tensor, "batch pos d_model"], weight: Tensor, positions: Int[Tensor, "batch pos"] | None
    ) -> Float[Tensor, "batch pos head d_head"]:
        """``x`` through ``weight``; an untied weight (``[n_ctx, head, d_model, d_head]``) is indexed by
        each token's position id (default its sequence index), so a gap position uses its own matrix."""
        if weight.ndim == 3:
            return torch.einsum("bpm,hmd->bphd", x, weight)
        if positions is None:
            return torch.einsum("bpm,phmd->bphd", x, weight[: x.shape[1]])
        return torch.einsum("bpm,bphmd->bphd", x, weight[positions])

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], positions: Int[Tensor, "batch pos"] | None = None
    ) -> Float[Tensor, "batch pos d_model"]:
        """``positions``: each token's position id (default: its index, 0 .. pos - 1)."""
        cfg, n = self.cfg, x.shape[1]
        q = self.hook_q(self._project(x, self.W_Q, positions))
        k = self.hook_k(self._project(x, self.W_K, positions))
        v = self.hook_v(self._project(x, self.W_V, positions))
        if cfg.positional == "rotary":
            if positions is None:
                cos, sin = self.rope_cos, self.rope_sin
            else:  # the tables gathered at each token's position id, [batch, pos, d_head]
                cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            q = self.hook_rot_q(apply_rope(q, cos, sin))
            k = self.hook_rot_k(apply_rope(k, cos, sin))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.d_head)
        if cfg.positional == "alibi":
            if positions is None:
                scores = scores + self.alibi[:, :n, :n]
            else:
                scores = scores + self.alibi[:, positions[:, :, None], positions[:, None, :]].transpose(0, 1)
        if cfg.attention_dir == "causal":
            scores = scores.masked_fill(~self.causal_mask[:n, :n], float("-inf"))
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, v))
        return torch.einsum("bqhd,hdm->bqm", z, self.W_O)


class MLP(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.W_in = _normal(cfg.d_model, cfg.d_mlp, std=cfg.d_model**-0.5)
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = _normal(cfg.d_mlp, cfg.d_model, std=cfg.d_mlp**-0.5)
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        post = self.hook_post(F.gelu(self.hook_pre(x @ self.W_in + self.b_in)))
        return post @ self.W_out + self.b_out


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.attn = Attention(cfg)
        self.mlp = None if cfg.attn_only else MLP(cfg)
        mlp_hooks = () if cfg.attn_only else ("mlp_out",)
        for name in ("resid_pre", "attn_out", "resid_mid", *mlp_hooks, "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(
        self, resid: Float[Tensor, "batch pos d_model"], positions: Int[Tensor, "batch pos"] | None = None
    ) -> Float[Tensor, "batch pos d_model"]:
        keep = 1.0 if self.cfg.residual else 0.0
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(keep * resid + self.hook_attn_out(self.attn(resid, positions)))
        if self.mlp is not None:
            resid = keep * resid + self.hook_mlp_out(self.mlp(resid))
        return self.hook_resid_post(resid)


class ToyTransformer(StrictHookedRootModule):
    """Token + (optional) position embedding, ``n_layers`` blocks, unembedding; returns logits."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.W_E = _normal(cfg.d_vocab, cfg.d_model, std=cfg.d_model**-0.5)
        if cfg.positional == "absolute":
            self.W_pos = _normal(cfg.n_ctx, cfg.d_model, std=cfg.d_model**-0.5)
        if not cfg.tie_embeddings:
            self.W_U_untied = _normal(cfg.d_model, cfg.d_vocab, std=cfg.d_model**-0.5)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.hook_embed = HookPoint()
        if cfg.positional == "absolute":
            self.hook_pos_embed = HookPoint()
        self.setup()

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding; the transpose of ``W_E`` itself (same storage) when tied."""
        return self.W_E.T if self.cfg.tie_embeddings else self.W_U_untied

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        check_tokens: bool = True,
        positions: Int[Tensor, "batch pos"] | None = None,
        read: int | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits at every position. ``check_tokens=False`` skips the data-dependent id check
        (needed under ``vmap``; the training loop checks its sentences once instead).

        ``positions`` gives each token a position id (default 0 .. pos - 1): gaps in the ids place
        tokens far apart without filler tokens (RoPE, ALiBi and absolute positions read them).
        ``read`` unembeds one sequence index only (logits ``[batch, 1, d_vocab]``): a loss that
        reads one slot need not pay for the others."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds n_ctx={self.cfg.n_ctx}")
        if check_tokens:
            check_token_ids(tokens, self.cfg.d_vocab)
        if positions is not None:
            if positions.shape != tokens.shape:
                raise ValueError(f"positions {tuple(positions.shape)} must have the tokens' shape {tuple(tokens.shape)}")
            if check_tokens and positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.cfg.n_ctx):
                raise ValueError(f"position ids must lie in [0, n_ctx={self.cfg.n_ctx}), got {int(positions.min())}..{int(positions.max())}")
        resid = self.hook_embed(F.embedding(tokens, self.W_E))
        if self.cfg.positional == "absolute":
            pos_embed = self.W_pos[: tokens.shape[1]] if positions is None else self.W_pos[positions]
            resid = resid + self.hook_pos_embed(pos_embed)
        for block in self.blocks:
            resid = block(resid, positions)
        if read is not None:
            resid = resid[:, read : read + 1].contiguous()  # contiguous: 3x faster matmul backward under vmap
        return resid @ self.W_U


def functional_logits(
    model: ToyTransformer,
    params: dict[str, Tensor],
    tokens: Int[Tensor, "batch pos"],
    positions: Int[Tensor, "batch pos"] | None = None,
    read: int | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """``model``'s logits with ``params`` in place of its own weights: the function of the weights
    that ``torch.func`` transforms (``vmap`` over stacked instances, ``grad``). Token ids are not
    checked here -- a data-dependent check cannot run under ``vmap`` -- so callers check them once.
    ``params`` may also hold buffers (a RoPE table, say) to run the model with other ones;
    ``positions`` and ``read`` are :meth:`ToyTransformer.forward`'s."""
    if positions is None and read is None:
        return functional_call(model, params, (tokens,), {"check_tokens": False})
    return functional_call(model, params, (tokens,), {"check_tokens": False, "positions": positions, "read": read})


def stack_parameters(models: Sequence[ToyTransformer]) -> dict[str, Tensor]:
    """The models' parameters by name, stacked along a new leading instance axis (detached copies)."""
    names = [name for name, _ in models[0].named_parameters()]
    per_model = [dict(m.named_parameters()) for m in models]
    return {name: torch.stack([params[name].detach() for params in per_model]) for name in names}
