"""`sparse-vggt`: one command per pipeline stage, plus run/demo/eval/status/deploy.

Every stage command takes the run directory, ``--config FILE.toml`` and repeated ``--set section.field=value``.
Stage modules are imported lazily so ``sparse-vggt --help`` and ``status`` stay fast.
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

from . import progress
from .config import ConfigError, PipelineConfig, load_config
from .store import RunStore, RunStoreError

console = Console(stderr=False)
err_console = Console(stderr=True)
log = logging.getLogger("sparse_vggt")


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
            scalars.add_row(key, ", ".join(f"{k}: {v}" for k, v in value.items()))
        else:
            scalars.add_row(key, _fmt(value))
    console.print(scalars)
    for key, rows in nested:
        table = Table(title=key, title_justify="left")
        cols = list(rows[0].keys())
        for col in cols:
            table.add_column(str(col))
        for row in rows[:50]:
            table.add_row(*[_fmt(row.get(c)) for c in cols])
        if len(rows) > 50:
            table.caption = f"... {len(rows) - 50} more rows"
        console.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(value) > 12:
        return f"[{', '.join(map(str, value[:12]))}, ... ({len(value)} items)]"
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# commands


def cmd_scan(args: argparse.Namespace) -> int:
    from .ingest import scan

    cfg = _config(args)
    manifest = scan(Path(args.photos), Path(args.run), cfg, force=args.force)
    print_manifest("scan", manifest)
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from .describe import describe

    _, cfg = _open_with_config(args)
    if args.descriptors:
        cfg.describe.descriptors_file = args.descriptors
    print_manifest("describe", describe(Path(args.run), cfg))
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from .covisibility import build_graph

    _, cfg = _open_with_config(args)
    print_manifest("graph", build_graph(Path(args.run), cfg))
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from .partition import partition

    _, cfg = _open_with_config(args)
    print_manifest("partition", partition(Path(args.run), cfg))
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from .reconstruct import reconstruct

    _, cfg = _open_with_config(args)
    ids = [int(c) for c in args.cluster] if args.cluster else None
    print_manifest("reconstruct", reconstruct(Path(args.run), cfg, cluster_ids=ids))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge

    _, cfg = _open_with_config(args)
    print_manifest("merge", merge(Path(args.run), cfg))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    _, cfg = _open_with_config(args)
    if args.text:
        cfg.export.colmap_text = True
    print_manifest("export", export(Path(args.run), cfg))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_table

    result = evaluate(Path(args.pred), Path(args.reference))
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
        table.add_row(row["stage"], f"[{style}]{row['state']}[/]", row["finished"] or "",
                      ", ".join(f"{k}={_fmt(v)}" for k, v in list(counts.items())[:8]))
    console.print(table)
    if status["units"]:
        console.print("units: " + ", ".join(f"{k}={v}" for k, v in status["units"].items()))
    if status.get("writer"):
        w = status["writer"]
        console.print(f"being written by pid {w.get('pid')} on host {w.get('host')}: {escape(str(w.get('command')))}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flows.reconstruct import run_pipeline  # Prefect lives in flows/, never in the library

    cfg = _config(args)
    result = run_pipeline(Path(args.photos), Path(args.run), cfg, force=args.force)
    print_manifest("run", result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.reconstruct import run_demo

    result = run_demo(Path(args.run), overrides=args.set, force=args.force)
    print_manifest("demo", result)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import register_deployments

    print_manifest("deploy", register_deployments(work_pool=args.work_pool, apply=not args.dry_run))
    return 0


# ---------------------------------------------------------------------------------------------------------
# parser


def _common(p: argparse.ArgumentParser, run: bool = True) -> None:
    if run:
        p.add_argument("run", help="run directory")
    p.add_argument("--config", help="PipelineConfig TOML file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field (repeatable), e.g. --set partition.max_cluster_frames=64")
    p.add_argument("--force", action="store_true", help="accept a config that differs from the run's recorded one")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-vggt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("scan", help="find, validate and index photos into a run directory")
    p.add_argument("photos", help="folder of photos (scanned recursively)")
    _common(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("describe", help="global descriptors (MegaLoc) for every kept image")
    _common(p)
    p.add_argument("--descriptors", help="bring-your-own descriptors (.npy with names, or .parquet)")
    p.set_defaults(func=cmd_describe)

    for name, func, text in (
        ("graph", cmd_graph, "covisibility graph from descriptors and priors"),
        ("partition", cmd_partition, "cut the graph into connected, overlapping, bounded clusters"),
        ("merge", cmd_merge, "align cluster reconstructions into one frame"),
    ):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.set_defaults(func=func)

    p = sub.add_parser("reconstruct", help="run (sparse) VGGT on clusters")
    _common(p)
    p.add_argument("--cluster", action="append", help="only this cluster id (repeatable)")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("export", help="COLMAP, PLY, GLB and report")
    _common(p)
    p.add_argument("--text", action="store_true", help="also write COLMAP text files")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="the whole pipeline from a photo folder (Prefect flow)")
    p.add_argument("photos")
    _common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the whole pipeline on the bundled sample photos (random weights, small)")
    p.add_argument("run", nargs="?", default="demo_run", help="run directory (default ./demo_run)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="compare poses with a reference COLMAP model")
    p.add_argument("pred", help="run directory or COLMAP model directory")
    p.add_argument("--reference", required=True, help="reference COLMAP model directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("status", help="each stage's state and counts")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("deploy", help="register the Prefect deployments (prefect.yaml)")
    p.add_argument("--work-pool", default="mac-mini")
    p.add_argument("--dry-run", action="store_true", help="print what would be registered")
    p.set_defaults(func=cmd_deploy)
    return parser


WRITER_COMMANDS = {"scan", "describe", "graph", "partition", "reconstruct", "merge", "export", "run", "demo"}


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
        # errors raised on purpose by our stages (their messages say what to do) are printed without a
        # traceback; anything else is a bug and keeps its traceback
        ours = type(exc).__module__.startswith(("sparse_vggt", "flows", "tasks"))
        if not (ours or isinstance(exc, (ConfigError, RunStoreError, FileNotFoundError, ValueError))):
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        if args.verbose:
            raise
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted; re-run the same command to resume[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
