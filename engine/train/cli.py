"""``mambahome train`` and ``mambahome finetune``: options built from :class:`TrainConfig`'s fields.

:func:`add_config_arguments` turns every setting of :class:`~engine.train.config.TrainConfig` into a
flag (``batch_size`` -> ``--batch-size``, help from the field's metadata), so a new setting reaches
every training command (``train``, ``finetune``, ``train-eval``) without being listed again, and
:func:`config_settings` reads them back.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

from tqdm.auto import tqdm

from engine.datasets import DATASET_JSON, is_case_store
from engine.networks import NETWORK_NAMES
from engine.progress import ProgressCallback
from engine.train import finetune as finetune_module
from engine.train import loop
from engine.train.config import (CONFIG_FILE, RESUME_FILE, SPLIT_FILE, TIME_BUDGET_STEPS, RunResult, TrainConfig,
                                 finetune_defaults, recipe_help, train_defaults)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(hint: Any) -> Any:
    """``Optional[X]`` -> ``X``; ``List[X]`` -> ``X`` (the per-item type argparse converts)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return _base_type(args[0])
    if typing.get_origin(hint) in (list, tuple):
        return args[0]
    return hint


def add_config_arguments(parser: argparse.ArgumentParser, defaults: Optional[Mapping[str, Any]] = None,
                         exclude: Collection[str] = ()) -> None:
    """Add one flag per :class:`TrainConfig` setting (fields marked ``cli=False`` are the commands' own).

    Args:
        parser: the subcommand's parser.
        defaults: defaults that differ from the dataclass's (e.g. fine-tuning's steps and learning rate).
        exclude: fields this command does not offer.
    """
    hints = typing.get_type_hints(TrainConfig)
    base = {**train_defaults(), **dict(defaults or {})}
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("cli", True) or f.name in exclude:
            continue
        help_text = f.metadata.get("help")
        default = base.get(f.name)
        kind = _base_type(hints[f.name])
        if kind is bool and default is None:  # tri-state: None means "decide automatically"
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is bool:
            parser.add_argument(_flag(f.name), action="store_true", default=default, help=help_text)
        else:
            extra = {k: f.metadata[k] for k in ("choices", "nargs", "metavar") if k in f.metadata}
            if f.name == "network":  # the networks module owns the list
                extra["choices"] = NETWORK_NAMES
            if default is None and f.metadata.get("recipe"):
                shown = recipe_help(f.name)  # None: the recipe fills it (an explicit value wins)
            else:
                shown = "" if default is None else f" (default {default})"
            parser.add_argument(_flag(f.name), type=kind, default=default, help=f"{help_text}{shown}", **extra)


def config_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The :class:`TrainConfig` settings parsed by :func:`add_config_arguments` (and ``--override``)."""
    names = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)}
    settings = {k: v for k, v in vars(args).items() if k in names}
    if settings.get("task") is not None:
        # before anything is read: `--task bogus` was met as the parent's "trained for task 'interactive'"
        from engine.train.task import check_task_name

        check_task_name(settings["task"])
    defaults = train_defaults()
    for name in ARCHITECTURE_SETTINGS:  # ``train`` parses them as None when not typed (see register_cli)
        if name in settings and settings[name] is None:
            settings[name] = defaults[name]
    if getattr(args, "override", None):
        settings["network_overrides"] = parse_overrides(args.override)
    if getattr(args, "task_option", None):
        settings["task_options"] = nest_options(parse_overrides(args.task_option, "--task-option"))
    return settings


def nest_options(flat: Dict[str, Any]) -> Dict[str, Any]:
    """``{"encoding.point_radius": 2}`` -> ``{"encoding": {"point_radius": 2}}``."""
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--task-option {key}: {part} is set both as a value and as a group")
        node[leaf] = value
    return out


def parse_overrides(items: Sequence[str], flag: str = "--override") -> Dict[str, Any]:
    """``["use_home=false", 'home_variant="paper"']`` -> ``{"use_home": False, "home_variant": "paper"}``
    (values are JSON; a bare word is taken as a string)."""
    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="network setting on top of the preset, e.g. use_home=false or home_variant=paper "
                             "(repeatable)")


def add_task_option_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--task-option KEY=VALUE`` (repeatable): the task's settings, read back by :func:`config_settings`.

    Args:
        parser: the subcommand's parser.
        note: appended to the help (when the command takes task options).
    """
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                        help="task setting, dotted, e.g. encoding.point_radius=2 or simulation.max_rounds=5 for "
                             f"--task interactive (repeatable){note}")


