import pytest
import torch

from revlens.config import EncoderConfig
from revlens.model import ToyTransformer
from revlens.positions import apply_rope
from revlens.training import init_model

EXPECTED_HOOKS = {
    "hook_embed",
    "blocks.0.hook_resid_pre",
    "blocks.0.attn.hook_q",
    "blocks.0.attn.hook_k",
    "blocks.0.attn.hook_v",
    "blocks.0.attn.hook_rot_q",
    "blocks.0.attn.hook_rot_k",
    "blocks.0.attn.hook_attn_scores",
    "blocks.0.attn.hook_pattern",
    "blocks.0.attn.hook_z",
    "blocks.0.hook_attn_out",
    "blocks.0.hook_resid_mid",
    "blocks.0.hook_resid_post",
}


def make(**kw) -> ToyTransformer:
    return init_model(EncoderConfig(d_vocab=30, d_model=32, n_heads=4, d_head=8, **kw), seed=0).eval()


def tokens(n=5, seq=3, seed=0):
    return torch.randint(2, 30, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_hook_names_follow_transformer_lens():
    assert set(make().hook_dict) == EXPECTED_HOOKS
    absolute = set(make(positional="absolute", attn_only=False).hook_dict)
    assert {"hook_pos_embed", "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"} <= absolute
    assert "blocks.0.attn.hook_rot_q" not in absolute


@pytest.mark.parametrize("positional", ["rotary", "absolute", "alibi", "none"])
@pytest.mark.parametrize("attention_dir", ["bidirectional", "causal"])
def test_attn_scores_are_pre_softmax(positional, attention_dir):
    model = make(positional=positional, attention_dir=attention_dir)
    _, cache = model.run_with_cache(tokens())
    scores = cache["blocks.0.attn.hook_attn_scores"]
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert scores.shape == pattern.shape == (5, 4, 3, 3)
    torch.testing.assert_close(scores.softmax(-1), pattern)
    finite = scores[scores.isfinite()]
    assert (finite < 0).any() and not torch.allclose(scores.nan_to_num(neginf=0), pattern)
    if attention_dir == "causal":
        assert torch.isneginf(scores[..., 0, 1:]).all() and (pattern[..., 0, 1:] == 0).all()


def test_editing_attn_scores_changes_the_output():
    model = make()
    clean = model(tokens())

    def only_self(scores, hook):
        eye = torch.eye(3, dtype=torch.bool)
        return scores.masked_fill(~eye, float("-inf"))

    edited = model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.attn.hook_attn_scores", only_self)])
    assert not torch.allclose(clean, edited)


def test_causal_mask_later_tokens_never_change_earlier_outputs():
    causal, bidirectional = make(attention_dir="causal"), make(attention_dir="bidirectional")
    x = tokens()
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1 - 2) % 28 + 2  # change only the last token
    torch.testing.assert_close(causal(x)[:, :2], causal(y)[:, :2], rtol=0, atol=0)
    assert not torch.allclose(bidirectional(x)[:, :2], bidirectional(y)[:, :2])


def test_rope_scores_depend_only_on_relative_offset():
    attn = make().blocks[0].attn
    same = torch.randn(1, 1, 4, 8).expand(1, 3, 4, 8).clone()  # one vector at every position
    rq = apply_rope(same, attn.rope_cos, attn.rope_sin)
    dots = torch.einsum("bqhd,bkhd->bhqk", rq, rq)[0, 0]
    torch.testing.assert_close(dots[0, 1], dots[1, 2])
    torch.testing.assert_close(dots[0, 2], dots[2, 0])


def test_no_positional_encoding_is_permutation_equivariant():
    model = make(positional="none")
    x = tokens()
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(model(x)[:, perm], model(x[:, perm]))


def test_tied_embeddings_share_one_tensor_and_untied_positions_add_a_pos_axis():
    tied = make(tie_embeddings=True)
    assert tied.W_U.data_ptr() == tied.W_E.data_ptr()
    assert "W_U_untied" not in dict(tied.named_parameters())
    untied = make(untied_positions=("q", "k"))
    attn = untied.blocks[0].attn
    assert attn.W_Q.shape == (3, 4, 32, 8) and attn.W_V.shape == (4, 32, 8)


def test_unknown_hook_name_is_a_clear_error():
    model = make()
    with pytest.raises(ValueError, match="unknown hook name 'blocks.0.attn.hook_score'.*hook_attn_scores"):
        model.run_with_hooks(tokens(), fwd_hooks=[("blocks.0.attn.hook_score", lambda x, hook: x)])
    with pytest.raises(ValueError, match="unknown hook name"):
        model.run_with_cache(tokens(), names_filter=["blocks.0.attn.hook_patern"])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"positional": "relative"}, "unknown positional 'relative'"),
        ({"attention_dir": "sideways"}, "unknown attention_dir"),
        ({"d_head": 7}, "even d_head"),
        ({"untied_positions": ("o",)}, "unknown untied projection"),
    ],
)
def test_bad_config_values_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        EncoderConfig(d_vocab=30, **kw)


def test_bad_tokens_are_rejected():
    model = make()
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[0, 1, 99]]))
    with pytest.raises(ValueError, match="exceeds n_ctx"):
        model(torch.zeros(1, 4, dtype=torch.long))
