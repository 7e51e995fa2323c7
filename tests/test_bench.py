"""The benchmark scripts run: a smoke test on the tiny model (their figures come from full runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each runs a benchmark script end to end in a fresh process (about 40-60 s each): `make test-slow`.
pytestmark = pytest.mark.slow


def _stdout(cmd: list[str]) -> str:
    """The script's standard output; a failure shows the end of its standard error (its traceback)."""
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd[1:])} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout


def test_the_fedspine_benchmark_runs_and_prints_its_result_line() -> None:
    cmd = [sys.executable, "bench/fedspine.py", "--config", "configs/tiny.toml", "--quick", "--workers", "2"]
    cmd += ["--only", "fedit", "prune_then_tune", "fedspine"]
    out = _stdout(cmd)
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT target=") and "speedup_vs_fedit=" in last
    assert "delta_vs_prune_then_tune=" in last and "delta_vs_prune_then_tune_ci=" in last
    ratio = float(last.split("deployed_params_ratio_worst_class=")[1].split()[0])
    assert 0 < ratio < 1, "every device class deploys a model smaller than the dense one"
    assert "raspberry_pi_4" in out
    assert float(last.split("rounds_speedup_vs_fedit=")[1].split()[0]) > 0
    missed = float(last.split("fedit_missed_share_worst_class=")[1].split()[0])
    assert 0 <= missed <= 1 and "tasks late or dropped, per device class" in out


def test_bench_scripts_import_the_package_not_their_namesake() -> None:
    """bench/fedspine.py shares the package's name; every script must still import the package."""
    for script in sorted((ROOT / "bench").glob("[!_]*.py")):
        result = subprocess.run(
            [sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{script.name}: {result.stderr[-500:]}"


def test_the_async_benchmark_runs_every_scheduler_and_prints_its_result_line() -> None:
    cmd = [sys.executable, "bench/async.py", "--config", "configs/tiny.toml", "--quick", "--workers", "2"]
    out = _stdout(cmd)
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT target=") and "best_speedup_vs_sync=" in last
    for scheduler in ("sync", "sync-deadline", "fedasync", "fedbuff"):
        assert f"{scheduler}_final=" in last


def test_the_compression_benchmark_runs_and_prints_its_result_line() -> None:
    cmd = [
        sys.executable,
        "bench/compression.py",
        "--config",
        "configs/tiny.toml",
        "--quick",
        "--workers",
        "2",
    ]
    cmd += ["--only", "none", "sign+ef"]
    out = _stdout(cmd)
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT reference=none") and "sign_ef_reduction=" in last
    assert "sign_ef_delta_ci=" in last


def test_the_hetlora_benchmark_runs_and_prints_its_result_line() -> None:
    cmd = [sys.executable, "bench/hetlora.py", "--config", "configs/tiny.toml", "--quick", "--workers", "2"]
    cmd += ["--only", "zeropad", "flora"]
    out = _stdout(cmd)
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT best=") and "flora_vs_zeropad_ci=" in last


def test_the_flower_benchmark_runs_both_sides_to_the_same_model() -> None:
    cmd = [sys.executable, "bench/flower_vs_sim.py", "--devices", "3", "--rounds", "1", "--quick"]
    out = _stdout(cmd)
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT sim_speedup_vs_flower=") and last.endswith("same_model=1")


def test_the_sim_vs_real_benchmark_pairs_every_task_and_prints_its_error() -> None:
    cmd = [sys.executable, "bench/sim_vs_real.py", "--devices", "2", "--rounds", "2", "--quick"]
    out = _stdout(cmd)
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT median_error=") and last.endswith("tasks=2")


def test_the_personal_mask_benchmark_compares_both_importances_and_prints_its_result_line() -> None:
    cmd = [sys.executable, "bench/personal_mask.py", "--config", "configs/tiny.toml", "--devices", "3"]
    out = _stdout(cmd)
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT flap_pair_overlap=") and "taylor_pair_overlap=" in last
    values = [float(part.split("=")[1]) for part in last.split()[1:]]
    assert all(0.0 < v <= 1.0 for v in values)


def test_the_personal_mask_benchmark_evaluates_the_masks_of_a_runs_model(tmp_path: Path) -> None:
    from fedspine.api import run_experiment
    from fedspine.config import load_config

    overrides = ["strategy.name=fedspine", "eval.mode=both", "scheduler.rounds=3", "run.checkpoint_every=1"]
    overrides += ["export.save=false", "export.speed=false", "data.max_examples=600", "data.test_size=40"]
    run_experiment(load_config(ROOT / "configs" / "tiny.toml", overrides), tmp_path / "run")
    cmd = [sys.executable, "bench/personal_mask.py", "--run", str(tmp_path / "run"), "--batches", "2"]
    out = _stdout(cmd)
    last = out.strip().splitlines()[-1]
    for key in ("global_loss=", "flap_loss=", "taylor_loss="):
        assert key in last
