"""Host memory and time of the engine's whole-volume steps on a clinical-size CT (CPU).

Each case runs in a fresh Python process. Peak memory is the kernel's high-water mark of the process's resident
set (``VmHWM``), reset (``/proc/self/clear_refs``) just before the measured step, so what the step itself adds
above what was already resident (imports, model, the loaded volume) is reported, not the import peak.

Cases:

- ``load_nii`` / ``load_nrrd``: :func:`engine.io.load_volume` of the .nii.gz / .nrrd.
- ``session_ct``: :class:`engine.interactive.InteractiveSession` start with the bundled promptable model (the
  volume loaded first; its guessed modality CT selects the HU clip rule), then one positive point prompt.
- ``session_pct``: the same forced to ``modality="MR"``, the percentile rule (0.5/99.5 %).
- ``predict_prep``: what ``mambahome predict`` (:meth:`engine.inference.Predictor.predict_file`) runs before the
  sliding window with the bundled automatic model: the modality check and ``Predictor.network_input`` (reorient,
  resample to 1.5x1.5x2 mm, normalise). The windows themselves are not run here (about 15 minutes on 2 cores; see
  ``bench_large_volume.py``); their memory does not depend on the normalisation.

``--baseline-root`` runs every case a second time with the ``engine`` package of another tree (e.g. the previous
commit, exported with ``git archive HEAD engine | tar -x -C /tmp/base``), giving a before/after table.

    python benchmarks/large_volume_memory.py --nii /tmp/bigvol/ct_512x512x400.nii.gz \\
        --nrrd /tmp/bigvol/ct_512x512x400.nrrd --baseline-root /tmp/bigvol/base_tree \\
        --out benchmarks/results/large-volume-memory-2026-12-05-cpu2.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "napari_mambahome" / "models"
CASES = ("load_nii", "load_nrrd", "session_ct", "session_pct", "predict_prep")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    # "5" resets the peak resident set size (VmHWM) to the current one (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _child(case: str, nii: str, nrrd: str) -> dict:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from engine.io import load_volume

    result: dict = {}
    if case in ("load_nii", "load_nrrd"):
        path = nii if case == "load_nii" else nrrd
        base = _status_mb("VmRSS")
        _reset_peak()
        t = time.perf_counter()
        vol = load_volume(path)
        result["seconds"] = time.perf_counter() - t
        result["held_mb"] = vol.data.nbytes / 2**20
    elif case.startswith("session"):
        from engine.checkpoint import load_checkpoint
        from engine.interactive import InteractiveSession

        model = load_checkpoint(str(MODELS / "interactive.safetensors"), device="cpu")
        vol = load_volume(nii)
        base = _status_mb("VmRSS")
        _reset_peak()
        t = time.perf_counter()
        session = InteractiveSession(model, vol, device="cpu", modality="MR" if case == "session_pct" else None)
        result["seconds"] = time.perf_counter() - t
        result["start_peak_mb"] = _status_mb("VmHWM") - base
        centre = tuple(s // 2 for s in vol.shape)  # inside the abdomen: the scan is centred in its field of view
        t = time.perf_counter()
        up = session.add_point(centre)
        result["first_point_s"] = time.perf_counter() - t
        result["first_point_voxels"] = int(up.mask.sum())
        result["held_mb"] = _status_mb("VmRSS") - base
    elif case == "predict_prep":
        from engine.inference import Predictor

        predictor = Predictor(str(MODELS / "default.safetensors"), device="cpu")
        vol = load_volume(nii)
        base = _status_mb("VmRSS")
        _reset_peak()
        t = time.perf_counter()
        modality = vol.modality
        predictor.modality_warning([vol], modality=modality, name=nii)
        image, _ctx = predictor.network_input(vol, modality)
        result["seconds"] = time.perf_counter() - t
        result["network_shape"] = list(image.shape[2:])
        result["held_mb"] = _status_mb("VmRSS") - base
    else:
        raise SystemExit(f"unknown case {case}")
    result["peak_mb"] = _status_mb("VmHWM") - base
    result["volume_mb"] = vol.data.nbytes / 2**20
    return result


def run_case(case: str, code_root: Path, nii: str, nrrd: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code_root))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--nii", nii, "--nrrd", nrrd]
    out = subprocess.run(cmd, env=env, cwd=str(code_root), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{case} under {code_root} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nii", required=True)
    ap.add_argument("--nrrd", required=True)
    ap.add_argument("--baseline-root", type=Path, default=None, help="tree whose engine/ gives the 'before' column")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, os.environ.get("PYTHONPATH", str(ROOT)))
        print(json.dumps(_child(args.child, args.nii, args.nrrd)))
        return
    import nibabel as nib

    shape = tuple(int(s) for s in nib.load(args.nii).shape)
    trees = ([("before", args.baseline_root)] if args.baseline_root else []) + [("after", ROOT)]
    rows = []
    for case in args.cases:
        row = {"case": case}
        for label, tree in trees:
            r = run_case(case, tree, args.nii, args.nrrd)
            row[label] = r
            print(case, label, r, flush=True)
        rows.append(row)
    head = ["case"]
    for label, _ in trees:
        head += [f"peak above start MB ({label})", f"time s ({label})"]
    head += ["extra"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["case"]]
        for label, _ in trees:
            r = row[label]
            cells += [f"{r['peak_mb']:.0f}", f"{r['seconds']:.2f}"]
        last = row[trees[-1][0]]
        extra = [f"volume {last['volume_mb']:.0f} MB float32", f"held after {last['held_mb']:.0f} MB"]
        if "start_peak_mb" in last:
            extra.append("start-only peak " + " / ".join(f"{row[l]['start_peak_mb']:.0f}" for l, _ in trees) + " MB")
            extra.append("first point " + " / ".join(f"{row[l]['first_point_s']:.2f}" for l, _ in trees) + " s, "
                         + " / ".join(str(row[l]["first_point_voxels"]) for l, _ in trees) + " voxels")
        if "network_shape" in last:
            extra.append(f"network grid {last['network_shape']}")
        cells.append("; ".join(extra))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = "\n".join([
        "# Large-volume host memory (CPU)", "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- device: CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}",
        f"- volume: {args.nii} {shape} int16 (and {args.nrrd})",
        f"- code: after = working tree on {commit}"
        + (f"; before = {args.baseline_root}" + (f" ({(args.baseline_root / 'COMMIT').read_text().strip()[:7]})"
                                                  if (args.baseline_root / "COMMIT").exists() else "")
           if args.baseline_root else ""),
        "- peak above start: VmHWM - VmRSS, the high-water mark reset just before the step (imports, model and the "
        "loaded volume already resident)",
        f"- command: python {' '.join(sys.argv)}", "", table, ""])
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
