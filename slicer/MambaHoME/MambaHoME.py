"""MambaHoME: Mamba-HoME segmentation in 3D Slicer through a MambaHoME server (no torch inside Slicer).

All HTTP and array/geometry work lives in the pure-Python ``mambahome_client`` package; the Logic only
moves data between MRML nodes and that client, and the Widget only wires buttons to the Logic. The
Logic imports nothing but VTK, MRML classes and numpy, so it also runs with the ``slicer-core``
package outside the Slicer application (the project's tests do that).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

# The client package sits at the repository root, two folders above this file; a module installed
# from the source folder (Application settings -> Modules -> additional paths) finds it there.
_REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if _REPO_ROOT not in sys.path and os.path.isdir(os.path.join(_REPO_ROOT, "mambahome_client")):
    sys.path.append(_REPO_ROOT)

from mambahome_client import Client, MaskUpdate, Segmentation, SessionInfo  # noqa: E402
from mambahome_client.client import (  # noqa: E402
    MAX_FINETUNE_STEPS, BusyError, NotFoundError, ServerError, ServerTimeoutError, ServerUnavailableError,
    SessionChangedError,
)
from mambahome_client.geometry import clip_voxels, ijk_to_kji, kji_to_ijk, world_to_voxel  # noqa: E402
from mambahome_client.scores import per_class_text  # noqa: E402

try:  # the Slicer application; absent with slicer-core (tests), where only the Logic is used
    import ctk  # noqa: F401
    import qt
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
    from slicer.util import VTKObservationMixin
    HAVE_GUI = True
except ImportError:
    HAVE_GUI = False

    class ScriptedLoadableModule:  # type: ignore[no-redef]
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent

    class ScriptedLoadableModuleLogic:  # type: ignore[no-redef]
        def __init__(self, parent: Any = None) -> None:
            pass

    class ScriptedLoadableModuleWidget:  # type: ignore[no-redef]
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent

    class ScriptedLoadableModuleTest:  # type: ignore[no-redef]
        pass

    class VTKObservationMixin:  # type: ignore[no-redef]
        def __init__(self) -> None:
            pass

LABELMAP = "Binary labelmap"
INTERACTIVE_SEGMENT = "MambaHoME interactive"
INTERACTIVE_SEGMENT_ID = "MambaHoME_interactive"
AUTOMATIC_TAG = "MambaHoME.automatic"
"""Segment tag of the segments **Segment** writes; its value is the class name it wrote them under. A later **Segment**
replaces only segments still carrying that tag and that name: a renamed one (accepted by the user, as a prompted
object is accepted by renaming it) and every segment of the user's own are kept, and keep their voxels: the new automatic
segments leave those voxels out (the user's segments are corrections), so the node saved as ``.seg.nrrd`` holds one
segment per voxel, as a training case needs. The tag is saved in ``.seg.nrrd``."""
AUTOMATIC_VOXELS_TAG = "MambaHoME.automatic.voxels"
AUTOMATIC_SIGNATURE_TAG = "MambaHoME.automatic.signature"
"""Voxel count and sum of the slice indices of a Segment result's voxels as written ("n:k"): an edit that erased as
many voxels as it painted kept the count, and the next Segment replaced it as if unedited. An edit that moves exactly
as many voxels within the same slices still reads as unedited: a finer signature cost the GUI thread a second pass."""
"""Segment tag of the segments **Segment** writes: how many voxels it wrote into the segment. A segment whose count
differs now was edited (Segment Editor's paint, erase, islands...) and is the user's, as a renamed one is: a later
**Segment** keeps it and writes no segment of that class (it replaced the user's corrections, without a word)."""
OBJECT_TAG = "MambaHoME.object"
"""Segment tag of a prompted object's segment: ``"open"`` while prompts still write it, ``"accepted"`` once the user
renamed it or the object ended. Accepting an object makes it take its voxels from every other segment of the node, as
Slicer's Segment Editor paints with its default *Modify other segments: Overwrite all*: a node saved as ``.seg.nrrd``
then holds one segment per voxel, which a label map (a training case) needs; before, the accepted object overlapped the
automatic segments and the engine refused the saved file. An accepted segment is the user's whatever its name: no later
prompt deletes or overwrites it, even renamed back to the working name."""
CLOSE_TIMEOUT_S = 2.0
"""Seconds the module waits for the server to close its sessions (reconnect, scene close, module cleanup): a server
that does not answer within it is left to expire them, and the user is never kept waiting longer."""
PROMPT_TIMEOUT_S = 30.0
"""Seconds a prompt (a point, a box, Undo, Reset, an initial mask) waits for the server before it is given up. Prompts
run on Slicer's GUI thread (an answer takes a fraction of a second), which waited for the client's 600 s before: a
stopped server or a dead SSH tunnel froze Slicer for ten minutes. The slowest answer a working server gives is the
first prompt on a large CT on a CPU server, which builds the session's prompt state (loads the promptable model,
normalises the volume) and then answers: 6.6 s + 4.9-7.3 s for a box on a 512x512x224 CT on a loaded 2-core CPU
(BENCHMARKS.md, "CPU: clinical-size volumes"), more for a longer CT, plus the server's ``--busy-wait`` (2 s) at each
wait for a session or GPU in use, and 2.6 s of imports on a fresh server. 30 s leaves that about twice over. It
bounds each wait for the server, not a transfer that keeps moving (a painted mask sent over a slow link). Segment and
uploads keep the client's 600 s, off the GUI thread."""

CHECK_TIMEOUT_S = 15.0
"""Seconds **Connect** waits for the server's answer (its version, then its model list), and so do the module's other
requests that the server answers at once from what it holds: the model list, a model's selection and roll back, a
fine-tune job's state (polled every second on Slicer's GUI thread) and its cancel. They waited for the client's 600 s
before: a server that takes the connection and never answers (a process stopped with ``kill -STOP`` or hung, an SSH
tunnel whose far end is gone but which still accepts connections, another program on that port) kept "Connecting..." on
the status line for ten minutes. A working server answers them in milliseconds; the slowest is the first model list of
a freshly started server, which imports the checkpoint reader and reads each model's header (a few seconds on a loaded
2-core CPU). 15 s leaves that several times over. Uploads, Segment and the start of a fine-tune keep the client's 600 s,
prompts :data:`PROMPT_TIMEOUT_S`."""

SERVER_RULE_LABEL = "Server's choice"
AUTO_MODALITY = "auto"
"""The *Modality* list's first entry: send none, the server recognises a CT from its Hounsfield units. A fixed first
entry "CT" made every volume a CT for the server unless changed: an MR then went through the CT intensity rule, with a
different result and no warning."""
SERVER_MAX_STEPS = MAX_FINETUNE_STEPS
"""The most steps a server's fine-tune job takes: asked for when a time limit ends the job (the time decides)."""
STOP_BUTTON_TEXT = "Stop and keep"
STOP_TIP = ("End the fine-tune at the next step and keep the model trained so far (validated, saved and scored, as if "
            "its time limit had run out then); Cancel fine-tuning keeps nothing. Pressed before the first training "
            "step has finished there is nothing to keep: no model is made.")
STOP_UNSUPPORTED_TIP = ("This server cannot stop a fine-tune and keep its model (it is older than the stop): Cancel "
                        "fine-tuning ends the job, keeping nothing, or update the server.")


class PromptModelError(ValueError):
    """The model chosen to answer prompts is not a promptable model of the connected server."""


class NothingToUndoError(RuntimeError):
    """The module's Undo after the object ended: no prompt of a new object yet (nothing was sent or changed)."""


class PromptTimeoutError(RuntimeError):
    """The server did not answer a prompt within :data:`PROMPT_TIMEOUT_S`: the prompt was given up, nothing changed in
    the scene, and the points not answered stay unsent."""


class NothingToSendError(RuntimeError):
    """**Send new points** without a new point inside the volume: nothing was sent, nothing changed."""


class SegmentModelError(ValueError):
    """The model that would segment the whole volume is a promptable model (it answers prompts only)."""


def promptable_segment_text(model_id: str) -> str:
    """What a Slicer user is told when **Segment** would run a promptable model (the server's own words name its API,
    not this module's buttons)."""
    return (f"'{model_id}' is a promptable model: it segments one object from your points and boxes, not the whole "
            "volume. Use it in the Prompts section (Send new points, Send box), or choose an automatic model in the "
            "Server section (Model, then Use this model version) and press Segment again.")


def is_promptable(model: Dict[str, Any]) -> bool:
    """Whether a ``GET /models`` record is a promptable model (task ``interactive``); a record without a
    task is a segmentation model (servers before tasks listed only those), as the napari plugin reads it."""
    return model.get("task", "segmentation") == "interactive"


def model_label(model: Dict[str, Any]) -> str:
    """A ``GET /models`` record as the model lists show it: its id and version, and "demo: synthetic phantoms only"
    for a model that knows no real anatomy (the server's ``phantoms_only``), whose masks on a real scan are speckle,
    and how many scans a demo model fine-tuned on a few has learnt (``real_scans_since_demo``)."""
    label = f"{model['id']} ({model.get('version')})"
    if model.get("phantoms_only"):
        return f"{label}, demo: synthetic phantoms only"
    scans = model.get("real_scans_since_demo")
    if isinstance(scans, int) and not isinstance(scans, bool) and scans > 0:
        return f"{label}, demo fine-tuned on {scans} real scan{'s' if scans != 1 else ''}"
    return label


#
# Module
#
class MambaHoME(ScriptedLoadableModule):
    """Module description shown in Slicer's module list."""

    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        if parent is None:
            return
        self.parent.title = "MambaHoME"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["napari-mambahome developers"]
        self.parent.helpText = (
            "Segment the current volume with a Mamba-HoME model running in a MambaHoME server "
            "(<code>mambahome serve</code>), correct it with points and a box, save it as a training case "
            "and fine-tune the model. See docs/SERVER.md of napari-mambahome.")
        self.parent.acknowledgementText = "Mamba-HoME; napari-mambahome. The model runs in the server, not in Slicer."


#
# Logic: MRML nodes <-> mambahome_client
#
def _matrix_to_numpy(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)], dtype=np.float64)


def _numpy_to_matrix(a: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, float(a[i, j]))
    return m


def _session_gone(exc: Exception) -> bool:
    """Whether a 404 says the server no longer holds the session (it expired after idling): "no session 'x'" for a
    request that came after, "session 'x' was closed" for one it was answering when the session expired."""
    text = str(exc)
    return "no session" in text or ("session" in text and text.rstrip().endswith("was closed"))


def check_volume(volume_node: Any) -> Any:
    """The node's image data, once it is a volume the server can work on (checked at every use of the volume, not only
    at its upload: a volume put under a transform after its first prompt was prompted on with its untransformed grid).

    Raises:
        ValueError: the node has no image, or lies under a transform.
    """
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData().GetScalars() is None:
        name = f"{volume_node.GetName()}: " if volume_node is not None and volume_node.GetName() else ""
        raise ValueError(f"{name}select a volume that holds an image")
    if volume_node.GetParentTransformNode() is not None:
        raise ValueError(f"{volume_node.GetName()}: harden its transform first (Data module: right-click -> "
                         "Harden transform); the server works on the volume's own grid")
    return image


def check_segmentation(segmentation_node: Any) -> None:
    """Refuse a segmentation node under a transform: its segments are read and written on the volume's own grid, so
    under a transform they showed 10 mm off the volume for a 10 mm shift, and what the user painted there was saved
    shifted from what was on screen.

    Raises:
        ValueError: the node lies under a transform.
    """
    if segmentation_node is not None and segmentation_node.GetParentTransformNode() is not None:
        raise ValueError(f"{segmentation_node.GetName()}: harden its transform first (Data module: right-click -> "
                         "Harden transform), or take it out from under the transform; the segments are read and "
                         "written on the volume's own grid")


def volume_geometry(volume_node: Any) -> Tuple[np.ndarray, np.ndarray]:
    """``(image (I, J, K) in the node's own dtype, IJK-to-RAS (4, 4))`` of a scalar volume node.

    Raises:
        ValueError: the node has no image, is not 3D scalar, or lies under a transform.
    """
    image = check_volume(volume_node)
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"{volume_node.GetName()}: has {image.GetNumberOfScalarComponents()} components; "
                         "a scalar (grey-value) volume is needed")
    dims = image.GetDimensions()
    kji = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return np.ascontiguousarray(kji_to_ijk(kji)), _matrix_to_numpy(m)


def _copy_swapped(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` where ``src`` is a view of an array in the other index order (``(I, J, K)`` against Slicer's
    ``(K, J, I)``, the two first and last axes swapped): plane by plane along J, each plane copied in the source's own
    order first. Numpy's one strided copy between the two orders is several times slower (25-40 ms against 2-6 ms for
    a 4 M voxel box, about 1 s against 0.2 s for a 512x512x400 mask)."""
    for j in range(src.shape[1]):
        dst[:, j, :] = np.ascontiguousarray(src[:, j, :].T).T


def _swapped(a: np.ndarray) -> np.ndarray:
    """A contiguous copy of ``a`` with its first and last axes swapped (``(K, J, I)`` <-> ``(I, J, K)``)."""
    out = np.empty(a.shape[::-1], dtype=a.dtype)
    _copy_swapped(out, a.transpose(2, 1, 0))
    return out


def _oriented_mask(mask_ijk: np.ndarray, ijk_to_ras: np.ndarray) -> Any:
    """A ``vtkOrientedImageData`` of a mask or label map ``(I, J, K)`` on the grid ``ijk_to_ras``
    (uint8, or uint16 for label values beyond 255)."""
    img = slicer.vtkOrientedImageData()
    i, j, k = mask_ijk.shape
    img.SetDimensions(int(i), int(j), int(k))
    wide = mask_ijk.dtype != bool and int(mask_ijk.max(initial=0)) > 255
    values = mask_ijk.astype(np.uint16 if wide else np.uint8)
    scalars = numpy_support.numpy_to_vtk(_swapped(values).ravel(), deep=True,
                                         array_type=vtk.VTK_UNSIGNED_SHORT if wide else vtk.VTK_UNSIGNED_CHAR)
    img.GetPointData().SetScalars(scalars)
    img.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras))
    return img


def _reference_image(shape_ijk: Sequence[int], ijk_to_ras: np.ndarray) -> Any:
    ref = slicer.vtkOrientedImageData()
    ref.SetDimensions(*[int(s) for s in shape_ijk])
    ref.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    ref.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras))
    return ref


def _set_source_representation(segmentation: Any) -> None:
    if hasattr(segmentation, "SetSourceRepresentationName"):
        segmentation.SetSourceRepresentationName(LABELMAP)
    else:  # Slicer < 5.4
        segmentation.SetMasterRepresentationName(LABELMAP)


def segment_mask(segmentation_node: Any, segment_id: str, shape_ijk: Sequence[int], ijk_to_ras: np.ndarray) -> np.ndarray:
    """The segment as a bool mask ``(I, J, K)`` on the volume grid (resampled if its grid differs)."""
    segmentation = segmentation_node.GetSegmentation()
    if not segmentation.ContainsRepresentation(LABELMAP):
        segmentation.CreateRepresentation(LABELMAP)
    segment = segmentation.GetSegment(segment_id)
    rep = segment.GetRepresentation(LABELMAP)
    mask_kji = np.zeros(tuple(int(s) for s in shape_ijk)[::-1], dtype=bool)
    if rep is None or rep.GetPointData().GetScalars() is None:
        return ijk_to_kji(mask_kji).copy()
    m = vtk.vtkMatrix4x4()
    rep.GetImageToWorldMatrix(m)
    if not np.allclose(_matrix_to_numpy(m), ijk_to_ras, atol=1e-4):
        resampled = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            rep, _reference_image(shape_ijk, ijk_to_ras), resampled, False, False)
        rep = resampled
    ext = rep.GetExtent()
    if ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        return ijk_to_kji(mask_kji).copy()
    values = numpy_support.vtk_to_numpy(rep.GetPointData().GetScalars()).reshape(
        ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    label_value = segment.GetLabelValue() if hasattr(segment, "GetLabelValue") else 1
    part = values == label_value
    # Place the extent inside the volume, clipping what lies outside it.
    lo = [ext[4], ext[2], ext[0]]
    src, dst = [], []
    for ax, n in enumerate(mask_kji.shape):
        a, b = max(lo[ax], 0), min(lo[ax] + part.shape[ax], n)
        if b <= a:
            return ijk_to_kji(mask_kji).copy()
        src.append(slice(a - lo[ax], b - lo[ax]))
        dst.append(slice(a, b))
    mask_kji[tuple(dst)] |= part[tuple(src)]
    return _swapped(mask_kji)


Box = Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]
"""A box of the volume's voxels in Slicer's ``(K, J, I)`` index order: ``((k0, k1), (j0, j1), (i0, i1))``, half-open."""


PointToSend = Tuple[Any, Tuple[str, Tuple[float, ...]], np.ndarray, bool]
"""A click to send: ``(its Markups list, its sent-mark (ID, world position), its voxel (i, j, k), positive)``."""


def _roi_world_corners(roi_node: Any) -> np.ndarray:
    """The eight corners ``(8, 3)`` of a Markups ROI in world (RAS) coordinates, along the ROI's own axes: an ROI
    turned with an oblique volume (placed in a slice view rotated to it) has its corners there, where its world
    bounds (``GetRASBounds``) enclosed it in a box up to 11 times larger."""
    if hasattr(roi_node, "GetObjectToWorldMatrix") and hasattr(roi_node, "GetSize"):
        m = roi_node.GetObjectToWorldMatrix()
        to_world = _matrix_to_numpy(m)
        half = np.asarray(roi_node.GetSize(), dtype=np.float64) / 2.0
        local = np.array([[x, y, z, 1.0] for x in (-half[0], half[0]) for y in (-half[1], half[1])
                          for z in (-half[2], half[2])])
        return (to_world @ local.T).T[:, :3]
    bounds = [0.0] * 6  # a legacy annotation ROI: its world bounds
    roi_node.GetRASBounds(bounds)
    return np.array([[x, y, z] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]], dtype=np.float64)


def roi_voxel_box(corners_ras: np.ndarray, ijk_to_ras: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` voxel indices (inclusive) of the voxels whose centres lie inside the box the corners span on the
    volume's grid. Rounding each corner to its nearest voxel grew an ROI whose edges lie on voxel boundaries (x.5) by
    a voxel on one side and not the other (numpy rounds halves to even). A box thinner than a voxel between two
    centres keeps the voxel nearest its middle."""
    homo = np.c_[np.asarray(corners_ras, dtype=np.float64), np.ones(len(corners_ras))]
    ijk = (np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64)) @ homo.T).T[:, :3]
    low, high = ijk.min(axis=0), ijk.max(axis=0)
    lo, hi = np.ceil(low - 1e-6).astype(np.int64), np.floor(high + 1e-6).astype(np.int64)
    thin = lo > hi
    middle = np.rint((low + high) / 2).astype(np.int64)
    lo[thin], hi[thin] = middle[thin], middle[thin]
    return lo, hi


def _label_value(segment: Any) -> int:
    return int(segment.GetLabelValue()) if hasattr(segment, "GetLabelValue") else 1


def _on_grid(image: Any, ijk_to_ras: np.ndarray) -> bool:
    """Whether a labelmap's voxel indices are the volume's (its IJK-to-RAS is the volume's, as :func:`segment_mask`
    decides whether to resample)."""
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return bool(np.allclose(_matrix_to_numpy(m), ijk_to_ras, atol=1e-4))


def _labelmap_view(image: Any) -> Optional[Tuple[np.ndarray, Tuple[int, int, int]]]:
    """``(its voxels as a (K, J, I) view of the VTK array, (k, j, i) of its first voxel)``; writing the view writes the
    labelmap (nothing is copied). None when it holds no voxel (or is not a one-component image)."""
    if image is None:
        return None
    scalars = image.GetPointData().GetScalars()
    ext = image.GetExtent()
    if scalars is None or scalars.GetNumberOfComponents() != 1 or ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        return None
    dims = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    if scalars.GetNumberOfTuples() != dims[0] * dims[1] * dims[2]:
        return None
    return numpy_support.vtk_to_numpy(scalars).reshape(dims), (ext[4], ext[2], ext[0])


def _label_counts(voxels: np.ndarray, minlength: int = 0) -> np.ndarray:
    """Voxels per label value (index = value) of an integer label array, counted slab by slab along its first axis:
    ``np.bincount`` of the whole array first copies it as int64 (800 MB for a 512x512x400 CT's labelmap, on the GUI
    thread)."""
    counts = np.zeros(minlength, np.int64)
    for slab in (voxels if voxels.ndim > 1 else [voxels]):
        n = np.bincount(np.ravel(slab), minlength=minlength)
        if len(n) > len(counts):
            counts = np.pad(counts, (0, len(n) - len(counts)))
        counts[:len(n)] += n
    return counts


def _label_signatures(view: Optional[Tuple[np.ndarray, Tuple[int, int, int]]]) -> Optional[Dict[int, str]]:
    """``{label value: "n:k"}`` of a labelmap view (:func:`_labelmap_view`): how many voxels hold the value and the sum
    of their slice indices k (the labelmap's own extent, so a layer grown by painting elsewhere keeps the signature of
    what it did not change). Counted in the one slab-by-slab pass of :func:`_label_counts`: a second, weighted pass
    over a CT's labelmap cost the GUI thread a quarter of a second. None for a non-integer or empty labelmap."""
    if view is None or not np.issubdtype(view[0].dtype, np.integer):
        return None
    voxels, (ok, _, _) = view
    n = np.zeros(0, np.int64)
    sk = np.zeros(0, np.int64)
    for index, slab in enumerate(voxels):
        c = np.bincount(np.ravel(slab))
        if len(c) > len(n):
            n, sk = np.pad(n, (0, len(c) - len(n))), np.pad(sk, (0, len(c) - len(sk)))
        n[:len(c)] += c
        sk[:len(c)] += c * (ok + index)
    return {v: f"{int(n[v])}:{int(sk[v])}" for v in np.flatnonzero(n).tolist()}


def _value_counts(values: np.ndarray) -> Dict[int, int]:
    """``{value: how many}`` of a 1-D array of label values (counted, not sorted: a large object has millions)."""
    if values.size and values.dtype.kind in "ui" and values.min() >= 0 and values.max() < 65536:
        n = np.bincount(values)
        present = np.flatnonzero(n)
        return dict(zip(present.tolist(), n[present].tolist()))
    found, n = np.unique(values, return_counts=True)
    return dict(zip(found.tolist(), n.tolist()))


def _intersect(a: Box, b: Box) -> Optional[Box]:
    box = tuple((max(x[0], y[0]), min(x[1], y[1])) for x, y in zip(a, b))
    return None if any(hi <= lo for lo, hi in box) else box  # type: ignore[return-value]


def _local(box: Box, origin: Sequence[int]) -> Tuple[slice, slice, slice]:
    """``box`` as slices of an array whose first voxel is the volume voxel ``origin`` (k, j, i)."""
    return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, origin))  # type: ignore[return-value]


