"""The modalities the engine knows (``CT``, ``MR``, ``US``, ``other``: each selects an intensity rule) and
:func:`normalize_modality`, which maps free-form names onto them.

Apart from :mod:`engine.preprocess` (which re-exports both) because that module imports torch and MONAI, seconds
of work: the napari plugin's panels and reader need only these names, on the GUI thread.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

MODALITIES = ("CT", "MR", "US", "other")

# how an intensity rule is written on a command line (engine.preprocess.parse_intensity_rule reads it)
INTENSITY_RULE_HELP = ("clip:A_MIN:A_MAX (a fixed window, e.g. clip:-1000:1000 for lungs or bone in CT, whose "
                       "soft-tissue default -175 to 250 flattens both) or percentile:LOWER:UPPER (each image "
                       "between its own percentiles, e.g. percentile:0.5:99.5)")

_MODALITY_ALIASES = {
    "CT": "CT", "CAT": "CT", "COMPUTED TOMOGRAPHY": "CT",
    "MR": "MR", "MRI": "MR", "T1": "MR", "T1W": "MR", "T2": "MR", "T2W": "MR", "FLAIR": "MR",
    "PD": "MR", "DWI": "MR", "ADC": "MR", "T1C": "MR", "T1CE": "MR", "T1GD": "MR", "MAGNETIC RESONANCE": "MR",
    "US": "US", "ULTRASOUND": "US",
    "OTHER": "other",
}


def normalize_modality(name: Optional[str]) -> str:
    """Map a free-form modality / channel name to one of ``CT``, ``MR``, ``US``, ``other``.

    ``"MRI"``, ``"T1"``, ``"T2w"``, ``"FLAIR"`` ... -> ``"MR"``; ``"ultrasound"`` -> ``"US"``;
    unknown names (e.g. ``"PET"``) -> ``"other"``.
    """
    if name is None:
        return "other"
    key = str(name).strip().upper().replace("-", "").replace("_", "")
    if key in _MODALITY_ALIASES:
        return _MODALITY_ALIASES[key]
    # nnU-Net channel names like "T1_MRI" or "MRI_T2"
    for token in ("MRI", "MR", "T1", "T2"):
        if token in key:
            return "MR"
    if "CT" == key[:2]:
        return "CT"
    return "other"


# nnU-Net's channel suffix of an image file: case_0000.nii.gz is channel 0 of case "case"
_CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")


def channel_names(meta: Dict[str, Any]) -> List[str]:
    """The channels a ``dataset.json`` names, in channel order: nnU-Net v2 ``channel_names`` or MSD ``modality``
    (``{"0": "MRI"}``, a list, or one name); empty when it names none."""
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if isinstance(channels, dict):
        try:
            return [str(channels[k]) for k in sorted(channels, key=lambda k: int(k))]
        except (TypeError, ValueError):
            return []
    if isinstance(channels, (list, tuple)):
        return [str(c) for c in channels]
    return [str(channels)]


def modality_beside(image: Union[str, Path]) -> Optional[str]:
    """The modality (``CT``, ``MR`` or ``US``) that the ``dataset.json`` of an MSD or nnU-Net raw dataset names for an
    image file in its ``imagesTr`` or ``imagesTs`` folder, else None.

    A dataset of several channels names the file's channel by its ``_0000``-style suffix. A training or test entry's
    own ``"modality"`` (a mixed CT/MR set) wins for the file it lists; in a set that has such entries, a file no entry
    lists gets None. A name that maps to no known modality (``"PET"``), an unreadable ``dataset.json`` or a file
    without a channel suffix in a multi-channel dataset give None, so the caller falls back to its guess."""
    from engine.formats import suffix_of

    p = Path(image)
    if p.parent.name not in ("imagesTr", "imagesTs"):
        return None
    meta_path = p.parent.parent / "dataset.json"
    try:
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    suffix = suffix_of(p)
    stem = p.name[: len(p.name) - len(suffix)] if suffix else p.stem
    match = _CHANNEL_SUFFIX.search(stem)
    entries = [e for key in ("training", "test") for e in (meta.get(key) or [])
               if isinstance(e, dict) and isinstance(meta.get(key), list)]
    if any("modality" in e for e in entries):
        case = stem[: match.start()] if match else stem
        for entry in entries:
            listed = entry.get("image")
            if not isinstance(listed, str):
                continue
            name = Path(listed).name
            listed_suffix = suffix_of(Path(name))
            if (name[: len(name) - len(listed_suffix)] if listed_suffix else name) in (stem, case):
                if "modality" not in entry:
                    break  # listed under the dataset's own modality: its channel name, below
                modality = normalize_modality(str(entry["modality"]))
                return modality if modality != "other" else None
        else:
            return None  # a set of mixed modalities that does not list this file: no answer from it
    names = channel_names(meta)
    if len(names) > 1:
        if match is None or int(match.group(1)) >= len(names):
            return None
        names = [names[int(match.group(1))]]
    modality = normalize_modality(names[0]) if names else "other"
    return modality if modality != "other" else None