def _tqdm_callbacks(total: Optional[int]) -> Tuple[ProgressCallback, Callable[[], None]]:
    # The bar is drawn at the run's first report, not before: a command refused at once (a missing
    # dataset, a bad checkpoint) then prints its one error line without an empty "0/N" bar above it.
    bars: List[tqdm] = []
    # Into a log file (nohup, a batch job) every redraw is a new line: a 30-minute run wrote megabytes of
    # bars. There the bar is written at most every 30 seconds, and on a terminal as usual.
    live = sys.stderr.isatty()

    def bar() -> tqdm:
        if not bars:
            # a time-budgeted run has no step count to show ("0/10000000" until its first step)
            shown = None if total is not None and total >= TIME_BUDGET_STEPS else total
            bars.append(tqdm(total=shown, unit="step", dynamic_ncols=True, mininterval=0.1 if live else 30.0))
        return bars[0]

    def progress(done: int, total_: int, message: str) -> None:
        if message.startswith("step "):
            total_ = None if total_ >= TIME_BUDGET_STEPS else total_  # the time budget ends it: steps and rate
            if bar().total != total_:
                bar().total = total_
            bar().set_postfix_str(message.split(" ", 2)[-1] if " loss" in message else message, refresh=False)
            bar().update(done - bar().n)  # drawn when mininterval has passed
        else:
            # long enough for "preprocessing training case <case id>" with a usual case id
            bar().set_description_str(message[:64], refresh=live)

    def close() -> None:
        if bars:
            bars[0].close()

    return progress, close


def cli_progress(steps: Optional[int], quiet: bool) -> Tuple[Optional[ProgressCallback], Callable[[], None]]:
    """``(progress callback, close)``: a tqdm bar over ``steps`` (None: the run's reports say) on rank 0 unless
    ``quiet``."""
    rank = int(os.environ.get("RANK", "0"))
    return (None, lambda: None) if quiet or rank != 0 else _tqdm_callbacks(steps)


def run_with_cli_progress(steps: Optional[int], quiet: bool, run: Callable[..., RunResult],
                          out: Optional[str] = None) -> int:
    """Run ``run(progress=...)`` with a tqdm bar over ``steps`` on rank 0 and print the result; after
    Ctrl-C, say how the run folder ``out`` continues."""
    rank = int(os.environ.get("RANK", "0"))
    progress, close = cli_progress(steps, quiet)
    try:
        result = run(progress=progress)
    except KeyboardInterrupt:
        close()
        if rank == 0 and out is not None:
            # "interrupted" alone left the user guessing whether the minutes spent were lost
            if (Path(out) / RESUME_FILE).is_file():
                print(f"{Path(out) / RESUME_FILE}: the last saved state is kept; run the same command with "
                      "--resume to continue from it", file=sys.stderr)
            else:
                print(f"{out}: stopped before its first save (nothing to resume); the same command starts "
                      "it again", file=sys.stderr)
        raise
    finally:
        close()
    if rank == 0:
        dice = f"{result.best_dice:.4f}" if result.best_dice is not None else (
            f"n/a ({result.no_score_reason})" if getattr(result, "no_score_reason", None) else "n/a")
        print(f"steps: {result.steps_done}  best validation Dice: {dice}")
        print(f"best checkpoint: {result.best_checkpoint}")
        print(f"last checkpoint: {result.last_checkpoint}")
        print(f"selected checkpoint: {result.checkpoint}")
    return 0


def _command_line() -> str:
    return " ".join(["mambahome"] + sys.argv[1:])


# The settings that build a network. With --init-checkpoint the network is the checkpoint's, so these were
# read and then silently dropped: `--init-checkpoint tiny.safetensors --preset paper` trained the tiny network
# and train_config.json still said "paper". ``train`` parses them with None ("not given") as the default.
ARCHITECTURE_SETTINGS = ("network", "preset", "target_spacing", "intensity")