def _nonzero_box(values: np.ndarray) -> Optional[Box]:
    """The smallest box (in ``values``' own indices) holding its non-zero voxels; one pass over the array along the
    first axis, then only over the slab found (a small object in a whole-volume labelmap reads the volume once)."""
    k = np.flatnonzero(values.any(axis=(1, 2)))
    if not k.size:
        return None
    slab = values[k[0]:k[-1] + 1]
    j = np.flatnonzero(slab.any(axis=(0, 2)))
    i = np.flatnonzero(slab[:, j[0]:j[-1] + 1].any(axis=(0, 1)))
    return (int(k[0]), int(k[-1]) + 1), (int(j[0]), int(j[-1]) + 1), (int(i[0]), int(i[-1]) + 1)


def _segment_box(segmentation_node: Any, segment_id: str, shape_ijk: Sequence[int],
                 ijk_to_ras: np.ndarray) -> Optional[Tuple[Box, np.ndarray]]:
    """``(the smallest box of the volume holding the segment's voxels, its mask there (K, J, I) bool)``, None when it
    has none on the volume: :func:`segment_mask` cropped, reading only the segment's labelmap (and, on the volume's
    grid, only its non-zero slab), not a whole-volume copy."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    rep = segment.GetRepresentation(LABELMAP)
    if rep is not None and not _on_grid(rep, ijk_to_ras):  # resampled onto the volume, as segment_mask does
        full = ijk_to_kji(segment_mask(segmentation_node, segment_id, shape_ijk, ijk_to_ras))
        box = _nonzero_box(full)
        return None if box is None else (box, np.ascontiguousarray(full[_local(box, (0, 0, 0))]))
    got = _labelmap_view(rep)
    if got is None:
        return None
    view, origin = got
    volume: Box = tuple((0, int(n)) for n in tuple(shape_ijk)[::-1])  # type: ignore[assignment]
    inside = _intersect(tuple((o, o + n) for o, n in zip(origin, view.shape)), volume)  # type: ignore[arg-type]
    if inside is None:
        return None
    block = view[_local(inside, origin)]
    near = _nonzero_box(block)  # of every label of the layer: a box around the segment's own voxels
    if near is None:
        return None
    mask = block[_local(near, (0, 0, 0))] == _label_value(segment)
    tight = _nonzero_box(mask)
    if tight is None:
        return None
    box = tuple((inside[ax][0] + near[ax][0] + tight[ax][0], inside[ax][0] + near[ax][0] + tight[ax][1])
                for ax in range(3))
    return box, np.ascontiguousarray(mask[_local(tight, (0, 0, 0))])  # type: ignore[return-value]


def _may_meet(image: Any, box: Box, ijk_to_ras: np.ndarray) -> bool:
    """Whether a labelmap on another grid than the volume's may have voxels in ``box`` once resampled onto the volume
    (its extent, one voxel wider, mapped to the volume's voxels, one voxel wider again: never a false no)."""
    ext = image.GetExtent()
    if ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        return False
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    corners = np.array([[i, j, k, 1.0] for i in (ext[0] - 1, ext[1] + 1) for j in (ext[2] - 1, ext[3] + 1)
                        for k in (ext[4] - 1, ext[5] + 1)])
    ijk = (np.linalg.inv(ijk_to_ras) @ _matrix_to_numpy(m) @ corners.T)[:3]
    lo, hi = np.floor(ijk.min(axis=1)) - 1, np.ceil(ijk.max(axis=1)) + 2
    theirs = tuple((int(lo[ax]), int(hi[ax])) for ax in (2, 1, 0))
    return _intersect(theirs, box) is not None  # type: ignore[arg-type]


def _extent_box(image: Any) -> Optional[Box]:
    """A labelmap's extent as a box of the volume's voxels (its indices are the volume's when :func:`_on_grid`), None
    when it holds no voxel."""
    ext = image.GetExtent()
    if ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        return None
    return (ext[4], ext[5] + 1), (ext[2], ext[3] + 1), (ext[0], ext[1] + 1)


def _union(a: Optional[Box], b: Optional[Box]) -> Optional[Box]:
    if a is None or b is None:
        return a if b is None else b
    return tuple((min(x[0], y[0]), max(x[1], y[1])) for x, y in zip(a, b))  # type: ignore[return-value]


def _contains(outer: Box, inner: Box) -> bool:
    return all(o[0] <= i[0] and i[1] <= o[1] for o, i in zip(outer, inner))


def _shifted(box: Box, origin: Sequence[int]) -> Box:
    """``box`` of an array whose first voxel is the volume voxel ``origin``, in the volume's indices."""
    return tuple((lo + o, hi + o) for (lo, hi), o in zip(box, origin))  # type: ignore[return-value]


def _update_box(update: MaskUpdate, shape_ijk: Sequence[int]) -> Optional[Box]:
    """The box of the volume a prompt answer changed (``(K, J, I)`` order), None when it changed nothing."""
    ijk = [s.indices(int(n))[:2] for s, n in zip(update.bbox, shape_ijk)]
    box = (ijk[2], ijk[1], ijk[0])
    return None if any(hi <= lo for lo, hi in box) else box  # type: ignore[return-value]


def _box_labelmap(values_kji: Optional[np.ndarray], origin: Sequence[int], ijk_to_ras: np.ndarray) -> Any:
    """A ``vtkOrientedImageData`` (uint8) on the volume's grid ``ijk_to_ras`` holding ``values_kji`` ``(K, J, I)`` (a
    view of an ``(I, J, K)`` array: :func:`_copy_swapped`) from the volume voxel ``origin`` (k, j, i) on: its extent is
    that box only, as Slicer keeps a segment's effective extent (``None``: an empty extent, no voxel)."""
    img = slicer.vtkOrientedImageData()
    if values_kji is None or not values_kji.size:
        img.SetExtent(0, -1, 0, -1, 0, -1)
    else:
        (k, j, i), (nk, nj, ni) = origin, values_kji.shape
        img.SetExtent(int(i), int(i + ni - 1), int(j), int(j + nj - 1), int(k), int(k + nk - 1))
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    if values_kji is not None and values_kji.size:
        _copy_swapped(numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(values_kji.shape), values_kji)
    img.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras))
    return img


def _grow_labelmap(image: Any, box: Box) -> None:
    """Widen a uint8 labelmap on the volume's grid, in place (the same image: its segment and layer stay), to the
    volume's voxels ``box`` (which holds its extent): its voxels are kept, the new ones are 0."""
    old, old_box = _labelmap_view(image), _extent_box(image)
    dims = tuple(hi - lo for lo, hi in box)
    scalars = vtk.vtkUnsignedCharArray()
    scalars.SetNumberOfComponents(1)
    scalars.SetNumberOfTuples(int(dims[0] * dims[1] * dims[2]))
    grown = numpy_support.vtk_to_numpy(scalars).reshape(dims)
    grown.fill(0)
    if old is not None and old_box is not None:
        grown[_local(old_box, tuple(lo for lo, _ in box))] = old[0]
    image.SetExtent(box[2][0], box[2][1] - 1, box[1][0], box[1][1] - 1, box[0][0], box[0][1] - 1)
    image.GetPointData().SetScalars(scalars)

