"""A clinical-size CT on the CPU: time, peak memory and the longest stretch without a progress report, per stage.

Makes the volume from the real shared data (never into the project): the 3 mm abdomen CT of
``$MAMBAHOME_SHARED_DATA`` (default ``../shared/data``) resampled to 0.8x0.8x1.5 mm, padded with air to
512x512 in-plane and mirrored along z to 224 slices (the file covers only 90 mm), stored int16 with an
LPS-style affine and a 7 degree gantry tilt, so the network grid is resampled and not a permutation of it.
Its labels (TotalSegmentator ids) go beside it.

    python benchmarks/bench_large_volume.py --workdir /tmp/bigct --out benchmarks/results/<name>.md
    python benchmarks/bench_large_volume.py --workdir /tmp/bigct --no-network   # stages around the windows only

``--no-network`` replaces the sliding window by random logits (the windows take ~15 minutes on 2 cores),
measuring load, preprocessing, the way back to the scan's grid and the write. Peak RSS is sampled every 50 ms.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_volume(workdir: Path) -> Path:
    import nibabel as nib
    from scipy import ndimage

    out = workdir / "ct.nii.gz"
    if out.exists():
        return out
    src = Path(os.environ.get("MAMBAHOME_SHARED_DATA", ROOT.parent / "shared" / "data")) / "abdomen_ct_mr"
    img, lab = nib.load(src / "ct_image.nii.gz"), nib.load(src / "ct_label_auto.nii.gz")
    zoom = (3 / 0.8, 3 / 0.8, 3 / 1.5)
    a = ndimage.zoom(np.asarray(img.dataobj, np.float32), zoom, order=1, mode="nearest", grid_mode=True)
    lbl = ndimage.zoom(np.asarray(lab.dataobj), zoom, order=0, mode="nearest", grid_mode=True)

    def pad(x, fill, nz=224):
        full = np.full((512, 512, x.shape[2]), fill, x.dtype)
        ox, oy = (512 - x.shape[0]) // 2, (512 - x.shape[1]) // 2
        full[ox:ox + x.shape[0], oy:oy + x.shape[1]] = x[:512, :512]
        stack = [full if i % 2 == 0 else full[:, :, ::-1] for i in range(-(-nz // x.shape[2]))]
        return np.ascontiguousarray(np.concatenate(stack, axis=2)[:, :, :nz])

    tilt = np.deg2rad(7.0)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[-1, 0, 0], [0, -np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]]) \
        @ np.diag([0.8, 0.8, 1.5])
    affine[:3, 3] = [204.4, 180.2, -310.5]
    workdir.mkdir(parents=True, exist_ok=True)
    for name, arr in (("ct", np.round(pad(a, -1024.0)).astype(np.int16)), ("ct_label", pad(lbl, 0).astype(np.uint8))):
        im = nib.Nifti1Image(arr, affine)
        im.set_qform(affine, 1)
        im.set_sform(affine, 1)
        nib.save(im, str(workdir / f"{name}.nii.gz"))
    return out


class Meter:
    """Peak RSS since the last :meth:`stage` and the longest gap between progress reports."""

    def __init__(self) -> None:
        self.peak = self.rss()
        self.last = time.perf_counter()
        self.gap = 0.0
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def rss() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.05)

    def progress(self, done: int, total: int, message: str) -> None:
        now = time.perf_counter()
        self.gap = max(self.gap, now - self.last)
        self.last = now

    def stage(self):
        self.peak, self.gap, self.last = self.rss(), 0.0, time.perf_counter()
        return time.perf_counter()

    def row(self, name: str, start: float) -> str:
        seconds = time.perf_counter() - start
        gap = max(self.gap, time.perf_counter() - self.last)
        return f"| {name} | {seconds:.1f} | {self.peak:.0f} | {gap:.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/bigct")
    ap.add_argument("--checkpoint", default=str(ROOT / "napari_mambahome/models/default.safetensors"))
    ap.add_argument("--no-network", action="store_true", help="random logits instead of the sliding window")
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    args = ap.parse_args()

    import torch

    from engine.inference import Predictor, source_grid_labels
    from engine.io import atomic_write_all, load_volume, volume_writer

    path = make_volume(Path(args.workdir))
    meter = Meter()
    rows = ["| stage | s | peak RSS (MB) | longest without a report (s) |", "|---|---|---|---|"]
    predictor = Predictor(args.checkpoint, device="cpu")
    t = meter.stage()
    volume = load_volume(path)
    rows.append(meter.row(f"load {volume.shape} ({volume.data.dtype} in memory)", t))
    t = meter.stage()
    image, ctx = predictor.network_input(volume, "CT")
    rows.append(meter.row(f"preprocess -> {tuple(image.shape[2:])}", t))
    t = meter.stage()
    if args.no_network:
        logits = torch.randn((1, predictor.num_classes) + tuple(image.shape[2:]))
        rows.append(meter.row("windows (skipped: random logits)", t))
    else:
        logits = predictor.logits(image, progress=meter.progress)
        rows.append(meter.row("windows", t))
    t = meter.stage()
    labels = source_grid_labels(logits[0], ctx, progress=meter.progress)
    rows.append(meter.row(f"back to the scan's grid ({labels.dtype})", t))
    t = meter.stage()
    out = Path(args.workdir) / "bench_labels.nii.gz"
    atomic_write_all([(out, volume_writer(out, labels, volume))], overwrite=True)
    rows.append(meter.row("write labels (.nii.gz)", t))
    text = "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
