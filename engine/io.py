"""Reading and writing volumes with their geometry, and refusing bad files with a clear message.

Longer than the engine's ~500-line norm because it is the one place files meet the engine: the
checks that refuse every kind of bad volume and the one atomic write path (temporary files, all-or-nothing
groups, full-disk and read-only errors) share the ``Volume`` type, the suffix rules and the error types.
The write path is the part to move into its own module when it grows again.

NIfTI is read here with nibabel; the other formats (NRRD, ``.seg.nrrd``, MHA/MHD, DICOM series, MGZ)
are read and written by :mod:`engine.formats`, which converts their geometry to the same RAS affine.

Every array here keeps the file's voxel order (nibabel's ``(i, j, k)``); ``Volume.spacing`` is the
voxel size in mm along those array axes (napari uses it as ``scale``). Reorientation happens only
inside :mod:`engine.preprocess`, so whatever :func:`save_volume` writes lies on the exact grid of
the volume it was derived from and opens aligned in 3D Slicer / ITK-SNAP.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import numpy as np

from engine.formats import WHOLE_SCAN_HINT

PathLike = Union[str, os.PathLike]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Two grids are "the same" when their affines agree to this many mm (float32 headers round).
GRID_ATOL = 1e-3


class VolumeError(ValueError):
    """A volume or label file that cannot be used; the message names the file and the problem."""


class LabelValuesError(VolumeError):
    """A label map whose values are no class numbers (NaN, fractions, negative, or outside the label set asked for):
    a caller that knows the classes (``mambahome evaluate``) adds the range it expected."""


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
        modality_source: ``"file"`` (named by the file: DICOM Modality tag, NRRD/MetaImage key, or the channel
            name of a ``dataset.json`` beside it, :func:`engine.modality.modality_beside`),
            ``"guessed"`` (intensities look like CT Hounsfield units), ``"user"`` (an annotator chose it), or None.
        segments: for label maps read from ``.seg.nrrd``: ``[{"value", "name", "color"}]``.
        notes: what the user should know about the file's geometry (e.g. a NIfTI whose qform and sform
            disagree, which ITK-based tools place differently from nibabel/napari); empty when nothing.
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: Tuple[float, float, float]
    header: Any = None
    path: Optional[str] = None
    modality: Optional[str] = None
    modality_source: Optional[str] = None
    segments: Optional[List[Dict[str, Any]]] = None
    notes: List[str] = field(default_factory=list)

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


# ----------------------------------------------------------------------------- NIfTI geometry
# Two voxel-to-world maps place a grid "at the same place" when no corner of the grid moves by more than this
# fraction of its smallest voxel (float32 NIfTI headers and ITK's pixdim spacing round far below it).
ALIGN_TOL_VOXELS = 0.01


def grid_misfit(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> float:
    """The largest distance (mm) between where two voxel-to-world maps put the corners of a grid of ``shape``."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)], dtype=np.float64).T
    moved = (np.asarray(a, dtype=np.float64) @ corners - np.asarray(b, dtype=np.float64) @ corners)[:3]
    return float(np.max(np.linalg.norm(moved, axis=0)))


