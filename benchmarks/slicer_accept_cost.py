"""GUI-thread cost of accepting a prompted object in the 3D Slicer module (``MambaHoMELogic.accept_segment``: the
object takes its voxels from every other segment, Slicer's *Overwrite all*), with the real MRML classes of
``slicer-core`` and no server.

The node is what an annotator has after **Segment** and a prompt on a large CT: ``--segments`` automatic segments (small
blobs, one shared labelmap as **Segment** writes them; three of them under the object), two hand-drawn segments in
labelmaps of their own (one under the object) and the open *MambaHoME interactive* object written by the module's own
``_apply`` from a prompt answer. Three ways to accept it, each on a fresh node and timed on its own:

- ``accept_segment``: the call itself;
- ``module ends it``: ``end_object`` (a switch of model, volume or server): rename, then accept;
- ``user renames it``: ``SetName`` in the Segment Editor; the module's observer accepts it.

Median (min-max) wall time over ``--repeats`` fresh nodes. ``--module`` times another copy of MambaHoME.py (the code
before a change) for a before/after table on the same machine.

``--segment-again`` times **Segment** pressed a second time instead (``MambaHoMELogic.write_segments`` on the node
without the object: the ``--segments`` automatic segments of the first result are removed from their shared labelmap,
the new result's written, the hand-drawn segments kept), and on its own the removal of the automatic segments, as
``write_segments`` removes them (``remove_segments``; a module without it: Slicer's ``RemoveSegment`` one by one).

    python benchmarks/slicer_accept_cost.py [--shape 512 512 400] [--segments 100] [--object 30 30 20] \
        [--repeats 3] [--module /tmp/before/MambaHoME.py] [--label before] [--only accept_segment] [--segment-again]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # mambahome_client, for a copy of the module outside the repository


def load(path: Path):
    spec = importlib.util.spec_from_file_location("MambaHoME", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def ball(shape, center, radii) -> tuple:
    """``(index box, bool ellipsoid in it)`` clipped to ``shape``."""
    lo = [max(int(c - r), 0) for c, r in zip(center, radii)]
    hi = [min(int(c + r) + 1, n) for c, r, n in zip(center, radii, shape)]
    grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0
    return tuple(slice(a, b) for a, b in zip(lo, hi)), inside


def scene(mod, shape, n_segments: int, seed: int = 0):
    """``(volume node, segmentation node, IJK-to-RAS)``: a CT's volume node and the node an annotator has after
    **Segment** (``n_segments`` automatic segments in one shared labelmap, three of them at the centre) and two
    hand-drawn segments in labelmaps of their own (one near the centre)."""
    import slicer
    import vtk

    rng = np.random.default_rng(seed)
    affine = np.array([[-0.8, 0, 0, 200.0], [0, -0.8, 0, 180.0], [0, 0, 1.25, -300.0], [0, 0, 0, 1.0]])
    mrml = slicer.vtkMRMLScene()
    volume = mrml.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    image = vtk.vtkImageData()
    image.SetDimensions(*shape)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    volume.SetAndObserveImageData(image)
    m = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, float(affine[i, j]))
    volume.SetIJKToRASMatrix(m)

    center = np.array(shape) // 2
    labels = np.zeros(shape, dtype=np.uint8)
    for value in range(1, n_segments + 1):
        if value <= 3:  # three organs under the object
            c = center + rng.integers(-20, 21, 3)
        else:
            c = rng.integers(20, np.array(shape) - 20)
        box, inside = ball(shape, c, rng.integers(6, 25, 3))
        labels[box][inside] = value
    names = ["background"] + [f"organ {v}" for v in range(1, n_segments + 1)]
    colors = [[0, 0, 0]] + [list(rng.random(3)) for _ in range(n_segments)]
    seg = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct MambaHoME")
    mod.MambaHoMELogic.set_segments(seg, volume, labels, names, colors, model_id="auto")
    for name, c in (("drawn near", center + 10), ("drawn far", np.array([30, 30, 30]))):
        drawn = np.zeros(shape, dtype=bool)
        box, inside = ball(shape, c, (15, 15, 10))
        drawn[box] = inside
        own = slicer.vtkSegment()
        own.SetName(name)
        own.AddRepresentation(mod.LABELMAP, mod._oriented_mask(drawn, affine))
        seg.GetSegmentation().AddSegment(own, name.replace(" ", "_"))
    return volume, seg, affine


def build(mod, shape, n_segments: int, seed: int = 0, radii=(30, 30, 20)):
    """``(volume node, segmentation node, logic, open object's segment ID, object mask (I, J, K), IJK-to-RAS)``:
    :func:`scene` with an open prompted object (an ellipsoid of ``radii`` at the centre)."""
    volume, seg, affine = scene(mod, shape, n_segments, seed)
    center = np.array(shape) // 2
    box, inside = ball(shape, center, radii)
    logic = mod.MambaHoMELogic()
    update = mod.MaskUpdate(bbox=box, mask=inside, latency_s=0.0, server_s=0.0, model_id="echo")
    logic._apply(update, seg, volume)  # the prompt answer written as the module writes it
    object_id = logic.open_segment_id(seg)
    obj = np.zeros(shape, dtype=bool)
    obj[box] = inside
    return volume, seg, logic, object_id, obj, affine


def run_once(mod, shape, n_segments: int, how: str, seed: int, radii) -> tuple:
    volume, seg, logic, object_id, obj, affine = build(mod, shape, n_segments, seed, radii)
    segment = seg.GetSegmentation().GetSegment(object_id)
    # the nodes of earlier runs go now, not inside the timed call (slicer-core's segmentation destructor separates
    # each segment of a shared labelmap: whole-volume work per segment)
    gc.collect()
    gc.disable()
    t0 = time.perf_counter()
    if how == "accept_segment":
        taken = mod.MambaHoMELogic.accept_segment(seg, object_id, shape, affine)
    elif how == "module ends it":
        logic.end_object(seg)
        taken = None
    else:
        segment.SetName("lesion")
        taken = None
    seconds = time.perf_counter() - t0
    gc.enable()
    accepted = mod.vtk.mutable("")
    assert segment.GetTag(mod.OBJECT_TAG, accepted) and str(accepted) == "accepted", how
    if taken is not None:
        assert len(taken) >= 3, taken  # three organs and the hand-drawn segment lie under the object
    return seconds, taken


def segment_again_once(mod, shape, n_segments: int, seed: int, keep: list) -> tuple:
    """``(seconds of write_segments, seconds of removing the automatic segments alone)`` on two fresh nodes."""
    rng = np.random.default_rng(100 + seed)
    labels = np.zeros(shape, dtype=np.uint8)
    for value in range(1, n_segments + 1):
        box, inside = ball(shape, rng.integers(20, np.array(shape) - 20), rng.integers(6, 25, 3))
        labels[box][inside] = value
    names = ["background"] + [f"organ {v}" for v in range(1, n_segments + 1)]
    colors = [[0, 0, 0]] + [list(rng.random(3)) for _ in range(n_segments)]
    volume, seg, _ = scene(mod, shape, n_segments, seed)
    keep.append((volume, seg))  # torn down at exit: slicer-core's destructor separates every shared segment
    gc.collect()
    gc.disable()
    t0 = time.perf_counter()
    ids, _, _ = mod.MambaHoMELogic.write_segments(seg, volume, labels, names, colors, model_id="auto")
    seconds = time.perf_counter() - t0
    gc.enable()
    assert len(ids) == n_segments and seg.GetSegmentation().GetNumberOfSegments() == n_segments + 2
    volume, seg, _ = scene(mod, shape, n_segments, seed)
    keep.append((volume, seg))
    automatic = mod.MambaHoMELogic.automatic_segment_ids(seg)
    gc.collect()
    gc.disable()
    t0 = time.perf_counter()
    if hasattr(mod.MambaHoMELogic, "remove_segments"):
        mod.MambaHoMELogic.remove_segments(seg, automatic)
    else:
        for segment_id in automatic:
            seg.GetSegmentation().RemoveSegment(segment_id)
    removal = time.perf_counter() - t0
    gc.enable()
    assert seg.GetSegmentation().GetNumberOfSegments() == 2
    return seconds, removal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400], help="volume I J K")
    parser.add_argument("--segments", type=int, default=100, help="automatic segments (one shared labelmap)")
    parser.add_argument("--object", type=int, nargs=3, default=[30, 30, 20],
                        help="the object's radii in voxels (an ellipsoid at the centre; 100 80 60: a liver)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--module", type=Path, default=ROOT / "slicer" / "MambaHoME" / "MambaHoME.py")
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--only", choices=["accept_segment", "module ends it", "user renames it"], default=None)
    parser.add_argument("--segment-again", action="store_true",
                        help="time a second Segment press (write_segments) instead of the accept")
    args = parser.parse_args()
    mod = load(args.module)
    shape = tuple(args.shape)
    if args.segment_again:
        print(f"device: {cpu_name()}, {platform.python_implementation()} {platform.python_version()}, load average "
              f"{os.getloadavg()[0]:.1f}; module: {args.module} ({args.label})", flush=True)
        print(f"volume {shape[0]}x{shape[1]}x{shape[2]} ({np.prod(shape) / 1e6:.0f} M voxels), {args.segments} "
              f"automatic segments (one shared labelmap) + 2 hand-drawn, replaced by a new result of as many; median "
              f"(min-max) of {args.repeats} fresh nodes\n")
        keep: list = []
        runs = [segment_again_once(mod, shape, args.segments, r, keep) for r in range(args.repeats)]
        print("| code | step | wall time, s |")
        print("|---|---|---|")
        for n, step in enumerate(["Segment again (write_segments)", "removing the automatic segments"]):
            times = [run[n] for run in runs]
            print(f"| {args.label} | {step} | {statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f}) |")
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
        sys.stdout.flush()
        os._exit(0)
    hows = [args.only] if args.only else ["accept_segment", "module ends it", "user renames it"]
    print(f"device: {cpu_name()}, {platform.python_implementation()} {platform.python_version()}; "
          f"module: {args.module} ({args.label})", flush=True)
    print(f"volume {shape[0]}x{shape[1]}x{shape[2]} ({np.prod(shape) / 1e6:.0f} M voxels), {args.segments} automatic "
          f"segments + 2 hand-drawn + the object (an ellipsoid of radii {' '.join(map(str, args.object))} voxels); "
          f"median (min-max) of {args.repeats} fresh nodes\n")
    print("| code | accepted by | wall time, s |")
    print("|---|---|---|")
    for how in hows:
        times = []
        for r in range(args.repeats):
            seconds, _ = run_once(mod, shape, args.segments, how, seed=r, radii=tuple(args.object))
            times.append(seconds)
        print(f"| {args.label} | {how} | {statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f}) |",
              flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip tearing the last nodes down: minutes of slicer-core's destructors, nothing measured


if __name__ == "__main__":
    main()
