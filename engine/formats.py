"""Medical volume formats besides NIfTI: NRRD/NHDR (+ Slicer ``.seg.nrrd``), MetaImage MHA/MHD,
DICOM series and FreeSurfer MGH/MGZ, read and written with their geometry.

Every reader returns a :class:`RawVolume` whose ``affine`` is voxel-to-world in **RAS+** mm, the
engine's convention (NIfTI's). NRRD files declare their ``space`` (usually left-posterior-superior; one
that declares none, ``scanner-xyz`` or ``3D-right-/left-handed`` is LPS, as ITK and 3D Slicer read it; a
space-time space is refused) and ITK images (MHA/MHD/DICOM) are always LPS:
their matrices are converted by negating the first two world rows, which is exact in floating point, so a
read-write round trip keeps the affine.
Arrays keep the file's voxel order ``(i, j, k)`` (the fastest-varying file axis first, as nibabel).

Library choices, one per family, all pure Python or binary wheels on Linux/macOS/Windows:

- ``pynrrd`` for NRRD/NHDR: small, pure Python, reads every header field (``space``, ``kinds``,
  custom keys such as a modality) that the NRRD specification allows.
- ``slicerio`` for ``.seg.nrrd``: 3D Slicer's own package for segment names, colours, label values
  and layers, so files open in Slicer as named, coloured segments.
- ``SimpleITK`` for MHA/MHD and DICOM series: one library for both ITK formats and the only
  wheel-installable reader that sorts and stacks DICOM slices by position with GDCM (rescale
  slope/intercept applied, modality tag available); ``itk`` proper is a far larger dependency.
- ``pydicom`` for the functional groups of enhanced (and legacy converted enhanced) multi-frame DICOM, which
  GDCM reads in file order with one rescale: each frame's position, orientation, spacing and rescale.
- ``nibabel`` (already the NIfTI reader) for MGH/MGZ.
"""
from __future__ import annotations

import contextlib
import locale
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

NRRD_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr")
ITK_SUFFIXES = (".mha", ".mhd")
MGH_SUFFIXES = (".mgz", ".mgh")
DETACHED_SUFFIXES = (".nhdr", ".mhd")  # a header file naming a separate data file
DICOM_SUFFIXES = (".dcm", ".ima")
READ_SUFFIXES = NRRD_SUFFIXES + ITK_SUFFIXES + MGH_SUFFIXES + DICOM_SUFFIXES
"""Suffixes (lower case) this module reads; a folder is read as a DICOM series."""
WRITE_SUFFIXES = NRRD_SUFFIXES + ITK_SUFFIXES + MGH_SUFFIXES
"""Suffixes this module writes (DICOM is read only: a label map is not a DICOM image)."""

# RAS <-> LPS: negate x and y. Its own inverse; multiplying by +-1 is exact.
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# NRRD 3D world spaces (full and abbreviated names, compared in lower case as teem does) -> sign of each world
# axis relative to RAS. The patient spaces are what they say. ``scanner-xyz`` and ``3D-right-handed`` /
# ``3D-left-handed`` name no patient directions: ITK's NrrdImageIO (and so SimpleITK and 3D Slicer) converts
# only RAS and LAS to LPS and takes every other space's numbers as they stand, i.e. as LPS, like a file that
# declares no space. They are read the same way here, so labels written back (space LPS) overlay the image in
# those tools; reading them as RAS laid the labels mirrored in x and y beside the image.
_NRRD_SPACES = {
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
    "scanner-xyz": (-1, -1, 1), "3d-right-handed": (-1, -1, 1), "3d-left-handed": (-1, -1, 1),
}
# The NRRD specification's space-time spaces (4 world coordinates): not one 3D volume. ITK refuses them when
# the file has 3 domain axes and reads a 4D file as 4D (without converting even RAST/LAST to LPS).
_NRRD_TIME_SPACES = ("right-anterior-superior-time", "rast", "left-anterior-superior-time", "last",
                     "left-posterior-superior-time", "lpst", "scanner-xyz-time", "3d-right-handed-time",
                     "3d-left-handed-time")
# DICOM Modality (0008,0060) and MetaImage ``Modality`` values -> engine modality names.
_MODALITY_CODES = {"CT": "CT", "MR": "MR", "MRI": "MR", "US": "US", "MET_MOD_CT": "CT", "MET_MOD_MR": "MR",
                   "MET_MOD_US": "US", "PT": "PET", "NM": "NM", "CR": "CR", "DX": "DX"}


class FormatError(ValueError):
    """A file of a supported format that cannot be read or written; the message names the file.

    :class:`engine.io.VolumeError` is raised to callers (``engine.io`` re-raises with its type).
    """


@dataclass
class RawVolume:
    """What a format reader found in a file, before the engine's validation.

    Args:
        data: array in file voxel order ``(i, j, k)`` (possibly with trailing singleton axes).
        affine: ``(4, 4)`` voxel-to-world matrix in RAS+ mm.
        header: the format's header (dict, SimpleITK metadata dict, nibabel header) or None.
        modality: modality named by the file (DICOM tag, NRRD/MetaImage key), else None.
        segments: for segmentations: ``[{"value": int, "name": str, "color": [r, g, b]}]``.
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any = None
    modality: Optional[str] = None
    segments: Optional[List[Dict[str, Any]]] = None
    notes: List[str] = field(default_factory=list)


def suffix_of(path: PathLike) -> str:
    """The format suffix of ``path`` in lower case (``.seg.nrrd`` and ``.nii.gz`` count as one)."""
    name = str(path).lower()
    for suffix in (".seg.nrrd", ".nii.gz") + READ_SUFFIXES + (".nii",):
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def nib_load(path: PathLike, fileobj: Optional[BinaryIO] = None) -> Any:
    """``nibabel.load`` for a NIfTI (``.nii``, ``.nii.gz``) or MGH (``.mgh``, ``.mgz``) file whose suffix has any case.

    nibabel derives the name of the file it opens from the suffix's case: a lower- or upper-case suffix works, but
    for a mixed-case one (``scan.Nii.Gz``, ``T1.Mgz``, as some exports name files) it opens another name
    (``scan.nii.Gz``) that does not exist. Such a file is opened under its own name, as the image class its suffix
    (MGH) or its first bytes (NIfTI-1 or NIfTI-2) name; nibabel picks the decompressor by suffix in any case.

    Args:
        path: the file.
        fileobj: the file's content already open (seekable, decompressed: e.g. a ``gzip.GzipFile``), read by nibabel
            (header and voxels) instead of a file it opens and closes itself, so the caller can go on reading the same
            stream (``engine.io`` reads a ``.nii.gz`` to the end of its gzip stream, which checks its CRC).
    """
    import nibabel as nib

    p = Path(path)
    suffix = suffix_of(p)
    written = p.name[-len(suffix):] if suffix else ""
    if fileobj is None and (suffix not in (".nii.gz", ".nii") + MGH_SUFFIXES or written in (suffix, suffix.upper())):
        return nib.load(str(p))
    klass: Any = nib.MGHImage
    if suffix not in MGH_SUFFIXES:
        from nibabel.openers import ImageOpener

        if fileobj is not None:
            first4 = fileobj.read(4)
            fileobj.seek(0)
        else:
            with ImageOpener(str(p), "rb") as f:
                first4 = f.read(4)
        nifti2 = len(first4) == 4 and any(int.from_bytes(first4, order) == 540 for order in ("little", "big"))
        klass = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    file_map = klass.make_file_map({"image": str(p)})
    if fileobj is not None:
        file_map["image"].fileobj = fileobj  # nibabel reads an open file object before the name (FileHolder.file_like)
    return klass.from_file_map(file_map)


def volume_suffix(name: str) -> Optional[str]:
    """The volume suffix of a file name as written (``.nii.gz``, ``.seg.nrrd``, ``.MHA``...): what to cut to get the
    case's name; None for other files and for DICOM slices (a series is a folder, not one file per case)."""
    suffix = suffix_of(name)
    readable = suffix in (".nii.gz", ".nii") + READ_SUFFIXES and suffix not in DICOM_SUFFIXES
    return name[-len(suffix):] if readable else None


def segment_names(segments: Optional[List[Dict[str, Any]]]) -> Dict[int, str]:
    """``{label value: segment name}`` of a ``.seg.nrrd`` label map's segments (empty for other formats)."""
    return {int(s["value"]): str(s["name"]) for s in segments or []
            if isinstance(s.get("value"), int) and s["value"] > 0 and s.get("name")}


def can_read(path: PathLike) -> bool:
    """Whether :func:`read_raw` handles ``path`` (by suffix, or a folder for a DICOM series)."""
    return suffix_of(path) in READ_SUFFIXES or Path(path).is_dir()


def is_dicom_folder(path: PathLike, probe: int = 20) -> bool:
    """Whether a folder holds DICOM files (``.dcm``/``.ima``, or ``DICM`` after the 128-byte preamble),
    judged from its first ``probe`` files so that checking a large folder stays fast."""
    p = Path(path)
    if not p.is_dir():
        return False
    try:
        files = [f for f in sorted(p.iterdir())[:probe] if f.is_file()]
    except OSError:
        return False
    return any(_looks_like_dicom_file(f, DICOM_SUFFIXES) for f in files)


def can_write(path: PathLike) -> bool:
    """Whether :func:`raw_writer` writes ``path`` (by suffix)."""
    return suffix_of(path) in WRITE_SUFFIXES


def modality_from_code(code: Optional[str]) -> Optional[str]:
    """Engine modality name (``CT``, ``MR``, ``US``...) of a DICOM/MetaImage modality code, or None."""
    if code is None:
        return None
    key = str(code).strip().upper()
    if not key or key in ("MET_MOD_UNKNOWN", "OT", "UNKNOWN"):
        return None
    return _MODALITY_CODES.get(key, key.replace("MET_MOD_", ""))


