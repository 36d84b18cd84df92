"""The wire format shared by the MambaHoME server and its clients (numpy and the standard library only).

Arrays travel as one self-describing binary *pack*::

    b"MHPK" | uint32 little-endian length N of the JSON header | N bytes of UTF-8 JSON | payload

The JSON header holds ``dtype`` (numpy little-endian string such as ``"<f4"``), ``shape``, ``codec``
(``"zlib"``, or ``"raw"`` for the array bytes as they are) and any extra fields (geometry, bounding
box, class names). Label maps and masks compress 50-100x; noisy images barely 2x, so large images go
raw where the link is fast (localhost, a LAN tunnel) and compressing would cost more than it saves. Arrays are C-ordered in the engine's voxel order
``(I, J, K)``: the order of a NIfTI file, the transpose of 3D Slicer's ``arrayFromVolume`` (``K, J, I``).
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change of endpoints or packs; client and server must agree."""

PROTOCOL_HEADER = "X-MambaHoME-Protocol"
PACK_MEDIA_TYPE = "application/x-mambahome-pack"
MAGIC = b"MHPK"
MAX_HEADER_BYTES = 1 << 20  # a pack's JSON header (geometry, names, colours) is a few KiB
MAX_NDIM = 8  # volumes are 3D; numpy itself stops at 32 axes with a ValueError that is no PackError
MAX_AXIS = 2**31 - 1  # with a zero axis elsewhere, any axis length passes the byte limit; numpy refuses > 2**63
# dtypes a pack may carry: plain numeric types only (never object arrays, nothing to unpickle).
ALLOWED_DTYPES = frozenset(np.dtype(t).str for t in (
    np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64, np.uint64,
    np.float32, np.float64, np.bool_))

# Colours (RGB 0-1) for label values 1.. when a model names none; value 0 is background.
DEFAULT_PALETTE: List[Tuple[float, float, float]] = [
    (0.90, 0.30, 0.24), (0.18, 0.60, 0.86), (0.95, 0.77, 0.06), (0.15, 0.68, 0.38),
    (0.61, 0.35, 0.71), (0.90, 0.49, 0.13), (0.10, 0.74, 0.61), (0.93, 0.44, 0.64),
]


class PackError(ValueError):
    """Bytes that are not a valid pack (truncated, corrupt, unsupported dtype, too large)."""


class PackTooLargeError(PackError):
    """A pack whose declared array is over ``max_bytes``: the receiver's limit, not a broken pack."""

    def __init__(self, message: str, shape: Tuple[int, ...]) -> None:
        super().__init__(message)
        self.shape = shape


def pack_parts(array: np.ndarray, meta: Optional[Dict[str, Any]] = None, level: int = 1) -> List[Any]:
    """A pack as a list of buffers to send one after the other, without joining them.

    With ``level=0`` the array's own memory is the payload (no copy when ``array`` is C-contiguous and
    little-endian): a 150 MiB CT goes to the socket as it lies in memory.

    Args:
        array: any numeric array (made C-contiguous little-endian); bool is sent as uint8 values.
        meta: JSON-serialisable extra fields (must not use the keys ``dtype``/``shape``/``codec``).
        level: zlib level; 1 is fast and already shrinks label maps by 50-100x; 0 sends the bytes raw.

    Returns:
        ``[head, payload]``: the magic, header length and JSON header, then the payload (bytes, or a
        byte ``memoryview`` of ``array``); :func:`body_size` gives the pack's size.
    """
    arr = np.ascontiguousarray(array)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype.str not in ALLOWED_DTYPES:
        raise PackError(f"cannot pack dtype {arr.dtype}; use a plain numeric dtype")
    header = dict(meta or {})
    header.update(dtype=arr.dtype.str, shape=[int(s) for s in arr.shape], codec="zlib" if level > 0 else "raw")
    head = json.dumps(header, allow_nan=False).encode("utf-8")
    flat = arr.reshape(-1).view(np.uint8)  # a view: C-contiguous
    payload = zlib.compress(flat, level) if level > 0 else memoryview(flat)
    return [b"".join((MAGIC, struct.pack("<I", len(head)), head)), payload]


def body_size(parts: Sequence[Any]) -> int:
    """Total bytes of a list of buffers (what :func:`pack_parts` returns)."""
    return sum(memoryview(p).nbytes for p in parts)


