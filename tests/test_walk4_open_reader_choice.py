"""An annotator opens a hippocampus MRI with File > Open... (or drags it onto the canvas): napari asked "Choose reader"
(Mamba-HoME / napari builtins) for every .nii.gz, .nii, .nrrd, .mha, .mhd, .mgh and .dcm file.

Why: napari's builtin reader claims all of these extensions too (imageio's list), and napari asks whenever two readers
claim a file and no preference is saved (``settings.plugins.extension2reader``); it has no reader priority for plugins.
The builtin choice fails on .nii.gz and reads the others without spacing or orientation. Now the first time napari uses
the plugin (the dock, a sample, the reader), the plugin saves itself as the preferred reader for the formats only the
builtins also claim, unless a saved preference (the user's) already decides them or another installed plugin claims
them too. The preferences persist in napari's settings, so later sessions open these files directly from the start.

Run under a virtual display: ``xvfb-run -a python -m pytest tests/test_walk4_open_reader_choice.py``. The real volume is
found through ``MAMBAHOME_SHARED_DATA`` (default ``../shared/data``); the tests skip without it.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from plugin_support import modality_questions, needs_display, plugin_env  # noqa: F401 - fixtures

pytestmark = pytest.mark.gui

PLUGIN = "napari-mambahome"
# the formats napari's builtin reader claims as well (the others, .mgz and .ima, never asked)
CONTESTED = [".nii.gz", ".NII.GZ", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgh", ".dcm"]


def _scan(shared_data):
    return sorted((shared_data / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0]


def _as_file(scan, folder, suffix):
    """The real scan as a ``suffix`` file in ``folder`` (a one-series DICOM folder for ``.dcm``)."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    if suffix.lower() == ".nii.gz":
        return shutil.copy(scan, folder / f"hippocampus{suffix}")
    image = sitk.ReadImage(str(scan))
    if suffix == ".dcm":
        from test_formats import write_dicom_series

        write_dicom_series(image, folder / "series", modality="MR")
        return folder / "series" / "slice000.dcm"
    if suffix == ".mgh":
        import nibabel as nib

        img = nib.load(str(scan))
        path = folder / "hippocampus.mgh"
        nib.save(nib.MGHImage(np.asarray(img.dataobj, dtype=np.float32), img.affine), str(path))
        return path
    path = folder / f"hippocampus{suffix}"
    sitk.WriteImage(image, str(path))
    return path


def _new_session_of_the_plugin():
    """npe2 activates a plugin once a process, on the first use of one of its commands. Each test stands for a napari
    session of its own, so the plugin's commands are unregistered and the next use activates it again
    (``PluginManager.deactivate`` would also drop the plugin's menu entries from this viewer)."""
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.commands.unregister_manifest(pm.get_manifest(PLUGIN))
    pm.get_context(PLUGIN)._activated = False


@pytest.fixture
def napari_settings(tmp_path, monkeypatch):
    """napari's settings of a fresh user profile, saved in the test's tmp folder (never the machine's own)."""
    import napari.settings as napari_settings_module

    settings = napari_settings_module.NapariSettings(config_path=tmp_path / "napari" / "settings.yaml")
    settings._connect_events()
    monkeypatch.setattr(napari_settings_module, "_SETTINGS", settings)
    return settings


@pytest.fixture
def reader_questions(monkeypatch):
    """Every "Choose reader" dialog napari shows, as ``(file, [reader choices])``; each is cancelled."""
    from napari._qt.dialogs.qt_reader_dialog import QtReaderDialog

    asked = []

    def exec_(dialog):
        asked.append((dialog._current_file, sorted(b.text() for b in dialog.reader_btn_group.buttons())))
        return 0

    monkeypatch.setattr(QtReaderDialog, "exec_", exec_)
    return asked


@pytest.fixture
def viewer(make_napari_viewer, napari_settings, plugin_env, modality_questions):  # noqa: F811
    needs_display()
    viewer = make_napari_viewer(show=True)  # napari finds its plugins here
    _new_session_of_the_plugin()
    return viewer


