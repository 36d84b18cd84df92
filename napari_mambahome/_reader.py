"""napari reader: medical volumes (NIfTI, NRRD/NHDR/.seg.nrrd, MHA/MHD, MGZ, DICOM series) as layers
that keep their geometry, in a radiological first view.

Reading and validation belong to :mod:`engine.io` / :mod:`engine.formats`; this module turns an
``engine.io.Volume`` into napari layer data: an axial view (see :mod:`._geometry`), ``scale`` =
spacing, the exact way back to the file's grid in metadata, the modality found in the file, and an
initial contrast that suits it (CT soft-tissue window, percentiles otherwise).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._geometry import META_KEY, radiological_layer
from ._settings import load_settings, save_setting

PathLike = Union[str, os.PathLike]
LayerData = Tuple[Any, Dict[str, Any], str]

SUFFIXES = (".nii", ".nii.gz", ".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".mgh", ".dcm", ".ima")
"""File suffixes this reader claims (lower case); a folder is claimed when it holds DICOM files."""
CT_WINDOW = (400.0, 40.0)
"""Initial CT display window (width, level) in HU: soft tissue, as radiology viewers open a CT."""
# File names that name a segmentation rather than an image (nnU-Net/MSD/TotalSegmentator habits).
_LABEL_NAME = re.compile(r"(^|[_\-.])(label|labels|seg|segmentation|mask|gt|truth)([_\-.]|$)", re.IGNORECASE)
_LABEL_FOLDERS = {"labelstr", "labelsts", "labels", "masks", "segmentations"}


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name


def is_label_file(path: PathLike) -> bool:
    """Whether a file is a segmentation by its type (``.seg.nrrd``), name (``*_label*``) or folder
    (``labelsTr/``...)."""
    p = Path(path)
    if p.name.lower().endswith(".seg.nrrd"):
        return True
    return bool(_LABEL_NAME.search(_stem(p))) or p.parent.name.lower() in _LABEL_FOLDERS or _nifti_label_intent(p)


def _nifti_label_intent(path: Path) -> bool:
    """Whether a NIfTI file's header says it is a label map (``NIFTI_INTENT_LABEL``, as this plugin's writer marks
    the labels it saves, whatever the file is called)."""
    if not path.name.lower().endswith((".nii", ".nii.gz")) or not path.is_file():
        return False
    try:
        from engine.formats import nib_load  # a mixed-case "Seg.Nii.Gz" too, which nibabel alone cannot open

        return nib_load(path).header.get_intent()[0] == "label"
    except Exception:  # unreadable here: the volume reader reports it
        return False


def _readable(path: PathLike) -> bool:
    p = Path(path)
    if p.is_dir():
        from engine.formats import is_dicom_folder

        return is_dicom_folder(p)
    return str(path).lower().endswith(SUFFIXES)


PLUGIN_NAME = "napari-mambahome"
OFFERED_READER_PATTERNS = "preferred_reader_patterns_offered"  # key in this plugin's settings.json
_BUILTIN_READERS = {"napari", "builtins"}  # napari's own reader plugin, under its current and its former name


def _any_case(pattern: str) -> str:
    """``pattern`` with each letter as a ``[xX]`` set: ``*.nii.gz`` -> ``*.[nN][iI][iI].[gG][zZ]``."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in pattern)


