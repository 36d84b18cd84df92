"""``mambahome prompt``: one object of one volume from points, boxes and scribbles on the command line.

The batch twin of the napari panel: the prompts a script or a worklist holds (a lesion's centre from a report,
a box from a detector, a scribble drawn in another tool) become a mask on the input's own grid, through the
same :class:`engine.interactive.InteractiveSession` the panel and the server use. Prompts apply in the order
given on the command line (after ``--initial-mask``); each one refines the object the previous ones made.

Coordinates are voxel indices ``i j k`` of the file as loaded (the order of the array nibabel returns, as in
the session), or with ``--world`` RAS millimetres (what 3D Slicer shows), mapped through the file's affine to
the nearest voxel.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from engine.interactive.prompts import InteractionError
from mambahome_client.geometry import world_to_voxel

PathLike = Union[str, os.PathLike]

PROMPT_NUMBERS = {"point": 3, "box": 6, "scribble": 0}
"""Numbers each prompt kind takes (0: a mask file), on the command line and in a worklist alike."""
PROMPT_OPTIONS = {f"--{sign}{kind}": (kind, not sign, count)
                  for sign in ("", "negative-") for kind, count in PROMPT_NUMBERS.items()}
"""option -> (kind, positive, numbers it takes)."""


def prompt_numbers(kind: str, words: Sequence[str]) -> List[float]:
    """The finite numbers a ``kind`` prompt takes, from ``words``; :class:`InteractionError` saying what it got."""
    try:
        numbers = [float(w) for w in words]
    except ValueError:
        numbers = []
    if len(numbers) != PROMPT_NUMBERS[kind] or not all(np.isfinite(numbers)):
        raise InteractionError(f"a {kind} takes {PROMPT_NUMBERS[kind]} numbers, got {' '.join(words) or 'none'}")
    return numbers


class _PromptAction(argparse.Action):
    """Collects every prompt option into one list, in command-line order (the order the session applies)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        kind, positive, count = PROMPT_OPTIONS[str(option_string)]
        value: Any = str(values)
        if count:
            try:
                value = prompt_numbers(kind, values)
            except InteractionError:
                parser.error(f"{option_string} takes {count} numbers, got {' '.join(values)}")
        prompts = list(getattr(namespace, self.dest, None) or [])
        prompts.append((kind, positive, value))
        setattr(namespace, self.dest, prompts)


def _mask_file(path: str, reference: Any, what: str) -> np.ndarray:
    """A mask file (non-zero = inside) on the input's grid, as a boolean array."""
    from engine.io import load_label, onto_grid

    # the same voxels in another axis order/direction (e.g. DICOM slice order) are reoriented, not refused
    mask = onto_grid(load_label(path), reference, what=what, reference_what="input")
    return np.asarray(mask.data) != 0


def apply_prompts(session: Any, volume: Any, prompts: Sequence[Tuple[str, bool, Any]], *, world: bool = False,
                  log: Any = None, where: Sequence[str] = ()) -> np.ndarray:
    """Apply ``prompts`` (``(kind, positive, numbers or mask file)``) to the session's object, in order; its mask.

    Args:
        where: how to name each prompt in an error (default "prompt N"; a worklist gives its line).

    Raises:
        InteractionError: a prompt outside the volume, a box of zero size, an empty scribble (named).
    """
    from engine.io import VolumeError

    for number, (kind, positive, value) in enumerate(prompts, 1):
        sign = "" if positive else "negative "
        try:
            if kind == "scribble":
                update = session.add_scribble(_mask_file(value, volume, f"{sign}scribble"), positive=positive)
            else:
                coords = np.asarray(value, dtype=float).reshape(-1, 3)
                if not world and np.any(coords != np.round(coords)):
                    # 31.5 was rounded to 32 without a word: a fractional number is a world coordinate given
                    # without --world far more often than a voxel the user meant to round
                    shown = " ".join(f"{v:g}" for v in coords.ravel() if v != np.round(v))
                    raise InteractionError(f"voxel indices are whole numbers, got {shown}; give world coordinates "
                                           "(mm, fractional allowed) with --world")
                # the nearest voxel, of RAS millimetres under the file's affine as Slicer's client maps them
                coords = world_to_voxel(coords, volume.affine) if world else np.round(coords)
                if kind == "point":
                    update = session.add_point(coords[0], positive=positive)
                else:
                    update = session.add_box(coords[0], coords[1], positive=positive)
        except (InteractionError, VolumeError) as exc:
            name = where[number - 1] if len(where) >= number else f"prompt {number}"
            raise InteractionError(f"{name} ({sign}{kind} {value}): {exc}") from None
        if log is not None:
            log(f"prompt {number}: {sign}{kind} -> {int(session.mask.sum())} voxels ({update.latency_s:.2f} s)")
    return session.mask