def architecture_conflicts(init_checkpoint: str, given: Mapping[str, Any]) -> List[str]:
    """The architecture settings given on the command line that the parent checkpoint contradicts.

    Args:
        init_checkpoint: the parent checkpoint (only its JSON header is read).
        given: the settings the user typed: any of ``network``, ``preset``, ``target_spacing``, ``intensity``
            and ``network_overrides`` (``{field: value}``).

    Returns:
        One ``"--flag X (the checkpoint's: Y)"`` per conflict; empty when every given setting agrees.
    """
    from engine.checkpoint import read_checkpoint_metadata
    from engine.config import ModelConfig

    meta = read_checkpoint_metadata(init_checkpoint)
    net = meta.get("network") if isinstance(meta.get("network"), dict) else {}
    name, config = net.get("name"), net.get("config") or {}
    out: List[str] = []
    if given.get("network") is not None and name is not None and given["network"] != name:
        out.append(f"--network {given['network']} (the checkpoint's: {name})")
    if given.get("preset") is not None and name == "mambahome" and config:
        actual = ModelConfig.preset_of(config)
        if actual != given["preset"]:
            out.append(f"--preset {given['preset']} (the checkpoint's: {actual or 'another size'})")
    spacing = (meta.get("preprocessing") or {}).get("target_spacing")
    if given.get("target_spacing") is not None and spacing is not None and not all(
            abs(float(a) - float(b)) <= 1e-3 for a, b in zip(given["target_spacing"], spacing)):
        out.append(f"--target-spacing {' '.join(map(str, given['target_spacing']))} (the checkpoint's: "
                   f"{' '.join(map(str, spacing))})")
    if given.get("intensity") is not None and isinstance(meta.get("preprocessing"), dict):
        from engine.preprocess import Preprocessing, format_intensity_rule, parse_intensity_rule

        pp = Preprocessing.from_dict(meta["preprocessing"])
        theirs = format_intensity_rule(pp.intensity_for())
        if format_intensity_rule(parse_intensity_rule(given["intensity"])) != theirs:
            out.append(f"--intensity {given['intensity']} (the checkpoint's for {pp.modality}: {theirs})")
    for key, value in (given.get("network_overrides") or {}).items():
        if key not in config or _as_list(config[key]) != _as_list(value):
            had = json.dumps(config[key]) if key in config else "no such setting"
            out.append(f"--override {key}={json.dumps(value)} (the checkpoint's: {had})")
    return out


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


GIVEN = "given_options"  # the namespace attribute where :func:`record_given` lists the options typed


def record_given(parser: argparse.ArgumentParser) -> None:
    """Make every option of ``parser`` note its destination in ``namespace.given_options`` when it is typed, so a
    command can tell an option given on the command line from its default (argparse alone cannot: both just
    leave a value)."""
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of a parser's actions
        if isinstance(action, argparse._HelpAction) or not action.option_strings:  # noqa: SLF001
            continue
        base = type(action)

        def call(self: argparse.Action, parser_: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None, _base: Any = base) -> None:
            given = getattr(namespace, GIVEN, None)
            if given is None:
                given = set()
                setattr(namespace, GIVEN, given)
            given.add(self.dest)
            _base.__call__(self, parser_, namespace, values, option_string)

        action.__class__ = type(base.__name__, (base,), {"__call__": call})