def _aligned(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> bool:
    tol = max(GRID_ATOL, ALIGN_TOL_VOXELS * float(min(spacing_from_affine(b))))
    return grid_misfit(a, b, shape) <= tol


def is_sheared(affine: np.ndarray, tol: float = 1e-4) -> bool:
    """Whether the voxel axes of ``affine`` are not perpendicular (a shear, e.g. a CT gantry tilt): the
    normalised columns are not orthonormal within ``tol`` (ITK's own test for a usable NIfTI sform)."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = linear / np.linalg.norm(linear, axis=0)[None, :]
    return not np.allclose(unit.T @ unit, np.eye(3), atol=tol, rtol=0)


def nifti_itk_affine(header: Any) -> Optional[np.ndarray]:
    """The RAS voxel-to-world matrix that ITK's NIfTI reader (ITK 5.4: 3D Slicer, ITK-SNAP, SimpleITK, ANTs)
    derives from a NIfTI header, or None where ITK refuses the file or its choice cannot be told.

    ITK's rule (``NiftiImageIO::SetImageIOOrientationFromNIfTI``): spacing always comes from ``pixdim``; the
    directions and origin come from the sform when the sform's normalised axes are orthonormal and either the
    qform_code is 0, or the sform_code is 1 (scanner), or sform and qform are very similar; otherwise from the
    qform (qform_code > 0); with qform_code and sform_code both 0, the origin is 0 and the axes are LPS
    (ITK refuses a file whose sform is sheared and whose qform_code is 0). nibabel (and so this engine,
    napari, and the mask files written for such images) follow :func:`load_volume`'s rule instead; the two
    differ for the files listed there. Lengths in metres or microns (``xyzt_units``) are converted to mm, as ITK
    converts them (:func:`nifti_header_in_mm`).
    """
    header = nifti_header_in_mm(header)[0]
    zooms = np.abs(np.asarray(header["pixdim"][1:4], dtype=np.float64))
    zooms = np.where(zooms > 0, zooms, 1.0)
    q_code, s_code = int(header["qform_code"]), int(header["sform_code"])
    if q_code == 0 and s_code == 0:
        return np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
    qform = np.asarray(header.get_qform(), dtype=np.float64) if q_code else None
    sform = np.asarray(header.get_sform(), dtype=np.float64) if s_code else None
    chosen = None
    if sform is not None and np.all(np.isfinite(sform)) and abs(np.linalg.det(sform[:3, :3])) > 0 \
            and not is_sheared(sform):
        shape = [max(int(n), 1) for n in (list(header.get_data_shape()) + [1, 1, 1])[:3]]
        if qform is None or s_code == 1 or _aligned(sform, qform, shape):
            chosen = sform  # (sform and qform placing the grid alike: either gives the same grid)
        else:
            # ITK takes the sform when its singular values, left singular vectors and offset match the qform's
            # (1e-4); when they do but the grids differ (axes swapped or flipped) its pick depends on its SVD.
            s_vals = np.linalg.svd(sform[:3, :3], compute_uv=False)
            q_vals = np.linalg.svd(qform[:3, :3], compute_uv=False)
            s_gram, q_gram = sform[:3, :3] @ sform[:3, :3].T, qform[:3, :3] @ qform[:3, :3].T
            if np.allclose(s_vals, q_vals, atol=1e-4, rtol=0) and np.allclose(sform[:3, 3], qform[:3, 3], atol=1e-4, rtol=0) \
                    and np.allclose(s_gram, q_gram, atol=1e-3 * float(np.max(q_vals)) ** 2, rtol=0):
                return None
            chosen = qform
    elif qform is not None:
        chosen = qform
    if chosen is None:
        return None
    linear = chosen[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = linear / np.linalg.norm(linear, axis=0)[None, :] * zooms[None, :]
    affine[:3, 3] = chosen[:3, 3]
    return affine


def nifti_geometry_conflict(header: Any, affine: np.ndarray, shape: Sequence[int]) -> Optional[str]:
    """Why ITK-based tools place a NIfTI file elsewhere than ``affine`` (nibabel's reading of ``header``), or None
    when ITK puts every voxel of the ``shape`` grid at the same place (:data:`ALIGN_TOL_VOXELS`)."""
    itk = nifti_itk_affine(header)
    if itk is not None and _aligned(itk, affine, shape):
        return None
    q_code, s_code = int(header["qform_code"]), int(header["sform_code"])
    if q_code == 0 and s_code == 0:
        why = ("it has neither a qform nor an sform (qform_code and sform_code are 0): nibabel centres the "
               "grid on the origin with a flipped x axis, ITK starts it at the origin in LPS axes")
    elif itk is None and q_code == 0:
        why = "its sform is sheared and it has no qform: ITK cannot open it"
    elif itk is None:
        why = "its qform and sform disagree and ITK's choice between them cannot be predicted"
    elif s_code and is_sheared(header.get_sform()):
        why = "its sform holds a shear the qform cannot represent: nibabel uses the sform, ITK the qform"
    elif q_code and s_code:
        why = "its qform and sform disagree: nibabel uses the sform, ITK the qform"
    else:
        why = "its voxel sizes (pixdim) disagree with its sform: ITK takes the spacing from pixdim"
    return f"{why} ({grid_misfit(itk, affine, shape):.3g} mm apart)" if itk is not None else why


# NIfTI's spatial units (xyzt_units, bits 0-2) -> mm. 'unknown' (code 0) is read as mm, as nibabel, ITK and 3D Slicer
# read it: most tools write 0 whatever their unit (nibabel's own images, many converters), and their files are in mm;
# scaling those would misplace nearly every file to honour a rare one. 'meter' and 'micron' are explicit, and ITK
# converts them (a 0.002 m voxel is 2 mm in 3D Slicer): read in metres as mm, a mask lay 1000x off the scan there.
_NIFTI_MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 0.001}
_NIFTI_UNITS_MM = 2  # NIFTI_UNITS_MM
# How messages name a header's spatial unit (nibabel's names -> words).
_UNIT_WORDS = {"meter": "metres", "micron": "microns", "mm": "mm", "unknown": "unknown (read as mm)"}


def nifti_unit_factor(header: Any) -> float:
    """mm per length unit of a NIfTI header (``xyzt_units``): 1000 for metres, 0.001 for microns, else 1 ('mm',
    'unknown', a code nibabel does not know, or not a NIfTI header)."""
    try:
        unit = header.get_xyzt_units()[0]
    except Exception:  # noqa: BLE001 - not a NIfTI header, or a units code nibabel does not know: taken as mm
        return 1.0
    return _NIFTI_MM_PER_UNIT.get(unit, 1.0)


def nifti_header_in_mm(header: Any) -> Tuple[Any, float]:
    """``(header, factor)``: a NIfTI header whose lengths are in metres or microns (``xyzt_units``) as a copy in mm
    (pixdim, qoffset and srow scaled by ``factor``, units set to mm, the time unit kept), else ``header`` itself and 1.

    For the engine's own geometry arithmetic (ITK's reading of the header, :func:`nifti_itk_affine`); the header a
    :class:`Volume` keeps, and a mask saved for it carries (:func:`nifti_header_for`), is the file's own, units and
    raw values as they are: nibabel-based tools, which ignore the units, then place the mask where they place the
    image, and ITK-based tools, which convert them, too.
    """
    factor = nifti_unit_factor(header)
    if factor == 1.0:
        return header, 1.0
    mm = header.copy()
    pixdim = np.array(mm["pixdim"], dtype=np.float64)
    pixdim[1:4] *= factor
    mm["pixdim"] = pixdim
    for key in ("qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z"):
        mm[key] = np.asarray(mm[key], dtype=np.float64) * factor
    mm["xyzt_units"] = (int(mm["xyzt_units"]) & ~0x07) | _NIFTI_UNITS_MM
    return mm, factor


def nifti_affine_mm(header: Any, affine: Optional[np.ndarray] = None) -> np.ndarray:
    """The voxel-to-world affine of a NIfTI header in mm: ``affine`` (default the header's best affine, as nibabel
    places it, in the header's own unit) with its lengths times :func:`nifti_unit_factor`."""
    out = np.array(header.get_best_affine() if affine is None else affine, dtype=np.float64)
    factor = nifti_unit_factor(header)
    if factor != 1.0:
        out[:3] *= factor
    return out


def length_unit_words(header: Any = None, path: Optional[PathLike] = None) -> str:
    """How a file's length unit is said in messages: a NIfTI header's ``xyzt_units`` ('metres', 'microns', 'mm',
    'unknown (read as mm)'), read from ``path`` when no header is given; 'mm' for every other format."""
    if header is None and path is not None and is_nifti(path):
        try:
            from engine.formats import nib_load

            header = nib_load(Path(path)).header
        except Exception:  # noqa: BLE001 - unreadable now: said as its reader placed it
            header = None
    try:
        unit = header.get_xyzt_units()[0] if header is not None else "mm"
    except Exception:  # noqa: BLE001 - not a NIfTI header: other formats are in mm
        unit = "mm"
    return _UNIT_WORDS.get(unit, "mm")


def _nifti_geometry(img: Any) -> Tuple[Any, np.ndarray]:
    """``(header, affine)`` of a nibabel NIfTI image: the file's own header (units and raw values kept, so a mask
    saved for the image is written as the image is: :func:`nifti_header_for`) and its affine in mm (nibabel's
    affine times :func:`nifti_unit_factor`: metres and microns as mm, as ITK reads them)."""
    return img.header, nifti_affine_mm(img.header, img.affine)


def _unit_factor_between(affine: np.ndarray, reference_affine: np.ndarray, shape: Sequence[int]) -> Optional[float]:
    """1000 or 0.001 when ``affine`` times that factor places a grid of ``shape`` where ``reference_affine`` does, else
    None."""
    for factor in (1000.0, 0.001):
        scaled = np.array(affine, dtype=np.float64)
        scaled[:3] *= factor
        try:
            if _aligned(scaled, reference_affine, shape):
                return factor
        except (ValueError, FloatingPointError):
            return None
    return None


def unit_mismatch(name: str, what: str, affine: np.ndarray, unit: str, reference: str, reference_what: str,
                  reference_affine: np.ndarray, reference_unit: str, shape: Sequence[int]) -> Optional[str]:
    """The message for a file (``name``, its ``what``) that lies on ``reference``'s grid of ``shape`` but for its
    length unit, else None: the two headers name different units (:func:`length_unit_words`; one in metres or
    microns: 'mm' and 'unknown (read as mm)' are both mm) and read in mm the grids are 1000x apart. Which file is right
    cannot be told, so it is refused as such rather than as a grid to resample; two files in one unit 1000x apart are
    simply on different grids (None)."""
    if unit == reference_unit or not {unit, reference_unit} & {"metres", "microns"}:
        return None
    factor = _unit_factor_between(affine, reference_affine, shape)
    if factor is None:
        return None
    times = "1/1000 the size of" if factor > 1 else "1000x the size of"
    return (f"{name}: {what} and {reference_what} {reference} differ only in their length unit (read in mm, the "
            f"{what}'s grid is {times} the {reference_what}'s); the {reference_what}'s header says its lengths are in "
            f"{reference_unit}, the {what}'s says {unit}; which is right cannot be told: write the {what} with the "
            f"{reference_what}'s header (e.g. nibabel: Nifti1Image(data, image.affine, image.header)), or correct the "
            "units (xyzt_units) of the wrong file")


def _read_nifti(path: Path, unscaled: bool = False) -> Tuple[np.ndarray, np.ndarray, Any, Optional[Tuple[Any, Any]]]:
    """Read a NIfTI file completely (so truncated data fails here, not later).

    Returns ``(data, affine, header, scaling)``: ``data`` with the header's scl_slope/scl_inter applied and
    ``scaling`` None; or, with ``unscaled`` and a file whose scaling is not the identity, the stored values and
    ``scaling = (slope, inter)`` for :func:`_scaled` (nibabel scales integers in float64: a full-size float64 copy).
    """
    import gzip

    from engine.formats import FormatError, check_gzip_end, gzip_damage, check_nifti_like_size, nib_load

    scaling = None
    gz = None
    try:
        if str(path).lower().endswith(".gz"):
            # one gzip stream for header and voxels, read on to its end afterwards (check_gzip_end): nibabel stops
            # after the voxels and never reaches the trailer, so a damaged .nii.gz was read without its CRC checked
            gz = gzip.open(path, "rb")
        img = nib_load(path, fileobj=gz)
        refuse_empty_axis(path, img.shape)
        try:
            # before nibabel allocates and inflates: a header claiming 32767^3 voxels over a few bytes, a gzip bomb
            check_nifti_like_size(path, img)
        except FormatError as exc:
            raise VolumeError(str(exc)) from None
        # nibabel reads lazily; pulling the data inside the try turns gzip/EOF/zlib errors of a
        # truncated or corrupt file into a VolumeError instead of a crash later in a worker.
        proxy = img.dataobj
        if unscaled and hasattr(proxy, "get_unscaled"):
            data = np.asanyarray(proxy.get_unscaled())
            # the factors as nibabel's ArrayProxy applies them (np.asanyarray(img.dataobj))
            slope, inter = np.asanyarray(proxy.slope), np.asanyarray(proxy.inter)
            if not (np.all(slope == 1) and np.all(inter == 0)):
                scaling = (slope, inter)
        else:
            data = np.asanyarray(proxy)
        if gz is not None:
            check_gzip_end(gz, path, data.nbytes)
        header, affine = _nifti_geometry(img)  # the file's own header; the affine with metres and microns as mm
        header = header.copy()
        zooms = tuple(float(z) for z in header.get_zooms()[:3])
        raw_zooms = _raw_pixdim(img, path)
    except VolumeError:
        raise
    except Exception as exc:  # nibabel, gzip, zlib, EOF and struct errors all mean "unreadable"
        mismatch = _gzip_name_mismatch(path) or (gzip_damage(exc) if gz is not None else None)
        if mismatch:
            raise VolumeError(f"{path}: cannot read NIfTI file: {mismatch}") from exc
        raise VolumeError(f"{path}: cannot read NIfTI file ({type(exc).__name__}: {exc}); "
                          "the file is corrupt, truncated or not NIfTI") from exc
    finally:
        if gz is not None:
            gz.close()
    if len(zooms) == 3 and (not np.all(np.isfinite(zooms)) or min(zooms) <= 0):
        raise VolumeError(f"{path}: voxel spacing {zooms} in the header must be finite and > 0")
    if raw_zooms is not None and (not np.all(np.isfinite(raw_zooms)) or min(raw_zooms) <= 0):
        # nibabel silently turns a 0 pixdim into 1 mm; without an sform/qform that invented grid is all
        # the file has, and labels written on it would not overlay the real scan.
        raise VolumeError(f"{path}: voxel spacing {raw_zooms} in the header (pixdim) must be finite and > 0, "
                          "and the file has no sform/qform to place its voxels otherwise")
    return data, affine, header, scaling


def _looks_like_nifti_header(first4: bytes) -> bool:
    """``sizeof_hdr`` (348 for NIfTI-1, 540 for NIfTI-2) in either byte order."""
    return len(first4) == 4 and any(int.from_bytes(first4, order) in (348, 540) for order in ("little", "big"))


def _gzip_name_mismatch(path: Path) -> Optional[str]:
    """What to rename when a NIfTI file's content and its name disagree about gzip, else None.

    nibabel picks the decompressor from the name alone, so a gzipped ``.nii`` or a plain ``.nii.gz``
    (a common mix-up that ITK tools read silently) fails with an error that does not say so; only a
    real NIfTI header inside gets this advice, garbage stays "corrupt".
    """
    import gzip

    name = path.name
    try:
        with open(path, "rb") as f:
            first4 = f.read(4)
        if first4[:2] == b"\x1f\x8b" and not name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as g:
                if _looks_like_nifti_header(g.read(4)):
                    return f"it is gzip-compressed but named {name}; rename it to {name}.gz"
        elif name.lower().endswith(".gz") and _looks_like_nifti_header(first4):
            return f"it is not gzip-compressed but named {name}; rename it to {name[:-3]}"
    except (OSError, EOFError):
        pass
    return None


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


def refuse_empty_axis(name: Any, shape: Sequence[int]) -> None:
    """Refuse a header that declares no voxel along some axis (``(0, 5, 5)``): read on, its data were ``(0,)``, and
    the file was then called 1D, with advice for a 2D slice."""
    shape = tuple(int(s) for s in shape)
    if shape and min(shape) < 1:
        raise VolumeError(f"{name}: shape {shape} has an empty axis; a volume needs at least one voxel along each")


def _refuse_empty_nifti(p: Path) -> None:
    """A zero-byte NIfTI file gets the one message of :func:`engine.formats.refuse_empty_file` (nibabel's "ImageFileError:
    Empty file" read as "corrupt, truncated or not NIfTI"); the other formats' reader, ``read_raw``, gives it itself."""
    from engine.formats import FormatError, refuse_empty_file

    try:
        refuse_empty_file(p)
    except FormatError as exc:
        raise VolumeError(str(exc)) from None


def _read_other(path: Path) -> Any:
    """Non-NIfTI formats through :mod:`engine.formats` (a ``RawVolume``, RAS affine)."""
    from engine.formats import FormatError, read_raw

    try:
        return read_raw(path)
    except FormatError as exc:
        raise VolumeError(str(exc)) from exc


def not_found_message(p: Path, what: str = "file") -> str:
    """The message for a missing ``what`` (file, input); a link whose target is gone says where it points (the name
    alone is there)."""
    if p.is_symlink():
        return f"{p}: a link to {os.readlink(p)}, which does not exist (moved or deleted?)"
    return f"{p}: {what} not found"


def is_file_or_broken_link(p: Path) -> bool:
    """A file, or a link whose target is gone: listed from a folder so that it is named and skipped with its reason
    rather than left out without a word."""
    return p.is_file() or (p.is_symlink() and not p.exists())


def _read(path: PathLike, unscaled: bool = False) -> Tuple[np.ndarray, np.ndarray, Any, Path, Any, Any]:
    """``(data, affine, header, path, raw, scaling)``; ``raw`` is the formats reader's RawVolume or None;
    ``scaling`` as :func:`_read_nifti` (None unless ``unscaled``)."""
    p = Path(path)
    # a header + data pair a killed write left mixed is put right (or refused) before either file is read
    recover_interrupted_write(p, wait_s=PAIR_WAIT_S)
    if not p.exists():
        raise VolumeError(not_found_message(p))
    raw = scaling = None
    if is_nifti(p):
        _refuse_empty_nifti(p)
        data, affine, header, scaling = _read_nifti(p, unscaled)
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
            raise VolumeError(f"{p}: is {data.ndim}D with shape {data.shape}; expected a 3D volume - {WHOLE_SCAN_HINT}")
        raise VolumeError(f"{p}: is {data.ndim}D with shape {data.shape} (several volumes or "
                          f"channels); expected one 3D volume - {SPLIT_4D_HINT}")
    if min(data.shape) < 1:
        raise VolumeError(f"{p}: is empty (shape {data.shape})")
    _check_affine(affine, str(p))
    return data, affine, header, p, raw, scaling


def read_grid(path: PathLike) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """The voxel grid ``(shape, affine)`` of a volume file, from its header only when NIfTI.

    Raises:
        VolumeError: missing or unreadable file, not 3D, unusable affine.
    """
    p = Path(path)
    if not is_nifti(p):  # load_volume finishes an interrupted write of a header + data pair first
        vol = load_volume(p)
        return vol.shape, vol.affine
    if not p.exists():
        raise VolumeError(not_found_message(p))
    _refuse_empty_nifti(p)
    from engine.formats import nib_load

    try:
        img = nib_load(p)
        shape = tuple(int(s) for s in img.shape)
        _, affine = _nifti_geometry(img)  # as load_volume places it: metres and microns as mm
    except Exception as exc:
        mismatch = _gzip_name_mismatch(p)
        if mismatch:
            raise VolumeError(f"{p}: cannot read NIfTI header: {mismatch}") from exc
        raise VolumeError(f"{p}: cannot read NIfTI header ({type(exc).__name__}: {exc})") from exc
    refuse_empty_axis(p, shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        raise VolumeError(f"{p}: is {len(shape)}D with shape {shape}; expected a 3D volume - {WHOLE_SCAN_HINT}")
    if len(shape) > 3:
        raise VolumeError(f"{p}: is {len(shape)}D with shape {shape} (several volumes or channels); expected one "
                          f"3D volume - {SPLIT_4D_HINT}")
    _check_affine(affine, str(p))
    return shape, affine  # type: ignore[return-value]


def load_volume(path: PathLike, allow_nonfinite: bool = False) -> Volume:
    """Read an image volume as float32 with its geometry.

    Args:
        path: ``.nii``/``.nii.gz``, or any format of :mod:`engine.formats` (``.nrrd``, ``.nhdr``,
            ``.mha``, ``.mhd``, ``.mgz``, a DICOM series folder or one of its files).
        allow_nonfinite: read a volume holding NaN or infinite voxels, said in :attr:`Volume.notes`, instead of
            refusing it: for viewing (the napari reader). Segmenting, prompting and saving a case refuse it later,
            naming the file.

    Where a NIfTI file's voxels are (the one statement of this rule; :func:`load_label` and
    :func:`read_grid` follow it): the engine places NIfTI voxels exactly as nibabel's ``get_best_affine``
    does, and so as napari and nibabel-based tools show them: the sform when ``sform_code > 0``, else the qform
    when ``qform_code > 0``, else (both codes 0) nibabel's fallback from ``pixdim`` (grid centred on the
    origin, x axis flipped). ITK-based tools (3D Slicer, ITK-SNAP; :func:`nifti_itk_affine`) agree for files
    with one form, or two forms that agree, but differ for files whose qform and sform disagree (ITK takes the
    qform unless the sform_code is 1), whose sform is sheared (ITK takes the qform, or refuses a file without
    one) and with both codes 0 (ITK: origin 0, LPS axes). Such files get a :attr:`Volume.notes` entry, and a
    mask written for them keeps the image's whole NIfTI header (both forms and codes, :func:`save_volume`), so
    it opens aligned with the image in both families of tools; another format, which holds one geometry only,
    is refused for them. A NIfTI header whose lengths are in metres or microns (``xyzt_units``) is read in mm, as ITK
    reads it (:attr:`Volume.affine` and ``spacing`` in mm), and kept as it is (:attr:`Volume.header`: units and raw
    values of the file, :func:`nifti_affine_mm` its affine in mm), so a NIfTI mask saved for it is written with the
    image's own units and lines up with it in nibabel- and ITK-based tools alike; 'unknown' units are mm.

    Returns:
        Volume with ``data`` float32 ``(I, J, K)`` in file voxel order (scl_slope/inter applied),
        ``modality``/``modality_source`` from the file or guessed from Hounsfield units, ``notes`` about a
        NIfTI geometry that ITK-based tools read differently.

    Raises:
        VolumeError: missing, unreadable, corrupt or truncated file; not 3D; RGB; NaN/inf voxels;
            zero, negative or non-finite spacing; singular affine.
    """
    from engine.formats import guess_modality, intensity_sample
    from engine.modality import modality_beside

    data, affine, header, p, raw, scaling = _read(path, unscaled=True)
    modality = getattr(raw, "modality", None) or modality_beside(p)
    source = "file" if modality else None
    if modality is None:
        # before the float cast: HU are integers in the file. A scaled file's sample is scaled as nibabel scales
        # the whole volume (elementwise, in float64), so the guess is the one the float64 volume would give.
        sample = None if scaling is None else intensity_sample(data)
        modality = guess_modality(data if sample is None else _scaled(sample, scaling))
        source = "guessed" if modality else None
    stored = data
    with np.errstate(over="ignore"):  # a value past float32's range becomes inf: refused below, naming the range
        data = np.asarray(data, dtype=np.float32) if scaling is None else _scaled_float32(data, scaling)
    notes = _geometry_notes(header, affine, data.shape)
    if stored.dtype.kind not in "iub" or scaling is not None:  # stored integers cast to float32 are all finite
        bad = count_nonfinite(data)
        if bad:
            _refuse_float32_overflow(stored, scaling, data, p)
            if not allow_nonfinite:
                check_finite_voxels(data, str(p))
            notes.append(f"{bad} of {data.size} voxels are NaN or infinite: shown as they are, but segmenting, "
                         f"prompting and saving a case refuse this image until they are replaced ({NAN_BACKGROUND})")
    return Volume(data=data, affine=affine, spacing=spacing_from_affine(affine), header=header, path=str(p),
                  modality=modality, modality_source=source, notes=notes)


def _refuse_float32_overflow(stored: np.ndarray, scaling: Optional[Tuple[Any, Any]], data: np.ndarray, p: Path) -> None:
    """Refuse a volume whose finite values (a float64 file's, or scl_slope/scl_inter's result) lie outside float32's
    range, naming its minimum and maximum: cast to float32 they became infinite, and the file was refused as holding
    "NaN or infinite" voxels it does not have. Called only once :func:`check_finite_voxels` has refused ``data``
    (the float32 voxels); returns when the file's own values are NaN or infinite (that message stands).
    """
    stored_bad = 0
    low, high = np.inf, -np.inf
    slabs = stored if stored.ndim > 1 else [stored]  # a slab at a time: no full-size temporaries
    for slab in slabs:
        slab = np.asarray(slab)
        values = slab if scaling is None else _scaled(slab, scaling)
        finite = np.isfinite(values)
        stored_bad += int(values.size - np.count_nonzero(finite))
        if finite.any():
            low, high = min(low, float(values[finite].min())), max(high, float(values[finite].max()))
    cast_bad = sum(int(np.count_nonzero(~np.isfinite(slab))) for slab in (data if data.ndim > 1 else [data]))
    overflow = cast_bad - stored_bad
    if overflow <= 0:
        return
    limit = float(np.finfo(np.float32).max)
    also = f" (and {stored_bad} NaN or infinite)" if stored_bad else ""
    raise VolumeError(f"{p}: {overflow} of {data.size} voxels{also} hold values outside the float32 range the engine "
                      f"reads volumes in (+-{limit:.3g}): the file's values run from {low:.6g} to {high:.6g}"
                      f"{'' if scaling is None else ' (after its scl_slope/scl_inter)'}; rescale the image to a "
                      "realistic intensity range (or fix its scaling) and save it again")


# Voxels scaled per block by _scaled_float32: its float64 temporaries stay this small whatever the volume's size.
_SCALE_BLOCK_VOXELS = 1 << 22


def _scaled(data: np.ndarray, scaling: Tuple[Any, Any]) -> np.ndarray:
    """``data`` with a NIfTI's scl_slope/scl_inter applied exactly as nibabel applies them (same dtype, values)."""
    from nibabel.volumeutils import apply_read_scaling

    return apply_read_scaling(data, *scaling)


def _scaled_float32(data: np.ndarray, scaling: Tuple[Any, Any]) -> np.ndarray:
    """``np.asarray(_scaled(data, scaling), np.float32)`` block by block: the same values and memory order, without
    the full-size float64 array (and second temporary) nibabel's own scaling makes."""
    out = np.empty_like(data, dtype=np.float32)  # order "K": a Fortran-ordered NIfTI stays Fortran-ordered
    if data.ndim == 0:
        out[()] = _scaled(data, scaling)
        return out
    axis = int(np.argmax([abs(st) for st in data.strides]))  # blocks along the slowest axis are contiguous
    step = max(1, _SCALE_BLOCK_VOXELS // max(1, data.size // max(1, data.shape[axis])))
    index: List[Any] = [slice(None)] * data.ndim
    for start in range(0, data.shape[axis], step):
        index[axis] = slice(start, start + step)
        out[tuple(index)] = _scaled(data[tuple(index)], scaling)
    return out


def _geometry_notes(header: Any, affine: np.ndarray, shape: Sequence[int]) -> List[str]:
    """A note when a NIfTI file is placed differently by ITK-based tools than by nibabel (see :func:`load_volume`)."""
    import nibabel as nib

    if not isinstance(header, nib.Nifti1Header):
        return []
    conflict = nifti_geometry_conflict(header, affine, shape)
    if conflict is None:
        return []
    return [f"3D Slicer and other ITK-based tools place this NIfTI file differently from nibabel/napari: {conflict}; "
            "Mamba-HoME uses nibabel's placement, and masks saved as NIfTI keep the file's header so they open "
            "aligned with it in both"]


def count_nonfinite(data: np.ndarray) -> int:
    """How many voxels of ``data`` are NaN or infinite."""
    data = np.asarray(data)
    if data.dtype.kind in "iub":  # integers and booleans cannot hold NaN or inf
        return 0
    # A finite sum means every voxel is finite (NaN and inf propagate), with no full-size boolean temporary; a sum
    # that overflows (large float16/float32 values) only sends the volume to the exact count below.
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(data.sum()):
            return 0
    slabs = data if data.ndim > 1 else [data]
    return sum(int(np.count_nonzero(~np.isfinite(slab))) for slab in slabs)


def check_finite_voxels(data: np.ndarray, name: str, error: Optional[Type[ValueError]] = None,
                        fix: Optional[str] = None) -> None:
    """Refuse a volume with NaN or infinite voxels, naming it and how many: a file, a napari layer, an upload or a
    session's volume, all checked by this one rule (NaN logits argmax to background: "nothing found", no reason).

    Args:
        data: the voxels.
        name: the file or volume, as the message names it.
        error: the exception type raised (default :class:`VolumeError`; a ``ValueError`` subclass).
        fix: what the user can do, appended to the message (default: how to fix a file where ``name`` is one).
    """
    data = np.asarray(data)
    bad = count_nonfinite(data)
    if bad:
        hint = fix if fix is not None else NAN_VOXELS_FIX if _names_a_file(name) else ""
        raise (error or VolumeError)(f"{name}: {bad} of {data.size} voxels are NaN or infinite{hint}")


# What a user can do about a file with NaN or infinite voxels (no command here rewrites them): `mambahome prompt`, a
# worklist, a dataset check showed only the count, which named the file but not the way out.
NAN_BACKGROUND = ("give those voxels a background value (a CT exported with NaN outside its scan field: air, -1024 HU; "
                  "an MR: 0), e.g. in Python numpy.nan_to_num(voxels, nan=B, posinf=B, neginf=B) with B that value")
"""The way out of NaN or infinite voxels, for a file (:data:`NAN_VOXELS_FIX`) or an array sent to the server."""
NAN_VOXELS_FIX = (f"; fix the file or replace it: {NAN_BACKGROUND}, and save it again, or export the scan again "
                  "without them")


def _names_a_file(name: str) -> bool:
    """Whether a :func:`check_finite_voxels` name is a file (ends with a volume file's suffix, or exists): only a file
    can be fixed and read again; a napari layer or an in-memory volume gets the count alone."""
    from engine.formats import READ_SUFFIXES

    text = str(name).strip().lower()
    if text.endswith(NIFTI_SUFFIXES + READ_SUFFIXES):
        return True
    try:
        return bool(text) and Path(str(name)).exists()
    except (OSError, ValueError):
        return False


def smallest_label_dtype(values_min: int, values_max: int) -> np.dtype:
    """The smallest NIfTI-friendly integer dtype holding ``[values_min, values_max]``."""
    for dt in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= values_min and values_max <= info.max:
            return np.dtype(dt)
    raise ValueError(f"label values [{values_min}, {values_max}] do not fit in int32")


# What to do with a 4D file: MSD's multi-modal tasks (BrainTumour, Prostate) store a case's channels as a 4th axis
SPLIT_4D_HINT = ("split it into one file per volume; for the channels of one case (an MSD multi-modal task), one "
                 "file per channel named <case>_0000.nii.gz, <case>_0001.nii.gz, ... in imagesTr with an nnU-Net v2 "
                 "dataset.json ('channel_names', 'labels', 'file_ending')")


def check_same_grid(label: Volume, reference: Volume, what: str = "label", reference_what: str = "image") -> None:
    """Raise :class:`VolumeError` unless ``label`` lies on ``reference``'s voxel grid.

    Grids match when shapes are equal and affines agree within :data:`GRID_ATOL` mm. Affines that differ exactly by
    a length unit (x1000 or x0.001: a label saved for a metre NIfTI image with nibabel's affine and no units) are
    refused as such, naming both files' units (:func:`unit_mismatch`), not as a grid to resample.

    Args:
        label: the volume to check.
        reference: the volume whose grid it must share.
        what: the label's role in the message (``"label"``, ``"prediction"``).
        reference_what: the reference's role in the message (``"image"``, ``"ground truth"``).
    """
    name = label.path or f"<{what}>"
    ref = reference.path or f"<{reference_what}>"
    if label.shape != reference.shape:
        raise VolumeError(f"{name}: {what} shape {label.shape} differs from {reference_what} {ref} "
                          f"shape {reference.shape}")
    if not np.allclose(label.affine, reference.affine, atol=GRID_ATOL, rtol=0):
        note = unit_mismatch(name, what, label.affine, length_unit_words(label.header, label.path), ref,
                             reference_what, reference.affine, length_unit_words(reference.header, reference.path),
                             reference.shape)
        if note is not None:
            raise VolumeError(note)
        diff = float(np.max(np.abs(label.affine - reference.affine)))
        raise VolumeError(f"{name}: {what} lies on a different grid than {reference_what} {ref} "
                          f"(affines differ by up to {diff:.4g} mm); resample it onto the {reference_what} first")


def reorientation(label: Volume, reference: Volume) -> Optional[np.ndarray]:
    """The nibabel orientation transform that puts ``label``'s data on ``reference``'s grid
    (``nibabel.orientations.apply_orientation(label.data, ornt)``) when its grid is the same set of voxel
    centres in another axis order and/or direction; ``None`` for any other grid."""
    from nibabel.orientations import inv_ornt_aff, io_orientation

    affine = np.asarray(label.affine, dtype=np.float64)
    ref_affine = np.asarray(reference.affine, dtype=np.float64)
    try:
        # The nearest axes of the map between the two grids (label voxel -> reference voxel) rather than of each
        # grid's own world axes: between flips/permutations of one grid it is an exact signed permutation, even
        # for an oblique scan whose nearest world axis is a near tie.
        ornt = io_orientation(np.linalg.solve(ref_affine, affine))
    except np.linalg.LinAlgError:
        return None
    if np.isnan(ornt).any() or tuple(label.shape[a] for a in np.argsort(ornt[:, 0])) != reference.shape:
        return None
    # Every voxel centre must land on the same world point (corners suffice for an affine map).
    if not _aligned(affine @ inv_ornt_aff(ornt, label.shape), ref_affine, reference.shape):
        return None
    return ornt


def is_reoriented(label: Any, reference: Any) -> bool:
    """Whether ``label``'s grid (anything with ``shape`` and ``affine``) is ``reference``'s voxels in another axis
    order or direction: :func:`reorientation` finds a transform and it is not the identity (a grid in the same
    axis order must match within :data:`GRID_ATOL`, :func:`check_same_grid`; reorientation's looser tolerance is
    for telling axes apart, not for accepting a shifted label)."""
    ornt = reorientation(label, reference)
    return ornt is not None and not np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]])


def onto_grid(label: Volume, reference: Volume, what: str = "label", reference_what: str = "image") -> Volume:
    """``label`` on ``reference``'s voxel grid: itself when the grids already match (:func:`check_same_grid`),
    its data reoriented (axes transposed and/or flipped, no resampling) when its grid is the same voxel centres
    in another axis order or direction (e.g. a DICOM series saved in the opposite slice order from the NIfTI
    of the same scan). Any other grid raises :func:`check_same_grid`'s :class:`VolumeError`."""
    from nibabel.orientations import apply_orientation

    try:
        check_same_grid(label, reference, what=what, reference_what=reference_what)
        return label
    except VolumeError:
        ornt = reorientation(label, reference)
        if ornt is None:
            raise
    perm = [int(a) for a in np.argsort(ornt[:, 0])]  # reference axis a <- label axis perm[a]
    flipped = [a for a in range(3) if ornt[perm[a], 1] < 0]
    note = (f"{what} reoriented onto the {reference_what} grid (array axes {perm}"
            + (f", flipped along reference axes {flipped}" if flipped else "") + "; no resampling)")
    return Volume(data=np.ascontiguousarray(apply_orientation(np.asarray(label.data), ornt)),
                  affine=np.array(reference.affine, dtype=np.float64),
                  spacing=reference.spacing, header=None, path=label.path, modality=label.modality,
                  modality_source=label.modality_source, segments=label.segments,
                  notes=list(label.notes) + [note])


def as_label_array(data: np.ndarray, name: str, class_ids: Optional[Iterable[int]] = None) -> np.ndarray:
    """Validate a label array (integral, non-negative, within ``class_ids``) and return it as the
    smallest integer dtype. ``name`` is used in error messages."""
    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.issubdtype(data.dtype, np.floating):
            raise LabelValuesError(f"{name}: label dtype {data.dtype} is not numeric")
        finite = np.isfinite(data)
        if not finite.all():
            raise LabelValuesError(f"{name}: {int((~finite).sum())} label voxels are NaN or infinite")
        frac = data != np.round(data)
        if frac.any():
            examples = np.unique(data[frac])[:5]
            raise LabelValuesError(f"{name}: label map has {int(frac.sum())} non-integer voxels "
                                   f"(e.g. {examples.tolist()}); is this an image rather than a label map?")
        data = np.round(data)
    vmin, vmax = (int(data.min()), int(data.max())) if data.size else (0, 0)
    if vmin < 0:
        # "min -1024" alone did not say that a CT scan (air at -1000) had been given as the label map
        examples = np.unique(data[data < 0])[:5].astype(np.int64)
        raise LabelValuesError(f"{name}: label map has negative values (e.g. {examples.tolist()}, min {vmin}); "
                               "label values are class numbers from 0: is this an image rather than a label map?")
    if class_ids is not None:
        allowed = np.asarray(sorted({int(c) for c in class_ids}))
        present = np.unique(data).astype(np.int64)
        unknown = np.setdiff1d(present, allowed)
        if unknown.size:
            raise LabelValuesError(f"{name}: label values {unknown.tolist()} are not in the label set "
                                   f"{allowed.tolist()}")
    return data.astype(smallest_label_dtype(vmin, vmax), copy=False)


# A label map is a few non-negative integers in regions: inside what is not background, nearly every voxel has the
# value of its neighbour. An image, even an 8-bit one with a few dozen grey levels, is noisy inside its object
# (MRI, CT, ultrasound speckle), so its neighbours agree far less often; the threshold sits between the two.
_LABEL_NEIGHBOUR_AGREEMENT = 0.8
_LABEL_MAX_VALUES = 1000
_LABEL_SAMPLE_VOXELS = 4_000_000


def looks_like_label_map(data: np.ndarray) -> bool:
    """Whether a volume read as an image is in fact a label map (a mask a tool saved under a neutral name).

    True when a sample of it (every voxel along axis 0, rows thinned to about four million voxels) holds only
    finite non-negative integers, 2 to 1,000 distinct values, and its non-zero voxels agree with their
    neighbour along axis 0 at least 80% of the time. Reads no more than the sample, so it costs milliseconds on a
    512^3 volume.

    Args:
        data: a 3D array ``(I, J, K)`` as :func:`load_volume` returns it.
    """
    data = np.asarray(data)
    if data.ndim != 3 or min(data.shape) < 2 or data.dtype == bool:
        return False
    step = max(1, int(np.ceil(np.sqrt(data.size / _LABEL_SAMPLE_VOXELS))))
    sample = np.asarray(data[:, ::step, ::step])
    if np.issubdtype(sample.dtype, np.floating):
        if not np.isfinite(sample).all() or (sample != np.round(sample)).any():
            return False
    elif not np.issubdtype(sample.dtype, np.integer):
        return False
    if sample.min() < 0:
        return False
    values = np.unique(sample)
    if not 2 <= values.size <= _LABEL_MAX_VALUES:
        return False
    here, after = sample[:-1], sample[1:]
    foreground = here != 0
    counted = int(foreground.sum())
    return counted > 0 and int((foreground & (here == after)).sum()) >= _LABEL_NEIGHBOUR_AGREEMENT * counted


def load_label(path: PathLike, reference: Optional[Volume] = None,
               class_ids: Optional[Iterable[int]] = None) -> Volume:
    """Read a label map as an integer Volume.

    Args:
        path: label file.
        reference: if given, the label must lie on this image's grid (same shape, affine within
            1e-3 mm), or be the same voxel centres in another axis order or direction, then reoriented onto it
            (:func:`onto_grid`).
        class_ids: if given, every value in the label map must be one of these.

    Returns:
        Volume with integer ``data`` (uint8 when values fit) ``(I, J, K)``.

    Raises:
        VolumeError: as :func:`load_volume`, plus non-integer values, values outside
            ``class_ids`` (named), or a grid different from ``reference``.
    """
    data, affine, header, p, raw, _ = _read(path)
    data = as_label_array(data, str(p), class_ids)
    label = Volume(data=data, affine=affine, spacing=spacing_from_affine(affine), header=header, path=str(p),
                   segments=getattr(raw, "segments", None), notes=_geometry_notes(header, affine, data.shape))
    if reference is not None:
        # the same voxels stored in another axis order or direction (a label saved LAS for a RAS image, a DICOM
        # series' slice order) are reoriented, as evaluation does; any other grid is refused
        if is_reoriented(label, reference):
            return onto_grid(label, reference)
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


class WriteError(OSError):
    """A file the engine could not write (full disk, read-only folder or mount, no permission).

    The message names the file, what was being written and why, in one line; ``errno`` is the operating
    system's error number (``errno.ENOSPC``, ``errno.EACCES``, ...) or None. Whatever was at the path
    before is untouched and no temporary file is left behind.
    """

    def __init__(self, path: PathLike, what: str, reason: str, errno_: Optional[int] = None) -> None:
        super().__init__(errno_, f"cannot write {what} {path}: {reason}")
        self.path = Path(path)
        self.what = what
        self.reason = reason

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> Tuple[Any, ...]:  # picklable across processes despite OSError's own args
        return (WriteError, (self.path, self.what, self.reason, self.errno))


class OutputExistsError(WriteError):
    """The target file exists and the caller did not ask to replace it."""

    def __init__(self, path: PathLike, what: str) -> None:
        super().__init__(path, what, "it already exists (pass overwrite to replace it)", errno.EEXIST)

    def __reduce__(self) -> Tuple[Any, ...]:
        return (OutputExistsError, (self.path, self.what))


# The one naming pattern of the engine's temporary files: ``.<stem>.tmp-<8 hex><suffix>`` beside the
# target, hidden so folder listings (nnU-Net, the case store, predict) never take them for data.
TEMP_PATTERN = re.compile(r"^\.(?P<stem>.+)\.tmp-[0-9a-f]{8}(?P<suffix>\.[A-Za-z0-9.]+)?$")
# The temporary folder a header + data file pair is written in (:func:`_write_detached`): ``.<header name>.tmp-<8
# hex>`` beside the header, holding that header (under its lower-case suffix) and its data file, nothing else.
TEMP_FOLDER_PATTERN = re.compile(r"^\.(?P<name>.+\.(?i:mhd|nhdr))\.tmp-[0-9a-f]{8}$")
_WHAT_BY_SUFFIX = {".nii.gz": "NIfTI volume", ".nii": "NIfTI volume", ".safetensors": "checkpoint",
                   ".json": "JSON file", ".jsonl": "log", ".csv": "table", ".png": "plot", ".txt": "text file"}
_REASONS = {
    errno.ENOSPC: "no space left on the device (the disk is full)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than this file system or process allows",
    errno.EROFS: "the file system is mounted read-only",
    errno.EACCES: "permission denied (the folder is not writable for this user)",
    errno.EPERM: "operation not permitted (the folder is not writable for this user)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder",
    errno.ENAMETOOLONG: "the file name is too long",
}


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix


def _temp_sibling(path: Path) -> Path:
    """A hidden temp name in the same folder that keeps the suffix (nibabel picks gzip by it), in lower case: the
    file is renamed to ``path`` afterwards, and writers know their suffixes in lower case (ITK's MetaImage writer
    makes a detached ``.mhd`` + ``.zraw`` pair of any name but one ending in exactly ``.mha``)."""
    suffix = _suffix(path)
    stem = path.name[: -len(suffix)] if suffix else path.name
    return path.with_name(f".{stem}.tmp-{uuid.uuid4().hex[:8]}{suffix.lower()}")


def _temp_folder(path: Path) -> Path:
    """A hidden temp folder beside ``path`` for a header + data file pair (:data:`TEMP_FOLDER_PATTERN`)."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def _writer_strays(tmp: Path) -> List[Path]:
    """Files a writer made beside the temporary file ``tmp`` under ``tmp``'s own hidden name with another suffix
    (ITK given a name it does not know as ``.mha`` writes ``<name>.mhd`` + ``<name>.zraw``): names no other
    write can have, removed with ``tmp``."""
    match = TEMP_PATTERN.match(tmp.name)
    if match is None:
        return []
    base = tmp.name[: len(tmp.name) - len(match.group("suffix") or "")]
    try:
        return [tmp.parent / name for name in os.listdir(tmp.parent)
                if name != tmp.name and name.startswith(base + ".") and TEMP_PATTERN.match(name)]
    except OSError:
        return []


def describe_write_failure(exc: BaseException) -> Optional[Tuple[Optional[int], str]]:
    """``(errno, reason)`` when ``exc`` is a failure to write a file, else None.

    Recognises ``OSError`` and the errors of writers that wrap it in their own type (safetensors' Rust
    writer raises ``SafetensorError('... (os error 28)')``).
    """
    code: Optional[int] = None
    if isinstance(exc, OSError):
        code = exc.errno
    else:
        match = re.search(r"\(os error (\d+)\)", str(exc))
        if match is None:
            cause = exc.__cause__ or exc.__context__
            return describe_write_failure(cause) if isinstance(cause, BaseException) else None
        code = int(match.group(1))
    if code in _REASONS:
        return code, _REASONS[code]
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return code, text or type(exc).__name__


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_parents(folder: Path) -> List[Path]:
    """Create ``folder`` and its missing parents; return the created ones, deepest first."""
    created = []
    probe = folder
    while not probe.exists() and probe.parent != probe:
        created.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        # mkdir's own error is EEXIST, "File exists", which reads as if the output were already there
        raise NotADirectoryError(errno.ENOTDIR, f"{probe} is a file, not a folder", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _remove_quietly(paths: Iterable[Path], folders: Iterable[Path] = ()) -> None:
    for tmp in paths:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass  # an unremovable temp (read-only mount) is hidden and swept by remove_stale_temps
    for folder in folders:
        try:
            folder.rmdir()  # only folders this write created, and only when still empty
        except OSError:
            pass


def _what(path: Path, what: Optional[str]) -> str:
    return what or _WHAT_BY_SUFFIX.get(_suffix(path).lower(), "file")


def file_kind(path: PathLike) -> str:
    """What a file is by its suffix ("NIfTI volume", "checkpoint", ...), as write errors name it."""
    return _what(Path(path), None)


def atomic_write_all(writes: Sequence[Tuple[PathLike, Callable[[str], Any]]], *, overwrite: bool = True,
                     what: Optional[str] = None) -> List[Path]:
    """Write several files all-or-nothing: every ``write(tmp_path)`` goes to a hidden temporary file beside
    its target (same suffix) and is fsynced; only when all succeeded are they moved into place with
    ``os.replace`` (an atomic rename each). The one way every file of the engine is written.

    On any exception (a full disk, a read-only folder, ``KeyboardInterrupt``) every temporary file (and any
    file a writer made under a temporary file's name with another suffix) and every folder this call created are
    removed and whatever was at the targets before is untouched. A temporary file has its target's suffix in lower
    case, so the target may be named in any case (``SEG.MHA`` is one attached MetaImage file, as ``seg.mha``).
    A process killed outright (SIGKILL, power loss) can leave hidden temporary files; they match
    :data:`TEMP_PATTERN` and :func:`remove_stale_temps` deletes them.

    Args:
        writes: ``(target path, write)`` pairs; ``write`` gets the temporary path as a string.
        overwrite: replace existing targets; when False an existing target raises
            :class:`OutputExistsError` (checked again at the final rename, so a file that appeared
            meanwhile is not replaced either).
        what: what the files are, for error messages (default from the suffix: "checkpoint", ...).

    Returns:
        The written paths, in order.

    Raises:
        WriteError: the files could not be written; the message names the file, what it is and why.
        OutputExistsError: a target exists and ``overwrite`` is False.
    """
    targets = [Path(p) for p, _ in writes]
    temps: List[Path] = []
    created: List[Path] = []
    current = targets[0] if targets else Path(".")
    try:
        if not overwrite:
            for p in targets:
                if p.exists():
                    raise OutputExistsError(p, _what(p, what))
        for p, (_, write) in zip(targets, writes):
            current = p
            created += _make_parents(p.parent)
            tmp = _temp_sibling(p)
            temps.append(tmp)
            write(str(tmp))
            if not os.path.lexists(tmp):
                made = [f.name for f in _writer_strays(tmp)]
                raise WriteError(p, _what(p, what), "the writer made no file under the name it was given"
                                 + (f" (it wrote {', '.join(sorted(made))} instead)" if made else ""))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # the usual mode for a new file, whatever the writer used
        for p, tmp in zip(targets, temps):
            current = p
            if overwrite:
                os.replace(tmp, p)
            else:
                _rename_no_replace(tmp, p, what)
        for folder in {p.parent for p in targets}:
            _fsync_folder(folder)
    except WriteError:
        _remove_quietly(temps + [s for t in temps for s in _writer_strays(t)], created)
        raise
    except BaseException as exc:
        _remove_quietly(temps + [s for t in temps for s in _writer_strays(t)], created)
        failure = describe_write_failure(exc) if isinstance(exc, Exception) else None
        if failure is None:
            raise  # a bug in the writer or an interruption: not a file system problem
        code, reason = failure
        raise WriteError(current, _what(current, what), reason, code) from exc
    return targets


def _rename_no_replace(tmp: Path, target: Path, what: Optional[str]) -> None:
    """Move ``tmp`` to ``target`` unless ``target`` exists, atomically where hard links work."""
    try:
        os.link(tmp, target)  # fails with EEXIST instead of replacing
    except FileExistsError:
        raise OutputExistsError(target, _what(target, what)) from None
    except OSError:  # no hard links here (FAT, some network shares): check, then rename
        if target.exists():
            raise OutputExistsError(target, _what(target, what)) from None
        os.replace(tmp, target)
        return
    tmp.unlink()


def atomic_write(path: PathLike, write: Callable[[str], Any], *, overwrite: bool = True,
                 what: Optional[str] = None) -> Path:
    """Call ``write(tmp_path)`` on a hidden temporary file beside ``path`` (same suffix), fsync it and
    move it into place with ``os.replace``; the one way every file of the engine is written.

    If ``write`` raises (full disk, read-only folder, interruption), the temporary file is removed and
    whatever was at ``path`` before is untouched; file system failures are raised as
    :class:`WriteError` naming the file. See :func:`atomic_write_all` for the arguments.
    """
    return atomic_write_all([(path, write)], overwrite=overwrite, what=what)[0]


def remove_stale_temps(folder: PathLike, older_than_s: float = 0.0) -> List[Path]:
    """Delete the temporary files :func:`atomic_write` and the temporary folders :func:`save_volume` (a header +
    data file pair) leave when their process is killed outright.

    Call it when a process starts using a folder it owns (a run folder at the start of a run); in a
    folder other processes may be writing into, pass ``older_than_s`` (e.g. 3600) so their temporary
    files in progress are kept.

    Only names of the engine's own patterns are touched: files matching :data:`TEMP_PATTERN` (not links), and
    folders matching :data:`TEMP_FOLDER_PATTERN` (not links) that hold plain files only, as the pair's writer
    leaves them; a folder holding anything else (a folder, a link) is not the engine's and is kept. A folder's age
    is that of the newest of it and its files (a writer filling one of its files keeps it young).

    A pair's folder holding a journal (:data:`PAIR_JOURNAL`: its writer was killed while moving the files into place)
    is not deleted but finished (:func:`recover_interrupted_write`): the pair is made entirely new when both new files
    were in place, else entirely what it was (the old files it kept are moved back), then the folder is removed. Its
    writer's file lock tells a killed write from one in progress whatever ``older_than_s`` says; only where there are
    no such locks (Windows) does its age decide.

    Args:
        folder: the folder to sweep (not recursive); a missing folder is fine.
        older_than_s: only delete files (folders) not modified for this many seconds.

    Returns:
        The deleted files and folders.
    """
    root = Path(folder)
    removed: List[Path] = []
    if not root.is_dir():
        return removed
    now = time.time()
    for child in root.iterdir():
        if child.is_symlink():
            continue
        if TEMP_PATTERN.match(child.name) and child.is_file():
            try:
                if older_than_s > 0 and now - child.stat().st_mtime < older_than_s:
                    continue
                child.unlink()
                removed.append(child)
            except OSError:
                pass  # gone meanwhile, or not ours to delete
        elif TEMP_FOLDER_PATTERN.match(child.name) and child.is_dir():
            if os.path.lexists(child / PAIR_JOURNAL):  # files were being moved into place: finish, never just delete
                try:
                    state = _recover_pair_folder(child, unlocked_ok=older_than_s <= 0
                                                 or now - _newest_mtime(child) >= older_than_s)
                except (OSError, ValueError):
                    continue  # cannot be put right here (read-only), or not ours: kept
                if state in ("new", "old"):
                    removed.append(child)
            elif _remove_stale_temp_folder(child, now, older_than_s):
                removed.append(child)
    return removed


def _newest_mtime(folder: Path) -> float:
    """The newest modification time of ``folder`` and the entries in it."""
    newest = folder.stat().st_mtime
    with os.scandir(folder) as entries:
        for entry in entries:
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def _remove_stale_temp_folder(folder: Path, now: float, older_than_s: float) -> bool:
    """Delete a header + data pair's temporary folder (:func:`remove_stale_temps`): its files, then itself. Kept
    when it holds anything but plain files, or (``older_than_s``) when it or a file in it changed more recently."""
    try:
        newest = folder.stat().st_mtime
        files = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                    return False  # not what the pair's writer leaves: not ours
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
                files.append(Path(entry.path))
        if older_than_s > 0 and now - newest < older_than_s:
            return False
        for f in files:
            f.unlink()
        folder.rmdir()
    except OSError:
        return False  # gone meanwhile, filled meanwhile, or not ours to delete
    return True


def save_volume(path: PathLike, array: np.ndarray, reference: Volume, dtype: Any = None,
                segments: Optional[List[Dict[str, Any]]] = None, *, overwrite: bool = True,
                sheared_nifti: bool = False, keep: Iterable[PathLike] = (), label_map: bool = False,
                class_names: Optional[Sequence[str]] = None) -> Path:
    """Write ``array`` on ``reference``'s grid, atomically (:func:`atomic_write`), in the format its
    suffix names.

    The file carries exactly the reference's geometry, so that it opens aligned with its image in nibabel /
    napari and in ITK-based tools (3D Slicer, ITK-SNAP) alike:

    - NIfTI with a NIfTI reference: a copy of the reference's header (qform and sform with their codes,
      pixdim and length units, metres or microns included: the reference's :attr:`Volume.affine` is in mm, its
      header as the file has it; data type set to the written array's, scl_slope/inter reset), whatever its
      geometry.
    - NIfTI with another reference (NRRD, MHA, DICOM, in memory): sform and qform (codes 1) set to the
      reference's affine. A sheared grid (non-perpendicular axes) fits the sform only and ITK places NIfTI files
      by the qform then, so it is refused, naming ``.nrrd`` instead; ``sheared_nifti=True`` writes it with the
      sform alone (qform_code 0: exact in nibabel, and ITK refuses to open it rather than misplace it).
    - Other formats (``.nrrd``, ``.nhdr``, ``.seg.nrrd``, ``.mha``, ``.mhd``, ``.mgz``), 3D arrays only, are
      written by :mod:`engine.formats` with the reference's affine. They hold one geometry, so a NIfTI
      reference that ITK-based tools place differently from nibabel (see :func:`load_volume`) is refused,
      naming ``.nii.gz`` instead. A detached header (``.nhdr``, ``.mhd``) and its data file
      (:func:`engine.formats.detached_data_file`: ``<stem>.raw.gz``, ``<stem>.zraw``) appear together or not at all,
      and the data file counts as the output as much as the header: kept when it exists unless ``overwrite``.
    - The suffix may have any case: ``SEG.MHA`` is one attached MetaImage file like ``seg.mha``, ``SEG.MHD`` a
      header with its ``SEG.zraw``, and every file written here reads back (:func:`load_volume`) under its name.

    No file written here (a detached header's data file included) may be a file of ``keep`` or of the reference
    (their headers and the data files they name, :func:`engine.formats.volume_files`; compared as resolved paths,
    so also through links), whatever ``overwrite`` says: an ``a.mhd`` whose data is ``b.zraw`` lost its voxels to a
    ``b.mhd`` written beside it. Writing over the reference's own file (labels saved back over the label file they
    were opened from) stays the caller's choice.

    Args:
        path: target file; parent folders are created.
        array: ``(I, J, K)`` array with the reference's shape, or ``(I, J, K, C)`` (e.g. class
            probabilities; one volume per channel on the same grid; NIfTI only).
        reference: the Volume whose grid the array lies on.
        dtype: stored dtype; default the array's (bool/int64 -> smallest integer, float64 -> float32).
        segments: segment names/colours for ``.seg.nrrd`` (``[{"value", "name", "color"}]``).
        overwrite: replace an existing file (default); False raises :class:`OutputExistsError`.
        sheared_nifti: write a sheared grid into NIfTI with its sform only instead of refusing it (for files
            whose format is fixed, such as a saved case's; their image is written the same way).
        keep: files never to replace (the inputs the array was made from), with the data files they name.
        label_map: the array is a label map whose class names are unknown (a mask from prompts): a NIfTI file is
            marked as one, as with ``segments`` (:func:`with_class_record`, names ``None``).
        class_names: the array is a label map with these class names (by value, 0 first): a NIfTI file is marked
            as one and carries them, whatever the reference's format (a scan read from NRRD has no NIfTI header
            to carry them otherwise).

    Returns:
        The written path.

    Raises:
        VolumeError: shape mismatch with the reference, a file type that cannot be written, or a geometry
            this file type cannot carry faithfully (the message names the format to use instead).
        VolumeError: a file to write is a file of ``keep`` or of the reference (:class:`OutputIsInputError`).
        WriteError: the file could not be written (full disk, read-only folder); nothing changed.
        OutputExistsError: the file, or a detached header's data file, exists and ``overwrite`` is False.
    """
    from engine.formats import DETACHED_SUFFIXES, FormatError, raw_writer, suffix_of

    p = Path(path)
    refuse_replacing_inputs(p, list(keep) + ([] if reference.path is None or same_file(p, reference.path)
                                             else [reference.path]))
    if suffix_of(p) in DETACHED_SUFFIXES:  # header + data file pair: both or neither, data first, header last
        array = _checked_array(p, array, reference, dtype, segments)
        try:
            write = raw_writer(p, array, reference.affine, segments=segments)
        except FormatError as exc:
            raise VolumeError(str(exc)) from exc
        return _write_detached(p, write, overwrite=overwrite)
    return atomic_write(p, volume_writer(p, array, reference, dtype, segments, sheared_nifti=sheared_nifti,
                                         label_map=label_map, class_names=class_names),
                        overwrite=overwrite)


def check_writable_grid(path: PathLike, reference: Volume, *, sheared_nifti: bool = False) -> None:
    """Refuse what :func:`save_volume` would refuse for any array on ``reference``'s grid (a file type it cannot
    write, a sheared grid as NIfTI, a NIfTI whose qform and sform disagree as a one-geometry format), so that a
    command can refuse right after reading the scan instead of after minutes of network time.

    Raises:
        VolumeError: as :func:`save_volume`, with the same message.
    """
    p = Path(path)
    if is_nifti(p):
        nifti_header_for(reference, sheared_nifti=sheared_nifti, target=p)
        return
    check_output_type(p)
    _check_single_geometry(p, reference)


def check_output_type(path: PathLike, hint: str = "") -> None:
    """Refuse, by its name alone, a file type no writer here takes (``mask.txt``); ``hint`` ends the message.

    Raises:
        VolumeError: naming the file and the types that are written.
    """
    from engine.formats import can_write

    p = Path(path)
    if not is_nifti(p) and not can_write(p):
        raise VolumeError(f"{p}: cannot write this file type; use .nii.gz, .nii, .nrrd, .nhdr, .seg.nrrd, .mha, "
                          f".mhd or .mgz{hint}")


class OutputIsInputError(VolumeError):
    """A file to write is an input's file (its header, or a data file its header names); refused whatever
    ``overwrite`` says."""


def same_file(a: PathLike, b: PathLike) -> bool:
    """``a`` and ``b`` name one file: equal after resolving links, or one inode (hard links)."""
    if os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b)):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


class InputFiles:
    """The files of some input volumes (:func:`engine.formats.volume_files`: each header and the data files it
    names), looked up as :func:`same_file` compares them, in constant time per lookup (a folder of a thousand
    scans is checked against a thousand outputs before anything runs)."""

    def __init__(self, inputs: Iterable[PathLike]) -> None:
        from engine.formats import volume_files

        self._by_path: Dict[str, Tuple[Path, Path]] = {}
        self._by_inode: Dict[Tuple[int, int], Tuple[Path, Path]] = {}
        for src in inputs:
            for part in volume_files(src):
                self._by_path.setdefault(os.path.normcase(os.path.realpath(part)), (Path(src), part))
                try:
                    st = os.stat(part)
                except OSError:
                    continue
                self._by_inode.setdefault((st.st_dev, st.st_ino), (Path(src), part))

    def find(self, path: PathLike) -> Optional[Tuple[Path, Path]]:
        """``(input, its file)`` when ``path`` is one of the inputs' files, else None."""
        hit = self._by_path.get(os.path.normcase(os.path.realpath(path)))
        if hit is not None or not self._by_inode:
            return hit
        try:
            st = os.stat(path)
        except OSError:
            return None
        return self._by_inode.get((st.st_dev, st.st_ino))


