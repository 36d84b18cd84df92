"""A saved case keeps its image's integer voxel type (a CT's int16), locally and through the server, and reads back
voxel-identical with the exact geometry; float images stay float32, and cases saved as float32 before still load."""
from __future__ import annotations

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from engine.cases import CaseStore  # noqa: E402
from engine.io import Volume, load_volume  # noqa: E402

TOKEN = "dtype-token-123456"


def _ct(shared_data):
    return shared_data / "abdomen_ct_mr" / "ct_image.nii.gz"


def _labels(shape):
    lab = np.zeros(shape, np.uint8)
    lab[10:20, 10:20, 5:10] = 1
    return lab


def _check_saved(record, raw, affine, dtype):
    saved = nib.load(str(record.image_path))
    assert saved.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), raw)  # voxel-identical, as stored
    assert np.asarray(saved.dataobj).dtype == np.dtype(dtype)
    np.testing.assert_allclose(saved.affine, affine, rtol=0, atol=1e-5)
    label = nib.load(str(record.label_path))
    np.testing.assert_array_equal(label.affine, saved.affine)  # image and label share one grid


def test_local_case_of_a_real_int16_ct_is_stored_as_int16(tmp_path, shared_data):
    src = nib.load(str(_ct(shared_data)))
    raw = np.asarray(src.dataobj)
    assert raw.dtype == np.int16
    image = load_volume(_ct(shared_data))  # napari's reader: float32 voxels, the file's header
    assert image.data.dtype == np.float32
    store = CaseStore(tmp_path / "cases")
    rec = store.add(image, _labels(image.shape), modality="CT", class_names=["background", "organ"])
    _check_saved(rec, raw, src.affine, np.int16)
    # the file's own header is kept (sform code 2, no qform), as before
    saved = nib.load(str(rec.image_path))
    assert int(saved.header["sform_code"]) == int(src.header["sform_code"])
    back, _, _ = store.load(rec.case_id)
    np.testing.assert_array_equal(back.data, image.data)
    np.testing.assert_array_equal(back.affine, image.affine)


def test_local_integer_array_and_float_image_dtypes(tmp_path):
    affine = np.diag([0.75, 0.75, 2.5, 1.0])
    affine[:3, 3] = [-10.5, 3.25, 7.0]
    store = CaseStore(tmp_path / "cases")
    rng = np.random.default_rng(0)
    for dtype in (np.int16, np.uint16, np.uint8):
        info = np.iinfo(dtype)
        raw = rng.integers(info.min, info.max, size=(20, 24, 16), endpoint=True).astype(dtype)
        rec = store.add(Volume.from_array(raw, affine), _labels(raw.shape), modality="CT",
                        class_names=["background", "organ"])
        _check_saved(rec, raw, affine, dtype)
    # a float image stays float32 (even one whose values happen to be whole numbers: no file says integer)
    floats = rng.normal(size=(20, 24, 16)).astype(np.float64)
    rec = store.add(Volume.from_array(floats, affine), _labels(floats.shape), modality="MR",
                    class_names=["background", "organ"])
    _check_saved(rec, floats.astype(np.float32), affine, np.float32)
    whole = np.round(floats * 100).astype(np.float32)
    rec = store.add(Volume.from_array(whole, affine), _labels(whole.shape), modality="MR",
                    class_names=["background", "organ"])
    _check_saved(rec, whole, affine, np.float32)


def test_scaled_integer_nifti_stays_float32(tmp_path):
    """An int16 file with scl_slope holds float values: the case keeps them as float32, not the raw integers."""
    raw = np.arange(8 * 8 * 8, dtype=np.int16).reshape(8, 8, 8)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, 1.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    image = load_volume(tmp_path / "scaled.nii.gz")
    rec = CaseStore(tmp_path / "cases").add(image, _labels(image.shape) * 0, modality="MR",
                                            class_names=["background", "organ"])
    saved = nib.load(str(rec.image_path))
    assert saved.get_data_dtype() == np.float32
    np.testing.assert_array_equal(saved.get_fdata(dtype=np.float32), image.data)


def test_an_older_float32_case_still_loads(tmp_path, shared_data):
    """A case written before this change (its int16 CT stored as float32) loads as it did."""
    image = load_volume(_ct(shared_data))
    store = CaseStore(tmp_path / "cases")
    rec = store.add(Volume.from_array(image.data, image.affine), _labels(image.shape), modality="CT",
                    class_names=["background", "organ"])  # no header: float32 as older stores hold
    assert nib.load(str(rec.image_path)).get_data_dtype() == np.float32
    back, label, _ = store.load(rec.case_id)
    np.testing.assert_array_equal(back.data, image.data)
    assert int(label.data.sum()) == int(_labels(image.shape).sum())


@pytest.mark.parametrize("how", ["pack", "nifti", "nrrd"])
def test_server_case_of_an_int16_ct_is_stored_as_sent(tmp_path, shared_data, how):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from server_support import connected_client, cpu_server

    src = nib.load(str(_ct(shared_data)))
    raw = np.asarray(src.dataobj)
    with cpu_server(tmp_path, TOKEN) as (url, _app):
        client = connected_client(url, TOKEN)
        if how == "pack":
            s = client.create_session(raw, src.affine, name="ct", modality="CT")
        elif how == "nifti":
            s = client.upload_file(_ct(shared_data), modality="CT")
        else:
            import nrrd

            from engine.io import save_volume

            path = tmp_path / "ct.nrrd"
            save_volume(path, raw, load_volume(_ct(shared_data)))
            assert nrrd.read_header(str(path))["type"] in ("short", "int16")
            s = client.upload_file(path, modality="CT")
        client.save_case(s.session_id, _labels(s.shape), ["background", "organ"], "CT", case_id=f"ct-{how}")
        rec = CaseStore(tmp_path / "cases").get(f"ct-{how}")
        _check_saved(rec, raw, src.affine, np.int16)
        assert rec.shape == tuple(raw.shape)
