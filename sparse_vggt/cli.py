"""`sparse-vggt`: one command per pipeline stage, plus run/demo/evaluate/status/config/weights/deploy.

Every stage command takes the run directory, ``--config FILE.toml`` and repeated ``--set section.field=value``.
The stage commands come from the pipeline table (`sparse_vggt.pipeline`); stage modules are imported lazily so
``sparse-vggt --help``, ``status`` and the re-run of a finished run stay fast. ``run`` and ``demo`` load their
executor through `sparse_vggt.scheduler.load_runner` (Prefect, in flows/, only when a run really has to happen);
``deploy`` imports flows/ inside the command.

Exit codes: 0 success, 1 failure, 2 usage error (bad arguments or config, wrong run directory, stages out of
order), 3 partial (finished with skipped or failed units, listed in the report), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import __version__, pipeline, progress
from .config import ConfigError, PipelineConfig, load_config
from .scheduler import load_runner
from .store import RunStore, RunStoreError

console = Console(stderr=False)
err_console = Console(stderr=True)
log = logging.getLogger("sparse_vggt")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# errors that mean "the command was called wrongly" (exit 2) or a partial result (exit 3); also matched by class
# name, so an executor's own error classes of the same name (sparse_vggt.scheduler's) count the same
_USAGE_ERRORS = (ConfigError, RunStoreError)
_USAGE_ERROR_NAMES = {"FlowParameterError", "ConfigMismatchError"}
_PARTIAL_ERROR_NAMES = {"ClusterFailures"}


# ---------------------------------------------------------------------------------------------------------
# helpers


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(
        level=level, format="%(message)s", datefmt="[%X]",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=False)],
    )


def _config(args: argparse.Namespace) -> PipelineConfig:
    return load_config(getattr(args, "config", None), getattr(args, "set", None))


def _open_with_config(args: argparse.Namespace) -> tuple[RunStore, PipelineConfig]:
    """Open an existing run; the recorded config is the base, then --config/--set on top."""
    store = RunStore.open(args.run)
    cfg = store.config()
    if getattr(args, "config", None):
        cfg = PipelineConfig.from_toml(args.config)
    cfg.apply_overrides(getattr(args, "set", None))
    RunStore.create_or_open(args.run, cfg, force=getattr(args, "force", False))
    return store, cfg


def print_manifest(title: str, manifest: dict[str, Any]) -> None:
    """Print a stage manifest: scalars as a key/value table, lists of dicts as their own tables."""
    scalars = Table(title=title, show_header=False, title_justify="left")
    scalars.add_column("key", style="bold")
    scalars.add_column("value")
    nested: list[tuple[str, Any]] = []
    for key, value in manifest.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            nested.append((key, value))
        elif isinstance(value, dict) and value and all(isinstance(v, (int, float, str)) for v in value.values()):
            scalars.add_row(key, Text(", ".join(f"{k}: {v}" for k, v in value.items())))
        else:
            scalars.add_row(key, Text(_fmt(value)))
    console.print(scalars)
    for key, rows in nested:
        table = Table(title=key, title_justify="left")
        cols = list(rows[0].keys())
        for col in cols:
            table.add_column(str(col))
        for row in rows[:50]:
            table.add_row(*[Text(_fmt(row.get(c))) for c in cols])  # file names may contain [/...]
        if len(rows) > 50:
            table.caption = f"... {len(rows) - 50} more rows"
        console.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) and 0 < len(value) <= 12:
        return "\n".join(value)  # e.g. the output files: one per line
    if isinstance(value, (list, tuple)) and len(value) > 12:
        return f"[{', '.join(map(str, value[:12]))}, ... ({len(value)} items)]"
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# commands


def cmd_scan(args: argparse.Namespace) -> int:
    cfg = _config(args)
    manifest = pipeline.stage("scan").run(Path(args.run), cfg, force=args.force, photos=Path(args.photos))
    print_manifest("scan", manifest)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """Any stage after scan: the run's recorded config plus --config/--set, then the stage's ``run``."""
    _, cfg = _open_with_config(args)
    units = None
    if args.command == "describe" and args.descriptors:
        cfg.describe.descriptors_file = args.descriptors
    if args.command == "export" and args.text:
        cfg.export.colmap_text = True
    if args.command == "reconstruct" and args.cluster:
        units = [int(c) for c in args.cluster]
    if args.command in ("describe", "reconstruct"):  # the model stages: fail fast when weights are missing
        _check_weights(cfg, (args.command,), args.run)
    kwargs = {"units": units} if units is not None else {}
    print_manifest(args.command, pipeline.stage(args.command).run(Path(args.run), cfg, **kwargs))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_table

    if args.symmetric and args.co3d:
        raise ConfigError("--symmetric and --co3d are two different pair metrics: pass at most one")
    mode = "symmetric" if args.symmetric else ("co3d" if args.co3d else "relative")
    result = evaluate(Path(args.pred), Path(args.reference), mode=mode)
    if args.json:
        print(json.dumps(result))
    else:
        console.print(format_table(result))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    store = RunStore.open(args.run)
    status = store.status()
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    table = Table(title=f"run {status['root']}", title_justify="left")
    for col in ("stage", "state", "finished", "counts"):
        table.add_column(col)
    for row in status["stages"]:
        counts = {k: v for k, v in row["manifest"].items() if isinstance(v, (int, float, str)) and not str(k).endswith("path")}
        style = {"finished": "green", "started": "yellow", "pending": "dim"}[row["state"]]
        table.add_row(row["stage"], Text(row["state"], style=style), row["finished"] or "",
                      Text(", ".join(f"{k}={_fmt(v)}" for k, v in list(counts.items())[:8])))
    console.print(table)
    if status["units"]:
        console.print("units: " + ", ".join(f"{k}={v}" for k, v in status["units"].items()))
    from .provenance import describe_weights, run_weights

    for stage, w in run_weights(store.meta()).items():
        console.print(Text(f"{stage} weights: {describe_weights(w)}", style="bold red" if w.get("weights") == "random"
                           else ""))
    scan_manifest = next((r["manifest"] for r in status["stages"] if r["stage"] == "scan"), {}) or {}
    skipped = scan_manifest.get("skipped_files") or []
    for item in skipped[:50]:  # what an operator looks for first; all of them: --json or images.parquet
        console.print(f"skipped {item['path']}: {item['reason']}", markup=False, highlight=False, soft_wrap=True)
    if len(skipped) > 50:
        console.print(f"... and {len(skipped) - 50} more skipped photos (status --json, or the status column of "
                      "tables/images.parquet)", highlight=False, soft_wrap=True)
    if status.get("writer"):
        w = status["writer"]
        console.print(f"being written by pid {w.get('pid')} on host {w.get('host')}: {escape(str(w.get('command')))}")
    return 0


def _check_weights(cfg: PipelineConfig, stages: tuple[str, ...], run: str | Path | None = None) -> None:
    """Fail in seconds, with the commands to run, when a checkpoint is neither local nor downloadable (stages
    already finished in ``run`` need none)."""
    from .weights import check_weights_available

    if run is not None and (Path(run) / "run.json").is_file():
        try:
            done = RunStore(run).meta().get("stages", {})
            stages = tuple(s for s in stages if not done.get(s, {}).get("finished"))
        except RunStoreError:
            pass  # the flow reports a broken run.json itself
    check_weights_available(cfg, stages)


def _finished(run_dir: Path, photos: Path, cfg: PipelineConfig | None, title: str) -> int | None:
    """The fast path of a re-run: every stage marker set for the same photos and config -> print the recorded
    summary and return the exit code, without importing Prefect (no server start). None: a flow must run."""
    from .runcheck import finished_run

    done = finished_run(run_dir, photos, cfg)
    if done is None:
        return None
    log.info("%s is already complete (every stage finished, same photos and config): nothing to do", run_dir)
    print_manifest(title, done)
    return EXIT_PARTIAL if done.get("failures") else EXIT_OK


class _NoTraceback(logging.Formatter):
    """Formats with the wrapped formatter, minus the traceback (another handler may have cached it already)."""

    max_chars = 400

    def __init__(self, inner: logging.Formatter | None, note: str):
        super().__init__()
        self.inner, self.note = inner or logging.Formatter("%(message)s"), note

    def format(self, record: logging.LogRecord) -> str:
        failed = bool(record.exc_info or record.exc_text or record.stack_info)
        if not failed and record.levelno < logging.ERROR and not record.name.startswith("prefect"):
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            text = self.inner.format(record)
            if len(text) > self.max_chars:  # e.g. a repr of an exception listing hundreds of missing keys
                text = text[:self.max_chars] + f" ... ({len(text) - self.max_chars} more characters)"
            return text + (self.note if failed else "")
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def hide_log_tracebacks(note: str = "  (traceback hidden; -v shows it)", quiet: bool = False) -> None:
    """Console log records keep their message but not their traceback (Prefect logs every task and flow
    failure with one, so a single error printed ~190 lines twice), and routine task-completion lines are
    dropped (with ``quiet``: everything below WARNING). Only the terminal handlers change: the API handler still
    sends everything to the Prefect UI."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) or type(handler).__name__ == "RichHandler":
            if not isinstance(handler.formatter, _NoTraceback):
                handler.setFormatter(_NoTraceback(handler.formatter, note))
                handler.addFilter(_routine_task_state)
                if quiet:  # -q: Prefect's loggers have their own levels; keep its INFO lines off the terminal too
                    handler.addFilter(lambda record: record.levelno >= logging.WARNING)