def pack_array(array: np.ndarray, meta: Optional[Dict[str, Any]] = None, level: int = 1) -> bytes:
    """Serialise ``array`` with a JSON header ``meta`` into one pack (see :func:`pack_parts`).

    Args:
        array: any numeric array (made C-contiguous little-endian); bool is sent as uint8 values.
        meta: JSON-serialisable extra fields (must not use the keys ``dtype``/``shape``).
        level: zlib level; 1 is fast and already shrinks label maps by 50-100x; 0 sends the bytes raw.

    Returns:
        the pack bytes.
    """
    return b"".join(pack_parts(array, meta, level))


def _keys_once(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    # JSON readers keep a repeated key's last value without a word: "case_id" twice saved the case under the second
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise PackError(f"pack header names {key[:40]!r} more than once; send each key once")
        seen.add(key)
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise PackError(f"pack header holds {name}, which is not a number in JSON (geometry must be finite)")


def read_pack_header(data: bytes) -> Tuple[Dict[str, Any], int]:
    """The JSON header of a pack and the offset where its compressed payload starts."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise PackError("not a MambaHoME array pack (missing 'MHPK' magic)")
    (n,) = struct.unpack("<I", data[4:8])
    if n > MAX_HEADER_BYTES:
        raise PackError(f"pack header of {n} bytes is over the {MAX_HEADER_BYTES} bytes a header may have")
    if 8 + n > len(data):
        raise PackError("truncated pack: the JSON header is cut off")
    try:
        # NaN/Infinity are Python's extension of JSON: an affine of NaN would place the volume nowhere
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"), parse_constant=_no_constant,
                            object_pairs_hook=_keys_once)
    except PackError:
        raise
    # ValueError: also Python's 4300-digit limit for integers; RecursionError: "[[[[..." nested 100000 deep
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PackError(f"pack header is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(header, dict) or "dtype" not in header or "shape" not in header:
        raise PackError("pack header lacks 'dtype' or 'shape'")
    return header, 8 + n


def _mib(nbytes: int) -> str:
    mib = nbytes // 2**20
    return str(mib) if mib < 10**15 else f"~2^{mib.bit_length() - 1}"  # str() of an int over 4300 digits raises


def _array_spec(header: Dict[str, Any], max_bytes: Optional[int]) -> Tuple[np.dtype, Tuple[int, ...], int]:
    """``(dtype, shape, nbytes)`` a pack header declares, checked before anything is allocated."""
    name, declared = header["dtype"], header["shape"]
    # the exact strings only: np.dtype() parses much more ("f4," * 100000 is a structured dtype that takes a
    # second to build, "(9,9)f8" a sub-array), none of which a pack carries
    if not isinstance(name, str) or name not in ALLOWED_DTYPES:
        raise PackError(f"pack dtype {name!r:.80} is not allowed; a pack carries one of "
                        f"{', '.join(sorted(ALLOWED_DTYPES))}")
    dtype = np.dtype(name)
    if not isinstance(declared, list):
        raise PackError(f"pack shape {declared!r:.80} must be a list of whole numbers")
    # whole numbers only: int(2.5) would silently make another shape of the same bytes
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in declared):
        raise PackError(f"pack shape {declared!r:.80} must be a list of whole numbers")
    if len(declared) > MAX_NDIM:
        raise PackError(f"pack shape has {len(declared)} axes; a pack carries at most {MAX_NDIM}")
    shape = tuple(declared)
    if any(s < 0 for s in shape):
        raise PackError(f"pack shape {shape} has a negative axis")
    nbytes = math.prod(shape) * dtype.itemsize  # Python integers: numpy's int64 product wraps to 0 for huge axes
    if max_bytes is not None and nbytes > max_bytes:
        # // not /: a float of a 600-digit size overflows; the shape's repr is cut, its axes may have 4300 digits
        raise PackTooLargeError(f"array of shape {shape!r:.120} ({_mib(nbytes)} MiB) is larger than the limit "
                                f"{_mib(max_bytes)} MiB", shape)
    # after the limit, which answers an over-large shape in its own words (the server's 422 too_many_voxels)
    if any(s > MAX_AXIS for s in shape):
        raise PackError(f"pack shape {shape!r:.120} has an axis longer than {MAX_AXIS}")
    return dtype, shape, nbytes


def unpack_array(data: bytes, max_bytes: Optional[int] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Inverse of :func:`pack_array`.

    Args:
        data: pack bytes.
        max_bytes: refuse packs whose array would be larger than this (decompression bombs).

    Returns:
        ``(array, meta)``; ``meta`` still holds ``dtype`` and ``shape``.

    Raises:
        PackError: malformed pack, unsupported dtype, size over ``max_bytes``, payload of the wrong size.
    """
    header, start = read_pack_header(data)
    dtype, shape, nbytes = _array_spec(header, max_bytes)
    codec = header.get("codec", "zlib")
    if codec == "raw":
        raw = memoryview(data)[start:]
        if len(raw) != nbytes:
            raise PackError(f"pack payload holds {len(raw)} bytes, expected {nbytes} for shape {shape} {dtype}")
    elif codec == "zlib":
        d = zlib.decompressobj()
        try:
            # max_length stops a decompression bomb while it inflates: never more than the header declared (+1 to
            # tell an over-long payload from an exact one)
            raw = d.decompress(memoryview(data)[start:], nbytes + 1)
        except zlib.error as exc:
            raise PackError(f"pack payload is corrupt ({exc})") from exc
        if len(raw) > nbytes:
            raise PackError(f"pack payload inflates past the size its header declares (expected {nbytes} bytes "
                            f"for shape {shape} {dtype}); decompression stopped there")
        if not d.eof:
            raise PackError(f"pack payload holds {len(raw)} bytes, expected {nbytes} for shape {shape} {dtype} "
                            "(the compressed data is cut off)")
        if len(raw) != nbytes:
            raise PackError(f"pack payload holds {len(raw)} bytes, expected {nbytes} for shape {shape} {dtype}")
        if d.unused_data:
            raise PackError(f"pack has {len(d.unused_data)} bytes after the end of its compressed payload")
    else:
        raise PackError(f"unknown pack codec {codec!r:.80}; this version reads 'zlib' and 'raw'")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    _check_bool(array)
    return array, header


def _check_bool(array: np.ndarray) -> None:
    """numpy keeps a bool byte of 2 as it is: it prints True, yet ``a == True`` is False for it and sums differ, so a
    mask with such bytes would mean one thing to one check and another to the next."""
    if array.dtype == np.bool_ and array.size and int(array.view(np.uint8).max()) > 1:
        raise PackError("pack of dtype bool holds bytes other than 0 and 1")


class PackReceiver:
    """Decodes a pack arriving in pieces (an HTTP body), writing a raw payload straight into its array.

    The header is checked (dtype, shape, ``max_bytes``, and the announced body size when known) as
    soon as it has arrived; a raw payload is then copied once, piece by piece, into an aligned array
    that grows with the bytes that arrived (never allocated at the size the header or Content-Length
    claims: a client claiming 2 GiB and sending a byte holds a byte), never gathered into one ``bytes``
    first. zlib payloads are gathered and decoded by :func:`unpack_array` at the end.

    Args:
        max_bytes: refuse packs whose array would be larger than this.
        total: the whole pack's size in bytes if known (``Content-Length``): checked against the header.

    Usage: ``r = PackReceiver(limit); for piece in body: r.feed(piece); array, meta = r.finish()``.
    """

    def __init__(self, max_bytes: Optional[int] = None, total: Optional[int] = None) -> None:
        self.max_bytes = max_bytes
        self.total = total
        self._prefix = bytearray()
        self._header: Optional[Dict[str, Any]] = None
        self._spec: Optional[Tuple[np.dtype, Tuple[int, ...], int]] = None
        self._raw = False
        self._out: Optional[np.ndarray] = None  # raw payload: the array's bytes, filled up to _filled
        self._filled = 0
        self._pieces: List[bytes] = []  # zlib payload
        self._head = b""
        self._payload_start = 0

    def feed(self, piece: bytes) -> None:
        """Take the next piece of the body (any size, possibly empty)."""
        if not piece:
            return
        if self._header is None:
            self._prefix += piece
            if len(self._prefix) < 8:
                return
            if self._prefix[:4] != MAGIC:
                raise PackError("not a MambaHoME array pack (missing 'MHPK' magic)")
            (n,) = struct.unpack("<I", self._prefix[4:8])
            if n > MAX_HEADER_BYTES:
                raise PackError(f"pack header of {n} bytes is over the {MAX_HEADER_BYTES} bytes a header may have")
            if len(self._prefix) < 8 + n:
                return
            self._start(*read_pack_header(self._prefix))
            self._head = bytes(self._prefix[:self._payload_start])
            rest, self._prefix = memoryview(self._prefix)[self._payload_start:], bytearray()
            self._payload(rest)
            return
        self._payload(piece)

    def _start(self, header: Dict[str, Any], payload_start: int) -> None:
        dtype, shape, nbytes = _array_spec(header, self.max_bytes)
        codec = header.get("codec", "zlib")
        if codec not in ("raw", "zlib"):
            raise PackError(f"unknown pack codec {codec!r}; this version reads 'zlib' and 'raw'")
        if codec == "raw" and self.total is not None and self.total != payload_start + nbytes:
            raise PackError(f"the body is {self.total} bytes, but a raw pack of shape {shape} {dtype} "
                            f"is {payload_start + nbytes}")
        self._header, self._spec, self._payload_start = header, (dtype, shape, nbytes), payload_start
        self._raw = codec == "raw"
        if self._raw:
            self._out = np.empty(0, dtype=np.uint8)

    def _payload(self, piece: Any) -> None:
        if not self._raw:
            self._pieces.append(bytes(piece))
            return
        n = len(piece)
        nbytes = self._spec[2]  # type: ignore[index]
        if self._filled + n > nbytes:
            raise PackError(f"pack payload is longer than the {nbytes} bytes its header declares")
        out = self._out
        if self._filled + n > out.size:  # type: ignore[union-attr]
            # Grown by half at least (amortised copies; large blocks are mremap'ed by realloc, not copied), never
            # past the declared size, so the last growth leaves exactly the array and no spare capacity.
            grown = min(nbytes, max(self._filled + n, out.size + out.size // 2, 1 << 16))  # type: ignore[union-attr]
            out.resize(grown, refcheck=False)  # type: ignore[union-attr]  # no view of it exists while it grows
        out[self._filled:self._filled + n] = np.frombuffer(piece, dtype=np.uint8)  # type: ignore[index]
        self._filled += n

    def finish(self) -> Tuple[np.ndarray, Dict[str, Any]]:
        """``(array, meta)`` once the whole body was fed; PackError if it was cut short or malformed."""
        if self._header is None:
            if len(self._prefix) < 8 or self._prefix[:4] != MAGIC:
                raise PackError("not a MambaHoME array pack (missing 'MHPK' magic)")
            raise PackError("truncated pack: the JSON header is cut off")
        dtype, shape, nbytes = self._spec  # type: ignore[misc]
        if not self._raw:
            array, _ = unpack_array(b"".join([self._head] + self._pieces), self.max_bytes)
            self._pieces = []
            return array, self._header
        if self._filled != nbytes:
            raise PackError(f"pack payload holds {self._filled} bytes, expected {nbytes} for shape {shape} {dtype}")
        out, self._out = self._out, None  # grown to exactly nbytes: never past it, and all of it was filled
        array = out.view(dtype).reshape(shape)  # type: ignore[union-attr]
        _check_bool(array)
        return array, self._header


# ----------------------------------------------------------------------------- bounding boxes
BBox = Tuple[slice, slice, slice]


def bbox_to_json(bbox: Sequence[slice]) -> List[List[int]]:
    """``(slice, slice, slice)`` -> ``[[start, stop], ...]`` (stop exclusive)."""
    return [[int(s.start), int(s.stop)] for s in bbox]


def bbox_from_json(value: Sequence[Sequence[int]]) -> BBox:
    """``[[start, stop], ...]`` -> ``(slice, slice, slice)``."""
    if len(value) != 3 or any(len(v) != 2 for v in value):
        raise PackError(f"bounding box must be three [start, stop] pairs, got {value!r}")
    return tuple(slice(int(a), int(b)) for a, b in value)  # type: ignore[return-value]


def class_colors(class_names: Sequence[str], colors: Optional[Sequence[Sequence[float]]] = None
                 ) -> List[Tuple[float, float, float]]:
    """An RGB (0-1) colour per label value, background included: the model's own if it names them."""
    if colors is not None and len(colors) == len(class_names):
        return [tuple(float(c) for c in rgb[:3]) for rgb in colors]  # type: ignore[misc]
    return [(0.0, 0.0, 0.0)] + [DEFAULT_PALETTE[(i - 1) % len(DEFAULT_PALETTE)]
                                for i in range(1, len(class_names))]
