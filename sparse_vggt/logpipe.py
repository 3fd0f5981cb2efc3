"""`python -m sparse_vggt.logpipe LOGFILE`: copy stdin to a size-rotated log file (10 MB x 7 by default).

Why: a launchd job's StandardOutPath grows forever, and rotating it from outside (newsyslog) leaves the running
worker writing to the renamed file. The farm worker's output is piped through this instead (deploy/launchd)."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--max-bytes", type=int, default=10 * 1024 * 1024)
    p.add_argument("--backups", type=int, default=7)
    args = p.parse_args(argv)
    handler = logging.handlers.RotatingFileHandler(args.path, maxBytes=args.max_bytes, backupCount=args.backups)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for line in sys.stdin:
        handler.emit(logging.makeLogRecord({"msg": line.rstrip("\n"), "levelno": logging.INFO}))
    handler.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