def input_conflict_message(output: PathLike, written: PathLike, src: PathLike, part: PathLike) -> str:
    """Why writing ``output`` is refused: the file it writes, ``written`` (``output`` or its data file), is ``part``,
    a file of input ``src`` (the input itself or a data file its header names)."""
    output, written, src, part = Path(output), Path(written), Path(src), Path(part)
    link = "" if written.absolute() == part.absolute() else f" ({part}, reached through a link)"
    whose = f"input {src}" if part == src else f"the data file of input {src}"
    what = "this output" if written == output else f"its data file {written}"
    return (f"{output}: {what} is {whose}{link}; writing it would destroy that input - choose another output file "
            "or folder")


def refuse_replacing_inputs(path: PathLike, inputs: Iterable[PathLike]) -> None:
    """Raise :class:`OutputIsInputError` when a file written for ``path`` (:func:`engine.formats.written_files`:
    itself, and a detached header's data file) is a file of one of ``inputs`` (:class:`InputFiles`)."""
    from engine.formats import written_files

    inputs = list(inputs)
    if not inputs:
        return
    index = InputFiles(inputs)
    for written in written_files(path):
        hit = index.find(written)
        if hit is not None:
            raise OutputIsInputError(input_conflict_message(path, written, *hit))


def _write_detached(p: Path, write: Callable[[str], Any], *, overwrite: bool) -> Path:
    """Write a header + data file pair (``.nhdr``, ``.mhd``) all-or-nothing, also across a process killed outright.

    ``write`` runs on the header's name (its suffix in lower case, which the writers need to make a detached pair)
    in a hidden folder beside ``p`` (:data:`TEMP_FOLDER_PATTERN`), so the header names its data file by its final
    name; both files are fsynced. Before the first file is moved a journal (:data:`PAIR_JOURNAL`, fsynced, locked by
    this process while it is used) is put in that folder; then the files are moved into place data first, header
    last (the commit point), each with an atomic rename made durable before the next. A file they replace is kept in
    the hidden folder (a hard link, or the file itself where there are none) until both are in place.

    On any exception (a full disk, a data file that exists without ``overwrite``, an interruption) the pair is put
    back as it was and the hidden folder and any folder this call made are removed. A process killed outright
    (SIGKILL, power loss) leaves the hidden folder; the next :func:`recover_interrupted_write` of ``p`` (run by every
    read of ``p``, every write of it and :func:`remove_stale_temps`) makes the pair entirely new when both new files
    were in place, else entirely what it was, and only then removes the folder.
    """
    from engine.formats import FormatError, suffix_of, written_files

    header, data = written_files(p)
    data_what = f"data file of {p.name}"
    whats = {header: _what(header, None), data: data_what}
    suffix = suffix_of(p)
    tmp_name = p.name[: -len(suffix)] + suffix
    tmp_dir: Optional[Path] = None
    journal: Optional[_PairJournal] = None
    created: List[Path] = []
    current = header
    try:
        for folder in _pair_folders(p):  # an earlier write of p killed midway: its pair is put right first
            try:
                _recover_pair_folder(folder)  # (one in progress in another process is left to finish)
            except ValueError:
                pass  # not a pair's journal: not ours to act on
        if not overwrite:
            for target in (header, data):
                if os.path.lexists(target):
                    raise OutputExistsError(target, whats[target])
        created = _make_parents(p.parent)
        tmp_dir = _temp_folder(p)
        tmp_dir.mkdir()
        write(str(tmp_dir / tmp_name))
        made = sorted(f.name for f in tmp_dir.iterdir())
        if made != sorted({tmp_name, data.name}):  # never put in place files the output checks did not see
            raise VolumeError(f"{p}: the writer made {made}, not this header and its data file {data.name}; "
                              "nothing was written")
        umask = os.umask(0)
        os.umask(umask)
        for name in made:
            with open(tmp_dir / name, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp_dir / name, 0o666 & ~umask)
        journal = _PairJournal.begin(tmp_dir, header, data, tmp_name)
        for key, name, target in (("data", data.name, data), ("header", tmp_name, header)):
            current = target
            if not overwrite:
                _rename_no_replace(tmp_dir / name, target, whats[target])
            else:
                if os.path.lexists(target):
                    aside = tmp_dir / _PAIR_ASIDES[key]
                    try:
                        os.link(target, aside, follow_symlinks=False)  # the old file stays in place meanwhile
                    except OSError:  # no hard links here (FAT, some network shares)
                        os.replace(target, aside)
                    _fsync_folder(tmp_dir)  # the old file's second name is durable before it leaves the target
                os.replace(tmp_dir / name, target)
            _fsync_folder(p.parent)  # durable in this order: the header never lands before its data
    except BaseException as exc:
        if journal is not None:
            try:
                journal.settle(commit=False)  # put the pair back as it was, from what is on disk
            except OSError:
                pass  # the journal stays: the next recover_interrupted_write finishes it
            finally:
                journal.release()
        elif tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        _remove_quietly([], created)
        if isinstance(exc, (WriteError, VolumeError)):
            raise
        if isinstance(exc, FormatError):
            raise VolumeError(str(exc)) from exc
        failure = describe_write_failure(exc) if isinstance(exc, Exception) else None
        if failure is None:
            raise  # a bug in the writer or an interruption: not a file system problem
        code, reason = failure
        raise WriteError(current, whats[current], reason, code) from exc
    try:
        journal.settle(commit=True)  # both in place: the old files go, then the journal and its folder
    except OSError:
        pass  # the pair is new; the next recover_interrupted_write removes what is left
    finally:
        journal.release()
    return p


