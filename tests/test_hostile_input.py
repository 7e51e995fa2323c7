"""Hostile input to `run`, `--resume`, `fleet`, `calibrate` and `sweep`, and click's own usage
errors: every case exits 1 or 2 with one ``error:`` line naming the problem, no traceback, and
nothing written (tests/hostile.py). Export, report and compare: tests/test_hostile_outputs.py;
deploy: tests/test_hostile_deploy.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fedspine.api import run_experiment
from fedspine.config import load_config
from tests.hostile import refuse

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.toml")
QUICK = ["scheduler.rounds=1", "data.test_size=40", "export.save=false", "export.speed=false"]

PROFILE = """name = "hostile"
description = "a profile for tests"
source = "tests"
peak_flops = 1e10
mfu = 0.5
memory_bandwidth = 1e10
memory_bytes = 8589934592
train_dtype_bytes = 4
slowdown_sigma = 0.1
"""


def _sets(*overrides: str) -> list[str]:
    return [arg for item in [*QUICK, *overrides] for arg in ("--set", item)]


def _run(tmp_path: Path, *overrides: str) -> list[str]:
    return ["run", "--config", TINY, "--out", str(tmp_path / "run"), *_sets(*overrides)]


# (case id, --set overrides, what the one error line names)
RUN_CASES = [
    ("template-twice", ["data.prompt_template={text} and {text}"], "data.prompt_template"),
    ("overhead-1e308", ["server.aggregation_overhead_seconds=1e308"], "server.aggregation_overhead_seconds"),
    ("generate-1e9", ["export.generate_tokens=1000000000"], "export.generate_tokens"),
    (
        "fedbuff-lr-1e308",
        ["scheduler.name=fedbuff", "scheduler.fedbuff.server_lr=1e308"],
        "scheduler.fedbuff.server_lr",
    ),
    (
        "fedcompass-q-1e9",
        ["scheduler.name=fedcompass", "scheduler.fedcompass.q_max=1000000000"],
        "scheduler.fedcompass.q_max",
    ),
    ("local-steps-1e9", ["train.local_steps=1000000000"], "train.local_steps"),
    ("rounds-1e9", ["scheduler.rounds=1000000000"], "scheduler.rounds"),
    ("jitter-1e308", ["fleet.jitter_scale=1e308"], "fleet.jitter_scale"),
    ("jitter-1e12", ["fleet.jitter_scale=1e12"], "fleet.jitter_scale"),
    ("lora-alpha-1e308", ["lora.alpha=1e308"], "lora.alpha"),
    ("lr-1e308", ["train.lr=1e308"], "train.lr"),
    ("deadline-1e308", ["scheduler.deadline_seconds=1e308"], "scheduler.deadline_seconds"),
    ("gbps-tiny", ["server.aggregation_gbps=1e-300"], "server.aggregation_gbps"),
    ("dirichlet-1e308", ["data.partition=dirichlet", "data.dirichlet_alpha=1e308"], "data.dirichlet_alpha"),
    ("trace-period-1e308", ["fleet.trace.period_seconds=1e308"], "fleet.trace.period_seconds"),
    ("attack-factor-1e308", ["fleet.attack.factor=1e308"], "fleet.attack.factor"),
    ("eval-batch-1e9", ["eval.batch_size=1000000000"], "eval.batch_size"),
    ("personal-steps-1e9", ["personalize.steps=1000000000"], "personalize.steps"),
    ("unknown-key", ["train.lrr=0.1"], "train.lrr"),
    ("wrong-type", ["train.local_steps=many"], "train.local_steps"),
    ("a-list-index-too-far", ["fleet.groups[99].count=1"], "fleet.groups.99"),
    ("override-without-equals", ["train.lr"], "train.lr"),
]


@pytest.mark.parametrize(("overrides", "names"), [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_run_refuses_values_that_crash_hang_or_overflow(
    tmp_path: Path, overrides: list[str], names: str
) -> None:
    refuse(_run(tmp_path, *overrides), tmp_path, names=names)


def _profile(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "profile.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "huge":
        path.write_text(PROFILE + "#" * (5 * 2**20))
    elif kind == "binary":
        path.write_bytes(bytes(range(256)))
    elif kind == "sigma":
        path.write_text(PROFILE.replace("slowdown_sigma = 0.1", "slowdown_sigma = 400.0"))
    elif kind == "flops":
        path.write_text(PROFILE.replace("peak_flops = 1e10", "peak_flops = 1e-300"))
    elif kind == "link":
        path.symlink_to("/dev/zero")
    return path


PROFILE_CASES = ["fifo", "directory", "huge", "binary", "sigma", "flops", "link"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", PROFILE_CASES)
def test_a_profile_file_is_read_as_what_it_claims_to_be(tmp_path: Path, kind: str) -> None:
    """A FIFO blocked forever; a sigma of 400 underflowed every slowdown to 0 (a traceback)."""
    path = _profile(tmp_path, kind)
    refuse(_run(tmp_path, f'fleet.groups[0].profile="{path}"'), tmp_path, names="fleet.groups[0].profile")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "huge", "link"])
def test_a_config_file_is_read_as_what_it_claims_to_be(tmp_path: Path, kind: str) -> None:
    path = _profile(tmp_path, kind)
    refuse(["run", "--config", str(path), "--out", str(tmp_path / "run")], tmp_path, names=str(path))


CLICK_CASES = [
    (["run", "--bogus"], "--bogus"),
    (["run", "--config"], "--config"),
    (["sweep"], "SWEEP_FILE"),
    (["compare"], "PATHS"),
    (["export", "somewhere"], "--out"),
    (["calibrate", "--out", "x.toml", "--tasks", "zero"], "--tasks"),
    (["fleet", "--set"], "--set"),
    (["nosuchcommand"], "nosuchcommand"),
]


@pytest.mark.parametrize(("args", "names"), CLICK_CASES, ids=[" ".join(c[0]) for c in CLICK_CASES])
def test_usage_errors_are_one_line_too(tmp_path: Path, args: list[str], names: str) -> None:
    """Click's own errors were a boxed panel of several lines; now the same one line as the rest."""
    refusal = refuse(args, tmp_path, names=names)
    assert refusal.exit_code == 2


