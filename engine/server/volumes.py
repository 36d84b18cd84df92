"""Turning an uploaded body into an engine :class:`~engine.io.Volume`: NIfTI bytes, NRRD bytes, or a pack.

Uploads are written to a private temporary folder only as long as the reader needs a file; error
messages name the client's file name, never a server path.
"""
from __future__ import annotations

import gzip
import math
import re
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from engine.preprocess import dims_text as _by, network_grid_shape, thin_volume_message
from engine.io import (NAN_BACKGROUND, Volume, VolumeError, check_finite_voxels, load_volume, nifti_affine_mm,
                       read_grid, refuse_empty_axis)
from mambahome_client.wire import PackError, PackTooLargeError, unpack_array

# Letters and digits of any script stay ("Rückenmark", "脊髓"): only folders, control and odd characters go.
_SAFE_NAME = re.compile(r"[^\w. -]+")


def display_name(name: Optional[str], default: str) -> str:
    """A client-given file name reduced to a harmless label (no folders, no odd characters)."""
    base = Path(str(name or "")).name
    base = _SAFE_NAME.sub("_", base).strip(" .")[:100]
    return base or default


def _scrub(message: str, path: Path, name: str) -> str:
    """The message with the server's temporary path replaced by the client's file name."""
    return message.replace(str(path), name).replace(str(path.parent), "")


class TooManyVoxelsError(VolumeError):
    """A volume over the server's ``--max-voxels`` (422: a setting of the server, not a broken upload)."""


def too_many_voxels(name: str, shape, max_voxels: int) -> TooManyVoxelsError:
    shape = tuple(int(s) for s in shape)
    count = math.prod(shape)
    # a pack's header may claim axes of thousands of digits: str() of their product (over 4300 digits) raises
    said = str(count) if count < 10**30 else f"~2^{count.bit_length() - 1}"
    return TooManyVoxelsError(f"{name}: {said} voxels {shape!r:.200} is more than this server accepts "
                              f"({max_voxels} voxels, its `mambahome serve --max-voxels`); crop or downsample it")


def check_network_voxels(name: str, shape, affine, metadata: dict, model_id: str, max_voxels: int) -> None:
    """Refuse a volume whose grid at the model's voxel size (:func:`engine.preprocess.network_grid_shape`) is over
    ``max_voxels``.

    ``--max-voxels`` bounds what a session holds, but a model runs on the volume resampled to its own spacing: a
    10 x 10 x 10 upload whose header says 150 mm voxels becomes 1000 x 1000 x 1000 at the bundled model's 1.5 mm, and
    segmenting it grew the server by 12 GB (a header saying 30 mm held the GPU for 270 s). Checked from the geometry
    alone, before any model loads and without the GPU lock.

    Args:
        name: what the volume is called in the message (the client's file name, a case id).
        shape, affine: its grid.
        metadata: the model's checkpoint metadata (its ``preprocessing``).
        model_id: the model's id, for the message.
        max_voxels: the server's ``--max-voxels``.

    Raises:
        TooManyVoxelsError: naming the volume's grid and spacing, the model's spacing, the resampled grid and the limit.
    """
    preprocessing = metadata.get("preprocessing") if isinstance(metadata, dict) else None
    grid = network_grid_shape(shape, affine, preprocessing)
    count = math.prod(grid)
    if count <= max_voxels:
        return
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    target = (preprocessing or {}).get("target_spacing")
    said = str(count) if count < 10**30 else f"~2^{count.bit_length() - 1}"
    raise TooManyVoxelsError(
        f"{name}: its {_by(shape[:3], 'd')} voxels at {_by(spacing, 'g')} mm spacing become "
        f"{_by(grid, 'd')} = {said} voxels at the {_by(target or (), 'g')} mm spacing of model {model_id!r} (the "
        f"grid the model runs on), more than this server accepts ({max_voxels} voxels, its `mambahome serve "
        "--max-voxels`); check the voxel spacing in the file's header (a header in the wrong unit says voxels far "
        "larger than a scan's), or crop or downsample the volume")