def resume_settings(args: argparse.Namespace, settings: Dict[str, Any], parent_option: str = "init_checkpoint",
                    data: Optional[str] = None, command: str = "train") -> Tuple[Dict[str, Any], Optional[str],
                                                                              Optional[str]]:
    """``train --resume`` / ``finetune --resume``: the settings of the run in ``args.out`` (its ``train_config.json``)
    for every option the command line did not give, so ``train --resume --out R`` (or ``finetune --resume --out R``)
    alone continues R; an option given that contradicts the run is still refused
    (:func:`engine.train.prepare.check_resumable`).

    Args:
        args: the parsed command line (:func:`record_given` noted the options typed).
        settings: :func:`config_settings` of ``args``.
        parent_option: the option naming the start checkpoint: ``init_checkpoint`` (train) or ``checkpoint``
            (finetune's parent); either is recorded as the run's ``init_checkpoint``.
        data: the data folder typed (train's ``--dataset``, finetune's ``--dataset`` or ``--cases``); default
            ``args.dataset``. Either is recorded as the run's ``dataset``.
        command: the command's name, for the messages.

    Returns:
        ``(settings, dataset, start checkpoint)``; as given where the folder has no saved config.
    """
    data = args.dataset if data is None else data
    parent = getattr(args, parent_option)
    saved_path = Path(args.out) / CONFIG_FILE
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8")) if saved_path.is_file() else None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{saved_path}: unreadable ({exc}); give the run's options again with --resume") from exc
    if not isinstance(saved, dict):
        needs = "--dataset" if command == "train" else "--checkpoint and --dataset or --cases"
        if not data or (command != "train" and not parent):
            raise ValueError(f"{args.out}: no {CONFIG_FILE}, so there is no run to resume there (check --out); a new "
                             f"run needs {needs}")
        return settings, data, parent
    from engine.train.prepare import absolute_places

    # places recorded relative (as typed, by a run written before they were recorded absolute) are resolved against
    # the directory the run was started in, where that can be told; the others are only tried from here
    saved, unplaced = absolute_places(saved, args.out)
    given = getattr(args, GIVEN, None) or set()
    out = dict(settings)
    for name in settings:
        typed = name in given or (name == "network_overrides" and "override" in given) or (
            name == "task_options" and "task_option" in given)
        if not typed and name != "resume" and name in saved:
            out[name] = saved[name]
    dataset = data or saved.get("dataset")
    init = parent if parent_option in given else saved.get("init_checkpoint")
    # the run's recorded places that are not found, each with how to give it; all in one message
    missing: List[str] = []
    if not data and dataset and not Path(str(dataset)).exists():
        option = "--dataset" if command == "train" else "--cases (or --dataset)"
        missing.append(_missing_place(
            "dataset", unplaced, f"the run's data folder {dataset}", option,
            f"the same folder, or a moved one holding the run's cases ({SPLIT_FILE})",
            f"if it was moved, resume with {option} and its new place (it must hold the run's cases, {SPLIT_FILE})"))
    if parent_option not in given and init and not Path(str(init)).exists():
        # the resume read the parent from its recorded place and stopped at "checkpoint not found", and giving the
        # new place was refused as "different settings": the run could not be continued
        option = "--init-checkpoint" if command == "train" else "--checkpoint"
        missing.append(_missing_place(
            "init_checkpoint", unplaced, f"the run's parent checkpoint {init}", option,
            "the same file: its SHA-256 is checked",
            f"if it was moved, resume with {option} and its new place (it must be the same file: its SHA-256 is "
            "checked)"))
    replay = out.get("replay")
    if "replay" not in given and replay and not Path(str(replay)).exists():
        missing.append(_missing_place("replay", unplaced, f"the run's replay dataset {replay}", "--replay",
                                      "the same folder", "put it back in its place to resume"))
    if missing:
        raise ValueError(f"{args.out}: " + "; ".join(missing))
    return out, dataset, init


def _missing_place(name: str, unplaced: Collection[str], what: str, option: str, same: str, moved: str) -> str:
    """What :func:`resume_settings` says of a recorded place that is not found: for one recorded relative to a
    directory that cannot be told (:func:`engine.train.prepare.absolute_places`), where to resume from or what to
    give; else that it may have moved (``moved``)."""
    if name in unplaced:
        return (f"{what} ({CONFIG_FILE}) is not found from here: it was recorded relative to the directory the run "
                f"was started in (a run started before places were recorded absolute); resume from that directory, or "
                f"give {option} with its real place ({same})")
    return f"{what} ({CONFIG_FILE}) is not found; {moved}"


def _cli_train(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in ARCHITECTURE_SETTINGS if getattr(args, name) is not None}
    settings = config_settings(args)
    if args.resume:
        settings, args.dataset, args.init_checkpoint = resume_settings(args, settings)
    elif not args.dataset:
        raise ValueError("--dataset is required (the dataset folder to train on); only --resume takes it from the "
                         "run folder")
    if args.init_checkpoint:
        conflicts = architecture_conflicts(args.init_checkpoint,
                                           {**given, "network_overrides": settings.get("network_overrides")})
        if conflicts:
            raise ValueError(f"--init-checkpoint {args.init_checkpoint}: the network, its size, its voxel spacing and "
                             f"intensity rule come from that checkpoint, so {'; '.join(conflicts)} cannot apply; leave them out, or "
                             "train a new network without --init-checkpoint")
    cfg = TrainConfig(dataset=args.dataset, out=args.out, init_checkpoint=args.init_checkpoint,
                      command=_command_line(), **settings)
    return run_with_cli_progress(cfg.steps, args.quiet, lambda progress: loop.train(cfg, progress=progress),
                                 out=args.out)


def _cases_that_are_data(folder: Path) -> str:
    """The way on for a ``--cases`` folder that holds images and labels rather than saved cases: ``--dataset`` takes
    those (made one with ``mambahome dataset``); "save a corrected case first" alone sent such a user to napari."""
    from engine.formats import volume_suffix

    try:
        entries = list(folder.iterdir())
        holds_volumes = any(e.is_file() and volume_suffix(e.name) for e in entries) or any(
            d.is_dir() and any(f.is_file() and volume_suffix(f.name) for f in d.iterdir()) for d in entries)
    except OSError:
        return ""
    if not holds_volumes:
        return ""
    from engine.datasets import making_a_dataset

    return (f". It holds volume files: --cases takes saved cases; images and labels of your own go in with --dataset "
            f"once they are a dataset. {making_a_dataset(folder)}")


