"""Reading and writing volumes with their geometry, and refusing bad files with a clear message.

NIfTI is read here with nibabel; the other formats (NRRD, ``.seg.nrrd``, MHA/MHD, DICOM series, MGZ)
are read and written by :mod:`engine.formats`, which converts their geometry to the same RAS affine.

Every array here keeps the file's voxel order (nibabel's ``(i, j, k)``); ``Volume.spacing`` is the
voxel size in mm along those array axes (napari uses it as ``scale``). Reorientation happens only
inside :mod:`engine.preprocess`, so whatever :func:`save_volume` writes lies on the exact grid of
the volume it was derived from and opens aligned in 3D Slicer / ITK-SNAP.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Two grids are "the same" when their affines agree to this many mm (float32 headers round).
GRID_ATOL = 1e-3


class VolumeError(ValueError):
    """A volume or label file that cannot be used; the message names the file and the problem."""


@dataclass
class Volume:
    """A 3D array with the geometry of the file it came from.

    Args:
        data: exactly 3D array ``(I, J, K)`` in file voxel order; float32 for images, an integer
            dtype for label maps.
        affine: ``(4, 4)`` float64 voxel-to-world (RAS+ mm) matrix of the file.
        spacing: voxel size in mm along the three array axes (the affine's column norms).
        header: the nibabel header of the file (or the format's header), or None for volumes built
            in memory.
        path: the file the volume was read from, or None.
        modality: ``"CT"``, ``"MR"``... when known, else None.
        modality_source: ``"file"`` (named by the file: DICOM Modality tag, NRRD/MetaImage key),
            ``"guessed"`` (intensities look like CT Hounsfield units), or None.
        segments: for label maps read from ``.seg.nrrd``: ``[{"value", "name", "color"}]``.
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: Tuple[float, float, float]
    header: Any = None
    path: Optional[str] = None
    modality: Optional[str] = None
    modality_source: Optional[str] = None
    segments: Optional[List[Dict[str, Any]]] = None

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @classmethod
    def from_array(cls, data: np.ndarray, affine: np.ndarray, header: Any = None,
                   path: Optional[str] = None) -> "Volume":
        """Build a Volume from an array and an affine, deriving ``spacing`` from the affine.

        Args:
            data: 3D array ``(I, J, K)``.
            affine: ``(4, 4)`` voxel-to-world matrix.
        """
        affine = np.asarray(affine, dtype=np.float64)
        name = path or "<in-memory volume>"
        _check_affine(affine, name)
        if np.asarray(data).ndim != 3:
            raise VolumeError(f"{name}: expected a 3D array, got shape {np.asarray(data).shape}")
        return cls(data=np.asarray(data), affine=affine, spacing=spacing_from_affine(affine),
                   header=header, path=path)


def spacing_from_affine(affine: np.ndarray) -> Tuple[float, float, float]:
    """Voxel size (mm) along each array axis: the norms of the affine's first three columns."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return tuple(float(v) for v in norms)  # type: ignore[return-value]


def is_nifti(path: PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _check_affine(affine: np.ndarray, name: str) -> None:
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise VolumeError(f"{name}: the voxel-to-world affine is not a finite 4x4 matrix")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise VolumeError(f"{name}: voxel spacing {tuple(float(s) for s in spacing)} has a zero axis")
    # Relative test: a 0.001 mm voxel grid is legitimate, a rank-deficient direction matrix is not.
    det = abs(float(np.linalg.det(affine[:3, :3])))
    if not det > 1e-9 * float(np.prod(spacing)):
        raise VolumeError(f"{name}: the voxel-to-world affine is singular (axes are not independent)")


def _read_nifti(path: Path) -> Tuple[np.ndarray, np.ndarray, Any]:
    """Read a NIfTI file completely (so truncated data fails here, not later)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        # nibabel reads lazily; pulling the data inside the try turns gzip/EOF/zlib errors of a
        # truncated or corrupt file into a VolumeError instead of a crash later in a worker.
        data = np.asanyarray(img.dataobj)
        header = img.header.copy()
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in header.get_zooms()[:3])
        raw_zooms = _raw_pixdim(img, path)
    except VolumeError:
        raise
    except Exception as exc:  # nibabel, gzip, zlib, EOF and struct errors all mean "unreadable"
        raise VolumeError(f"{path}: cannot read NIfTI file ({type(exc).__name__}: {exc}); "
                          "the file is corrupt, truncated or not NIfTI") from exc
    if len(zooms) == 3 and (not np.all(np.isfinite(zooms)) or min(zooms) <= 0):
        raise VolumeError(f"{path}: voxel spacing {zooms} in the header must be finite and > 0")
    if raw_zooms is not None and (not np.all(np.isfinite(raw_zooms)) or min(raw_zooms) <= 0):
        # nibabel silently turns a 0 pixdim into 1 mm; without an sform/qform that invented grid is all
        # the file has, and labels written on it would not overlay the real scan.
        raise VolumeError(f"{path}: voxel spacing {raw_zooms} in the header (pixdim) must be finite and > 0, "
                          "and the file has no sform/qform to place its voxels otherwise")
    return data, affine, header


def _raw_pixdim(img: Any, path: Path) -> Optional[Tuple[float, float, float]]:
    """The header's spatial pixdim as stored, when the affine rests on it (no sform/qform), else None.

    nibabel's loaded header already has zero pixdims replaced by 1, hence the re-read of the raw bytes.
    """
    header = img.header
    if "sform_code" not in header or int(header["sform_code"]) > 0 or int(header["qform_code"]) > 0:
        return None
    with nib_opener(path) as f:
        raw = type(header).from_fileobj(f, check=False)
    return tuple(float(f"{z:.7g}") for z in raw["pixdim"][1:4])  # type: ignore[return-value]


def nib_opener(path: Path) -> Any:
    """A file object for ``path`` that un-gzips ``.gz`` files (nibabel's opener)."""
    from nibabel.openers import ImageOpener

    return ImageOpener(str(path), "rb")


def _read_other(path: Path) -> Any:
    """Non-NIfTI formats through :mod:`engine.formats` (a ``RawVolume``, RAS affine)."""
    from engine.formats import FormatError, read_raw

    try:
        return read_raw(path)
    except FormatError as exc:
        raise VolumeError(str(exc)) from exc


def _read(path: PathLike) -> Tuple[np.ndarray, np.ndarray, Any, Path, Any]:
    """``(data, affine, header, path, raw)``; ``raw`` is the formats reader's RawVolume or None."""
    p = Path(path)
    if not p.exists():
        raise VolumeError(f"{p}: file not found")
    raw = None
    if is_nifti(p):
        data, affine, header = _read_nifti(p)
    else:
        from engine.formats import can_read

        if p.is_dir() and not can_read(p):
            raise VolumeError(f"{p}: is a folder, expected a volume file")
        raw = _read_other(p)
        data, affine, header = raw.data, raw.affine, raw.header
    if data.dtype.fields is not None:
        raise VolumeError(f"{p}: is an RGB/colour image ({data.dtype}); expected a scalar 3D volume")
    if np.iscomplexobj(data):
        raise VolumeError(f"{p}: has complex voxels; expected a real-valued 3D volume")
    # A 3D volume stored as 4D/5D with singleton trailing axes (common for exported series) is 3D.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        if data.ndim < 3:
            raise VolumeError(f"{p}: is {data.ndim}D with shape {data.shape}; expected a 3D volume")
        raise VolumeError(f"{p}: is {data.ndim}D with shape {data.shape} (several volumes or "
                          "channels); expected one 3D volume - split it into one file per volume")
    if min(data.shape) < 1:
        raise VolumeError(f"{p}: is empty (shape {data.shape})")
    _check_affine(affine, str(p))
    return data, affine, header, p, raw


def read_grid(path: PathLike) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """The voxel grid ``(shape, affine)`` of a volume file, from its header only when NIfTI.

    Raises:
        VolumeError: missing or unreadable file, not 3D, unusable affine.
    """
    p = Path(path)
    if not p.exists():
        raise VolumeError(f"{p}: file not found")
    if not is_nifti(p):
        vol = load_volume(p)
        return vol.shape, vol.affine
    import nibabel as nib

    try:
        img = nib.load(str(p))
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:
        raise VolumeError(f"{p}: cannot read NIfTI header ({type(exc).__name__}: {exc})") from exc
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise VolumeError(f"{p}: is {len(shape)}D with shape {shape}; expected a 3D volume")
    _check_affine(affine, str(p))
    return shape, affine  # type: ignore[return-value]


def load_volume(path: PathLike) -> Volume:
    """Read an image volume as float32 with its geometry.

    Args:
        path: ``.nii``/``.nii.gz``, or any format of :mod:`engine.formats` (``.nrrd``, ``.nhdr``,
            ``.mha``, ``.mhd``, ``.mgz``, a DICOM series folder or one of its files).

    Returns:
        Volume with ``data`` float32 ``(I, J, K)`` in file voxel order (scl_slope/inter applied),
        ``modality``/``modality_source`` from the file or guessed from Hounsfield units.

    Raises:
        VolumeError: missing, unreadable, corrupt or truncated file; not 3D; RGB; NaN/inf voxels;
            zero, negative or non-finite spacing; singular affine.
    """
    from engine.formats import guess_modality

    data, affine, header, p, raw = _read(path)
    modality = getattr(raw, "modality", None)
    source = "file" if modality else None
    if modality is None:
        modality = guess_modality(data)  # before the float cast: HU are integers in the file
        source = "guessed" if modality else None
    data = np.asarray(data, dtype=np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
        raise VolumeError(f"{p}: {int(bad.sum())} of {data.size} voxels are NaN or infinite")
    return Volume(data=data, affine=affine, spacing=spacing_from_affine(affine), header=header, path=str(p),
                  modality=modality, modality_source=source)


def smallest_label_dtype(values_min: int, values_max: int) -> np.dtype:
    """The smallest NIfTI-friendly integer dtype holding ``[values_min, values_max]``."""
    for dt in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= values_min and values_max <= info.max:
            return np.dtype(dt)
    raise ValueError(f"label values [{values_min}, {values_max}] do not fit in int32")


def check_same_grid(label: Volume, reference: Volume, what: str = "label") -> None:
    """Raise :class:`VolumeError` unless ``label`` lies on ``reference``'s voxel grid.

    Grids match when shapes are equal and affines agree within :data:`GRID_ATOL` mm.
    """
    name = label.path or f"<{what}>"
    ref = reference.path or "<image>"
    if label.shape != reference.shape:
        raise VolumeError(f"{name}: {what} shape {label.shape} differs from image {ref} shape {reference.shape}")
    if not np.allclose(label.affine, reference.affine, atol=GRID_ATOL, rtol=0):
        diff = float(np.max(np.abs(label.affine - reference.affine)))
        raise VolumeError(f"{name}: {what} lies on a different grid than image {ref} "
                          f"(affines differ by up to {diff:.4g} mm); resample it onto the image first")


def as_label_array(data: np.ndarray, name: str, class_ids: Optional[Iterable[int]] = None) -> np.ndarray:
    """Validate a label array (integral, non-negative, within ``class_ids``) and return it as the
    smallest integer dtype. ``name`` is used in error messages."""
    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.issubdtype(data.dtype, np.floating):
            raise VolumeError(f"{name}: label dtype {data.dtype} is not numeric")
        finite = np.isfinite(data)
        if not finite.all():
            raise VolumeError(f"{name}: {int((~finite).sum())} label voxels are NaN or infinite")
        frac = data != np.round(data)
        if frac.any():
            examples = np.unique(data[frac])[:5]
            raise VolumeError(f"{name}: label map has {int(frac.sum())} non-integer voxels "
                              f"(e.g. {examples.tolist()}); is this an image rather than a label map?")
        data = np.round(data)
    vmin, vmax = (int(data.min()), int(data.max())) if data.size else (0, 0)
    if vmin < 0:
        raise VolumeError(f"{name}: label map has negative values (min {vmin})")
    if class_ids is not None:
        allowed = np.asarray(sorted({int(c) for c in class_ids}))
        present = np.unique(data).astype(np.int64)
        unknown = np.setdiff1d(present, allowed)
        if unknown.size:
            raise VolumeError(f"{name}: label values {unknown.tolist()} are not in the label set "
                              f"{allowed.tolist()}")
    return data.astype(smallest_label_dtype(vmin, vmax), copy=False)


def load_label(path: PathLike, reference: Optional[Volume] = None,
               class_ids: Optional[Iterable[int]] = None) -> Volume:
    """Read a label map as an integer Volume.

    Args:
        path: label file.
        reference: if given, the label must lie on this image's grid (same shape, affine within
            1e-3 mm).
        class_ids: if given, every value in the label map must be one of these.

    Returns:
        Volume with integer ``data`` (uint8 when values fit) ``(I, J, K)``.

    Raises:
        VolumeError: as :func:`load_volume`, plus non-integer values, values outside
            ``class_ids`` (named), or a grid different from ``reference``.
    """
    data, affine, header, p, raw = _read(path)
    data = as_label_array(data, str(p), class_ids)
    label = Volume(data=data, affine=affine, spacing=spacing_from_affine(affine), header=header, path=str(p),
                   segments=getattr(raw, "segments", None))
    if reference is not None:
        check_same_grid(label, reference)
    return label


def _nifti_dtype(array: np.ndarray, dtype: Any) -> np.dtype:
    if dtype is not None:
        return np.dtype(dtype)
    dt = array.dtype
    if dt == bool or (np.issubdtype(dt, np.integer) and dt.itemsize > 4):
        # NIfTI readers handle int64 poorly; labels fit the smallest integer type.
        if array.size == 0:
            return np.dtype(np.uint8)
        return smallest_label_dtype(int(array.min()), int(array.max()))
    if dt == np.float64 or dt == np.float16:
        return np.dtype(np.float32)
    return dt


def _temp_sibling(path: Path) -> Path:
    """A hidden temp name in the same folder that keeps the suffix (nibabel picks gzip by it)."""
    suffix = ".nii.gz" if str(path).lower().endswith(".nii.gz") else path.suffix
    stem = path.name[: -len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}.tmp-{uuid.uuid4().hex[:8]}{suffix}")


def atomic_write(path: PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` on a hidden temporary file beside ``path`` (same suffix), fsync it and
    move it into place with ``os.replace``; the one way every file of the engine is written.

    If ``write`` raises (full disk, interruption), the temporary file is removed and whatever was at
    ``path`` before is untouched.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(p)
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the usual mode for a new file, whatever the writer used
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def save_volume(path: PathLike, array: np.ndarray, reference: Volume, dtype: Any = None,
                segments: Optional[List[Dict[str, Any]]] = None) -> Path:
    """Write ``array`` as NIfTI on ``reference``'s grid, atomically.

    The reference's affine and a copy of its header are used (sform/qform codes kept, data type set
    to the written array's, scl_slope/inter reset) so the file opens exactly on its image in 3D
    Slicer / ITK-SNAP.

    Other formats (``.nrrd``, ``.nhdr``, ``.seg.nrrd``, ``.mha``, ``.mhd``, ``.mgz``) are written by
    :func:`engine.formats.write_raw` with the reference's affine (3D arrays only).

    Args:
        path: target ``.nii.gz`` or ``.nii`` file (or another format by suffix); parent folders are created.
        array: ``(I, J, K)`` array with the reference's shape, or ``(I, J, K, C)`` (e.g. class
            probabilities; one volume per channel on the same grid).
        reference: the Volume whose grid the array lies on.
        dtype: stored dtype; default the array's (bool/int64 -> smallest integer, float64 -> float32).
        segments: segment names/colours for ``.seg.nrrd`` (``[{"value", "name", "color"}]``).

    Returns:
        The written path.

    Raises:
        VolumeError: shape mismatch with the reference, or a file type that cannot be written.
    """
    import nibabel as nib

    p = Path(path)
    array = np.asarray(array)
    if tuple(array.shape[:3]) != reference.shape or array.ndim not in (3, 4):
        raise VolumeError(f"{p}: array shape {tuple(array.shape)} differs from the reference "
                          f"{reference.path or 'volume'} shape {reference.shape}; refusing to write it on that grid")
    out_dtype = _nifti_dtype(array, dtype)
    array = array.astype(out_dtype, copy=False)
    if not is_nifti(p):
        return _save_other(p, array, reference, segments)
    affine = np.asarray(reference.affine, dtype=np.float64)

    ref_header = reference.header
    if isinstance(ref_header, nib.Nifti1Header):
        header = ref_header.copy()
        header.set_data_shape(array.shape)  # a 4D array gets dim[0] = 4; nibabel checks shapes against it
        same_affine = np.allclose(header.get_best_affine(), affine, atol=1e-6)
        img = nib.Nifti1Image(array, None if same_affine else affine, header=header)
        if not same_affine:
            s_code = max(int(header["sform_code"]), 1)
            q_code = max(int(header["qform_code"]), 1)
            img.set_sform(affine, code=s_code)
            img.set_qform(affine, code=q_code)
    else:
        img = nib.Nifti1Image(array, affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
    img.header.set_data_dtype(out_dtype)
    # The reference's scaling applied to its stored integers; these values are final.
    img.header.set_slope_inter(np.nan, np.nan)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0

    return atomic_write(p, lambda tmp: nib.save(img, tmp))


def _save_other(p: Path, array: np.ndarray, reference: Volume,
                segments: Optional[List[Dict[str, Any]]]) -> Path:
    from engine.formats import FormatError, can_write, write_raw

    if not can_write(p):
        raise VolumeError(f"{p}: cannot write this file type; use .nii.gz, .nii, .nrrd, .nhdr, .seg.nrrd, "
                          ".mha, .mhd or .mgz")
    if array.ndim != 3:
        raise VolumeError(f"{p}: only NIfTI holds several volumes (shape {array.shape}); use .nii.gz")
    try:
        return write_raw(p, array, reference.affine, segments=segments, atomic=atomic_write)
    except FormatError as exc:
        raise VolumeError(str(exc)) from exc


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write a text file atomically (temp file in the same folder + ``os.replace``)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def write_json_atomic(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically; NaN is written as ``null`` (valid JSON)."""
    import json

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not np.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        if isinstance(x, Path):
            return str(x)
        return x

    return write_text_atomic(path, json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")