class MambaHoMELogic(ScriptedLoadableModuleLogic):
    """Moves data between MRML nodes and a MambaHoME server through :class:`mambahome_client.Client`.

    Args:
        client: a connected client, or None until :meth:`connect`.
    """

    def __init__(self, client: Optional[Client] = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.client = client
        # volume node ID -> (session, what it was uploaded from: image MTime + IJK-to-RAS, modality)
        self._sessions: Dict[str, Tuple[SessionInfo, Tuple[Any, ...], Optional[str]]] = {}
        self._sent_points: Dict[str, set] = {}  # markups node ID -> (point ID, position) of its points sent
        self.mask: Optional[np.ndarray] = None  # the interactive mask (I, J, K) of the current object
        # The box of the volume ((K, J, I), half-open) outside which :attr:`mask` holds no voxel (None: none anywhere),
        # and (its labelmap, that labelmap's MTime) as the last answer left it: the next answer is written into that
        # labelmap's changed box in place while nothing else changed it (see :meth:`_apply`), and the next prompt reads
        # the segment for the user's painting only when that MTime moved (-1: it holds a painting not sent yet, see
        # :meth:`_painting`)
        self._object_box: Optional[Box] = None
        self._open_labelmap: Optional[Tuple[Any, int]] = None
        self.class_names: Optional[List[str]] = None
        self._prompt_model: Optional[str] = None  # the chosen promptable model; None: the server's rule
        self.object_model: Optional[str] = None  # the model that answered the current object's prompts
        self._fresh_object = False  # the next prompt must first start a new object on the server
        self._retire: Optional[Tuple[Optional[str]]] = None  # (its model,): an ended object's segment to keep
        # (volume key, sent point counts) kept when the server dropped that volume's session mid-annotation: the
        # points it answered belong to the ended object and are not sent again into the new session's object
        self._expired_points: Optional[Tuple[str, Dict[str, int]]] = None
        # The volume key whose object :attr:`mask` holds: prompts on another volume end that object first (its mask
        # is on the other volume's grid; patches of this volume's answers written into it drew garbage)
        self._object_key: Optional[str] = None
        # What the user must be told besides the answer (the object was reloaded whole from the server); the Widget
        # shows it once and clears it with take_notice()
        self.notice: Optional[str] = None
        # Called (GUI thread) when something is to be told outside this module's own actions: the user accepted the
        # open object by renaming it in the Segment Editor, and it took voxels from other segments. The Widget shows
        # take_notice() on its status line at once; without it the notice waits for the next take_notice().
        self.on_notice: Optional[Callable[[], None]] = None
        self._listing: Optional[Dict[str, Any]] = None  # the server's last GET /models answer (tasks, active model)
        self._segmented_with: set = set()  # models this connection segmented with: the server has loaded them once
        # (segmentation node, segment ID, volume shape, IJK-to-RAS) of the open object's segment: renaming it in the
        # Segment Editor accepts it (see OBJECT_TAG), noticed by an observer on the node's segmentation
        self._open_segment: Optional[Tuple[Any, str, Tuple[int, ...], np.ndarray]] = None
        self._observed: Dict[int, Tuple[Any, int]] = {}  # id(vtkSegmentation) -> (it, observer tag)
        self._accepting = False
        # the name of the segment the last ended object was accepted as (None: none, or it was empty): the module's
        # Undo has nothing to take back after it, and says so naming it
        self._accepted_name: Optional[str] = None
        # session ID -> the object revision known when a prompt there was given up after PROMPT_TIMEOUT_S: the server
        # may still apply it (a stopped server resumed reads it), so the next prompt on that session first takes the
        # server's object. One entry per session: in one slot, a prompt on another volume forgot it, and back on the
        # first volume the late change was taken for another client's (a false "Another client changed this object")
        self._unanswered: Dict[str, Optional[int]] = {}

    # ------------------------------------------------------------------ server
    def connect(self, url: str, token: Optional[str] = None) -> Dict[str, Any]:
        """Connect and check protocol and token; returns the server's version and capabilities.

        Prompts go back to the server's rule (:attr:`prompt_model` None): another server has other models.
        """
        url = (url or "").strip()
        if not url:
            raise ValueError("type the server address, e.g. http://127.0.0.1:8765 (what `mambahome serve` prints)")
        if "://" not in url:  # "127.0.0.1:8765" as typed from the server's host and port: HTTP, as the server speaks
            url = f"http://{url}"
        # prompts (GUI thread) give up after PROMPT_TIMEOUT_S, Connect and the other quick requests after
        # CHECK_TIMEOUT_S; Segment and uploads (worker threads) keep the 600 s
        client = Client(url, token=token or None, prompt_timeout=PROMPT_TIMEOUT_S, check_timeout=CHECK_TIMEOUT_S)
        try:
            info = client.connect()
        except ServerTimeoutError as exc:  # refused before anything of this Logic changed: the old connection stays
            raise ServerTimeoutError(self.connect_timeout_text(url, exc.timeout_s), exc.timeout_s) from None
        except ServerError as exc:
            said = self.connect_error_text(url, exc)
            if said is None:
                raise
            raise type(exc)(said, status=exc.status, code=exc.code) from None
        # The old connection's sessions are closed, not only forgotten: each held a volume on the server until it
        # expired, and a few reconnects filled the server's --max-sessions for every user.
        self.release_sessions()
        self.client = client
        self._prompt_model = None
        self._listing, self._segmented_with = None, set()
        return info

    @staticmethod
    def connect_error_text(url: str, exc: ServerError) -> Optional[str]:
        """What **Connect** tells the user where the client's words are for programs (a header to send, an SSL
        handshake, an HTTP status of a path), or None to show the client's own. Nothing changed here in any case."""
        text = str(exc)
        if exc.status == 401:
            return (f"Connect: the server at {url} asks for a token: type the one `mambahome serve` was started with "
                    "(its --token, or MAMBAHOME_TOKEN) into the Token field, then press Connect again.")
        if exc.status == 403:
            return (f"Connect: the server at {url} refused the token: check the Token field "
                    "against the server's --token (or MAMBAHOME_TOKEN), then press Connect again.")
        if exc.status == 404:
            return (f"Connect: {url} answered, but no Mamba-HoME server is at that address: give the server's address "
                    "and port only, without a path (e.g. http://127.0.0.1:8765, what `mambahome serve` prints).")
        if exc.status == 0 and url.lower().startswith("https://") and ("SSL" in text or "ssl" in text):
            plain = "http://" + url[len("https://"):]
            return (f"Connect: {url} does not speak HTTPS: `mambahome serve` speaks plain HTTP (reach a remote server "
                    f"through an SSH tunnel); connect to {plain}.")
        if exc.status == 0 and "unknown url type" in text:
            return (f"Connect: {url!r} is not an address Connect can reach: write it as http://HOST:PORT (e.g. "
                    "http://127.0.0.1:8765, what `mambahome serve` prints), then press Connect again.")
        if exc.status == 0 and ("refused" in text.lower() or "Errno 111" in text or "No route" in text
                                or "Name or service not known" in text or "nodename nor servname" in text):
            return (f"Connect: nothing answered at {url}: start the server there (`mambahome serve`, see the module's "
                    "README), check that the address and port are the ones it prints, and, for a remote server, that "
                    "the SSH tunnel (`ssh -N -L ...`) is running; then press Connect again. Nothing changed here.")
        return None

    def connect_timeout_text(self, url: str, seconds: float) -> str:
        """What the user is told when **Connect** reached ``url`` but the server did not answer within ``seconds``."""
        kept = f": the connection to {self.client.url} is kept as it was" if self.client is not None else ""
        return (f"Connect: {url} took the connection but did not answer within {seconds:g} s. Check that `mambahome "
                "serve` is running there and answering (not stopped, e.g. with Ctrl+Z or kill -STOP, and not hung or "
                "overloaded), that the SSH tunnel still reaches the server (start `ssh -N -L ...` again if the "
                f"server's machine or the connection was restarted), and that {url} is the server's address and port, "
                f"not another program's; then press Connect again. Nothing changed here{kept}.")

    def release_sessions(self, timeout_s: float = CLOSE_TIMEOUT_S, background: bool = False,
                         scene_closed: bool = False) -> Optional[threading.Thread]:
        """Close every session this Logic opened on the server (best effort) and forget them.

        Called on a reconnect, when the scene closes and at the module's cleanup. The current object ends as after a
        switch of model, unless ``scene_closed``: its nodes are gone with the scene. Touches no MRML (a reconnect runs
        it on a worker thread): its segment is kept (renamed, accepted) by :meth:`keep_ended_object` on the GUI thread,
        else before the next answer is written. Never raises: a server that is down or slow is left to expire its
        sessions after its idle timeout.

        Args:
            timeout_s: how long to wait for the server; after one request without an answer in time the rest are
                not tried (that server would not answer them either).
            background: close in a daemon thread (the GUI thread does not wait); returns the thread.
            scene_closed: forget the object entirely (no segment is left to rename).
        """
        client, ids = self.client, [cached[0].session_id for cached in self._sessions.values()]
        self._sessions.clear()
        self._unanswered.clear()  # closed: no prompt of theirs is caught up
        if scene_closed:
            self.mask, self.object_model, self._retire, self._fresh_object = None, None, None, False
            self._sent_points, self._expired_points, self._object_key = {}, None, None
            self._open_segment, self._open_labelmap = None, None
            for segmentation, tag in self._observed.values():  # its nodes are gone with the scene
                segmentation.RemoveObserver(tag)
            self._observed.clear()
        elif self._object_key is not None or self.mask is not None:
            if self._object_key is not None:  # its answered points stay sent, as after an expired session
                self._expired_points = (self._object_key, dict(self._sent_points))
            if self.mask is not None:
                self.end_object()
            self._object_key = None
        if client is None or not ids:
            return None

        def close() -> None:
            try:
                short = Client(client.url, token=client.token, timeout=timeout_s)
                for session_id in ids:
                    try:
                        short.close_session(session_id)
                    except ServerUnavailableError:
                        return  # down or too slow: the server expires them itself
                    except ServerError:  # noqa: PERF203 - already expired (404): nothing to close
                        continue
            except Exception:  # noqa: BLE001 - closing is a courtesy to the server; it must never fail the caller
                logging.debug("MambaHoME: closing sessions failed", exc_info=True)

        if not background:
            close()
            return None
        thread = threading.Thread(target=close, name="MambaHoME close sessions", daemon=True)
        thread.start()
        return thread

    def _require(self) -> Client:
        if self.client is None:
            raise RuntimeError("not connected to a MambaHoME server; press Connect first")
        return self.client

    def session_for(self, volume_node: Any, modality: Optional[str] = None) -> SessionInfo:
        """The server session holding this volume; uploaded once, again when the voxels, the geometry (spacing,
        origin, directions) or the asked modality changed (``None``: whichever the session has)."""
        key, stamp = self.session_key(volume_node)
        cached = self.cached_session(key, stamp, modality)
        if cached is not None:
            return cached
        data, ijk_to_ras = volume_geometry(volume_node)
        return self.open_session(key, stamp, data, ijk_to_ras, volume_node.GetName() or "volume", modality)

    @staticmethod
    def session_key(volume_node: Any) -> Tuple[str, Tuple[Any, ...]]:
        """``(key, stamp)`` of a volume node: the stamp changes with its voxels and with its IJK-to-RAS matrix (a
        new spacing or origin leaves the image data's MTime as it was). Reads MRML: call on the GUI thread.

        Raises:
            ValueError: not a volume the server can work on (:func:`check_volume`).
        """
        image = check_volume(volume_node)  # also for a volume uploaded before: moved under a transform since?
        m = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(m)
        stamp = (image.GetMTime(), tuple(round(v, 9) for v in _matrix_to_numpy(m).ravel()))
        return volume_node.GetID() or str(id(volume_node)), stamp

    def cached_session(self, key: str, stamp: Tuple[Any, ...], modality: Optional[str] = None,
                       exact: bool = False) -> Optional[SessionInfo]:
        """The session uploaded for ``key`` from the same ``stamp`` (and ``modality``, unless None), else None.

        ``exact``: ``modality`` None means "the server's guess", matched only by a session uploaded without one (the
        Widget's *auto*: a session uploaded as CT would keep a CT rule on an MR the user now leaves to the server).
        """
        cached = self._sessions.get(key)
        if cached is None or cached[1] != stamp or ((modality is not None or exact) and cached[2] != modality):
            return None
        return cached[0]

    @staticmethod
    def modality_choice(text: str) -> Optional[str]:
        """The modality to send for an entry of the Widget's *Modality* list: None for :data:`AUTO_MODALITY` (the
        server reads it from the volume: a CT is recognised from its Hounsfield units, else the model's own rule)."""
        return None if not text or text == AUTO_MODALITY else text

    def open_session(self, key: str, stamp: Tuple[Any, ...], data: np.ndarray, ijk_to_ras: np.ndarray, name: str,
                     modality: Optional[str] = None) -> SessionInfo:
        """Upload a volume as a new session for ``key``, closing the one it replaces (a server holds a few
        sessions only: each Segment press used to leave one open until the server refused new ones). Touches no
        MRML node, so a worker thread may call it with what :meth:`session_key` and :func:`volume_geometry` read."""
        client = self._require()
        try:
            info = client.create_session(data, ijk_to_ras, name=name, modality=modality)
        except ServerError as exc:
            if exc.status == 503 and "--max-sessions" in str(exc):
                # the server's advice ("close one") is for programs; a Slicer user has nothing of the server to close
                raise BusyError(f"The server {client.url} holds as many volumes as it allows for all its users (its "
                                "--max-sessions): volumes segmented or prompted earlier, from this or another program, "
                                "keep theirs until they sit idle long enough to expire. This module gives its own back "
                                "when you connect again or close the scene. Wait a few minutes, or ask whoever runs the "
                                f"server for a larger limit. ({exc})", status=503, code=exc.code) from None
            if exc.status != 429:  # a 503 for a GPU busy with another job: the server's words fit
                raise
            # the server's advice (DELETE /sessions/<id>) is for programs; a Slicer user cannot act on it
            raise ServerError(f"The server {client.url} holds as many volumes for this computer as it allows (its "
                              "--max-sessions-per-client): the volumes segmented or prompted earlier keep theirs until "
                              "they sit idle long enough to expire (this module gives its own back when you connect "
                              "again or close the scene). Wait, or ask whoever runs the server for a larger "
                              f"limit. ({exc})", status=429, code=exc.code) from None
        old = self._sessions.get(key)
        self._sessions[key] = (info, stamp, modality)
        if old is not None:
            self._unanswered.pop(old[0].session_id, None)
            try:
                client.close_session(old[0].session_id)
            except Exception:  # noqa: BLE001 - an expired session is already gone
                pass
        if self._object_key is not None and key != self._object_key:
            # Another volume's session (its Segment press, or its first prompt after :meth:`_prompt_session` ended
            # the object): the current object and the points answered for it belong to the volume prompted before.
            # Cleared here, that volume's next answer was patched into an empty mask, and every point of the list,
            # placed on that volume, was sent again into this one's object.
            return info
        expired, self._expired_points = self._expired_points, None
        # Uploaded again (the session expired, the server restarted, Segment with another modality, changed voxels):
        # the object drawn so far ends and is kept as drawn, box and painting included, as on a switch of model or
        # volume; it was started afresh from its points alone, replacing its segment without a word. Its answered
        # points stay sent: sent again they would draw a second, overlapping copy of the kept object.
        sent = dict(expired[1]) if expired is not None and expired[0] == key else dict(self._sent_points)
        if self.mask is not None:
            self.end_object()  # its segment is renamed and accepted before the next prompt writes (no MRML here)
        self.mask, self._sent_points, self.object_model, self._fresh_object = None, sent, None, False
        return info

    def forget_session(self, session_id: str) -> List[str]:
        """Drop a session the server no longer has (expired after idling, or a restarted server), so the next call
        uploads anew; returns the volume keys it was held for."""
        keys = [key for key, cached in self._sessions.items() if cached[0].session_id == session_id]
        for key in keys:
            del self._sessions[key]
        self._unanswered.pop(session_id, None)
        return keys

    def on_live_session(self, info: SessionInfo, use: Callable[[str], Any], reopen: Callable[[], SessionInfo]) -> Any:
        """``use(session_id)``; when the server has dropped that session (idle too long), once more on the session
        ``reopen()`` uploads. For whole-volume calls only: a prompt's object history does not survive a new session."""
        try:
            return use(info.session_id)
        except NotFoundError as exc:
            if not _session_gone(exc):
                raise
            self.forget_session(info.session_id)
            return use(reopen().session_id)

    # ------------------------------------------------------------------ prompt model
    @property
    def prompt_model(self) -> Optional[str]:
        """The id of the promptable model that answers prompts; None: the server's rule picks it."""
        return self._prompt_model

    def prompt_models(self) -> List[Dict[str, Any]]:
        """The server's promptable models (``GET /models`` entries of task ``interactive``), in its order.

        Returns:
            the listing's model records (``{"id", "task", "version", "class_names", ...}``).
        """
        return [m for m in self._require().models().get("models", []) if is_promptable(m)]

    def set_prompt_model(self, model_id: Optional[str], check: bool = True,
                         segmentation_node: Any = None) -> Optional[str]:
        """Answer prompts with ``model_id`` from now on (None: the server's rule).

        Switching ends the current object, as the napari Interactive section does: its segment is kept
        (renamed, so later prompts leave it alone) and accepted (:meth:`accept_segment`): it takes its
        voxels from the node's other segments, the user's own included (Slicer's *Overwrite all*), and
        :attr:`notice` names each segment that lost voxels and how many. The next prompt starts a new
        object answered by the new model only; the old model's prompts cannot be undone or refined by it.

        Args:
            model_id: a promptable model id from :meth:`prompt_models`, or None.
            check: ask the server that ``model_id`` is one of its promptable models first (the widget,
                which offers only ids the server just listed, skips it).
            segmentation_node: the node holding the current object's segment, to keep it.

        Returns:
            the ID of the ended object's segment kept in ``segmentation_node`` (see :meth:`end_object`).

        Raises:
            PromptModelError: ``model_id`` is not a promptable model of the server (nothing changes).
        """
        model_id = None if model_id in (None, "") else str(model_id)
        if check and model_id is not None:
            models = {m["id"]: m for m in self._require().models().get("models", [])}
            promptable = sorted(i for i, m in models.items() if is_promptable(m))
            if model_id not in models:
                raise PromptModelError(f"no model {model_id!r} on the server {self._require().url}; its promptable "
                                       f"models: {', '.join(promptable) or 'none'}")
            if model_id not in promptable:
                raise PromptModelError(f"model {model_id!r} cannot answer prompts: it is a "
                                       f"{models[model_id].get('task', 'segmentation')} model; promptable models: "
                                       f"{', '.join(promptable) or 'none'}")
        if model_id == self._prompt_model:
            return None
        self._prompt_model = model_id
        return self.end_object(segmentation_node)

    def end_object(self, segmentation_node: Any = None) -> Optional[str]:
        """End the current object: its segment is kept under a name of its own and accepted (it takes its voxels
        from the node's other segments; :attr:`notice` says which lost how many), and the next prompt starts a new
        object on the server (before it is sent, a reset naming the prompt model).

        Args:
            segmentation_node: the node holding the object's segment; None: rename it in the node the
                next prompt writes to, before that prompt changes anything.

        Returns:
            the kept segment's ID, or None when there was nothing drawn to keep (or it is kept later).
        """
        if self._retire is None:
            self._retire = (self.object_model,)
        self.mask, self.object_model, self._open_labelmap = None, None, None
        self._fresh_object = True
        return self._retire_segment(segmentation_node) if segmentation_node is not None else None

    def keep_ended_object(self) -> Optional[str]:
        """Keep, now, the segment of an object that ended without its node at hand: renamed and accepted in the node
        that holds it (:meth:`end_object`), the user told what it took. A reconnect ends the object on the worker
        thread that connects, where no MRML may be touched; the Widget calls this on the GUI thread once connected.
        Before, the segment stayed the open *MambaHoME interactive* until the next prompt when the prompt model was
        the server's choice (a chosen model ended it at once, through :meth:`set_prompt_model`); a prompt into
        another node then left it open there, to be overwritten by a later prompt into that node.

        Returns:
            the kept segment's ID, or None (nothing pending, or nothing drawn to keep).
        """
        if self._retire is None or self._open_segment is None:
            return None
        return self._retire_segment(self._open_segment[0])

    def _retire_segment(self, segmentation_node: Any) -> Optional[str]:
        if self._retire is None:
            return None
        (model,), self._retire = self._retire, None
        segmentation = segmentation_node.GetSegmentation()
        segment_id = self.open_segment_id(segmentation_node)
        if not segment_id:
            return None
        rep = segmentation.GetSegment(segment_id).GetRepresentation(LABELMAP)
        scalars = rep.GetPointData().GetScalars() if rep is not None else None
        # numpy's max, not GetRange(): VTK's first range of a whole-volume array is many times slower (GUI thread)
        if scalars is None or scalars.GetNumberOfTuples() == 0 or numpy_support.vtk_to_numpy(scalars).max() == 0:
            segmentation.RemoveSegment(segment_id)  # an empty object leaves nothing worth keeping
            segmentation_node.Modified()
            return None
        base = f"{INTERACTIVE_SEGMENT} ({model or 'server'})"
        name, n = base, 2
        while segmentation.GetSegmentIdBySegmentName(name):
            name, n = f"{base} {n}", n + 1
        open_, self._open_segment = self._open_segment, None  # this rename is the module's: no user's acceptance
        segmentation.GetSegment(segment_id).SetName(name)
        self._accepted_name = name
        if open_ is not None and open_[0] is segmentation_node and open_[1] == segment_id:
            # an ended object is accepted; the module did it, not the user: say which segments lost voxels
            taken = self.accept_segment(segmentation_node, segment_id, open_[2], open_[3])
            if taken:
                self._tell(self.taken_text(name, taken))
        segmentation_node.Modified()
        return segment_id

    def _tell(self, text: str) -> None:
        """Add ``text`` to what the user is told next (:meth:`take_notice`)."""
        self.notice = f"{self.notice}\n\n{text}" if self.notice else text

    @staticmethod
    def taken_text(name: str, taken: Dict[str, int], renamed: bool = False) -> str:
        """What the user is told when an accepted object took voxels from other segments: the module ended it, or
        (``renamed``) the user accepted it by renaming it."""
        lost = ", ".join(f"'{n}' ({v} voxel{'s' if v != 1 else ''})" for n, v in sorted(taken.items()))
        said = (f"The prompted object renamed '{name}' is accepted and" if renamed
                else f"The ended object was kept as segment '{name}' and")
        return (f"{said}, as the Segment Editor's Overwrite all, took its voxels from the node's other segments: "
                f"{lost} lost them (edit the segments in the Segment Editor to give voxels back).")

    @staticmethod
    def open_segment_id(segmentation_node: Any) -> str:
        """The ID of the open object's segment in the node ('' if none): named :data:`INTERACTIVE_SEGMENT` and not
        accepted. An accepted segment (``OBJECT_TAG = "accepted"``) is the user's whatever its name: renamed back to
        the working name, it was deleted by the next prompt, which wrote the new object under that name."""
        segmentation = segmentation_node.GetSegmentation()
        for n in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(n)
            if segment.GetName() != INTERACTIVE_SEGMENT:
                continue
            state = vtk.mutable("")
            if segment.GetTag(OBJECT_TAG, state) and str(state) == "accepted":
                continue
            return segmentation.GetNthSegmentID(n)
        return ""

    @staticmethod
    def accept_segment(segmentation_node: Any, segment_id: str, shape_ijk: Sequence[int],
                       ijk_to_ras: np.ndarray) -> Dict[str, int]:
        """Make segment ``segment_id`` take its voxels from every other segment of the node, as Slicer's Segment
        Editor paints with *Modify other segments: Overwrite all*: afterwards its voxels belong to it only, and the
        other segments lost exactly those voxels (nothing else). Tags it ``OBJECT_TAG = "accepted"``.

        Runs on the GUI thread (a rename in the Segment Editor, the end of an object), so it reads only the object's
        box: the object's voxels are found in its own labelmap, and each labelmap (layer) of the other segments on the
        volume's grid is read and changed in place inside that box only, all the segments sharing it at once (the
        **Segment** result is one layer of many segments); a layer whose extent misses the box is not read at all.
        Only a segment on another grid than the volume's that may reach the box is resampled onto the volume whole,
        as :func:`segment_mask` reads it. Before, every other segment was read, compared and rewritten as a
        whole-volume mask (seconds to minutes on a large CT with many segments, on the GUI thread).

        Args:
            shape_ijk, ijk_to_ras: the grid of the volume the object was drawn on; masks are compared on it.

        Returns:
            ``{name of a segment that lost voxels: how many}``.
        """
        segmentation = segmentation_node.GetSegmentation()
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            return {}
        segment.SetTag(OBJECT_TAG, "accepted")
        if not segmentation.ContainsRepresentation(LABELMAP):
            segmentation.CreateRepresentation(LABELMAP)
        found = _segment_box(segmentation_node, segment_id, shape_ijk, ijk_to_ras)
        taken: Dict[str, int] = {}
        if found is None:
            return taken
        box, mask = found
        others = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
        layers: Dict[str, Tuple[Any, List[str]]] = {}  # labelmap address -> (it, IDs of the segments it holds)
        for other in others:
            rep = segmentation.GetSegment(other).GetRepresentation(LABELMAP) if other != segment_id else None
            if rep is not None:
                layers.setdefault(rep.GetAddressAsString("vtkObject"), (rep, []))[1].append(other)
        counts: Dict[str, int] = {}
        resample: List[str] = []
        for rep, members in layers.values():
            if not _on_grid(rep, ijk_to_ras):
                if _may_meet(rep, box, ijk_to_ras):
                    resample.extend(members)
                continue
            got = _labelmap_view(rep)
            if got is None:
                continue
            view, origin = got
            common = _intersect(box, tuple((o, o + n) for o, n in zip(origin, view.shape)))  # type: ignore[arg-type]
            if common is None:
                continue
            block = view[_local(common, origin)]  # a view: written below in place
            under = mask[_local(common, tuple(lo for lo, _ in box))]
            present = _value_counts(block[under])
            hit = {other: present[_label_value(segmentation.GetSegment(other))] for other in members
                   if present.get(_label_value(segmentation.GetSegment(other)), 0)}
            if not hit:
                continue
            lose = under & np.isin(block, [_label_value(segmentation.GetSegment(other)) for other in hit])
            block[lose] = 0
            rep.GetPointData().GetScalars().Modified()
            rep.Modified()  # Slicer redraws the layer and drops its derived representations (surfaces)
            for other in hit:  # as vtkSegmentationModifier says a segment's labelmap changed
                segmentation.InvokeEvent(slicer.vtkSegmentation.SourceRepresentationModified, other)
                segmentation.InvokeEvent(slicer.vtkSegmentation.RepresentationModified, other)
            counts.update(hit)
        if resample:
            full = np.zeros(tuple(int(s) for s in shape_ijk)[::-1], dtype=bool)
            full[_local(box, (0, 0, 0))] = mask
            full = kji_to_ijk(full)
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            for other in resample:
                theirs = segment_mask(segmentation_node, other, shape_ijk, ijk_to_ras)
                n = int((theirs & full).sum())
                if not n:
                    continue
                theirs &= ~full
                if not logic.SetBinaryLabelmapToSegment(_oriented_mask(theirs, ijk_to_ras), segmentation_node, other,
                                                        logic.MODE_REPLACE):
                    raise RuntimeError(f"{segmentation_node.GetName()}: could not take the accepted object's voxels "
                                       f"from segment '{segmentation.GetSegment(other).GetName()}'")
                counts[other] = n
        for other in others:  # in the node's order, as the segments were taken from
            if counts.get(other):
                taken[segmentation.GetSegment(other).GetName()] = counts[other]
                # what an accepted object took keeps a Segment result Segment's own (not an edit of the user's)
                voxels = vtk.mutable("")
                owner = segmentation.GetSegment(other)
                if owner.GetTag(AUTOMATIC_VOXELS_TAG, voxels) and str(voxels).isdigit():
                    owner.SetTag(AUTOMATIC_VOXELS_TAG, str(max(int(str(voxels)) - counts[other], 0)))
                # its signature is not recomputed (a pass over a CT's layer on the GUI thread): the count decides
                owner.RemoveTag(AUTOMATIC_SIGNATURE_TAG)
        if taken:
            segmentation_node.Modified()
        return taken

    def _watch_renames(self, segmentation_node: Any) -> None:
        """Observe the node's segmentation once: the open object's segment renamed by the user is accepted, and what it
        took from other segments is told (:attr:`notice`, at once through :attr:`on_notice`)."""
        segmentation = segmentation_node.GetSegmentation()
        if id(segmentation) in self._observed:
            return

        def renamed(caller: Any, event: Any) -> None:
            open_ = self._open_segment
            if self._accepting or open_ is None or open_[0].GetSegmentation() is not caller:
                return
            segment = caller.GetSegment(open_[1])
            if segment is None:  # removed (e.g. Reset rewrites it): nothing to accept
                return
            if segment.GetName() == INTERACTIVE_SEGMENT:
                return
            self._accepting, self._open_segment = True, None
            try:
                # accepted: the next prompt starts a new object (the renamed segment is not written again)
                self.end_object(None)
                self._retire = None
                self._accepted_name = segment.GetName()
                taken = self.accept_segment(open_[0], open_[1], open_[2], open_[3])
            finally:
                self._accepting = False
            if taken:  # said as when the module ends an object; the user is in the Segment Editor: said at once
                self._tell(self.taken_text(segment.GetName(), taken, renamed=True))
                if self.on_notice is not None:
                    self.on_notice()

        tag = segmentation.AddObserver(slicer.vtkSegmentation.SegmentModified, renamed)
        self._observed[id(segmentation)] = (segmentation, tag)

    # ------------------------------------------------------------------ segmentation
    def segment(self, volume_node: Any, segmentation_node: Any, model_id: Optional[str] = None,
                modality: Optional[str] = None) -> Segmentation:
        """Segment the volume on the server and put one segment per class into ``segmentation_node`` (replacing only
        the segments an earlier **Segment** wrote there, see :meth:`set_segments`).

        Raises:
            SegmentModelError: the model that would segment (``model_id``, else the server's active one) is a
                promptable model; refused before the volume is uploaded.
        """
        self.check_segment_model(model_id)
        check_segmentation(segmentation_node)
        seg = self.on_live_session(self.session_for(volume_node, modality),
                                   lambda sid: self.segment_session(sid, model_id),
                                   lambda: self.session_for(volume_node, modality))
        self.show_segmentation(segmentation_node, volume_node, seg)
        return seg

    def check_segment_model(self, model_id: Optional[str] = None) -> Optional[str]:
        """The id of the model that segments (``model_id``, else the server's active model, from the model list this
        Logic last read), refused when it is a promptable model: the server would refuse it only after the upload.
        Without a list read yet (the Widget reads one on Connect) nothing is asked here; :meth:`segment_session`
        words the server's refusal the same way.

        Raises:
            SegmentModelError: the model answers prompts only.
        """
        listing = self._listing
        if listing is None:
            return str(model_id) if model_id else None
        chosen = model_id or listing.get("active")
        record = {m.get("id"): m for m in listing.get("models", [])}.get(chosen)
        if record is not None and is_promptable(record):
            raise SegmentModelError(promptable_segment_text(str(chosen)))
        return str(chosen) if chosen else None

    def segment_session(self, session_id: str, model_id: Optional[str] = None) -> Segmentation:
        """``Client.segment`` with the server's refusal of a promptable model in this module's words (the model list
        :meth:`check_segment_model` read may be older than another client's choice of the active model). Touches no
        MRML: the Widget's worker thread calls it."""
        try:
            return self._require().segment(session_id, model_id=model_id)
        except ServerError as exc:
            if exc.code != "not_segmentation":
                raise
            self._listing = None  # out of date: read again by the next check
            raise SegmentModelError(promptable_segment_text(model_id or "the server's active model")) from None

    def segmenting_text(self, model_id: Optional[str], elapsed_s: float = 0.0) -> str:
        """The status line while **Segment** waits for the server (the server reports no progress of a segmentation):
        the seconds so far, and on the first segmentation with a model on this connection that the server loads the
        model first, which on a CPU server takes about a minute."""
        line = f"Segmenting on the server{f' with {model_id}' if model_id else ''}..."
        if elapsed_s >= 1.0:
            line += f" {elapsed_s:.0f} s"
        if model_id not in self._segmented_with:
            line += (" The first segmentation with a model loads it on the server: on a server without a GPU it may "
                     "take a minute or more.")
        return line

    def show_segmentation(self, segmentation_node: Any, volume_node: Any, seg: Segmentation) -> str:
        """Put a server's segmentation into ``segmentation_node`` (one segment per class) and say so: returns the
        status line the module shows, which ends with each of the server's warnings (e.g. a model that never saw
        the volume's modality: the result may be poor); each warning is also logged (Slicer's Error Log),
        never a dialog. Touches MRML: call on the GUI thread.

        When the node holds segments besides an earlier **Segment** result (the user's own, accepted prompted objects,
        renamed automatic ones), the line names those kept and the earlier result's segments replaced, and how many
        voxels of the server's result were left to the kept segments (see :meth:`write_segments`)."""
        segmentation = segmentation_node.GetSegmentation()
        automatic = self.automatic_segment_ids(segmentation_node)
        kept = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())
                if segmentation.GetNthSegmentID(n) not in automatic]
        replaced = [segmentation.GetSegment(i).GetName() for i in automatic]
        _, total, left = self.write_segments(segmentation_node, volume_node, seg.labels, seg.class_names, seg.colors,
                                             model_id=seg.model_id, automatic=automatic)
        self.class_names = list(seg.class_names)
        self._segmented_with.add(seg.model_id)
        for warning in seg.warnings:
            logging.warning("MambaHoME: %s", warning)
        for note in getattr(seg, "notes", None) or []:  # no doubt on the result: the Error Log's info level
            logging.info("MambaHoME: %s", note)
        said = ""
        if kept:  # a node of Segment results only is replaced as it always was: nothing of the user's to account for
            said = f"kept your other segments ({', '.join(kept)})"
            held = [name for name in seg.class_names[1:] if name in kept]
            if held:  # edited Segment results, or the user's own of a class's name: never replaced without a word
                said += (f"; did not write the new {', '.join(held)}: your segment{'s' if len(held) > 1 else ''} of "
                         f"{'those classes' if len(held) > 1 else 'that class'} stay (delete or rename "
                         f"{'them' if len(held) > 1 else 'it'} and Segment again to take the model's)")
            if replaced:
                said += f"; replaced the previous Segment result ({', '.join(replaced)})"
            if total:  # never a silent difference between the server's result and the node's segments
                said += (f"; left {total} voxel{'s' if total != 1 else ''} of the result to your segments "
                         f"({', '.join(f'{name}: {n}' for name, n in left.items())}): the new segments leave them out")
        return self.segmentation_text(seg, said)

    @staticmethod
    def automatic_segment_ids(segmentation_node: Any) -> List[str]:
        """IDs of the segments an earlier :meth:`set_segments` wrote and the user has neither renamed nor edited since
        (edited: its voxels' signature is not the :data:`AUTOMATIC_SIGNATURE_TAG` it was written with, or, in a scene
        saved before signatures, its count not the :data:`AUTOMATIC_VOXELS_TAG`; one pass per labelmap layer, not a
        mask per segment)."""
        segmentation = segmentation_node.GetSegmentation()
        ids = []
        counts: Dict[str, Optional[np.ndarray]] = {}  # labelmap address -> voxels per label value
        signatures: Dict[str, Optional[Dict[int, str]]] = {}  # labelmap address -> signature per label value
        for n in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(n)
            written, voxels, signed = vtk.mutable(""), vtk.mutable(""), vtk.mutable("")
            if not (segment.GetTag(AUTOMATIC_TAG, written) and str(written) == segment.GetName()):
                continue
            if segment.GetTag(AUTOMATIC_SIGNATURE_TAG, signed) and str(signed):
                rep = segment.GetRepresentation(LABELMAP)
                if rep is None:
                    continue  # no labelmap any more: not what Segment wrote
                key = rep.GetAddressAsString("vtkObject")
                if key not in signatures:
                    signatures[key] = _label_signatures(_labelmap_view(rep))
                now = (signatures[key] or {}).get(_label_value(segment), "0:0")
                if now != str(signed):
                    continue  # edited: the user's now
            elif segment.GetTag(AUTOMATIC_VOXELS_TAG, voxels) and str(voxels).isdigit():  # a scene saved before
                rep = segment.GetRepresentation(LABELMAP)
                if rep is None:
                    continue  # no labelmap any more: not what Segment wrote
                key = rep.GetAddressAsString("vtkObject")
                if key not in counts:
                    view = _labelmap_view(rep)
                    counts[key] = (_label_counts(view[0])
                                   if view is not None and np.issubdtype(view[0].dtype, np.integer) else None)
                got, value = counts[key], _label_value(segment)
                now = int(got[value]) if got is not None and 0 <= value < len(got) else 0
                if now != int(str(voxels)):
                    continue  # edited: the user's now
            ids.append(segmentation.GetNthSegmentID(n))
        return ids

    @staticmethod
    def segmentation_text(seg: Segmentation, segments: str = "") -> str:
        """The status line of a finished segmentation: the model and time, then ``Warning: ...`` for each of the
        server's warnings, then ``Note: ...`` for each of its notes (a fallback to the CPU that explains a slow
        answer, a NIfTI file that Slicer places differently from the server); none from servers before them."""
        line = f"Segmented with {seg.model_id} in {seg.seconds:.1f} s"
        if segments:  # what happened to the node's segments: never a silent replacement
            line += f"; {segments}"
        said = ([f"Warning: {w}" for w in getattr(seg, "warnings", None) or []]
                + [f"Note: {n}" for n in getattr(seg, "notes", None) or []])
        return f"{line}. " + " ".join(said) if said else line

    @staticmethod
    def set_segments(segmentation_node: Any, volume_node: Any, labels_ijk: np.ndarray, class_names: Sequence[str],
                     colors: Sequence[Sequence[float]], model_id: Optional[str] = None) -> List[str]:
        """Put one segment per class (label value 1..) of ``labels_ijk`` into ``segmentation_node``, replacing the
        segments an earlier call wrote (tagged :data:`AUTOMATIC_TAG`, not renamed since) and keeping every other one;
        the new segments leave out the kept segments' voxels (see :meth:`write_segments`).

        A class the user holds a segment of (a renamed or edited earlier result, their own segment of that name) is
        not written: their segment stands for it.

        Returns:
            the new segment IDs, in class order.
        """
        return MambaHoMELogic.write_segments(segmentation_node, volume_node, labels_ijk, class_names, colors,
                                             model_id=model_id)[0]

    @staticmethod
    def user_segment_ids(segmentation_node: Any, automatic: Optional[Sequence[str]] = None) -> List[str]:
        """IDs of the node's segments whose voxels are the user's: every segment but the automatic ones
        (:meth:`automatic_segment_ids`) and the open prompted object (named :data:`INTERACTIVE_SEGMENT`, tagged
        ``OBJECT_TAG = "open"``), whose voxels prompts still change (Undo, negative points must give them back); it
        takes its voxels once accepted (:meth:`accept_segment`). ``automatic``: those IDs, when the caller has them
        (each reading counts the labelmap's voxels)."""
        segmentation = segmentation_node.GetSegmentation()
        automatic = set(MambaHoMELogic.automatic_segment_ids(segmentation_node) if automatic is None else automatic)
        ids = []
        for n in range(segmentation.GetNumberOfSegments()):
            segment_id, segment = segmentation.GetNthSegmentID(n), segmentation.GetNthSegment(n)
            state = vtk.mutable("")
            if segment_id in automatic or (segment.GetName() == INTERACTIVE_SEGMENT
                                           and segment.GetTag(OBJECT_TAG, state) and str(state) == "open"):
                continue
            ids.append(segment_id)
        return ids

    @staticmethod
    def write_segments(segmentation_node: Any, volume_node: Any, labels_ijk: np.ndarray, class_names: Sequence[str],
                       colors: Sequence[Sequence[float]], model_id: Optional[str] = None,
                       automatic: Optional[Sequence[str]] = None) -> Tuple[List[str], int, Dict[str, int]]:
        """:meth:`set_segments`, also saying which voxels of ``labels_ijk`` were left to the user's segments.

        The segments the user owns (:meth:`user_segment_ids`: hand-drawn, accepted prompted objects, renamed automatic
        segments) are corrections and win: the new automatic segments leave out every voxel of theirs, so no voxel is
        in two segments. Before, the new segments overlapped them (an accepted 'lesion' inside the automatic 'liver')
        and the node saved as ``.seg.nrrd`` was refused by the engine as a training case ("segments overlap"). The
        kept segments are not changed. The new segments share one labelmap (label value = class index), as Slicer's
        Segment Editor keeps them.

        Before the keeping of segments, every segment of the node was removed: prompted objects the user had accepted
        and renamed vanished with one press of Segment, without a word.

        Returns:
            ``(the new segment IDs in class order, voxels of the result left out, {name of a kept segment: voxels of
            the result it kept})``; a voxel in two kept segments counts once in the total, in both in the dict.
        """
        m = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(m)
        ijk_to_ras = _matrix_to_numpy(m)
        segmentation = segmentation_node.GetSegmentation()
        labels = np.array(labels_ijk, copy=True)
        left: Dict[str, int] = {}
        total = 0
        if automatic is None:  # read once: replaced below, and every other segment is the user's
            automatic = MambaHoMELogic.automatic_segment_ids(segmentation_node)
        users = MambaHoMELogic.user_segment_ids(segmentation_node, automatic)
        if users:
            theirs = np.zeros(labels.shape, dtype=bool)
            result = labels > 0
            for segment_id in users:  # on the volume grid, read before anything of the node changes
                mask = segment_mask(segmentation_node, segment_id, labels.shape, ijk_to_ras)
                n = int((mask & result).sum())
                if n:
                    left[segmentation.GetSegment(segment_id).GetName()] = n
                theirs |= mask
            total = int((theirs & result).sum())
            labels[theirs] = 0
        # a class the user holds a segment of (an edited automatic one, their own of that name) is theirs: a second
        # segment of the name would make the node's classes repeat (a saved case refused late, by the server)
        held = {segmentation.GetSegment(sid).GetName() for sid in users}
        for value in range(1, len(class_names)):
            if str(class_names[value]) in held:
                labels[labels == value] = 0
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        MambaHoMELogic.remove_segments(segmentation_node, automatic)
        _set_source_representation(segmentation)
        ids = []
        shared = _oriented_mask(labels, ijk_to_ras)
        signed = _label_signatures(_labelmap_view(shared)) or {}  # one pass: each segment's count and signature
        written = {value: int(sign.split(":")[0]) for value, sign in signed.items()}
        for value in range(1, len(class_names)):
            if str(class_names[value]) in held:
                continue
            segment = slicer.vtkSegment()
            segment.SetName(str(class_names[value]))
            segment.SetColor(*[float(c) for c in colors[value][:3]])
            segment.SetLabelValue(value)
            segment.SetTag(AUTOMATIC_TAG, str(class_names[value]))
            segment.SetTag(AUTOMATIC_VOXELS_TAG, str(written.get(value, 0)))
            segment.SetTag(AUTOMATIC_SIGNATURE_TAG, signed.get(value, "0:0"))
            if model_id:
                segment.SetTag(f"{AUTOMATIC_TAG}.model", str(model_id))
            segment.AddRepresentation(LABELMAP, shared)
            segmentation.AddSegment(segment)
            ids.append(segmentation.GetSegmentIdBySegment(segment))
        segmentation_node.Modified()
        return ids, total, left

    @staticmethod
    def remove_segments(segmentation_node: Any, segment_ids: Sequence[str]) -> None:
        """Remove segments from the node, each labelmap (layer) they share with other segments read once.

        Slicer's ``vtkSegmentation.RemoveSegment`` first separates a segment from the labelmap it shares: two passes of
        VTK's threshold over the whole layer for every segment (about 0.25 s each on a 512x512x400 CT here, 24 s for
        the 100 segments of one **Segment** result). Here each removed segment first gets an empty labelmap of its own
        (there is nothing left to separate), and a layer that stays (it holds segments that are kept) loses the removed
        segments' label values in one pass; the kept segments' voxels, label values and labelmap are those the one by
        one removal leaves.
        """
        segmentation = segmentation_node.GetSegmentation()
        gone = [sid for sid in dict.fromkeys(segment_ids) if segmentation.GetSegment(sid) is not None]
        if not gone:
            return
        removing = set(gone)
        layers: Dict[str, Tuple[Any, List[str], List[str]]] = {}  # labelmap address -> (it, removed IDs, kept IDs)
        for n in range(segmentation.GetNumberOfSegments()):
            rep = segmentation.GetNthSegment(n).GetRepresentation(LABELMAP)
            if rep is not None:
                sid = segmentation.GetNthSegmentID(n)
                entry = layers.setdefault(rep.GetAddressAsString("vtkObject"), (rep, [], []))
                entry[1 if sid in removing else 2].append(sid)
        quiet = hasattr(segmentation, "SetSegmentModifiedEnabled")  # Slicer: no SegmentModified per detached segment
        was = segmentation.GetSegmentModifiedEnabled() if quiet else None
        if quiet:
            segmentation.SetSegmentModifiedEnabled(False)
        try:
            for rep, removed, kept in layers.values():
                if not removed or len(removed) + len(kept) < 2:
                    continue  # a labelmap of its own: Slicer removes it without a pass over it
                if kept:
                    ours = {_label_value(segmentation.GetSegment(sid)) for sid in kept}
                    theirs = sorted({_label_value(segmentation.GetSegment(sid)) for sid in removed} - ours)
                    got = _labelmap_view(rep)
                    if got is not None and theirs:
                        view = got[0]
                        view[np.isin(view, theirs)] = 0
                        rep.GetPointData().GetScalars().Modified()
                        rep.Modified()
                for sid in removed:
                    empty = slicer.vtkOrientedImageData()
                    empty.SetExtent(0, -1, 0, -1, 0, -1)
                    empty.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
                    m = vtk.vtkMatrix4x4()
                    rep.GetImageToWorldMatrix(m)
                    empty.SetImageToWorldMatrix(m)
                    segmentation.GetSegment(sid).AddRepresentation(LABELMAP, empty)
        finally:
            if quiet:
                segmentation.SetSegmentModifiedEnabled(was)
        for sid in gone:
            segmentation.RemoveSegment(sid)

    @staticmethod
    def labels_from_segmentation(segmentation_node: Any, volume_node: Any,
                                 class_names: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, List[str]]:
        """The segments as one label map ``(I, J, K)`` on the volume grid, a class per segment name.

        Classes are numbered by name, not by the segments' order in the node: first ``class_names`` (the model's,
        ``class_names[0]`` the background; a class with no segment stays, empty), then every other name in the node's
        order. Numbered by order, a case whose user drew a segment before pressing Segment, or deleted a wrong class,
        came out as another label set than the cases saved before it, and the server refused it ("disagree with
        case ...") although every name matched. Segments of one name form one class.

        Returns:
            ``(labels uint8/uint16, ["background", class names...])``; later segments win overlaps.
        """
        check_segmentation(segmentation_node)
        m = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(m)
        ijk_to_ras = _matrix_to_numpy(m)
        shape = volume_node.GetImageData().GetDimensions()
        segmentation = segmentation_node.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(idx) for idx in range(segmentation.GetNumberOfSegments())]
        segment_names = [segmentation.GetSegment(segment_id).GetName() for segment_id in ids]
        if "background" in segment_names:
            # its voxels became label 0, and erased every segment under it, without a word
            raise ValueError(f"{segmentation_node.GetName()}: a segment is named 'background', the name of label 0 "
                             "(no class): rename it to its class in the Segment Editor, or delete it, before saving "
                             "the case")
        names = ["background"] + [str(c) for c in (class_names or [])[1:]]
        names += [name for name in dict.fromkeys(segment_names) if name not in names]
        labels = np.zeros(shape, dtype=np.uint16 if len(names) > 256 else np.uint8)
        for segment_id, name in zip(ids, segment_names):
            labels[segment_mask(segmentation_node, segment_id, shape, ijk_to_ras)] = names.index(name)
        while len(names) > 2 and names[-1] not in segment_names:  # the model's last classes, none drawn: left out
            names.pop()
        return labels, names

    # ------------------------------------------------------------------ prompts
    def _send(self, session_id: str, segmentation_node: Any, volume_node: Any,
              call: Callable[..., MaskUpdate], *args: Any, take_painting: bool = False, **kwargs: Any) -> MaskUpdate:
        """One prompt call of the client, answered by the chosen model, and its answer applied.

        After a switch of model the server is first told to start a fresh object (a reset naming the
        model), so its answer never continues the previous object; a refused call changes nothing here.
        ``take_painting`` (a point, a box): what the user painted into or erased from the open segment since the last
        answer first becomes the server's object (:meth:`_take_painting`), so the answer refines it.
        """
        client = self._require()
        check_segmentation(segmentation_node)

        def answered(fn: Callable[..., MaskUpdate], *a: Any, **kw: Any) -> MaskUpdate:
            try:
                return fn(*a, **kw)
            except SessionChangedError:
                # Another client (napari, a second Slicer) changed this object on the server since our last answer:
                # the server applied this change too, but its answer is a patch of a mask this scene no longer
                # matches. The whole object is read instead (the client counts revisions from it again), so the
                # segment shows exactly what the server's Undo and next prompt work on.
                self.notice = (f"Another client changed this object on the server {client.url}. The segment "
                               f"'{INTERACTIVE_SEGMENT}' was reloaded with the server's object, that client's prompts "
                               "included; Undo now takes back the newest prompt on the server, whoever made it.")
                return client.object_mask(session_id)

        try:
            # a Reset, or a segment to refine sent as the object's mask, replaces the painting anyway
            self._catch_up(session_id, segmentation_node, volume_node,
                           keep_painting=take_painting or call == client.undo)
            if self._fresh_object and call != client.reset:
                self._apply(answered(client.reset, session_id, model_id=self._prompt_model), segmentation_node,
                            volume_node)
                self._fresh_object = False
            elif take_painting:
                self._take_painting(session_id, segmentation_node, volume_node, answered)
            update = answered(call, session_id, *args, model_id=self._prompt_model, **kwargs)
        except NotFoundError as exc:
            if not _session_gone(exc):
                raise
            # The server dropped the idle session with the object's prompt history: the next prompt uploads the
            # volume again and starts a new object; what is drawn stays in its segment.
            for key in self.forget_session(session_id):
                self._expired_points = (key, dict(self._sent_points))
            self.end_object(segmentation_node)
            raise RuntimeError("the server no longer holds this volume's session (it sat idle too long, or the server "
                               "was restarted), and this prompt was not answered; the current object stays as drawn. "
                               "Send it again: the volume is uploaded again and a new object starts with it") from None
        except ServerTimeoutError as exc:
            # Given up (the GUI thread waited long enough). The server may still apply it: the next prompt here first
            # takes its object (:meth:`_catch_up`), so a late answer is neither lost nor taken for another client's.
            self._unanswered[session_id] = client.revision(session_id)
            raise PromptTimeoutError(self.timeout_text(exc.timeout_s, call)) from None
        self._fresh_object = False
        return self._apply(update, segmentation_node, volume_node)

    def timeout_text(self, seconds: float, call: Optional[Callable[..., Any]] = None) -> str:
        """What the user is told when the server did not answer a prompt within ``seconds``."""
        client = self._require()
        button, retry = "the button", ""
        if call == client.add_point:
            button, retry = "Send new points", " The points not answered are still unsent: that sends them."
        elif call == client.add_box:
            button = "Send box"
        elif call == client.undo:
            button = "Undo"
        elif call == client.reset:
            button = "Reset"
        return (f"The server {client.url} did not answer within {seconds:g} s, so this prompt was given up and nothing "
                "changed here. The server may be stopped or overloaded, or the connection to it (an SSH tunnel) may "
                "be down: check that `mambahome serve` is still running there and that the tunnel is up (Connect "
                f"again for a new tunnel's address), then press {button} again.{retry} The module first takes the "
                "server's object, in case the server applied the prompt late.")

    def _catch_up(self, session_id: str, segmentation_node: Any, volume_node: Any, keep_painting: bool = True) -> None:
        """Before a prompt after one given up (:data:`PROMPT_TIMEOUT_S`): read the server's object. A server that
        applied the given-up request late (a stopped server resumed) changed the object without this module seeing the
        answer: its next answer was then taken for another client's change (a reload and a warning saying so). Unchanged
        (the request never reached the model), nothing is written; changed, the segment is reloaded with the server's
        object and the user told so. Times out again as a prompt does while the server still does not answer.

        With ``keep_painting`` (before a point, a box, Undo), what the user painted into (or erased from) the open
        segment since the last answer, not sent yet, is kept: it is drawn again over the reloaded object, voxel for
        voxel where it differs from the object the module knew, and stays a painting to be taken (the point or box that
        follows sends it first, :meth:`_take_painting`), as Undo keeps it (:meth:`_keep_painting`); the user is told.
        The user's strokes are newer than the late answer, which never saw them. Before, the reload rewrote the segment
        from the server's object and the painting was gone without a word."""
        if session_id not in self._unanswered:
            return
        known = self._unanswered[session_id]
        # forgotten only once read: a read that fails (a resumed server still busy with the given-up prompt answers
        # 503; a restarted tunnel refuses) leaves it for the next prompt, else that prompt's answer was taken for
        # another client's change. Read also when the object ended here since (another volume was prompted): the
        # client counts revisions from this read again, so the reset that starts the next object does not take the
        # late change for another client's.
        update = self._require().object_mask(session_id)
        self._unanswered.pop(session_id, None)
        if known is not None and update.revision == known:
            return
        if self._fresh_object or (self.mask is None and not update.mask.any()):
            return  # no object open here: the next step starts one (a reset, or the first answer)
        # read before the reload rewrites the segment
        painting = self._painting(segmentation_node, volume_node) if keep_painting else None
        changed = None
        if painting is not None:
            region, painted = painting
            changed = painted != ijk_to_kji(self.mask)[_local(region, (0, 0, 0))]
        said = (f"The server answered a prompt it had not answered in time after all: the segment "
                f"'{INTERACTIVE_SEGMENT}' was reloaded with the server's object before this prompt.")
        self._apply(update, segmentation_node, volume_node)
        if painting is not None and self.mask is not None:
            self._keep_painting(segmentation_node, volume_node, painting[0], painting[1], changed)
            said += (" Your painting in it since the last answer was kept, drawn over the server's object: a point or "
                     "box sends it to the server first (Reset clears it).")
        self._tell(said)

    def take_notice(self) -> Optional[str]:
        """What the last prompts' answers left to tell the user (None: nothing), cleared once read."""
        notice, self.notice = self.notice, None
        return notice

    def _apply(self, update: MaskUpdate, segmentation_node: Any, volume_node: Any) -> MaskUpdate:
        """Write a prompt answer (the box of the volume it changed and the object's mask there) into :attr:`mask` and
        the open object's segment, the *MambaHoME interactive* segment of ``segmentation_node``.

        Runs on the GUI thread at every prompt, Undo and Reset, so it costs the answer's box, not the volume: the
        segment's labelmap, on the volume's grid, spans only the box of the object's voxels (Slicer's effective extent),
        widened when an answer draws outside it, and an answer is written into it in place, in the box it changed only;
        Slicer is told as for the accept's in-place edits (the labelmap modified, the segment's representation
        modified). Before, every answer replaced the segment by a new whole-volume labelmap built from the whole mask
        (0.6-1.1 s for every answer on a 512x512x400 CT; now 1-6 ms). The segment is written anew (removed, added again
        under its ID, holding the object's box of :attr:`mask`) for a new object, and when something else changed its
        labelmap since the last answer (it was moved into a shared layer, deleted, or painted and not taken): it then
        shows :attr:`mask` exactly, as before. A painting by the user is not lost so: a point or a box sends it to the
        server first (:meth:`_take_painting`), Undo draws it again over its answer (:meth:`_keep_painting`), and Reset
        clears it with the object.
        """
        if self.object_model is not None and update.model_id is not None and update.model_id != self.object_model:
            # The server's rule moved to another model (e.g. a new active model): it started a new object.
            self.end_object(segmentation_node)
            self._fresh_object = False
        self._retire_segment(segmentation_node)  # an object ended without its node: keep it before writing
        if update.model_id is not None:
            self.object_model = update.model_id
        new_object = self.mask is None
        if new_object:
            # zeros from the OS (calloc): only the pages of the boxes the answers write are ever touched
            self.mask = np.zeros(volume_node.GetImageData().GetDimensions(), dtype=bool)
            self._object_box = None
        update.apply(self.mask)
        shape = tuple(int(v) for v in self.mask.shape)
        box = _update_box(update, shape)
        values = ijk_to_kji(self.mask[tuple(slice(lo, hi) for lo, hi in box[::-1])]) if box is not None else None
        drawn = _nonzero_box(values) if values is not None else None
        drawn = _shifted(drawn, tuple(lo for lo, _ in box)) if drawn is not None else None  # type: ignore[arg-type]
        # outside the old box the mask is unchanged, inside the answer's box it is the answer
        if box is not None and self._object_box is not None and _contains(box, self._object_box):
            self._object_box = drawn
        else:
            self._object_box = _union(self._object_box, drawn)
        m = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(m)
        ijk_to_ras = _matrix_to_numpy(m)
        segmentation = segmentation_node.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
            _set_source_representation(segmentation)
        segment_id = self.open_segment_id(segmentation_node)
        if new_object or not segment_id or not self._write_open_box(segmentation_node, segment_id, shape, ijk_to_ras,
                                                                   box, values, drawn):
            self._write_open_segment(segmentation_node, segment_id, shape, ijk_to_ras)
        self._watch_renames(segmentation_node)
        self._accepted_name = None
        segmentation_node.Modified()
        return update

    def _write_open_box(self, segmentation_node: Any, segment_id: str, shape: Tuple[int, ...], ijk_to_ras: np.ndarray,
                        box: Optional[Box], values: Optional[np.ndarray], drawn: Optional[Box]) -> bool:
        """Write an answer's box ``values`` ``(K, J, I)`` into the open segment's labelmap in place, widening it to
        ``drawn`` (the box of the answer's voxels) when needed; False (nothing written) when that labelmap is not the
        one the last answer left (something else changed or replaced it), shares a layer with other segments, or lies on
        another grid: the segment is then written anew."""
        open_, known = self._open_segment, self._open_labelmap
        segmentation = segmentation_node.GetSegmentation()
        segment = segmentation.GetSegment(segment_id)
        rep = segment.GetRepresentation(LABELMAP) if segment is not None else None
        if (rep is None or known is None or rep is not known[0] or rep.GetMTime() != known[1] or open_ is None
                or open_[0] is not segmentation_node or open_[1] != segment_id or tuple(open_[2]) != shape
                or not np.allclose(open_[3], ijk_to_ras) or not _on_grid(rep, ijk_to_ras)
                or rep.GetScalarType() != vtk.VTK_UNSIGNED_CHAR
                or len(segmentation.GetSegmentIDsForLayer(segmentation.GetLayerIndex(segment_id))) != 1):
            return False
        extent = _extent_box(rep)
        if extent is not None and _labelmap_view(rep) is None:
            return False
        if drawn is not None and (extent is None or not _contains(extent, drawn)):
            extent = _union(extent, drawn)
            _grow_labelmap(rep, extent)  # type: ignore[arg-type]
        # outside the labelmap's extent the answer holds no voxel (``drawn`` lies inside it): nothing to write there
        common = _intersect(box, extent) if box is not None and extent is not None else None
        if common is None:  # the answer changed nothing the labelmap holds
            self._open_labelmap = (rep, rep.GetMTime())
            return True
        view, origin = _labelmap_view(rep)  # type: ignore[misc]
        target = view[_local(common, origin)]
        label = _label_value(segment)
        if drawn is None:  # no voxel of the object in the box (a Reset, an Undo back to nothing)
            target[...] = 0
        elif label == 1:
            _copy_swapped(target, values[_local(common, tuple(lo for lo, _ in box))])  # type: ignore[index]
        else:
            target[...] = values[_local(common, tuple(lo for lo, _ in box))] * np.uint8(label)  # type: ignore[index]
        rep.GetPointData().GetScalars().Modified()
        rep.Modified()  # Slicer redraws the labelmap and drops its derived representations (surfaces)
        segmentation.InvokeEvent(slicer.vtkSegmentation.SourceRepresentationModified, segment_id)
        segmentation.InvokeEvent(slicer.vtkSegmentation.RepresentationModified, segment_id)
        self._open_labelmap = (rep, rep.GetMTime())
        return True

    def _write_open_segment(self, segmentation_node: Any, segment_id: str, shape: Tuple[int, ...],
                            ijk_to_ras: np.ndarray) -> None:
        """(Re)write the open object's segment: removed if there, added again under its ID (a new one for a new
        object) with a labelmap of the object's box of :attr:`mask` only, on the volume's grid."""
        segmentation = segmentation_node.GetSegmentation()
        if segment_id:
            segmentation.RemoveSegment(segment_id)
        segment = slicer.vtkSegment()
        segment.SetName(INTERACTIVE_SEGMENT)
        segment.SetColor(0.95, 0.77, 0.06)
        segment.SetTag(OBJECT_TAG, "open")
        box = self._object_box
        values = ijk_to_kji(self.mask)[_local(box, (0, 0, 0))] if box is not None else None
        image = _box_labelmap(values, tuple(lo for lo, _ in box) if box is not None else (0, 0, 0), ijk_to_ras)
        segment.AddRepresentation(LABELMAP, image)
        # Ended objects keep their segment (and ID) under another name: a new object gets a new ID.
        segment_id = segment_id or segmentation.GenerateUniqueSegmentID(INTERACTIVE_SEGMENT_ID)
        self._open_segment, self._open_labelmap = None, None  # (re)adding it is no rename
        if not segmentation.AddSegment(segment, segment_id):
            raise RuntimeError(f"{segmentation_node.GetName()}: could not add the interactive segment")
        self._open_segment = (segmentation_node, segment_id, shape, ijk_to_ras)
        self._open_labelmap = (image, image.GetMTime())

    def _painting(self, segmentation_node: Any, volume_node: Any) -> Optional[Tuple[Box, np.ndarray]]:
        """What the open object's segment holds where it differs from :attr:`mask` (the user painted into it or erased
        from it with the Segment Editor since the last answer wrote it): ``(a box of the volume ((K, J, I), half-open)
        outside which neither holds a voxel, the segment's voxels there (K, J, I) bool)``; None when they are the same,
        and when there is no open segment in ``segmentation_node`` to read (deleted: the next answer writes it anew from
        the object, as before).

        Called on the GUI thread before every point, box and Undo, so it reads nothing while the segment's labelmap is
        the one the last answer left, unmodified since (its MTime): the common case costs no voxel. Otherwise it reads
        the labelmap's extent and the object's box only, not the volume; only a labelmap on another grid than the
        volume's is resampled onto the volume whole (as :func:`segment_mask` reads it).
        """
        mask, open_, known = self.mask, self._open_segment, self._open_labelmap
        if mask is None or self._fresh_object or open_ is None or open_[0] is not segmentation_node:
            return None
        segment_id = self.open_segment_id(segmentation_node)
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
        rep = segment.GetRepresentation(LABELMAP) if segment is not None and segment_id == open_[1] else None
        if rep is None:
            return None
        if known is not None and rep is known[0] and rep.GetMTime() == known[1]:
            return None
        shape = tuple(int(n) for n in mask.shape)
        m = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(m)
        ijk_to_ras = _matrix_to_numpy(m)
        if tuple(open_[2]) != shape or not np.allclose(open_[3], ijk_to_ras):
            return None  # drawn on another grid: the next answer writes the segment anew, as before
        volume: Box = tuple((0, n) for n in shape[::-1])  # type: ignore[assignment]
        extent = _extent_box(rep) if _on_grid(rep, ijk_to_ras) else None
        got = _labelmap_view(rep) if extent is not None else None
        if _on_grid(rep, ijk_to_ras) and (extent is None or got is not None):
            inside = _intersect(extent, volume) if extent is not None else None
            region = _union(inside, self._object_box)
            if region is None:  # neither holds a voxel
                return None
            painted = np.zeros(tuple(hi - lo for lo, hi in region), dtype=bool)
            if inside is not None:
                view, origin = got  # type: ignore[misc]
                painted[_local(inside, tuple(lo for lo, _ in region))] = (view[_local(inside, origin)]
                                                                          == _label_value(segment))
        else:  # resampled onto the volume (or a labelmap this module cannot read in place)
            region = volume
            painted = ijk_to_kji(segment_mask(segmentation_node, segment_id, shape, ijk_to_ras))
        if np.array_equal(painted, ijk_to_kji(mask)[_local(region, (0, 0, 0))]):
            if known is not None and rep is known[0]:  # e.g. painted and undone in the Segment Editor: cheap again
                self._open_labelmap = (rep, rep.GetMTime())
            return None
        return region, painted

    def _take_painting(self, session_id: str, segmentation_node: Any, volume_node: Any,
                       answered: Callable[..., MaskUpdate]) -> None:
        """Before a point or a box: make what the user painted into (or erased from) the open segment the server's
        object, so the answer refines it and the painting outside the box the answer changed stays exactly as painted.
        Before, the server answered from its own previous mask, which never saw the painting, and the answer then
        rewrote the segment from that mask: the painting was lost without a word.

        The segment's mask is sent as the object's new mask (``set_initial_mask``), one step of the server's history:
        Undo after the prompt goes back to the painted mask, a second Undo to the object before the painting. An
        emptied segment (all its voxels erased) clears the object, as Reset does. Nothing is read or sent when nothing
        was painted (:meth:`_painting`). The server's call and the segment's write run in this one GUI-thread call (the
        Widget prompts on the GUI thread), so no stroke can land between reading the painting and writing the answer.
        """
        found = self._painting(segmentation_node, volume_node)
        if found is None:
            return
        region, painted = found
        client = self._require()
        if not painted.any():
            update = answered(client.reset, session_id, model_id=self._prompt_model)
        else:
            # written into the object's mask in place (no whole-volume copy), put back if the server refuses it
            ours = ijk_to_kji(self.mask)[_local(region, (0, 0, 0))]
            before = ours.copy()
            ours[...] = painted
            try:
                update = answered(client.set_initial_mask, session_id, self.mask, model_id=self._prompt_model)
            except BaseException:
                ours[...] = before
                raise
            drawn = _nonzero_box(painted)
            self._object_box = _union(self._object_box, _shifted(drawn, tuple(lo for lo, _ in region)))  # type: ignore[arg-type]
        # the segment holds what the server now holds: its answer is written in place, not the segment anew
        self._stamp_open_labelmap(segmentation_node)
        self._apply(update, segmentation_node, volume_node)

    def _stamp_open_labelmap(self, segmentation_node: Any, stamp: Optional[int] = None) -> None:
        """Remember the open segment's labelmap as it is now (``stamp`` None: its MTime; -1: it differs from
        :attr:`mask`, the user's painting still to be taken by the next prompt)."""
        segment_id = self.open_segment_id(segmentation_node)
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
        rep = segment.GetRepresentation(LABELMAP) if segment is not None else None
        if rep is not None:
            self._open_labelmap = (rep, rep.GetMTime() if stamp is None else stamp)

    def _keep_painting(self, segmentation_node: Any, volume_node: Any, region: Box, painted: np.ndarray,
                       changed: np.ndarray) -> None:
        """After an Undo: the user's painting (``changed``, the voxels of ``region`` where ``painted``, the segment
        before the Undo, differed from the object) is drawn again over the undone object, as napari's Interactive
        section keeps a brush edit over an Undo. It stays a painting still to be taken: the next point or box sends it
        (:meth:`_take_painting`)."""
        segment_id = self.open_segment_id(segmentation_node)
        if not segment_id or self.mask is None:
            return
        shown = np.array(ijk_to_kji(self.mask)[_local(region, (0, 0, 0))], dtype=bool)
        shown[changed] = painted[changed]
        drawn = _nonzero_box(shown)
        drawn = _shifted(drawn, tuple(lo for lo, _ in region)) if drawn is not None else None  # type: ignore[arg-type]
        m = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(m)
        shape = tuple(int(n) for n in self.mask.shape)
        ijk_to_ras = _matrix_to_numpy(m)
        if not self._write_open_box(segmentation_node, segment_id, shape, ijk_to_ras, region, shown, drawn):
            # not a labelmap this module writes in place (a shared layer...): the object's own first, then the painting
            self._write_open_segment(segmentation_node, segment_id, shape, ijk_to_ras)
            segment_id = self._open_segment[1] if self._open_segment is not None else segment_id
            self._write_open_box(segmentation_node, segment_id, shape, ijk_to_ras, region, shown, drawn)
        self._stamp_open_labelmap(segmentation_node, stamp=-1)
        segmentation_node.Modified()

    def _prompt_session(self, volume_node: Any, segmentation_node: Any = None) -> SessionInfo:
        """The session a prompt on ``volume_node`` goes to. When the current object was drawn on another volume, that
        object ends first: its segment stays as drawn (renamed, as after a switch of model) and this volume's next
        prompt starts a new object. Without it a second volume's answers overwrote the first volume's segment, and
        back on the first volume its answers were written into the second volume's mask, on the wrong grid."""
        check_segmentation(segmentation_node)  # before any upload
        key = self.session_key(volume_node)[0]
        if key == self._object_key:
            return self.session_for(volume_node)
        # the session first (before the key moves, an upload leaves the open object's state alone): a refused upload
        # (a busy or full server, too many voxels) must not end the object on the other volume for nothing
        info = self.session_for(volume_node)
        if self.mask is not None:
            self.end_object()  # the segment is renamed in the node the next answer is written to
        self._object_key = key
        return info

    def prompt_upload(self, volume_node: Any) -> Optional[Callable[[], SessionInfo]]:
        """For the Widget, before a prompt on ``volume_node``: None when its session is held (the prompt runs at once,
        on the GUI thread), else the upload to run first on a worker thread (the volume is read here, on the GUI thread;
        nothing is sent until it is called). A volume is hundreds of MB: its upload, with the client's long timeout,
        froze Slicer as long as it took when the first prompt ran it on the GUI thread. The upload leaves the open
        object alone (:meth:`open_session`); the prompt after it ends it when it was on another volume, as before."""
        self._require()
        key, stamp = self.session_key(volume_node)
        if self.cached_session(key, stamp) is not None:
            return None
        data, ijk_to_ras = volume_geometry(volume_node)
        name = volume_node.GetName() or "volume"
        return lambda: self.open_session(key, stamp, data, ijk_to_ras, name)

    @staticmethod
    def _points_key(markups_node: Any) -> str:
        return markups_node.GetID() or str(id(markups_node))

    @staticmethod
    def _point_mark(markups_node: Any, index: int) -> Tuple[str, Tuple[float, ...]]:
        """What marks a control point as sent: its ID and world position (Slicer gives a new point the ID of a deleted
        one, so the ID alone does not tell a new point from one sent before)."""
        p = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(index, p)
        return markups_node.GetNthControlPointID(index), tuple(round(float(v), 3) for v in p)

    def _unsent_points(self, markups_node: Any) -> List[Tuple[Tuple[str, Tuple[float, ...]], List[float]]]:
        """``(its sent-mark, its world position)`` of the list's placed points not sent yet, in the list's order.

        A point counts as sent by its ID and position, not by its place in the list: before, the module remembered how
        many points it had sent, so after the user deleted a sent point (a misplaced click) the next point placed took
        its count and was never sent. A sent point the user dragged elsewhere is a new click there. Points without a
        position (unset in the Markups table, or still a placement preview) are not clicks: before, an unset point was
        sent as a click at the world origin.
        """
        if markups_node is None:
            return []
        sent = self._sent_points.get(self._points_key(markups_node), set())
        defined = getattr(markups_node, "PositionDefined", None)
        out = []
        for i in range(markups_node.GetNumberOfControlPoints()):
            if defined is not None and markups_node.GetNthControlPointPositionStatus(i) != defined:
                continue
            mark = self._point_mark(markups_node, i)
            if mark not in sent:
                out.append((mark, list(mark[1])))
        return out

    def _new_points(self, markups_node: Any, affine: np.ndarray, shape: Sequence[int],
                    commit: bool = True) -> np.ndarray:
        """Voxels of the control points not sent yet (points outside the volume are dropped).

        Args:
            commit: count them as sent now; with False the caller calls :meth:`_mark_sent` once they were.
        """
        points = self._unsent_points(markups_node)
        if commit and markups_node is not None:
            self._mark_sent(markups_node)
        if not points:
            return np.zeros((0, 3), dtype=np.int64)
        voxels = clip_voxels(world_to_voxel(np.asarray([p for _, p in points]), affine), shape)
        return np.zeros((0, 3), dtype=np.int64) if voxels is None else voxels

    def _mark_sent(self, markups_node: Any, marks: Optional[Sequence[Tuple[str, Tuple[float, ...]]]] = None) -> None:
        """Count the points of ``marks`` (see :meth:`_point_mark`; None: every point of the list now) as sent."""
        key = self._points_key(markups_node)
        if marks is None:
            marks = [self._point_mark(markups_node, i) for i in range(markups_node.GetNumberOfControlPoints())]
        self._sent_points[key] = set(self._sent_points.get(key, set())) | set(marks)

    @staticmethod
    def _node_grid(volume_node: Any) -> Tuple[np.ndarray, np.ndarray]:
        """``(shape (I, J, K), IJK-to-RAS (4, 4))`` of a volume node, read from the node itself: the grid its session is
        uploaded with (the server keeps a pack's affine as sent), without asking the server or reading a voxel.

        Raises:
            ValueError: not a volume the server can work on (:func:`check_volume`).
        """
        image = check_volume(volume_node)
        m = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(m)
        return np.asarray(image.GetDimensions(), dtype=np.int64), _matrix_to_numpy(m)

    def points_to_send(self, volume_node: Any, positive_node: Any = None,
                       negative_node: Any = None) -> Tuple[List[PointToSend], str]:
        """The new points of the + and - Markups lists that lie inside the volume, and what to tell of those outside it:
        ``([PointToSend, ...] in the lists' order, the words for the points outside ('' when none))``.

        Reads the lists and the volume node's own grid only (:meth:`_node_grid`): it asks the server nothing and changes
        nothing, so a Send refused for want of a point to send leaves everything as it was. Before, the volume's session
        was taken first: the open object of the volume prompted before was ended (renamed, accepted: its Undo gone) and
        this volume uploaded, and only then was the Send refused ("Nothing sent"). The Widget asks it before it uploads
        a volume for prompting.

        Raises:
            NothingToSendError: no new point inside the volume (none placed since the last Send, or all outside it).
            ValueError: new points, but a volume the server cannot work on (:func:`check_volume`).
        """
        lists = [(node, positive, self._unsent_points(node))
                 for node, positive in ((positive_node, True), (negative_node, False))]
        todo: List[PointToSend] = []
        outside: List[str] = []
        if any(points for _, _, points in lists):
            shape, ijk_to_ras = self._node_grid(volume_node)
            for node, positive, points in lists:
                if not points:
                    continue
                voxels = world_to_voxel(np.asarray([p for _, p in points]), ijk_to_ras)
                inside = np.all((voxels >= 0) & (voxels < shape), axis=1)
                todo += [(node, mark, voxel, positive) for (mark, _), voxel, ok in zip(points, voxels, inside) if ok]
                if not inside.all():
                    outside.append(f"{int((~inside).sum())} point{'s' if (~inside).sum() != 1 else ''} of "
                                   f"'{node.GetName()}'")
        name = volume_node.GetName() if volume_node is not None else "volume"
        one = len(outside) == 1 and outside[0].startswith("1 point ")
        where = (f"{' and '.join(outside)} {'lies' if one else 'lie'} outside the volume '{name}' and "
                 f"{('was' if one else 'were') if todo else ('is' if one else 'are')} not sent "
                 "(place them on the volume, or select the volume they were placed on)") if outside else ""
        if not todo:
            names = " or ".join(f"'{n.GetName()}'" for n in (positive_node, negative_node) if n is not None)
            raise NothingToSendError(f"Nothing sent: {where}." if outside else
                                     f"Nothing sent: no new points in {names or 'the point lists'} (points already "
                                     "sent are not sent again; place new ones first).")
        return todo, where

    def prompt_points(self, volume_node: Any, segmentation_node: Any, positive_node: Any = None,
                      negative_node: Any = None) -> List[MaskUpdate]:
        """Send the new points of the + and - Markups lists as clicks, answered by :attr:`prompt_model`;
        the mask goes into the ``MambaHoME interactive`` segment.

        Each point counts as sent once it was answered: after an error (a refused model, a busy server) pressing Send
        again sends the points not answered yet. What the user painted into the open segment since the last answer is
        sent first (:meth:`_take_painting`). Points outside the volume are not sent (they stay in the list, not sent):
        the user is told how many (:attr:`notice`).

        Raises:
            NothingToSendError: no new point inside the volume (none placed since the last Send, or all outside it):
                nothing is sent and nothing changes (:meth:`points_to_send`: the open object of another volume is not
                ended, this volume not uploaded). Before, the Send did nothing without a word.
        """
        self.points_to_send(volume_node, positive_node, negative_node)  # refused here, before anything changes
        info = self._prompt_session(volume_node, segmentation_node)
        # Counted again now that the session is taken: a volume uploaded again because its voxels changed starts
        # afresh (:meth:`open_session`), and its points are sent again into the new object.
        todo, where = self.points_to_send(volume_node, positive_node, negative_node)
        updates = []
        for node, mark, voxel, positive in todo:
            updates.append(self._send(info.session_id, segmentation_node, volume_node, self._require().add_point,
                                      voxel.tolist(), positive=positive, take_painting=True))
            self._mark_sent(node, [mark])
        if where:
            self._tell(f"{where[0].upper()}{where[1:]}.")
        return updates

    def roi_corners(self, volume_node: Any, roi_node: Any) -> Tuple[List[int], List[int]]:
        """The ROI's world bounds as two opposite voxel corners ``(i, j, k)`` of the volume, clipped to it. Reads the
        volume node's own grid only (:meth:`_node_grid`), so an ROI that misses the volume is refused before anything
        changes: before, the volume's session was taken first, which ended the open object of the volume prompted
        before (renamed, accepted: its Undo gone).

        Raises:
            ValueError: the ROI does not overlap the volume (clipped, it became a box on the volume's edge that the
                server refused in voxel indices the user never chose), or the volume is none the server can work on.
        """
        shape, ijk_to_ras = self._node_grid(volume_node)
        lo, hi = roi_voxel_box(_roi_world_corners(roi_node), ijk_to_ras)
        last = shape - 1
        if np.any(hi < 0) or np.any(lo > last):
            raise ValueError(f"the ROI '{roi_node.GetName()}' lies outside the volume '{volume_node.GetName()}': "
                             "move it onto the volume (or select the volume it was placed on), then Send box again")
        return np.clip(lo, 0, last).tolist(), np.clip(hi, 0, last).tolist()

    def prompt_roi(self, volume_node: Any, segmentation_node: Any, roi_node: Any, positive: bool = True) -> MaskUpdate:
        """Send a Markups ROI as a box prompt (its world bounds, as voxel corners clipped to the volume), after what the
        user painted into the open segment since the last answer (:meth:`_take_painting`). An ROI that misses the volume
        is refused before anything changes (:meth:`roi_corners`)."""
        a, b = self.roi_corners(volume_node, roi_node)
        info = self._prompt_session(volume_node, segmentation_node)
        return self._send(info.session_id, segmentation_node, volume_node, self._require().add_box, a, b,
                          positive=positive, take_painting=True)

    def prompt_segment(self, volume_node: Any, segmentation_node: Any, segment_id: str) -> MaskUpdate:
        """Start (or replace) the current object with an existing segment's mask (undoable), for
        :attr:`prompt_model`; later prompts refine it in the ``MambaHoME interactive`` segment."""
        info = self._prompt_session(volume_node, segmentation_node)
        m = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(m)
        mask = segment_mask(segmentation_node, segment_id, info.shape, _matrix_to_numpy(m))
        return self._send(info.session_id, segmentation_node, volume_node, self._require().set_initial_mask, mask)

    def undo(self, volume_node: Any, segmentation_node: Any) -> MaskUpdate:
        """Take back the current object's last step on the server: a prompt, or a painting a prompt sent before it.

        What the user painted into (or erased from) the open segment since the last answer, not yet sent, is not a
        step of the server's history: it stays painted over the undone object, as napari's Interactive section keeps a
        brush edit over its Undo, and the next point or box sends it (:meth:`_take_painting`). Only a segment erased
        whole is taken at once: the object is cleared, as Reset clears it, and there is nothing left to take back.

        Raises:
            NothingToUndoError: the object ended (accepted by a rename, a switch of model or volume, a lost session,
                a reconnect) and no prompt started the next one: nothing is sent and the node is left alone. Before, a
                reset was sent, an empty working segment written, and the undo then failed with "HTTP 400: nothing to
                undo"; after a reconnect (a new session, no answer in it yet) the undo was sent and failed so. Also
                when the user erased the whole open segment: the server's object is cleared (a reset), nothing else.
                Also when the open object lies on another volume than ``volume_node`` (Undo pressed with another volume
                selected): nothing is sent, and that object stays open, its Undo history with it. Before, the Undo
                ended it (renamed, accepted) as a prompt on this volume would, and then said there was nothing to undo.
        """
        self.check_undo(volume_node)
        info = self._prompt_session(volume_node, segmentation_node)
        if self._fresh_object or self.mask is None:
            raise NothingToUndoError(self.nothing_to_undo_text())
        painting = self._painting(segmentation_node, volume_node)
        if painting is not None and not painting[1].any():
            self._send(info.session_id, segmentation_node, volume_node, self._require().reset)
            raise NothingToUndoError(f"Nothing to undo: the segment '{INTERACTIVE_SEGMENT}' was erased whole in the "
                                     "Segment Editor, which clears the object (as Reset); the next prompt starts it "
                                     "anew.")
        changed = None
        if painting is not None:
            region, painted = painting
            changed = painted != ijk_to_kji(self.mask)[_local(region, (0, 0, 0))]
        update = self._send(info.session_id, segmentation_node, volume_node, self._require().undo)
        if painting is not None and self.mask is not None:
            self._keep_painting(segmentation_node, volume_node, painting[0], painting[1], changed)
        return update

    def check_undo(self, volume_node: Any) -> None:
        """Refuse an Undo that has nothing to take back, before anything is sent or changed (the Widget asks before it
        uploads a volume for prompting): no open object (it ended, or none was prompted), or the open object lies on
        another volume than ``volume_node`` (Undo pressed with another volume selected). In that second case the object
        stays open, its Undo history with it: before, the Undo took this volume's session first, which ended that
        object (renamed, accepted) as a prompt on this volume does, and only then said there was nothing to undo.

        Raises:
            NothingToUndoError: nothing to undo on ``volume_node``.
            ValueError: not a volume the server can work on (:func:`check_volume`).
        """
        key = self.session_key(volume_node)[0]
        if self._fresh_object or self.mask is None:
            raise NothingToUndoError(self.nothing_to_undo_text())
        if self._object_key is not None and key != self._object_key:
            scene = volume_node.GetScene()
            other = scene.GetNodeByID(self._object_key) if scene is not None else None
            raise NothingToUndoError(f"Nothing to undo on '{volume_node.GetName()}': the open object was prompted on "
                                     f"{repr(other.GetName()) if other is not None else 'another volume'}; select that "
                                     "volume to undo there (the object stays open).")

    def nothing_to_undo_text(self) -> str:
        name = self._accepted_name
        ended = (f"the previous object was accepted as segment '{name}' (edit it in the Segment Editor)" if name
                 else "the previous object ended")
        return f"Nothing to undo: {ended}; the next prompt starts a new object."

    def reset(self, volume_node: Any, segmentation_node: Any) -> MaskUpdate:
        """Clear the current object: a fresh one of :attr:`prompt_model`; what the user painted into the open segment
        goes with it (nothing of it is sent first: the reset forgets every step)."""
        info = self._prompt_session(volume_node, segmentation_node)
        update = self._send(info.session_id, segmentation_node, volume_node, self._require().reset)
        self._sent_points = {}
        return update

    # ------------------------------------------------------------------ cases, models, fine-tuning
    def save_case(self, volume_node: Any, segmentation_node: Any, modality: Optional[str],
                  case_id: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
        """Save the volume with the segmentation (one class per segment) as a training case on the server;
        ``modality`` None: the session's (the server's guess), else "other"."""
        labels, names = self.labels_from_segmentation(segmentation_node, volume_node, self.class_names)
        if not segmentation_node.GetSegmentation().GetNumberOfSegments():
            raise ValueError(f"{segmentation_node.GetName()}: has no segments to save")
        working = [n for n in names[1:] if n == INTERACTIVE_SEGMENT or n.startswith(f"{INTERACTIVE_SEGMENT} (")]
        if working:
            # a class of that name would be taught to every model fine-tuned on the case
            raise ValueError(f"{segmentation_node.GetName()}: segment(s) {', '.join(repr(n) for n in working)} still "
                             "carry the prompt's working name; rename each to its class (e.g. 'liver') in the "
                             "Segment Editor, or delete it, before saving the case")
        try:
            return self.on_live_session(
                self.session_for(volume_node),
                lambda sid: self._require().save_case(sid, labels, names, modality, case_id=case_id or None,
                                                      overwrite=overwrite),
                lambda: self.session_for(volume_node))
        except ServerError as exc:
            if exc.code != "case_exists":
                raise
            # the server words it for any client ("the pack's 'overwrite'"); this module has a Case id field
            raise ValueError(f"case {case_id!r} already exists on the server {self._require().url}: type another "
                             "Case id, or leave it empty for a new name (the saved case is unchanged)") from None

    def models(self) -> Dict[str, Any]:
        # kept: Segment checks the active model's task with it before uploading (see check_segment_model)
        self._listing = self._require().models()
        return self._listing

    def select_model(self, model_id: str) -> Dict[str, Any]:
        self._listing = self._require().select_model(model_id)
        return self._listing

    def rollback_model(self) -> Dict[str, Any]:
        self._listing = self._require().rollback_model()
        return self._listing

    def start_finetune(self, steps: int, promptable: bool = False, **settings: Any) -> Dict[str, Any]:
        """Start fine-tuning the server's active model on its saved cases; returns the job.

        ``promptable``: make a promptable model from the active automatic model instead (the server's warm
        start, ``task="interactive"``); the automatic model stays active. ``settings``: the server's
        fine-tune settings (``batch_size``, ``max_minutes``...). The server scores a new promptable model against
        the chosen prompt model (:attr:`prompt_model`; None: its own rule), see :meth:`score_text`."""
        if promptable:
            settings["task"] = "interactive"
            if self._prompt_model is not None:
                settings.setdefault("compare_with", self._prompt_model)
        return self._require().start_finetune(steps=steps, **settings)

    @staticmethod
    def finetune_request(steps: int, minutes: float) -> Tuple[int, Dict[str, Any]]:
        """``(steps, settings)`` of a fine-tune asked for as steps, or with a time limit of ``minutes`` (> 0): then
        the server's most steps and ``max_minutes``, so the time decides and the learning rate follows it (the
        run ends with a finished model), as napari's Time limit does."""
        if minutes and minutes > 0:
            return SERVER_MAX_STEPS, {"max_minutes": float(minutes)}
        return int(steps), {}

    @staticmethod
    def progress_text(job: Dict[str, Any], minutes: float, elapsed_s: float) -> Tuple[float, str]:
        """``(fraction done, status line)`` of a running fine-tune job; with a time limit of ``minutes`` the
        fraction is the time's (the job's step total is only a cap then)."""
        loss = f", loss {job['loss']:.4f}" if job.get("loss") is not None else ""
        total = max(int(job["total"]), 1)
        # a stop asked: said until the job ends, as the server words it ("stopping: the model of the step under way
        # will be kept", then "stopping at step 12 as asked: validating and saving the model")
        stopping = (f" - {job['message']}" if job.get("stop_requested") and str(job.get("message", "")).startswith(
            "stopping") else "")
        if minutes and minutes > 0:
            fraction = min(max(elapsed_s / (minutes * 60.0), 0.0), 1.0)
            return fraction, (f"Fine-tune {job['state']}: step {job['step']}, {elapsed_s / 60.0:.1f} of "
                              f"{minutes:g} min{loss}{stopping}")
        return int(job["step"]) / total, (f"Fine-tune {job['state']}: step {job['step']}/{job['total']}{loss}"
                                          f"{stopping}")

    @staticmethod
    def score_text(job: Dict[str, Any]) -> str:
        """One line on how the server scored a finished job's new model (its ``scores``) in the words napari's
        Fine-tune section uses: the Dice of an automatic model's segmentation, or the robot user's Dice of a
        promptable one, on the cases named as the server names them (held out, else all the training cases: too
        few to hold some out), the means, then each class's Dice before -> after as napari's table shows them
        (:func:`mambahome_client.scores.per_class_text`), with the server's warning when it is weaker than the
        model it was compared with.
        A model made but not scored (its scoring cancelled or failed) is said so plainly; ``""`` for a job that
        made no model."""
        note = f" Note: {job['note']}" if job.get("note") else ""  # no class shared with the cases (a server's)
        scores = job.get("scores")
        if not scores:
            if job.get("state") == "done" and job.get("not_scored"):
                return f"{job.get('model_id')} was made but not scored: {job['not_scored']}.{note}"
            return note.strip()
        robot = scores.get("metric") == "robot_dice"
        kind = f"Robot-user Dice after {scores.get('clicks')} clicks" if robot else "Dice"
        where = scores.get("where") or f"{len(scores.get('scored_on') or [])} case(s)"  # a server before "where"
        after, before = scores.get("mean_after"), scores.get("mean_before")
        per_class = per_class_text(scores.get("before"), scores.get("after"))  # napari's table, on one line
        if not per_class and after is None:
            return f"{kind} on {where}: no labelled class to score.{note}"
        if after is None:  # nothing compared with (no means): the new model's own Dice per class
            line = f"{kind} per class on {where}: {per_class}."
        else:
            line = f"{kind} on {where}: new {after:.2f}"
            if before is not None:
                line += f" vs {before:.2f} for {scores.get('compared_with')}"
            line += "."
            if per_class:
                line += f" Per class ({scores.get('compared_with') or 'before'} -> new): {per_class}."
        return f"{line} {job.get('warning') or ''}{note}".strip()

    def prompt_with_new_model(self, job: Dict[str, Any], listing: Dict[str, Any],
                              segmentation_node: Any = None) -> Optional[str]:
        """After a finished job that made a promptable model, prompt with it from now on (a new object), unless the
        server scored it below the prompt model in use (its ``scores``' ``weaker``): that one stays, as napari keeps
        the better model, and the new one is listed for the user to choose.

        Args:
            job: the job's last state (``GET /finetune/{id}``).
            listing: the server's ``GET /models`` answer after the job.
            segmentation_node: as :meth:`set_prompt_model` (call on the GUI thread: it may rename a segment).

        Returns:
            The new model's id, or ``None`` when the job did not make a promptable model or made a weaker one
            (nothing changes).
        """
        if job.get("state") != "done" or not job.get("model_id") or (job.get("scores") or {}).get("weaker"):
            return None
        made = {m["id"]: m for m in listing.get("models", [])}.get(job["model_id"])
        if made is None or not is_promptable(made):
            return None
        self.set_prompt_model(made["id"], check=False, segmentation_node=segmentation_node)
        return made["id"]

    def finetune_state(self, job_id: str) -> Dict[str, Any]:
        return self._require().job(job_id)

    def cancel_finetune(self, job_id: str) -> Dict[str, Any]:
        return self._require().cancel_job(job_id)

    @property
    def can_stop_finetune(self) -> bool:
        """Whether the connected server can stop a fine-tune and keep its model (False when not connected)."""
        return self.client is not None and self.client.can_stop_jobs

    def stop_finetune(self, job_id: str) -> Dict[str, Any]:
        """**Stop and keep**: ask the server to end the job's training at the next step and keep the model of that
        step (validated, saved and scored as if its time limit had run out then); returns the job. Whether a model
        was kept is the job's final state (:meth:`finetune_end_text`): asked before the first training step
        finished, there was nothing to keep."""
        return self._require().stop_job(job_id)

    @staticmethod
    def stop_enabled(job: Optional[Dict[str, Any]], can_stop: bool) -> bool:
        """Whether **Stop and keep** can act on ``job`` (its last state; None: no job): only while it trains on a
        server that can stop, until a stop was asked. Once its model is made (``model_id``, while it is scored) the
        model is kept anyway and a stop would change nothing: the button must not suggest otherwise."""
        return (bool(can_stop) and job is not None and job.get("state") == "running"
                and not job.get("stop_requested") and not job.get("model_id"))

    @classmethod
    def finetune_end_text(cls, job: Dict[str, Any]) -> str:
        """The status line for an ended job that made no promptable model to prompt with (none, or one weaker than the
        prompt model in use): what became of it, saying whether a model was kept. A job a stop ended says at which step, with its model's scores; one the stop reached before its
        first step says that nothing was kept (the server's own words); a cancelled or failed one that no model was
        made."""
        state = job.get("state")
        scores = job.get("scores") or {}
        if state == "done" and job.get("model_id") and scores.get("metric") == "robot_dice" and scores.get("weaker"):
            return (f"Promptable model {job['model_id']} made on the server, not prompted with: it scores below "
                    f"{scores.get('compared_with')}, which stays the prompt model (the Prompt model box selects the "
                    f"new one). {cls.score_text(job)}").strip()
        if state == "done" and job.get("model_id"):
            stopped = job.get("stopped_at")
            head = (f"Fine-tune stopped as asked at step {stopped}: model {job['model_id']} kept on the server"
                    if stopped is not None else f"Fine-tuned model {job['model_id']} made on the server")
            return f"{head} (Use this model version selects it). {cls.score_text(job)}".strip()
        if state == "cancelled":
            if job.get("stop_requested") and job.get("message", "").startswith("stopped before"):
                return f"Fine-tune {job['message']}."
            return "Fine-tune cancelled: no model was made."
        if state == "failed":
            return f"Fine-tuning failed: {job.get('error')}"
        return "Fine-tune finished without a new model."

    @staticmethod
    def save_segmentation_file(segmentation_node: Any, path: str) -> None:
        """Write the segmentation as a ``.seg.nrrd`` through a segmentation storage node."""
        storage = slicer.vtkMRMLSegmentationStorageNode()
        scene = segmentation_node.GetScene()
        if scene is not None:
            scene.AddNode(storage)
        storage.SetFileName(path)
        if not storage.WriteData(segmentation_node):
            raise OSError(f"{path}: could not write the segmentation")
        if scene is not None:
            scene.RemoveNode(storage)


#
# Widget (Slicer application only)
#
class MambaHoMEWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: reads the form, runs Logic calls off the GUI thread where they talk to the server."""

    def __init__(self, parent: Any = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[MambaHoMELogic] = None
        self.ui: Any = None
        self._job_id: Optional[str] = None
        self._timer: Any = None
        self._job_minutes = 0.0  # the running fine-tune's time limit (0: none)
        self._job_started = 0.0
        self._stopButton: Any = None  # Stop and keep, beside Cancel fine-tuning (made in code: see _addStopButton)
        self._stopSent: Optional[str] = None  # the job a stop was sent for (its polls may not say so yet)
        self._pending: set = set()  # timers of the background calls running (each kept until its call ends)
        self._uploading = False  # a volume's upload for prompting runs (a prompt waits for it, not a second upload)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        widget = slicer.util.loadUI(self.resourcePath("UI/MambaHoME.ui"))
        self.layout.addWidget(widget)
        self.ui = slicer.util.childWidgetVariables(widget)
        widget.setMRMLScene(slicer.mrmlScene)
        self._useLogic(MambaHoMELogic())
        self.ui.modalityComboBox.addItems([AUTO_MODALITY, "CT", "MR", "US", "other"])
        self.ui.serverUrlLineEdit.text = qt.QSettings().value("MambaHoME/url", "http://127.0.0.1:8765")
        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.sendPointsButton.connect("clicked(bool)", self.onSendPoints)
        self.ui.sendBoxButton.connect("clicked(bool)", self.onSendBox)
        self.ui.promptModelComboBox.addItem(SERVER_RULE_LABEL, "")
        self.ui.promptModelComboBox.connect("activated(int)", self.onPromptModel)
        self.ui.undoButton.connect("clicked(bool)", lambda: self._prompt(self.logic.undo, check=self.logic.check_undo))
        self.ui.resetButton.connect("clicked(bool)", lambda: self._prompt(self.logic.reset))
        self.ui.startFromSegmentButton.connect("clicked(bool)", self.onStartFromSegment)
        # the segment to refine is chosen among the output segmentation's segments
        self.ui.startSegmentSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                             self.ui.startSegmentSelector.setCurrentNode)
        self.ui.saveCaseButton.connect("clicked(bool)", self.onSaveCase)
        self.ui.selectModelButton.connect("clicked(bool)", self.onSelectModel)
        self.ui.rollbackButton.connect("clicked(bool)", self.onRollback)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.timeLimitSpinBox.connect("valueChanged(double)", self.onTimeLimitChanged)
        self.ui.cancelFinetuneButton.connect("clicked(bool)", self.onCancelFinetune)
        self._addStopButton()
        self._timer = qt.QTimer()
        self._timer.setInterval(1000)
        self._timer.connect("timeout()", self._pollJob)
        # a closed scene leaves its volumes' sessions of no use: give them back to the server
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)

    def _addStopButton(self) -> None:
        """**Stop and keep** beside **Cancel fine-tuning**: made here, not in the .ui file, and put with Cancel in one
        row where Cancel was, so both read as the two ways to end the running job. Greyed out until a job trains."""
        cancel = self.ui.cancelFinetuneButton
        self._stopButton = qt.QPushButton(STOP_BUTTON_TEXT)
        self._stopButton.toolTip = STOP_TIP
        self._stopButton.enabled = False
        self._stopButton.connect("clicked(bool)", self.onStopFinetune)
        layout = cancel.parentWidget().layout() if cancel.parentWidget() is not None else None
        row = qt.QWidget()
        box = qt.QHBoxLayout(row)
        box.setContentsMargins(0, 0, 0, 0)
        if layout is not None and layout.replaceWidget(cancel, row) is not None:
            box.addWidget(cancel)
            box.addWidget(self._stopButton)
        elif layout is not None:  # Cancel not found in its layout: the button goes below it
            layout.addWidget(self._stopButton)

    def _offerStop(self, job: Optional[Dict[str, Any]]) -> None:
        """**Stop and keep** enabled only while ``job`` (its last state; None: no job) trains on a server that can
        stop it, until a stop was asked; the tooltip says why it is greyed out on a server older than the stop."""
        if self._stopButton is None:
            return
        can_stop = self.logic.can_stop_finetune
        # a poll answered before the server recorded the stop sent would offer it again for a second
        sent = job is not None and self._stopSent is not None and job.get("job_id", self._job_id) == self._stopSent
        self._stopButton.enabled = self.logic.stop_enabled(job, can_stop) and not sent
        self._stopButton.toolTip = STOP_TIP if can_stop or self.logic.client is None else STOP_UNSUPPORTED_TIP

    def onSceneStartClose(self, caller: Any = None, event: Any = None) -> None:
        self._releaseSessions(background=True)

    def _releaseSessions(self, background: bool, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close the Logic's sessions; never raises (it runs from cleanup and scene events)."""
        try:
            if self.logic is not None:
                self.logic.release_sessions(timeout_s=timeout_s, background=background, scene_closed=True)
        except Exception:  # noqa: BLE001 - a courtesy to the server must not break Slicer's close
            logging.debug("MambaHoME: could not close the sessions", exc_info=True)

    def cleanup(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()
        # on the GUI thread, waiting a second at most: at Slicer's exit a background thread dies before it sends
        self._releaseSessions(background=False, timeout_s=1.0)

    # ------------------------------------------------------------------ helpers
    def _useLogic(self, logic: "MambaHoMELogic") -> None:
        self.logic = logic
        logic.on_notice = self.onLogicNotice

    def onLogicNotice(self) -> None:
        """What the Logic tells outside this module's buttons (the user accepted the open object by renaming it in the
        Segment Editor, and it took voxels from other segments): on the status line at once, as the module's own end
        of an object is said; no dialog interrupts the Segment Editor."""
        notice = self.logic.take_notice()
        if notice:
            self._status(notice)

    def _status(self, text: str) -> None:
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(text, 5000)

    def _background(self, work: Callable[[], Any], done: Callable[[Any], None],
                    tick: Optional[Callable[[float], None]] = None,
                    failed: Optional[Callable[[], None]] = None) -> None:
        """Run ``work`` (HTTP only, no MRML) in a thread; call ``done(result)`` on the GUI thread, and ``tick(seconds
        so far)`` about once a second while it runs; ``failed()`` before an error is shown."""
        box: Dict[str, Any] = {}
        started = time.perf_counter()
        last_tick = [0]

        def run() -> None:
            try:
                box["result"] = work()
            except Exception as exc:  # noqa: BLE001 - shown to the user
                box["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        timer = qt.QTimer()
        timer.setInterval(50)

        def check() -> None:
            if thread.is_alive():
                elapsed = time.perf_counter() - started
                if tick is not None and int(elapsed) > last_tick[0]:
                    last_tick[0] = int(elapsed)
                    tick(elapsed)
                return
            timer.stop()
            self._pending.discard(timer)
            if "error" in box:
                if failed is not None:
                    failed()
                self._status(f"Error: {box['error']}")
                slicer.util.errorDisplay(str(box["error"]))
            else:
                done(box.get("result"))

        timer.connect("timeout()", check)
        timer.start()
        self._pending.add(timer)  # keep a reference while it runs (two calls may run at once: an upload, a Segment)

    def _nodes(self) -> Tuple[Any, Any]:
        volume = self.ui.inputVolumeSelector.currentNode()
        if volume is None:
            raise ValueError("select an input volume")
        seg = self.ui.segmentationSelector.currentNode()
        if seg is None:
            seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} MambaHoME")
            seg.CreateDefaultDisplayNodes()
            self.ui.segmentationSelector.setCurrentNode(seg)
        return volume, seg

    # ------------------------------------------------------------------ actions
    def onConnect(self) -> None:
        url, token = self.ui.serverUrlLineEdit.text.strip(), self.ui.tokenLineEdit.text.strip()
        qt.QSettings().setValue("MambaHoME/url", url)
        self._status("Connecting...")
        self._background(lambda: (self.logic.connect(url, token), self.logic.models()), self._connected)

    def _connected(self, result: Any) -> None:
        info, listing = result
        self.logic.keep_ended_object()  # the reconnect ended the open object: kept in its node now, whatever model
        self._fillModels(listing)
        self._status(self._withNotice(f"Connected: server {info['version']}, protocol {info['protocol']}, "
                                      f"{', '.join(info['capabilities'])}"))

    def _withNotice(self, text: str) -> str:
        """``text`` followed by what the Logic has to tell (an ended object took voxels from other segments)."""
        notice = self.logic.take_notice()
        return f"{text}{'' if text.endswith('.') else '.'} {notice}" if notice else text

    def _fillModels(self, listing: Dict[str, Any]) -> None:
        self.ui.modelComboBox.clear()
        for m in listing["models"]:
            self.ui.modelComboBox.addItem(model_label(m), m["id"])
        idx = self.ui.modelComboBox.findData(listing["active"])
        self.ui.modelComboBox.setCurrentIndex(max(idx, 0))
        self._fillPromptModels(listing)  # a fine-tune may have added a promptable model

    def _fillPromptModels(self, listing: Dict[str, Any]) -> None:
        """The server's promptable models, after the server's-rule entry; keeps the choice if still listed."""
        combo = self.ui.promptModelComboBox
        previous = combo.currentData or ""
        combo.clear()
        combo.addItem(SERVER_RULE_LABEL, "")
        for m in listing["models"]:
            if is_promptable(m):
                combo.addItem(model_label(m), m["id"])
        idx = max(combo.findData(previous), 0)
        combo.setCurrentIndex(idx)
        self.logic.set_prompt_model(combo.itemData(idx) or None, check=False,
                                    segmentation_node=self.ui.segmentationSelector.currentNode())

    def onPromptModel(self, index: int) -> None:
        """Prompts go to the chosen model; a switch ends the current object: its segment is kept, renamed, and
        accepted (it takes its voxels from the node's other segments; the status line names those that lost voxels
        and how many)."""
        model_id = self.ui.promptModelComboBox.itemData(index) or None
        previous = self.logic.prompt_model
        self.logic.set_prompt_model(model_id, check=False,
                                    segmentation_node=self.ui.segmentationSelector.currentNode())
        if model_id != previous:
            self._status(self._withNotice(f"Prompts now answered by {model_id or SERVER_RULE_LABEL.lower()}; "
                                          "the next prompt starts a new object"))

    def onSegment(self) -> None:
        modality = self.logic.modality_choice(self.ui.modalityComboBox.currentText)
        try:
            # a promptable active model is refused first, before the upload (and before a new output node is made)
            model_id = self.logic.check_segment_model()
            volume, seg = self._nodes()
            key, stamp = self.logic.session_key(volume)  # read MRML on the GUI thread
            cached = self.logic.cached_session(key, stamp, modality, exact=True)
            data, affine = volume_geometry(volume)  # also when cached: an expired session is uploaded again
        except Exception as exc:  # noqa: BLE001 - shown to the user; not connected, no volume, a promptable model
            self._status(f"Error: {exc}")
            slicer.util.errorDisplay(str(exc))
            return
        name = volume.GetName() or "volume"
        # the server reports no progress of a segmentation: the seconds so far, and why the first one is slow
        self._status(self.logic.segmenting_text(model_id))

        def work() -> Segmentation:
            def upload() -> SessionInfo:
                return self.logic.open_session(key, stamp, data, affine, name, modality)

            return self.logic.on_live_session(cached or upload(), self.logic.segment_session, upload)

        def done(result: Segmentation) -> None:
            self._status(self.logic.show_segmentation(seg, volume, result))  # with the server's warnings, if any

        self._background(work, done, tick=lambda s: self._status(self.logic.segmenting_text(model_id, s)))

    def _prompt(self, call: Callable[..., Any], *args: Any, check: Optional[Callable[[Any], Any]] = None) -> None:
        """A prompt on the GUI thread (its answer takes a fraction of a second; the server's silence is given up after
        PROMPT_TIMEOUT_S). A volume without a session is uploaded first, on a worker thread (hundreds of MB).
        ``check(volume)``: refuses the prompt before anything changes (no output node made, no upload), e.g. a Send
        without a new point inside the volume."""
        if self._uploading:
            self._status("Still uploading the volume for prompting (the prompt pressed first follows it); press again "
                         "once it is answered.")
            return
        try:
            if check is not None:
                check(self.ui.inputVolumeSelector.currentNode())
            volume, seg = self._nodes()
            upload = self.logic.prompt_upload(volume)
        except (NothingToUndoError, NothingToSendError) as exc:  # nothing was sent, nothing changed: no error
            self._status(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - shown to the user; not connected, no volume, a transformed volume
            self._status(f"Error: {exc}")
            slicer.util.errorDisplay(str(exc))
            return
        if upload is not None:
            name = volume.GetName() or "volume"
            self._uploading = True
            self._status(f"Uploading '{name}' for prompting...")

            def uploaded(_info: Any) -> None:
                self._uploading = False
                self._prompt(call, *args)  # the session is held now: the prompt itself, on the GUI thread

            self._background(upload, uploaded, failed=lambda: setattr(self, "_uploading", False),
                             tick=lambda s: self._status(f"Uploading '{name}' for prompting... {s:.0f} s"))
            return
        try:
            with slicer.util.WaitCursor():  # a prompt answer is a fraction of a second
                result = call(volume, seg, *args)
        except (NothingToUndoError, NothingToSendError) as exc:  # nothing was sent, nothing changed: no error
            self._status(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - shown to the user
            if isinstance(exc, PromptTimeoutError):  # the dialog says what to do; the status line what happened
                self._status(f"{str(exc).split(', so ')[0]}: prompt given up.")
            notice = self.logic.take_notice()  # an earlier point of the same Send reloaded the object
            slicer.util.errorDisplay(str(exc) + (f"\n\n{notice}" if notice else ""))
            return
        last = result[-1] if isinstance(result, list) and result else result
        if isinstance(last, MaskUpdate) and last.model_id:
            self._status(f"Answered by {last.model_id} in {last.latency_s:.2f} s")
        notice = self.logic.take_notice()
        if notice:
            self._status(notice)
            slicer.util.warningDisplay(notice, windowTitle="MambaHoME")

    def onSendPoints(self) -> None:
        plus, minus = self.ui.positivePointsSelector.currentNode(), self.ui.negativePointsSelector.currentNode()
        # no new point inside the volume: said before the volume is uploaded or another volume's object ended
        self._prompt(self.logic.prompt_points, plus, minus,
                     check=lambda volume: self.logic.points_to_send(volume, plus, minus))

    def onSendBox(self) -> None:
        roi = self.ui.roiSelector.currentNode()
        if roi is None:
            slicer.util.errorDisplay("select or place an ROI first")
            return
        self._prompt(self.logic.prompt_roi, roi, check=lambda volume: self.logic.roi_corners(volume, roi))

    def onStartFromSegment(self) -> None:
        segment_id = self.ui.startSegmentSelector.currentSegmentID()
        if not segment_id:
            slicer.util.errorDisplay("choose a segment of the output segmentation to refine")
            return
        self._prompt(self.logic.prompt_segment, segment_id)

    def onSaveCase(self) -> None:
        try:
            volume, seg = self._nodes()
            # auto: the session's modality (the server's guess), else "other"
            rec = self.logic.save_case(volume, seg, self.logic.modality_choice(self.ui.modalityComboBox.currentText),
                                       case_id=self.ui.caseIdLineEdit.text.strip() or None)
            self._status(f"Saved case {rec['case_id']} on the server")
        except Exception as exc:  # noqa: BLE001
            slicer.util.errorDisplay(str(exc))

    def onSelectModel(self) -> None:
        model_id = self.ui.modelComboBox.currentData
        self._background(lambda: self.logic.select_model(model_id), self._fillModels)

    def onRollback(self) -> None:
        self._background(self.logic.rollback_model, self._fillModels)

    def onFinetune(self) -> None:
        promptable = bool(self.ui.promptableCheckBox.checked)
        minutes = float(self.ui.timeLimitSpinBox.value)
        steps, settings = self.logic.finetune_request(int(self.ui.stepsSpinBox.value), minutes)
        self._job_minutes = minutes
        self._background(lambda: self.logic.start_finetune(steps, promptable=promptable, **settings),
                         self._jobStarted)

    def onTimeLimitChanged(self, minutes: float) -> None:
        self.ui.stepsSpinBox.enabled = minutes <= 0  # with a limit the time decides, not the steps

    def _jobStarted(self, job: Dict[str, Any]) -> None:
        self._job_id = job["job_id"]
        self._job_started = time.perf_counter()
        self.ui.finetuneProgressBar.maximum = 1000
        self.ui.finetuneProgressBar.value = 0
        self._offerStop(job)
        self._timer.start()

    def _pollJob(self) -> None:
        if self._job_id is None:
            return
        try:
            job = self.logic.finetune_state(self._job_id)
        except Exception as exc:  # noqa: BLE001
            self._timer.stop()
            self._status(f"Fine-tune: {exc}")
            return
        fraction, text = self.logic.progress_text(job, self._job_minutes, time.perf_counter() - self._job_started)
        self.ui.finetuneProgressBar.value = int(1000 * fraction)
        self._status(text)
        self._offerStop(job)
        if job["state"] in ("done", "failed", "cancelled"):
            self._timer.stop()
            self._job_id = None
            if job["state"] == "failed":
                slicer.util.errorDisplay(f"Fine-tuning failed: {job['error']}")
            self._background(self.logic.models, lambda listing: self._jobEnded(job, listing))

    def _jobEnded(self, job: Dict[str, Any], listing: Dict[str, Any]) -> None:
        """The job ended and ``listing`` is the server's model list after it (a kept model is in it): the lists are
        refilled and the status line says what became of the job, whether a model was kept."""
        self._fillModels(listing)
        model_id = self.logic.prompt_with_new_model(job, listing, self.ui.segmentationSelector.currentNode())
        if model_id is None:  # a fine-tuned version (the user selects it), or no model: said either way
            self._status(self._withNotice(self.logic.finetune_end_text(job)))
            if job["state"] == "done" and job.get("model_id") and job.get("warning"):
                slicer.util.warningDisplay(job["warning"])
            return
        combo = self.ui.promptModelComboBox
        combo.setCurrentIndex(max(combo.findData(model_id), 0))
        stopped = (f" (stopped as asked at step {job['stopped_at']})" if job.get("stopped_at") is not None else "")
        self._status(self._withNotice(f"Promptable model {model_id} made on the server{stopped}; prompts now go to it "
                                      f"(a new object), the active model still segments. {self.logic.score_text(job)}"
                                      .strip()))
        if job.get("warning"):
            slicer.util.warningDisplay(job["warning"])

    def onCancelFinetune(self) -> None:
        if self._job_id is not None:
            self._background(lambda: self.logic.cancel_finetune(self._job_id), lambda job: None)

    def onStopFinetune(self) -> None:
        """**Stop and keep**: greyed out at once (one stop is enough), the server asked off the GUI thread; the job's
        polling then shows the stop taken and, once it ended, whether a model was kept."""
        job_id = self._job_id
        if job_id is None:
            return
        self._stopButton.enabled = False
        self._stopSent = job_id
        self._status("Stopping the fine-tune at its next step; the model of that step will be kept (none if the first "
                     "training step has not finished)...")

        def refused() -> None:  # not sent after all: offered again while the job runs
            self._stopSent = None
            self._offerStop({"state": "running", "job_id": job_id} if self._job_id == job_id else None)

        self._background(lambda: self.logic.stop_finetune(job_id), lambda job: None, failed=refused)


#
# Test (runs inside Slicer: Developer mode -> Reload and Test, with a server on 127.0.0.1:8765)
#
class MambaHoMETest(ScriptedLoadableModuleTest):
    """Segments a synthetic volume through a running local server and checks the segmentation's grid."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear(0)

    def runTest(self) -> None:
        self.setUp()
        self.test_segment_keeps_the_volume_grid()

    def test_segment_keeps_the_volume_grid(self) -> None:
        url = os.environ.get("MAMBAHOME_URL", "http://127.0.0.1:8765")
        logic = MambaHoMELogic()
        logic.connect(url, os.environ.get("MAMBAHOME_TOKEN"))
        rng = np.random.default_rng(0)
        kji = rng.normal(100, 20, size=(40, 48, 56)).astype(np.float32)
        kji[10:30, 12:36, 14:42] += 200
        volume = slicer.util.addVolumeFromArray(kji, name="MambaHoMETest")
        volume.SetSpacing(1.5, 1.2, 2.0)
        volume.SetOrigin(-30.0, 12.0, 40.0)
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        result = logic.segment(volume, seg)
        self.assertEqual(result.labels.shape, (56, 48, 40))
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), len(result.class_names) - 1)
        labels, names = logic.labels_from_segmentation(seg, volume)
        self.assertEqual(names[1:], result.class_names[1:])
        self.assertTrue(np.array_equal(labels, result.labels))
        self.delayDisplay("MambaHoME test passed")
