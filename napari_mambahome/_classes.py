"""The class table of a labels layer: the name (and colour) of each label value.

Names come, first found wins, from the layer itself (a segmentation, or the user's edits), from the
``case.json`` of a saved case (its label file reopened), from a
``dataset.json`` beside the label file (nnU-Net v2 ``{"labels": {name: id}}`` or MSD
``{"labels": {"id": name}}``), from the selected model, or are made up (``label 7``). Values painted
in the layer that have no name yet get one, so a case with a new class can always be saved; the
engine maps classes by name when fine-tuning.

A label file's names are the file's own (the reader reads a ``.seg.nrrd``'s segments, a NIfTI header's label table
and this plugin's class record, :func:`header_class_names`), its case's or its ``dataset.json``'s. The model names a
label file only when the file is evidently a segmentation this plugin saved (NIfTI label intent, no class record) and
its values fit the model's classes: a file from elsewhere (TotalSegmentator's 117 ids, 1 = spleen) named after the
model trained "organ" on the spleen. Otherwise its values stay ``label N`` (source :data:`UNKNOWN_SOURCE`) until the
annotator names them. Labels made in the viewer (no file) take the model's names: their values mean what the
annotator paints with them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from engine.io import CLASS_RECORD_KEY, header_class_names  # noqa: F401 - the reader's, read from here

from ._geometry import META_KEY

NAMES_KEY = "class_names"
COLOURS_KEY = "class_colours"
SOURCE_KEY = "class_source"
LABEL_FILE_KEY = "label_file"
"""Key in a labels layer's ``META_KEY`` metadata the reader sets for a label file that names no classes itself:
``{"intent_label": bool}`` (whether its NIfTI header marks it a label map, as this plugin's writer does)."""
UNKNOWN_SOURCE = "unknown"
"""Class table source of a label file whose names nothing tells (values shown as ``label N``)."""
RECORD_KEY = CLASS_RECORD_KEY
"""Key of the class record a label file's NIfTI header carries (:func:`engine.io.with_class_record`)."""


class ClassTableError(ValueError):
    """A class edit that cannot be made (empty or duplicate name); the message says which."""


@dataclass
class ClassTable:
    """Names and colours of a labels layer's values.

    Attributes:
        names: ``names[v]`` is the name of label value ``v``; ``names[0]`` is the background.
        colours: ``{value: "#rrggbb"}`` chosen by the user (others keep napari's colours).
        source: where the names came from: ``layer``, ``dataset.json``, ``model``, ``values``, ``user``.
    """

    names: List[str]
    colours: Dict[int, str] = field(default_factory=dict)
    source: str = "values"

    def _check_name(self, name: str, value: Optional[int] = None) -> str:
        name = str(name).strip()
        if not name:
            raise ClassTableError("a class needs a name")
        taken = {n.casefold() for v, n in enumerate(self.names) if v != value}
        if name.casefold() in taken:
            raise ClassTableError(f"there is already a class named '{name}'")
        return name

    def add(self, name: str) -> int:
        """Add a class; returns its label value (the next free one)."""
        self.names.append(self._check_name(name))
        self.source = "user"
        return len(self.names) - 1

    def rename(self, value: int, name: str) -> None:
        if not 0 < value < len(self.names):
            raise ClassTableError(f"no class with value {value} to rename")
        self.names[value] = self._check_name(name, value)
        self.source = "user"

    def recolour(self, value: int, colour: str) -> None:
        if not 0 < value < len(self.names):
            raise ClassTableError(f"no class with value {value} to recolour")
        self.colours[int(value)] = str(colour)

    def remove(self, value: int) -> None:
        """Drop class ``value``; the classes above it move down one value (their chosen colours with them), so the
        values stay contiguous with the names (a case's class names are its table, the engine maps by position).

        The labels must follow: :func:`removal_edit`.
        """
        if value == 0:
            raise ClassTableError("the background (0) cannot be removed")
        if not 0 < value < len(self.names):
            raise ClassTableError(f"no class with value {value} to remove")
        del self.names[value]
        self.colours = {(v - 1 if v > value else v): c for v, c in self.colours.items() if v != value}
        self.source = "user"

    def insert(self, value: int, name: str, colour: Optional[str] = None) -> None:
        """Put a removed class back at ``value`` (undo of :meth:`remove`): the classes from ``value`` up move up one."""
        if not 0 < value <= len(self.names):
            raise ClassTableError(f"no place for a class with value {value}")
        self.names.insert(value, self._check_name(name))
        self.colours = {(v + 1 if v >= value else v): c for v, c in self.colours.items()}
        if colour is not None:
            self.colours[int(value)] = str(colour)
        self.source = "user"

    def cover(self, top: int) -> "ClassTable":
        """Name every value up to ``top`` (values painted without a name become ``label N``)."""
        while len(self.names) <= top:
            self.names.append(f"label {len(self.names)}")
        return self

    def store(self, layer: Any) -> None:
        """Keep the table with a napari Labels layer (metadata) and draw the chosen colours."""
        meta = layer.metadata.setdefault(META_KEY, {})
        had_colours = bool(meta.get(COLOURS_KEY))
        meta[NAMES_KEY] = list(self.names)
        meta[COLOURS_KEY] = {str(k): v for k, v in self.colours.items()}
        meta[SOURCE_KEY] = self.source
        if self.colours:
            from napari.utils.colormaps import DirectLabelColormap, label_colormap

            # Every value keeps napari's own colour unless chosen: a direct map draws the values it does not list
            # in its default colour, and a transparent default hid classes added (or painted) after a recolour.
            top = max(len(self.names) + 255, 256)
            values = np.arange(1, min(top, 4096))
            cyclic = label_colormap(49, 0.5).map(values)  # napari's default for new Labels layers
            colours: Dict[Any, Any] = {int(v): c for v, c in zip(values, cyclic)}
            colours.update(self.colours)
            layer.colormap = DirectLabelColormap(color_dict={None: "#b0b0b0", 0: "transparent", **colours})
        elif had_colours:
            from napari.utils.colormaps import label_colormap

            # the last chosen colour went (a class removed, or the removal undone): the direct map drawn for it would
            # keep that colour on the value the next class moved down to
            layer.colormap = label_colormap(49, 0.5)
        self._store_features(layer)

    def _store_features(self, layer: Any) -> None:
        """The hover text (``class: name``) follows renames: napari reads it from the layer's features table."""
        import pandas as pd

        layer.features = pd.DataFrame({"index": np.arange(len(self.names)), "class": list(self.names)})


def removal_edit(labels: np.ndarray, value: int) -> Tuple[Tuple[np.ndarray, ...], np.ndarray, int]:
    """The voxel edit that removes class ``value`` from a label map: its voxels become background, the values above
    it move down one (as :meth:`ClassTable.remove` moves the names).

    Pure numpy (a worker thread runs it for big volumes); only voxels at or above ``value`` are touched.

    Returns:
        ``(changed, new values, voxels of the class)``: the indices and values for ``Labels.data_setitem`` and how
        many voxels the class had (painted work the removal clears).
    """
    labels = np.asarray(labels)
    changed = np.nonzero(labels >= value)
    old = labels[changed]
    cleared = old == value
    new = np.where(cleared, 0, old - 1).astype(labels.dtype, copy=False)
    return changed, new, int(np.count_nonzero(cleared))


_REMOVAL_MARKERS: Dict[int, Tuple[Any, int]] = {}


def mark_removal(marker: Any, value: int) -> None:
    """Register the empty history atom that opens a class removal's history item (the Correct section's), so that
    other listeners of the layer's edits (the Interactive section) can tell the removal's voxel shift that follows it
    from a brush edit."""
    _REMOVAL_MARKERS[id(marker)] = (marker, int(value))


def removal_value(atom: Any) -> Optional[int]:
    """The class value removed by the item that ``atom`` opens (:func:`mark_removal`); None for any other atom."""
    record = _REMOVAL_MARKERS.get(id(atom))
    return record[1] if record is not None and record[0] is atom else None


def dataset_json_names(label_file: Any) -> Optional[List[str]]:
    """Class names from a ``dataset.json`` in the label file's folder or the one above it.

    Returns:
        Names by label value, or ``None`` when there is no readable ``dataset.json``.
    """
    if not label_file:
        return None
    folder = Path(label_file).parent
    for candidate in (folder / "dataset.json", folder.parent / "dataset.json"):
        try:
            labels = json.loads(candidate.read_text()).get("labels")
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(labels, dict) or not labels:
            continue
        try:
            if all(str(k).isdigit() for k in labels):        # MSD: {"0": "background", ...}
                by_value = {int(k): str(v) for k, v in labels.items()}
            else:                                             # nnU-Net v2: {"background": 0, ...}
                by_value = {int(v): str(k) for k, v in labels.items() if not isinstance(v, (list, dict))}
        except (TypeError, ValueError):
            continue
        top = max(by_value)
        return [by_value.get(v, f"label {v}") for v in range(top + 1)]
    return None


def case_json_names(label_file: Any) -> Optional[List[str]]:
    """Class names from the ``case.json`` of a saved case, when ``label_file`` is that case's label file.

    Returns:
        Names by label value, or ``None`` when the file is not a saved case's label or its record is unreadable.
    """
    from engine.cases import LABEL_FILE, record_beside

    if not label_file or Path(label_file).name != LABEL_FILE:
        return None
    record = record_beside(label_file)
    return list(record.class_names) if record is not None else None


def class_table_of(layer: Any, model_names: Optional[Sequence[str]] = None) -> ClassTable:
    """The class table of a labels layer, covering every value painted in it.

    Args:
        layer: a napari Labels layer.
        model_names: the selected model's class names (used when nothing closer names the classes; for a label file
            only under the rule of :func:`label_file_table`).
    """
    table = stored_table(layer)
    top = int(np.max(layer.data)) if np.size(layer.data) else 0
    if table is None:
        meta = layer.metadata.get(META_KEY) or {}
        if isinstance(meta.get(LABEL_FILE_KEY), dict):
            table = label_file_table(meta.get("path"), model_names, top,
                                     bool(meta[LABEL_FILE_KEY].get("intent_label")))
        else:
            table = unnamed_table(meta.get("path"), model_names)
    return table.cover(top)


def label_file_table(path: Any, model_names: Optional[Sequence[str]], top: int, intent_label: bool) -> ClassTable:
    """The class table of a label file that names no classes in itself (see the module's docstring for the rule).

    Args:
        path: the label file.
        model_names: the selected automatic model's class names.
        top: the largest value in the file.
        intent_label: its NIfTI header marks it a label map (this plugin's writer's mark).
    """
    table = unnamed_table(path, None)
    if table.source != "values":
        return table
    if model_names and intent_label and top < len(model_names):
        return ClassTable(list(model_names), source="model")
    return ClassTable(["background"], source=UNKNOWN_SOURCE)




def stored_table(layer: Any) -> Optional[ClassTable]:
    """The class table kept with a labels layer (:meth:`ClassTable.store`) as it is, without naming values painted
    since; ``None`` when the layer keeps none."""
    meta = layer.metadata.get(META_KEY) or {}
    if not meta.get(NAMES_KEY):
        return None
    colours = {int(k): str(v) for k, v in (meta.get(COLOURS_KEY) or {}).items()}
    return ClassTable(list(meta[NAMES_KEY]), colours, str(meta.get(SOURCE_KEY, "layer")))


def unnamed_table(path: Any, model_names: Optional[Sequence[str]] = None) -> ClassTable:
    """The class table of labels that name no classes themselves: a label file opened (``path``), or new labels of
    the scan at ``path`` (the Interactive section's first prompt makes them).

    Args:
        path: the label file, or the scan new labels are made for (its ``case.json`` / ``dataset.json``).
        model_names: the selected automatic model's class names.
    """
    from_case = case_json_names(path)
    from_json = None if from_case else dataset_json_names(path)
    if from_case:
        return ClassTable(from_case, source="case.json")
    if from_json:
        return ClassTable(from_json, source="dataset.json")
    if model_names:
        # a label file without names (e.g. `mambahome predict`'s NIfTI reopened to correct it) takes the model's:
        # fine-tuning matches classes by name, so "label 1" would train a new class instead of the model's own
        return ClassTable(list(model_names), source="model")
    return ClassTable(["background"], source="values")
