"""Command line: a thin layer over the library that adds progress bars and summaries.

A new command is a new module here with ``add_parser(subparsers)`` plus its name in ``COMMAND_MODULES``.

Every failure the user can fix ends as one line on stderr and exit code 2: argument errors (plus
"see --help"), ``MergelabError`` and environment ``OSError`` s (disk full, read-only, permissions).
SIGTERM and SIGHUP clean up like Ctrl-C (the temporary output folder is removed); a closed stdout
(``mergelab methods | head``) ends quietly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import Sequence

from mergelab.errors import MergelabError

# one module per command (group); each exposes add_parser(subparsers) and imports nothing heavy at the top,
# so that --help and argument errors answer at once
COMMAND_MODULES: tuple[str, ...] = ("merge", "methods", "demo", "smile", "moe", "lora", "adapt", "recycle", "bench",
                                    "search", "emr")


class Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGHUP, raised in the main thread so that every ``finally`` and cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage block) and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from mergelab import __version__

    parser = ArgumentParser(prog="mergelab", description="Merge fine-tunings of one foundation model.")
    parser.add_argument("--version", action="version", version=f"mergelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    for name in COMMAND_MODULES:
        importlib.import_module(f"mergelab.cli.{name}").add_parser(sub)
    return parser


def _quiet_third_parties() -> None:
    """Keep transformers' and huggingface_hub's bars, load reports and warnings out of the one-line errors
    (a user's own environment settings win)."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"mergelab(\.|$)")
    if "transformers" in sys.modules:      # imported already (library use, tests): the env vars came too late
        try:
            from transformers.utils import logging as tlog
            tlog.set_verbosity_error()
            tlog.disable_progress_bar()
        except Exception:  # pragma: no cover - a transformers without these helpers
            pass
    if "huggingface_hub" in sys.modules:
        try:
            from huggingface_hub.utils import disable_progress_bars
            disable_progress_bars()
        except Exception:  # pragma: no cover
            pass


def _install_signal_handlers() -> dict:
    fired = []

    def handler(signum, frame):
        if fired:           # a second signal during cleanup: let the cleanup finish
            return
        fired.append(signum)
        raise Interrupted(signum)
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):      # not the main thread (library use inside a thread)
            pass
    return previous


def _restore(previous: dict) -> None:
    for sig, h in previous.items():
        try:
            signal.signal(sig, h)
        except (ValueError, OSError, TypeError):
            pass


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_third_parties()
    previous = _install_signal_handlers()
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()            # a closed pipe is reported here, not at interpreter exit
        return rc
    except MergelabError as e:
        _flush_quietly()
        print(f"mergelab: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`mergelab methods | head`): nothing left to say
        _silence_stdout()
        return 141
    except Interrupted as e:
        print(f"mergelab: interrupted ({signal.Signals(e.signum).name})", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("mergelab: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # the environment, not mergelab: full disk, read-only or missing folder, permissions, too many files
        where = e.filename or "mergelab"
        cause = e.strerror or type(e).__name__
        print(f"mergelab: error: {where}: {_one_line(cause)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("mergelab: error: out of memory (try fewer --threads or a smaller model)", file=sys.stderr)
        return 2
    finally:
        _restore(previous)


def _flush_quietly() -> None:
    try:
        sys.stdout.flush()
    except (BrokenPipeError, OSError, ValueError):
        _silence_stdout()


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    raise SystemExit(main())