def _file_open(viewer, monkeypatch, path):
    """File > Open File(s)... choosing ``path`` in the file dialog."""
    from napari._app_model import get_app_model
    from napari._qt.qt_viewer import QtViewer

    monkeypatch.setattr(QtViewer, "_open_file_dialog_uni", lambda self, caption: [str(path)])
    get_app_model().commands.execute_command("napari.window.file.open_files_dialog").result()


def _drop(viewer, path):
    """``path`` dragged from the file manager and dropped onto the canvas."""
    from qtpy.QtCore import QMimeData, QPointF, Qt, QUrl
    from qtpy.QtGui import QDropEvent

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path))])
    event = QDropEvent(QPointF(5, 5), Qt.DropAction.CopyAction, mime, Qt.MouseButton.NoButton,
                       Qt.KeyboardModifier.NoModifier)
    viewer.window._qt_viewer.dropEvent(event)


def _open_dock(viewer):
    """Plugins > Mamba-HoME, as the annotator starts: napari's first use of the plugin this session."""
    viewer.window.add_plugin_dock_widget(PLUGIN, "Mamba-HoME")


def _read_by_this_plugin(layer):
    from napari_mambahome._geometry import META_KEY

    return layer.source.reader_plugin == PLUGIN and META_KEY in layer.metadata


def test_file_open_and_drop_use_this_reader_once_the_plugin_has_started(viewer, shared_data, tmp_path, monkeypatch,
                                                                        reader_questions):
    scan = _scan(shared_data)
    files = {suffix: _as_file(scan, tmp_path / suffix.strip(".").replace(".", "_"), suffix) for suffix in CONTESTED}

    # a fresh profile, the plugin unused so far: napari asks, as the annotator saw (napari's own behaviour)
    _file_open(viewer, monkeypatch, files[".nii.gz"])
    assert reader_questions == [(str(files[".nii.gz"]), ["Mamba-HoME", "napari builtins"])]
    assert len(viewer.layers) == 0

    _open_dock(viewer)
    for suffix, path in files.items():
        before = len(viewer.layers)
        _file_open(viewer, monkeypatch, path)
        _drop(viewer, path)
        assert len(reader_questions) == 1, (suffix, reader_questions[1:])
        added = viewer.layers[before:]
        assert len(added) == 2 and all(_read_by_this_plugin(layer) for layer in added), suffix

    # other files keep napari's own choice; no folder preference (it would take every folder, .zarr too, from napari)
    from napari.plugins.utils import get_preferred_reader
    from napari.settings import get_settings

    assert get_preferred_reader(tmp_path / "photo.tif") is None
    assert get_preferred_reader(tmp_path / "image.img.gz") is None
    assert not [p for p in get_settings().plugins.extension2reader if p.endswith(("/", "\\"))]


def test_the_next_session_opens_directly_from_the_start(viewer, napari_settings, shared_data, tmp_path, monkeypatch,
                                                        reader_questions):
    """The preferences are saved in napari's settings file: a later session opens a scan before the plugin is used."""
    import napari.settings as napari_settings_module

    path = _as_file(_scan(shared_data), tmp_path / "scans", ".nii.gz")
    viewer.open_sample(PLUGIN, "mr_phantom")  # any first use of the plugin, here File > Open Sample
    viewer.layers.clear()

    next_session = napari_settings_module.NapariSettings(config_path=napari_settings.config_path)
    next_session._connect_events()
    monkeypatch.setattr(napari_settings_module, "_SETTINGS", next_session)
    _new_session_of_the_plugin()
    _drop(viewer, path)
    assert reader_questions == []
    [layer] = viewer.layers
    assert _read_by_this_plugin(layer)


