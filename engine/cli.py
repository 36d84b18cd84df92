"""The ``mambahome`` command line.

Each workflow module owns its subcommands through ``register_cli(subparsers)``; this file only
collects them, so a workflow and its command line live in one place.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# Modules that contribute subcommands, in the order they are listed by ``mambahome --help``.
COMMAND_MODULES = (
    "engine.model_cli",     # info, import-official
    "engine.synth",         # synth
    "engine.training",      # train
    "engine.finetune",      # finetune
    "engine.inference",     # predict
    "engine.evaluation",    # evaluate
    "engine.experiments",   # train-eval
    "engine.server.cli",    # serve
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mambahome",
        description="Mamba-HoME 3D segmentation: train, fine-tune, predict and evaluate.",
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ValueError as exc:  # user-caused errors carry a message naming the file or case
        print(f"mambahome {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