def _routine_task_state(record: logging.LogRecord) -> bool:
    """Drop Prefect's 'Finished in state Completed()' line of every task run from the terminal (one per chunk
    and cluster); failures, retries and the flow's own lines stay."""
    return not (record.name.startswith("prefect.task_runs") and record.levelno < logging.WARNING
                and record.getMessage().startswith("Finished in state Completed"))


def _current_events(result: dict[str, Any]) -> dict[str, Any]:
    """Show this flow run's skips/failures; earlier attempts' (already retried) only as a count."""
    events = result.get("events")
    if not isinstance(events, list) or "flow_run" not in result:
        return result
    mine = [e for e in events if isinstance(e, dict) and e.get("flow_run") == result["flow_run"]]
    out = dict(result, events=mine)
    if len(events) > len(mine):
        out["earlier_events"] = f"{len(events) - len(mine)} from earlier attempts (orchestration/events.jsonl)"
    return out


def _flow_exit(result: dict[str, Any]) -> int:
    return EXIT_PARTIAL if result.get("failures") else EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if not args.force:
        code = _finished(Path(args.run), Path(args.photos), cfg, "run")
        if code is not None:
            return code
    _check_weights(cfg, ("describe", "reconstruct"), args.run)
    run_pipeline = load_runner(cfg.orchestration.executor)  # Prefect (flows/) is imported only here
    if not args.verbose:
        hide_log_tracebacks(quiet=args.quiet)
    result = run_pipeline(Path(args.photos), Path(args.run), cfg, force=args.force)
    print_manifest("run", _current_events(result))
    return _flow_exit(result)


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on the bundled photos, on this machine, small and (by default) random."""
    from .demo import DEMO_PHOTOS, RANDOM_BANNER, demo_config, random_stages

    if not args.force and not args.set:  # the recorded config is the demo's own
        code = _finished(Path(args.run), DEMO_PHOTOS, None, "demo")
        if code is not None:
            return code
    cfg = demo_config(args.set)
    cfg.orchestration.dispatch = "local"
    _check_weights(cfg, ("describe", "reconstruct"), args.run)
    run_pipeline = load_runner(cfg.orchestration.executor)
    if not args.verbose:
        hide_log_tracebacks(quiet=args.quiet)
    run_dir = Path(args.run)
    random = random_stages(cfg)
    if random:
        err_console.print(f"[bold red]{RANDOM_BANNER}[/]", highlight=False)
    err_console.print(f"demo: {len(list(DEMO_PHOTOS.iterdir()))} photos from {DEMO_PHOTOS} -> {run_dir.resolve()} "
                      f"({cfg.orchestration.executor} executor; Prefect ephemeral mode unless PREFECT_API_URL is set)",
                      highlight=False)
    report = run_pipeline(DEMO_PHOTOS, run_dir, cfg, force=args.force)
    out = report["outputs"]
    err_console.print(f"\n[bold green]outputs[/] in {out['export_dir']}:", highlight=False)
    for f in out["files"]:
        err_console.print(f"  {f}", highlight=False)
    err_console.print(f"report: {run_dir.resolve() / 'orchestration' / 'report.json'}", highlight=False)
    if random:
        err_console.print(f"[bold red]{RANDOM_BANNER}[/]", highlight=False)
    result = {k: report[k] for k in ("run_dir", "seconds", "images_kept", "images_skipped", "clusters",
                                     "oom_splits", "stages_executed", "random_weights")}
    result |= {"export_dir": out["export_dir"], "outputs": out["files"]}
    print_manifest("demo", result)
    return _flow_exit(result)


def cmd_config(args: argparse.Namespace) -> int:
    """Print the effective config as TOML: defaults, or a run's recorded config, plus --config/--set."""
    if args.defaults:
        cfg = PipelineConfig()
    elif args.run:
        cfg = RunStore.open(args.run).config()
        if args.config:
            cfg = PipelineConfig.from_toml(args.config)
        cfg.apply_overrides(args.set)
    else:
        cfg = _config(args)
    print(cfg.to_toml(), end="" if cfg.to_toml().endswith("\n") else "\n")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    import os

    if args.write_yaml:  # the prefect.yaml rendering of flows/deploy.py (its one source of truth)
        from flows.deploy import prefect_yaml

        Path(args.write_yaml).write_text(prefect_yaml(work_pool=args.work_pool))
        print(f"wrote {args.write_yaml}")
        return 0
    if not args.dry_run and not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise DeployError("no Prefect server configured: deployments must be registered on the head node's "
                              "server. Start one (`prefect server start` on the head node, see deploy/README.md), "
                              "then `export PREFECT_API_URL=http://HEAD:4200/api` and re-run; `sparse-vggt deploy "
                              "--dry-run` shows what would be registered.")
    from flows.deploy import register_deployments

    try:
        result = register_deployments(work_pool=args.work_pool, apply=not args.dry_run,
                                      deployments=not args.automation_only)
    except Exception as exc:
        if args.verbose or isinstance(exc, (ConfigError, RunStoreError)):
            raise
        from prefect.settings import PREFECT_API_URL

        raise DeployError(f"could not register the deployments on the Prefect server at {PREFECT_API_URL.value()} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Is the server "
                          "running and reachable (`prefect server start`, PREFECT_API_URL)? -v shows the traceback."
                          ) from exc
    print_manifest("deploy", result)
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """`weights fetch` / `weights verify`: pinned checkpoints with a recorded sha256 (sparse_vggt/provision.py)."""
    from . import provision

    stages = tuple(args.stage) if args.stage else ("describe", "reconstruct")
    if args.action == "fetch":
        result = provision.fetch(args.dir, stages)
        print_manifest("weights fetch", {"lock": result["lock"]} | {
            s: f"{e['repo']}/{e['filename']}@{e['revision']} sha256 {e['sha256']} ({e['file']})"
            for s, e in result["weights"].items()})
        if args.dir:
            print(f"use them with --set describe.model={Path(args.dir).resolve() / 'gberton--MegaLoc'} "
                  f"--set reconstruct.model={Path(args.dir).resolve() / 'facebook--VGGT-1B'}")
        return 0
    rows = provision.verify(args.dir, stages)
    print_manifest("weights verify", {s: ("ok " + r["sha256"]) if r["ok"] else f"FAILED: {r['problem']}"
                                      for s, r in rows.items()})
    return 0 if all(r["ok"] for r in rows.values()) else 1