# A header + data pair's replacement (:func:`_write_detached`) in its hidden folder: the journal, written and fsynced
# before the first file is moved and removed last, and the names the files it replaces are kept under meanwhile
# (suffixes no header or data file has, so they never meet the writer's files).
PAIR_JOURNAL = "journal.json"
_PAIR_JOURNAL_PART = "journal.json.part"
_PAIR_ASIDES = {"data": "old-data.old", "header": "old-header.old"}
# How long a read waits for another process's replacement of the pair to finish (its journal is held for two
# renames and a few fsyncs: milliseconds) before refusing.
PAIR_WAIT_S = 10.0


class _PairJournal:
    """The journal of one replacement of a header + data pair: the pair's targets and the inode numbers of the new
    files (a rename keeps them), held with an exclusive ``flock`` by the writing process while it is in use, so that
    a lock that can be taken proves the writer gone (the system drops a killed process's locks)."""

    def __init__(self, folder: Path, header: Path, data: Path, tmp_name: str, new: Dict[str, int],
                 fd: Optional[int]) -> None:
        self.folder, self.header, self.data, self.tmp_name, self.new, self.fd = folder, header, data, tmp_name, new, fd

    @classmethod
    def begin(cls, folder: Path, header: Path, data: Path, tmp_name: str) -> "_PairJournal":
        """Write, fsync and lock the journal of the new files in ``folder`` (before the first of them is moved)."""
        import json

        new = {"header": os.stat(folder / tmp_name).st_ino, "data": os.stat(folder / data.name).st_ino}
        part = folder / _PAIR_JOURNAL_PART
        # readable and lockable by the other users of a shared folder (the umask applies)
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        journal = cls(folder, header, data, tmp_name, new, fd)
        try:
            # locked before the journal has its name: no one can take an unlocked one for a dead one
            locked = _try_lock(fd)
            text = json.dumps({"version": 1, "header": header.name, "data": data.name, "new": new})
            os.write(fd, text.encode("utf-8"))
            os.fsync(fd)
            if locked is None:
                journal.release()  # no locks to hold (Windows, where an open file cannot be renamed or deleted)
            os.replace(part, folder / PAIR_JOURNAL)
            _fsync_folder(folder)
        except BaseException:
            journal.release()
            raise
        return journal

    @classmethod
    def open(cls, folder: Path) -> Optional["_PairJournal"]:
        """The journal in a pair's hidden folder, unlocked, or None when it has none; raises ``ValueError`` for
        one that is not such a journal (another header's, unknown names)."""
        import json

        from engine.formats import detached_data_file, suffix_of

        try:
            # opened for writing where allowed: NFS emulates flock with byte-range locks, whose exclusive kind
            # needs a file open for writing
            fd = os.open(folder / PAIR_JOURNAL, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                if isinstance(exc, FileNotFoundError):
                    return None
                # a link, an unreadable file: not one this engine's writer made
                raise ValueError(f"{folder / PAIR_JOURNAL}: cannot read this journal ({exc.strerror or exc})") from None
            try:
                fd = os.open(folder / PAIR_JOURNAL, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError as exc:
                raise ValueError(f"{folder / PAIR_JOURNAL}: cannot read this journal ({exc.strerror or exc})") from None
        try:
            with os.fdopen(os.dup(fd), "r", encoding="utf-8") as f:
                doc = json.load(f)
            match = TEMP_FOLDER_PATTERN.match(folder.name)
            header = folder.parent / (match.group("name") if match else "")
            data = detached_data_file(header) if match else None
            new = doc.get("new") if isinstance(doc, dict) else None
            if (data is None or doc.get("version") != 1 or doc.get("header") != header.name
                    or doc.get("data") != data.name or not isinstance(new, dict)
                    or not all(isinstance(new.get(k), int) for k in ("header", "data"))):
                raise ValueError(f"{folder / PAIR_JOURNAL}: not the journal of {header.name}")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            os.close(fd)
            raise ValueError(f"{folder / PAIR_JOURNAL}: cannot read this journal ({exc})") from None
        except BaseException:
            os.close(fd)
            raise
        suffix = suffix_of(header)
        return cls(folder, header, data, header.name[: -len(suffix)] + suffix, dict(new), fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the lock
            self.fd = None

    def _holds_new(self, key: str, target: Path) -> bool:
        """Whether ``target`` holds this replacement's new file (its inode: a rename keeps it). A file that is neither
        the new one nor absent is the old one, or a later write's: never moved or removed here."""
        try:
            return os.stat(target, follow_symlinks=False).st_ino == self.new[key]
        except FileNotFoundError:
            return False

    def settle(self, commit: bool) -> str:
        """Make the pair entirely new (``commit`` and both new files in place) or entirely what it was before, from
        what is on disk (any step of the writer may have been the last); then remove the hidden folder, the journal
        last. Returns ``"new"`` or ``"old"``. Raises ``OSError`` where a file cannot be moved back (the journal
        stays, so it can be finished later); idempotent, so a recovery killed midway is finished by the next."""
        targets = (("header", self.header), ("data", self.data))  # the writer's moves, undone last first
        if commit and all(self._holds_new(key, target) for key, target in targets):
            state = "new"
        else:
            state = "old"
            for key, target in targets:
                aside = self.folder / _PAIR_ASIDES[key]
                if self._holds_new(key, target):
                    if os.path.lexists(aside):
                        os.replace(aside, target)
                    else:
                        os.unlink(target)  # the target held nothing before
                elif os.path.lexists(aside) and not os.path.lexists(target):
                    os.replace(aside, target)  # moved aside (no hard links), the new file not yet in its place
                elif os.path.lexists(aside) and not _same_file(aside, target):
                    # neither the new file nor a second name of the old one: the folder was copied or restored (new
                    # inode numbers) or the file was replaced since; which is which cannot be told, so nothing is
                    # moved and the old file stays where it is
                    raise ValueError(f"{target.name}: cannot tell whether it is the old or the new file of an "
                                     f"interrupted write (was the folder copied or restored?); the file it replaced "
                                     f"is kept as {aside}")
                _fsync_folder(self.folder.parent)
        for name in (*_PAIR_ASIDES.values(), self.tmp_name, self.data.name, _PAIR_JOURNAL_PART, PAIR_JOURNAL):
            try:
                os.unlink(self.folder / name)  # only the names a pair's writer makes; anything else keeps the folder
            except FileNotFoundError:
                pass
            except OSError:
                # a read-only folder: the pair is whole as it stands; the journal stays (the asides with it) and the
                # next recovery finds the same state and tries again
                return state
        try:
            self.folder.rmdir()
        except OSError:
            pass
        return state


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _try_lock(fd: int) -> Optional[bool]:
    """Take an exclusive ``flock`` on ``fd`` without waiting: True when taken, False when another open file (another
    process, or another write in this one) holds it, None where this system or file system has no such locks."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _recover_pair_folder(folder: Path, *, wait_s: float = 0.0, unlocked_ok: bool = False) -> Optional[str]:
    """Finish the replacement journaled in a pair's hidden folder when its writer is gone (:meth:`_PairJournal.settle`
    with ``commit``: a killed write whose header was moved into place is complete).

    Returns ``"new"`` / ``"old"`` (the pair as it now is; the folder is removed), ``"busy"`` (its writer still holds
    the journal after ``wait_s``), ``"unlocked"`` (no locks here to tell a dead writer from a live one, and not
    ``unlocked_ok``) or None (no journal: none, or it was finished meanwhile). Raises ``ValueError`` for a journal that
    is not a pair's and ``OSError`` where the pair cannot be put right (a read-only folder)."""
    deadline = time.monotonic() + wait_s
    while True:
        journal = _PairJournal.open(folder)
        if journal is None:
            return None
        try:
            locked = _try_lock(journal.fd)
            if locked is None and not unlocked_ok:
                return "unlocked"
            if locked is not False:
                if os.fstat(journal.fd).st_nlink == 0:
                    continue  # finished by another process between the open and the lock: look again
                if locked is None:
                    journal.release()  # nothing held; on Windows an open journal could not be deleted
                return journal.settle(commit=True)
        finally:
            journal.release()
        if time.monotonic() >= deadline:
            return "busy"
        time.sleep(0.02)


def _pair_folders(header: Path) -> List[Path]:
    """The hidden folders of writes of the header + data pair ``header`` (:data:`TEMP_FOLDER_PATTERN`) that hold a
    journal, i.e. whose files were being moved into place."""
    try:
        names = os.listdir(header.parent)
    except OSError:
        return []
    found = []
    for name in names:
        match = TEMP_FOLDER_PATTERN.match(name)
        if match and match.group("name") == header.name:
            folder = header.parent / name
            if not folder.is_symlink() and os.path.lexists(folder / PAIR_JOURNAL):
                found.append(folder)
    return sorted(found)


def recover_interrupted_write(path: PathLike, wait_s: float = 0.0) -> None:
    """Finish a replacement of the header + data pair ``path`` (``.nhdr``, ``.mhd``) that a killed process left
    between its renames, so that the pair is entirely the new one (both new files were in place) or entirely what it
    was before; a no-op for other files and when there is none. :func:`load_volume` and the other reads of a pair run
    it (``wait_s`` :data:`PAIR_WAIT_S`), and so does every write of one.

    Raises:
        VolumeError: the pair may be mixed and cannot be put right now: another process is replacing it (still after
            ``wait_s``), the folder is read-only, or this system has no file locks to tell a killed write from one in
            progress; the message names the file, the write's hidden folder and what to do.
    """
    from engine.formats import DETACHED_SUFFIXES, suffix_of

    p = Path(path)
    if suffix_of(p) not in DETACHED_SUFFIXES:
        return
    for folder in _pair_folders(p):
        try:
            state = _recover_pair_folder(folder, wait_s=wait_s)
        except ValueError as exc:
            raise VolumeError(f"{p}: {exc}; its header and data file may not belong together - check them, then "
                              f"delete {folder}") from None
        except OSError as exc:
            reason = (describe_write_failure(exc) or (None, str(exc)))[1]
            raise VolumeError(f"{p}: a write of this file was interrupted between its header and its data file, and "
                              f"the pair as it was cannot be put back ({reason}): its header and data file may not "
                              f"belong together; make {p.parent} writable and open it again (the old files are "
                              f"kept in {folder})") from None
        if state == "busy":
            raise VolumeError(f"{p}: another process is replacing this file right now (its write {folder.name} is "
                              "moving the header and data file into place); open it again when that write has "
                              "finished")
        if state == "unlocked":
            raise VolumeError(f"{p}: a write of this file was interrupted between its header and its data file, "
                              f"which may not belong together; when no process is writing it, run "
                              f"engine.io.remove_stale_temps({str(p.parent)!r}) to put the pair back as it was (the "
                              f"old files are kept in {folder}), then open it again")


def _checked_array(p: Path, array: np.ndarray, reference: Volume, dtype: Any,
                   segments: Optional[List[Dict[str, Any]]]) -> np.ndarray:
    array = np.asarray(array)
    if tuple(array.shape[:3]) != reference.shape or array.ndim not in (3, 4):
        raise VolumeError(f"{p}: array shape {tuple(array.shape)} differs from the reference "
                          f"{reference.path or 'volume'} shape {reference.shape}; refusing to write it on that grid")
    if not is_nifti(p):
        check_output_type(p)
        if array.ndim != 3:
            raise VolumeError(f"{p}: only NIfTI holds several volumes (shape {array.shape}); use .nii.gz")
        _check_single_geometry(p, reference)
    return array.astype(_nifti_dtype(array, dtype), copy=False)


def _nifti_reference_header(reference: Volume) -> Any:
    """The reference's NIfTI header when it still describes ``reference.affine``, else None: its affine in mm
    (nibabel's, times the header's unit factor, :func:`nifti_affine_mm`) is the volume's (which is in mm)."""
    import nibabel as nib

    header = reference.header
    if not isinstance(header, nib.Nifti1Header):
        return None
    try:
        best = nifti_affine_mm(header)
    except Exception:
        return None
    return header if np.allclose(best, reference.affine, atol=1e-6) else None


def _check_single_geometry(p: Path, reference: Volume) -> None:
    """Refuse a one-geometry format (NRRD, MHA, MGZ) for a NIfTI reference that ITK-based tools place elsewhere
    than nibabel: the mask could open aligned with its image in one family of tools only."""
    from engine.formats import suffix_of

    header = _nifti_reference_header(reference)
    if header is None:
        return
    conflict = nifti_geometry_conflict(header, reference.affine, reference.shape)
    if conflict is not None:
        raise VolumeError(
            f"{p}: cannot write a {suffix_of(p)} mask for {reference.path or 'this NIfTI image'}: 3D Slicer and other "
            f"ITK-based tools place that NIfTI image differently from nibabel/napari ({conflict}), and a "
            f"{suffix_of(p)} file holds one geometry only, so the mask would be misaligned with the image in one of "
            "them; save it as .nii.gz, which keeps the image's qform and sform")


def nifti_header_for(reference: Volume, *, sheared_nifti: bool = False, target: Optional[PathLike] = None) -> Any:
    """The NIfTI header that places voxels on ``reference``'s grid for nibabel and ITK alike (see :func:`save_volume`).

    ``reference.header`` itself when it is a NIfTI header describing ``reference.affine`` (in mm once its length
    unit is applied: a metre image's header is kept as it is, units and raw values, so its mask lines up with it in
    tools that ignore the units too); else a new header (codes kept from a stale NIfTI header, else 1; units mm) with
    sform and qform set to the affine, or, for a sheared grid and ``sheared_nifti``, the sform alone (qform_code 0).

    Raises:
        VolumeError: a sheared grid and not ``sheared_nifti`` (the message names ``target`` and ``.nrrd``).
    """
    import nibabel as nib

    existing = _nifti_reference_header(reference)
    if existing is not None:
        return existing
    affine = np.asarray(reference.affine, dtype=np.float64)
    shape = reference.shape
    codes = (1, 1)
    if isinstance(reference.header, nib.Nifti1Header):  # a header that no longer describes the affine
        header = nifti_header_in_mm(reference.header.copy())[0]  # the mm affine below: units said mm
        header.set_data_shape(shape)
        codes = (max(int(header["sform_code"]), 1), max(int(header["qform_code"]), 1))
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        img = image_class(np.zeros((1, 1, 1), np.uint8), affine, header=header)
    else:
        img = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), affine)
    img.header.set_data_shape(shape)
    img.set_sform(affine, code=codes[0])
    img.set_qform(affine, code=codes[1])  # the nearest rigid grid: exact unless the affine is sheared
    itk = nifti_itk_affine(img.header)
    if itk is None or not _aligned(itk, affine, shape):
        if not sheared_nifti:
            raise VolumeError(
                f"{target or '<NIfTI file>'}: cannot write {reference.path or 'this image'}'s grid as NIfTI: its voxel "
                "axes are not perpendicular (a sheared grid, e.g. a tilted CT gantry); NIfTI keeps a shear in its "
                "sform only, and 3D Slicer and other ITK-based tools place NIfTI files by the qform then, so the mask "
                "would be misaligned there; save it as .nrrd (or .seg.nrrd), which keeps the grid exactly")
        img.set_qform(None, code=0)  # sform only: exact in nibabel; ITK refuses the file instead of misplacing it
    if not _aligned(nifti_affine_mm(img.header), affine, shape):  # never write a grid we did not mean
        raise VolumeError(f"{target or '<NIfTI file>'}: the NIfTI header cannot hold "
                          f"{reference.path or 'this image'}'s grid")
    return img.header