def run_prompts(checkpoint: str, volume: Any, prompts: Sequence[Tuple[str, bool, Any]], *,
                initial_mask: Optional[np.ndarray] = None, world: bool = False, modality: Optional[str] = None,
                device: str = "auto", log: Any = None) -> np.ndarray:
    """One object of ``volume`` from ``prompts`` (after ``initial_mask``); its mask on the volume's grid.

    Raises:
        InteractionError: a bad prompt (named by its place on the command line), a non-interactive checkpoint.
    """
    from engine.interactive import InteractiveSession

    session = InteractiveSession(checkpoint, volume, device=device, modality=modality)
    if initial_mask is not None:
        session.set_initial_mask(initial_mask.astype(np.uint8))
    return apply_prompts(session, volume, prompts, world=world, log=log)


# ---------------------------------------------------------------- worklists
WORKLIST_COLUMNS = ("image", "label", "prompt")


@dataclass
class WorklistImage:
    """The objects a worklist asks of one image: ``{label value: [(prompt, "line N"), ...]}`` in file order."""

    path: Path
    objects: Dict[int, List[Tuple[Tuple[str, bool, Any], str]]] = field(default_factory=dict)


def parse_prompt_text(text: str, base: Path) -> Tuple[str, bool, Any]:
    """``"point 41 50 25"``, ``"-point ..."``, ``"box i0 j0 k0 i1 j1 k1"``, ``"-box ..."``, ``"scribble mask.nii.gz"``
    or ``"-scribble ..."`` (a leading ``-`` makes it negative; a relative mask path is taken from ``base``)."""
    words = str(text).split()
    if not words:
        raise InteractionError("empty prompt")
    kind, positive = words[0].lower(), True
    if kind.startswith("-"):
        kind, positive = kind[1:], False
    if kind not in PROMPT_NUMBERS:
        raise InteractionError(f"unknown prompt {words[0]!r}: point, box or scribble (a leading - for negative)")
    if PROMPT_NUMBERS[kind] == 0:
        if len(words) != 2:
            raise InteractionError(f"a scribble takes one mask file, got {' '.join(words[1:]) or 'none'}")
        path = Path(words[1])
        return kind, positive, str(path if path.is_absolute() else base / path)
    return kind, positive, prompt_numbers(kind, words[1:])


def _worklist_row(row: Dict[str, Any], path: Path) -> Tuple[Path, int, Any]:
    """``(image, label, prompt)`` of one worklist row; :class:`InteractionError` saying what is wrong with it."""
    image = Path((row.get("image") or "").strip())
    if not str(image):
        raise InteractionError("no image")
    image = image if image.is_absolute() else path.parent / image
    try:
        label = int(str(row.get("label") or "").strip())
    except ValueError:
        raise InteractionError(f"label {row.get('label')!r} is not a whole number") from None
    if not 1 <= label <= 65535:
        raise InteractionError(f"label {label} must be 1..65535 (0 is background)")
    return image, label, parse_prompt_text(row.get("prompt") or "", path.parent)