MAX_AFFINE_MM = 1e6
"""The largest magnitude an upload's voxel-to-world affine may hold (a voxel size or a position, in mm: a kilometre).
Larger values are no scan's: a matrix scaled by 1e300 overflowed the engine's spacing (inf) and was refused as
"singular (axes are not independent)", which it is not."""


def check_affine_range(affine, name: str, what: str = "the voxel-to-world affine") -> None:
    """Refuse an affine holding a value that is not finite or is beyond :data:`MAX_AFFINE_MM`, saying so (before the
    engine's checks, whose arithmetic such values overflow). Entries that are not numbers are left to those checks."""
    try:
        values = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError):
        return
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise VolumeError(f"{name}: {what} holds values that are not finite (NaN or infinite); send the volume's "
                          "real voxel-to-world matrix (mm)")
    largest = float(np.max(np.abs(values)))
    if largest > MAX_AFFINE_MM:
        raise VolumeError(f"{name}: {what} holds {largest:.3g}, out of range: voxel sizes and positions are in mm and "
                          f"must lie within +-{MAX_AFFINE_MM:g} mm; send the volume's real voxel-to-world matrix")


def _check_size(shape, max_voxels: int, name: str) -> None:
    shape = tuple(int(s) for s in shape)
    refuse_empty_axis(name, shape[:3])
    if math.prod(shape) > max_voxels:  # Python integers: numpy's int64 product wraps for absurd headers
        raise too_many_voxels(name, shape, max_voxels)


# A pack is a napari layer or a Slicer node sent as an array: there is no file to fix, but the same way out.
NAN_PACK_FIX = (f"; in the viewer's volume, before sending it, {NAN_BACKGROUND}, or load the scan again from a file "
                "without them")


def _refuse_thin(shape, name: str) -> None:
    # at the upload, not at the first Segment or prompt: a client was left holding a session it could do nothing with
    thin = thin_volume_message(name, shape, "image")
    if thin:
        raise VolumeError(thin)


def _finish(data: np.ndarray, affine: np.ndarray, name: str, header=None, nan_fix: Optional[str] = None) -> Volume:
    """A Volume of float32 data, or of the integer data as uploaded; NaN/inf refused.

    Integer images (an int16 CT) stay as they are: the session turns them into float32 only when a
    model first needs them (:attr:`engine.server.state.Session.volume`), which halves what an idle
    session holds and keeps the conversion out of the upload. Only float input can hold NaN/inf.
    """
    data = np.asarray(data)
    _refuse_thin(data.shape, name)
    floating = not np.issubdtype(data.dtype, np.integer)
    try:
        vol = Volume.from_array(data.astype(np.float32, copy=False) if floating else data, affine,
                                header=header, path=None)
    except VolumeError as exc:
        raise VolumeError(str(exc).replace("<in-memory volume>", name)) from None
    if floating:
        check_finite_voxels(vol.data, name, fix=nan_fix)
    return vol


MAX_NIFTI_EXTENSION_BYTES = 64 * 2**20
"""The most bytes of NIfTI extensions (between the header and the voxels) an upload may hold. nibabel reads every
extension into memory whole, and a gzipped file's are gigabytes of zeros in a few hundred KB: a 1.4 MB upload grew the
server by 1.5 GB, and a session kept them in its header. Real extensions (DICOM or AFNI headers, XML) are KB to MB."""