def test_fleet_with_a_bad_value_names_it(tmp_path: Path) -> None:
    refuse(
        ["fleet", "--config", TINY, "--set", "fleet.groups[0].count=0"],
        tmp_path,
        names="fleet.groups[0].count",
    )


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--tasks", "1000000000"], "--tasks"),
        (["--name", ""], "--name"),
        (["--name", "a/b"], "--name"),
    ],
)
def test_calibrate_refuses_before_measuring(tmp_path: Path, args: list[str], names: str) -> None:
    out = tmp_path / "profile.toml"
    refuse(["calibrate", "--out", str(out), "--config", TINY, *args], tmp_path, names=names)


def test_calibrate_into_a_missing_folder_names_it(tmp_path: Path) -> None:
    out = tmp_path / "missing" / "profile.toml"
    refuse(["calibrate", "--out", str(out), "--config", TINY], tmp_path, names="--out")


# --- sweeps ---------------------------------------------------------------------------------------

SWEEP = """base = "{tiny}"
seeds = 1
[set]
"scheduler.rounds" = 1
"data.test_size" = 40
"export.save" = false
"export.speed" = false
[arms.fedit]
"strategy.name" = "fedit"
"""

SWEEP_CASES = [
    ("name-escapes", 'name = "../escaped"\n', "name"),
    ("name-absolute", 'name = "/tmp/x"\n', "name"),
    ("target-unknown-arm", 'target = "0.95*nosucharm"\n', "target"),
    ("target-nan", "target = nan\n", "target"),
    ("target-inf", "target = inf\n", "target"),
    ("target-negative", "target = -1\n", "target"),
    ("target-zero", "target = 0\n", "target"),
    ("target-garbage", 'target = "soon"\n', "target"),
    ("target-zero-fraction", 'target = "0*fedit"\n', "target"),
    ("seeds-1e9", "seeds = 1000000000\n", "seeds"),
    ("reference-unknown", 'reference = "nosucharm"\n', "reference"),
    ("unknown-key", "colour = 1\n", "colour"),
]


@pytest.mark.parametrize(("line", "names"), [c[1:] for c in SWEEP_CASES], ids=[c[0] for c in SWEEP_CASES])
def test_a_sweep_file_is_refused_before_any_run(tmp_path: Path, line: str, names: str) -> None:
    """A target naming an unknown arm failed only after every run; a name with ../ wrote outside."""
    path = tmp_path / "sweep.toml"
    text = SWEEP.format(tiny=TINY)
    path.write_text(text.replace("seeds = 1\n", line) if line.startswith("seeds") else line + text)
    refuse(["sweep", str(path), "--out", str(tmp_path / "out")], tmp_path, names=names)
    assert not (tmp_path.parent / "escaped").exists()


def test_a_huge_grid_is_refused_before_it_is_built(tmp_path: Path) -> None:
    path = tmp_path / "sweep.toml"
    values = ", ".join(str(i) for i in range(1, 200))
    grid = f'\n[grid]\n"train.local_steps" = [{values}]\n"scheduler.rounds" = [{values}]\n'
    path.write_text(SWEEP.format(tiny=TINY).replace('[arms.fedit]\n"strategy.name" = "fedit"\n', "") + grid)
    refuse(["sweep", str(path), "--out", str(tmp_path / "out")], tmp_path, names="grid")