def intensity_sample(data: Any, size: int = 2_000_000) -> Optional[np.ndarray]:
    """About ``size`` voxels of ``data`` (every n-th in memory order) as float64, or None for an empty or
    non-numeric array: what the intensity tests (:func:`guess_modality`,
    :func:`engine.inference.intensity_profile`) look at."""
    values = np.asarray(data)
    if values.size == 0 or not np.issubdtype(values.dtype, np.number):
        return None
    # order="K": a view in memory order (a NIfTI's Fortran-ordered array is not copied whole first).
    return values.ravel(order="K")[:: max(1, values.size // size)].astype(np.float64)


def guess_modality(data: np.ndarray) -> Optional[str]:
    """``"CT"`` when intensities look like Hounsfield units, else None.

    CT in HU is integral, has air at about -1000 and soft tissue near 0; outside the scanner's
    field of view it is often padded with one very negative value (-1024, -2048, -3024, -32768).
    Required: integral values, at least 0.2% of voxels in the air range [-1100, -900], the median
    in [-1100, 1000] and the 99.5th percentile at most 4000. MR magnitudes are never negative.

    Args:
        data: image array, any shape.
    """
    sample = intensity_sample(data)
    if sample is None or not np.all(np.isfinite(sample)) or not np.array_equal(sample, np.round(sample)):
        return None
    air = float(np.mean((sample >= -1100.0) & (sample <= -900.0)))
    median, p_hi = np.percentile(sample, [50.0, 99.5])
    if air >= 0.002 and -1100.0 <= median <= 1000.0 and p_hi <= 4000.0:
        return "CT"
    return None


# gzip integrity of .nii.gz (engine.io) and .mgz reads: here, below engine.io, which imports this module
# Inflated bytes a .nii.gz's gzip stream may hold after its voxels that are read to reach its trailer (at least this,
# else as many as the voxels): past it the CRC goes unchecked rather than a stream with gigabytes after its voxels
# inflated for it (a header edited to keep only the first volume of a 4D series still costs one pass of its size).
_GZIP_TAIL_BYTES = 64 * 2**20


def check_gzip_end(gz: Any, path: Path, nbytes: int) -> None:
    """Read a ``.nii.gz``'s (or ``.mgz``'s, :func:`_read_mgh`) gzip stream from where nibabel stopped
    (after the voxels) to its end, nothing kept, so that Python's gzip checks the trailer's CRC-32 and length against
    every byte inflated, voxels included (it keeps the CRC as it inflates: no second pass). A flipped bit in the voxels
    or a missing 8-byte trailer raises here (:func:`gzip_damage` words it); a NRRD's gzip data gets the same check
    from zlib (:func:`inflate_bounded`).

    Bytes after a complete gzip member that are not another member are ignored, as ``gzip -d`` ignores them.
    """
    import gzip

    left = max(int(nbytes), _GZIP_TAIL_BYTES)
    while left > 0:
        try:
            chunk = gz.read(min(left, 1 << 20))
        except gzip.BadGzipFile as exc:
            if str(exc).startswith("Not a gzipped file"):  # raised only after the member before it was checked
                return
            raise
        if not chunk:
            return
        left -= len(chunk)


_GZIP_TRUNCATED = ("it is truncated: its gzip stream ends before its end-of-stream marker (the end of the data, or "
                   "the 8-byte trailer holding its CRC and length, is missing); copy the file again")


def gzip_damage(exc: BaseException) -> Optional[str]:
    """What a gzip error read from a ``.nii.gz`` (or ``.mgz``, gzip NRRD) says about the file, or None for other
    errors."""
    import gzip
    import zlib

    text = str(exc)
    if isinstance(exc, gzip.BadGzipFile) and text.startswith("CRC check failed"):
        return (f"it is corrupt: gzip CRC check failed ({text}): its content changed after it was written (a damaged "
                "copy, download or disk); copy the file again")
    if isinstance(exc, gzip.BadGzipFile) and "length" in text.lower():
        return (f"it is corrupt: gzip length check failed ({text}): it inflates to another size than it was "
                "written with; copy the file again")
    if isinstance(exc, EOFError):
        return _GZIP_TRUNCATED
    if isinstance(exc, zlib.error):
        return f"it is corrupt: its gzip data is damaged (zlib: {text}); copy the file again"
    return None


# ----------------------------------------------------------------------------- reading
def read_raw(path: PathLike) -> RawVolume:
    """Read a non-NIfTI volume file (or a DICOM series folder) with its RAS affine.

    Args:
        path: ``.nrrd``/``.nhdr``/``.seg.nrrd``, ``.mha``/``.mhd``, ``.mgz``/``.mgh``, a DICOM
            file (its whole series is read) or a folder holding one DICOM series.

    Returns:
        :class:`RawVolume`.

    Raises:
        FormatError: unknown format, corrupt or truncated file, several DICOM series in a folder.
    """
    p = Path(path)
    suffix = suffix_of(p)
    if suffix in DICOM_SUFFIXES:  # before the series scan, which reported "no DICOM series found" for an empty .dcm
        refuse_empty_file(p)
    # PACS exports name slices without a suffix (IM00001) or by their UID (1.2.840.113619.2.55.3, read as a
    # suffix ".3"): for a name this module does not know, the part-10 magic tells a DICOM file
    if p.is_dir() or suffix in DICOM_SUFFIXES or (suffix not in READ_SUFFIXES and p.is_file()
                                                   and _looks_like_dicom_file(p, ())):
        return _read_dicom(p)
    reader = {".seg.nrrd": _read_nrrd, ".nrrd": _read_nrrd, ".nhdr": _read_nrrd,
              ".mha": _read_itk, ".mhd": _read_itk, ".mgz": _read_mgh, ".mgh": _read_mgh}.get(suffix)
    if reader is None:
        raise FormatError(f"{p}: unsupported file type '{suffix or p.name}'; Mamba-HoME reads NIfTI (.nii, "
                          ".nii.gz), NRRD (.nrrd, .nhdr, .seg.nrrd), MetaImage (.mha, .mhd), MGH (.mgz, "
                          ".mgh) and DICOM series (a folder or one of its .dcm files)")
    return _guarded(p, reader)


# ----------------------------------------------------------------------------- what a header may claim
MAX_DEFLATE_RATIO = 1100
"""The most bytes one byte of deflate (gzip/zlib) data can inflate to (the format's limit is about 1032): a gzip
file's header claiming more voxel bytes than this times the file's size cannot be true, whatever is inside."""


def total_memory_bytes() -> Optional[int]:
    """This computer's physical memory, or None where the system does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _size_text(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def check_claimed_size(p: Path, shape: Any, itemsize: int, *, stored: Optional[int] = None,
                       compressed: Optional[int] = None, what: str = "voxel data") -> None:
    """Refuse, before anything is allocated or decompressed, a file whose header claims more than it can hold.

    Args:
        p: the file (named in the message).
        shape: the header's sizes (every axis, channels included).
        itemsize: bytes of one stored value.
        stored: bytes of raw (uncompressed) voxel data the file holds after its header, when known: fewer than the
            header claims is a truncated file (or a lying header).
        compressed: bytes of deflate-compressed voxel data, when the data is gzip/zlib: a claim above
            :data:`MAX_DEFLATE_RATIO` times it is impossible (a "gzip bomb" header or a truncated file).

    Raises:
        FormatError: naming the file, the claimed shape and size, and what the file or this computer holds. Every
            size is computed with Python integers (a header's axes of 100000 overflow numpy's int64 product).
    """
    try:
        dims = [int(s) for s in shape]
    except (TypeError, ValueError):
        raise FormatError(f"{p}: its header's sizes {shape!r:.100} are not whole numbers") from None
    if any(d < 0 for d in dims):
        raise FormatError(f"{p}: its header gives a negative size {tuple(dims)}")
    voxels = 1
    for d in dims:
        voxels *= d
    claimed = voxels * int(itemsize)
    said = f"its header claims {tuple(dims)} voxels of {itemsize} byte{'s' if itemsize != 1 else ''}"
    if stored is not None and claimed > stored:
        raise FormatError(f"{p}: is truncated or its header is wrong: {said} ({_size_text(claimed)} of {what}) "
                          f"but the file holds only {_size_text(max(stored, 0))} of it; copy the file again")
    if compressed is not None and claimed > MAX_DEFLATE_RATIO * max(compressed, 1):
        raise FormatError(f"{p}: {said} ({_size_text(claimed)}), which {_size_text(max(compressed, 0))} of "
                          f"gzip-compressed data cannot hold (at most ~{MAX_DEFLATE_RATIO}x); the file is truncated "
                          "or its header is wrong, and nothing was decompressed")
    memory = total_memory_bytes()
    needed = voxels * max(int(itemsize), 4)  # read as stored, then float32 for images
    if memory is not None and needed > memory:
        raise FormatError(f"{p}: {said} ({_size_text(needed)} once read), more than this computer's memory "
                          f"({_size_text(memory)}); nothing was read. Crop or downsample it first, or check that "
                          "the file is what it says")


def _nrrd_data_file(header: Dict[str, Any], p: Path) -> Optional[Path]:
    """The detached data file a NRRD header names (None: the data follows the header), refused when it lies outside
    the header's folder: a header handed to us must not make us read ``../../etc/passwd``, ``/dev/zero`` or another
    user's file as voxels."""
    raw = header.get("data file", header.get("datafile"))
    if raw is None:
        return None
    name = str(raw).strip()
    parts = name.split()
    # the NRRD forms naming several files: 'LIST' (names on the following lines) and '<format> <min> <max> <step>
    # [<subdim>]' with a printf format ('slice%03d.raw 1 40 1'); any other text is one file name, which may hold spaces
    # ('data file: MR head.raw.gz', as ITK/3D Slicer write for a node named 'MR head')
    numbered = (len(parts) in (4, 5) and "%" in parts[0]
                and all(t.lstrip("+-").isdigit() for t in parts[1:]))
    if name.upper().startswith("LIST") or numbered:
        raise FormatError(f"{p}: its header spreads the voxels over several data files ('data file: {name:.80}'); "
                          "only one data file beside the header is read - save the volume again as one .nrrd")
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise FormatError(f"{p}: its header names the data file '{name:.120}', outside the header's folder; a "
                          "detached header is read only with its data file beside it (e.g. 'data file: "
                          f"{p.stem}.raw'): move the data file next to it and name it so")
    target = p.parent / rel
    if not target.is_file():  # also refuses a device, a fifo or a folder
        raise FormatError(f"{p}: the data file its header names ('{name:.120}') is missing or not a regular "
                          f"file: {target}; keep the header and its data file together")
    return target


def _check_nrrd_size(p: Path, header: Dict[str, Any], data_start: int) -> None:
    """:func:`check_claimed_size` for a NRRD header (attached or detached data)."""
    import nrrd

    try:
        dtype = np.dtype(nrrd.reader._determine_datatype(header))
    except Exception:  # noqa: BLE001 - pynrrd says what is wrong with the type when it reads
        return
    sizes = header.get("sizes")
    if sizes is None:
        return
    data_file = _nrrd_data_file(header, p)
    source = data_file or p
    start = 0 if data_file is not None else data_start
    skip = int(header.get("byte skip", header.get("byteskip", 0)) or 0)
    available = source.stat().st_size - start - max(skip, 0)
    encoding = str(header.get("encoding", "raw")).strip().lower()
    if encoding == "raw":
        check_claimed_size(p, sizes, dtype.itemsize, stored=available)
    elif encoding in ("gzip", "gz"):
        check_claimed_size(p, sizes, dtype.itemsize, compressed=available)
    else:  # text (two bytes a value at least: a digit and a separator), bzip2: this computer's memory only
        check_claimed_size(p, sizes, dtype.itemsize,
                           # n values need 2n - 1 bytes at least: the last one needs no separator after it
                           stored=(available + 1) // 2 * dtype.itemsize if encoding in ("ascii", "text", "txt")
                           else None)


def refuse_empty_file(p: Path) -> None:
    """Refuse a zero-byte file with the one message every format gives (NIfTI through :mod:`engine.io` too): each
    library words it its own way ("Empty file", "no DICOM series found", "corrupt, truncated"), or not at all, and a
    failed copy or download that left an empty file is common enough to say so plainly."""
    try:
        empty = p.is_file() and p.stat().st_size == 0
    except OSError:
        return  # unreadable: the reader says why
    if empty:
        suffix = suffix_of(p)
        # a .dcm file is one slice of a series, not a volume
        what = f"{suffix} file" if suffix in DICOM_SUFFIXES else f"{suffix} volume" if suffix else "volume file"
        raise FormatError(f"{p}: is an empty file (0 bytes); expected a {what}")


# ----------------------------------------------------------------------------- compressed NRRD voxel data
INFLATE_CHUNK_BYTES = 1 << 20
"""Compressed input fed, and inflated output taken, at a time by :func:`inflate_bounded`."""
INFLATE_SLACK_BYTES = 1 << 16
"""Bytes a compressed NRRD payload may inflate to beyond what its header declares (its ``sizes`` and ``type``, plus its
``byte skip``) before it is refused: a file with ``byte skip: -1`` keeps its voxels at the end of the inflated stream,
after whatever precedes them. Anything else past the declared size is refused by the size check after inflating."""
_NRRD_COMPRESSED = ("gzip", "gz", "bzip2", "bz2")  # as pynrrd spells them (case-sensitive, as it reads them)


class StreamCutShort(FormatError):
    """:func:`inflate_bounded`'s refusal of a stream that ends before its end-of-stream marker; ``inflated``: the
    bytes it inflated to (``keep``), for a caller that names the voxels missing instead."""

    def __init__(self, message: str, inflated: Optional[bytearray] = None) -> None:
        super().__init__(message)
        self.inflated = inflated


def inflate_bounded(source: BinaryIO, encoding: str, allowed: float, name: Any, *, keep: bool = True,
                    what: str = "this computer's memory", verify: bool = False) -> Optional[bytearray]:
    """Inflate a gzip or bzip2 stream (one gzip member, as pynrrd reads it) to at most ``allowed`` bytes, counted as it
    inflates, a megabyte at a time; refuse it the moment it inflates past that.

    pynrrd inflates a whole payload into memory before it compares its size with the header: a 1 MB gzip payload
    declaring 4x4x4 voxels took a gigabyte, and bzip2 inflates 100 MiB of zeros from 240 bytes. The server refuses
    such uploads (``engine.server.volumes``); this is the same bound for files read from disk.

    Args:
        source: the compressed bytes, positioned at the payload's start (a file, or ``io.BytesIO``); read
            :data:`INFLATE_CHUNK_BYTES` at a time, so the compressed payload is never held whole either.
        encoding: the NRRD encoding (``gzip``/``gz``/``bzip2``/``bz2``), or ``zlib`` for a MetaImage's compressed
            data (a zlib or a gzip stream, as ITK reads either).
        allowed: the most bytes the stream may inflate to.
        name: the file, named in the message.
        keep: return the inflated bytes; else only count them (nothing kept) and return None, and leave a corrupt
            stream to the reader that follows (it stops at the same place and says why). A stream that ends before
            its end-of-stream marker is refused either way: no reader says so.
        what: what inflating further would exhaust, for the message.
        verify: with ``keep`` False, raise a corrupt stream's error too (no reader that checks it follows).

    Returns:
        The inflated bytes (``keep``), up to the end of the compressed stream or of ``source``; else None.

    Raises:
        FormatError: the stream inflates past ``allowed`` bytes, or ``source`` ends before the stream does.
        zlib.error, OSError, EOFError: (``keep`` or ``verify`` only) a corrupt stream.
    """
    import bz2
    import zlib

    bzip2 = encoding in ("bzip2", "bz2")
    wbits = zlib.MAX_WBITS | (32 if encoding == "zlib" else 16)  # 32: a zlib or gzip header, told apart by zlib
    inflater: Any = bz2.BZ2Decompressor() if bzip2 else zlib.decompressobj(wbits)
    out_bytes: Optional[bytearray] = bytearray() if keep else None
    total = 0
    try:
        while True:
            data: Any = source.read(INFLATE_CHUNK_BYTES)
            if not data:
                break
            while True:
                # at most a megabyte out of each call: what is left of the input comes back (zlib's
                # unconsumed_tail) or stays inside the decompressor (bz2), never the whole payload inflated
                out = inflater.decompress(data, INFLATE_CHUNK_BYTES)
                total += len(out)
                if total > allowed:
                    raise FormatError(f"{name}: its {encoding} voxel data inflates past {allowed} bytes, more than its "
                                      f"header declares; the file is broken (or made to exhaust {what}) and was "
                                      "not read further")
                if out_bytes is not None:
                    out_bytes += out
                if inflater.eof:
                    return out_bytes
                data = b"" if bzip2 else inflater.unconsumed_tail
                if (inflater.needs_input if bzip2 else not out and not data):
                    break
    except (OSError, EOFError, zlib.error):
        if keep or verify:
            raise
        return out_bytes
    # Inflated without complaint, but the stream's end is missing: gzip's 8-byte trailer (the CRC-32 and length of
    # the data) or bzip2's end block (its CRC), so nothing checked the bytes inflated, as for a .nii.gz (engine.io)
    raise StreamCutShort(f"{name}: cannot read its {encoding} voxel data: {_stream_cut_short(encoding)}", out_bytes)


def _stream_cut_short(encoding: str) -> str:
    if encoding in ("gzip", "gz"):
        return _GZIP_TRUNCATED
    end = "the end block holding its CRC" if encoding in ("bzip2", "bz2") else "its 4-byte Adler-32 check"
    return (f"it is truncated: its {encoding} stream ends before its end-of-stream marker (the end of the data, or "
            f"{end}, is missing); copy the file again")


def _nrrd_skips(p: Path, header: Dict[str, Any]) -> Tuple[int, int]:
    """``(line skip, byte skip)`` of a NRRD header, refused as pynrrd refuses them (negative, below -1)."""
    try:
        line_skip = int(header.get("lineskip", header.get("line skip", 0)))
        byte_skip = int(header.get("byteskip", header.get("byte skip", 0)))
    except (TypeError, ValueError):
        raise FormatError(f"{p}: its header's 'line skip' or 'byte skip' is not a whole number") from None
    if line_skip < 0 or byte_skip < -1:
        raise FormatError(f"{p}: its header's 'line skip' ({line_skip}) must be >= 0 and its 'byte skip' "
                          f"({byte_skip}) >= -1")
    return line_skip, byte_skip


_SKIP_CHUNK_BYTES = 1 << 20  # bytes searched for line ends at a time by _skip_lines


def skip_lines(fh: BinaryIO, count: int, p: Path, where: str) -> None:
    """Move ``fh`` past ``count`` lines (each ended by ``\\n``), a megabyte at a time; refuse the file when its data
    ends first.

    pynrrd (and this module before) called ``readline()`` once per skipped line, on to the end of the file and past
    it: a 100-byte file saying ``line skip: 100000000`` held a CPU for minutes, a larger number for ever. Here the
    cost is one pass over the bytes actually present, whatever the header says.
    """
    left, seen = count, 0
    while left > 0:
        start = fh.tell()
        chunk = fh.read(_SKIP_CHUNK_BYTES)
        if not chunk:
            raise FormatError(f"{p}: its header's 'line skip: {count}' skips more lines than {where} holds "
                              f"({seen} line{'s' if seen != 1 else ''}); the header is wrong or the file truncated, "
                              "and it was not read")
        ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == ord("\n"))
        if len(ends) >= left:
            fh.seek(start + int(ends[left - 1]) + 1)
            return
        left -= len(ends)
        seen += len(ends)


@contextlib.contextmanager
def _nrrd_payload(p: Path, header: Dict[str, Any], data_start: int) -> Iterator[BinaryIO]:
    """The file holding a NRRD's voxel data, positioned where pynrrd starts reading it: after the header (or at the
    start of the detached data file), then ``line skip`` lines, then ``byte skip`` bytes (pynrrd skips these before
    inflating and again in the inflated data; ``-1``, voxels at the end, is left to the reader).

    Raises:
        FormatError: ``line skip`` names more lines, or ``byte skip`` more bytes, than the data holds (checked here,
            so no reader is handed a header that makes it skip past the end, one line per call).
    """
    data_file = _nrrd_data_file(header, p)
    line_skip, byte_skip = _nrrd_skips(p, header)
    where = f"its data file {data_file.name}" if data_file is not None else "the file after its header"
    with open(data_file or p, "rb") as fh:
        if data_file is None:
            fh.seek(data_start)
        skip_lines(fh, line_skip, p, where)
        if byte_skip > 0:
            left = os.fstat(fh.fileno()).st_size - fh.tell()
            if byte_skip > left:
                raise FormatError(f"{p}: its header's 'byte skip: {byte_skip}' skips past the end of its data "
                                  f"({max(left, 0)} bytes left in {where}"
                                  f"{f' after its {line_skip} skipped lines' if line_skip else ''}); the header is "
                                  "wrong or the file truncated, and it was not read")
            fh.seek(byte_skip, os.SEEK_CUR)
        yield fh


def _nrrd_declared(p: Path, header: Dict[str, Any]) -> Tuple[np.dtype, List[int], int]:
    """``(dtype, sizes, bytes)`` a NRRD header declares for its voxel data (Python integers: no int64 overflow)."""
    import nrrd

    missing = [f for f in ("dimension", "type", "encoding", "sizes") if f not in header]
    if missing:
        raise FormatError(f"{p}: its NRRD header lacks the required field(s) {', '.join(missing)}")
    sizes = [int(n) for n in header["sizes"]]
    if int(header["dimension"]) != len(sizes):
        raise FormatError(f"{p}: its NRRD header's 'dimension: {header['dimension']}' does not match its "
                          f"{len(sizes)} sizes")
    dtype = np.dtype(nrrd.reader._determine_datatype(header))
    count = 1
    for n in sizes:
        count *= n
    return dtype, sizes, count * dtype.itemsize


def _nrrd_allowed(expected: int, byte_skip: int) -> int:
    """The most bytes a compressed payload declaring ``expected`` voxel bytes may inflate to (pynrrd also drops
    ``byte skip`` inflated bytes before the voxels)."""
    return expected + max(byte_skip, 0) + INFLATE_SLACK_BYTES


def _check_nrrd_inflated_size(p: Path, header: Dict[str, Any], data_start: int) -> None:
    """Count (nothing kept) what a compressed NRRD's payload inflates to, refusing it past its declared size: before a
    reader that inflates it whole (slicerio's, for ``.seg.nrrd``)."""
    encoding = header.get("encoding")
    if encoding not in _NRRD_COMPRESSED:
        return
    try:
        _, _, expected = _nrrd_declared(p, header)
    except FormatError:
        raise
    except Exception:  # noqa: BLE001 - an unknown type: the reader says what is wrong with it
        return
    _, byte_skip = _nrrd_skips(p, header)
    with _nrrd_payload(p, header, data_start) as fh:
        inflate_bounded(fh, encoding, _nrrd_allowed(expected, byte_skip), p, keep=False)


def _read_nrrd_compressed(p: Path, header: Dict[str, Any], data_start: int) -> np.ndarray:
    """The voxels of a gzip or bzip2 NRRD, inflated no further than its header declares (:func:`inflate_bounded`),
    then laid out exactly as ``nrrd.read(..., index_order="F")`` lays them out (pynrrd's own byte skip rules)."""
    import zlib

    encoding = header["encoding"]
    dtype, sizes, expected = _nrrd_declared(p, header)
    _, byte_skip = _nrrd_skips(p, header)
    cut = None
    with _nrrd_payload(p, header, data_start) as fh:
        try:
            inflated = inflate_bounded(fh, encoding, _nrrd_allowed(expected, byte_skip), p)
        except StreamCutShort as exc:
            inflated, cut = exc.inflated, exc  # voxels missing too: the sizes below say more
        except (zlib.error, EOFError) as exc:
            damage = gzip_damage(exc) if encoding in ("gzip", "gz") else None
            if damage is None:
                raise
            raise FormatError(f"{p}: cannot read this {suffix_of(p)} file: {damage}") from exc
    assert inflated is not None
    # pynrrd skips byte_skip inflated bytes; -1: the voxels are the last bytes of the inflated stream
    offset = byte_skip if byte_skip >= 0 else len(inflated) - expected
    if offset < 0 or len(inflated) - offset != expected:
        raise FormatError(f"{p}: cannot read this {suffix_of(p)} file: its {encoding} voxel data inflates to "
                          f"{max(len(inflated) - max(offset, 0), 0)} "
                          f"bytes but its header declares {expected} (sizes {' '.join(map(str, sizes))}, type "
                          f"{header.get('type')}); the file is truncated or its header is wrong - copy it again")
    if cut is not None:
        raise cut
    data = np.frombuffer(inflated, dtype=dtype, count=expected // max(dtype.itemsize, 1), offset=offset)
    return data.reshape(tuple(sizes[::-1])).T


def _guarded(p: Path, reader: Callable[[Path], RawVolume]) -> RawVolume:
    refuse_empty_file(p)
    try:
        return reader(p)
    except FormatError:
        raise
    except Exception as exc:  # every library's own error for a corrupt/truncated file
        raise FormatError(f"{p}: cannot read this {suffix_of(p)} file ({type(exc).__name__}: "
                          f"{str(exc).strip() or 'no detail'}); the file is corrupt, truncated or not "
                          "what its name says") from exc


def _nrrd_space_signs(header: Dict[str, Any], p: Path) -> np.ndarray:
    """Sign of each world axis relative to RAS for a NRRD header's ``space``, as ITK reads it (see
    ``_NRRD_SPACES``); a space-time, unknown or non-3D space is refused, naming the file and the space."""
    raw = str(header.get("space", "")).strip()
    space = raw.lower()
    if not space:
        dim = header.get("space dimension")
        if dim is not None and int(dim) != 3:
            raise FormatError(f"{p}: NRRD 'space dimension: {dim}' is not a 3D space; Mamba-HoME reads 3D volumes "
                              "(space RAS, LAS, LPS, scanner-xyz, 3D-right-handed or 3D-left-handed)")
        # no declared space: the numbers are ITK's (and so 3D Slicer's) physical space, LPS; read as RAS, the
        # labels written back (space LPS) lay mirrored in x and y beside the image in every other tool
        return np.asarray(_NRRD_SPACES["lps"], dtype=np.float64)
    if space in _NRRD_TIME_SPACES:
        raise FormatError(f"{p}: NRRD space '{raw}' is a space-time (4D) space, a time series; Mamba-HoME reads "
                          "one 3D volume (space RAS, LAS, LPS, scanner-xyz, 3D-right-handed or 3D-left-handed): "
                          "save one time point as its own 3D file")
    if space not in _NRRD_SPACES:
        raise FormatError(f"{p}: NRRD space '{raw}' is not a 3D space Mamba-HoME can place (RAS, LAS, LPS, "
                          "scanner-xyz, 3D-right-handed or 3D-left-handed, full or abbreviated names)")
    return np.asarray(_NRRD_SPACES[space], dtype=np.float64)


def _nrrd_affine(header: Dict[str, Any], p: Path) -> Tuple[np.ndarray, List[int]]:
    """RAS affine of a NRRD header and the indices of its spatial (domain) axes."""
    ndim = int(header["dimension"])
    signs = _nrrd_space_signs(header, p)  # first: a 4D space's 4-component directions are no 3D geometry
    directions = header.get("space directions")
    if directions is not None:
        rows = np.asarray(directions, dtype=np.float64)
        spatial = [i for i in range(ndim) if np.all(np.isfinite(rows[i]))]
        # pynrrd reads 'none' as a row of NaN; a row partly finite is a broken direction, not a non-spatial axis
        broken = [i for i in range(ndim) if rows.ndim == 2 and i < len(rows) and np.isfinite(rows[i]).any()
                  and not np.isfinite(rows[i]).all()]
        if broken:
            raise FormatError(f"{p}: its 'space directions' for axis {broken[0]} {rows[broken[0]].tolist()} are not "
                              "finite numbers; the voxels cannot be placed")
        linear = rows[spatial].T  # columns = world step of each spatial array axis
    else:
        spacings = np.asarray(header.get("spacings", np.ones(ndim)), dtype=np.float64)
        spatial = [i for i in range(ndim) if np.isfinite(spacings[i])]
        linear = np.diag(spacings[spatial]) if len(spatial) == 3 else np.eye(len(spatial))
    if len(spatial) != 3 or linear.shape != (3, 3):
        hint = f" - {WHOLE_SCAN_HINT}" if len(spatial) < 3 else ""
        raise FormatError(f"{p}: has {len(spatial)} spatial axes (sizes {[int(n) for n in header.get('sizes', [])]}); "
                          f"expected a 3D volume{hint}")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin if np.all(np.isfinite(origin)) else 0.0
    affine[:3] *= signs[:, None]
    return affine, spatial


def _header_modality(header: Dict[str, Any]) -> Optional[str]:
    for key, value in header.items():
        if str(key).strip().lower() in ("modality", "dicom.modality", "0008|0060"):
            return modality_from_code(str(value))
    return None


def _read_nrrd(p: Path) -> RawVolume:
    import nrrd

    with open(p, "rb") as fh:
        header = nrrd.read_header(fh)
        data_start = fh.tell()
    # 'line skip' and 'byte skip' checked against the data present before any reader skips them: pynrrd (here and
    # inside slicerio) reads one line per skipped line, past the end of the file, for as many as the header says.
    # Also refuses a data file outside the header's folder, unread.
    with _nrrd_payload(p, header, data_start):
        pass
    # Before pynrrd reads (and decompresses) anything: a header claiming 100000^3 voxels, a gzip bomb. pynrrd inflated
    # a whole gzip body first and only then compared sizes.
    _check_nrrd_size(p, header, data_start)
    if any(str(k).startswith("Segment0_") for k in header) or suffix_of(p) == ".seg.nrrd":
        # slicerio inflates the whole payload itself: counted first, refused past the header's declared size
        _check_nrrd_inflated_size(p, header, data_start)
        return _read_seg_nrrd(p)
    if header.get("encoding") in _NRRD_COMPRESSED:
        # inflated here, bounded by the declared size: pynrrd inflated the whole payload before comparing sizes
        # (the MAX_DEFLATE_RATIO check above bounds gzip by 1100x the file only, and bzip2 not at all)
        data = _read_nrrd_compressed(p, header, data_start)
    else:
        # raw and text voxels read by pynrrd from the file positioned here, past the skipped lines and bytes: it is
        # given a header without them (its skipping is a readline() per line) and without the data file (opened here)
        bare = {k: v for k, v in header.items()
                if k not in ("line skip", "lineskip", "data file", "datafile", "byte skip", "byteskip")}
        _, byte_skip = _nrrd_skips(p, header)
        if byte_skip == -1:  # the voxels are the file's last bytes: pynrrd seeks from its end
            bare["byte skip"] = -1
        with _nrrd_payload(p, header, data_start) as fh:
            data = nrrd.read_data(bare, fh, str(p), index_order="F")
    affine, spatial = _nrrd_affine(header, p)
    if data.ndim > 3:
        # Non-spatial axes (list/vector kinds) of size 1 are dropped; more is several volumes.
        extra = [i for i in range(data.ndim) if i not in spatial]
        if all(data.shape[i] == 1 for i in extra):
            data = data.reshape([data.shape[i] for i in spatial])
        else:
            raise FormatError(f"{p}: has non-spatial axes of sizes {[data.shape[i] for i in extra]} "
                              "(channels or time points); expected one 3D volume")
    return RawVolume(data=data, affine=affine, header=dict(header), modality=_header_modality(header))


def _read_seg_nrrd(p: Path) -> RawVolume:
    """A Slicer segmentation as one label map and its segments (``value``, ``name``, ``color``).

    One layer (a 3D file): the voxels as stored, each segment's value its ``LabelValue``. Several
    layers (a 4D file, ``kinds: list domain domain domain``; Slicer writes one whenever segments
    overlap or were made in separate layers): the layers are merged into one label map when no
    voxel is in segments of two layers; a true overlap is refused, naming the segments.
    """
    import nrrd
    import slicerio

    # Geometry from the header as every other NRRD (and as ITK reads it). slicerio knows only the spaces 3D Slicer
    # writes, spelled in full, and its refusal of any other surfaced as "corrupt, truncated": said here instead.
    header = nrrd.read_header(str(p))
    affine, _ = _nrrd_affine(header, p)
    space = str(header.get("space", "")).strip()
    if space not in _SLICERIO_SPACES:
        raise FormatError(f"{p}: a .seg.nrrd in space '{space or '(none)'}': segmentation files are read in the spaces "
                          f"3D Slicer writes ({' or '.join(_SLICERIO_SPACES)}); open it in 3D Slicer and save it "
                          "again, or rename it .nrrd to read it as a plain label map")
    seg = slicerio.read_segmentation(str(p))
    voxels = np.asarray(seg["voxels"])
    listed = [s for s in seg.get("segments", []) if "labelValue" in s]
    if voxels.ndim == 4:
        voxels, values = _merge_seg_layers(p, voxels, listed)
    else:
        values = [int(s["labelValue"]) for s in listed]
    segments = [{"value": value, "name": str(s.get("name", s.get("id", ""))),
                 "color": [float(c) for c in s.get("color", [])][:3] or None}
                for s, value in zip(listed, values)]
    meta = {k: v for k, v in seg.items() if k not in ("voxels", "segments")}
    return RawVolume(data=voxels, affine=affine, header=meta, segments=segments)


_SLICERIO_SPACES = ("left-posterior-superior", "right-anterior-superior")


def _seg_layer_values(p: Path, layers: np.ndarray, segments: List[Dict[str, Any]]) -> List[int]:
    """Output value of each segment of a multi-layer ``.seg.nrrd``: its ``LabelValue``, as in a
    one-layer file, unless an earlier segment (header order) already has that value (segments of
    different layers often share one, e.g. each layer's first segment is 1); those get the next
    values above every ``LabelValue`` in the file, in header order."""
    values: List[int] = []
    taken = set()
    fresh = max([int(s["labelValue"]) for s in segments], default=0) + 1
    for s in segments:
        layer = int(s.get("layer", 0))
        if not 0 <= layer < layers.shape[0]:
            raise FormatError(f"{p}: segment {s.get('name', s.get('id', ''))!r} is in layer {layer}, but the "
                              f"file has {layers.shape[0]} layers")
        value = int(s["labelValue"])
        if value <= 0:  # no voxels (0 is background): kept as stored, like a one-layer file's
            values.append(value)
            continue
        if value in taken:
            value, fresh = fresh, fresh + 1
        taken.add(value)
        values.append(value)
    return values


def _seg_layer_map(layer: np.ndarray, lookup: Dict[int, int], dtype: np.dtype) -> np.ndarray:
    """``layer``'s voxels mapped through ``{stored value: output value}``; other values -> 0."""
    if layer.size and lookup and layer.min() >= 0 and layer.max() < 1 << 24:
        top = int(layer.max())
        lut = np.zeros(top + 1, dtype=dtype)
        for stored, value in lookup.items():
            if 0 <= stored <= top:
                lut[stored] = value
        return lut[layer]
    out = np.zeros(layer.shape, dtype=dtype)
    for stored, value in lookup.items():
        out[layer == stored] = value
    return out


def _merge_seg_layers(p: Path, layers: np.ndarray,
                      segments: List[Dict[str, Any]]) -> Tuple[np.ndarray, List[int]]:
    """One label map from a multi-layer segmentation ``(layer, i, j, k)`` and each segment's value
    in it; :class:`FormatError` naming the segments when a voxel is in segments of two layers.
    Voxels of a layer whose value is no segment's ``LabelValue`` are background (Slicer ignores them)."""
    values = _seg_layer_values(p, layers, segments)
    dtype = np.result_type(layers.dtype, np.min_scalar_type(max(values, default=0)))
    # {layer: {stored LabelValue: index in segments}}; the first segment listed wins a duplicate
    owners: Dict[int, Dict[int, int]] = {}
    for index, s in enumerate(segments):
        if values[index] > 0:
            owners.setdefault(int(s.get("layer", 0)), {}).setdefault(int(s["labelValue"]), index)
    merged = np.zeros(layers.shape[1:], dtype=dtype)
    covered = np.zeros(layers.shape[1:], dtype=bool)
    overlap = np.zeros(layers.shape[1:], dtype=bool)
    for layer, owned in sorted(owners.items()):
        mapped = _seg_layer_map(layers[layer], {v: values[i] for v, i in owned.items()}, dtype)
        inside = mapped != 0
        overlap |= covered & inside
        covered |= inside
        merged[inside] = mapped[inside]
    if overlap.any():
        raise FormatError(_seg_overlap_message(p, layers, segments, owners, overlap))
    return merged, values


def _seg_overlap_message(p: Path, layers: np.ndarray, segments: List[Dict[str, Any]],
                         owners: Dict[int, Dict[int, int]], overlap: np.ndarray) -> str:
    """Which segments overlap, each pair with its count of shared voxels, most first."""
    at = layers[:, overlap]  # (layers, overlapping voxels): stored values
    owner = np.full(at.shape, -1, dtype=np.int64)
    for layer, owned in owners.items():
        for stored, index in owned.items():
            owner[layer][at[layer] == stored] = index
    counts: Dict[Tuple[int, int], int] = {}
    for a in range(owner.shape[0]):
        for b in range(a + 1, owner.shape[0]):
            both = (owner[a] >= 0) & (owner[b] >= 0)
            if not both.any():
                continue
            pairs, n = np.unique(np.stack([owner[a][both], owner[b][both]]), axis=1, return_counts=True)
            for (i, j), c in zip(pairs.T.tolist(), n.tolist()):
                key = (min(i, j), max(i, j))
                counts[key] = counts.get(key, 0) + c

    def name(i: int) -> str:
        return repr(str(segments[i].get("name", segments[i].get("id", ""))))

    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    listed = [f"{name(i)} and {name(j)} share {c} voxel{'s' if c != 1 else ''}" for (i, j), c in ranked[:10]]
    if len(ranked) > 10:
        listed.append(f"{len(ranked) - 10} more pairs")
    total = int(overlap.sum())
    names = {str(s.get("name", "")) for s in segments}
    working = sorted(n for n in names if n == "MambaHoME interactive" or n.startswith("MambaHoME interactive ("))
    advice = ""
    if working:  # our 3D Slicer module's prompted object, still open when the node was saved
        advice = (f" {' and '.join(repr(n) for n in working)} is a prompted object of the MambaHoME module: rename it "
                  "to its class in the Segment Editor (that accepts it, and it takes its voxels from the other "
                  "segments), then save again.")
    return (f"{p}: segments overlap: {'; '.join(listed)} ({total} voxel{'s' if total != 1 else ''} in more than "
            f"one segment); a label map holds one label per voxel.{advice} To remove the overlap in 3D Slicer: in the "
            "Segment Editor (Masking -> Modify other segments: Overwrite all, its default) repaint the shared voxels "
            "in the segment that should keep them, or use Logical operators -> Subtract on the segment that should "
            "not keep them, then save again; or "
            "export the segmentation as a labelmap (Data module: right-click -> Export visible segments to binary "
            "labelmap, one label per voxel), save that labelmap and use its file")


@contextlib.contextmanager
def _keep_locale() -> Iterator[None]:
    """Restore the process locale after ITK/GDCM, whose DICOM code switches it to "C" for number
    parsing and may leave it there (Python's default text encoding would then become ASCII)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)


def _itk_affine(image: Any) -> np.ndarray:
    """RAS affine of a SimpleITK image (ITK stores LPS origin, spacing and direction cosines)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)[None, :]
    affine[:3, 3] = image.GetOrigin()
    return _LPS @ affine


WHOLE_SCAN_HINT = ("a 2D image is one slice of a scan, and the model segments whole 3D volumes: give the scan itself "
                   "(all its slices in one file, or its DICOM series folder)")


def _itk_array(image: Any, p: Path) -> np.ndarray:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise FormatError(f"{p}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or "
                          "vector image); expected a scalar 3D volume")
    if image.GetDimension() != 3:
        hint = f" - {WHOLE_SCAN_HINT}" if image.GetDimension() < 3 else ""
        raise FormatError(f"{p}: is {image.GetDimension()}D with size {image.GetSize()}; expected a 3D volume{hint}")
    # SimpleITK's arrays are (k, j, i); the engine's are (i, j, k) like nibabel's.
    return np.asarray(sitk.GetArrayViewFromImage(image)).transpose(2, 1, 0).copy()


_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def _metaimage_header(p: Path) -> Optional[Tuple[Dict[str, str], int]]:
    """A MetaImage header's fields (keys in lower case) and the offset just past its ``ElementDataFile`` line (where
    ``LOCAL`` data starts), or None when the file's first 64 KiB hold no such header."""
    try:
        with open(p, "rb") as f:
            blob = f.read(1 << 16)
    except OSError:
        return None
    fields: Dict[str, str] = {}
    end = 0
    for line in blob.split(b"\n"):
        end += len(line) + 1
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            return None
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            return fields, end
    return None


def _metaimage_data_path(p: Path, data_file: str) -> Optional[Path]:
    """The one file holding a MetaImage's voxel data (``p`` itself for ``LOCAL``), or None for a list of slice files
    or none named (left to ITK)."""
    if data_file.upper() == "LOCAL":
        return p
    if data_file.upper() == "LIST" or len(data_file.split()) != 1:
        return None
    return Path(data_file) if Path(data_file).is_absolute() else p.parent / data_file


def _metaimage_raw_bytes(fields: Dict[str, str]) -> int:
    """The bytes of a MetaImage's uncompressed voxel data, from its header (KeyError, ValueError: not said)."""
    dims = [int(v) for v in fields["dimsize"].split()]
    return (int(np.prod(dims, dtype=object)) * int(fields.get("elementnumberofchannels", "1"))
            * _MET_BYTES[fields["elementtype"].upper()])


def _metaimage_data_problem(p: Path) -> Optional[str]:
    """Why a MetaImage's voxel data cannot be read, in the user's terms, or ``None`` when that is not it: ITK
    says "File cannot be read ... No such file or directory" about the header (which exists) both when the data
    file the header names is missing and when the data is shorter than the header's size."""
    parsed = _metaimage_header(p)
    if parsed is None:
        return None
    fields, end = parsed
    try:
        data_file = fields["elementdatafile"]
        compressed = fields.get("compresseddata", "false").lower() == "true"
        if compressed:
            expected = int(fields["compresseddatasize"]) if "compresseddatasize" in fields else None
        else:
            expected = _metaimage_raw_bytes(fields)
        skip = int(fields.get("headersize", "0"))
    except (KeyError, ValueError):
        return None
    target = _metaimage_data_path(p, data_file)
    if target is None:
        return None
    if target == p:
        actual = p.stat().st_size - end - max(skip, 0)
        where = f"{p.name} holds"
    else:
        if not target.is_file():
            return (f"{p}: the data file its header names (ElementDataFile = {data_file}) is missing: {target} "
                    "does not exist; keep the header and its data file together")
        actual = target.stat().st_size - max(skip, 0)
        where = f"its data file {target} holds"
    if expected is not None and actual < expected:
        return (f"{p}: is truncated: its header describes {expected} bytes of {'compressed ' if compressed else ''}"
                f"voxel data but {where} only {max(actual, 0)}; copy the file again")
    return None


def _check_metaimage_compressed(p: Path) -> None:
    """Inflate a compressed MetaImage's voxel data once more, counted and nothing kept, to its end: ITK inflates it
    without looking at the result (it prints "Uncompress failed" and goes on), so only this pass tells a flipped bit
    (its Adler-32 check fails) from wrong voxels and a missing end from a sound file. One data file (``LOCAL`` or named); a list of slice
    files is left to ITK.

    Raises:
        FormatError: the data is damaged, ends before its end-of-stream marker or inflates past the header's size.
    """
    import zlib

    parsed = _metaimage_header(p)
    if parsed is None:
        return
    fields, end = parsed
    source = _metaimage_data_path(p, fields["elementdatafile"])
    if fields.get("compresseddata", "false").lower() != "true" or source is None:
        return
    try:
        skip = int(fields.get("headersize", "0"))
        expected: float = _metaimage_raw_bytes(fields)
    except (KeyError, ValueError):
        skip, expected = 0, float("inf")
    with open(source, "rb") as fh:
        start = end if source == p else 0
        if skip == -1 and "compresseddatasize" in fields:  # the data is the file's last bytes
            start = os.fstat(fh.fileno()).st_size - int(fields["compresseddatasize"])
        fh.seek(start + max(skip, 0))
        try:
            inflate_bounded(fh, "zlib", expected, p, keep=False, verify=True)
        except zlib.error as exc:
            raise FormatError(f"{p}: cannot read this {suffix_of(p)} file: it is corrupt: its compressed voxel data "
                              f"is damaged (zlib: {exc}): its content changed after it was written (a damaged copy, "
                              "download or disk); copy the file again") from exc


def _itk_itemsize(reader: Any) -> int:
    """Bytes of one stored value of the image an ITK reader's header describes (8 when unknown)."""
    import SimpleITK as sitk

    names = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
             sitk.sitkInt32: 4, sitk.sitkFloat32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat64: 8}
    return names.get(reader.GetPixelID(), 8)


