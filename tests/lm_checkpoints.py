"""Tiny random checkpoints in the public on-disk layouts, and an independent plain-PyTorch reference.

The reference is written from the architecture description only (pre-norm LLaMA blocks, RMSNorm,
rotate-half RoPE, SiLU-gated MLP), straight from the state dict, sharing no code with revlens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB, D, HEADS, KV_HEADS, LAYERS, MLP, MASK_ID = 50, 32, 4, 2, 2, 48, 49


def llada_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A LLaDA-shaped folder: config.json with LLaDA's field names, safetensors with its tensor names."""
    g = torch.Generator().manual_seed(seed)
    kv = KV_HEADS * D // HEADS

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    state = {"model.transformer.wte.weight": w(VOCAB, D), "model.transformer.ff_out.weight": w(VOCAB, D),
             "model.transformer.ln_f.weight": 1 + 0.1 * w(D)}
    for i in range(LAYERS):
        p = f"model.transformer.blocks.{i}."
        state.update({p + "attn_norm.weight": 1 + 0.1 * w(D), p + "ff_norm.weight": 1 + 0.1 * w(D),
                      p + "q_proj.weight": w(D, D), p + "k_proj.weight": w(kv, D), p + "v_proj.weight": w(kv, D),
                      p + "attn_out.weight": w(D, D), p + "ff_proj.weight": w(MLP, D), p + "up_proj.weight": w(MLP, D),
                      p + "ff_out.weight": w(D, MLP)})
    config = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "auto_map": {"AutoModel": "modeling_llada.LLaDAModelLM"},
              "d_model": D, "n_heads": HEADS, "n_kv_heads": KV_HEADS, "n_layers": LAYERS, "mlp_hidden_size": MLP,
              "mlp_ratio": 4, "vocab_size": VOCAB, "embedding_size": VOCAB, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
              "mask_token_id": MASK_ID, "block_type": "llama", "block_group_size": 1, "rope": True,
              "rope_full_precision": True, "alibi": False, "attention_layer_norm": False, "include_bias": False,
              "include_qkv_bias": False, "scale_logits": False, "input_emb_norm": False, "layer_norm_type": "rms",
              "activation_type": "silu", "weight_tying": False, "init_fn": "mitchell", "max_sequence_length": 64}
    return _write(folder, state, config)


def dream_checkpoint(folder: Path, seed: int = 0, architecture: str = "DreamModel") -> Path:
    """A Dream-shaped folder: Qwen2 tensor names (biased q/k/v), Dream's config fields."""
    g = torch.Generator().manual_seed(seed)
    kv = KV_HEADS * D // HEADS

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    state = {"model.embed_tokens.weight": w(VOCAB, D), "lm_head.weight": w(VOCAB, D), "model.norm.weight": 1 + 0.1 * w(D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": 1 + 0.1 * w(D), p + "post_attention_layernorm.weight": 1 + 0.1 * w(D),
                      p + "self_attn.q_proj.weight": w(D, D), p + "self_attn.q_proj.bias": w(D),
                      p + "self_attn.k_proj.weight": w(kv, D), p + "self_attn.k_proj.bias": w(kv),
                      p + "self_attn.v_proj.weight": w(kv, D), p + "self_attn.v_proj.bias": w(kv),
                      p + "self_attn.o_proj.weight": w(D, D), p + "mlp.gate_proj.weight": w(MLP, D),
                      p + "mlp.up_proj.weight": w(MLP, D), p + "mlp.down_proj.weight": w(D, MLP)})
    config = {"architectures": [architecture], "model_type": "Dream" if architecture == "DreamModel" else "qwen2",
              "hidden_size": D, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "num_hidden_layers": LAYERS, "intermediate_size": MLP, "vocab_size": VOCAB, "rope_theta": 10000.0,
              "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "max_position_embeddings": 64,
              "mask_token_id": MASK_ID if architecture == "DreamModel" else None}
    return _write(folder, state, config)


def _write(folder: Path, state: dict, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def reference_logits(folder: Path, tokens: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """LLaMA-style forward pass computed directly from a checkpoint folder (LLaDA or Qwen2/Dream names)."""
    from safetensors.torch import load_file

    s, cfg = load_file(folder / "model.safetensors"), json.loads((folder / "config.json").read_text())
    llada = "model.transformer.wte.weight" in s
    eps = cfg["rms_norm_eps"]
    theta = cfg["rope_theta"]
    d_head = D // HEADS

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(x):  # x [batch, head, seq, d_head], rotate-half convention
        pos = torch.arange(x.shape[2], dtype=torch.float32)
        freqs = 1.0 / theta ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)
        ang = torch.cat([pos[:, None] * freqs] * 2, dim=-1)
        half = d_head // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * ang.cos() + rotated * ang.sin()

    def lin(x, name, bias=None):
        out = x @ s[name].T
        return out + s[bias] if bias is not None and bias in s else out

    names = (lambda i, k: f"model.transformer.blocks.{i}.{k}") if llada else (lambda i, k: f"model.layers.{i}.{k}")
    key = {"ln1": "attn_norm.weight", "ln2": "ff_norm.weight", "q": "q_proj", "k": "k_proj", "v": "v_proj",
           "o": "attn_out", "gate": "ff_proj", "up": "up_proj", "down": "ff_out"} if llada else {
        "ln1": "input_layernorm.weight", "ln2": "post_attention_layernorm.weight", "q": "self_attn.q_proj",
        "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj", "gate": "mlp.gate_proj",
        "up": "mlp.up_proj", "down": "mlp.down_proj"}
    x = s["model.transformer.wte.weight" if llada else "model.embed_tokens.weight"][tokens]
    b, n = tokens.shape
    for i in range(LAYERS):
        h = rms(x, s[names(i, key["ln1"])])
        qkv = []
        for part, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
            t = lin(h, names(i, key[part]) + ".weight", names(i, key[part]) + ".bias")
            qkv.append(t.view(b, n, heads, d_head).transpose(1, 2))
        q, k, v = rope(qkv[0]), rope(qkv[1]), qkv[2]
        k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_head)
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, D)
        x = x + lin(z, names(i, key["o"]) + ".weight")
        h = rms(x, s[names(i, key["ln2"])])
        x = x + lin(torch.nn.functional.silu(lin(h, names(i, key["gate"]) + ".weight")) * lin(h, names(i, key["up"]) + ".weight"),
                    names(i, key["down"]) + ".weight")
    x = rms(x, s["model.transformer.ln_f.weight" if llada else "model.norm.weight"])
    head = "model.transformer.ff_out.weight" if llada else ("lm_head.weight" if "lm_head.weight" in s else "model.embed_tokens.weight")
    return x @ s[head].T