def read_worklist(path: PathLike) -> List[WorklistImage]:
    """Parse a worklist CSV (columns ``image,label,prompt``; one prompt per row; an object is the rows of one
    image and label, in file order). Every row is checked before any image is read.

    Raises:
        InteractionError: a missing column, a bad label value or prompt (every bad row named by its line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InteractionError(f"{path}: cannot read the worklist ({exc})") from None
    rows = csv.DictReader(io.StringIO(text))
    missing = [c for c in WORKLIST_COLUMNS if c not in (rows.fieldnames or [])]
    if missing:
        raise InteractionError(f"{path}: the worklist needs the columns {', '.join(WORKLIST_COLUMNS)} "
                               f"(header line); missing {', '.join(missing)}")
    images: Dict[Path, WorklistImage] = {}
    problems: List[str] = []  # every bad row named at once: a worklist of 200 rows is not fixed one error per run
    for line, row in enumerate(rows, 2):
        where = f"{path.name} line {line}"
        try:
            image, label, prompt = _worklist_row(row, path)
        except InteractionError as exc:
            problems.append(f"{where}: {exc}")
            continue
        entry = images.setdefault(image, WorklistImage(image))
        entry.objects.setdefault(label, []).append((prompt, where))
    if len(problems) == 1:
        raise InteractionError(problems[0])
    if problems:
        raise InteractionError(f"{path}: {len(problems)} rows cannot be used; nothing was segmented:\n  "
                               + "\n  ".join(problems))
    if not images:
        raise InteractionError(f"{path}: the worklist has no rows")
    return list(images.values())


def output_name(image: Path) -> str:
    """The label map's file name for an image: its name, NIfTI for a DICOM series folder."""
    from engine.formats import suffix_of

    if image.is_dir():
        return f"{image.name}.nii.gz"
    suffix = suffix_of(image.name) or ".nii.gz"
    return image.name[: -len(suffix)] + (".nii.gz" if suffix in (".dcm", ".ima") else suffix)


