"""Build the interactive model's training and evaluation datasets from the shared real data.

    python experiments/interactive_data.py --shared ../shared/data --out /tmp/interactive-data --phantoms 16

Writes three dataset folders under ``--out`` (each in nnU-Net v2 raw layout: ``dataset.json`` with
``channel_names``, ``labels``, ``file_ending``, images ``imagesTr/<case>_0000.nii.gz``, labels
``labelsTr/<case>.nii.gz``; the ``dataset.json`` also lists the pairs MSD-style under ``training``):

- ``train/``: ONE combined set for ``mambahome train --task interactive``: the MSD Hippocampus
  training split (160 cases of the fixed split of ``experiments/hippocampus.py``: seed 0, 40 held
  out), the TotalSegmentator abdomen CT and MR, the spinal cord T1, and ``--phantoms`` synthetic CT
  and as many MR phantoms (:mod:`engine.synth`). Every source keeps its structures as distinct labels
  of one unified class list (``hippocampus anterior``, ``spleen``, ``spinal cord``, ``phantom organ``
  ...; the interactive task is class-agnostic, the names only say where an object came from).
  Structures smaller than ``--min-voxels`` in a case are set to background there.
- ``hippocampus_heldout/``: the 40 held-out hippocampus cases (never in ``train/``).
- ``spinal_t2/``: the spinal cord T2 case (never in ``train/``: the zero-shot check).

Intensities (mixed modalities): the trainer normalises each case by its own modality's rule
(:mod:`engine.preprocess`: CT windowed to HU [-175, 250], MR by 0.5-99.5 percentiles), and
``engine.datasets`` reads a per-case ``modality`` from each ``training`` entry. So images are kept as
they are (symlinks to the shared files) and each entry says ``CT`` or ``MR``; the dataset's default
channel is ``MR``. The checkpoint then carries both rules, and a session must be told the modality of
its volume (``InteractiveSession(..., modality="CT")``; ``evaluate-interactive`` passes each case's).
A CT volume opened without ``modality="CT"`` gets the MR (percentile) rule, which the model never saw
for CT.

Files that can be used as they are become symlinks; remapped label maps are written atomically with
:func:`engine.io.save_volume` on the source's grid. Each folder is built beside its final place and
renamed into it when complete, so an interrupted run leaves no half dataset; a complete folder is kept
(rerun with ``--overwrite`` to rebuild). ``manifest.json`` records sources, licences, the split,
dropped structures and the validation seed that keeps the single real cases in training.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.io import Volume, load_label, load_volume, save_volume, write_json_atomic  # noqa: E402

ENDING = ".nii.gz"
HIPPO_SEED, HIPPO_HELDOUT = 0, 40
MIN_VOXELS = 50
# TotalSegmentator v2 ids the shared README names (the same in `total` for CT and `total_mr` for MR);
# other ids become "<modality> label <id>" unless the shared folder holds a names file.
README_NAMES = {1: "spleen", 2: "kidney right", 3: "kidney left", 5: "liver", 6: "stomach", 7: "pancreas"}
NAMES_FILE = "label_names.json"  # optional: {"ct": {"1": "spleen", ...}, "mr": {...}} in abdomen_ct_mr/
LICENCES = {
    "hippocampus": "MSD Task04 Hippocampus (Vanderbilt), CC BY-SA 4.0",
    "abdomen_ct_mr": "TotalSegmentator test references, Apache-2.0 (labels are a model's output)",
    "spinal_cord_mri": "spinalcordtoolbox testing data, MIT",
    "phantoms": "engine.synth synthetic phantoms (generated)",
}


class InteractiveDataError(ValueError):
    """The shared data folder lacks what the builder needs; the message names the file."""


def hippocampus_split(hippo: Path, seed: int = HIPPO_SEED, heldout: int = HIPPO_HELDOUT) -> Tuple[List[str], List[str]]:
    """The fixed split of ``experiments/hippocampus.py``: ``(train_ids, heldout_ids)``, both sorted.

    Args:
        hippo: the shared ``hippocampus`` folder (MSD ``dataset.json`` with a ``training`` list).
    """
    meta_path = hippo / "dataset.json"
    if not meta_path.is_file():
        raise InteractiveDataError(f"{meta_path} not found (expected the MSD hippocampus set)")
    meta = json.loads(meta_path.read_text())
    ids = sorted(Path(e["image"]).name.replace(ENDING, "") for e in meta["training"])
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    return sorted(order[heldout:]), sorted(order[:heldout])


def abdomen_names(folder: Path) -> Dict[str, Dict[int, str]]:
    """``{"ct": {id: name}, "mr": {id: name}}`` from ``label_names.json`` when present, else the README's."""
    path = folder / NAMES_FILE
    if path.is_file():
        raw = json.loads(path.read_text())
        return {m: {int(k): str(v).replace("_", " ") for k, v in raw.get(m, {}).items()} for m in ("ct", "mr")}
    return {"ct": dict(README_NAMES), "mr": dict(README_NAMES)}