def _cli_finetune(args: argparse.Namespace) -> int:
    data = args.dataset or args.cases
    settings = config_settings(args)  # first: it refuses an unknown --task
    if args.cases and not Path(args.cases).is_dir():
        # said here: the dataset reader would call it a "dataset folder"
        raise ValueError(f"{args.cases}: case folder not found (--cases takes the folder napari's Cases "
                         "section saves corrected cases in)")
    if args.cases and not args.resume and not (Path(args.cases) / DATASET_JSON).is_file() and not is_case_store(
            args.cases):
        # the dataset reader's answer here ("not a dataset ... mambahome dataset --images") points a user whose store
        # is simply empty at building an nnU-Net dataset
        raise ValueError(f"{args.cases}: no saved cases in this case store (no case folder with a case.json); save "
                         "at least one corrected case first (napari's Cases section, or the server's save), then "
                         "fine-tune" + _cases_that_are_data(Path(args.cases)))
    if args.resume:
        # as train --resume: the options not typed (the parent, the data too) are the run's own
        settings, data, args.checkpoint = resume_settings(args, settings, parent_option="checkpoint", data=data,
                                                          command="finetune")
    elif not args.checkpoint or not data:
        missing = " and ".join(m for m, ok in (("--checkpoint", args.checkpoint), ("--dataset or --cases", data))
                               if not ok)
        raise ValueError(f"{missing} required (the parent model and the cases to fine-tune it on); only --resume "
                         "takes them from the run folder")
    # steps None: finetune() decides; the bar takes the run's total from its first report
    return run_with_cli_progress(settings["steps"], args.quiet, lambda progress: finetune_module.finetune(
        args.checkpoint, data, args.out, progress=progress, command=_command_line(), **settings), out=args.out)


def register_cli(subparsers: Any) -> None:
    """Add ``mambahome train`` and ``mambahome finetune``."""
    p = subparsers.add_parser("train", help="train a segmentation network on a dataset",
                              description="Train Mamba-HoME (or a MONAI peer) on a labelled dataset. "
                                          "Multi-GPU: torchrun --nproc_per_node N -m engine.cli train ...")
    p.add_argument("--dataset", help="nnU-Net v2 / MSD dataset folder or case store (required, except with "
                                     "--resume: the run's own)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, curves)")
    p.add_argument("--init-checkpoint", default=None,
                   help="start from this checkpoint's weights; an automatic (segmentation) checkpoint with --task "
                        "interactive warm-starts a promptable model (guidance channels added with zero weights)")
    add_override_argument(p)
    add_task_option_argument(p)
    add_config_arguments(p)
    # None = not typed (the help still shows the default; config_settings fills it in): with --init-checkpoint a
    # typed value must agree with the checkpoint's network
    p.set_defaults(**{name: None for name in ARCHITECTURE_SETTINGS})
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # with --resume the options not typed are the run's own (resume_settings)
    record_given(p)
    p.set_defaults(func=_cli_train)

    p = subparsers.add_parser("finetune", help="fine-tune a checkpoint on a dataset or corrected cases",
                              description="Fine-tune a model on new cases; classes are matched by name. "
                                          "--task interactive on an automatic (segmentation) checkpoint makes a "
                                          "promptable model from it (a warm start, as train --task interactive "
                                          "--init-checkpoint); an interactive checkpoint keeps its task.")
    p.add_argument("--checkpoint", help="parent model .safetensors (required, except with --resume: the run's own)")
    src = p.add_mutually_exclusive_group()  # one of them is required, except with --resume (_cli_finetune)
    src.add_argument("--dataset", help="nnU-Net v2 / MSD dataset folder (or --cases; except with --resume: the "
                                       "run's own)")
    src.add_argument("--cases", help="case store folder (corrected cases saved from napari)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, curves)")
    # the architecture comes from the parent checkpoint
    add_task_option_argument(p, "; only when --task interactive warm-starts from an automatic checkpoint")
    # steps left None: finetune() gives 200, or with --max-minutes as many as the budget allows
    add_config_arguments(p, defaults={**finetune_defaults(), "steps": None, "task": None},
                         exclude=("network", "preset", "target_spacing", "intensity", "deep_supervision"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # with --resume the options not typed are the run's own (resume_settings)
    record_given(p)
    p.set_defaults(func=_cli_finetune)

