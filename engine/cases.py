"""The case store: corrected segmentations saved from napari, ready for fine-tuning.

Layout (one folder per case, readable by hand and by :func:`engine.datasets.load_dataset`)::

    <root>/<case_id>/image.nii.gz   the image, on its original grid and header, in its voxel type: integer voxels
                                    (a CT's int16) as they came, else float32 (:func:`stored_image_data`)
    <root>/<case_id>/label.nii.gz   the corrected label map, same grid
    <root>/<case_id>/case.json      id, source file, modality, class names, model version, time, shape, spacing,
                                    and ``interactive`` when objects were made by prompting (absent or null: not)

A case appears all at once or not at all: it is written into a hidden temp folder inside the root
and renamed into place, so a crash or a full disk never leaves half a case that training would read.
Renames into the store are serialised by a lock on the store folder (:func:`engine.locks.folder_lock`),
so two writers (two napari windows, napari and the CLI) saving the same id never fail on each other.
Case ids and class names read from ``case.json`` go through :func:`engine.names.safe_name`, and case
folders that are symbolic links are not followed: a tampered store cannot steer reads or writes
outside itself.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field, replace as _replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from engine.class_names import brief_names
from engine.io import (PathLike, Volume, WriteError, as_label_array, check_finite_voxels, describe_write_failure,
                       load_label, load_volume, save_volume, thin_volume_message, with_nifti_header,
                       write_json_atomic)
from engine.locks import LockTimeout, folder_lock
from engine.names import UnsafeNameError, safe_name

CASE_JSON = "case.json"
IMAGE_FILE = "image.nii.gz"
LABEL_FILE = "label.nii.gz"
CASE_FORMAT = "mambahome-case"
_TEMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STALE_TEMP_S = 3600.0


class CaseStoreError(ValueError):
    """The case store folder cannot be used, or a case is invalid; the message names it."""


class EmptyLabelsError(CaseStoreError):
    """Labels holding background only, given to replace a case that holds a class."""


class CaseExistsError(CaseStoreError):
    """A case with this id exists and ``overwrite`` was not requested."""


class CaseNotFoundError(CaseStoreError):
    """No case with this id in the store."""


def record_beside(path: PathLike) -> Optional["CaseRecord"]:
    """The record of the saved case whose image or label file ``path`` is (a case folder reopened by hand), else
    None (another file, or an unreadable record)."""
    path = Path(path)
    record = path.parent / CASE_JSON
    if path.name not in (IMAGE_FILE, LABEL_FILE) or not record.is_file():
        return None
    try:
        return CaseRecord.from_json_file(record)
    except (CaseStoreError, OSError, ValueError):
        return None


def scan_of(path: Optional[PathLike]) -> Optional[str]:
    """The scan a file shows: the file the case was saved from where ``path`` is a saved case's own image or label
    file (a case folder reopened by hand: its record names the original), else ``path`` itself."""
    if not path:
        return None
    beside = record_beside(path)
    return str(beside.source_file) if beside is not None and beside.source_file else str(path)


class LabelSetConflictError(CaseStoreError):
    """A case's class names disagree with the store's other cases (one store holds one label set).

    Attributes:
        class_names: the refused case's classes.
        case_id, case_classes: the saved case they disagree with, and its classes (a GUI words its own advice).
    """

    def __init__(self, message: str, class_names: Sequence[str] = (), case_id: str = "",
                 case_classes: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.class_names, self.case_id, self.case_classes = list(class_names), case_id, list(case_classes)


def label_set_conflict(class_names: Sequence[str], others: Iterable[Tuple[str, Sequence[str]]]
                       ) -> Optional[Tuple[str, List[str]]]:
    """The first of ``others`` (``(name, class_names)``) whose classes cannot share a store with ``class_names``, or
    None. Lists may differ only at the end: a case saved under a model that later gained classes keeps the shorter
    list, so one list must be the start of the other (the rule :func:`engine.datasets.load_dataset` applies to a
    store as a whole)."""
    mine = list(class_names)
    for name, theirs in others:
        theirs = list(theirs)
        n = min(len(mine), len(theirs))
        if mine[:n] != theirs[:n]:
            return name, theirs
    return None


_MAX_TEXT = 256


@dataclass(frozen=True)
class InteractiveOrigin:
    """Which labels of a case were made by prompting an interactive model (``case.json`` key ``interactive``).

    Attributes:
        class_ids: label values whose objects were made interactively, each in ``1..len(class_names)-1``.
        objects: objects accepted in the interactive session.
        prompts: prompts (points, boxes, scribbles) in effect when those objects were accepted.
        model_version: version id of the interactive model prompted.
        model_name: its file name (or the server's model id).
    """

    class_ids: Tuple[int, ...]
    objects: int
    prompts: int
    model_version: Optional[str] = None
    model_name: Optional[str] = None

    def to_json_dict(self, class_names: Sequence[str]) -> Dict[str, Any]:
        """The JSON form; ``classes`` repeats the names of ``class_ids`` for a reader of the file."""
        return {"class_ids": list(self.class_ids),
                "classes": [class_names[i] for i in self.class_ids if 0 <= i < len(class_names)],
                "objects": self.objects, "prompts": self.prompts,
                "model_version": self.model_version, "model_name": self.model_name}

    @classmethod
    def from_json_dict(cls, d: Any, num_classes: int, where: Any) -> "InteractiveOrigin":
        """Validate a JSON ``interactive`` record (from ``case.json``, a layer or a client).

        Args:
            d: mapping with ``class_ids``, ``objects``, ``prompts`` and optional ``model_version``,
                ``model_name`` (``classes`` is ignored: the names come from the case).
            num_classes: the case's number of classes (background included).
            where: names the case, file or client in the error.

        Raises:
            CaseStoreError: a missing or malformed field, or a class id outside the case's classes.
        """
        def count(name: str) -> int:
            value = d.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CaseStoreError(f"{where}: interactive record field {name!r} must be a count >= 0, got {value!r}")
            return value

        def text(name: str) -> Optional[str]:
            value = d.get(name)
            if value is None:
                return None
            if not isinstance(value, str) or len(value) > _MAX_TEXT or any(ord(ch) < 32 for ch in value):
                raise CaseStoreError(f"{where}: interactive record field {name!r} must be a short line of text")
            return value

        if not isinstance(d, dict):
            raise CaseStoreError(f"{where}: the interactive record must be a JSON object, got {type(d).__name__}")
        ids = d.get("class_ids")
        if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise CaseStoreError(f"{where}: interactive record field 'class_ids' must be a list of label values")
        bad = [i for i in ids if not 0 < i < num_classes]
        if bad:
            raise CaseStoreError(f"{where}: interactive class ids {bad} are not classes of the case "
                                 f"(1..{num_classes - 1})")
        return cls(class_ids=tuple(sorted(set(ids))), objects=count("objects"), prompts=count("prompts"),
                   model_version=text("model_version"), model_name=text("model_name"))


@dataclass
class CaseRecord:
    """What ``case.json`` says about one stored case.

    Attributes:
        case_id: folder name of the case.
        folder: the case folder.
        modality: ``CT``/``MR``/``US``/``other`` (or as given).
        class_names: index = label value, 0 = background.
        source_file: the file the image was opened from, if any.
        model_version: version id of the model that produced the draft segmentation, if any.
        created: ISO 8601 UTC time the case was saved.
        shape: ``(I, J, K)`` of image and label.
        spacing: voxel size in mm along the array axes.
        label_counts: voxels per label value (index = label value).
        interactive: which classes were made by prompting an interactive model; ``None`` when the
            case was not made interactively (also every case saved before this field existed).
    """

    case_id: str
    folder: Path
    modality: str
    class_names: List[str]
    source_file: Optional[str] = None
    model_version: Optional[str] = None
    created: str = ""
    shape: Tuple[int, int, int] = (0, 0, 0)
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    label_counts: List[int] = field(default_factory=list)
    interactive: Optional[InteractiveOrigin] = None

    @property
    def is_interactive(self) -> bool:
        """Whether some of the case's objects were made by prompting."""
        return self.interactive is not None

    @property
    def image_path(self) -> Path:
        return self.folder / IMAGE_FILE

    @property
    def label_path(self) -> Path:
        return self.folder / LABEL_FILE

    def to_json_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("folder")
        d["shape"] = list(self.shape)
        d["spacing"] = list(self.spacing)
        d["format"] = CASE_FORMAT
        d["interactive"] = self.interactive.to_json_dict(self.class_names) if self.interactive else None
        return d

    @classmethod
    def from_json_file(cls, path: Path) -> "CaseRecord":
        """Read ``case.json``; the case id and class names are checked with :func:`safe_name`, and the
        case folder's name is the id (a record naming another id is refused: it was edited or moved).

        Raises:
            CaseStoreError: unreadable JSON, missing fields, unsafe or mismatching names.
        """
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            case_id = safe_name(d["case_id"], "case id")
            if case_id != path.parent.name:
                raise UnsafeNameError(f"case id {case_id!r} differs from its folder name {path.parent.name!r}")
            if not isinstance(d["class_names"], list):
                raise TypeError("class_names is not a list")
            class_names = [safe_name(c, "class name") for c in d["class_names"]]
            interactive = d.get("interactive")
            return cls(case_id=case_id, folder=path.parent, modality=str(d["modality"]),
                       class_names=class_names,
                       source_file=d.get("source_file"),
                       model_version=d.get("model_version"), created=str(d.get("created", "")),
                       shape=tuple(int(s) for s in d["shape"]),  # type: ignore[arg-type]
                       spacing=tuple(float(s) for s in d["spacing"]),  # type: ignore[arg-type]
                       label_counts=[int(c) for c in d.get("label_counts", [])],
                       interactive=None if interactive is None else
                       InteractiveOrigin.from_json_dict(interactive, len(class_names), path))
        except CaseStoreError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CaseStoreError(f"{path}: unreadable case description ({type(exc).__name__}: {exc})") from exc


# Integer voxel types an image keeps in its case file: a CT's int16 HU stay int16 (half the disk of float32, and the
# user's data as sent). Wider integers (int64) are narrowed by save_volume to the smallest type holding the values.
_KEPT_INTEGER_DTYPES = tuple(np.dtype(t) for t in ("u1", "i1", "u2", "i2", "u4", "i4"))


def _file_integer_dtype(header: Any) -> Optional[np.dtype]:
    """The integer voxel type the image's file stored (NIfTI without intensity scaling, NRRD ``type``), else None."""
    try:
        import nibabel as nib

        if isinstance(header, nib.Nifti1Header):
            slope, inter = header.get_slope_inter()  # None where unset (0 or NaN in the file)
            if slope not in (None, 1.0) or inter not in (None, 0.0):
                return None  # scaled integers are float values: the file's integers are not the image
            dt = np.dtype(header.get_data_dtype())
        elif isinstance(header, dict) and isinstance(header.get("type"), str):
            from nrrd.reader import _TYPEMAP_NRRD2NUMPY

            code = _TYPEMAP_NRRD2NUMPY.get(header["type"].strip().lower())
            if code is None:
                return None
            dt = np.dtype(code)
        else:
            return None
    except Exception:  # an odd header or another pynrrd: the image is then stored as float32, as before
        return None
    return dt.newbyteorder("=") if dt.newbyteorder("=") in _KEPT_INTEGER_DTYPES else None


def stored_image_data(image: Volume) -> np.ndarray:
    """The voxels a case file stores for ``image``: integer voxels as they are (int16, uint16, uint8...), float
    voxels read from an integer file (the engine reads files as float32) back in that file's integer type when they
    are exactly its integers, anything else as float32. The case reads back voxel-identical to the image."""
    data = np.asarray(image.data)
    if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
        return data  # kept; save_volume narrows int64/bool to the smallest integer type holding them
    data = data.astype(np.float32, copy=False)
    dt = _file_integer_dtype(image.header)
    if dt is not None and data.size:
        info = np.iinfo(dt)
        lo, hi = float(data.min()), float(data.max())
        if info.min <= lo and hi <= info.max:
            cast = data.astype(dt)
            if np.array_equal(cast.astype(np.float32), data):  # whole numbers only: nothing rounded
                return cast
    return data


def case_id_from_filename(name: Union[str, PathLike, None]) -> str:
    """A safe case id from a file name: ``/data/Patient 7.nii.gz`` -> ``Patient_7``."""
    if not name:
        return "case"
    base = Path(str(name)).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm", ".tif", ".tiff", ".npy"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-")
    return base[:100] or "case"


