"""Dataset layouts -> a list of cases.

Three layouts are read:

- **MSD** (Medical Segmentation Decathlon): ``dataset.json`` with a ``training`` list of
  ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``; preferred whenever the
  list is present (an nnU-Net-style ``dataset.json`` may carry it too, e.g. the shared hippocampus
  set, whose images have no ``_0000`` suffix). nnU-Net v1 lists ``./imagesTr/x.nii.gz`` for files named
  ``x_0000.nii.gz`` (``_0001``... per modality): an entry whose image is missing takes those. An entry may add ``"modality": "CT"`` to override the
  dataset's modality for that case (a mixed CT/MR set: each case is normalised by its own rule), and
  ``"weight": 5`` to draw that case's training patches 5 times as often as a case of weight 1 (a set that
  pools sources of very different sizes: one CT among 160 brain MRIs).
- **nnU-Net v2 raw**: ``dataset.json`` with ``channel_names``, ``labels`` (name -> id) and
  ``file_ending``; images ``imagesTr/<case>_<XXXX><ending>`` (one per channel), labels
  ``labelsTr/<case><ending>``. Volume files there with another ending are refused, named (nnU-Net ignores them, so
  a case saved in another format would silently drop out of training).
- **case store** (:mod:`engine.cases`): folders with ``case.json``, ``image.nii.gz``, ``label.nii.gz``.

Case ids and class names go through :func:`engine.names.safe_name` (they become file names, e.g.
a prediction per case). Image and label paths in a ``dataset.json`` must lie inside the dataset
folder unless the caller passes ``allow_outside=True`` (symlinks placed in the folder are the user's
choice and are followed; a ``../`` or an absolute path in the record is refused).

Files are checked for existence when the dataset is read; label contents are checked when a case
is loaded (``class_ids`` in :mod:`engine.preprocess`) or up front with ``Dataset.validate(deep=True)``.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import warnings
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from engine.cases import CASE_JSON
from engine.formats import is_dicom_folder, segment_names, volume_suffix
from engine.io import (GRID_ATOL, NAN_VOXELS_FIX, PathLike, VolumeError, check_finite_voxels, is_nifti, is_reoriented,
                       length_unit_words, load_label, load_volume, looks_like_label_map, read_grid,
                       unit_mismatch)
from engine.names import UnsafeNameError, is_within, safe_name
from engine.modality import channel_names as _channel_names
from engine.preprocess import label_map_image_message, normalize_modality

DATASET_JSON = "dataset.json"


class DatasetError(ValueError):
    """A dataset folder that cannot be used; the message names the file or case."""


@dataclass
class CaseRef:
    """One labelled case of a dataset (paths only; nothing is read).

    Attributes:
        case_id: unique id within the dataset.
        image: image file, or a list of per-channel files (nnU-Net multi-channel).
        label: label file.
        modality: ``CT``/``MR``/``US``/``other``.
        weight: how often training draws this case's patches, relative to the other cases (default 1).
    """

    case_id: str
    image: Union[Path, List[Path]]
    label: Optional[Path]
    modality: str
    weight: float = 1.0

    @property
    def image_files(self) -> List[Path]:
        return list(self.image) if isinstance(self.image, (list, tuple)) else [self.image]


@dataclass
class Dataset:
    """A dataset read by :func:`load_dataset`.

    Attributes:
        name: dataset name (``dataset.json`` ``name`` or the folder name).
        root: dataset folder.
        cases: cases sorted by id.
        class_names: index = label value, 0 = background.
        modality: dataset modality (from the first channel name).
        channel_names: input channel names in channel order.
        layout: ``"msd"``, ``"nnunet"`` or ``"casestore"``.
    """

    name: str
    root: Path
    cases: List[CaseRef]
    class_names: List[str]
    modality: str
    channel_names: List[str] = field(default_factory=list)
    layout: str = "nnunet"

    @property
    def case_ids(self) -> List[str]:
        return [c.case_id for c in self.cases]

    def case(self, case_id: str) -> CaseRef:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise DatasetError(f"{self.root}: no case {case_id!r}")

    def validate(self, deep: bool = False) -> None:
        """Check every case; raise one :class:`DatasetError` listing all problems found.

        Args:
            deep: also read every label map (values within ``class_names``, integral) and every
                image header (label on the image's grid, channels on one grid). Without ``deep``,
                only file existence is checked.
        """
        problems: List[str] = []
        class_ids = list(range(len(self.class_names)))
        for case in self.cases:
            files = case.image_files + ([case.label] if case.label is not None else [])
            missing = [str(p) for p in files if not (Path(p).is_file() or is_dicom_folder(p))]
            if missing:
                problems.append(f"case {case.case_id}: missing {', '.join(missing)}")
                continue
            if not deep:
                continue
            grids, label = None, None  # both read, so one run names an unreadable label and an off-grid channel
            try:
                grids = [read_grid(p) for p in case.image_files]
            except VolumeError as exc:
                problems.append(f"case {case.case_id}: {exc}")
            if case.label is not None:
                try:
                    label = load_label(case.label, class_ids=class_ids)
                except VolumeError as exc:
                    problems.append(f"case {case.case_id}: {exc}")
            if grids is not None:
                problems.extend(_grid_problems(case, grids, label))
        if problems:
            raise DatasetError(_problem_report(self.root, problems))


MAX_PROBLEMS_SHOWN = 20
"""Problems a dataset check lists one by one; the rest are counted."""


HINT_NAMES_SHOWN = 3
"""Cases a hint said once for several problems names (:func:`_hints_once`); the rest are counted."""

# Advice that several problems of one report would each end with, and what those problems have in common. A dataset
# of 40 scans exported with NaN outside the scan field listed the same three-line way out 40 times (20 shown), which
# buried the other problems; the report now says it once, with the count and the first cases.
LABEL_MAP_IMAGE_FIX = " Give the scan instead, or pass --allow-label-images if label maps are meant as images"
"""The way out of a case whose image looks like a label map (:func:`make_dataset`)."""
_REPEATED_HINTS = ((NAN_VOXELS_FIX, "NaN or infinite voxels",
                    ("fix the file or replace it", "fix each file or replace it")),
                   (LABEL_MAP_IMAGE_FIX, "an image that looks like a label map", ("Give the scan", "give the scans")))


def _problem_subject(message: str) -> str:
    """The case a problem message names (``case <id>: ...``, after any leading folder), else its first part (a file)."""
    found = re.search(r"(?:^|: )case (\S+?):", message)
    if found:
        return found.group(1)
    return Path(message.split(": ", 1)[0]).name or message[:40]


def _hints_once(problems: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``(problems, notes)``: where two or more problems end with the same advice (:data:`_REPEATED_HINTS`), the
    problems without it (each keeps its count and file) and one note per advice naming how many and the first
    :data:`HINT_NAMES_SHOWN` cases. A single such problem keeps its advice."""
    items, notes = list(problems), []
    for hint, what, (said, said_for_all) in _REPEATED_HINTS:
        hits = [i for i, m in enumerate(items) if hint in m]
        if len(hits) < 2:
            continue
        names = [_problem_subject(items[i]) for i in hits]
        for i in hits:
            items[i] = items[i].replace(hint, "")
        more = f" and {len(names) - HINT_NAMES_SHOWN} more" if len(names) > HINT_NAMES_SHOWN else ""
        advice = hint[2:] if hint.startswith("; ") else hint.strip()
        notes.append(f"{len(hits)} of these cases have {what} ({', '.join(names[:HINT_NAMES_SHOWN])}{more}): "
                     + advice.replace(said, said_for_all, 1))
    return items, notes


def _problem_report(where: Union[Path, str], problems: Sequence[str], what: str = "problem(s)") -> str:
    items, notes = _hints_once(problems)
    shown = "\n  ".join(items[:MAX_PROBLEMS_SHOWN])
    more = (f"\n  ... and {len(items) - MAX_PROBLEMS_SHOWN} more" if len(items) > MAX_PROBLEMS_SHOWN else "")
    # after the list (and its count of the rest), so the advice is read whatever the cap leaves out
    said = "".join(f"\n{note}" for note in notes)
    return f"{where}: {len(items)} {what}:\n  {shown}{more}{said}"


def _grid_problems(case: CaseRef, grids: Sequence[Tuple[Tuple[int, ...], np.ndarray]],
                   label: Optional[Any]) -> List[str]:
    """Why a case's channels or label do not lie on its first image's grid (``grids``: each image file's
    ``(shape, affine)``; ``label``: the label volume read, or None), each naming the case and files."""
    problems: List[str] = []
    for p, (shape, affine) in zip(case.image_files[1:], grids[1:]):
        if shape != grids[0][0] or not np.allclose(affine, grids[0][1], atol=GRID_ATOL, rtol=0):
            how = (f"shape {shape} vs {grids[0][0]}" if shape != grids[0][0] else
                   f"affines differ by up to {float(np.max(np.abs(affine - grids[0][1]))):.4g} mm")
            problems.append(f"case {case.case_id}: channel {p} lies on a different grid than "
                            f"{case.image_files[0]} ({how})")
    if label is not None:
        shape, affine = grids[0]
        if is_reoriented(label, SimpleNamespace(shape=tuple(shape), affine=affine)):
            pass  # the image's voxels in another axis order or direction: reoriented when the case is read
        elif tuple(label.shape) != tuple(shape):
            problems.append(f"case {case.case_id}: label {case.label} shape {tuple(label.shape)} differs from "
                            f"image shape {tuple(shape)}")
        elif not np.allclose(label.affine, affine, atol=GRID_ATOL, rtol=0):
            note = unit_mismatch(str(case.label), "label", label.affine,
                                 length_unit_words(getattr(label, "header", None), case.label),
                                 str(case.image_files[0]), "image", affine,
                                 length_unit_words(None, case.image_files[0]), shape)
            diff = float(np.max(np.abs(np.asarray(label.affine) - np.asarray(affine))))
            problems.append(f"case {case.case_id}: " + note if note is not None else
                            f"case {case.case_id}: label {case.label} lies on a different grid than "
                            f"image {case.image_files[0]} (affines differ by up to {diff:.6g} mm, "
                            f"tolerance {GRID_ATOL:g}); resample the label onto the image")
    return problems


def split_cases(cases: Sequence[CaseRef], val_fraction: float = 0.2, seed: int = 0) -> Tuple[List[CaseRef], List[CaseRef]]:
    """Deterministic train/validation split, independent of the input order.

    Cases are sorted by id and shuffled with ``seed``; ``round(n * val_fraction)`` cases (at least 1
    when ``val_fraction > 0`` and ``n >= 2``; at least one case always stays in training) go to
    validation. Both lists come back sorted by id; record them by ``case_id``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(cases, key=lambda c: c.case_id)
    ids = [c.case_id for c in ordered]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise DatasetError(f"duplicate case ids {dupes[:5]}")
    n = len(ordered)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n - 1, 0))
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    val = [c for i, c in enumerate(ordered) if i in val_idx]
    return train, val


# ------------------------------------------------------------------------------------ readers
def is_case_store(folder: PathLike) -> bool:
    """Whether ``folder`` holds saved cases (napari's Cases section, the server's save): a sub-folder with a
    ``case.json``. A case store has no ``dataset.json``."""
    p = Path(folder)
    return p.is_dir() and any((child / CASE_JSON).is_file() for child in p.iterdir() if child.is_dir())


def load_dataset(path: PathLike, allow_outside: bool = False, problems: Optional[List[str]] = None) -> Dataset:
    """Read a dataset folder (MSD, nnU-Net v2 raw or case store) or its ``dataset.json``.

    Args:
        path: the dataset folder or its ``dataset.json``.
        allow_outside: accept ``dataset.json`` entries that point outside the dataset folder (``../``
            or absolute paths); refused by default so a record cannot make training read elsewhere.
        problems: where given, the problems of single cases (a missing file, an entry outside the folder, an
            unsafe case id...) are appended to it, one message each, and those cases are left out of the
            dataset, so a caller that checks more can report everything in one error (training's pre-run
            check). Without it they are raised, all of them in one :class:`DatasetError`.

    Raises:
        DatasetError: no ``dataset.json`` and not a case store, unreadable JSON, unsupported label
            definitions, no cases, missing image/label files, unsafe case ids or class names, or
            entries outside the folder (all named; every case's problem in one error).
    """
    p = Path(path)
    if p.is_file() and p.name == DATASET_JSON:
        p = p.parent
    if not p.exists():
        raise DatasetError(f"{p}: dataset folder not found")
    if not p.is_dir():
        raise DatasetError(f"{p}: not a folder; give a dataset folder or its dataset.json")
    meta_path = p / DATASET_JSON
    found: List[str] = []
    if meta_path.is_file():
        dataset = _load_json_dataset(p, meta_path, allow_outside, found)
    elif is_case_store(p):
        dataset = _load_case_store(p, found)
    else:
        raise DatasetError(_not_a_dataset(p))
    if found and (problems is None or not dataset.cases):
        raise DatasetError(problem_report(p, found))
    if problems is not None:
        problems.extend(found)
    return dataset


def problem_report(root: PathLike, problems: Sequence[str], what: str = "problem(s)") -> str:
    """One error for the problems found in the dataset folder ``root`` (each a full message naming its file or
    case): a single problem as it is; several listed under ``root`` as ``mambahome dataset`` lists them, each
    without its leading ``root:`` or ``root/dataset.json:`` (the heading names the folder), and capped at
    :data:`MAX_PROBLEMS_SHOWN`."""
    if len(problems) == 1:
        return problems[0]
    prefixes = (f"{Path(root) / DATASET_JSON}: ", f"{Path(root)}: ")
    items = [next((m[len(pre):] for pre in prefixes if m.startswith(pre)), m) for m in problems]
    return _problem_report(Path(root), items, what)


def _q(path: Any) -> str:
    """A path as a shell word: a suggested command with a folder named "plain dir" must paste as it reads."""
    return shlex.quote(str(path))


_LABEL_FOLDER = re.compile(r"(lab|seg|mask|gt|truth|annot)", re.IGNORECASE)


def _folder_pair(p: Path) -> List[Tuple[Path, Path]]:
    """``[(images, labels)]`` when ``p`` holds exactly two folders of volumes and the name of one alone says labels
    (imgs/labs, scans/masks, ct/segmentations), else ``[]``: the suggested command then names the user's own
    folders instead of IMAGES and LABELS."""
    try:
        folders = [d for d in sorted(p.iterdir()) if d.is_dir() and not d.name.startswith(".")
                   and any(f.is_file() and volume_suffix(f.name) for f in d.iterdir())]
    except OSError:
        return []
    if len(folders) != 2:
        return []
    labels = [d for d in folders if _LABEL_FOLDER.search(d.name)]
    if len(labels) != 1:
        return []
    images = folders[0] if folders[1] is labels[0] else folders[1]
    return [(images, labels[0])]


_LAYOUTS = ("no dataset.json and no case folders with case.json; not a dataset. A dataset is an nnU-Net v2 raw "
            "folder (dataset.json with channel_names, labels, file_ending; imagesTr/<case>_0000<ending>, "
            "labelsTr/<case><ending>), an MSD / nnU-Net v1 folder (dataset.json with a 'training' list of "
            "image/label pairs) or a case store saved from napari.")


def _not_a_dataset(p: Path) -> str:
    """Why ``p`` is no dataset, the layouts that are, and the ``mambahome dataset`` command that makes one of what
    is there (:func:`making_a_dataset`)."""
    return f"{p}: {_LAYOUTS} {making_a_dataset(p)}"


def making_a_dataset(p: Path) -> str:
    """What to run to make a dataset of the files in ``p``: the ``mambahome dataset`` command for a folder pair such as
    imagesTr/labelsTr (or imgs/labs), or one folder of image/label pairs, else what is missing."""
    p = Path(p)
    out = p.with_name(f"{p.name}_dataset")
    pairs = [(p / i, p / l) for i, l in (("imagesTr", "labelsTr"), ("images", "labels"), ("imgs", "labels"))
             if (p / i).is_dir() and (p / l).is_dir()] or _folder_pair(p)
    volumes = [f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and volume_suffix(f.name)]
    channel_groups = _channel_files(p, _label_keys(p)) if not pairs and volumes else {}
    if channel_groups:
        return f"Here, {_channels_hint(p, channel_groups)}"
    if not pairs and volumes:
        is_label = [_is_label_file(f) for f in volumes]
        if all(is_label) or not any(is_label):
            # images only (or labels only): `--images p --labels p` would fail with "no label files among ..."
            have, need, flag = (("label", "image", "--images IMAGES_FOLDER") if all(is_label) else
                                ("image", "label", "--labels LABELS_FOLDER"))
            given = (f"--images {_q(p)} {flag}" if have == "image" else f"{flag} --labels {_q(p)}")
            why = (f"every name ends with a label tag {list(LABEL_NAME_TAGS)} or is a 3D Slicer .seg.nrrd"
                   if all(is_label) else
                   f"no name ends with a label tag {list(LABEL_NAME_TAGS)} and none is a 3D Slicer .seg.nrrd")
            article = "an" if need == "image" else "a"
            return (f"The {len(volumes)} volume file(s) here are all {have}s ({why}): a dataset needs "
                    f"{article} {need} for each {have}. Put the {need}s in a folder of their own (named as the {have}s) and "
                    f"run: mambahome dataset {given} --modality CT|MR|US --out {_q(out)} [--classes NAME ...]")
        pairs = [(p, p)]  # one folder of pairs: case.nii.gz + case_seg.nii.gz, case.nrrd + case.seg.nrrd
    if pairs:
        images, labels = pairs[0]
        return (f"To make one from these files (paired by name; names the classes from .seg.nrrd "
                f"segments or --classes): mambahome dataset --images {_q(images)} --labels {_q(labels)} "
                f"--modality CT|MR|US --out {_q(out)} [--classes NAME ...], then train with --dataset {_q(out)}")
    return (f"For a folder of images and one of labels: mambahome dataset --images IMAGES "
            "--labels LABELS --modality CT|MR|US --out NEW_FOLDER")


def _is_label_file(f: Path) -> bool:
    """Whether ``mambahome dataset`` reads ``f`` as a label when images and labels share its folder."""
    suffix = volume_suffix(f.name) or ""
    return f.name.lower().endswith(".seg.nrrd") or _tag_of(f.name[: -len(suffix)], LABEL_NAME_TAGS) is not None


def read_dataset_json(meta_path: Path) -> Dict[str, Any]:
    """Parse a ``dataset.json``; :class:`DatasetError` naming it when unreadable."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{meta_path}: cannot read JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path}: expected a JSON object")
    return meta


def class_names_from_meta(meta: Dict[str, Any], meta_path: Path) -> List[str]:
    """Class names (index = label value) from nnU-Net v2 ``labels`` (name -> id) or MSD (id -> name)."""
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{meta_path}: missing 'labels'")
    pairs: List[Tuple[int, str]] = []
    msd_style = all(str(k).lstrip("-").isdigit() and isinstance(v, str) for k, v in labels.items())
    for k, v in labels.items():
        if msd_style:  # MSD: {"0": "background", "1": "anterior"}
            pairs.append((int(k), str(v)))
        elif isinstance(v, (list, tuple)):
            raise DatasetError(f"{meta_path}: label {k!r} is a region ({v}); nnU-Net region-based "
                               "training is not supported, give one id per class")
        else:  # nnU-Net v2: {"background": 0, "anterior": 1}
            try:
                pairs.append((int(v), str(k)))
            except (TypeError, ValueError):
                raise DatasetError(f"{meta_path}: label {k!r} has a non-integer id {v!r}") from None
    pairs.sort()
    ids = [i for i, _ in pairs]
    if ids != list(range(len(ids))):
        raise DatasetError(f"{meta_path}: label ids must be 0..N-1 without gaps (0 = background), got {ids}")
    return [_checked_name(name, "class name", meta_path) for _, name in pairs]


def _checked_name(value: object, what: str, source: Path) -> str:
    try:
        return safe_name(value, what)
    except UnsafeNameError as exc:
        raise DatasetError(f"{source}: {exc}") from None


def _strip_ending(name: str, ending: str) -> str:
    """The case's name: ``name`` without the dataset's ``ending``, or else without its own volume suffix (a set of
    mixed formats: ``b.seg.nrrd`` is case ``b``, not ``b.seg``)."""
    if ending and name.endswith(ending):
        return name[: -len(ending)]
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else Path(name).stem


def _channel_files_of(image: Path, channels: int, meta_path: Path, case_id: str) -> Union[Path, List[Path]]:
    """The per-channel files of a 'training' entry whose image does not exist as named: nnU-Net v1 lists
    ``./imagesTr/a.nii.gz`` while the files are ``a_0000.nii.gz``, ``a_0001.nii.gz``... (one per modality).

    Raises:
        DatasetError: the image is missing either way (naming what is there and what is not).
    """
    suffix = volume_suffix(image.name) or ""
    stem = image.name[: -len(suffix)] if suffix else image.name
    files = [image.with_name(f"{stem}_{c:04d}{suffix}") for c in range(max(channels, 1))]
    found = [f for f in files if f.is_file()]
    if len(found) == len(files):
        return files[0] if len(files) == 1 else files
    hint = ""
    if found:
        hint = (f"; {', '.join(f.name for f in found)} is there (nnU-Net v1 naming, one file per channel of "
                f"'modality'/'channel_names') but {', '.join(f.name for f in files if not f.is_file())} is not")
    raise DatasetError(f"{meta_path}: case {case_id}: image file {image} not found{hint}")


def _refuse_beside_channel_files(image: Path, meta_path: Path, case_id: str) -> None:
    """An nnU-Net v1 entry ``./imagesTr/a.nii.gz`` whose file exists beside ``a_0000.nii.gz``: ``mambahome predict
    --input imagesTr --output imagesTr`` writes ``a.nii.gz`` (case_0000 -> case), and reading it as the image
    would train on a predicted mask without a word."""
    suffix = volume_suffix(image.name) or ""
    stem = image.name[: -len(suffix)] if suffix else image.name
    channel0 = image.with_name(f"{stem}_0000{suffix}")
    if channel0.is_file():
        raise DatasetError(f"{meta_path}: case {case_id}: both {image.name} (as listed) and {channel0.name} (nnU-Net "
                           f"v1 channel naming) are in {image.parent}; {image.name} may be a prediction written "
                           f"there (`mambahome predict` names case_0000 -> case): move whichever is not the image "
                           "out of the folder")


def _msd_case(i: int, entry: Any, root: Path, meta_path: Path, ending: str, channels: int, modality: str,
              allow_outside: bool) -> CaseRef:
    """The case of the ``training`` entry ``i``; :class:`DatasetError` naming the entry when it cannot be used."""
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
        raise DatasetError(f"{meta_path}: training entry {i} needs 'image' and 'label'")
    for what in ("image", "label"):
        if not allow_outside and not is_within(str(entry[what]), root):
            raise DatasetError(f"{meta_path}: training entry {i}: {what} {entry[what]!r} lies outside the "
                               f"dataset folder {root}; move it inside or allow files outside the "
                               "dataset folder (allow_outside=True, --allow-outside-dataset)")
    image: Union[Path, List[Path]] = (root / str(entry["image"])).resolve()
    label = (root / str(entry["label"])).resolve()
    # named by the entry, not by a symlink's target (a linked dataset keeps its own case ids)
    label_name = Path(str(entry["label"])).name
    case_id = _checked_name(_strip_ending(label_name, ending), "case id", meta_path)
    if not Path(image).is_file():
        image = _channel_files_of(Path(image), channels, meta_path, case_id)
    else:
        _refuse_beside_channel_files(Path(image), meta_path, case_id)
    if not label.is_file():
        raise DatasetError(f"{meta_path}: case {case_id}: label file {label} not found")
    case_modality = modality
    if "modality" in entry:
        if not isinstance(entry["modality"], str) or not entry["modality"].strip():
            raise DatasetError(f"{meta_path}: training entry {i} (case {case_id}): 'modality' must be a "
                               f"modality name such as CT or MR, got {entry['modality']!r}")
        case_modality = normalize_modality(entry["modality"])
    weight = 1.0
    if "weight" in entry:
        value = entry["weight"]
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value <= 0):
            raise DatasetError(f"{meta_path}: training entry {i} (case {case_id}): 'weight' must be a positive "
                               f"number (how often training draws the case, relative to weight 1), got {value!r}")
        weight = float(value)
    return CaseRef(case_id=case_id, image=image, label=label, modality=case_modality, weight=weight)