class _Source:
    """One labelled case to bring in: where its files are, its modality and its id -> unified-name map."""

    def __init__(self, case_id: str, image: Path, label: Optional[Path], modality: str, names: Dict[int, str],
                 source: str, arrays: Optional[Tuple[Volume, np.ndarray]] = None) -> None:
        self.case_id, self.image, self.label, self.modality = case_id, image, label, modality
        self.names, self.source, self.arrays = names, source, arrays


def abdomen_halves(image: Volume, label: np.ndarray) -> Tuple[Tuple[Volume, np.ndarray], Tuple[Volume, np.ndarray]]:
    """The abdomen volume cut at the patient's midline into ``(liver side, spleen side)``, each ``(image, label)``
    with its affine moved to the half's first voxel.

    The cut is along the array axis on which the right and left kidney (TotalSegmentator ids 2 and 3) lie
    farthest apart, halfway between their centres (the midline in these scans; both shared volumes hold
    both kidneys). The liver's side is the right kidney's.
    """
    right, left = np.argwhere(label == 2).mean(0), np.argwhere(label == 3).mean(0)
    if np.isnan(right).any() or np.isnan(left).any():
        raise InteractiveDataError(f"{image.path}: both kidneys (labels 2 and 3) are needed to find the midline")
    axis = int(np.argmax(np.abs(right - left)))
    cut = int(round((right[axis] + left[axis]) / 2))
    halves = []
    for lo, hi in ((0, cut), (cut, image.shape[axis])):
        index = [slice(None)] * 3
        index[axis] = slice(lo, hi)
        shift = np.eye(4)
        shift[axis, 3] = lo
        half = Volume(np.ascontiguousarray(image.data[tuple(index)]), image.affine @ shift, image.spacing,
                      modality=image.modality)
        halves.append((half, np.ascontiguousarray(label[tuple(index)])))
    liver_first = right[axis] < cut
    return (halves[0], halves[1]) if liver_first else (halves[1], halves[0])