class CaseStore:
    """A folder of saved cases shared by the napari plugin, fine-tuning and the CLI.

    Args:
        root: the store folder; created (with parents) if missing.
        readonly: open an existing store for reading only (e.g. training from a shared folder).
        lock_timeout_s: how long a save or removal waits for another writer holding the store's lock.

    Raises:
        CaseStoreError: the folder cannot be created, is a file, or is not writable (unless
            ``readonly``).
    """

    def __init__(self, root: PathLike, readonly: bool = False, lock_timeout_s: float = 60.0) -> None:
        self.root = Path(root)
        self.readonly = readonly
        self.lock_timeout_s = lock_timeout_s
        if self.root.exists() and not self.root.is_dir():
            raise CaseStoreError(f"{self.root}: is a file, not a case store folder")
        if not self.root.exists():
            if readonly:
                raise CaseStoreError(f"{self.root}: case store folder not found")
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CaseStoreError(f"{self.root}: cannot create the case store folder ({exc})") from exc
        if not readonly:
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise CaseStoreError(f"{self.root}: case store folder is read-only; choose a writable folder")
            self._remove_stale_temps()

    # ------------------------------------------------------------------ queries
    def list(self) -> List[CaseRecord]:
        """All cases, oldest first (by ``created``, then id). Unreadable case folders are skipped
        with a warning naming them, so one damaged case does not hide the others."""
        records = []
        for child in self.root.iterdir():
            if child.name.startswith("."):
                continue
            if child.is_symlink():
                if (child / CASE_JSON).exists():
                    warnings.warn(f"{child}: is a link to {os.path.realpath(child)}; case folders must lie "
                                  "inside the store, skipped", stacklevel=2)
                continue
            if not child.is_dir():
                continue
            meta = child / CASE_JSON
            if not meta.exists():
                continue
            try:
                records.append(CaseRecord.from_json_file(meta))
            except CaseStoreError as exc:
                warnings.warn(str(exc), stacklevel=2)
        return sorted(records, key=lambda r: (r.created, r.case_id))

    def ids(self) -> List[str]:
        return [r.case_id for r in self.list()]

    def cases_of_scan(self, path: Optional[PathLike]) -> List[CaseRecord]:
        """The cases saved from the scan at ``path`` (see :func:`scan_of`: a case's own image file reopened is the
        scan it was saved from, and the case itself), oldest first; none for an unsaved image (``None``)."""
        scan = scan_of(path)
        if scan is None:
            return []
        own = Path(path).resolve() if path else None  # type: ignore[arg-type]
        return [r for r in self.list()
                if (r.source_file and str(r.source_file) == scan) or r.image_path.resolve() == own]

    def __len__(self) -> int:
        return len(self.list())

    def __iter__(self) -> Iterator[CaseRecord]:
        return iter(self.list())

    def __contains__(self, case_id: object) -> bool:
        return self._folder(case_id) is not None

    def _folder(self, case_id: object) -> Optional[Path]:
        """The folder of an existing case; None for unsafe ids, links and missing cases."""
        if not isinstance(case_id, str) or not _ID_OK.match(case_id):
            return None
        folder = self.root / case_id
        if folder.is_symlink() or not (folder / CASE_JSON).is_file():
            return None
        return folder

    def get(self, case_id: str) -> CaseRecord:
        """The record of one case. Raises :class:`CaseNotFoundError`."""
        folder = self._folder(case_id)
        if folder is None:
            raise CaseNotFoundError(f"{self.root}: no case {case_id!r}")
        return CaseRecord.from_json_file(folder / CASE_JSON)

    def load(self, case_id: str) -> Tuple[Volume, Volume, CaseRecord]:
        """``(image, label, record)`` of a case; the label is checked against the image grid and
        the case's class set."""
        record = self.get(case_id)
        image = load_volume(record.image_path)
        label = load_label(record.label_path, reference=image, class_ids=range(len(record.class_names)))
        return image, label, record

    # ------------------------------------------------------------------ changes
    def add(self, image: Volume, labels: np.ndarray, *, modality: str, class_names: Sequence[str],
            source_file: Optional[PathLike] = None, model_version: Optional[str] = None,
            case_id: Optional[str] = None, overwrite: bool = False,
            interactive: Optional[InteractiveOrigin] = None) -> CaseRecord:
        """Save a corrected case atomically.

        Args:
            image: the image Volume (its affine/header are kept; ``data`` ``(I, J, K)``).
            labels: integer label map ``(I, J, K)`` on the image grid, values in
                ``range(len(class_names))``.
            modality: the image's modality.
            class_names: index = label value, 0 = background.
            source_file: original file the image came from; default ``image.path``.
            model_version: version of the model that produced the draft segmentation.
            case_id: folder name; default derived from the source file name, made unique with
                ``_2``, ``_3``...
            overwrite: replace an existing case with the same id.
            interactive: which classes were made by prompting, with how many prompts and which model;
                recorded in ``case.json`` with the case (``None``: not made interactively).

        Returns:
            the new case's record.

        Raises:
            CaseExistsError: ``case_id`` exists and ``overwrite`` is False.
            CaseStoreError: invalid id or class name, store opened read-only, labels not matching the
                image, NaN or infinite image voxels, or the store stayed locked by another writer.
            WriteError: the case could not be written (full disk, read-only store); the message names
                the store and the case, the store is as it was.
        """
        if self.readonly:
            raise CaseStoreError(self.read_only_text())
        try:
            class_names = [safe_name(str(c), "class name") for c in class_names]
        except UnsafeNameError as exc:
            raise CaseStoreError(f"{self.root}: invalid {exc}") from None
        if len(class_names) < 2:
            raise CaseStoreError(f"{self.root}: need at least background and one class, got {class_names}")
        repeated = sorted({c for c in class_names if class_names.count(c) > 1})
        if repeated:
            raise CaseStoreError(f"{self.root}: class names {class_names} repeat {repeated}; each label value needs its "
                                 "own name")
        if not isinstance(modality, str) or not modality.strip():
            raise CaseStoreError(f"{self.root}: the modality must be a name such as CT or MR, got {modality!r}")
        labels = np.asarray(labels)
        if tuple(labels.shape) != image.shape:
            raise CaseStoreError(f"{self.root}: label shape {tuple(labels.shape)} differs from image shape "
                                 f"{image.shape} ({source_file or image.path or 'unsaved image'})")
        labels = as_label_array(labels, f"labels for {source_file or image.path or 'unsaved image'}",
                                class_ids=range(len(class_names)))
        # fine-tuning refuses an image with NaN/inf voxels: saved, such a case would make every later fine-tune on
        # the store fail, so it is refused here, where the user can still fix the image
        check_finite_voxels(image.data, f"{self.root}: image {source_file or image.path or 'unsaved image'}",
                            CaseStoreError)
        thin = thin_volume_message(f"{self.root}: image {source_file or image.path or 'unsaved image'}",
                                   image.shape, "image")
        if thin:  # likewise: a single slice (prompted, the session takes one) made every later fine-tune fail
            raise CaseStoreError(f"{thin}. A training case must be a volume fine-tuning can learn from; the labels "
                                 "of a single slice can be saved as a file of their own")
        # a case's own image reopened (File > Open on <case>/image.nii.gz) still comes from the scan the case was saved
        # from: recorded as "image", a second case of the same scan was saved under that name
        source = scan_of(source_file if source_file is not None else image.path)
        if interactive is not None:  # the same checks as when the record is read back
            where = f"{self.root} ({source or 'unsaved image'})"
            interactive = InteractiveOrigin.from_json_dict(interactive.to_json_dict(class_names), len(class_names),
                                                           where)

        if case_id is not None:
            if not isinstance(case_id, str) or not _ID_OK.match(case_id):
                raise CaseStoreError(f"{self.root}: invalid case id {case_id!r} (letters, digits, '.', '_', '-')")
            if case_id in self and not overwrite:
                raise CaseExistsError(f"{self.root}: case {case_id!r} already exists; pass overwrite=True to replace it")
        # A fine-tune reads the store as one dataset: a case of another label set would make every later fine-tune
        # on it fail, so it is refused here, where the user still holds the labels.
        replaced = case_id if overwrite else None
        conflict = label_set_conflict(class_names, ((r.case_id, r.class_names) for r in self.list()
                                                    if r.case_id != replaced))
        if conflict is not None:
            raise LabelSetConflictError(
                f"{self.root}: the classes {brief_names(class_names)} of {source_file or image.path or 'this case'} "
                f"disagree with case {conflict[0]!r} ({brief_names(conflict[1])}); a case store holds one label set (a case may lack classes "
                "at the end of the list only): save this case into another case folder, or name its classes as "
                "the store does", class_names, conflict[0], conflict[1])
        counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(class_names)).tolist()
        if not any(counts[1:]) and replaced is not None and replaced in self:
            # An emptied layer saved by mistake (a class cleared, then Save) would replace a corrected case with one
            # that teaches the model to find nothing. A new case without a class may be meant (a scan without the
            # structure: a negative example), so only the replacement of a labelled case is refused.
            held = sum(int(n) for n in (self.get(replaced).label_counts or [])[1:])
            if held:
                raise EmptyLabelsError(
                    f"{self.root}: the labels of {source_file or image.path or 'this case'} hold no class (every voxel "
                    f"is background) and would replace case {replaced!r}, which holds {held} labelled voxels; nothing "
                    "was saved. Paint or prompt the structures first, or save it as a new case")
        if interactive is not None:  # a prompted class since erased was not made by prompting in this case
            made = tuple(c for c in interactive.class_ids if counts[c] > 0)
            interactive = _replace(interactive, class_ids=made) if made else None

        base = case_id or case_id_from_filename(source)
        tmp = self.root / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            # The long part (compressing two volumes) runs unlocked; only choosing the id and the
            # rename hold the store's lock.
            # Both files carry the image's geometry: a NIfTI image's own header (both forms, as they are), else
            # sform + qform from its affine; a sheared grid (e.g. a tilted-gantry NRRD) goes in the sform alone,
            # so image and label still share one header (ITK tools then refuse both rather than misplace them).
            reference = with_nifti_header(image, sheared_nifti=True)
            save_volume(tmp / IMAGE_FILE, stored_image_data(image), reference)
            save_volume(tmp / LABEL_FILE, labels, reference)
            with folder_lock(self.root, self.lock_timeout_s):
                for attempt in range(1, 10000):
                    chosen = base if (case_id is not None or attempt == 1) else f"{base}_{attempt}"
                    final = self.root / chosen
                    if os.path.lexists(final) and not (overwrite and case_id is not None):
                        if case_id is not None:  # appeared since the check above
                            raise CaseExistsError(f"{self.root}: case {case_id!r} already exists")
                        continue
                    record = CaseRecord(
                        case_id=chosen, folder=final, modality=str(modality), class_names=class_names,
                        source_file=source, model_version=model_version,
                        created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                        shape=image.shape, spacing=tuple(float(s) for s in image.spacing),  # type: ignore[arg-type]
                        label_counts=counts, interactive=interactive)
                    write_json_atomic(tmp / CASE_JSON, record.to_json_dict())
                    self._publish(tmp, final)
                    return record
            raise CaseStoreError(f"{self.root}: could not find a free case id for {base!r}")
        except LockTimeout as exc:
            raise CaseStoreError(str(exc)) from None
        except OSError as exc:
            failure = describe_write_failure(exc)
            reason = failure[1] if failure else str(exc)
            raise WriteError(self.root, f"case {base!r} into the case store", reason,
                             failure[0] if failure else None) from exc
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def read_only_text(self) -> str:
        """What saving into or removing from a store opened read-only is refused with."""
        return (f"{self.root}: case store opened read-only (its cases can be listed and trained on); choose a "
                "writable case folder to save or remove cases")

    def remove(self, case_id: str) -> None:
        """Delete a case (it disappears at once: renamed away, then deleted)."""
        if self.readonly:
            raise CaseStoreError(self.read_only_text())
        trash = self.root / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
        try:
            with folder_lock(self.root, self.lock_timeout_s):
                record = self.get(case_id)
                os.rename(record.folder, trash)
        except LockTimeout as exc:
            raise CaseStoreError(str(exc)) from None
        _delete(trash)

    # ------------------------------------------------------------------ internals
    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the finished temp folder to ``final``, replacing what is there (a case or a link);
        the caller holds the store's lock."""
        if not os.path.lexists(final):
            os.rename(tmp, final)
            return
        trash = self.root / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
        os.rename(final, trash)  # renames a link itself, never what it points to
        try:
            os.rename(tmp, final)
        except OSError:
            os.rename(trash, final)  # put the old case back; nothing is lost
            raise
        _delete(trash)

    def _remove_stale_temps(self) -> None:
        """Delete temp/trash folders left by a crashed writer (old enough not to be in use)."""
        now = time.time()
        for child in self.root.iterdir():
            if child.is_dir() and child.name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)):
                try:
                    if now - child.stat().st_mtime > _STALE_TEMP_S:
                        shutil.rmtree(child, ignore_errors=True)
                except OSError:
                    pass


def _delete(path: Path) -> None:
    """Remove a trashed case folder, or only the link if it is one (never what a link points to)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)
