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
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from engine.interactive.prompts import InteractionError

PROMPT_OPTIONS = {
    # option: (kind, positive, numbers it takes; 0 = a mask file)
    "--point": ("point", True, 3),
    "--negative-point": ("point", False, 3),
    "--box": ("box", True, 6),
    "--negative-box": ("box", False, 6),
    "--scribble": ("scribble", True, 0),
    "--negative-scribble": ("scribble", False, 0),
}


class _PromptAction(argparse.Action):
    """Collects every prompt option into one list, in command-line order (the order the session applies)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        kind, positive, count = PROMPT_OPTIONS[str(option_string)]
        if count:
            try:
                numbers = [float(v) for v in values]
            except ValueError:
                parser.error(f"{option_string} takes {count} numbers, got {' '.join(values)}")
            value: Any = numbers
        else:
            value = str(values)
        prompts = list(getattr(namespace, self.dest, None) or [])
        prompts.append((kind, positive, value))
        setattr(namespace, self.dest, prompts)


def world_to_voxel(affine: np.ndarray, point: Sequence[float]) -> np.ndarray:
    """The voxel index ``(i, j, k)`` (real-valued) of a RAS millimetre point under the file's affine."""
    return (np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.append(np.asarray(point, float), 1.0))[:3]


def _mask_file(path: str, reference: Any, what: str) -> np.ndarray:
    """A mask file (non-zero = inside) on the input's grid, as a boolean array."""
    from engine.io import check_same_grid, load_label

    mask = load_label(path)
    check_same_grid(mask, reference, what=what, reference_what="input")
    return np.asarray(mask.data) != 0


def run_prompts(checkpoint: str, volume: Any, prompts: Sequence[Tuple[str, bool, Any]], *,
                initial_mask: Optional[np.ndarray] = None, world: bool = False, modality: Optional[str] = None,
                device: str = "auto", log: Any = None) -> np.ndarray:
    """Apply ``prompts`` (``(kind, positive, numbers or mask file)``) to one object of ``volume``; its mask.

    Raises:
        InteractionError: a prompt outside the volume, a box of zero size, an empty scribble, a
            non-interactive checkpoint (the message names the prompt by its place on the command line).
    """
    from engine.interactive import InteractiveSession

    session = InteractiveSession(checkpoint, volume, device=device, modality=modality)
    if initial_mask is not None:
        session.set_initial_mask(initial_mask.astype(np.uint8))
    for number, (kind, positive, value) in enumerate(prompts, 1):
        sign = "" if positive else "negative "
        try:
            if kind == "scribble":
                update = session.add_scribble(_mask_file(value, volume, f"{sign}scribble"), positive=positive)
            else:
                coords = np.asarray(value, dtype=float).reshape(-1, 3)
                if world:
                    coords = np.stack([world_to_voxel(volume.affine, c) for c in coords])
                coords = np.round(coords)
                if kind == "point":
                    update = session.add_point(coords[0], positive=positive)
                else:
                    update = session.add_box(coords[0], coords[1], positive=positive)
        except InteractionError as exc:
            raise InteractionError(f"prompt {number} ({sign}{kind} {value}): {exc}") from None
        if log is not None:
            log(f"prompt {number}: {sign}{kind} -> {int(session.mask.sum())} voxels ({update.latency_s:.2f} s)")
    return session.mask


def _file_modality(volume: Any) -> Optional[str]:
    return volume.modality if volume.modality_source in ("file", "guessed") else None


def _cli(args: argparse.Namespace) -> int:
    from engine.inference import check_output_paths
    from engine.io import load_volume, save_volume

    if not args.prompts and args.initial_mask is None:
        raise InteractionError("no prompt: give at least one --point, --box or --scribble (or --initial-mask)")
    if not 1 <= args.label_value <= 65535:
        raise InteractionError(f"--label-value must be 1..65535, got {args.label_value}")
    check_output_paths([args.input], [args.output], args.overwrite)
    volume = load_volume(args.input)
    modality = args.modality or _file_modality(volume)
    initial = None if args.initial_mask is None else _mask_file(args.initial_mask, volume, "initial mask")
    started = time.perf_counter()
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    if log is not None:
        log(f"{args.input}: shape {volume.shape}, modality {modality or 'as the model'}")
    mask = run_prompts(args.checkpoint, volume, args.prompts or [], initial_mask=initial, world=args.world,
                       modality=modality, device=args.device, log=log)
    value = int(args.label_value)
    dtype = np.uint8 if value < 256 else np.uint16
    save_volume(args.output, mask.astype(dtype) * dtype(value), volume, overwrite=args.overwrite)
    print(f"{args.output}: {int(mask.sum())} voxels of label {value} "
          f"({len(args.prompts or [])} prompt(s), {time.perf_counter() - started:.1f} s)")
    return 0


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
    p.add_argument("--input", required=True, help="the volume (NIfTI, NRRD, MHA, MGZ or a DICOM series folder)")
    p.add_argument("--output", required=True, help="the mask file, on the input's grid (format from its extension)")
    for option, (kind, positive, count) in PROMPT_OPTIONS.items():
        sign = "positive" if positive else "negative"
        if count == 3:
            p.add_argument(option, dest="prompts", nargs=3, metavar=("I", "J", "K"), action=_PromptAction,
                           help=f"a {sign} click at a voxel (repeatable)")
        elif count == 6:
            p.add_argument(option, dest="prompts", nargs=6, metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                           action=_PromptAction, help=f"a {sign} box between two corner voxels, inclusive; equal "
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
    p.add_argument("--quiet", action="store_true", help="no per-prompt lines on stderr")
    p.set_defaults(func=_cli, prompts=None)