def _read_itk(p: Path) -> RawVolume:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    # ITK picks its reader by the suffix, in lower case only: "SCAN.MHD" or "seg.Mha" (Windows and PACS exports,
    # or an output named so) would be "Unable to determine ImageIO reader"; the suffix already said MetaImage
    reader.SetImageIO("MetaImageIO")
    with _keep_locale():
        reader.ReadImageInformation()
        # ITK allocates the whole image before it reads a voxel: a header claiming more than this computer holds
        # is refused first (a truncated or detached file's own size is checked after a failure, below)
        check_claimed_size(p, list(reader.GetSize()) + [reader.GetNumberOfComponents()],
                           _itk_itemsize(reader))
        if reader.GetDimension() == 4 and reader.GetSize()[3] == 1:
            reader.SetExtractSize(list(reader.GetSize()[:3]) + [0])  # a 3D volume saved as 4D
        try:
            image = reader.Execute()
        except RuntimeError:
            problem = _metaimage_data_problem(p)
            if problem is not None:
                raise FormatError(problem) from None
            raise
    _check_metaimage_compressed(p)
    meta = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    return RawVolume(data=_itk_array(image, p), affine=_itk_affine(image), header=meta,
                     modality=_header_modality(meta))


def _read_dicom(p: Path) -> RawVolume:
    import SimpleITK as sitk

    folder = p if p.is_dir() else p.parent
    try:
        with _keep_locale():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except Exception as exc:
        raise FormatError(f"{p}: cannot scan for DICOM series ({exc})") from exc
    if not series:
        nested = _nested_dicom_folders(folder) if p.is_dir() else []
        if nested:
            # a PACS/CD export: DICOMDIR at the top, the slices folders down (patient/study/series)
            names = ", ".join(str(d.relative_to(folder)) for d in nested[:5]) + (" and more" if len(nested) > 5 else "")
            raise FormatError(f"{p}: no DICOM series directly in {folder}; its subfolders hold DICOM files "
                              f"({names}): open the folder of the series to read")
        raise FormatError(f"{p}: no DICOM series found in {folder}")
    if p.is_dir() and len(series) > 1:
        # a PACS export puts a localiser, a dose report or other reconstructions beside the scan: the user
        # needs to know which series are there and which file opens which
        listed = "; ".join(_dicom_series_summary(folder, uid) for uid in series)
        raise FormatError(f"{p}: holds {len(series)} DICOM series ({listed}); open one file of the series to "
                          "read (it reads that whole series), or put each series in its own folder")
    if p.is_file():
        chosen = None
        for uid in series:
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
            if any(Path(f).resolve() == p.resolve() for f in files):
                chosen = uid
        if chosen is None:
            raise FormatError(f"{p}: is not part of a readable DICOM series in {folder}")
        uid = chosen
    else:
        uid = series[0]
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    if len(files) == 1 and _dicom_frames(Path(files[0])) > 1:
        # a multi-frame object: one file holds every slice (enhanced and legacy converted enhanced ones place
        # each frame in their functional groups, read by _read_functional_groups)
        return _guarded(p, lambda _: _read_dicom_multiframe(p, Path(files[0])))
    if len(files) > 1 and max(_dicom_frames(Path(files[0])), _dicom_frames(Path(files[-1]))) > 1:
        # ITK would stack the files' frames as a 4D image (then "cannot reshape"), or one file would be half a scan
        names = ", ".join(Path(f).name for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        raise FormatError(f"{p}: DICOM series {uid} in {folder} is split over {len(files)} multi-frame files "
                          f"({names}); Mamba-HoME reads a series of one file per slice or one multi-frame file "
                          "holding every slice - export the series as one of these")
    if len(files) < 2:
        raise FormatError(f"{p}: DICOM series {uid} ({Path(files[0]).name if files else 'no file'}) has "
                          f"{len(files)} slice; expected a 3D volume")
    _refuse_unread_dicom_files(p, folder, series, uid)

    def read(_: Path) -> RawVolume:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        with _keep_locale():
            image = reader.Execute()
        meta = {k: reader.GetMetaData(0, k) for k in reader.GetMetaDataKeys(0)}
        _refuse_uneven_slices(p, image, reader, files)
        return RawVolume(data=_itk_array(image, p), affine=_tilted_affine(p, image, reader, files), header=meta,
                         modality=modality_from_code(meta.get("0008|0060")))

    return _guarded(p, read)


def _nested_dicom_folders(folder: Path, limit: int = 6, budget: int = 2000) -> List[Path]:
    """Up to ``limit`` subfolders of ``folder`` holding DICOM files, looking at no more than ``budget`` folders
    (a whole archive must not be walked to word an error)."""
    found: List[Path] = []
    for seen, (root, dirs, _) in enumerate(os.walk(folder)):
        dirs.sort()
        if seen >= budget or len(found) >= limit:
            break
        if Path(root) != folder and is_dicom_folder(root):
            found.append(Path(root))
    return found


def _dicom_frames(f: Path) -> int:
    """Number of Frames (0028,0008) of a DICOM file (1 for a single-frame file or an unreadable header)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(f))
    try:
        with _keep_locale():
            reader.ReadImageInformation()
        return int(reader.GetMetaData("0028|0008").strip()) if reader.HasMetaDataKey("0028|0008") else 1
    except Exception:
        return 1


def _read_dicom_multiframe(p: Path, f: Path) -> RawVolume:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(f))
    with _keep_locale():
        reader.ReadImageInformation()
    meta = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    modality = modality_from_code(meta.get("0008|0060"))
    read = _read_functional_groups(p, f, reader)  # an enhanced / legacy converted enhanced object
    if read is not None:
        return RawVolume(data=read[0], affine=read[1], header=meta, modality=modality)
    # a classic multi-frame object (secondary capture, NM...): one position and spacing for the file, as GDCM reads
    with _keep_locale():
        image = reader.Execute()
    return RawVolume(data=_itk_array(image, p), affine=_itk_affine(image), header=meta, modality=modality)


def _read_functional_groups(p: Path, f: Path, reader: Any) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Voxels (rescaled) and RAS affine of an enhanced or legacy converted enhanced multi-frame DICOM file, from
    its functional groups: each frame's Plane Position, Plane Orientation, Pixel Measures and Pixel Value
    Transformation, per frame or shared. GDCM (SimpleITK) takes the frames in file order with the first frame's
    rescale for all, and for frames out of spatial order gives 1 mm spacing on every axis: such files, or files
    rescaled per frame, were read as a silently wrong volume. Here the frames
    are sorted along the slice normal; frames that are not parallel, not evenly spaced, at one position
    (echoes, phases) or off one line are refused, naming the file. None for a file without functional groups."""
    import pydicom

    ds = pydicom.dcmread(str(f), stop_before_pixels=True)
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if not per_frame:
        return None
    shared = (ds.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]
    n = int(ds.get("NumberOfFrames") or 1)
    if len(per_frame) != n:
        raise FormatError(f"{p}: multi-frame DICOM {f.name} declares {n} frames but describes {len(per_frame)} "
                          "in its Per-Frame Functional Groups; the file is damaged")

    def value(i: int, sequence: str, keyword: str, default: Any = None) -> Any:
        for group in (per_frame[i], shared):
            items = group.get(sequence)
            if items and keyword in items[0] and items[0][keyword].value not in (None, ""):
                return items[0][keyword].value
        found = ds.get(keyword)
        return default if found in (None, "") else found

    def floats(i: int, sequence: str, keyword: str, size: int, what: str) -> np.ndarray:
        found = value(i, sequence, keyword)
        try:
            numbers = np.array([float(v) for v in found], dtype=np.float64)
        except (TypeError, ValueError):
            numbers = np.zeros(0)
        if numbers.size != size or not np.all(np.isfinite(numbers)):
            raise FormatError(f"{p}: multi-frame DICOM {f.name}: frame {i + 1} has no valid {what} ({keyword} "
                              f"{found!r}); where its slices lie is unknown")
        return numbers

    positions = np.array([floats(i, "PlanePositionSequence", "ImagePositionPatient", 3, "position")
                          for i in range(n)])
    orientations = np.array([floats(i, "PlaneOrientationSequence", "ImageOrientationPatient", 6, "orientation")
                             for i in range(n)])
    spacings = np.array([floats(i, "PixelMeasuresSequence", "PixelSpacing", 2, "pixel spacing") for i in range(n)])
    for name, values, tol in (("orientation", orientations, 1e-3), ("pixel spacing", spacings, 1e-4)):
        off = np.flatnonzero(np.abs(values - values[0]).max(axis=1) > tol)
        if off.size:
            what = "not parallel" if name == "orientation" else "not of one pixel spacing"
            raise FormatError(f"{p}: the frames of multi-frame DICOM {f.name} are {what}: frame 1 has {name} "
                              f"{_numbers(values[0])}, frame {off[0] + 1} {_numbers(values[off[0]])} (several "
                              "stacks or a localiser in one file); Mamba-HoME reads one 3D volume of parallel "
                              "slices - export the stack alone")
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 1e-3 or n < 2:
        raise FormatError(f"{p}: multi-frame DICOM {f.name} has {n} frame(s) with orientation "
                          f"{_numbers(orientations[0])}; expected a 3D volume of parallel slices")
    row, col, normal = (v / np.linalg.norm(v) for v in (row, col, normal))
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > max(0.01 * step, 1e-3))
    if step <= 1e-3 or bad.size:
        i = int(bad[0]) if bad.size and step > 1e-3 else int(np.argmin(gaps))
        a, b = int(order[i]) + 1, int(order[i + 1]) + 1
        raise FormatError(f"{p}: the frames of multi-frame DICOM {f.name} are not evenly spaced: frames {a} and {b} "
                          f"lie {gaps[i]:.3g} mm apart along the slice normal, the others {step:.3g} mm (a missing "
                          "frame, or several echoes, phases or stacks in one file); read as one volume its slices "
                          "would be misplaced - export one evenly spaced stack")
    ordered = positions[order]
    stride = (ordered[-1] - ordered[0]) / (n - 1)
    off_line = np.linalg.norm(ordered - (ordered[0] + np.outer(np.arange(n), stride)), axis=1)
    pixel = spacings[0]  # (between rows, between columns) = (along the column direction, along the row direction)
    if off_line.max() > 0.1 * pixel.min():
        k = int(np.argmax(off_line))
        raise FormatError(f"{p}: the frames of multi-frame DICOM {f.name} do not lie on one line: frame "
                          f"{int(order[k]) + 1} is {off_line[k]:.3g} mm off the line from the first to the last "
                          "slice; read as one volume its slices would be misplaced")
    # as for a series (_tilted_affine): a tilted stack keeps its step between positions (a sheared grid), a
    # straight one the normal, so rounding in the position tags does not shear a plain volume
    drift = np.linalg.norm(stride - np.dot(stride, normal) * normal) * (n - 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row * pixel[1], col * pixel[0]
    lps[:3, 2] = stride if drift > 0.1 * pixel.min() else normal * float(np.dot(stride, normal))
    lps[:3, 3] = ordered[0]

    slopes = np.array([float(value(i, "PixelValueTransformationSequence", "RescaleSlope", 1.0)) for i in range(n)])
    intercepts = np.array([float(value(i, "PixelValueTransformationSequence", "RescaleIntercept", 0.0))
                           for i in range(n)])
    slopes[slopes == 0] = 1.0  # as GDCM: a zero slope is a writer's mistake, not a blank image
    rows, cols = int(ds.Rows), int(ds.Columns)
    check_claimed_size(p, [cols, rows, n], max(1, int(ds.get("BitsAllocated") or 16) // 8))
    full = pydicom.dcmread(str(f))
    try:
        stored = full.pixel_array.reshape(n, rows, cols)
        from_gdcm = False
    except Exception as exc:  # a compression pydicom has no decoder for here: GDCM decodes it
        if np.ptp(slopes) or np.ptp(intercepts):
            raise FormatError(f"{p}: multi-frame DICOM {f.name} rescales each frame differently and its "
                              f"compression ({full.file_meta.get('TransferSyntaxUID', '?')}) cannot be decoded "
                              f"frame by frame here ({type(exc).__name__}: {exc}); export it uncompressed") from exc
        with _keep_locale():
            image = reader.Execute()  # GDCM decodes and applies the one rescale itself
        stored = _sitk_frames(image, n, rows, cols)
        from_gdcm = True
    integral = np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts))
    dtype = stored.dtype if from_gdcm else (np.int32 if integral else np.float32)
    data = np.empty((cols, rows, n), dtype=dtype)
    for k, i in enumerate(order):  # frame (row, column) -> engine (i, j), frames in order along the normal
        frame = stored[i] if from_gdcm else stored[i].astype(np.float64) * slopes[i] + intercepts[i]
        data[:, :, k] = frame.T
    if dtype == np.int32 and data.size and -32768 <= data.min() and data.max() <= 32767:
        data = data.astype(np.int16)
    return data, _LPS @ lps


def _sitk_frames(image: Any, n: int, rows: int, cols: int) -> np.ndarray:
    """A SimpleITK image's voxels as ``(frame, row, column)``."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image).reshape(n, rows, cols)


def _numbers(values: Any) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _dicom_series_summary(folder: Path, uid: str) -> str:
    """``'AX CT' CT, 20 files, e.g. IM0001.dcm (UID ...)``: what tells one series of a folder from another."""
    import SimpleITK as sitk

    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    if not files:
        return f"series {uid}"
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    described = []
    try:
        with _keep_locale():
            reader.ReadImageInformation()
        for tag in ("0008|103e", "0008|0060"):
            if reader.HasMetaDataKey(tag) and reader.GetMetaData(tag).strip():
                described.append(repr(reader.GetMetaData(tag).strip()) if tag == "0008|103e"
                                 else reader.GetMetaData(tag).strip())
    except Exception:  # the listing still names the files
        pass
    count = f"{len(files)} file{'s' if len(files) != 1 else ''}"
    return ", ".join([" ".join(described)] * bool(described) + [f"{count}", f"e.g. {Path(files[0]).name} (UID {uid})"])


def _tilted_affine(p: Path, image: Any, reader: Any, files: Any) -> np.ndarray:
    """RAS affine of a series whose slices do not step along their normal (CT gantry tilt): ITK stacks them
    along the normal, shifting every slice in-plane by the tilt (centimetres over a scan, silently). The slice
    axis is then the step between Image Positions, a sheared grid that puts every voxel where the scanner did;
    :func:`engine.io.save_volume` refuses NIfTI for it and names NRRD, which holds it."""
    affine = _itk_affine(image)
    try:
        first, last = (np.array([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")[:3]])
                       for i in (0, len(files) - 1))
    except Exception:  # no Image Position (Patient): ITK's own stacking is all there is
        return affine
    step = (last - first) / (len(files) - 1)
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    drift = np.linalg.norm(step - np.dot(step, normal) * normal) * (len(files) - 1)
    # below a tenth of an in-plane voxel over the whole scan, ITK's orthogonal grid is as good and stays
    # writable as NIfTI; rounding in the position tags must not turn a plain series into a sheared one
    if drift <= 0.1 * min(image.GetSpacing()[:2]):
        return affine
    affine[:3, 2] = _LPS[:3, :3] @ step
    return affine


def _looks_like_dicom_file(f: Path, suffixes: Tuple[str, ...] = DICOM_SUFFIXES + (".dicom",)) -> bool:
    """A name ending in one of ``suffixes`` (default ``.dcm``/``.ima``/``.dicom``), or the DICOM part-10 magic
    ``DICM`` at byte 128 (False where the file cannot be read)."""
    if f.suffix.lower() in suffixes:
        return True
    try:
        with open(f, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _dicom_series_uid(f: Path) -> Optional[str]:
    """The file's Series Instance UID, or None where its header cannot be read (truncated, corrupt, empty)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(f))
    try:
        with _keep_locale():
            reader.ReadImageInformation()
        return reader.GetMetaData("0020|000e").strip() if reader.HasMetaDataKey("0020|000e") else ""
    except Exception:
        return None


def _refuse_unread_dicom_files(p: Path, folder: Path, series: Any, uid: str) -> None:
    """Refuse a series folder holding DICOM files that GDCM put in no series although they are broken slices
    (header unreadable) or slices of the series being read: the series would be read without them, on a grid
    with fewer slices than the scan, silently. A DICOMDIR, and objects of other series (structured reports,
    presentation states: files an export puts beside the images), stay ignored."""
    import SimpleITK as sitk

    listed = set()
    for other in series:
        listed.update(Path(f).resolve() for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), other))
    unread = sorted(f for f in folder.iterdir()
                    if f.is_file() and f.resolve() not in listed and f.name.upper() != "DICOMDIR"
                    and _looks_like_dicom_file(f) and _dicom_series_uid(f) in (None, uid.strip()))
    if unread:
        names = ", ".join(f.name for f in unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
        raise FormatError(f"{p}: {len(unread)} DICOM file(s) in {folder} cannot be read as part of any series "
                          f"({names}): corrupt, truncated or empty; the series would be read without them - "
                          "restore or remove them")


def _refuse_uneven_slices(p: Path, image: Any, reader: Any, files: Any) -> None:
    """Refuse a series whose slice positions are not evenly spaced (a missing slice, duplicates): ITK would
    spread the slices evenly between the first and the last, placing every one after a gap wrongly."""
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    points, orientations = [], []
    for i in range(len(files)):
        try:
            points.append([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")[:3]])
            orientations.append([float(v) for v in reader.GetMetaData(i, "0020|0037").split("\\")[:6]])
        except Exception:  # no Image Position / Orientation (Patient) on a slice: nothing to check against
            return
    tilted = np.flatnonzero(np.abs(np.asarray(orientations) - orientations[0]).max(axis=1) > 1e-3)
    if tilted.size:  # ITK takes the first slice's orientation for all
        i = int(tilted[0])
        raise FormatError(f"{p}: DICOM slices are not parallel: {Path(files[0]).name} has orientation "
                          f"{_numbers(orientations[0])}, {Path(files[i]).name} {_numbers(orientations[i])} (a "
                          "localiser or several stacks in one series); read as one volume its slices would be "
                          "misplaced - split the series")
    # in order along the normal: with two slices at one position GDCM falls back to the files' names for the order,
    # and gaps measured in that order named slices far apart as a "missing slice"
    order = np.argsort(np.asarray(points) @ normal, kind="stable")
    points = np.asarray(points)[order]
    files = [files[int(i)] for i in order]
    positions = points @ normal
    if len(files) > 1:
        gaps = np.diff(positions)
        spacing = float(np.median(gaps[gaps > 1e-3])) if np.any(gaps > 1e-3) else 0.0
        same = np.flatnonzero(gaps <= max(1e-3, 0.01 * spacing))
        if same.size:
            i = int(same[0])
            raise FormatError(f"{p}: DICOM slices {Path(files[i]).name} and {Path(files[i + 1]).name} lie at the same "
                              f"position ({positions[i]:.4g} mm along the slice normal): a duplicated slice, or "
                              "several series, echoes or phases in one folder; read as one volume its slices would be "
                              "misplaced - remove the duplicate or split the series")
    if len(files) > 2:  # ITK places each slice on the line from the first to the last: one off it is misplaced
        # where each slice's own position along the normal puts it on that line (not its index: a tilted series with
        # a missing slice was refused as one slice "beside the line" instead of as the gap it has)
        line = points[0] + np.outer((positions - positions[0]) / (positions[-1] - positions[0]), points[-1] - points[0])
        off = np.linalg.norm(points - line - np.outer(positions - line @ normal, normal), axis=1)
        if off.max() > 0.1 * min(image.GetSpacing()[:2]):
            i = int(np.argmax(off))
            raise FormatError(f"{p}: DICOM slice {Path(files[i]).name} lies {off[i]:.3g} mm beside the line from the "
                              "first slice to the last; read as one volume it would be misplaced")
    gaps = np.diff(positions)
    if gaps.size == 0:
        return
    step = float(np.median(np.abs(gaps)))
    bad = np.flatnonzero(np.abs(np.abs(gaps) - step) > max(0.01 * step, 1e-3))
    if step <= 1e-6 or bad.size:
        i = int(bad[0]) if bad.size else 0
        raise FormatError(f"{p}: DICOM slices are not evenly spaced: {Path(files[i]).name} and "
                          f"{Path(files[i + 1]).name} lie {abs(gaps[i]):.3g} mm apart, the others {step:.3g} mm "
                          "(a missing slice, or several series or echoes in one folder); read as one volume "
                          "every slice after the gap would be misplaced - restore the missing files or split "
                          "the series")


def _read_mgh(p: Path) -> RawVolume:
    import gzip

    gz = None
    try:
        if suffix_of(p) == ".mgz":
            # one gzip stream for header, voxels and tags, read on to its end afterwards, as a .nii.gz is: nibabel
            # stops before the trailer, and only the trailer's CRC and length tell a flipped bit or a cut file
            gz = gzip.open(p, "rb")
        img = nib_load(p, fileobj=gz)
        check_nifti_like_size(p, img)
        data = np.asanyarray(img.dataobj)
        if gz is not None:
            check_gzip_end(gz, p, data.nbytes)
        header = img.header.copy()
    except FormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - gzip's and zlib's words for a damaged file, else _guarded's
        damage = gzip_damage(exc) if gz is not None else None
        if damage is None:
            raise
        raise FormatError(f"{p}: cannot read this {suffix_of(p)} file: {damage}") from exc
    finally:
        if gz is not None:
            gz.close()
    return RawVolume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=header)


def check_nifti_like_size(p: Path, img: Any) -> None:
    """:func:`check_claimed_size` for a nibabel image (NIfTI, MGH) before its data is read."""
    header = img.header
    try:
        shape = header.get_data_shape()
        itemsize = header.get_data_dtype().itemsize
        offset = int(img.dataobj.offset)
    except Exception:  # noqa: BLE001 - nibabel says what is wrong when it reads
        return
    size = p.stat().st_size
    with open(p, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if gz:
        check_claimed_size(p, shape, itemsize, compressed=size)
    else:
        check_claimed_size(p, shape, itemsize, stored=size - offset)


# ----------------------------------------------------------------------------- writing
def raw_writer(path: PathLike, array: np.ndarray, affine: np.ndarray,
               segments: Optional[List[Dict[str, Any]]] = None,
               modality: Optional[str] = None) -> Callable[[str], Any]:
    """``write(tmp_path)`` that writes a 3D array with a RAS affine in the format named by ``path``'s
    suffix (the choice is made on ``path``, so the temporary name's suffix does not matter).

    Args:
        path: ``.nrrd``, ``.nhdr``, ``.seg.nrrd``, ``.mha``, ``.mhd``, ``.mgz`` or ``.mgh``.
        array: ``(I, J, K)`` array in the affine's voxel order (already of the dtype to store).
        affine: ``(4, 4)`` voxel-to-world RAS+ matrix.
        segments: for ``.seg.nrrd``: ``[{"value", "name", "color"}]``; values present in ``array``
            without an entry get a segment named ``label <value>``.
        modality: written as the NRRD ``modality`` key / MetaImage ``Modality`` when given.

    Raises:
        FormatError: unsupported suffix or array not 3D.
    """
    p = Path(path)
    suffix = suffix_of(p)
    array = np.asarray(array)
    if array.ndim != 3:
        raise FormatError(f"{p}: can write only a 3D array, got shape {array.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if suffix == ".seg.nrrd":
        return lambda tmp: _write_seg_nrrd(tmp, array, affine, segments)
    if suffix == ".nrrd":
        return lambda tmp: _write_nrrd(tmp, array, affine, modality)
    if suffix in ITK_SUFFIXES:
        return lambda tmp: _write_itk(tmp, array, affine, modality)
    if suffix in MGH_SUFFIXES:
        return lambda tmp: _write_mgh(tmp, array, affine)
    if suffix == ".nhdr":
        if not p.name.isascii():  # pynrrd then failed with a UnicodeEncodeError after the data file was written
            raise FormatError(f"{p}: a .nhdr header names its data file, and NRRD headers are ASCII: give the file a "
                              "name of ASCII letters, digits and punctuation, or save it as .nrrd (one file, any "
                              "name)")
        return lambda tmp: _write_nrrd(tmp, array, affine, modality, detached=True)
    raise FormatError(f"{p}: cannot write '{suffix or p.name}' files; use .nii.gz, .nrrd, .nhdr, "
                      ".seg.nrrd, .mha, .mhd or .mgz")


def detached_data_file(path: PathLike) -> Optional[Path]:
    """The data file :func:`raw_writer` puts beside a detached header ``path``, or None for the other suffixes.

    ``<stem>.zraw`` for ``.mhd`` (ITK's MetaImage writer, compressed) and ``<stem>.raw.gz`` for ``.nhdr`` (pynrrd,
    gzip), whatever the case of the suffix (``engine.io.save_volume`` has the header written under the lower-case
    suffix these writers expect and renamed afterwards). That file is an output too: ``engine.io.save_volume`` and
    ``predict`` keep it when it exists (unless overwriting) and never let it replace an input's file.
    """
    p = Path(path)
    suffix = suffix_of(p)
    if suffix not in DETACHED_SUFFIXES:
        return None
    stem = p.name[: -len(suffix)]
    return p.with_name(stem + (".zraw" if suffix == ".mhd" else ".raw.gz"))


def written_files(path: PathLike) -> List[Path]:
    """Every file a volume written to ``path`` consists of: ``path``, and its data file for a detached header."""
    data = detached_data_file(path)
    return [Path(path)] + ([data] if data is not None else [])


# The most data files one header is taken to name (a one-file-per-slice series has one per slice).
_MAX_DATA_FILES = 100_000


def volume_files(path: PathLike) -> List[Path]:
    """The files a volume on disk is made of: ``path`` itself and, for a header that keeps its voxels elsewhere
    (``.mhd``/``.mha`` ``ElementDataFile``, NRRD ``data file``, including ``LIST`` and numbered series), the data
    files it names; a relative name is taken beside the header, and, for a header reached through a symbolic link,
    beside the file it links to as well. What the header names is listed whether or not it exists or would be read.

    Used to keep an input whole: an output must not be any of these files (an ``a.mhd`` whose data is ``b.zraw`` is
    destroyed by writing ``b.mhd``, whose data file is ``b.zraw`` too).
    """
    p = Path(path)
    files = [p]
    suffix = suffix_of(p)
    if suffix not in NRRD_SUFFIXES + ITK_SUFFIXES or not p.is_file():
        return files
    try:
        with open(p, "rb") as f:
            blob = f.read(1 << 16)
    except OSError:
        return files
    lines = [line.rstrip("\r") for line in blob.decode("latin-1").split("\n")]
    names: List[str] = []
    for i, line in enumerate(lines):
        if suffix in NRRD_SUFFIXES:
            if not line.strip() and i > 0:
                break  # the end of a NRRD header
            key, sep, value = line.partition(":")
            if sep and not value.startswith("=") and key.strip().lower() in ("data file", "datafile"):
                names = _data_file_names(value, lines[i + 1:])
                break
        else:
            key, sep, value = line.partition("=")
            if not sep:
                break  # past the MetaImage header (binary data of a LOCAL file)
            if key.strip().lower() == "elementdatafile":
                if value.strip().upper() != "LOCAL":
                    names = _data_file_names(value, lines[i + 1:])
                break
    folders = [p.parent]
    if p.is_symlink():
        folders.append(Path(os.path.realpath(p)).parent)
    for name in names:
        rel = Path(name)
        for folder in folders[: 1 if rel.is_absolute() else None]:
            data = rel if rel.is_absolute() else folder / rel
            if data not in files:
                files.append(data)
    return files


def _data_file_names(value: str, following: List[str]) -> List[str]:
    """The file names a header's data file field names: one name (which may hold spaces), ``LIST`` (the names on the
    lines that follow), or a printf pattern with its range (``slice%03d.raw 1 40 1``)."""
    name = value.strip()
    parts = name.split()
    if not parts:
        return []
    if parts[0].upper() == "LIST":
        return [line.strip() for line in following if line.strip()][:_MAX_DATA_FILES]
    if len(parts) in (4, 5) and "%" in parts[0] and all(t.lstrip("+-").isdigit() for t in parts[1:4]):
        first, last, step = (int(t) for t in parts[1:4])
        if step == 0:
            return []
        try:
            return [parts[0] % n for n in range(first, last + (1 if step > 0 else -1), step)][:_MAX_DATA_FILES]
        except (TypeError, ValueError):
            return [name]
    return [name]


def _lps_parts(affine: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    lps = _LPS @ affine
    return lps[:3, :3], lps[:3, 3]


def _write_nrrd(path: str, array: np.ndarray, affine: np.ndarray, modality: Optional[str],
                detached: bool = False) -> None:
    import nrrd

    linear, origin = _lps_parts(affine)
    header: Dict[str, Any] = {
        "space": "left-posterior-superior",
        "space directions": linear.T,  # one row per array axis
        "space origin": origin,
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    if modality:
        header["modality"] = str(modality)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    nrrd.write(path, np.ascontiguousarray(array), header, index_order="F", detached_header=detached)


def _write_seg_nrrd(path: str, array: np.ndarray, affine: np.ndarray,
                    segments: Optional[List[Dict[str, Any]]]) -> None:
    import slicerio

    array = np.asarray(array)
    known = {int(s["value"]): s for s in (segments or [])}
    present = [int(v) for v in np.unique(array) if v != 0]
    seg = {"voxels": array, "ijkToLPS": _LPS @ affine, "segments": []}
    for value in sorted(set(present) | set(known) - {0}):
        info = known.get(value, {})
        entry: Dict[str, Any] = {"id": f"Segment_{value}", "name": str(info.get("name") or f"label {value}"),
                                 "labelValue": value, "layer": 0}
        if info.get("color") is not None:
            entry["color"] = [float(c) for c in info["color"]][:3]
        if value in present:
            idx = np.nonzero(array == value)
            entry["extent"] = [int(v) for axis in idx for v in (axis.min(), axis.max())]
        else:
            entry["extent"] = [0, -1, 0, -1, 0, -1]
        seg["segments"].append(entry)
    slicerio.write_segmentation(path, seg)


def _write_itk(path: str, array: np.ndarray, affine: np.ndarray, modality: Optional[str]) -> None:
    import SimpleITK as sitk

    if array.dtype == bool:
        array = array.astype(np.uint8)
    linear, origin = _lps_parts(affine)
    spacing = np.linalg.norm(linear, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (linear / spacing[None, :]).ravel()])
    image.SetOrigin([float(v) for v in origin])
    if modality:
        image.SetMetaData("Modality", f"MET_MOD_{str(modality).upper()}")
    suffix = suffix_of(path)
    name = Path(path).name
    if name.endswith(suffix):
        with _keep_locale():
            sitk.WriteImage(image, path, useCompression=True)
        return
    # ITK's MetaImage writer knows its suffixes in lower case only: given "X.MHA" it writes a detached "X.mhd" and
    # "X.zraw" instead of the one file asked for (engine.io writes through temporary names in lower case)
    if suffix == ".mhd":
        raise FormatError(f"{path}: a detached MetaImage header is written under a lower-case .mhd name (then "
                          "renamed, as engine.io.save_volume does)")
    tmp = Path(path).with_name(f".{name[: -len(suffix)]}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        with _keep_locale():
            sitk.WriteImage(image, str(tmp), useCompression=True)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _write_mgh(path: str, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    dtype = array.dtype
    if dtype == bool or (np.issubdtype(dtype, np.integer) and dtype not in (np.uint8, np.int16, np.int32)):
        array = array.astype(np.int32)
    elif np.issubdtype(dtype, np.floating) and dtype != np.float32:
        array = array.astype(np.float32)
    nib.save(nib.MGHImage(array, affine), path)