def with_nifti_header(volume: Volume, *, sheared_nifti: bool = False) -> Volume:
    """``volume`` with the header :func:`nifti_header_for` gives it: files written with it as their reference
    (an image and its labels, a saved case) all share that one header, whatever the volume's source format."""
    import dataclasses

    return dataclasses.replace(volume, header=nifti_header_for(volume, sheared_nifti=sheared_nifti))


CLASS_RECORD_KEY = "mambahome_class_names"
"""Key of the class record a label map's NIfTI header carries in a JSON extension, ``{key: [names by value] | null}``
(``null``: names unknown when saved); napari_mambahome's reader names the labels by it."""


def _is_label_table(extension: Any) -> bool:
    """A NIfTI header extension that names label values: our class record or a CIFTI/Caret ``<LabelTable>``."""
    try:
        content = extension.get_content()
    except Exception:  # noqa: BLE001 - an extension nibabel cannot decode names nothing we know
        return False
    if isinstance(content, str):
        content = content.encode("utf-8", "replace")
    return isinstance(content, (bytes, bytearray)) and (CLASS_RECORD_KEY.encode() in content
                                                       or b"<LabelTable" in content)


def with_class_record(header: Any, names: Optional[Sequence[str]]) -> Any:
    """A copy of the NIfTI ``header`` marked as a label map (``NIFTI_INTENT_LABEL``) that carries the class record
    ``names`` (by value, 0 first; None: unknown), without the label tables it had: a header copied from the image
    (TotalSegmentator's CT carries one naming 117 values) would name the new labels' values after the image's."""
    import json

    from nibabel.nifti1 import Nifti1Extension

    header = header.copy()
    kept = [e for e in header.extensions if not _is_label_table(e)]
    header.extensions.clear()
    header.extensions.extend(kept)
    header.set_intent("label")
    record = json.dumps({CLASS_RECORD_KEY: list(names) if names is not None else None}).encode("utf-8")
    header.extensions.append(Nifti1Extension("comment", record))
    return header


