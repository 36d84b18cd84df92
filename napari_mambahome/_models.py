"""The model versions the widget offers: the bundled default, loaded files, fine-tuned versions.

Checkpoints are read by :mod:`engine.checkpoint` (safetensors weights + JSON metadata); this module
only lists them and describes them for the user.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

BUNDLED_DIR = Path(__file__).resolve().parent / "models"
BUNDLED_MODEL = BUNDLED_DIR / "default.safetensors"
"""The default model shipped with the package (trained by ``models/make_default_model.sh``)."""
BUNDLED_INTERACTIVE_MODEL = BUNDLED_DIR / "interactive.safetensors"
"""The default interactive (promptable) model, when the package ships one."""


@dataclass
class ModelEntry:
    """One selectable model version.

    Attributes:
        path: the checkpoint file.
        metadata: its JSON metadata (see docs/ARCHITECTURE.md for the keys).
        origin: ``"bundled"``, ``"file"`` (loaded by the user) or ``"fine-tuned"``.
    """

    path: Path
    metadata: Dict[str, Any]
    origin: str = "file"

    @property
    def version(self) -> str:
        return str(self.metadata.get("version") or self.path.stem)

    @property
    def parent(self) -> Optional[str]:
        parent = self.metadata.get("parent")
        if isinstance(parent, dict):  # engine.train.parent records {"version", "path", "sha256", ...}
            parent = parent.get("version") or parent.get("path")
        return str(parent) if parent else None

    @property
    def class_names(self) -> List[str]:
        return [str(c) for c in self.metadata.get("class_names", [])]

    @property
    def modality(self) -> str:
        return str(self.metadata.get("modality") or "other")

    @property
    def modalities_seen(self) -> List[str]:
        """The modalities the model's training data held (``["CT", "MR"]`` for the bundled default), from the
        checkpoint's ``modalities_seen`` (a fine-tune adds its data's); older checkpoints fall back to their one
        ``modality``. ``modality`` alone is only the default intensity rule, so showing it as "the modality" told a
        user that a CT+MR model was an MR model."""
        from engine.checkpoint import modalities_seen

        return modalities_seen(self.metadata)

    def trained_on(self) -> str:
        """What the model learnt from, for its description: ``"trained on: CT, MR"`` (``"not recorded"`` when it
        names no modality), and what kind of data that was where the checkpoint's ``cases`` tell
        (:func:`engine.checkpoint.training_cases`).

        "trained on: CT, MR" alone reads as a model of real anatomy, but the bundled default knows synthetic phantoms
        only and labels speckle on a real scan: a model trained on phantoms alone says so and what to do instead; one
        trained on scans and phantoms (the bundled promptable model) says how many of each.
        """
        text = f"trained on: {', '.join(self.modalities_seen) or 'not recorded'}"
        phantoms_only, real, phantoms = self.training_data()
        if phantoms_only:
            return (f"{text} synthetic phantoms only: a demo model that knows no real anatomy; fine-tune it on your "
                    "cases or load a trained model")
        if real and phantoms:
            return (f"{text}: {real} real scan{'s' if real != 1 else ''} and {phantoms} synthetic "
                    f"phantom{'s' if phantoms != 1 else ''}")
        since_demo = self.real_scans_since_demo() if real else None
        if since_demo:
            return (f"{text}: fine-tuned on {since_demo} real scan{'s' if since_demo != 1 else ''} from a demo model "
                    "of synthetic phantoms: beyond those scans it knows no real anatomy")
        return text

    def real_scans_since_demo(self) -> Optional[int]:
        """The real scans learnt since a demo model of phantoms this model was fine-tuned from, if it was
        (:func:`engine.checkpoint.real_scans_since_demo`)."""
        from engine.checkpoint import real_scans_since_demo

        return real_scans_since_demo(self.metadata)

    def training_data(self) -> Tuple[bool, int, int]:
        """``(phantoms only, real scans, synthetic phantoms)`` of the checkpoint's training cases
        (:func:`engine.checkpoint.trained_on_phantoms_only`, :func:`engine.checkpoint.training_cases`)."""
        from engine.checkpoint import trained_on_phantoms_only, training_cases

        return (trained_on_phantoms_only(self.metadata), *training_cases(self.metadata))

    @property
    def is_interactive(self) -> bool:
        """Whether the checkpoint was trained for prompting (``--task interactive``)."""
        task = self.metadata.get("task")
        return (task.get("name") if isinstance(task, dict) else task) == "interactive"

    def prompt_problem(self) -> Optional[str]:
        """Why this model cannot be prompted (``None``: it can): its metadata must hold the prompt encoding."""
        from .prompting import interactive_problem

        return interactive_problem(self.metadata, str(self.path))

    @property
    def prompt_source(self) -> Any:
        """What ``Session.prompt_backend_factory`` is given to prompt with this model: the checkpoint file
        (a server's model is named by its id there, see ``remote.RemoteModelEntry``)."""
        return self.path

    @property
    def label(self) -> str:
        """Text of the model combo box entry."""
        kind = {"bundled": "bundled default", "fine-tuned": "fine-tuned"}.get(self.origin, self.path.name)
        if self.origin == "fine-tuned" and self.parent:
            # "switch back to the parent" needs the parent's name: every run folder is "ft-<time>", so the list
            # of versions did not say which one a version came from
            parent = self.parent.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]  # a Windows path's name too
            kind += f" from {parent}"
        return f"{self.version} ({'interactive, ' if self.is_interactive else ''}{kind})"

    def summary(self, num_parameters: Optional[int] = None, backend: Optional[str] = None) -> str:
        """Multi-line description: classes, the modalities it was trained on, size, Mamba backend, lineage."""
        network = self.metadata.get("network", {}).get("name", "mambahome")
        # the network on its own line: the description of what the model learnt from can be a sentence
        lines = [
            f"classes: {', '.join(self.class_names) or '?'}",
            self.trained_on(),
            f"network: {network}",
        ]
        if num_parameters is not None:
            lines.append(f"parameters: {num_parameters:,}")
        if backend:
            lines.append(f"Mamba backend: {backend}")
        if self.parent:
            lines.append(f"fine-tuned from: {self.parent}")
        lines.append(f"file: {self.path.name}")
        return "\n".join(lines)