def _check_nifti_offsets(path: Path, name: str) -> None:
    """Refuse a NIfTI whose voxels start so far past its header, or whose extensions run to the end of the stream, that
    reading it means inflating (and, for extensions, holding) more than :data:`MAX_NIFTI_EXTENSION_BYTES`; the voxels
    themselves are bounded by the header's shape (``--max-voxels``). Only the header is inflated here."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            head = f.read(544)
    except (OSError, EOFError, zlib.error):
        return  # not gzip after all: nibabel says what is wrong
    for order in ("<", ">"):
        if len(head) >= 352 and struct.unpack(order + "i", head[:4])[0] == 348:  # NIfTI-1
            end, (offset,) = 348, struct.unpack(order + "f", head[108:112])
            break
        if len(head) >= 544 and struct.unpack(order + "i", head[:4])[0] == 540:  # NIfTI-2
            end, (offset,) = 540, struct.unpack(order + "q", head[168:176])
            break
    else:
        return  # no NIfTI header: nibabel refuses it
    extensions = head[end] != 0
    limit = end + 4 + MAX_NIFTI_EXTENSION_BYTES
    if not math.isfinite(offset) or offset > limit:
        raise VolumeError(f"{name}: its header puts the voxels {offset:.0f} bytes into the file (vox_offset), past "
                          f"its {end}-byte header and at most {MAX_NIFTI_EXTENSION_BYTES // 2**20} MiB of NIfTI "
                          "extensions; the file is broken or made to exhaust the server's memory, and was not read")
    if extensions and offset < end + 4:
        # nibabel then reads extensions up to the end of the (inflated) stream, however long it is
        raise VolumeError(f"{name}: its header says NIfTI extensions follow it but puts the voxels at {offset:.0f} "
                          f"(vox_offset), inside the {end}-byte header; the file is broken and was not read")


def volume_from_nifti_bytes(body: bytes, name: str, max_voxels: int) -> Volume:
    """Read NIfTI (plain or gzipped) bytes through :func:`engine.io.load_volume`."""
    suffix = ".nii.gz" if body[:2] == b"\x1f\x8b" else ".nii"
    with tempfile.TemporaryDirectory(prefix="mambahome-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(body)
        _check_nifti_offsets(path, name)
        try:
            import nibabel as nib

            img = nib.load(str(path))
            _check_size(img.shape[:3], max_voxels, name)
            # float32 headers hold up to 3e38: "valid" to the engine. Checked in mm, as the engine places the file (a
            # header in metres or microns converted, engine.io.nifti_affine_mm), not in the header's own unit
            check_affine_range(nifti_affine_mm(img.header, img.affine), name)
            read_grid(path)  # a 4D series is refused from its header: it was read whole (a 1 MB upload, 2 GB) first
            vol = load_volume(path)
            _refuse_thin(vol.data.shape, name)
        except TooManyVoxelsError:  # names the client's file only, and keeps its 422
            raise
        except VolumeError as exc:
            raise VolumeError(_scrub(str(exc), path, name)) from None
        except Exception as exc:  # nibabel's header errors
            raise VolumeError(_scrub(f"{name}: not a readable NIfTI file ({type(exc).__name__}: {exc})",
                                     path, name)) from None
    vol.path = None
    return vol


def volume_from_nrrd_bytes(body: bytes, name: str, max_voxels: int) -> Volume:
    """Read attached-data ``.nrrd`` bytes through :func:`engine.io.load_volume` (LPS/RAS to the engine's
    RAS affine); the header alone is read first so an oversized or detached upload is refused unread."""
    import nrrd

    with tempfile.TemporaryDirectory(prefix="mambahome-upload-") as tmp:
        path = Path(tmp) / "upload.nrrd"
        path.write_bytes(body)
        try:
            with open(path, "rb") as fh:
                header = nrrd.read_header(fh)
                data_start = fh.tell()
            _check_size([int(s) for s in header.get("sizes", [])], max_voxels, name)
            if str(header.get("data file", header.get("datafile", ""))).strip():
                raise VolumeError(f"{name}: detached NRRD data files are not accepted; send a single .nrrd")
            _check_nrrd_geometry_range(header, name)
            _check_nrrd_inflated_size(body, header, data_start, name)
            vol = load_volume(path)
            _refuse_thin(vol.data.shape, name)
        except TooManyVoxelsError:  # names the client's file only, and keeps its 422
            raise
        except VolumeError as exc:
            raise VolumeError(_scrub(str(exc), path, name)) from None
        except Exception as exc:  # pynrrd's header errors
            raise VolumeError(_scrub(f"{name}: not a readable NRRD file ({type(exc).__name__}: {exc})",
                                     path, name)) from None
    vol.path = None
    return vol


class _ViewReader:
    """``read(n)`` over a memoryview, no copy of what is not read: an upload's body may be a gigabyte."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def read(self, size: int) -> memoryview:
        chunk = self.view[self.pos:self.pos + size]
        self.pos += len(chunk)
        return chunk

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int) -> None:
        self.pos = pos