def header_class_names(header: Any) -> Tuple[bool, Optional[List[str]]]:
    """Class names a NIfTI header's extensions carry: our class record (:data:`CLASS_RECORD_KEY`,
    :func:`with_class_record`) or a CIFTI/Caret ``<LabelTable>`` (TotalSegmentator's files, Connectome Workbench).

    Returns:
        ``(recorded, names)``: ``recorded`` when the header holds our record (whose names may be ``None``:
        saved while unknown); ``names`` by label value (0 is ``background``), or ``None``.
    """
    import json

    caret = None
    for extension in list(getattr(header, "extensions", None) or ()):
        try:
            content = extension.get_content()
        except Exception:  # noqa: BLE001 - an extension nibabel cannot decode names nothing we know
            continue
        if isinstance(content, str):
            content = content.encode("utf-8", "replace")
        if not isinstance(content, (bytes, bytearray)):
            continue
        content = bytes(content)
        if CLASS_RECORD_KEY.encode() in content:
            try:
                names = json.loads(content.decode("utf-8").strip(" \t\r\n\x00")).get(CLASS_RECORD_KEY)
            except (ValueError, AttributeError, UnicodeDecodeError):
                continue
            if names is None:
                return True, None
            if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
                return True, ["background"] + [n.strip() or f"label {v}" for v, n in enumerate(names) if v]
        elif caret is None and b"<LabelTable" in content:
            found: Dict[int, str] = {}
            text = content.decode("utf-8", "replace")
            for attributes, body in re.findall(r"<Label\b([^>]*)>(.*?)</Label>", text, re.DOTALL):
                key = re.search(r'\bKey\s*=\s*"(\d+)"', attributes)
                name = re.sub(r"^<!\[CDATA\[(.*)\]\]>$", r"\1", body.strip(), flags=re.DOTALL).strip()
                if key and name and int(key.group(1)) > 0:
                    found[int(key.group(1))] = name
            if found and max(found) < 65536:
                caret = ["background"] + [found.get(v, f"label {v}") for v in range(1, max(found) + 1)]
    return False, caret


