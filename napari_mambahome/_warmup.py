"""The dock's warm-up: the modules napari's GUI thread would import at a user's first File > Open or correction
helper click are imported ahead, in a plain thread started when the dock is made.

napari runs this plugin's reader on its GUI thread, and a first read imported nibabel (with pydicom and requests,
which nibabel brings): the first File > Open of a volume froze the viewer 1.8-2.1 s; the Correct panel's helpers need
scipy.ndimage, whose import while the dock was built froze it 0.9-1.7 s (an annotator's walk, the project's limit
being ~100 ms). The GUI-thread code imports these where it uses them (:mod:`._reader`, :mod:`._correct`); once this
thread has imported them that import is a dictionary look-up, and a user who acts before it finished waits only for
the rest of it (Python's per-module import lock: the GUI thread waits for the module this thread is importing).

The thread touches no Qt object. It imports under the plugin's one import lock (:func:`._jobs.import_engine`: one
import of heavy modules at a time in the process, with the garbage collector's full collections held off), so a
first job's torch import waits for it rather than racing it.
"""
from __future__ import annotations

import logging
import threading
from typing import Optional, Tuple

WARM_MODULES: Tuple[str, ...] = (
    # the reader (engine.io / engine.formats): NIfTI and MGH through nibabel, NRRD through pynrrd, MetaImage and
    # DICOM through SimpleITK; the case record beside a saved case's image
    "nibabel", "nibabel.orientations", "nibabel.openers", "nibabel.volumeutils", "nibabel.nifti1",
    "engine.formats", "engine.io", "engine.modality", "engine.cases", "nrrd", "SimpleITK",
    # the correction helpers (napari_mambahome._correct)
    "scipy.ndimage", "engine.postprocess",
)
"""What the warm-up thread imports, in this order (one missing optional package skips only itself)."""

THREAD_NAME = "mambahome-warm-up"
_started: Optional[threading.Thread] = None
_start_lock = threading.Lock()


def _warm() -> None:
    from ._jobs import import_engine

    for name in WARM_MODULES:
        try:
            import_engine(name)
        except Exception:  # noqa: BLE001 - not installed or broken here: the code that needs it reports it
            logging.getLogger(__name__).debug("warm-up could not import %s", name, exc_info=True)


def start() -> threading.Thread:
    """Start the warm-up thread, once a process (a second dock finds it started); returns it."""
    global _started
    with _start_lock:
        if _started is None:
            _started = threading.Thread(target=_warm, name=THREAD_NAME, daemon=True)
            _started.start()
        return _started