def _check_nrrd_inflated_size(body: bytes, header: dict, data_start: int, name: str) -> None:
    """Refuse a gzip or bzip2 NRRD payload that inflates to more than its header's ``sizes`` and ``type`` (plus its
    ``byte skip``), counted while it inflates, nothing kept (:func:`engine.formats.inflate_bounded`, the bound local
    files get too). pynrrd inflates the whole payload into memory before it compares sizes: a 1 MB gzip payload for
    4x4x4 voxels took a gigabyte, and bzip2 inflates 100 MiB of zeros from 240 bytes. Where pynrrd starts reading is
    followed exactly (``line skip``, ``byte skip``)."""
    import nrrd

    from engine.formats import FormatError, inflate_bounded, skip_lines

    encoding = header.get("encoding")
    if encoding not in ("gzip", "gz", "bzip2", "bz2"):
        return
    try:
        itemsize = np.dtype(nrrd.reader._determine_datatype(header)).itemsize
        expected = math.prod(int(s) for s in header["sizes"]) * itemsize
        line_skip = int(header.get("lineskip", header.get("line skip", 0)))
        byte_skip = int(header.get("byteskip", header.get("byte skip", 0)))
    except Exception:  # noqa: BLE001 - pynrrd says what is wrong with such a header when it reads
        return
    try:
        # one pass over the lines the body holds, whatever `line skip` says (a line at a time took minutes for a
        # 150-byte upload saying 100,000,000)
        payload = _ViewReader(memoryview(body)[data_start:])
        skip_lines(payload, max(line_skip, 0), Path(name), "the upload")
        start = data_start + payload.tell() + max(byte_skip, 0)  # pynrrd skips these before inflating, and after
        # keep=False: a corrupt stream past what was counted is left to pynrrd, which stops there and says so
        inflate_bounded(_ViewReader(memoryview(body)[start:]), encoding, expected + max(byte_skip, 0), name,
                        keep=False, what="the server's memory")
    except FormatError as exc:
        raise VolumeError(str(exc)) from None


def _check_nrrd_geometry_range(header: dict, name: str) -> None:
    """:func:`check_affine_range` on a NRRD header's ``space directions`` and ``space origin`` (a non-spatial axis's
    ``none`` direction, read as NaN, left out)."""
    for key, what in (("space directions", "the NRRD 'space directions'"), ("space origin", "the NRRD 'space origin'")):
        value = header.get(key)
        if value is None:
            continue
        try:
            values = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        rows = values.reshape(-1, values.shape[-1]) if values.ndim else values.reshape(1, 1)
        spatial = rows[~np.all(np.isnan(rows), axis=1)] if key == "space directions" else rows
        check_affine_range(spatial, name, what)


def volume_from_pack(body: bytes, max_voxels: int) -> tuple:
    """A pack with ``affine`` (and optional ``name``, ``modality``) -> ``(Volume, name, modality)``."""
    try:
        array, meta = unpack_array(body, max_bytes=max_voxels * 8)
    except PackTooLargeError as exc:
        raise too_many_voxels("the uploaded pack", exc.shape, max_voxels) from exc
    except PackError as exc:  # the wire module's message, said by the engine (it lies outside engine/)
        raise VolumeError(f"the uploaded pack: {exc}") from exc
    return volume_from_array(array, meta, max_voxels)