def _load_json_dataset(root: Path, meta_path: Path, allow_outside: bool, problems: List[str]) -> Dataset:
    """The dataset of a ``dataset.json``; the problems of single cases go to ``problems`` (those cases left out),
    the dataset's own (its labels, channels, layout) are raised."""
    meta = read_dataset_json(meta_path)
    class_names = class_names_from_meta(meta, meta_path)
    ignored = [(i, name) for i, name in enumerate(class_names) if name.strip().lower() == "ignore"]
    if ignored:
        # nnU-Net v2's ignore label (partly annotated cases) takes its voxels out of the loss; here it would be
        # learnt, and predicted, as one more class
        raise DatasetError(f"{meta_path}: label {ignored[0][1]!r} (value {ignored[0][0]}) is nnU-Net's ignore label "
                           "for partly annotated cases, which is not supported: it would be trained as a class. "
                           "Annotate those voxels fully (or set them to 0, background) and remove it from 'labels'")
    channel_names = _channel_names(meta) or ["image"]
    modality = normalize_modality(channel_names[0])
    kinds = [normalize_modality(c) for c in channel_names]
    # MR and other share a per-image percentile rule (HBV, SWI, zscore...: no contrast lost); a fixed window (CT,
    # US) on a channel of another kind is what flattens it
    if len(set(kinds)) > 1 and set(kinds) & {"CT", "US"}:
        # one intensity rule per case: a PET or MR channel beside CT would be clipped to the CT window and lose
        # its contrast (SUV 0-15 squeezed into 0.41-0.44), with no word
        listed = ", ".join(f"{i}: {c!r} ({k})" for i, (c, k) in enumerate(zip(channel_names, kinds)))
        raise DatasetError(f"{meta_path}: the channels are of different kinds ({listed}), but every channel of a "
                           f"case is normalised by one intensity rule, the first channel's ({kinds[0]}), which "
                           "would flatten the others' contrast. Train on channels of one kind, or, to accept one "
                           "rule for all, name every channel of one kind in 'channel_names' (e.g. all \"MR\")")
    ending = str(meta.get("file_ending", ".nii.gz"))
    cases: List[CaseRef] = []
    if isinstance(meta.get("training"), list) and meta["training"]:
        layout = "msd"
        for i, entry in enumerate(meta["training"]):
            # a case's problem is noted and the next case read, so one run names every bad entry (the user who
            # fixed one missing label met the next only in the next run)
            try:
                cases.append(_msd_case(i, entry, root, meta_path, ending, len(channel_names), modality,
                                       allow_outside))
            except DatasetError as exc:
                problems.append(str(exc))
    else:
        layout = "nnunet"
        if "file_ending" not in meta:
            raise DatasetError(f"{meta_path}: nnU-Net v2 dataset.json needs 'file_ending' (or an MSD 'training' list)")
        images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
        if not labels_dir.is_dir():
            raise DatasetError(f"{root}: labelsTr folder not found")
        label_files = {_strip_ending(f.name, ending): f for f in labels_dir.iterdir()
                       if f.name.endswith(ending) and not f.name.startswith(".")}
        expected = {case_id: [images_dir / f"{case_id}_{c:04d}{ending}" for c in range(len(channel_names))]
                    for case_id in label_files}
        used = {f for files in expected.values() for f in files}
        image_ids = set()
        predicted: List[str] = []  # files no case reads; the user is told, as nnU-Net would ignore them silently
        extra_channels: List[str] = []
        if images_dir.is_dir():
            for f in sorted(images_dir.iterdir()):
                if f in used or not f.name.endswith(ending) or f.name.startswith("."):
                    continue
                stem = _strip_ending(f.name, ending)
                if stem in label_files or (stem.endswith("_probabilities") and stem[:-14] in label_files):
                    # `mambahome predict --output imagesTr` writes case_0000 -> case (and case_probabilities);
                    # a case id ending in _XXXX would otherwise make its prediction a channel of another case
                    predicted.append(f.name)
                    continue
                case_id = stem[:-5] if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() else stem
                if case_id in label_files:
                    extra_channels.append(f.name)
                else:
                    image_ids.add(case_id)
        other = [f for d in (images_dir, labels_dir) if d.is_dir() for f in sorted(d.iterdir())
                 if f.is_file() and not f.name.startswith(".") and not f.name.endswith(ending)
                 and volume_suffix(f.name) is not None]
        if other:  # nnU-Net reads only file_ending: such a case would silently drop out, or be there twice
            shown = ", ".join(f"{f.parent.name}/{f.name}" for f in other[:5])
            more = f" and {len(other) - 5} more" if len(other) > 5 else ""
            raise DatasetError(f"{root}: {shown}{more} do(es) not end with the dataset's file_ending {ending!r} "
                               f"({meta_path}); an nnU-Net dataset holds one format: convert them to {ending} "
                               "(or move them out of imagesTr/labelsTr), or list every pair under 'training' in "
                               "dataset.json ({\"image\": \"./imagesTr/...\", \"label\": \"./labelsTr/...\"})")
        unlabelled = sorted(image_ids - set(label_files))
        if unlabelled:
            more = f" and {len(unlabelled) - 5} more" if len(unlabelled) > 5 else ""
            problems.append(f"{labels_dir}: no label file for case(s) {unlabelled[:5]}{more} "
                            f"(expected {labels_dir / (unlabelled[0] + ending)})")
        for case_id, label in sorted(label_files.items()):
            try:
                _checked_name(case_id, "case id", label)
            except DatasetError as exc:
                problems.append(str(exc))
                continue
            images = expected[case_id]
            absent = [f for f in images if not f.is_file()]
            if absent:
                f = absent[0]
                msd = images_dir / f"{case_id}{ending}"
                hint = (f"; {msd.name} is there, named as in the Medical Segmentation Decathlon (no _0000 "
                        f"channel suffix): rename the images to <case>_0000{ending}, or list the pairs under "
                        "'training' in dataset.json ({\"image\": \"./imagesTr/...\", \"label\": "
                        "\"./labelsTr/...\"})") if len(images) == 1 and msd.is_file() else ""
                problems.append(f"{root}: case {case_id}: image file {f} not found{hint}")
                continue
            cases.append(CaseRef(case_id=case_id, image=images[0] if len(images) == 1 else images,
                                 label=label, modality=modality))
        ignored = []
        if predicted:
            ignored.append(f"{_listed(predicted)}: named like a case's label, as `mambahome predict` names its "
                           "outputs (case_0000 -> case), so likely predictions rather than images")
        if extra_channels:
            ignored.append(f"{_listed(extra_channels)}: channel(s) beyond the {len(channel_names)} in "
                           f"{meta_path.name}'s channel_names")
        if ignored:
            warnings.warn(f"{images_dir}: not read as images: {'; '.join(ignored)}. Move them out of imagesTr to "
                          "silence this", stacklevel=3)
    if not cases and not problems:
        raise DatasetError(f"{meta_path}: the dataset has no cases")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
        files = [str(c.label) for c in cases if c.case_id == dupes[0]]
        raise DatasetError(f"{meta_path}: duplicate case ids {dupes[:5]}: case {dupes[0]!r} is labelled by "
                           f"{' and '.join(files)} (a case's id is its label file's name without the extension); "
                           "keep one entry per case, or rename one")
    cases.sort(key=lambda c: c.case_id)
    return Dataset(name=str(meta.get("name", root.name)), root=root, cases=cases, class_names=class_names,
                   modality=modality, channel_names=channel_names, layout=layout)