def run_worklist(checkpoint: str, worklist: PathLike, out_dir: PathLike, *, world: bool = False,
                 modality: Optional[str] = None, device: str = "auto", overwrite: bool = False,
                 skip_existing: bool = False, log: Any = None) -> Dict[str, Any]:
    """Every object of every image of a worklist into one label map per image in ``out_dir``.

    Objects are drawn in the worklist's order of labels; a later object fills only voxels no earlier one took
    (as the napari panel with "overwrite" off). An image that fails (unreadable, a bad prompt) is reported and
    skipped with nothing written for it; the others are written. An image that looks like a label map
    (:func:`engine.io.looks_like_label_map`) is prompted all the same, with a UserWarning naming it.

    Args:
        overwrite: replace existing label maps; by default any existing one stops the run before it starts.
        skip_existing: leave out the images whose label map exists already (each was written whole: a finished part
            of an earlier, interrupted run) and prompt the rest, as ``predict --skip-existing``; not with
            ``overwrite``.
        log: told one line per object, and the notes (``note: ...``) of ``skip_existing`` and of an interruption.

    Returns:
        ``{"written": [paths], "failed": {image: message naming it}, "kept": [paths left by skip_existing]}``.
    """
    from engine.checkpoint import load_checkpoint, read_checkpoint_metadata
    from engine.inference import OVERWRITE_OR_SKIP, interrupted_note, skip_existing_note
    from engine.interactive import InteractiveSession
    from engine.interactive.session import interactive_encoding
    from engine.io import VolumeError, check_writable_grid, load_volume, save_volume

    if overwrite and skip_existing:
        raise InteractionError(OVERWRITE_OR_SKIP)
    images = read_worklist(worklist)
    interactive_encoding(read_checkpoint_metadata(checkpoint), str(checkpoint))  # refuse before any work
    model = load_checkpoint(checkpoint, device="cpu")
    out_dir = Path(out_dir)
    jobs = [(entry, out_dir / output_name(entry.path)) for entry in images]
    inputs = [entry.path for entry in images]
    finished: List[Path] = []
    if skip_existing:
        # Label maps appear whole or not at all (save_volume writes atomically), so an existing one is a finished
        # result of an earlier run: after Ctrl-C the rerun prompts only the rest. An output that is an input is
        # refused whatever the flags.
        _check_outputs(inputs, [out for _, out in jobs], overwrite=True)
        finished = [out for _, out in jobs if os.path.lexists(out)]
        if finished and log is not None:
            log(skip_existing_note(finished, len(jobs)))
        jobs = [(entry, out) for entry, out in jobs if out not in finished]
    _check_outputs(inputs, [out for _, out in jobs], overwrite, skip_existing=True)
    written, failed = [], {}
    for entry, output in jobs:
        try:
            try:
                volume = load_volume(entry.path)
            except VolumeError as exc:
                # "scans/x.nii.gz: file not found" left the user to search the worklist for the row to mend
                raise VolumeError(f"{exc} ({_lines_of(entry)})") from None
            check_writable_grid(output, volume)  # before its prompts run, not after
            _warn_if_label_map(volume, entry.path)
            session = InteractiveSession(model, volume, device=device, modality=modality or _file_modality(volume))
            labels = np.zeros(volume.shape, _label_dtype(max(entry.objects)))
            for label, prompts in entry.objects.items():
                session.reset()
                mask = apply_prompts(session, volume, [p for p, _ in prompts], world=world,
                                     where=[w for _, w in prompts]).astype(bool)
                free = mask & (labels == 0)
                labels[free] = label
                if log is not None:
                    taken = int(mask.sum()) - int(free.sum())
                    kept = f" ({taken} of them already taken by earlier labels, kept there)" if taken else ""
                    log(f"{entry.path.name}: label {label}: {int(mask.sum())} voxels from {len(prompts)} prompt(s)"
                        + kept)
            out_dir.mkdir(parents=True, exist_ok=True)
            written.append(save_volume(output, labels, volume, overwrite=overwrite, label_map=True))
        except KeyboardInterrupt:
            # "interrupted" alone left the user guessing what was kept, and the rerun refused the finished maps
            note = interrupted_note(len(written), len(jobs), out_dir, output)
            if note and log is not None:
                log(note)
            raise
        except (InteractionError, VolumeError) as exc:
            message = str(exc)  # the reader's messages start with the file already
            failed[str(entry.path)] = message if message.startswith(str(entry.path)) else f"{entry.path}: {message}"
            if log is not None:
                log(f"error: {failed[str(entry.path)]}")
    return {"written": [str(p) for p in written], "failed": failed, "kept": [str(p) for p in finished]}


def _lines_of(entry: WorklistImage) -> str:
    """Where the worklist names an image: "worklist.csv line 4" or "worklist.csv lines 2, 4"."""
    wheres = [where for prompts in entry.objects.values() for _, where in prompts]
    name = wheres[0].rsplit(" line ", 1)[0]
    lines = sorted({int(w.rsplit(" line ", 1)[1]) for w in wheres})
    return f"{name} line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}"


def _check_outputs(inputs: Sequence[PathLike], outputs: Sequence[Path], overwrite: bool,
                   skip_existing: bool = False) -> None:
    """``predict``'s output checks, its advice in ``prompt``'s options: ``--skip-existing`` only where the command has
    it (``--worklist``; a user who followed that advice for one object got "unrecognized arguments")."""
    from engine.inference import check_output_paths, keep_advice

    check_output_paths(inputs, outputs, overwrite, advice=keep_advice("--overwrite", skip_existing=skip_existing))


