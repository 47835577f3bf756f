"""Shared command-line plumbing for the stage scripts: `--config`, `section.key=value` overrides,
one-line errors for mistakes a user can make (a traceback is for bugs, not for a wrong path), and stop
signals (SIGINT, SIGTERM, SIGHUP) that end a stage with one line (minivlm.stop)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from minivlm.config import RunConfig, RunFailed, describe, load_config
from minivlm.fileio import FULL_ERRNOS
from minivlm.stop import Interrupted, stop_signals_interrupt

USER_ERRORS = (ValueError, FileNotFoundError, RunFailed)


def parser(description: str, sections: list[str], default_config: str | None = "configs/demo.toml"
           ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog=describe(sections),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if default_config is not None:
        p.add_argument("--config", default=default_config, help="TOML config file (default: %(default)s)")
        p.add_argument("overrides", nargs="*", metavar="section.key=value",
                       help="override config keys, e.g. train.lr=3e-4 cache.dir=cache/other")
    return p


def config_from(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def run(main: Callable[[], object]) -> None:
    """Run a stage's main(); user errors print one line and exit 2, failures exit 1, a stop signal exits
    128 + its number (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""
    try:
        with stop_signals_interrupt():
            result = main()
    except Interrupted as e:
        if str(e):
            print(e, file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("interrupted by SIGINT", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, RunFailed) else 2)
    except OSError as e:  # a write no fileio helper wraps still ends in one line when the disk is full
        if e.errno not in FULL_ERRNOS:
            raise
        print(f"error: {e.filename or 'a file'}: disk full ({e.strerror}); free some space and rerun the same "
              f"command: it resumes from what is already written", file=sys.stderr)
        sys.exit(1)
    sys.exit(0 if result is None or result is True else int(not result))
