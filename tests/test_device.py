"""Where the model lives: ``run.device`` and ``model.dtype``. The CPU checks run everywhere; the CUDA
checks run only on a host with a GPU (``bench/gpu_check.sh`` runs them with the throughput benchmark)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedspine.api import run_experiment
from fedspine.cli import app
from fedspine.config import load_config
from fedspine.errors import ConfigError
from fedspine.runtime.experiment import build_experiment
from tests.conftest import CONFIGS

FAST = ["data.max_examples=600", "data.test_size=60", "scheduler.rounds=2", "train.local_steps=2"]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this host")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "CPU", "cuda:"])
def test_an_unknown_device_name_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match=r"run\.device"):
        load_config(CONFIGS / "tiny.toml", [f"run.device={name}"])


@pytest.mark.skipif(CUDA, reason="this host has CUDA")
def test_cuda_requested_without_cuda_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--config", str(CONFIGS / "tiny.toml"), "--out", str(out), "--set", "run.device=cuda"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "CUDA requested but not available" in result.output and "run.device" in result.output
    assert not out.exists()


def test_auto_on_a_cpu_host_is_the_float32_cpu_model() -> None:
    if CUDA:
        pytest.skip("this host has CUDA")
    exp = build_experiment(load_config(CONFIGS / "tiny.toml", FAST))
    param = next(exp.trainer.executor.model.parameters())
    assert param.device.type == "cpu" and param.dtype == torch.float32
    assert exp.trainer.executor.batch_clients == 1  # auto: one by one on a CPU


def _metrics(run_dir: Path) -> list[float]:
    return [float(r["loss"]) for r in json.loads((run_dir / "summary.json").read_text())["evaluations"]]


@needs_cuda
@pytest.mark.parametrize("strategy", ["fedit", "flora", "fedspine"])
def test_a_float32_run_on_cuda_matches_the_cpu_run(tmp_path: Path, strategy: str) -> None:
    runs = {}
    for device in ("cpu", "cuda"):
        overrides = [*FAST, f"strategy.name={strategy}", f"run.device={device}", "model.dtype=float32"]
        config = load_config(CONFIGS / "tiny.toml", [*overrides, "executor.batch_clients=1"])
        runs[device] = run_experiment(config, tmp_path / device).run_dir
    assert _metrics(runs["cuda"]) == pytest.approx(_metrics(runs["cpu"]), rel=1e-3)
    assert (runs["cuda"] / "report.html").is_file()


@needs_cuda
def test_auto_on_cuda_is_bfloat16_with_a_whole_round_per_batch(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "tiny.toml", FAST)
    exp = build_experiment(config)
    param = next(exp.trainer.executor.model.parameters())
    assert param.device.type == "cuda" and param.dtype == torch.bfloat16
    assert exp.trainer.executor.batch_clients == len(exp.devices)
    result = run_experiment(config, tmp_path / "run")
    assert all(e == e for e in _metrics(result.run_dir))  # finite, not NaN