def _warn_if_label_map(volume: Any, name: PathLike) -> None:
    """A UserWarning naming ``name`` when its voxels look like a label map: a mask given as the scan was prompted
    without a word; the user may mean it, so it is said, not refused."""
    from engine.io import looks_like_label_map
    from engine.preprocess import label_map_image_message

    if looks_like_label_map(volume.data):
        warnings.warn(label_map_image_message(name), UserWarning, stacklevel=2)


def _check_output_type(output: PathLike) -> None:
    """Refuse an output file type the writer lacks (``mask.txt``) before the scan is read: the refusal used to come
    from ``save_volume``, after every prompt had run through the network."""
    from engine.io import check_output_type

    check_output_type(output)


def _label_dtype(largest: int) -> Any:
    return np.uint8 if largest < 256 else np.uint16


def _file_modality(volume: Any) -> Optional[str]:
    return volume.modality if volume.modality_source in ("file", "guessed") else None


def _cli(args: argparse.Namespace) -> int:
    from engine.inference import modality_option_note
    from engine.io import check_writable_grid, load_volume, save_volume

    note = modality_option_note(args.modality)  # an unknown name fell back to the 'other' rule without a word
    if note:
        print(f"note: {note}", file=sys.stderr)
    if args.worklist is not None:
        return _cli_worklist(args)
    if args.input is None or args.output is None:
        raise InteractionError("give --input and --output (one object), or --worklist and --output-dir (many)")
    if args.skip_existing:
        raise InteractionError("--skip-existing goes with --worklist (it keeps the label maps an earlier run wrote); "
                               "for one object, pass --overwrite or choose another output")
    if not args.prompts and args.initial_mask is None:
        raise InteractionError("no prompt: give at least one --point, --box or --scribble (or --initial-mask)")
    if not 1 <= args.label_value <= 65535:
        raise InteractionError(f"--label-value must be 1..65535, got {args.label_value}")
    _check_output_type(args.output)
    _check_outputs([args.input], [args.output], args.overwrite)
    # an automatic (or unreadable) checkpoint is refused before the scan is read, as the worklist does: it used to
    # print the scan's shape line first, as if prompting had started
    from engine.checkpoint import read_checkpoint_metadata
    from engine.interactive.session import interactive_encoding

    interactive_encoding(read_checkpoint_metadata(args.checkpoint), str(args.checkpoint))
    volume = load_volume(args.input)
    check_writable_grid(args.output, volume)  # a grid the output's format cannot hold: refused before any prompt
    _warn_if_label_map(volume, args.input)
    modality = args.modality or _file_modality(volume)
    initial = None if args.initial_mask is None else _mask_file(args.initial_mask, volume, "initial mask")
    started = time.perf_counter()
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    if log is not None:
        log(f"{args.input}: shape {volume.shape}, modality {modality or 'as the model'}")
    mask = run_prompts(args.checkpoint, volume, args.prompts or [], initial_mask=initial, world=args.world,
                       modality=modality, device=args.device, log=log)
    value = int(args.label_value)
    dtype = _label_dtype(value)
    save_volume(args.output, mask.astype(dtype) * dtype(value), volume, overwrite=args.overwrite, label_map=True)
    print(f"{args.output}: {int(mask.sum())} voxels of label {value} "
          f"({len(args.prompts or [])} prompt(s), {time.perf_counter() - started:.1f} s)")
    return 0


