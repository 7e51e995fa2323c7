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


def run_and_resume_from_first_checkpoint(cfg: Config, root: Path) -> tuple[Path, Path]:
    """Run ``cfg`` whole into ``root/whole``; copy it to ``root/cut`` as if it had died after its first
    checkpoint, and resume that. Both run directories, for comparing their records."""
    import shutil

    from fedspine.api import resume_experiment, run_experiment

    whole, cut = root / "whole", root / "cut"
    run_experiment(cfg, whole)
    shutil.copytree(whole, cut)
    (cut / "summary.json").unlink()
    for checkpoint in sorted((cut / "checkpoints").iterdir())[1:]:
        shutil.rmtree(checkpoint)
    resume_experiment(cut)
    return whole, cut
