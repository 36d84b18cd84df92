"""Starting a run in a run folder: resume what can be resumed, start over what saved nothing.

A run killed before its first save leaves ``config.json``, ``split.json`` and empty logs but no resume
state and no checkpoint. Nothing in such a folder is worth keeping, so a fresh start reuses it and a
``--resume`` starts over; only a folder with saved results is protected. Temporary files of writes
that were killed outright are removed at every start (a run folder has one writer).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence, Union

from engine.io import remove_stale_temps

PathLike = Union[str, os.PathLike]


class RunFolderError(ValueError):
    """A run folder that cannot be started or resumed as asked; the message says what to do."""


def prepare_run_folder(run_dir: PathLike, resume: bool, resume_file: str = "resume.safetensors",
                       result_files: Sequence[str] = ("last.safetensors", "best.safetensors"),
                       remove_temps: bool = True) -> bool:
    """Decide whether a run in ``run_dir`` resumes, and sweep the folder's stale temporary files.

    Args:
        run_dir: the run folder (may not exist yet).
        resume: the user asked to resume (``--resume``).
        resume_file: name of the resume state inside the folder.
        result_files: names of the checkpoints a run saves.
        remove_temps: delete temporary files of killed writes (pass False on all but the main process
            of a distributed run).

    Returns:
        True to resume from ``resume_file``; False to start a new run (the folder is new, empty, or
        holds only the files of a run that stopped before its first save; with ``resume`` asked this
        is said in a ``UserWarning``).

    Raises:
        RunFolderError: a new run asked for in a folder with saved results (pass resume or choose
            another folder); a resume asked for where checkpoints exist but the resume state is gone,
            or where the folder does not exist.
    """
    root = Path(run_dir)
    if remove_temps:
        remove_stale_temps(root)
    has_state = (root / resume_file).is_file()
    results = [n for n in result_files if (root / n).is_file()]
    if resume:
        if has_state:
            return True
        if results:
            raise RunFolderError(f"{root}: has {', '.join(results)} but no {resume_file}, so it cannot be resumed "
                                 "exactly; fine-tune from the checkpoint or choose a new folder")
        if not root.is_dir():
            raise RunFolderError(f"{root}: run folder not found; nothing to resume (check --out)")
        warnings.warn(f"{root}: the run stopped before its first save, so there is nothing to resume; "
                      "starting it over", stacklevel=2)
        return False
    if has_state or results:
        raise RunFolderError(f"{root} already holds a training run; pass --resume to continue it or choose a new --out")
    return False