def prefer_this_reader() -> Dict[str, str]:
    """Make this reader napari's preferred reader for the medical formats only napari's builtins also claim.

    napari's builtin reader claims ``*.nii``, ``*.nii.gz``, ``*.nrrd``, ``*.mha``... (imageio's list of extensions), so
    with no saved preference File > Open and drag-and-drop ask the user to choose a reader for every one of them, and
    the builtin choice fails on ``.nii.gz`` or loses spacing and orientation on the others. napari (0.5-0.9) has no
    reader priority for plugins: its saved preferences (``settings.plugins.extension2reader``) are the only way to
    skip the question, so this adds preferences, persisted in napari's settings like the user's own.

    A pattern is left alone when a saved preference already decides it (the user's choice, even a coarse ``*.gz``
    that napari's "remember this choice" saves for a ``.nii.gz``), when it was offered before (a preference the user
    removed stays removed; remembered in this plugin's settings for each napari settings file), or when another third-party plugin also claims it:
    choosing between two installed plugins stays the user's question. Patterns are case-insensitive sets because
    napari matches preferences case-sensitively (``SCAN.NII.GZ``, ``IM0001.DCM``) while npe2 offers readers for any
    case; a set also ranks below any plain pattern in napari's specificity order, so a preference the user saves
    later wins over this one.

    Returns:
        The preferences added (pattern -> plugin name); empty when napari or npe2 is absent.
    """
    try:
        from npe2 import PluginManager
        from napari.settings import get_settings
    except ImportError:  # the reader used without napari: there is no dialog to avoid
        return {}
    from fnmatch import fnmatch

    pm = PluginManager.instance()
    manifest = pm.get_manifest(PLUGIN_NAME)
    patterns = [p for r in (manifest.contributions.readers or ()) for p in r.filename_patterns]
    plugins = get_settings().plugins
    saved = dict(plugins.extension2reader)
    # each pattern is offered once per napari settings file (napari keeps one per environment; ours is shared by
    # all): one the user removed in Preferences > Plugins stays removed, a new environment still gets them
    profile = str(getattr(get_settings(), "config_path", None) or "")
    record = load_settings().get(OFFERED_READER_PATTERNS)
    record = dict(record) if isinstance(record, dict) else {}
    offered = set(record.get(profile, []))
    added: Dict[str, str] = {}
    for pattern in patterns:
        if _any_case(pattern) in offered:
            continue
        name = pattern.replace("*", "scan")
        # napari matches a preference against the opened file's absolute real path; a folder no one has keeps a
        # preference for one folder (``/study/*.nii.gz``) from counting as one for every file
        example = os.path.join(os.path.abspath(os.sep), "no-such-folder", name)
        if any(fnmatch(example, chosen) for chosen in saved):
            continue
        others = {r.plugin_name for r in pm.iter_compatible_readers([name])} - {PLUGIN_NAME}
        if others and others <= _BUILTIN_READERS:
            added[_any_case(pattern)] = PLUGIN_NAME
    if added:
        # assigned, not updated in place: only an assignment makes napari save its settings file
        plugins.extension2reader = {**saved, **added}
        save_setting(OFFERED_READER_PATTERNS, {**record, profile: sorted(offered | set(added))})
    return added


def on_activate(context: Any = None) -> None:
    """npe2 activation hook (``on_activate`` in napari.yaml), run once a session when napari first uses one of this
    plugin's commands: the dock, a sample, the reader or the writer. See :func:`prefer_this_reader`."""
    try:
        prefer_this_reader()
    except Exception:  # a failing hook fails npe2's activation, which would disable the dock and the reader too
        import logging

        logging.getLogger(__name__).warning("could not set napari's preferred reader for medical volumes",
                                            exc_info=True)