def test_the_users_own_reader_choice_is_kept(viewer, napari_settings, shared_data, tmp_path, monkeypatch,
                                             reader_questions):
    """A reader the user chose ("Remember this choice" in napari's dialog saves ``*`` + the last extension) wins."""
    from napari.plugins.utils import get_preferred_reader

    napari_settings.plugins.extension2reader = {"*.nii": "napari", "*.gz": "napari"}
    path = _as_file(_scan(shared_data), tmp_path / "scans", ".nii")
    _open_dock(viewer)

    saved = napari_settings.plugins.extension2reader
    assert saved["*.nii"] == "napari" and saved["*.gz"] == "napari"
    assert get_preferred_reader(tmp_path / "scan.nii.gz") == "napari"
    # nor taken over for another spelling, which napari's case-sensitive matching leaves to its question
    assert get_preferred_reader(tmp_path / "SCAN.NII") is None
    assert get_preferred_reader(tmp_path / "scan.nrrd") == PLUGIN  # formats the user did not decide

    _file_open(viewer, monkeypatch, path)
    assert reader_questions == []
    [layer] = viewer.layers
    assert layer.source.reader_plugin == "napari"


def test_a_format_another_installed_plugin_reads_too_stays_the_users_question(viewer, napari_settings, monkeypatch,
                                                                              reader_questions):
    from npe2 import DynamicPlugin
    from napari.plugins.utils import get_preferred_reader

    with DynamicPlugin("other-nrrd-reader") as other:
        @other.contribute.reader(filename_patterns=["*.nrrd"])
        def get_reader(path):
            return None

        _open_dock(viewer)
        assert get_preferred_reader("/data/scan.nrrd") is None
        assert get_preferred_reader("/data/scan.nii.gz") == PLUGIN


def test_choosing_mamba_home_once_in_naparis_question_is_enough(viewer, shared_data, tmp_path, monkeypatch):
    """Before any other use of the plugin, the very first File > Open still asks (nothing of a plugin runs before
    napari decides); choosing Mamba-HoME there, "remember" unticked, settles every format for later files."""
    from napari._qt.dialogs.qt_reader_dialog import QtReaderDialog

    asked = []

    def exec_(dialog):
        asked.append(dialog._current_file)
        [choice] = [b for b in dialog.reader_btn_group.buttons() if b.text() == "Mamba-HoME"]
        choice.setChecked(True)
        dialog.persist_checkbox.setChecked(False)
        return 1

    monkeypatch.setattr(QtReaderDialog, "exec_", exec_)
    scan = _scan(shared_data)
    first = _as_file(scan, tmp_path / "first", ".nii.gz")
    later = _as_file(scan, tmp_path / "later", ".nrrd")
    _file_open(viewer, monkeypatch, first)
    _drop(viewer, later)
    assert asked == [str(first)]
    assert len(viewer.layers) == 2 and all(_read_by_this_plugin(layer) for layer in viewer.layers)


def test_a_preference_the_user_removed_stays_removed(viewer, napari_settings, reader_questions):
    """Preferences > Plugins: the user deletes our ``.nrrd`` preference; the next session does not add it back."""
    from napari.plugins.utils import get_preferred_reader

    _open_dock(viewer)
    assert get_preferred_reader("/data/scan.nrrd") == PLUGIN
    napari_settings.plugins.extension2reader = {pattern: plugin for pattern, plugin
                                                in napari_settings.plugins.extension2reader.items()
                                                if "[nN][rR][rR][dD]" not in pattern}
    assert get_preferred_reader("/data/scan.nrrd") is None

    _new_session_of_the_plugin()
    _open_dock(viewer)
    assert get_preferred_reader("/data/scan.nrrd") is None  # the user's removal is kept
    assert get_preferred_reader("/data/scan.nii.gz") == PLUGIN


def test_another_napari_environment_gets_the_preferences_too(viewer, napari_settings, tmp_path, monkeypatch):
    """napari keeps one settings file per environment while this plugin's record is shared: a second environment
    (or a NAPARI_CONFIG profile) must still get the preferences (the reviewer's repro: it got none)."""
    import napari.settings as napari_settings_module
    from napari.plugins.utils import get_preferred_reader

    _open_dock(viewer)
    assert get_preferred_reader("/data/scan.nii.gz") == PLUGIN

    other = napari_settings_module.NapariSettings(config_path=tmp_path / "other-env" / "settings.yaml")
    other._connect_events()
    monkeypatch.setattr(napari_settings_module, "_SETTINGS", other)
    _new_session_of_the_plugin()
    _open_dock(viewer)
    assert get_preferred_reader("/data/scan.nii.gz") == PLUGIN
