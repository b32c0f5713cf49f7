"""A clean-room LLaDA: the public checkpoints' parameter names and math, written from the paper.

LLaDA (Nie et al., 2025) is a LLaMA-style Transformer without the causal mask: pre-norm blocks with
RMSNorm, rotary positions (rotate-half convention), bias-free Q/K/V/O projections and a SiLU-gated
MLP, an untied output head, and logits at every position (the masked token is predicted *at its own
position*, no shift). The module tree mirrors the released ``LLaDAModelLM`` so that the released
safetensors load by name and TransformerLens's ``LLaDAModelLM`` bridge adapter can wrap it:

    model.transformer.wte                       token embedding            [vocab, d_model]
    model.transformer.blocks.{i}.attn_norm      RMSNorm before attention
    model.transformer.blocks.{i}.{q,k,v}_proj   [d_model or kv width, d_model]
    model.transformer.blocks.{i}.attn_out       [d_model, d_model]
    model.transformer.blocks.{i}.ff_norm        RMSNorm before the MLP
    model.transformer.blocks.{i}.ff_proj        gate projection            [mlp_hidden, d_model]
    model.transformer.blocks.{i}.up_proj        up projection              [mlp_hidden, d_model]
    model.transformer.blocks.{i}.ff_out         down projection            [d_model, mlp_hidden]
    model.transformer.ln_f                      final RMSNorm
    model.transformer.ff_out                    output head                [vocab, d_model]

Each block's ``attention(q, k, v, attention_bias, layer_past, use_cache)`` method is the seam the
bridge replaces with a hook-aware copy exposing pre-softmax ``hook_attn_scores``; the plain version
here is the reference the bridge is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from revlens.positions import apply_rope, rope_cos_sin

# Fields of a released LLaDA config.json that this implementation requires to hold exactly.
REQUIRED_CONTRACT = {
    "block_type": "llama",
    "block_group_size": 1,
    "rope": True,
    "rope_full_precision": True,
    "alibi": False,
    "attention_layer_norm": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "scale_logits": False,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "weight_tying": False,
}


@dataclass
class LLaDAConfig:
    """The subset of LLaDA's config.json the forward pass depends on (plus its fixed contract)."""

    d_model: int
    n_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    n_kv_heads: int | None = None
    embedding_size: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    mask_token_id: int = 126336
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    # the fixed contract, kept as fields so the TransformerLens adapter can validate them
    block_type: str = "llama"
    block_group_size: int = 1
    rope: bool = True
    rope_full_precision: bool = True
    alibi: bool = False
    attention_layer_norm: bool = False
    include_bias: bool = False
    include_qkv_bias: bool = False
    scale_logits: bool = False
    input_emb_norm: bool = False
    layer_norm_type: str = "rms"
    activation_type: str = "silu"
    weight_tying: bool = False
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.embedding_size = self.embedding_size or self.vocab_size
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        for name, expected in REQUIRED_CONTRACT.items():
            actual = getattr(self, name)
            actual = getattr(actual, "value", actual)
            if actual != expected:
                raise ValueError(f"this LLaDA implementation requires {name}={expected!r}; the config has {actual!r}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LLaDAConfig":
        """Build from a released config.json; unknown keys (init schemes, auto_map, ...) are ignored."""
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size") if k not in raw]
        if missing:
            raise ValueError(f"LLaDA config is missing required field(s): {', '.join(missing)}")
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """The config.json form, with the fields the released files carry for loaders to dispatch on."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(architectures=["LLaDAModelLM"], model_type="llada")
        return out

    def to_hf_config(self) -> Any:
        """A ``transformers.PretrainedConfig`` with the released field names (what TransformerLens reads)."""
        from transformers import PretrainedConfig

        fields_ = self.to_dict()
        del fields_["model_type"]  # a plain PretrainedConfig warns when handed another model_type
        return PretrainedConfig(**fields_)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back (LLaDA normalises in full precision)."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (:mod:`revlens.positions`) applied to q and k in float32 (``rope_full_precision``).

    The tables are computed per call, so the module holds no buffer a meta-device build would lack.
    """

    def __init__(self, d_head: int, theta: float) -> None:
        super().__init__()
        self.d_head, self.theta = d_head, theta

    def forward(
        self, q: Float[Tensor, "batch head pos d_head"], k: Float[Tensor, "batch kv_head pos d_head"]
    ) -> tuple[Tensor, Tensor]:
        if q.shape[-2] != k.shape[-2]:
            raise ValueError("LLaDA is a single-pass denoiser here: queries and keys cover the same positions")
        cos, sin = (t.to(q.device) for t in rope_cos_sin(k.shape[-2], self.d_head, self.theta))

        def rotate(x: Tensor) -> Tensor:  # apply_rope wants [batch, pos, head, d_head]
            return apply_rope(x.transpose(1, 2).float(), cos, sin).transpose(1, 2).to(x.dtype)

        return rotate(q), rotate(k)


class LLaDABlock(nn.Module):
    """One pre-norm LLaMA block with bidirectional attention; projections live on the block, as released."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        kv_width = int(config.n_kv_heads) * config.d_head
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k_proj = nn.Linear(config.d_model, kv_width, bias=False)
        self.v_proj = nn.Linear(config.d_model, kv_width, bias=False)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.ff_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, config.d_model, bias=False)
        self.act = nn.SiLU()
        self.rotary_emb = RotaryEmbedding(config.d_head, config.rope_theta)

    @staticmethod
    def _cast_attn_bias(bias: Tensor, dtype: torch.dtype) -> Tensor:
        """Additive bias in the compute dtype, with -inf replaced by that dtype's minimum."""
        return bias.to(dtype).masked_fill(bias == float("-inf"), torch.finfo(dtype).min)

    def attention(
        self,
        q: Float[Tensor, "batch pos d_model"],
        k: Float[Tensor, "batch pos kv_width"],
        v: Float[Tensor, "batch pos kv_width"],
        attention_bias: Float[Tensor, "batch 1 query_pos key_pos"] | None = None,
        layer_past: tuple[Tensor, Tensor] | None = None,
        use_cache: bool = False,
    ) -> tuple[Float[Tensor, "batch pos d_model"], None]:
        """Bidirectional multi-head attention followed by the output projection."""
        if layer_past is not None or use_cache:
            raise ValueError("LLaDA is a single-pass denoiser here: no KV cache")
        batch, seq, _ = q.shape
        cfg = self.config
        n_kv = int(cfg.n_kv_heads)
        q = q.view(batch, seq, cfg.n_heads, cfg.d_head).transpose(1, 2)
        k = k.view(batch, seq, n_kv, cfg.d_head).transpose(1, 2)
        v = v.view(batch, seq, n_kv, cfg.d_head).transpose(1, 2)
        q, k = self.rotary_emb(q, k)
        groups = cfg.n_heads // n_kv
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(cfg.d_head)
        if attention_bias is not None:
            scores = scores + self._cast_attn_bias(attention_bias, scores.dtype)
        pattern = scores.float().softmax(dim=-1).to(q.dtype)
        z = (pattern @ v).transpose(1, 2).reshape(batch, seq, cfg.d_model)
        return self.attn_out(z), None

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        attention_bias: Tensor | None = None,
        layer_past: tuple[Tensor, Tensor] | None = None,
        use_cache: bool = False,
    ) -> tuple[Float[Tensor, "batch pos d_model"], None]:
        normed = self.attn_norm(x)
        attn, cache = self.attention(
            self.q_proj(normed), self.k_proj(normed), self.v_proj(normed), attention_bias,
            layer_past=layer_past, use_cache=use_cache,
        )
        x = x + attn
        normed = self.ff_norm(x)
        x = x + self.ff_out(self.act(self.ff_proj(normed)) * self.up_proj(normed))
        return x, cache


@dataclass
class LLaDAOutput:
    logits: Float[Tensor, "batch pos vocab"]


class LLaDATransformer(nn.Module):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(int(config.embedding_size), config.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        self.ff_out = nn.Linear(config.d_model, int(config.embedding_size), bias=False)


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = LLaDATransformer(config)


class LLaDAModelLM(nn.Module):
    """Top-level LLaDA: ``forward(input_ids, attention_mask=None).logits``, mask prediction in place."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LLaDAModel(config)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) projections and embeddings, unit RMSNorm gains (the LLaMA initialisation)."""
        for name, param in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std)

    def forward(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        **unused: Any,
    ) -> LLaDAOutput:
        """Logits at every position. ``attention_mask`` (1 = real token) hides padded keys."""
        t = self.model.transformer
        x = t.wte(input_ids)
        bias = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask[:, None, None, :].bool()
            bias = torch.zeros(keep.shape, dtype=torch.float32, device=x.device).masked_fill(~keep, float("-inf"))
        for block in t.blocks:
            x, _ = block(x, attention_bias=bias)
        return LLaDAOutput(t.ff_out(t.ln_f(x)))