def _sources(shared: Path, train_ids: Sequence[str], phantoms: int, phantom_shape: Sequence[int],
             abdomen_half: bool = False) -> List[_Source]:
    hippo, abdomen, spine = shared / "hippocampus", shared / "abdomen_ct_mr", shared / "spinal_cord_mri"
    hippo_names = {1: "hippocampus anterior", 2: "hippocampus posterior"}
    out = [_Source(cid, hippo / "imagesTr" / f"{cid}{ENDING}", hippo / "labelsTr" / f"{cid}{ENDING}", "MR",
                   hippo_names, "hippocampus") for cid in train_ids]
    names = abdomen_names(abdomen)
    for m in ("ct", "mr"):
        label = abdomen / f"{m}_label_auto{ENDING}"
        image = abdomen / f"{m}_image{ENDING}"
        label_data = np.asarray(load_label(label).data)
        arrays = None
        if abdomen_half:  # only the liver's side trains; the spleen's side is kept for evaluation
            arrays = abdomen_halves(load_volume(image), label_data)[0]
            label_data = arrays[1]
        ids = np.unique(label_data)
        mapping = {int(i): names[m].get(int(i), f"{m.upper()} label {int(i)}") for i in ids if i != 0}
        out.append(_Source(f"abdomen_{m}" + ("_liver_side" if abdomen_half else ""), image,
                           None if abdomen_half else label, m.upper(), mapping, "abdomen_ct_mr", arrays=arrays))
    out.append(_Source("spinal_t1", spine / f"t1_image{ENDING}", spine / f"t1_label{ENDING}", "MR", {1: "spinal cord"},
                       "spinal_cord_mri"))
    if phantoms:
        from engine.synth import make_phantom

        for modality, base in (("CT", 1000), ("MR", 2000)):
            for i in range(phantoms):
                ph = make_phantom(phantom_shape, modality=modality, seed=base + i)
                image, _ = ph.to_volumes()
                mapping = {k: f"phantom {n}" for k, n in enumerate(ph.class_names) if k}
                out.append(_Source(f"phantom_{modality.lower()}_{i:03d}", Path(f"<phantom seed {base + i}>"), None,
                                   modality, mapping, "phantoms", arrays=(image, ph.label)))
    for s in out:
        for f in (s.image, s.label):
            if s.arrays is None and f is not None and not f.is_file():
                raise InteractiveDataError(f"{f} not found (case {s.case_id}); see {shared / 'README.md'}")
    return out


def _natural(name: str) -> List[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve())


def _write_folder(final: Path, name: str, class_names: List[str], entries: List[Dict[str, str]],
                  default_modality: str, description: str) -> None:
    write_json_atomic(final / "dataset.json", {
        "name": name, "description": description,
        "channel_names": {"0": default_modality},
        "labels": {n: i for i, n in enumerate(class_names)},
        "numTraining": len(entries), "file_ending": ENDING, "training": entries,
    })