def read_entry(path: Path, origin: str = "file") -> ModelEntry:
    """Describe a checkpoint file without loading its weights.

    Raises:
        engine.checkpoint.CheckpointError: not a napari-mambahome checkpoint (message names the file).
    """
    from engine.checkpoint import read_checkpoint_metadata

    path = Path(path)
    return ModelEntry(path=path, metadata=read_checkpoint_metadata(path), origin=origin)


FINETUNED_FILE = "best.safetensors"
"""Each fine-tuning run folder under the models folder holds its new version in this file."""


UNFINISHED_MARK = "resume.safetensors"
"""The engine's resume state, present in a run folder only while the run is unfinished (the plugin keeps one
checkpoint per finished run, :func:`engine.train.run_folder.keep_one_checkpoint`)."""


def fine_tuned_entries(folder: Path) -> List[ModelEntry]:
    """Fine-tuned versions saved under ``folder`` (``<run>/best.safetensors`` each), oldest first.

    Unreadable files are skipped: one damaged file must not hide the other versions.
    """
    from engine.checkpoint import CheckpointError

    entries: List[ModelEntry] = []
    if not folder.is_dir():
        return entries
    for path in sorted(folder.glob(f"*/{FINETUNED_FILE}"), key=lambda p: p.stat().st_mtime):
        if (path.parent / UNFINISHED_MARK).exists():
            # napari was killed mid-run: the engine's mid-run best.safetensors is a half-trained model, not a version
            continue
        try:
            entries.append(read_entry(path, origin="fine-tuned"))
        except CheckpointError:
            continue
    return entries


def parent_entries(entries: List[ModelEntry]) -> List[ModelEntry]:
    """The models the fine-tuned ``entries`` were made from, as loaded files, where missing from ``entries``.

    A parent loaded with "Load checkpoint…" was offered only in the session it was loaded in (and the next one when
    it was the last selected): after a restart its fine-tuned versions were listed but not the model to go back
    to. Files that are gone or unreadable are skipped.
    """
    from engine.checkpoint import CheckpointError

    known = {e.path.resolve() for e in entries}
    out: List[ModelEntry] = []
    for entry in entries:
        record = entry.metadata.get("parent")
        path = record.get("path") if entry.origin == "fine-tuned" and isinstance(record, dict) else None
        if not path or not Path(path).is_file() or Path(path).resolve() in known:
            continue
        try:
            out.append(read_entry(Path(path), origin="file"))
        except (CheckpointError, OSError):
            continue
        known.add(Path(path).resolve())
    return out


def stored_parameter_count(path: Path) -> Optional[int]:
    """Number of values in a checkpoint's stored tensors, read from the safetensors header alone.

    Nothing is built or loaded (the dock stays responsive): the header lists every tensor's shape.
    Returns ``None`` for an unreadable file; a description must never block choosing a model.
    """
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        return int(sum(_product(t["shape"]) for k, t in header.items() if k != "__metadata__"))
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def _product(shape: List[int]) -> int:
    out = 1
    for n in shape:
        out *= int(n)
    return out


_backend: Optional[str] = None


def backend_name() -> str:
    """Which Mamba implementation runs here (``"torch"`` when the CUDA kernels are absent).

    Imports torch and the model code the first time (seconds): call it in a worker, and on the GUI thread
    :func:`known_backend_name`.
    """
    global _backend
    if _backend is None:
        try:
            from engine.model import mamba_backend_available
        except ImportError:
            _backend = "torch"
        else:
            _backend = str(mamba_backend_available())
    return _backend


def known_backend_name() -> Optional[str]:
    """:func:`backend_name` when answering imports nothing heavy, else None: the dock's description must not
    import torch on the GUI thread (seconds), nor start its own import in a worker, which could race a job's.

    Without mamba-ssm installed the answer is ``"torch"``, known at once; with it, the answer waits until a job
    has imported the model code.
    """
    global _backend
    import importlib.util
    import sys

    if _backend is None:
        model = sys.modules.get("engine.model")
        if model is not None and not getattr(model.__spec__, "_initializing", False):  # a job's import has finished
            return backend_name()
        if importlib.util.find_spec("mamba_ssm") is None:  # the CUDA kernels cannot load: no torch needed to tell
            _backend = "torch"
    return _backend