def _cli_worklist(args: argparse.Namespace) -> int:
    if args.input is not None or args.output is not None or args.prompts or args.initial_mask is not None:
        raise InteractionError("--worklist takes its images and prompts from the file: give --output-dir, not "
                               "--input/--output or prompt options")
    if args.output_dir is None:
        raise InteractionError("--worklist needs --output-dir (one label map per image)")

    def log(line: str) -> None:
        # --quiet leaves out the per-object lines, not what was kept (--skip-existing) or an interruption's account
        if not args.quiet or line.startswith("note:"):
            print(line, file=sys.stderr)

    result = run_worklist(args.checkpoint, args.worklist, args.output_dir, world=args.world, modality=args.modality,
                          device=args.device, overwrite=args.overwrite, skip_existing=args.skip_existing, log=log)
    kept = f" ({len(result['kept'])} more kept from before)" if result["kept"] else ""
    print(f"{len(result['written'])} label map(s) in {args.output_dir}{kept}"
          + (f"; {len(result['failed'])} image(s) failed, nothing written for them:" if result["failed"] else ""))
    for message in result["failed"].values():
        print(f"  {message}")
    # predict's rule (engine.inference.NoInputSegmented): 1 = finished with some images skipped, the others written;
    # every image failed = nothing came of the run, 2 as for any bad input (1 would read as "done, some left out")
    if result["failed"] and not result["written"]:
        return 2
    return 1 if result["failed"] else 0


def register_cli(subparsers: Any) -> None:
    """Add ``mambahome prompt``."""
    p = subparsers.add_parser(
        "prompt", help="segment one object of a volume from points, boxes and scribbles (interactive model)",
        description="One object from prompts, with an interactive checkpoint (the bundled one: "
                    "napari_mambahome/models/interactive.safetensors). Prompts apply in the order given; "
                    "coordinates are voxel indices i j k of the file as loaded, or RAS mm with --world. "
                    "Example: mambahome prompt --checkpoint C --input scan.nii.gz --output mask.nii.gz "
                    "--box 20 30 10 60 70 40 --point 41 50 25 --negative-point 30 52 25")
    p.add_argument("--checkpoint", required=True, help="interactive model .safetensors (trained with --task interactive)")
    p.add_argument("--input", default=None, help="the volume (NIfTI, NRRD, MHA, MGZ or a DICOM series folder)")
    p.add_argument("--output", default=None, help="the mask file, on the input's grid (format from its extension)")
    p.add_argument("--worklist", default=None, metavar="CSV",
                   help="many objects of many images instead: a CSV with columns image,label,prompt (prompt as "
                        "'point I J K', '-point I J K', 'box I0 J0 K0 I1 J1 K1', 'scribble MASK'; the rows of one "
                        "image and label make one object, in file order); one label map per image in --output-dir")
    p.add_argument("--output-dir", default=None, help="with --worklist: the folder for the label maps")
    for option, (kind, positive, count) in PROMPT_OPTIONS.items():
        sign = "positive" if positive else "negative"
        if count == 3:
            p.add_argument(option, dest="prompts", nargs=3, metavar=("I", "J", "K"), action=_PromptAction,
                           help=f"a {sign} click at a voxel: whole-number indices, or RAS mm with --world (repeatable)")
        elif count == 6:
            p.add_argument(option, dest="prompts", nargs=6, metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                           action=_PromptAction, help=f"a {sign} box between two corner voxels (whole numbers, or mm with --world), inclusive; equal "
                                                      "corners on one axis: a 2D box on that slice (repeatable)")
        else:
            p.add_argument(option, dest="prompts", metavar="MASK", action=_PromptAction,
                           help=f"a {sign} scribble: the non-zero voxels of a mask file on the input's grid")
    p.add_argument("--initial-mask", default=None, metavar="MASK",
                   help="start from this mask (non-zero voxels) and refine it with the prompts")
    p.add_argument("--world", action="store_true", help="point and box coordinates are RAS millimetres")
    p.add_argument("--modality", default=None,
                   help="intensity rule (CT, MR, US...; default: the file's, else the model's)")
    p.add_argument("--label-value", type=int, default=1, help="the value of the object in the output (default 1)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (never the input)")
    p.add_argument("--skip-existing", action="store_true",
                   help="with --worklist: keep the label maps that exist already and prompt only the images without "
                        "one (to finish a worklist after Ctrl-C: label maps are written whole or not at all)")
    p.add_argument("--quiet", action="store_true", help="no per-prompt lines on stderr")
    p.set_defaults(func=_cli, prompts=None)