def _listed(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _load_case_store(root: Path, problems: List[str]) -> Dataset:
    """The cases saved in a case store; a case missing its image or label goes to ``problems`` (left out)."""
    from engine.cases import CaseStore

    records = CaseStore(root, readonly=True).list()
    if not records:
        raise DatasetError(f"{root}: the case store has no readable cases")
    # Cases saved under a model that later gained classes keep the shorter list; it must be a prefix.
    class_names = max((r.class_names for r in records), key=len)
    for r in records:
        if class_names[: len(r.class_names)] != r.class_names:
            raise DatasetError(f"{r.folder / 'case.json'}: class names {r.class_names} disagree with other cases "
                               f"{class_names}; save cases of one label set per store")
    cases = []
    for r in records:
        missing = [f"{r.folder}: case {r.case_id}: {what} file {f} not found"
                   for what, f in (("image", r.image_path), ("label", r.label_path)) if not f.is_file()]
        if missing:
            problems.extend(missing)
            continue
        cases.append(CaseRef(case_id=r.case_id, image=r.image_path, label=r.label_path,
                             modality=normalize_modality(r.modality)))
    if not cases:
        return Dataset(name=root.name, root=root, cases=[], class_names=list(class_names), modality="other",
                       channel_names=[], layout="casestore")
    modality = Counter(c.modality for c in cases).most_common(1)[0][0]
    cases.sort(key=lambda c: c.case_id)
    return Dataset(name=root.name, root=root, cases=cases, class_names=list(class_names), modality=modality,
                   channel_names=[modality], layout="casestore")


# ----------------------------------------------------------------------------- a dataset from two folders
# Name endings that tell an image from its label in one case's file names (compared in lower case): the
# label of ``liver_003_0000.nii.gz`` or ``liver_003_image.nii.gz`` is ``liver_003.nii.gz`` or ``liver_003_seg.nii.gz``.
IMAGE_NAME_TAGS = ("_0000", "_image", "_img")
LABEL_NAME_TAGS = ("_label", "_labels", "_seg", "_segmentation", "_mask", "_gt", "-label")  # -label: 3D Slicer's
# name for a labelmap volume; a Slicer segmentation (.seg.nrrd) is a label by its format (``case.nrrd`` + ``case.seg.nrrd``)


def _tag_of(key: str, tags: Sequence[str]) -> Optional[str]:
    """The tag ``key`` (a file name without its suffix) ends with, if any."""
    return next((tag for tag in tags if key.lower().endswith(tag) and len(key) > len(tag)), None)


def _label_keys(folder: Path) -> set:
    """The names of the label files in ``folder`` without suffix and label tag (``case_0001_seg.nii.gz`` ->
    ``case_0001``): the images they label."""
    keys = set()
    for f in sorted(folder.iterdir()) if folder.is_dir() else ():
        suffix = volume_suffix(f.name)
        if f.name.startswith(".") or not f.is_file() or suffix is None or not _is_label_file(f):
            continue
        key = f.name[: -len(".seg.nrrd")] if f.name.lower().endswith(".seg.nrrd") else f.name[: -len(suffix)]
        tag = _tag_of(key, LABEL_NAME_TAGS)
        keys.add(key[: -len(tag)] if tag else key)
    return keys


def _channel_files(folder: Path, labelled: Iterable[str] = ()) -> Dict[str, List[str]]:
    """``{case: [file names]}`` of the cases in ``folder`` stored nnU-Net style, one file per input channel:
    ``<case>_0000<ext>`` beside ``<case>_0001<ext>`` (and on). Empty when no case has a second channel.

    Args:
        labelled: names (without suffix) that have a label of their own: ``case_0000``, ``case_0001``... among
            them are cases numbered so, not channels.
    """
    by_case: Dict[str, Dict[int, str]] = {}
    labelled = set(labelled)
    for f in sorted(folder.iterdir()) if folder.is_dir() else ():
        suffix = volume_suffix(f.name)
        if f.name.startswith(".") or not f.is_file() or suffix is None:
            continue
        key = f.name[: -len(suffix)]
        if len(key) > 5 and key[-5] == "_" and key[-4:].isdigit():
            by_case.setdefault(key[:-5], {})[int(key[-4:])] = f.name
    return {case: [names[i] for i in sorted(names)] for case, names in sorted(by_case.items())
            if 0 in names and 1 in names and not any(f"{case}_{i:04d}" in labelled for i in names if i > 0)}


def _channels_hint(folder: Path, groups: Dict[str, List[str]], labels: Optional[Path] = None) -> str:
    """Why the channel files in ``folder`` (:func:`_channel_files`) make no dataset here, and the nnU-Net v2 layout
    that reads them as one case each (no leading folder name: the callers put it)."""
    case, names = next(iter(groups.items()))
    ending = volume_suffix(names[0]) or ".nii.gz"
    new = folder.with_name(f"{folder.name}_dataset")
    channel_names = ", ".join(f'"{i}": "MR"' for i in range(max(len(n) for n in groups.values())))
    return (f"{', '.join(names)} are the {len(names)} channels of one case, {case!r} (nnU-Net naming: one file per "
            f"input channel, <case>_0000, <case>_0001, ...; {len(groups)} case(s) so named here), not {len(names)} "
            "separate images. `mambahome dataset` pairs one image file with each label, so it makes no "
            f"multi-channel dataset; lay the files out as an nnU-Net v2 raw dataset instead: {new}/imagesTr/ with "
            f"these files as named ({case}_0000{ending}, {case}_0001{ending}, ...), {new}/labelsTr/ with one label "
            f"map per case named without the channel suffix ({case}{ending}"
            f"{f', from {labels}' if labels is not None else ''}) and {new}/dataset.json: "
            f'{{"channel_names": {{{channel_names}}}, "labels": {{"background": 0, "CLASS_1": 1}}, '
            f'"file_ending": "{ending}"}} (channel_names: one per channel in file order, e.g. "T1", "T2", "ADC" or '
            f'"CT"; labels: the class names and their label values); then: mambahome train --dataset {_q(new)} --out '
            "RUN_FOLDER")


def _files_by_case(folder: Path, tags: Sequence[str], what: str, shared_with: Sequence[str] = ()) -> Dict[str, Path]:
    """``{case key: file}`` for the volume files in ``folder``; the key drops the suffix and one tag.

    ``shared_with``: when images and labels lie in one folder, the other kind's tags: files carrying one
    of them are the other kind's, and only files carrying one of ``tags`` are labels (``what == "label"``).
    """
    if not folder.is_dir():
        raise DatasetError(f"{folder}: {what} folder not found")
    found: Dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            continue
        if f.is_dir():  # an image may be a DICOM series exported as one folder per case
            if what != "image" or not is_dicom_folder(f):
                continue
            key = f.name
        else:
            suffix = volume_suffix(f.name)
            if suffix is None:
                continue
            key = f.name[: -len(suffix)]
        tag = _tag_of(key, tags)
        segmentation = f.name.lower().endswith(".seg.nrrd")  # 3D Slicer's segmentation file: always a label
        if shared_with:  # one folder holds both kinds: skip the other kind's files
            is_label = segmentation or _tag_of(key, LABEL_NAME_TAGS) is not None
            if is_label != (what == "label"):
                continue
        if tag is not None:
            key = key[: -len(tag)]
        if key in found:
            raise DatasetError(f"{folder}: {found[key].name} and {f.name} are both {what}s of case {key!r}; "
                               "keep one per case")
        found[key] = f
    if not found and shared_with and what == "label":
        seen = [f.name for f in sorted(folder.iterdir()) if f.is_file() and volume_suffix(f.name)]
        raise DatasetError(f"{folder}: no label files among {seen[:8]}{' ...' if len(seen) > 8 else ''}: in one folder "
                           "holding images and labels, a label is a 3D Slicer .seg.nrrd or its name ends with a label "
                           f"tag {list(LABEL_NAME_TAGS)} before the extension (ct.nii.gz + ct_label.nii.gz); rename "
                           "the labels so, or put them in a folder of their own (--labels)")
    if not found:
        series = " or DICOM series subfolders" if what == "image" else ""
        raise DatasetError(f"{folder}: no {what} files (.nii.gz, .nii, .nrrd, .seg.nrrd, .nhdr, .mha, .mhd, .mgz)"
                           + series)
    return found


def _class_names_beside(labels: Path) -> Optional[Tuple[List[str], Path]]:
    """Class names (without background) and the file naming them: a ``dataset.json`` in the labels folder or its
    parent (an nnU-Net or MSD raw folder's labelsTr); None without one."""
    for meta_path in (labels / DATASET_JSON, labels.parent / DATASET_JSON):
        if meta_path.is_file():
            return class_names_from_meta(read_dataset_json(meta_path), meta_path)[1:], meta_path
    return None


def _past_the_classes(case: CaseRef, values: Sequence[int], class_names: Sequence[str], names_from: str) -> str:
    """The problem of a case whose label values outrun the classes, with the renumbering it needs when the mask
    holds no more distinct values than there are classes (a binary mask saved as 0/255, values 127/254 for two
    classes): which value becomes which class, in order."""
    used = sorted(set(int(v) for v in values) - {0})
    largest, n = used[-1], len(class_names)
    head = (f"case {case.case_id}: {case.label}: label values go up to {largest} but {n} class name(s) were "
            f"{names_from} ({list(class_names)})")
    if len(used) > n:
        return f"{head}; name every value from 1 to {largest} (--classes), or renumber the label"
    mapping = ", ".join(f"{v} -> {i} ({class_names[i - 1]})" for i, v in enumerate(used, start=1))
    if len(used) == 1:
        return (f"{head}. The label holds only the value {used[0]}: a mask saved as 0/{used[0]}? Rewrite it as "
                f"0/1 ({mapping}), or with the value of its class")
    return (f"{head}. The label holds {len(used)} values {used}, no more than the {n} class(es): renumber them in "
            f"order, {mapping}, or name every value from 1 to {largest} (--classes) if they are all classes")


def make_dataset(images: PathLike, labels: PathLike, out: PathLike, modality: str,
                 class_names: Optional[Sequence[str]] = None, copy: bool = False,
                 allow_label_images: bool = False) -> Dataset:
    """Make a dataset folder that :func:`load_dataset` reads from a folder of images and one of labels.

    Files are paired by name: identical names, or names that differ by an image tag
    (:data:`IMAGE_NAME_TAGS`, e.g. nnU-Net's ``_0000``) and a label tag (:data:`LABEL_NAME_TAGS`, e.g.
    ``_seg``); one folder may hold both (then a label carries a label tag or is a 3D Slicer ``.seg.nrrd``:
    ``case.nrrd`` + ``case.seg.nrrd``). Label values that skip numbers (5 and 12, no 1..4) are refused unless
    ``class_names`` (or a ``dataset.json`` beside the labels) names every value: they would be empty classes. Every pair is checked before anything is written (a readable 3D image, a label of
    non-negative integers on the image's grid); then ``out`` gets ``imagesTr/``, ``labelsTr/`` (links to the
    files, or copies) and an MSD-style ``dataset.json``, all at once (a folder built beside ``out`` and
    renamed), so a refused set leaves nothing behind.

    Args:
        images, labels: the two folders (one volume per case, any format :func:`engine.io.load_volume` reads;
            an image may also be a DICOM series subfolder named as the case, written into the dataset as NIfTI).
        out: the dataset folder to create (must not exist, or be empty).
        modality: CT, MR, US or other (picks the intensity rule of training and inference).
        class_names: names of label values 1, 2, ... (default: the names in a ``dataset.json`` in the labels
            folder or its parent, else the segment names of ``.seg.nrrd`` labels (3D Slicer's), else ``class_1``,
            ``class_2``, ... up to the largest value found).
        copy: copy the files instead of linking to them.
        allow_label_images: take images that look like label maps (:func:`engine.io.looks_like_label_map`: a few
            integer values in regions); refused by default, as the mask picked where the scan was meant.

    Returns:
        The dataset as :func:`load_dataset` reads it from ``out``.

    Raises:
        DatasetError: unpaired files, unreadable or mismatched volumes, images that look like label maps,
            label values beyond ``class_names``, ``.seg.nrrd`` files that number the same segment differently,
            an ``out`` that holds files (every problem named).
    """
    import os
    import shutil
    import uuid

    images, labels, out = Path(images), Path(labels), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: exists and is not an empty folder; choose a new dataset folder")
    one_folder = images.resolve() == labels.resolve()  # t1_image.nii.gz beside t1_label.nii.gz
    image_files = _files_by_case(images, IMAGE_NAME_TAGS, "image", LABEL_NAME_TAGS if one_folder else ())
    channel_groups = _channel_files(images)
    try:
        label_files = _files_by_case(labels, LABEL_NAME_TAGS, "label", IMAGE_NAME_TAGS if one_folder else ())
    except DatasetError:
        if channel_groups and one_folder:  # case_0000 + case_0001 and no label: "no label files among..." misled
            raise DatasetError(f"{images}: {_channels_hint(images, channel_groups)}") from None
        raise
    # "case_0000" lost its "_0000" as an image tag, so it missed its label "case_0000" of cases numbered from 0
    for key, path in list(image_files.items()):
        stem = path.name[: -len(volume_suffix(path.name) or "")]
        if key not in label_files and stem != key and stem in label_files and stem not in image_files:
            image_files[stem] = image_files.pop(key)
    unlabelled, orphans = sorted(set(image_files) - set(label_files)), sorted(set(label_files) - set(image_files))
    # case_0001 (channel 1) found no label "case_0001": "no label for image(s)" sent the user to rename labels, when
    # the files are channels of one case, which only the nnU-Net layout reads; a label named case_0001 (cases
    # numbered so) pairs, and is not taken for a channel
    labelled = set(label_files) | {f"{k}_0000" for k in label_files}  # _0000 is an image tag: "case" is case_0000
    extra_channels = [k for k in unlabelled if k[:-5] in channel_groups and image_files[k].name in
                      channel_groups[k[:-5]][1:]
                      and not any(f"{k[:-5]}_{i:04d}" in labelled for i in range(1, len(channel_groups[k[:-5]])))]
    if extra_channels:
        raise DatasetError(f"{images}: {_channels_hint(images, channel_groups, None if one_folder else labels)}")
    problems: List[str] = []
    if unlabelled or orphans:
        # one problem of the report: the paired cases are still checked, so their grid, NaN and label problems come
        # in the same run (they came only once the names were fixed, as the README promises they do not)
        parts = ([f"no label for image(s) {[image_files[k].name for k in unlabelled[:5]]}"] if unlabelled else []) \
            + ([f"no image for label(s) {[label_files[k].name for k in orphans[:5]]}"] if orphans else [])
        problems.append(f"{images} / {labels}: {'; '.join(parts)}. Files pair by name: identical names, or "
                        f"an image tag {list(IMAGE_NAME_TAGS)} and a label tag {list(LABEL_NAME_TAGS)} "
                        "before the extension")
    if normalize_modality(modality) == "other" and str(modality).strip().lower() != "other":
        raise DatasetError(f"unknown modality {modality!r}: give CT, MR, US or other (other: any other modality, "
                           "e.g. X-ray, PET or microscopy; its intensities are scaled between their 0.5 and 99.5 "
                           "percentiles)")
    modality = normalize_modality(modality)
    cases = [CaseRef(case_id=_checked_name(key, "case id", label_files[key]), image=image_files[key],
                     label=label_files[key], modality=modality) for key in sorted(image_files) if key in label_files]
    # The class names, when known before any label is read (--classes, or a dataset.json beside the labels), so
    # that a label valued past them is one more problem of this run, not a refusal met after the others are fixed.
    names_from = "given"
    if class_names is None:
        try:
            beside = _class_names_beside(labels)
        except DatasetError as exc:
            problems.append(str(exc))
            beside = None
        if beside:
            names_from, class_names = f"named in {beside[1]}", beside[0]
    if class_names is not None:
        class_names = list(class_names)
    largest, names_per_file, present, labels_read = 0, [], set(), 0
    holders: Dict[int, List[str]] = {}  # label value -> the label files holding it
    # One pass over every case: its label, its image's voxels (a truncated download or NaN voxels made a
    # dataset that `train` then refused) and whether the two lie on one grid, so every problem of every case
    # is reported at once (a user who fixed a NaN voxel met the off-grid label only in the next run).
    for case in cases:
        label = None
        try:
            label = load_label(case.label)
        except VolumeError as exc:
            problems.append(f"case {case.case_id}: {exc}")
        grids = None
        try:
            image = load_volume(case.image)
            grids = [(tuple(int(n) for n in np.shape(image.data)), np.asarray(image.affine, dtype=np.float64))]
            check_finite_voxels(np.asarray(image.data), str(case.image))
            # a folder of masks given as --images made a dataset that trained a model to segment label maps
            if not allow_label_images and looks_like_label_map(image.data):
                problems.append(f"case {case.case_id}: {label_map_image_message(case.image)}{LABEL_MAP_IMAGE_FIX}")
        except VolumeError as exc:
            problems.append(f"case {case.case_id}: {exc}")
            grids = grids or _grid_of_unusable_image(Path(case.image))  # NaN voxels: the grid is still known
        image = None  # one image in memory at a time
        if label is None:
            continue
        if grids is not None:
            problems.extend(_grid_problems(case, grids, label))
        values = [int(v) for v in np.unique(label.data)]
        labels_read += 1
        largest = max(largest, values[-1] if values else 0)
        present.update(values)
        for v in values:
            if v:
                holders.setdefault(v, []).append(Path(case.label).name)
        if class_names is not None and values and values[-1] > len(class_names):
            problems.append(_past_the_classes(case, values, class_names, names_from))
        names_per_file.append((Path(case.label).name, segment_names(label.segments)))
    # What depends on every label at once, added to the same report (every problem in one run).
    if labels_read == len(cases) and largest == 0:
        problems.append(f"{labels}: every label map is empty (all 0); nothing to learn")
    named: Dict[int, str] = {}
    try:
        named = _consistent_segment_names(names_per_file, labels)
    except DatasetError as exc:
        problems.append(str(exc))
    if class_names is None and labels_read == len(cases):
        absent = [v for v in range(1, largest + 1) if v not in present]
        if absent:  # e.g. Slicer segments exported with a colour table's values: 5, 12 -> 10 empty classes
            used = sorted(present - {0})
            shown = f"{absent[:20]}" + (f" (and {len(absent) - 20} more)" if len(absent) > 20 else "")
            # which files hold the values past 1..N: one stray voxel in one of hundreds of files is otherwise a hunt
            beyond = [v for v in used if v > len(used)]
            where = "; ".join(f"{v} in {', '.join(holders[v][:3])}"
                              + (f" and {len(holders[v]) - 3} more" if len(holders[v]) > 3 else "")
                              for v in beyond[:5])
            problems.append(
                f"{labels}: label values {used} are not numbered 1..{len(used)}: values {shown} occur in no "
                f"label file and would become {len(absent)} empty class(es) the model is trained and scored "
                f"on (value {where}). Either renumber the labels 1..{len(used)} (in 3D Slicer: export the "
                "segmentation as a labelmap without a colour table, or re-save it after Segment Editor numbers the "
                f"segments), or name every value 1..{largest} with --classes if the empty ones are meant")
    names: List[str] = []
    if class_names is not None:
        try:
            names = ["background"] + [_checked_name(n, "class name", labels) for n in class_names]
        except DatasetError as exc:
            problems.append(str(exc))
        if names and len(set(names)) != len(names):
            problems.append(f"class names {list(class_names)} repeat a name")
    if problems:
        where = images if images.resolve() == labels.resolve() else f"{images} / {labels}"
        raise DatasetError(_problem_report(where, problems, f"problem(s) in {len(cases)} case(s); nothing was "
                                                           "written"))
    if class_names is None:
        class_names = [named.get(i, f"class_{i}") for i in range(1, largest + 1)]
        names = ["background"] + [_checked_name(n, "class name", labels) for n in class_names]
        if len(set(names)) != len(names):  # a segment named "background", or "class_2" beside an unnamed value 2
            raise DatasetError(f"{labels}: class names {names[1:]} taken from the segment names repeat a name (or "
                               "'background'); rename the segments, or name the classes with --classes")
    # the same deep check training runs: images readable and 3D, labels integral, within the classes, on the grid
    Dataset(name=out.name, root=out, cases=cases, class_names=names, modality=modality,
            channel_names=[modality], layout="msd").validate(deep=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        entries = []
        for sub in ("imagesTr", "labelsTr"):
            (building / sub).mkdir(parents=True)
        for case in cases:
            entry = {}
            for what, sub, src in (("image", "imagesTr", Path(case.image)), ("label", "labelsTr", case.label)):
                suffix = volume_suffix(src.name) or ""
                dst = building / sub / f"{case.case_id}{suffix or '.nii.gz'}"
                if src.is_dir():  # a DICOM series: one NIfTI file on its exact grid, so the dataset is files only
                    _series_to_nifti(src, dst)
                elif copy:
                    _copy_volume(src, dst)
                else:
                    os.symlink(src.resolve(), dst)
                entry[what] = f"./{sub}/{dst.name}"
            entries.append(entry)
        endings = {volume_suffix(Path(e["label"]).name) for e in entries}
        meta = {"name": out.name,
                "description": f"made by `mambahome dataset` from {images.resolve()} and {labels.resolve()}",
                "channel_names": {"0": modality}, "modality": {"0": modality},
                "labels": {str(i): n for i, n in enumerate(names)},
                "numTraining": len(entries), "training": entries}
        if len(endings) == 1:
            meta["file_ending"] = endings.pop()
        (building / DATASET_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        building.rename(out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return load_dataset(out)


def _grid_of_unusable_image(path: Path) -> Optional[List[Tuple[Tuple[int, ...], np.ndarray]]]:
    """``[(shape, affine)]`` of an image whose voxels were refused (NaN, infinite), so its label's grid is
    checked in the same run; None when the file's grid cannot be read either."""
    from engine.formats import FormatError, can_read, read_raw

    try:
        if is_nifti(path):
            return [read_grid(path)]
        if can_read(path):
            raw = read_raw(path)
            return [(tuple(int(n) for n in np.shape(raw.data)[:3]), np.asarray(raw.affine, dtype=np.float64))]
    except (VolumeError, FormatError, ValueError):
        return None
    return None


def _consistent_segment_names(per_file: Sequence[Tuple[str, Dict[int, str]]], labels: Path) -> Dict[int, str]:
    """The value -> name map the label files' segments agree on. 3D Slicer numbers each file's segments on its
    own, so ``liver`` may be 1 in one file and 2 in the next: such a set would teach one class two structures,
    and is refused naming both files."""
    value_of: Dict[str, Tuple[int, str]] = {}
    name_of: Dict[int, Tuple[str, str]] = {}
    for file, names in per_file:
        for value, name in sorted(names.items()):
            key = " ".join(name.casefold().split())
            if key in value_of and value_of[key][0] != value:
                raise DatasetError(f"{labels}: segment {name!r} is label value {value_of[key][0]} in "
                                   f"{value_of[key][1]} but {value} in {file}; give every structure the same value "
                                   "in every file (in 3D Slicer: the same segment order, or export with a colour "
                                   "table)")
            if value in name_of and " ".join(name_of[value][0].casefold().split()) != key:
                raise DatasetError(f"{labels}: label value {value} is segment {name_of[value][0]!r} in "
                                   f"{name_of[value][1]} but {name!r} in {file}; give every structure the same "
                                   "value in every file")
            value_of.setdefault(key, (value, file))
            name_of.setdefault(value, (name, file))
    return {value: name for value, (name, _) in name_of.items()}


def _series_to_nifti(series: Path, dst: Path) -> None:
    """Write a DICOM series folder as one NIfTI volume (its affine, Hounsfield units as read) at ``dst``."""
    from engine.io import load_volume, save_volume

    volume = load_volume(series)
    save_volume(dst, volume.data, volume)


def _copy_volume(src: Path, dst: Path) -> None:
    """Copy a volume file; a detached header (.nhdr, .mhd), which names a data file beside it, is refused."""
    import shutil

    from engine.formats import DETACHED_SUFFIXES, suffix_of

    if suffix_of(src) in DETACHED_SUFFIXES:
        raise DatasetError(f"{src}: a detached header (.nhdr/.mhd) names its data file; link it (without --copy) "
                           "or convert it to .nrrd/.mha first")
    shutil.copy2(src, dst)


def register_cli(sub: Any) -> None:
    """``mambahome dataset``: a training dataset folder from a folder of images and one of labels."""
    p = sub.add_parser("dataset", help="make a training dataset folder from a folder of images and one of labels",
                       description="Pair images and labels by file name (identical names, or an image tag such "
                                   f"as {IMAGE_NAME_TAGS[0]} and a label tag such as {LABEL_NAME_TAGS[2]}), check "
                                   "every pair, and write a dataset folder (links or copies + dataset.json) "
                                   "that train, finetune and train-eval read.")
    p.add_argument("--images", required=True,
                   help="folder of image volumes, one per case (may be the labels folder); a DICOM series subfolder "
                        "named as its case is written into the dataset as NIfTI")
    p.add_argument("--labels", required=True, help="folder of label maps (0 = background, 1, 2, ... = classes)")
    p.add_argument("--out", required=True, help="the dataset folder to create")
    p.add_argument("--modality", required=True, help="CT, MR, US or other: the intensity rule of the model")
    p.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                   help="names of label values 1, 2, ..., background left out (default: a dataset.json in the labels "
                        "folder or its parent, else the segment names of 3D Slicer .seg.nrrd labels, else class_1, "
                        "class_2, ...)")
    p.add_argument("--copy", action="store_true", help="copy the files (default: link to them)")
    p.add_argument("--allow-label-images", action="store_true",
                   help="take images that look like label maps (a few integer values in regions); refused by default")
    p.set_defaults(func=_cli_dataset)


def _cli_dataset(args: Any) -> int:
    dataset = make_dataset(args.images, args.labels, args.out, args.modality, args.classes, copy=args.copy,
                           allow_label_images=args.allow_label_images)
    print(f"wrote {dataset.root}: {len(dataset.cases)} case(s), modality {dataset.modality}, classes "
          f"{dataset.class_names[1:]}\ntrain on it with: mambahome train --dataset {_q(dataset.root)} --out RUN_FOLDER")
    return 0
