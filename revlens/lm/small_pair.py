"""Train the shipped small pair: a LLaDA-architecture MDM and a matched LLaMA-architecture ARM.

Both have the same size, tokenizer and training sentences (:mod:`revlens.lm.corpus`) and differ
only in what separates an MDM from an ARM: bidirectional attention with the masked-diffusion loss
(predict at the mask) versus causal attention with next-token loss. Both are trained with
:func:`revlens.objectives.make_loss_batch`, saved as config.json + safetensors + tokenizer in the
public layouts, and loaded back through :class:`revlens.lm.HookedLM` like any real checkpoint.

Regenerate with ``revlens small-pair`` (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from revlens.facts import FactSet
from revlens.lm.corpus import build_tokenizer, make_world, save_tokenizer, training_sentences
from revlens.lm.llada import LLaDAConfig, LLaDAModelLM
from revlens.objectives import MDM_MASK_EPS, make_loss_batch, weighted_token_loss

SMALL_PAIR_DIR = Path(__file__).resolve().parents[2] / "data" / "small_pair"


@dataclass(frozen=True)
class PairConfig:
    d_model: int = 128
    n_layers: int = 2  # a 4-layer MDM did not memorise the facts in 6000 steps (the ARM did); see data/README.md
    n_heads: int = 4
    mlp_hidden_size: int = 384
    rope_theta: float = 10000.0
    steps: int = 8000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    n_facts: int = 240
    mask_eps: float = MDM_MASK_EPS  # LLaDA's floor on the masking probability


def _llada_config(pc: PairConfig, vocab_size: int, tok) -> LLaDAConfig:
    return LLaDAConfig(d_model=pc.d_model, n_heads=pc.n_heads, n_layers=pc.n_layers,
                       mlp_hidden_size=pc.mlp_hidden_size, vocab_size=vocab_size, rope_theta=pc.rope_theta,
                       max_sequence_length=64, mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)


def _llama_config(pc: PairConfig, vocab_size: int, tok):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=pc.d_model, intermediate_size=pc.mlp_hidden_size,
                       num_hidden_layers=pc.n_layers, num_attention_heads=pc.n_heads, num_key_value_heads=pc.n_heads,
                       rope_theta=pc.rope_theta, max_position_embeddings=64, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"])


def length_buckets(sentences: list[str], tok) -> list[torch.Tensor]:
    """Tokenised sentences grouped by length, so batches need no padding."""
    by_len: dict[int, list[list[int]]] = defaultdict(list)
    for s in sentences:
        ids = tok(s)["input_ids"]
        by_len[len(ids)].append(ids)
    return [torch.tensor(v) for _, v in sorted(by_len.items())]


def train_model(model: torch.nn.Module, objective: str, buckets: list[torch.Tensor], mask_id: int,
                pc: PairConfig, desc: str) -> list[float]:
    """AdamW on batches drawn from one length bucket at a time (bucket chosen in proportion to its size)."""
    gen = torch.Generator().manual_seed(pc.seed)
    sizes = torch.tensor([len(b) for b in buckets], dtype=torch.float)
    opt = torch.optim.AdamW(model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=pc.lr, total_steps=pc.steps, pct_start=0.05)
    losses = []
    model.train()
    for _ in tqdm(range(pc.steps), desc=desc, mininterval=5):
        bucket = buckets[int(torch.multinomial(sizes, 1, generator=gen))]
        rows = torch.randint(len(bucket), (pc.batch_size,), generator=gen)
        batch = make_loss_batch(objective, bucket[rows], mask_id, gen, pc.mask_eps)
        loss = weighted_token_loss(model(batch.inputs).logits, batch.targets, batch.weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def train_small_pair(out_dir: str | Path = SMALL_PAIR_DIR, pc: PairConfig = PairConfig()) -> Path:
    """Train both models and write ``out_dir/{llada,llama}`` (+ ``world.json``, ``training.json``)."""
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    tok = build_tokenizer()
    world: FactSet = make_world(pc.n_facts, seed=pc.seed)
    buckets = length_buckets(training_sentences(world), tok)
    vocab_size = len(tok)
    record = {"config": asdict(pc), "n_sentences": int(sum(len(b) for b in buckets))}
    torch.manual_seed(pc.seed)
    llada_cfg = _llada_config(pc, vocab_size, tok)
    mdm = LLaDAModelLM(llada_cfg)
    mdm.init_weights()
    torch.manual_seed(pc.seed)
    arm = LlamaForCausalLM(_llama_config(pc, vocab_size, tok))
    for name, model, objective, config in (("llada", mdm, "mdm", llada_cfg.to_dict()),
                                           ("llama", arm, "arm", arm.config.to_dict())):
        losses = train_model(model, objective, buckets, tok.mask_token_id, pc, f"train {name} ({objective})")
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        save_tokenizer(folder)
        record[f"{name}_final_loss"] = sum(losses[-100:]) / 100
    world.save(out / "world.json")
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    record_accuracy(out)
    return out


def pair_accuracy(folder: str | Path) -> dict[str, float]:
    """Accuracy of the pair in ``folder`` per model, direction and split (startswith rule), loaded from disk."""
    from revlens.lm import HookedLM
    from revlens.lm.analysis import score_table

    folder = Path(folder)
    world = FactSet.load(folder / "world.json")
    out = {}
    for name in ("llada", "llama"):
        table = score_table(HookedLM.from_pretrained(folder / name), world)
        for (direction, split), acc in table.groupby(["direction", "split"]).correct.mean().items():
            out[f"{name} {direction} {split}"] = round(float(acc), 4)
    return out


def record_accuracy(folder: str | Path) -> None:
    """Add the reloaded pair's accuracies to ``training.json`` (the shipped numbers tests check)."""
    path = Path(folder) / "training.json"
    record = json.loads(path.read_text())
    record["accuracy"] = pair_accuracy(folder)
    path.write_text(json.dumps(record, indent=1) + "\n")