def get_reader(path: Union[PathLike, Sequence[PathLike]]) -> Optional[Callable[..., List[LayerData]]]:
    """npe2 reader contribution: :func:`read_volumes` for the formats in :data:`SUFFIXES` and DICOM folders."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if len(paths) == 1 and Path(paths[0]).is_dir() and not _readable(paths[0]):
        # napari offers every reader for every folder and, given None, says only that the reader "refused the file":
        # the annotator who chose this one for a folder gets told why it cannot be opened and what to open instead
        return _refuse_folder
    if not paths or not all(_readable(p) for p in paths):
        return None
    return read_volumes


def _refuse_folder(path: Union[PathLike, Sequence[PathLike]]) -> List[LayerData]:
    """The reader for a folder that holds no DICOM series: raises, saying what the folder holds instead."""
    from engine.io import VolumeError

    folder = Path(path if isinstance(path, (str, os.PathLike)) else list(path)[0])
    try:
        entries = sorted(e for e in folder.iterdir() if not e.name.startswith("."))
    except OSError as exc:
        raise VolumeError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from exc
    volumes = [e.name for e in entries if e.is_file() and _readable(e)]
    series = [e.name for e in entries if e.is_dir() and _readable(e)]
    if volumes:
        hint = (f"it holds {len(volumes)} volume file(s) ({', '.join(volumes[:3])}{', ...' if len(volumes) > 3 else ''}):"
                " open them with File > Open File(s)...")
    elif series:
        hint = (f"its subfolder(s) {', '.join(d + '/' for d in series[:3])} hold DICOM series: open one of those "
                "folders (or one of its files)")
    else:
        hint = ("it holds no volume files (.nii/.nii.gz, .nrrd, .nhdr, .mha, .mhd, .mgz, .seg.nrrd) and no DICOM "
                "files" + (" at all: it is empty" if not entries else ""))
    raise VolumeError(f"{folder}: not a DICOM series folder, so Mamba-HoME cannot open it as one volume; {hint}")


def read_volumes(path: Union[PathLike, Sequence[PathLike]]) -> List[LayerData]:
    """Read one or more volume files (or DICOM series folders) into napari layer data.

    Args:
        path: a file, a DICOM folder, or a list of them.

    Returns:
        ``[(data, kwargs, "image" | "labels"), ...]``: ``data`` a view of the file's array in the
        radiological display order (axial slices along axis 0), ``scale`` = spacing along the
        displayed axes, ``kwargs["metadata"][META_KEY]`` the source Volume, file affine and the
        display transform, ``kwargs["metadata"]["modality"]``/``["modality_source"]`` for images.
        Labels from ``.seg.nrrd`` get the segments' names (``class_names``, ``features``) and colours.

    Raises:
        engine.io.VolumeError: a file is unreadable or not a 3D volume (message names the file).
    """
    from engine.cases import LABEL_FILE, record_beside
    from engine.modality import normalize_modality
    from engine.io import VolumeError, load_label, load_volume, looks_like_label_map

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: List[LayerData] = []
    for p in paths:
        p = Path(p)
        # a DICOM slice stands for its series: the layer is named after the series folder
        name = p.parent.name if p.suffix.lower() in (".dcm", ".ima") else _stem(p)
        as_labels = is_label_file(p)
        case = record_beside(p)  # a saved case's own image or label file (its case.json beside it), else None
        if case is not None:  # a saved case reopened: named after the case ("image" and "label" said nothing)
            name, as_labels = (f"{case.case_id} labels", True) if p.name == LABEL_FILE else (case.case_id, as_labels)
        # a volume with NaN voxels is shown (with a note): the engine refuses it when asked to segment it
        volume = load_label(p) if as_labels else load_volume(p, allow_nonfinite=True)
        if not as_labels and looks_like_label_map(volume.data):
            # a mask another tool saved as `liver.nii.gz` is painted on, not windowed, by the user who opens it
            try:
                volume, as_labels = load_label(p), True
            except VolumeError:  # the sample looked like labels, the whole file does not: an image after all
                pass
            else:
                from napari.utils.notifications import show_info

                show_info(f"{p.name}: opened as labels: its voxels are a few integer values in regions "
                          "(a label map under a name that does not say so)")
        if as_labels:
            data, kwargs = radiological_layer(volume, name)
            style, names = _segment_style(volume.segments, data)
            kwargs.update(style)
            if not names:
                names = _header_names(volume.header, kwargs["metadata"][META_KEY])
            if names:
                kwargs["metadata"][META_KEY]["class_names"] = names
            layers.append((data, kwargs, "labels"))
        else:
            if case is not None and case.modality:  # a saved case reopened: its record says what the user confirmed
                volume.modality, volume.modality_source = normalize_modality(case.modality), "file"
            data, kwargs = radiological_layer(volume, name)
            kwargs.update(initial_contrast(volume.data, kwargs["metadata"].get("modality")))
            layers.append((data, kwargs, "image"))
        notes = list(getattr(volume, "notes", None) or [])
        if notes:
            from napari.utils.notifications import show_warning

            show_warning(f"{p.name}: " + "; ".join(notes))
    return layers


def _header_names(header: Any, meta: Dict[str, Any]) -> Optional[List[str]]:
    """Class names a label file's NIfTI header carries (:func:`._classes.header_class_names`); without any, ``meta``
    gets the mark of a label file that names no classes (:data:`._classes.LABEL_FILE_KEY`), so the dock does not name
    its values after the selected model unless the file is evidently a segmentation this plugin saved."""
    from ._classes import LABEL_FILE_KEY, header_class_names

    recorded, names = header_class_names(header) if header is not None else (False, None)
    if names:
        return names
    try:
        intent = header.get_intent()[0] == "label" if header is not None and hasattr(header, "get_intent") else False
    except Exception:
        intent = False
    # saved by this plugin while its names were unknown: unknown still, never the model's
    meta[LABEL_FILE_KEY] = {"intent_label": bool(intent) and not recorded}
    return None


def initial_contrast(data: np.ndarray, modality: Optional[str]) -> Dict[str, Any]:
    """Display settings for a freshly opened image.

    Args:
        data: the image array (any order).
        modality: ``"CT"`` gives the soft-tissue window :data:`CT_WINDOW`; anything else the 0.5-99.5
            percentile range, so an MR with a few bright voxels is not all dark.
    """
    if modality == "CT":
        width, level = CT_WINDOW
        return {"contrast_limits": (level - width / 2, level + width / 2), "colormap": "gray"}
    lo, hi = _percentiles(np.asarray(data), (0.5, 99.5)) if np.size(data) else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1.0
    return {"contrast_limits": (float(lo), float(hi)), "colormap": "gray"}


_SAMPLE_VOXELS = 1 << 20
"""Above four times this many voxels, :func:`_percentiles` reads a strided sample of about this many."""


def _percentiles(data: np.ndarray, q: Sequence[float]) -> Tuple[float, ...]:
    """``np.percentile(data.astype(float32), q)``; on a volume over ``4 * _SAMPLE_VOXELS`` voxels, of a strided
    sample of about ``_SAMPLE_VOXELS`` (every s-th voxel along each axis).

    napari's File > Open runs the reader on the GUI thread, where the float32 copy and the partition of a whole
    CT-sized volume froze the viewer 1.2-2.2 s (BENCHMARKS.md). A display window needs the percentiles to a fraction
    of a percentile point, which a million voxels give; the sample is a strided view, and only it is copied.
    """
    data = np.asarray(data)
    if data.size > 4 * _SAMPLE_VOXELS and data.ndim > 0:
        stride = max(1, int(round((data.size / _SAMPLE_VOXELS) ** (1.0 / data.ndim))))
        data = data[(slice(None, None, stride),) * data.ndim]
    sample = np.asarray(data, dtype=np.float32)
    if sample.size and not np.isfinite(sample.sum()):  # NaN voxels (a scan shown with them) made the limits NaN
        sample = sample[np.isfinite(sample)]
        if not sample.size:
            return tuple(0.0 for _ in q)
    return tuple(float(v) for v in np.percentile(sample, list(q)))


def _segment_style(segments: Optional[List[Dict[str, Any]]],
                   data: np.ndarray) -> Tuple[Dict[str, Any], Optional[List[str]]]:
    """Layer kwargs (``features``, ``colormap``) and class names (index = label value) of ``.seg.nrrd``
    segments; ``({}, None)`` without segments."""
    if not segments:
        return {}, None
    import pandas as pd

    top = max(int(data.max()), max(s["value"] for s in segments))
    names = ["background"] + [f"label {v}" for v in range(1, top + 1)]
    colors: Dict[Any, Any] = {None: [0.0, 0.0, 0.0, 0.0], 0: [0.0, 0.0, 0.0, 0.0]}
    for s in segments:
        names[s["value"]] = s["name"]
        if s.get("color"):
            colors[s["value"]] = list(s["color"][:3]) + [1.0]
    style: Dict[str, Any] = {"features": pd.DataFrame({"index": np.arange(len(names)), "class": names})}
    if len(colors) > 2:
        # values without a colour keep napari's cyclic colours' look-alike: a visible grey
        for v in range(1, top + 1):
            colors.setdefault(v, [0.6, 0.6, 0.6, 1.0])
        style["colormap"] = colors
    return style, names
