"""Matching class names between label sets (a checkpoint's and a dataset's or a case store's).

Apart from :mod:`engine.train.parent`, which adapts a network's head by this matching, because that module
imports torch and the network code: the napari plugin asks :func:`class_mapping` on the GUI thread when Fine-tune
is pressed.
"""
from __future__ import annotations

from typing import Dict, Sequence


class ClassMappingError(ValueError):
    """Class names that cannot be mapped between a checkpoint and a dataset."""


def name_key(name: str) -> str:
    """A class name as names are matched: case-, "_"- and whitespace-blind (``"Left_Kidney"`` is
    ``"left kidney"``)."""
    return " ".join(str(name).strip().casefold().replace("_", " ").split())


def class_mapping(old_names: Sequence[str], new_names: Sequence[str]) -> Dict[int, int]:
    """Which old output row each new class inherits: ``{new_index: old_index}``.

    Names match case-insensitively (``"Left_Kidney"`` == ``"left kidney"``); index 0 is background in
    both label sets and always maps to 0.

    Raises:
        ClassMappingError: duplicate names in either label set.
    """
    for names, which in ((old_names, "checkpoint"), (new_names, "dataset")):
        keys = [name_key(n) for n in names]
        dupes = sorted({n for n in keys if keys.count(n) > 1})
        if dupes:
            raise ClassMappingError(f"the {which} label set names {dupes} more than once: {list(names)}")
    old_index = {name_key(n): i for i, n in enumerate(old_names)}
    mapping = {0: 0}
    for i, name in enumerate(new_names):
        if i > 0 and name_key(name) in old_index and old_index[name_key(name)] > 0:
            mapping[i] = old_index[name_key(name)]
    return mapping


BRIEF_NAMES = 8
"""How many class names a message lists before it counts the rest: a TotalSegmentator-style label set of 117 names
filled a status line with one list."""


def brief_names(names: Sequence[str], shown: int = BRIEF_NAMES) -> str:
    """``names`` as a message lists them: ``['a', 'b']``, or the first ``shown`` and a count of the rest
    (``['a', 'b', ... and 115 more (117 classes)]``)."""
    names = [str(n) for n in names]
    if len(names) <= shown:
        return repr(names)
    return f"{repr(names[:shown])[:-1]}, ... and {len(names) - shown} more ({len(names)} classes)]"