def _names_by_value(segments: Sequence[Dict[str, Any]]) -> List[str]:
    named = {int(s["value"]): str(s.get("name") or "") for s in segments}
    return ["background"] + [named.get(v) or f"label {v}" for v in range(1, max(named, default=0) + 1)]


def volume_writer(path: PathLike, array: np.ndarray, reference: Volume, dtype: Any = None,
                  segments: Optional[List[Dict[str, Any]]] = None, *,
                  sheared_nifti: bool = False, label_map: bool = False,
                  class_names: Optional[Sequence[str]] = None) -> Callable[[str], Any]:
    """Check ``array`` against ``reference`` and return ``write(tmp_path)`` for :func:`atomic_write` /
    :func:`atomic_write_all` (several files written all-or-nothing), in the format ``path`` names.

    Args and Raises: as :func:`save_volume` (the checks happen here, before anything is written);
    header + data pairs (``.nhdr``, ``.mhd``) are two files, so only :func:`save_volume` writes them.
    """
    import nibabel as nib

    from engine.formats import DETACHED_SUFFIXES, FormatError, raw_writer, suffix_of

    p = Path(path)
    array = _checked_array(p, array, reference, dtype, segments)
    out_dtype = array.dtype
    if not is_nifti(p):
        if suffix_of(p) in DETACHED_SUFFIXES:
            raise VolumeError(f"{p}: a header + data file pair cannot be written with other files at once")
        try:
            return raw_writer(p, array, reference.affine, segments=segments)
        except FormatError as exc:
            raise VolumeError(str(exc)) from exc
    affine = np.asarray(reference.affine, dtype=np.float64)

    # The image's own header when it describes its grid (qform and sform with their codes and pixdim as they
    # are: every reader then places the mask exactly where it places the image, whichever form it prefers),
    # else a new one; see nifti_header_for.
    header = nifti_header_for(reference, sheared_nifti=sheared_nifti, target=p).copy()
    if segments or label_map or class_names is not None:
        # a label map: marked as one, so napari opens it as labels whatever its name (a prompt's mask is named as
        # its scan), with its class names as a .seg.nrrd carries them (None: unknown, never the model's)
        names = [str(n) for n in class_names] if class_names is not None else (
            _names_by_value(segments) if segments else None)
        header = with_class_record(header, names)
    header.set_data_shape(array.shape)  # a 4D array gets dim[0] = 4; nibabel checks shapes against it
    # a NIfTI-2 scan gets a NIfTI-2 mask: made NIfTI-1, nibabel logged "sizeof_hdr should be 348" on the console
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = image_class(array, None, header=header)
    if not _aligned(nifti_affine_mm(img.header), affine, reference.shape):  # never write a grid we did not mean
        raise VolumeError(f"{p}: the NIfTI header cannot hold {reference.path or 'this image'}'s grid")
    img.header.set_data_dtype(out_dtype)
    # The reference's scaling applied to its stored integers; these values are final.
    img.header.set_slope_inter(np.nan, np.nan)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0

    return lambda tmp: nib.save(img, tmp)


