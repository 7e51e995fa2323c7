"""The ``fedspine`` command line: thin wrappers over :mod:`fedspine.api`.

Exit codes: 0 success, 1 a runtime failure (model, data, fleet), 2 bad input (config, arguments).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer.core import TyperGroup

from fedspine import api
from fedspine.cli_summary import print_summary
from fedspine.config import RUN_NAME, Config, load_config
from fedspine.errors import ConfigError, FedspineError
from fedspine.report.formatting import format_duration

HELP = """Federated fine-tuning of LLMs across simulated heterogeneous device fleets.

Exit codes: 0 success, 1 a runtime failure (model, data, fleet), 2 bad input (config, arguments)."""
console = Console(stderr=True)


class OneLineErrors(TyperGroup):
    """Click's own usage errors (an unknown option, a value of the wrong type, a missing argument) as
    one ``error:`` line and exit 2, the same shape as every other refusal of bad input."""

    def main(  # type: ignore[override]  # keyword-only: nothing calls it positionally
        self, args: Sequence[str] | None = None, *, standalone_mode: bool = True, **extra: Any
    ) -> Any:
        if not standalone_mode:
            return super().main(args, standalone_mode=False, **extra)
        try:
            result = super().main(args, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # the help text, as click prints it
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            where = getattr(exc, "ctx", None)
            hint = f" (see '{where.command_path} --help')" if where is not None else ""
            _error(f"{exc.format_message()}{hint}")
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            _error("aborted")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, cls=OneLineErrors)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config (default: built-in)")]  # noqa: UP045
SetOpt = Annotated[
    Optional[list[str]],  # noqa: UP045
    typer.Option("--set", "-s", help="Override a key, e.g. --set train.lr=3e-4 (repeatable)"),
]


@contextmanager
def _errors() -> Iterator[None]:
    """Turn fedspine's typed errors into a one-line message and an exit code."""
    try:
        yield
    except ConfigError as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    except FedspineError as exc:
        _error(str(exc))
        raise typer.Exit(1) from None


def _error(message: str) -> None:
    """One ``error:`` line on stderr (not wrapped, so that it stays one line for scripts and logs)."""
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def _load(config: Path | None, overrides: list[str] | None) -> Config:
    return load_config(config, overrides or [])


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (must be new or empty)")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue an interrupted run directory from its newest checkpoint"),
    ] = None,
) -> None:
    """Run an experiment (the default one with no --config) and write its run directory."""
    signal.signal(
        signal.SIGTERM, _terminated
    )  # unwinds like Ctrl-C: the run directory gets its FAILED marker
    with _errors():
        if resume is not None:
            if config is not None or set_ or out is not None:
                raise ConfigError("--resume", "a resumed run uses its own config.toml and directory")
            cfg = _load(resume / "config.toml", None) if (resume / "config.toml").exists() else Config()
            with _progress(cfg.scheduler.rounds) as (on_round, on_status):
                result = api.resume_experiment(resume, on_round=on_round, on_status=on_status)
        else:
            cfg = _load(config, set_)
            unit = "round" if cfg.scheduler.synchronous else "aggregation"
            with _progress(cfg.scheduler.rounds, unit) as (on_round, on_status):
                result = api.run_experiment(cfg, out, on_round=on_round, on_status=on_status)
        print_summary(result.summary, result.run_dir)


