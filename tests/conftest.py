"""Shared fixtures: a small world and a quickly trained model of each kind (session-scoped)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from revlens.config import EncoderConfig  # noqa: E402
from revlens.training import TrainConfig, train  # noqa: E402
from revlens.world import ReversalWorld  # noqa: E402


@pytest.fixture(scope="session")
def small_world() -> ReversalWorld:
    return ReversalWorld.generate(n_facts=40, n_control=8, seed=3)


@pytest.fixture(scope="session")
def small_cfg(small_world) -> EncoderConfig:
    return EncoderConfig(d_vocab=small_world.d_vocab, d_model=32, n_heads=2, d_head=16)


@pytest.fixture(scope="session")
def trained_mdm(small_world, small_cfg):
    (run,) = train(small_cfg, small_world, TrainConfig("mdm", steps=400, batch_size=128, log_every=200), progress=False)
    return run


@pytest.fixture(scope="session")
def trained_arm(small_world, small_cfg):
    cfg = small_cfg.replace(attention_dir="causal")
    (run,) = train(cfg, small_world, TrainConfig("arm", steps=400, batch_size=128, log_every=200), progress=False)
    return run