def _build(final: Path, overwrite: bool, build) -> bool:
    """Build a dataset folder in ``<final>.building`` and rename it into place; False when kept as is."""
    if (final / "dataset.json").is_file() and not overwrite:
        print(f"kept {final} (complete; --overwrite rebuilds it)", flush=True)
        return False
    tmp = final.with_name(final.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return True


def source_weights(sources: Sequence[_Source], shares: Optional[Dict[str, float]]) -> Dict[str, float]:
    """``{case_id: sampling weight}`` giving each source (``hippocampus``, ``abdomen_ct_mr``,
    ``spinal_cord_mri``, ``phantoms``) its share of the training patches, split equally over its cases;
    empty without ``shares`` (every case drawn equally often). Weights average 1 over the cases."""
    if not shares:
        return {}
    counts: Dict[str, int] = {}
    for src in sources:
        counts[src.source] = counts.get(src.source, 0) + 1
    unknown = sorted(set(shares) - set(counts))
    missing = sorted(set(counts) - set(shares))
    if unknown or missing:
        raise InteractiveDataError(f"--source-shares: {'unknown ' + ', '.join(unknown) if unknown else ''}"
                                   f"{'; ' if unknown and missing else ''}"
                                   f"{'no share for ' + ', '.join(missing) if missing else ''} "
                                   f"(the sources: {', '.join(sorted(counts))})")
    if any(not (v > 0) for v in shares.values()):
        raise InteractiveDataError(f"--source-shares must all be positive, got {shares}")
    total = sum(shares.values())
    n = len(sources)
    return {src.case_id: shares[src.source] / total / counts[src.source] * n for src in sources}


def build_training_set(sources: List[_Source], out: Path, min_voxels: int,
                       weights: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """Write the combined training set into ``out`` (an empty folder); ``weights`` (:func:`source_weights`)
    become the entries' ``weight``.

    Returns:
        ``{"class_names", "cases": {case_id: {...}}, "dropped": {case_id: {name: voxels}}}``.
    """
    loaded: List[Tuple[_Source, Volume, np.ndarray]] = []
    kept_names: set = set()
    dropped: Dict[str, Dict[str, int]] = {}
    for s in sources:  # pass 1: which structures survive where
        if s.arrays is not None:
            ref, label = s.arrays
        else:
            ref = load_volume(s.image)
            label = np.asarray(load_label(s.label, reference=ref).data)
        ids, counts = np.unique(label, return_counts=True)
        for i, c in zip(ids.tolist(), counts.tolist()):
            if i == 0:
                continue
            if i not in s.names:
                raise InteractiveDataError(f"{s.label}: label value {i} has no name")
            if c < min_voxels:
                dropped.setdefault(s.case_id, {})[s.names[i]] = int(c)
            else:
                kept_names.add(s.names[i])
        loaded.append((s, ref, label))
    # hippocampus first so its label files keep their ids (1, 2) and stay symlinks
    first = ["hippocampus anterior", "hippocampus posterior"]
    class_names = ["background"] + [n for n in first if n in kept_names] + sorted(kept_names - set(first), key=_natural)
    index = {n: i for i, n in enumerate(class_names)}
    entries, cases = [], {}
    for n, (s, ref, label) in enumerate(loaded):
        lut = np.zeros(int(label.max()) + 1, dtype=np.int64)
        for i, name in s.names.items():
            if i < lut.size and name in index and s.names[i] not in dropped.get(s.case_id, {}):
                lut[i] = index[name]
        image_path = out / "imagesTr" / f"{s.case_id}_0000{ENDING}"
        label_path = out / "labelsTr" / f"{s.case_id}{ENDING}"
        if s.arrays is not None:
            save_volume(image_path, ref.data, ref)
        else:
            _link(s.image, image_path)
        identity = np.array_equal(lut, np.arange(lut.size)) or np.array_equal(lut[np.unique(label)], np.unique(label))
        if s.label is not None and identity:
            _link(s.label, label_path)
        else:
            remapped = lut[label]
            save_volume(label_path, remapped.astype(np.uint8 if len(class_names) < 256 else np.uint16), ref)
        entries.append({"image": f"./imagesTr/{image_path.name}", "label": f"./labelsTr/{label_path.name}",
                        "modality": s.modality, **({"weight": round(weights[s.case_id], 6)} if weights else {})})
        cases[s.case_id] = {"source": s.source, "modality": s.modality, "image": str(s.image),
                            "label": str(s.label) if s.label else "generated", "shape": list(label.shape),
                            "spacing": [round(float(v), 4) for v in ref.spacing]}
        if (n + 1) % 20 == 0 or n + 1 == len(loaded):
            print(f"  train: {n + 1}/{len(loaded)} cases", flush=True)
    _write_folder(out, "Interactive training set (hippocampus train split, abdomen CT/MR, spinal T1, phantoms)",
                  class_names, entries, "MR", "experiments/interactive_data.py; per-case modality in 'training'")
    return {"class_names": class_names, "cases": cases, "dropped": dropped}


def build_eval_set(pairs: Sequence[Tuple[str, Path, Path]], out: Path, class_names: List[str], name: str) -> None:
    """An evaluation dataset of symlinked ``(case_id, image, label)`` pairs (labels used as they are)."""
    entries = []
    for case_id, image, label in pairs:
        _link(image, out / "imagesTr" / f"{case_id}_0000{ENDING}")
        _link(label, out / "labelsTr" / f"{case_id}{ENDING}")
        entries.append({"image": f"./imagesTr/{case_id}_0000{ENDING}", "label": f"./labelsTr/{case_id}{ENDING}",
                        "modality": "MR"})
    _write_folder(out, name, class_names, entries, "MR", "experiments/interactive_data.py (evaluation only)")


def validation_seed(train_dir: Path, val_fraction: float, keep: Sequence[str], tries: int = 100) -> int:
    """The smallest trainer seed whose validation split (``engine.datasets.split_cases``) leaves every
    case of ``keep`` (the single real cases of a source) in training."""
    from engine.datasets import load_dataset, split_cases

    ds = load_dataset(train_dir)
    for seed in range(tries):
        _, val = split_cases(ds.cases, val_fraction, seed)
        if not set(keep) & {c.case_id for c in val}:
            return seed
    raise InteractiveDataError(f"no seed below {tries} keeps {list(keep)} out of validation")


def build(shared: Path, out: Path, phantoms: int = 16, phantom_shape: Sequence[int] = (64, 64, 64),
          min_voxels: int = MIN_VOXELS, val_fraction: float = 0.1, overwrite: bool = False,
          hippo_train_limit: Optional[int] = None, source_shares: Optional[Dict[str, float]] = None,
          abdomen_half: bool = False) -> Dict[str, Any]:
    """Build ``train/``, ``hippocampus_heldout/`` and ``spinal_t2/`` under ``out`` and ``manifest.json``.

    Args:
        shared: the shared data folder (``hippocampus/``, ``abdomen_ct_mr/``, ``spinal_cord_mri/``).
        out: output folder (created).
        phantoms: synthetic phantoms per modality (CT seeds 1000.., MR seeds 2000..).
        phantom_shape: phantom array shape.
        min_voxels: structures with fewer voxels in a case become background there.
        val_fraction: the trainer's ``--val-fraction``, to choose a seed keeping single real cases in training.
        overwrite: rebuild complete folders.
        hippo_train_limit: use only the first N training-split hippocampus cases (smoke tests).
        source_shares: ``{source: share}`` of the training patches (:func:`source_weights`); None: per case.
        abdomen_half: train on the liver's half of each abdomen volume only and write the spleen's halves to
            ``abdomen_spleen_side/`` (``ct_image``, ``ct_label``, ``mr_image``, ``mr_label``): organs the
            model never saw, in a modality it did (a probe of what the abdomen cases teach).

    Returns:
        the manifest (also ``out/manifest.json``).
    """
    t0 = time.time()
    shared, out = Path(shared), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_ids, heldout_ids = hippocampus_split(shared / "hippocampus")
    used_train = train_ids[:hippo_train_limit] if hippo_train_limit else train_ids
    sources = _sources(shared, used_train, phantoms, phantom_shape, abdomen_half)
    weights = source_weights(sources, source_shares)
    info: Dict[str, Any] = {}

    def _train(tmp: Path) -> None:
        info.update(build_training_set(sources, tmp, min_voxels, weights))

    if abdomen_half:
        def _spleen_side(tmp: Path) -> None:
            for m in ("ct", "mr"):
                image = load_volume(shared / "abdomen_ct_mr" / f"{m}_image{ENDING}")
                label = np.asarray(load_label(shared / "abdomen_ct_mr" / f"{m}_label_auto{ENDING}").data)
                (half, half_label) = abdomen_halves(image, label)[1]
                save_volume(tmp / f"{m}_image{ENDING}", half.data, half)
                save_volume(tmp / f"{m}_label{ENDING}", half_label.astype(np.uint8), half)
            write_json_atomic(tmp / "dataset.json", {"note": "not a training set: the spleen's halves of the "
                                                             "abdomen volumes, for evaluation"})

        _build(out / "abdomen_spleen_side", overwrite, _spleen_side)

    if not _build(out / "train", overwrite, _train):
        old = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
        info.update({k: old.get(k) for k in ("class_names", "cases", "dropped")})
    hippo = shared / "hippocampus"
    _build(out / "hippocampus_heldout", overwrite, lambda tmp: build_eval_set(
        [(c, hippo / "imagesTr" / f"{c}{ENDING}", hippo / "labelsTr" / f"{c}{ENDING}") for c in heldout_ids], tmp,
        ["background", "hippocampus anterior", "hippocampus posterior"], "Hippocampus held-out (40 cases, seed 0)"))
    spine = shared / "spinal_cord_mri"
    _build(out / "spinal_t2", overwrite, lambda tmp: build_eval_set(
        [("spinal_t2", spine / f"t2_image{ENDING}", spine / f"t2_label{ENDING}")], tmp,
        ["background", "spinal cord"], "Spinal cord T2 (zero-shot check)"))
    singles = [src.case_id for src in sources if src.source in ("abdomen_ct_mr", "spinal_cord_mri")]
    manifest = {
        "shared": str(shared.resolve()), "out": str(out.resolve()),
        "licences": LICENCES,
        "hippocampus_split": {"seed": HIPPO_SEED, "train": train_ids, "heldout": heldout_ids,
                              "train_used": len(used_train)},
        "source_shares": source_shares, "abdomen_half": "liver side" if abdomen_half else None,
        "phantoms_per_modality": phantoms, "phantom_shape": list(phantom_shape), "min_voxels": min_voxels,
        "excluded_from_training": {"hippocampus held-out": heldout_ids, "spinal cord T2": ["spinal_t2"]},
        "val_fraction": val_fraction,
        "val_seed": validation_seed(out / "train", val_fraction, singles),
        "val_seed_note": f"trainer --seed that keeps {singles} out of the validation split",
        "normalisation": "per case by its own modality (entries carry 'modality'); sessions must pass modality",
        **info,
    }
    write_json_atomic(out / "manifest.json", manifest)
    n = len(manifest.get("cases") or {})
    print(f"interactive data in {out}: train {n} cases, {len(manifest['class_names'] or []) - 1} classes; "
          f"held-out hippocampus {len(heldout_ids)}; spinal T2 1; val seed {manifest['val_seed']} "
          f"({time.time() - t0:.0f} s)", flush=True)
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data", help="shared data folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (train/, hippocampus_heldout/, spinal_t2/)")
    p.add_argument("--phantoms", type=int, default=16, help="synthetic phantoms per modality (CT and MR)")
    p.add_argument("--phantom-shape", type=int, nargs=3, default=(64, 64, 64))
    p.add_argument("--min-voxels", type=int, default=MIN_VOXELS, help="drop smaller structures per case")
    p.add_argument("--val-fraction", type=float, default=0.1, help="the trainer's --val-fraction (for the val seed)")
    p.add_argument("--hippo-train-limit", type=int, default=None, help="first N hippocampus training cases (smoke)")
    p.add_argument("--source-shares", nargs="+", default=None, metavar="SOURCE=SHARE",
                   help="each source's share of the training patches (hippocampus, abdomen_ct_mr, spinal_cord_mri, "
                        "phantoms; e.g. hippocampus=0.4 abdomen_ct_mr=0.3 spinal_cord_mri=0.1 phantoms=0.2); "
                        "default: every case drawn equally often")
    p.add_argument("--abdomen-half", action="store_true",
                   help="train on the liver's half of the abdomen volumes only; the spleen's halves are written to "
                        "abdomen_spleen_side/ for evaluation")
    p.add_argument("--overwrite", action="store_true", help="rebuild complete folders")
    args = p.parse_args(argv)
    try:
        shares = None
        if args.source_shares:
            shares = {}
            for item in args.source_shares:
                key, sep, value = item.partition("=")
                try:
                    shares[key] = float(value)
                except ValueError:
                    raise InteractiveDataError(f"--source-shares takes SOURCE=SHARE, got {item!r}") from None
                if not sep:
                    raise InteractiveDataError(f"--source-shares takes SOURCE=SHARE, got {item!r}")
        build(args.shared, args.out, args.phantoms, args.phantom_shape, args.min_voxels, args.val_fraction,
              args.overwrite, args.hippo_train_limit, shares, args.abdomen_half)
    except (InteractiveDataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
