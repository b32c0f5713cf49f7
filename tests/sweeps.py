"""A tiny sweep file (two settings, two seeds, 20 steps) shared by the sweep tests."""

TINY = {
    "name": "tiny",
    "world": {"n_facts": 12, "n_control": 3, "seed": 0},
    "train": {"steps": 20, "batch_size": 16, "log_every": 10},
    "seeds": [0, 1],
    "settings": [
        {"name": "MDM", "objective": "mdm", "group": "g", "model": {"d_model": 16, "n_heads": 2, "d_head": 8}},
        {"name": "ARM", "objective": "arm", "group": "g",
         "model": {"d_model": 16, "n_heads": 2, "d_head": 8, "attention_dir": "causal"}},
    ],
}