@app.command()
def fleet(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the fleet of a config as a table."""
    with _errors():
        cfg = _load(config, set_)
        rows = api.fleet_rows(cfg)
    table = Table(title=f"fleet: {sum(int(r['count']) for r in rows)} devices")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    Console().print(table)


@app.command()
def calibrate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Profile file to write (TOML; must not exist)")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    name: Annotated[str, typer.Option(help="The profile's device-class name")] = "calibrated",
    tasks: Annotated[int, typer.Option(min=1, max=100, help="Timed local tasks (after one warm-up)")] = 3,
) -> None:
    """Measure this machine for the config's model and task; write a device profile a fleet group can
    name (profile = "FILE")."""
    from fedspine.fleet.profile import profile_toml
    from fedspine.runtime.calibrate import calibrate as measure

    with _errors():
        if out.exists() or out.is_symlink():
            raise ConfigError("--out", f"{out} exists; choose another file")
        if not out.parent.is_dir():
            raise ConfigError("--out", f"{out.parent} is not a directory; create it first")
        if not RUN_NAME.match(name):
            raise ConfigError("--name", f"must be letters, digits, '.', '_' or '-', got {name!r}")
        cfg = _load(config, set_)
        result = measure(cfg, name, tasks, _status)
        d, m = result.device_class, result.measured
        header = (
            f"fedspine device profile: {d.description}\n"
            f"measured by `fedspine calibrate` for {m['model']} on {m['device']}; a fleet group names it:\n"
            f'  [[fleet.groups]]  profile = "{out}"'
        )
        partial = out.with_name(out.name + ".partial")
        partial.write_text(profile_toml(d, m, header), encoding="utf-8")
        partial.replace(out)
    table = Table(title=f"profile {name}: {out}")
    table.add_column("measured")
    table.add_column("value")
    table.add_row("training", f"{m['train_seconds_per_step']:.3f} s/step, {d.peak_flops / 1e9:.1f} GFLOP/s")
    table.add_row("step spread (sigma of log)", f"{d.slowdown_sigma:.3f}")
    table.add_row("memory bandwidth", f"{d.memory_bandwidth / 1e9:.1f} GB/s")
    table.add_row(
        "peak memory / capacity", f"{m['peak_memory_bytes'] / 2**30:.2f} / {d.memory_bytes / 2**30:.1f} GiB"
    )
    table.add_row("decode", f"{m['decode_tokens_per_second']:.1f} tokens/s")
    Console().print(table)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Target directory (new or empty)")],
    device: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--device", "-d", help="One device's model (default: every model and the manifest)"),
    ] = None,
    global_model: Annotated[
        bool,
        typer.Option(
            "--global-model", help="The device's global model, not its personal one ([personalize])"
        ),
    ] = False,
) -> None:
    """Copy the Hugging Face model a device deploys (pruned base + merged LoRA, or its personal model
    when the run saved one) out of a run."""
    with _errors():
        paths = api.export_device_models(run_dir, out, device, global_model)
    for path in paths:
        console.print(f"model: {path}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A finished run directory")]) -> None:
    """(Re)write report.html and plots of a run directory."""
    with _errors():
        path = api.write_report(run_dir)
    console.print(f"report: {path}")


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep file (TOML): base config, arms, seeds")],
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", "-o", help="Sweep directory (default: runs/sweep-NAME)"),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", "-w", help="Runs at once (local processes)")] = 1,
    threads: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="torch threads per run (default: cores // workers; 1 on Ray)"),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip finished runs, resume killed ones from checkpoints")
    ] = False,
    ray: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--ray", help="Run on the Ray cluster at ADDRESS ('auto': the one this host is in)"),
    ] = None,
    arm: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--arm", help="Run only this arm now (repeatable); the comparison covers every finished run"
        ),
    ] = None,
) -> None:
    """Run every arm of a sweep file with every seed, in parallel, then compare them (comparison.md)."""
    from fedspine.sweep import load_sweep, run_sweep

    with _errors():
        plan = load_sweep(sweep_file)
        target = out or Path("runs") / f"sweep-{plan.name}"
        with _sweep_progress() as (on_plan, on_event):
            result = run_sweep(plan, target, workers, threads, resume, ray, on_event, on_plan, arm)
    if result.comparison_files:
        Console().print(Markdown(result.comparison_files["md"].read_text(encoding="utf-8")))
        console.print(f"comparison: {result.comparison_files['html']}")
    if result.failed:
        for outcome in result.failed:
            console.print(f"[bold red]failed:[/] {outcome.arm}/seed-{outcome.seed}: {outcome.error}")
        console.print(f"{len(result.failed)} of {len(result.outcomes)} runs failed; see {target}/runs.json")
        raise typer.Exit(1)


@app.command()
def compare(
    paths: Annotated[list[Path], typer.Argument(help="A sweep directory, or run directories")],
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", "-o", help="Where comparison.* go (default: the sweep directory)"),
    ] = None,
    reference: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Arm the others are paired against (default: the sweep's, else the first)"),
    ] = None,
    arms: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Comma-separated arms to compare, in this order (default: all)"),
    ] = None,
    target: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Metric target for time to target: a number, or FRACTION*ARM (e.g. 0.95*fedit)"),
    ] = None,
) -> None:
    """Compare arms across seeds: mean and 95% interval per arm, paired differences, curves (HTML)."""
    with _errors():
        selected = [a.strip() for a in arms.split(",") if a.strip()] if arms else None
        _, files = api.compare_runs(paths, reference, selected, target, out)
    Console().print(Markdown(files["md"].read_text(encoding="utf-8")))
    for path in files.values():
        console.print(f"wrote {path}")


@contextmanager
def _sweep_progress() -> Iterator[tuple[Any, Any]]:
    columns = (
        TextColumn("[bold]runs"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[running]} running, {task.fields[failed]} failed{task.fields[skipped]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    progress = Progress(*columns, console=console, transient=False)
    task = progress.add_task("runs", total=None, running=0, failed=0, skipped="")
    counts = {"running": 0, "failed": 0}

    def on_plan(to_run: int, finished: int) -> None:
        """The plan is checked: show the bar from here on (never before a refusal)."""
        skipped = f", {finished} finished before" if finished else ""
        progress.update(task, total=to_run, skipped=skipped)
        if not progress.live.is_started:
            progress.start()

    def on_event(kind: str, spec: Any, outcome: Any) -> None:
        counts["running"] += 1 if kind == "started" else -1
        if outcome is not None and outcome.status == "failed":
            counts["failed"] += 1
        advance = 0 if kind == "started" else 1
        progress.update(task, advance=advance, running=counts["running"], failed=counts["failed"])

    try:
        yield on_plan, on_event
    finally:
        if progress.live.is_started:
            progress.stop()


deploy_app = typer.Typer(
    no_args_is_help=True,
    help="Files for a Flower deployment (SuperLink, SuperNodes); see docs/deploy.md. "
    "Needs fedspine\\[flower].",
)
app.add_typer(deploy_app, name="deploy")


def _deploy(module: str) -> Any:
    """``fedspine.deploy.<module>``, or one error line saying to install the flower extra."""
    try:
        return importlib.import_module(f"fedspine.deploy.{module}")
    except ImportError as exc:  # the flower extra is not installed
        _error(f"{exc}; install the extra: pip install 'fedspine[flower]'")
        raise typer.Exit(1) from None


@deploy_app.command("certs")
def deploy_certs(
    out: Annotated[Path, typer.Argument(help="Directory for ca.crt, server.pem, server.key")],
    host: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--host", help="Name or IP the SuperNodes use to reach the SuperLink (repeatable)"),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity in days")] = 365,
    ca_key: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--ca-key", help="Keep the CA's private key here, outside OUT (default: discard it)"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files (and the CA)")] = False,
) -> None:
    """Create a test CA and a SuperLink certificate (default hosts: localhost, 127.0.0.1)."""
    with _errors():
        paths = _deploy("setup").write_certificates(
            out, host or ["localhost", "127.0.0.1"], days, ca_key=ca_key, force=force
        )
    for role, path in paths.items():
        console.print(f"{role}: {path}")


@deploy_app.command("keys")
def deploy_keys(
    out: Annotated[Path, typer.Argument(help="Directory for the key pairs")],
    nodes: Annotated[int, typer.Option("--nodes", "-n", help="Number of SuperNodes")] = 2,
    prefix: Annotated[
        str, typer.Option(help="File name prefix; files are PREFIX0, PREFIX0.pub, ...")
    ] = "node",
    force: Annotated[bool, typer.Option("--force", help="Replace existing key files")] = False,
) -> None:
    """Create one authentication key pair per SuperNode (ECDSA P-384, OpenSSH format)."""
    with _errors():
        setup = _deploy("setup")
        pairs = setup.write_node_keys(out, setup.node_key_names(prefix, nodes), force=force)
    for private, public in pairs:
        console.print(f"{private}  (register {public} with: flwr supernode register {public} CONNECTION)")


@deploy_app.command("worker")
def deploy_worker(
    socket: Annotated[
        Path, typer.Option("--socket", help="Unix socket to serve on (this node's config: worker)")
    ],
) -> None:
    """Run this node's warm worker: it keeps the run's model built across messages (start it beside the
    SuperNode, name its socket in the node config: worker="PATH"; stop it with Ctrl-C or SIGTERM)."""
    with _errors():
        worker = _deploy("worker").Worker(socket)
    console.print(f"worker: serving on {socket} (key {socket}.key)")
    signal.signal(signal.SIGTERM, _terminated)
    try:
        worker.serve()
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()


@deploy_app.command("app")
def deploy_app_folder(
    out: Annotated[Path, typer.Argument(help="Flower app directory to write (pyproject.toml)")],
    records: Annotated[
        Path, typer.Option("--records", "-o", help="Run directory on the SuperLink's machine")
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    round_timeout: Annotated[float, typer.Option(help="Seconds to wait for a round's replies")] = 3600.0,
    wait_for_nodes: Annotated[
        float, typer.Option(help="Seconds to wait for every device's SuperNode")
    ] = 120.0,
    bind: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--bind",
            help="NODE=DEVICE: the Flower node id (from `flwr supernode register`) that is that device "
            "(repeatable; with any, only bound nodes take part)",
        ),
    ] = None,
    shared_data: Annotated[
        bool,
        typer.Option(
            "--shared-data",
            help="A testbed: every node derives its partition of the config's data source, instead of "
            "reading its own file (node config data-path)",
        ),
    ] = False,
) -> None:
    """Write a Flower app folder that runs the experiment; start it with `flwr run DIR CONNECTION`."""
    with _errors():
        path = _deploy("setup").write_app(
            out, _load(config, set_), records, round_timeout, wait_for_nodes, bind or [], shared_data
        )
    console.print(f"app: {path}")


@deploy_app.command("superlink", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def deploy_superlink(
    ctx: typer.Context,
    control: Annotated[
        str,
        typer.Option(help="HOST:PORT of the Control API (flwr run, flwr supernode register): operator only"),
    ] = "127.0.0.1:9093",
) -> None:
    """Run Flower's SuperLink with the Control API on its own address, not on the devices' port.

    Every other argument is flower-superlink's (--ssl-*, --enable-supernode-auth, --host, --port, ...).
    """
    with _errors():
        _deploy("superlink").serve(ctx.args, control)


@deploy_app.command("connection")
def deploy_connection(
    flwr_home: Annotated[Path, typer.Argument(help="The flwr CLI's home (FLWR_HOME; usually ~/.flwr)")],
    address: Annotated[str, typer.Option(help="SuperLink HOST:PORT")] = "127.0.0.1:8000",
    name: Annotated[str, typer.Option(help="Connection name, used as `flwr run DIR NAME`")] = "fedspine",
    root_certificates: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--root-certificates", help="CA certificate of the SuperLink"),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plain HTTP instead of TLS (loopback experiments only)")
    ] = False,
) -> None:
    """Add a SuperLink connection to the flwr CLI's config.toml (and make it the default)."""
    with _errors():
        setup = _deploy("setup")
        path = setup.write_connection(flwr_home, name, address, root_certificates, insecure=insecure)
    console.print(f"flwr config: {path}")


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _status(message: str) -> None:
    console.print(f"[dim]{message}[/]")


@contextmanager
def _progress(rounds: int, unit: str = "round") -> Iterator[tuple[api.RoundCallback, Callable[[str], None]]]:
    """``(on_round, on_status)``: status lines, and a progress bar shown from the moment the rounds
    start, so that an error while building (bad data, a missing model) is never preceded by a bar."""
    columns = (
        TextColumn(f"[bold]{unit}"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("virtual {task.fields[vtime]}  {task.fields[metric]}"),
        TimeElapsedColumn(),
    )
    progress = Progress(*columns, console=console, transient=False)
    task = progress.add_task("rounds", total=rounds, vtime="0s", metric="")

    def on_status(message: str) -> None:
        _status(message)
        if message.startswith(("running", "resuming")) and not progress.live.is_started:
            progress.start()

    def on_round(record: api.RoundRecord, evaluation: api.Evaluation | None) -> None:
        vtime = format_duration(record.virtual_end)
        done = record.round  # a resumed run starts past the checkpoint's round
        if evaluation is None:
            progress.update(task, completed=done, vtime=vtime)
        else:
            metric = f"{evaluation.metric_name} {evaluation.metric:.4g}"
            progress.update(task, completed=done, vtime=vtime, metric=metric)

    try:
        yield on_round, on_status
    finally:
        if progress.live.is_started:
            progress.stop()


def main() -> None:
    """Console-script entry point."""
    # fedspine never talks to a model hub: keep the libraries offline and their progress bars quiet.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    app(prog_name="fedspine")


if __name__ == "__main__":  # pragma: no cover
    main()