@pytest.mark.parametrize(
    ("option", "value"),
    [("--workers", "0"), ("--threads", "-1"), ("--workers", "100000"), ("--arm", "nosuch")],
)
def test_sweep_options_out_of_range(tmp_path: Path, option: str, value: str) -> None:
    """Refused before the progress bar appears (it was drawn, then the error printed under it)."""
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP.format(tiny=TINY))
    args = ["sweep", str(path), "--out", str(tmp_path / "out"), option, value]
    refusal = refuse(args, tmp_path, names=option)
    assert "running" not in refusal.stderr, refusal.stderr


# --- resume ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run of 2 rounds cut back to its first checkpoint (as if killed there)."""
    root = tmp_path_factory.mktemp("interrupted")
    cfg = load_config(Path(TINY), ["scheduler.rounds=2", "data.test_size=40", "export.save=false"])
    run_experiment(cfg, root / "run")
    (root / "run" / "summary.json").unlink()  # as if killed after the checkpoint of round 1
    return root / "run"


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        (("rounds = 2", "rounds = 4"), "scheduler.rounds: 2 -> 4"),
        (('name = "fedit"', 'name = "flora"'), "strategy.name: 'fedit' -> 'flora'"),
        (("[lora]\nrank = 4", "[lora]\nrank = 2"), "lora.rank: 4 -> 2"),
    ],
)
def test_resume_refuses_a_config_edited_since_the_checkpoint(
    tmp_path: Path, interrupted: Path, edit: tuple[str, str], names: str
) -> None:
    """The checkpoint silently won: a "flora" run's records described FedIT training."""
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    config = run / "config.toml"
    text = config.read_text()
    assert edit[0] in text
    config.write_text(text.replace(edit[0], edit[1], 1))
    refuse(["run", "--resume", str(run)], tmp_path, names=names)


def test_resume_options_that_do_not_go_together(tmp_path: Path, interrupted: Path) -> None:
    refuse(["run", "--resume", str(interrupted), "--set", "train.lr=0.1"], interrupted, names="--resume")


def test_resume_of_a_folder_that_is_no_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    refuse(["run", "--resume", str(tmp_path / "empty")], tmp_path, names="empty")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["malformed", "not-an-object", "fifo", "link-out", "out-is-a-file"])
def test_a_sweep_directory_to_resume_is_read_as_untrusted(tmp_path: Path, kind: str) -> None:
    """A malformed sweep.json was a traceback; a FIFO in its place blocked forever."""
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP.format(tiny=TINY))
    out = tmp_path / "out"
    out.mkdir()
    plan = out / "sweep.json"
    if kind == "malformed":
        plan.write_text("{ not json")
    elif kind == "not-an-object":
        plan.write_text("[1, 2]")
    elif kind == "fifo":
        os.mkfifo(plan)
    elif kind == "link-out":
        (tmp_path / "elsewhere.json").write_text("{}")
        plan.symlink_to(tmp_path / "elsewhere.json")
    else:
        shutil.rmtree(out)
        out.write_text("a file")
    names = "--out" if kind == "out-is-a-file" else "sweep.json"
    refuse(["sweep", str(path), "--out", str(out), "--resume"], tmp_path, names=names)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", ["jsonl", "csv"])
@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_data_file_is_read_as_what_it_claims_to_be(tmp_path: Path, source: str, kind: str) -> None:
    """/dev/zero as data.path ran until the kernel killed it for memory; a FIFO blocked forever."""
    path = tmp_path / f"data.{source}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    overrides = [f"data.source={source}", f'data.path="{path}"', "data.label_key=label"]
    refuse(_run(tmp_path, *overrides), tmp_path, names=str(path))


@pytest.mark.timeout(60)
def test_a_model_directory_with_a_fifo_for_a_file_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    os.mkfifo(model / "model.safetensors")
    overrides = ["model.source=local", f'model.path="{model}"']
    refuse(_run(tmp_path, *overrides), tmp_path, names="model.safetensors")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["MANIFEST.json", "state.json"])
def test_a_checkpoint_file_that_is_a_fifo_is_skipped_not_read(
    tmp_path: Path, interrupted: Path, name: str
) -> None:
    """A FIFO in place of a checkpoint's manifest or state blocked --resume forever."""
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    (checkpoint,) = sorted((run / "checkpoints").glob("round-*"))
    (checkpoint / name).unlink()
    os.mkfifo(checkpoint / name)
    refuse(["run", "--resume", str(run)], tmp_path, names="no complete checkpoint")
