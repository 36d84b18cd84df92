"""The ``mambahome`` command line.

Each workflow module owns its subcommands through ``register_cli(subparsers)``; this file only
collects them, so a workflow and its command line live in one place.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import List, Optional

# Modules that contribute subcommands, in the order they are listed by ``mambahome --help``.
COMMAND_MODULES = (
    "engine.model_cli",     # info, import-official
    "engine.synth",         # synth
    "engine.datasets",      # dataset
    "engine.train.cli",     # train, finetune
    "engine.inference",     # predict
    "engine.evaluation",    # evaluate
    "engine.experiments",   # train-eval
    "engine.interactive.robot",  # evaluate-interactive
    "engine.interactive.command",  # prompt
    "engine.server.cli",    # serve
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mambahome",
        description="Mamba-HoME 3D segmentation: train, fine-tune, predict and evaluate.",
        epilog="exit codes: 0 done; 1 finished, but some inputs were skipped or not scored (each named); "
               "2 an error stopped the command, or every input was skipped (nothing written); 130 interrupted (Ctrl-C)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a workflow not present in this build; the others still work
                continue
            raise
        module.register_cli(sub)
    return parser


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    try:  # the commands' modules import torch, MONAI...: seconds in which a Ctrl-C printed a 40-line traceback
        parser = build_parser()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse's top-level parser names them under "usage: mambahome [-h] COMMAND ...", which lists no option
        # at all; the command's own usage shows the options it does take
        _command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _warning_line(args.command, formatwarning)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mambahome info | head`: the reader stopped reading; nothing went wrong here
        # Python flushes stdout again at exit; point it at /dev/null so that flush does not fail too
        # (the way the Python documentation handles SIGPIPE).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except ValueError as exc:  # user-caused errors carry a message naming the file or case
        from engine.errors import raised_by_engine

        if not raised_by_engine(exc):
            # numpy's or torch's own ValueError ("operands could not be broadcast...") names no file and
            # means a bug here, not bad input: the traceback is what a bug report needs
            raise
        print(f"mambahome {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # full disk, read-only folder or mount, missing permission
        print(f"mambahome {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning
    return int(result or 0)


def _warning_line(command: str, fallback):
    """``warnings.formatwarning`` for the CLI: the engine's own UserWarnings (a run started over, classes
    dropped by fine-tuning) print as ``mambahome train: warning: ...`` on one line, instead of Python's
    ``/path/engine/train/loop.py:127: UserWarning: ...`` followed by a line of source code; warnings of
    other libraries keep Python's format."""
    engine_dir = os.path.dirname(os.path.abspath(__file__))

    def format_line(message, category, filename, lineno, line=None):
        if issubclass(category, UserWarning) and os.path.abspath(str(filename)).startswith(engine_dir + os.sep):
            return f"mambahome {command}: warning: {message}\n"
        return fallback(message, category, filename, lineno, line)
    return format_line


def describe_os_error(exc: OSError) -> str:
    """One line for a file system error: the engine's :class:`engine.io.WriteError` already names the
    file, what was written and why; a bare ``OSError`` is phrased the same way from its fields."""
    from engine.io import WriteError, describe_write_failure

    if isinstance(exc, WriteError):
        return str(exc)
    failure = describe_write_failure(exc)
    reason = failure[1] if failure else (exc.strerror or str(exc))
    names = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    return f"{names}: {reason}" if names else reason


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