class DeployError(RuntimeError):
    """`deploy` cannot reach or find a Prefect server; the message says how to start or point at one."""


# ---------------------------------------------------------------------------------------------------------
# parser


# the stage commands' own flags (besides RUN, --config, --set, --force)
STAGE_FLAGS: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "describe": (("--descriptors", {"help": "bring-your-own descriptors (.npy with names, or .parquet)"}),),
    "reconstruct": (("--cluster", {"action": "append", "help": "only this cluster id (repeatable)"}),),
    "export": (("--text", {"action": "store_true", "help": "also write COLMAP text files"}),),
}


def _global_flags(p: argparse.ArgumentParser, top: bool) -> None:
    """-v/-q/--no-progress, accepted before and after the subcommand (SUPPRESS: a subcommand that does not
    get the flag keeps the value parsed before it)."""
    default = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="count", default=default(0),
                   help="more logging; -v also shows tracebacks of errors")
    p.add_argument("-q", "--quiet", action="store_true", default=default(False), help="warnings and errors only")
    p.add_argument("--no-progress", action="store_true", default=default(False), help="disable progress bars")


def _common(p: argparse.ArgumentParser, run: bool = True) -> None:
    if run:
        p.add_argument("run", help="run directory")
    p.add_argument("--config", help="PipelineConfig TOML file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field (repeatable), e.g. --set partition.max_cluster_frames=64")
    p.add_argument("--force", action="store_true", help="accept a config that differs from the run's recorded one")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-vggt", description=__doc__.splitlines()[0],
                                     epilog="exit codes: 0 ok, 1 failure, 2 usage error, 3 partial (skipped or failed "
                                            "units, see the report), 130 interrupted")
    parser.add_argument("--version", action="version", version=f"sparse-vggt {__version__}")
    _global_flags(parser, top=True)
    flags = argparse.ArgumentParser(add_help=False)
    _global_flags(flags, top=False)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, parents=[flags], **k)  # type: ignore[method-assign]

    for st in pipeline.STAGES:  # one command per stage, in pipeline order (sparse_vggt.pipeline)
        p = sub.add_parser(st.name, help=st.help)
        if st.name == "scan":
            p.add_argument("photos", help="folder of photos (scanned recursively)")
        _common(p)
        for flag, options in STAGE_FLAGS.get(st.name, ()):
            p.add_argument(flag, **options)
        p.set_defaults(func=cmd_scan if st.name == "scan" else cmd_stage)

    p = sub.add_parser("run", help="the whole pipeline from a photo folder (Prefect flow)")
    p.add_argument("photos")
    _common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the whole pipeline on the bundled sample photos (random weights, small)")
    p.add_argument("run", nargs="?", default="demo_run", help="run directory (default ./demo_run)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", aliases=["eval"], help="compare poses with a reference COLMAP model")
    p.add_argument("pred", help="run directory or COLMAP model directory")
    p.add_argument("--reference", required=True, help="reference COLMAP model directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--symmetric", action="store_true",
                   help="stricter pair metric: signed translation direction, worse of i->j and j->i (not comparable "
                        "to published RRA/RTA/AUC@30)")
    p.add_argument("--co3d", action="store_true",
                   help="pair metric of VGGT's evaluation/test_co3d.py (poses in the first camera's frame, pair "
                        "pose inv(E_i) E_j)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("status", help="each stage's state and counts")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("config", help="print the effective config as TOML")
    p.add_argument("action", choices=["show"], help="show: print the config")
    p.add_argument("run", nargs="?", help="a run directory: its recorded config (default: the defaults)")
    p.add_argument("--defaults", action="store_true", help="the built-in defaults, ignoring --config/--set")
    p.add_argument("--config", help="PipelineConfig TOML file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("weights", help="fetch / verify the pinned VGGT-1B and MegaLoc checkpoints (sha256)")
    p.add_argument("action", choices=["fetch", "verify"])
    p.add_argument("--dir", help="a directory instead of the Hugging Face cache (files in DIR/<org>--<name>/)")
    p.add_argument("--stage", action="append", choices=["describe", "reconstruct"],
                   help="only this stage's checkpoint (repeatable; default both)")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("deploy", help="register the Prefect deployments and the zombie-run automation")
    p.add_argument("--work-pool", default="mac-mini")
    p.add_argument("--dry-run", action="store_true", help="print what would be registered")
    p.add_argument("--automation-only", action="store_true",
                   help="only (re)create the heartbeat automation (after `prefect deploy --all`)")
    p.add_argument("--write-yaml", metavar="PATH", help="write the deployments as a prefect.yaml and exit")
    p.set_defaults(func=cmd_deploy)
    return parser


WRITER_COMMANDS = {*pipeline.NAMES, "run", "demo"}


def exit_code(exc: BaseException) -> int:
    """2 for usage errors, 3 for partial results (some units failed, the rest is done), 130 for Ctrl-C, else 1."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    names = {c.__name__ for c in type(exc).__mro__}
    if isinstance(exc, _USAGE_ERRORS) or names & _USAGE_ERROR_NAMES:
        return EXIT_USAGE
    if names & _PARTIAL_ERROR_NAMES:
        return EXIT_PARTIAL
    return EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    progress.enable(not args.no_progress and sys.stderr.isatty())
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        if args.command in WRITER_COMMANDS:  # one writer per run directory (sparse_vggt.lock)
            from .lock import writer_lock

            if args.command not in ("scan", "run", "demo"):
                RunStore.open(args.run)  # a clear "not a run directory" before creating anything
            with writer_lock(args.run, " ".join(["sparse-vggt", *(sys.argv[1:] if argv is None else argv)])):
                return func(args)
        return func(args)
    except Exception as exc:
        # one short message; the traceback only with -v. Our own errors say what to do; anything else names
        # its type so a bug report has something to search for.
        if args.verbose:
            raise
        ours = type(exc).__module__.startswith(("sparse_vggt", "flows", "tasks")) or isinstance(
            exc, (ConfigError, RunStoreError, FileNotFoundError))
        text = str(exc) if ours else f"{type(exc).__name__}: {exc}"
        err_console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True, highlight=False)
        if not ours:
            err_console.print("(unexpected error: re-run with -v for the traceback)", highlight=False)
        return exit_code(exc)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted; re-run the same command to resume[/]")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