def write_text_atomic(path: PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write a text file atomically (temp file in the same folder + ``os.replace``).

    Raises:
        WriteError: as :func:`atomic_write`.
    """
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write, overwrite=overwrite)


def write_json_atomic(path: PathLike, obj: Any, *, overwrite: bool = True) -> Path:
    """Write ``obj`` as indented JSON atomically; NaN is written as ``null`` (valid JSON).

    Raises:
        WriteError: as :func:`atomic_write`.
    """
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

    return write_text_atomic(path, json.dumps(clean(obj), indent=2, allow_nan=False) + "\n", overwrite=overwrite)


MIN_NETWORK_VOXELS = 2
"""Fewest voxels per axis a volume may have at the model's spacing: fewer is not a 3D volume there
(a wrong spacing in the header, or a single slice), and the network's statistics need more than one."""


def thin_file_words(source_shape: Sequence[int]) -> Optional[str]:
    """What a file too thin in itself is ("a single slice ...: it is a 2D image"), or None when every axis holds
    :data:`MIN_NETWORK_VOXELS` voxels. No spacing makes such a file a volume (one slice saved as a 3D NIfTI of shape
    (122, 101, 1)), so its header's spacing is not the fault to name.

    Args:
        source_shape: the file's own voxel shape (its first three axes are read).
    """
    source = tuple(int(s) for s in source_shape)
    thin = [axis for axis, n in enumerate(source[:3]) if n < MIN_NETWORK_VOXELS]
    if not thin:
        return None
    axes = " and ".join(str(axis + 1) for axis in thin)
    if len(thin) == 1 and source[thin[0]] == 1:
        return f"a single slice (shape {source}: 1 voxel along its axis {axes}): it is a 2D image"
    return f"fewer than {MIN_NETWORK_VOXELS} voxels along its axes {axes} (shape {source}): it is not a 3D volume"


def thin_volume_message(name: object, source_shape: Sequence[int], holder: str = "file") -> Optional[str]:
    """The refusal of a volume too thin in itself to segment (:func:`thin_file_words`), or None. One sentence for
    every door a 2D image comes in by: a file given to ``predict``, a layer or node uploaded to the server.

    Args:
        name: the file or upload the message names.
        source_shape: its voxel shape.
        holder: "file" or "image", how the message calls it.
    """
    what = thin_file_words(source_shape)
    if not what:
        return None
    return (f"{name}: the {holder} holds {what}, and the model segments 3D volumes, which need at least "
            f"{MIN_NETWORK_VOXELS} voxels along every axis. Give the whole 3D scan (all its slices in one file, or "
            "its DICOM series folder)")