def volume_from_array(array: np.ndarray, meta: dict, max_voxels: int) -> tuple:
    """An unpacked pack (array ``(I, J, K)`` and its header with ``affine``) -> ``(Volume, name, modality)``."""
    name = display_name(meta.get("name"), "volume")
    if array.ndim != 3:  # before the voxel count: a 4D pack over the limit was told to crop, not that it is 4D
        raise VolumeError(f"{name}: expected a 3D array, got shape {array.shape}")
    _check_size(array.shape, max_voxels, name)
    if "affine" not in meta:
        raise VolumeError(f"{name}: the pack has no 'affine' (4x4 RAS voxel-to-world matrix)")
    try:
        affine = np.asarray(meta["affine"], dtype=np.float64)
    except (TypeError, ValueError) as exc:  # numpy's "inhomogeneous shape", "could not convert string to float"
        raise VolumeError(f"{name}: the pack's 'affine' must be a 4x4 matrix of numbers (RAS voxel-to-world), "
                          f"got {_short(meta['affine'])}") from exc
    check_affine_range(affine, name, "the pack's 'affine'")
    if affine.shape == (4, 4) and not np.array_equal(affine[3], [0.0, 0.0, 0.0, 1.0]):
        raise VolumeError(f"{name}: the pack's 'affine' must end with the row [0, 0, 0, 1] (a voxel-to-world "
                          f"matrix), got {affine[3].tolist()}")
    vol = _finish(array, affine, name, nan_fix=NAN_PACK_FIX)
    if not meta.get("modality"):
        # A pack has no file tag, but a CT in Hounsfield units is recognised as in an uploaded file
        # (engine.io.load_volume): without it a CT sent from 3D Slicer or Python with no modality went through the
        # model's default intensity rule (MR for the bundled model).
        from engine.formats import guess_modality

        guessed = guess_modality(array)  # the voxels as sent: HU are integers
        vol.modality, vol.modality_source = guessed, ("guessed" if guessed else None)
    return vol, name, meta.get("modality")


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def sniff_upload_format(body: bytes) -> Optional[str]:
    """``nifti``, ``nrrd`` or ``pack`` from an upload's first bytes (a gzipped NIfTI inflated no further than its
    header), or None when they name none of the three."""
    if body[:4] == b"MHPK":
        return "pack"
    head = body[:544]
    if head[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(body[:65536], 544)
        except zlib.error:
            return None
    if head[:4] == b"NRRD":
        return "nrrd"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    return None


def decode_upload(body: bytes, fmt: str, name: Optional[str], max_voxels: int) -> tuple:
    """``(Volume, display name, modality or None)`` from an upload in format ``nifti``, ``nrrd`` or ``pack``."""
    if not body:
        raise VolumeError("the upload is empty")
    fmt = (fmt or "").lower()
    actual = sniff_upload_format(body)
    if fmt in ("nifti", "nrrd", "pack") and actual not in (None, fmt):
        # a client that named the format from a wrong file extension got the other reader's error, which named
        # neither the mix-up nor its fix
        shown = display_name(name, "the upload")
        raise VolumeError(f"{shown}: the upload is {actual.upper() if actual != 'pack' else 'a pack'}, not "
                          f"{fmt.upper() if fmt != 'pack' else 'a pack'} as format={fmt} says; send it with "
                          f"format={actual}")
    if fmt == "pack":
        return volume_from_pack(body, max_voxels)
    label = display_name(name, f"upload.{fmt or 'bin'}")
    if fmt == "nifti":
        return volume_from_nifti_bytes(body, label, max_voxels), label, None
    if fmt == "nrrd":
        return volume_from_nrrd_bytes(body, label, max_voxels), label, None
    raise VolumeError(f"unknown upload format {fmt!r}; use format=nifti, nrrd or pack")
