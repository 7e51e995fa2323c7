"""Shared fixtures: the repository root and small, fast configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedspine.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture
def tiny_config() -> Config:
    """configs/tiny.toml shrunk further so an end-to-end run takes a few seconds."""
    return load_config(
        CONFIGS / "tiny.toml",
        ["data.max_examples=600", "data.test_size=60", "scheduler.rounds=2", "train.local_steps=2"],
    )
