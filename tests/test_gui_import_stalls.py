"""Neither building the dock nor napari's "can this plugin read this path?" imports nibabel or scipy.ndimage on the
GUI thread; the dock's warm-up thread (napari_mambahome._warmup) imports them, so a later File > Open or correction
helper imports nothing heavy there.

An annotator's walk measured the first File > Open freezing the viewer 1.8-2.1 s (nibabel, imported by the reader on
napari's GUI thread) and the dock's opening 0.9-1.7 s (scipy.ndimage, imported by the correction helpers' module).
Each check runs in a fresh interpreter (in this process they were imported long ago), with the warm-up held on an
event the check releases, so "not imported yet" cannot come from a warm-up that happened to finish first.
"""
from __future__ import annotations

import numpy as np

from plugin_support import needs_display
from test_lazy_imports import _run

HELD_WARM_UP = """
    import numpy as np, sys, threading, traceback

    WATCHED = ("nibabel", "scipy.ndimage", "engine.postprocess", "pydicom", "SimpleITK", "nrrd")
    ON_MAIN = []  # (module, stack) of each watched module first imported on the GUI thread
    IMPORTED_IN = {}  # module -> name of the thread that first imported it

    class Watch:
        def find_spec(self, name, path=None, target=None):
            if name in WATCHED and name not in IMPORTED_IN:
                IMPORTED_IN[name] = threading.current_thread().name
                if threading.current_thread() is threading.main_thread():
                    ON_MAIN.append((name, "".join(traceback.format_stack(limit=14))))
            return None

    sys.meta_path.insert(0, Watch())

    def none_on_main():
        assert not ON_MAIN, "\\n".join(f"{n} imported on the GUI thread:\\n{s}" for n, s in ON_MAIN)

    def none_loaded():
        loaded = [m for m in ("nibabel", "scipy.ndimage") if m in sys.modules]
        assert not loaded, loaded

    import napari
    from qtpy.QtWidgets import QApplication
    from napari_mambahome import _warmup

    gate = threading.Event()  # the warm-up waits for it: what is imported before it opens is the GUI thread's doing
    warm = _warmup._warm
    _warmup._warm = lambda: (gate.wait(), warm())

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=False)
    none_loaded()
"""


def _volume(tmp_path):
    import nibabel as nib

    # a scan's noise: a block of one value on zeros would be a label map, and open as one
    data = np.random.default_rng(0).integers(0, 40, (12, 10, 8)).astype(np.int16)
    data[3:9, 2:8, 2:6] += 200
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), str(path))
    dicom = tmp_path / "series"
    dicom.mkdir()
    (dicom / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM")
    return path, dicom


def test_dock_and_reader_check_import_no_nibabel_or_scipy_on_the_gui_thread(tmp_path):
    needs_display()
    path, dicom = _volume(tmp_path)
    out = _run(HELD_WARM_UP + f"""
    from napari_mambahome._reader import get_reader, read_volumes
    from napari_mambahome._widget import MambaHoMEWidget

    widget = MambaHoMEWidget(viewer)
    none_loaded()
    # napari asks the reader about every path it opens or gets dropped: by suffix, or a folder's first files
    assert get_reader({str(path)!r}) is read_volumes and get_reader({str(dicom)!r}) is read_volumes
    assert get_reader({str(tmp_path / "notes.txt")!r}) is None and get_reader({str(tmp_path)!r}) is not read_volumes
    none_loaded()
    none_on_main()

    gate.set()
    _warmup.start().join(120)
    assert not _warmup.start().is_alive()
    assert IMPORTED_IN["nibabel"] == IMPORTED_IN["scipy.ndimage"] == _warmup.THREAD_NAME, IMPORTED_IN
    # after the warm-up a File > Open and a correction helper import nothing heavy on the GUI thread
    (data, kwargs, kind), = get_reader({str(path)!r})({str(path)!r})
    assert kind == "image" and data.shape[0] == 8, (kind, data.shape)
    from napari_mambahome import _correct
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[1:7, 1:7, 1:7] = 1
    labels[3, 3, 3] = 0
    labels[9, 9, 9] = 1  # an island
    assert _correct.HELPERS["Fill holes"](labels, 1)[3, 3, 3] == 1
    assert _correct.HELPERS["Keep largest component"](labels, 1)[9, 9, 9] == 0
    none_on_main()
    print("warm", sorted(set(IMPORTED_IN.values())))
    widget.close()
    viewer.close()
    """, tmp_path)
    assert "warm" in out


def test_a_read_and_a_helper_before_the_warm_up_finished_still_work(tmp_path):
    needs_display()
    path, _ = _volume(tmp_path)
    out = _run(HELD_WARM_UP + f"""
    from napari_mambahome._reader import get_reader
    from napari_mambahome._widget import MambaHoMEWidget
    from napari_mambahome import _correct

    widget = MambaHoMEWidget(viewer)
    # the user acts at once: the GUI thread imports what it needs itself (the only case in which it pays)
    (data, kwargs, kind), = get_reader({str(path)!r})({str(path)!r})
    assert kind == "image" and data.shape[0] == 8
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    labels[4, 4, 4] = 0
    assert _correct.HELPERS["Fill holes"](labels, 1)[4, 4, 4] == 1
    gate.set()
    _warmup.start().join(120)
    assert not _warmup.start().is_alive()
    print("read", kind)
    widget.close()
    viewer.close()
    """, tmp_path)
    assert "read image" in out
