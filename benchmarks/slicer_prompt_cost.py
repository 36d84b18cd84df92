"""GUI-thread cost of writing one prompt answer into the 3D Slicer module's open object (``MambaHoMELogic._apply``: the
server's changed box and the object's mask there, written into the *MambaHoME interactive* segment), with the real MRML
classes of ``slicer-core`` and no server.

The node is :func:`slicer_accept_cost.scene` (a CT after **Segment**: ``--segments`` automatic segments in one shared
labelmap, two hand-drawn segments). On it an annotator's object is prompted, each answer a ``MaskUpdate`` as the server
sends it (the box it changed, the mask there), each written and timed on its own:

- ``first prompt``: a new object, an ellipsoid of ``--object`` radii at the centre (30 30 20: 75 k voxels; 100 80 60:
  a liver, 2.0 M voxels);
- ``- click``: a ball of a third of the radii cut from the object's edge;
- ``+ click outside``: a ball of a third of the radii added beyond the object's box (the segment's labelmap widens);
- ``+ click, whole box``: the object redrawn a little wider, the answer's box its whole box;
- ``undo whole box``, ``undo + click``, ``undo - click``: the three clicks taken back, newest first;
- ``reset``: the object cleared (the box of its voxels, all 0).

Median (min-max) wall time over ``--repeats`` fresh nodes. The segment's voxels after each step are checked against
the masks the answers make (whole-volume, outside the timing). ``--module`` times another copy of MambaHoME.py (the code
before a change) for a before/after table on the same machine.

    python benchmarks/slicer_prompt_cost.py [--shape 512 512 400] [--segments 100] [--object 30 30 20] \
        [--repeats 3] [--module /tmp/before/MambaHoME.py] [--label before] [--no-check]
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slicer_accept_cost import ROOT, ball, cpu_name, load, scene  # noqa: E402

STEPS = ["first prompt", "- click", "+ click outside", "+ click, whole box", "undo whole box", "undo + click",
         "undo - click", "reset"]


def answers(shape, radii):
    """``[(step, box (I, J, K) slices, mask there)]``: the server's answers to the steps of :data:`STEPS`."""
    shape, radii = np.array(shape), np.array(radii)
    center = shape // 2
    obj = np.zeros(tuple(shape), dtype=bool)
    out, history = [], []

    def answer(step, box, new):
        history.append((box, obj[box].copy()))
        obj[box] = new
        out.append((step, box, new.copy()))

    def undo(step):
        box, previous = history.pop()
        obj[box] = previous
        out.append((step, box, previous))

    box, inside = ball(tuple(shape), center, radii)
    answer("first prompt", box, inside)
    box, cut = ball(tuple(shape), center + np.array([int(radii[0] * 0.8), 0, 0]), np.maximum(radii // 3, 1))
    answer("- click", box, obj[box] & ~cut)
    box, add = ball(tuple(shape), center + np.array([0, int(radii[1] * 1.1), 0]), np.maximum(radii // 3, 1))
    answer("+ click outside", box, obj[box] | add)
    box, wider = ball(tuple(shape), center, radii + np.maximum(radii // 20, 1))  # the whole object redrawn, wider
    answer("+ click, whole box", box, obj[box] | wider)
    undo("undo whole box")
    undo("undo + click")
    undo("undo - click")
    nz = [np.flatnonzero(obj.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    box = tuple(slice(int(n[0]), int(n[-1]) + 1) for n in nz)
    answer("reset", box, np.zeros(tuple(s.stop - s.start for s in box), dtype=bool))
    return out


def run_once(mod, shape, n_segments: int, seed: int, radii, check: bool, keep: list) -> dict:
    volume, seg, affine = scene(mod, shape, n_segments, seed)
    keep.append((volume, seg))  # torn down at exit, not inside a timed call (slicer-core's destructors are slow)
    logic = mod.MambaHoMELogic()
    expected = np.zeros(shape, dtype=bool)
    times = {}
    for step, box, mask in answers(shape, radii):
        update = mod.MaskUpdate(bbox=box, mask=mask, latency_s=0.0, server_s=0.0, model_id="echo")
        gc.collect()
        gc.disable()
        t0 = time.perf_counter()
        logic._apply(update, seg, volume)
        times[step] = time.perf_counter() - t0
        gc.enable()
        expected[box] = mask
        if check:
            got = mod.segment_mask(seg, logic.open_segment_id(seg), shape, affine)
            assert np.array_equal(got, expected), f"{step}: the segment is not the answers' mask"
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400], help="volume I J K")
    parser.add_argument("--segments", type=int, default=100, help="automatic segments (one shared labelmap)")
    parser.add_argument("--object", type=int, nargs=3, default=[30, 30, 20],
                        help="the object's radii in voxels (an ellipsoid at the centre; 100 80 60: a liver)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--module", type=Path, default=ROOT / "slicer" / "MambaHoME" / "MambaHoME.py")
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--no-check", action="store_true", help="skip checking the segment after each step")
    args = parser.parse_args()
    mod = load(args.module)
    shape = tuple(args.shape)
    radii = tuple(args.object)
    n_obj = int(sum(int(m.sum()) for step, _, m in answers(shape, radii)[:1]))
    print(f"device: {cpu_name()}, {platform.python_implementation()} {platform.python_version()}, load average "
          f"{os.getloadavg()[0]:.1f}; module: {args.module} ({args.label})", flush=True)
    print(f"volume {shape[0]}x{shape[1]}x{shape[2]} ({np.prod(shape) / 1e6:.0f} M voxels), {args.segments} automatic "
          f"segments + 2 hand-drawn; the object: an ellipsoid of radii {' '.join(map(str, radii))} voxels "
          f"({n_obj / 1e6:.2f} M voxels); median (min-max) of {args.repeats} fresh nodes\n")
    keep: list = []
    runs = [run_once(mod, shape, args.segments, r, radii, check=not args.no_check and r == 0, keep=keep)
            for r in range(args.repeats)]
    print("| code | answer | wall time of _apply, s |")
    print("|---|---|---|")
    for step in STEPS:
        times = [run[step] for run in runs]
        print(f"| {args.label} | {step} | {statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f}) |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    sys.stdout.flush()
    os._exit(0)  # skip tearing the nodes down: minutes of slicer-core's destructors, nothing measured


if __name__ == "__main__":
    main()
