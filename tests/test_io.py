"""engine.io: reading volumes with geometry, refusing bad files, writing on a reference grid."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from engine.io import Volume, VolumeError, load_label, load_volume, save_volume


def _write(path, data, affine=None, **header_fields):
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    for k, v in header_fields.items():
        img.header[k] = v
    nib.save(img, str(path))
    return path


def test_load_volume_keeps_file_voxel_order_and_geometry(tmp_volume):
    img_path, _, affine = tmp_volume
    vol = load_volume(img_path)
    assert vol.data.dtype == np.float32
    assert vol.shape == (20, 24, 16)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    # spacing is along the array axes, whatever the world axes are
    assert vol.spacing == pytest.approx((1.5, 1.5, 2.0), abs=1e-5)
    assert vol.path == str(img_path)
    raw = np.asanyarray(nib.load(str(img_path)).dataobj)
    np.testing.assert_array_equal(vol.data, raw)


def test_missing_file(tmp_path):
    with pytest.raises(VolumeError, match="nope.nii.gz: file not found"):
        load_volume(tmp_path / "nope.nii.gz")


def test_truncated_gzip_names_the_file(tmp_path):
    path = _write(tmp_path / "full.nii.gz", np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32))
    raw = path.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeError, match="truncated.nii.gz: cannot read"):
        load_volume(bad)
    # truncated but a valid gzip stream of an incomplete NIfTI (short data block)
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(gzip.decompress(raw)[:-1000]))
    with pytest.raises(VolumeError, match="short.nii.gz"):
        load_volume(short)


def test_garbage_bytes(tmp_path):
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"this is not a nifti file at all" * 10)
    with pytest.raises(VolumeError, match="garbage.nii.gz"):
        load_volume(bad)


def test_2d_and_5d_are_refused_4d_singleton_squeezed(tmp_path):
    with pytest.raises(VolumeError, match="flat.nii.gz: is 2D"):
        load_volume(_write(tmp_path / "flat.nii.gz", np.zeros((10, 10), np.float32)))
    with pytest.raises(VolumeError, match="five.nii.gz: is 5D"):
        load_volume(_write(tmp_path / "five.nii.gz", np.zeros((4, 4, 4, 2, 3), np.float32)))
    with pytest.raises(VolumeError, match="series.nii.gz: is 4D"):
        load_volume(_write(tmp_path / "series.nii.gz", np.zeros((4, 4, 4, 3), np.float32)))
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6, 1)
    vol = load_volume(_write(tmp_path / "single.nii.gz", data))
    assert vol.shape == (4, 5, 6)
    np.testing.assert_array_equal(vol.data, data[..., 0])


def test_rgb_is_refused(tmp_path):
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(VolumeError, match="colour.nii.gz: is an RGB"):
        load_volume(_write(tmp_path / "colour.nii.gz", rgb))


def test_nan_voxels_are_counted(tmp_path):
    data = np.zeros((6, 6, 6), np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    with pytest.raises(VolumeError, match=r"nans.nii.gz: 4 of 216 voxels are NaN or infinite"):
        load_volume(_write(tmp_path / "nans.nii.gz", data))
    # for viewing only: read as it is, the count said in its notes; the other checks still refuse
    shown = load_volume(tmp_path / "nans.nii.gz", allow_nonfinite=True)
    assert np.array_equal(np.isnan(shown.data), np.isnan(data)) and np.isinf(shown.data).sum() == 1
    assert any(n.startswith("4 of 216 voxels are NaN or infinite: shown as they are") for n in shown.notes)
    assert not load_volume(_write(tmp_path / "clean.nii.gz", np.zeros((6, 6, 6), np.float32)),
                           allow_nonfinite=True).notes


def test_values_beyond_float32_are_refused_even_for_viewing(tmp_path):
    data = np.zeros((4, 4, 4), np.float64)
    data[0, 0, 0] = 1e300
    for allow in (False, True):
        with pytest.raises(VolumeError, match="outside the float32 range"):
            load_volume(_write(tmp_path / "huge.nii.gz", data), allow_nonfinite=allow)


def _write_raw_sform(path, srow_x, srow_y, srow_z):
    # nibabel refuses to build such affines through its API, so set the header rows directly, as a
    # broken exporter would write them.
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = srow_x, srow_y, srow_z
    hdr["sform_code"] = 2
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None, header=hdr), str(path))
    return path


def test_zero_spacing_and_singular_affine(tmp_path):
    zero = _write_raw_sform(tmp_path / "zero.nii.gz", [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0])
    with pytest.raises(VolumeError, match=r"zero.nii.gz: voxel spacing \(1.0, 0.0, 1.0\) has a zero axis"):
        load_volume(zero)
    singular = _write_raw_sform(tmp_path / "singular.nii.gz", [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0])
    with pytest.raises(VolumeError, match="singular.nii.gz: the voxel-to-world affine is singular"):
        load_volume(singular)
    nonfinite = _write_raw_sform(tmp_path / "nan.nii.gz", [1, 0, 0, 0], [0, np.nan, 0, 0], [0, 0, 1, 0])
    with pytest.raises(VolumeError, match="nan.nii.gz: the voxel-to-world affine is not a finite"):
        load_volume(nonfinite)


def test_label_checks(tmp_volume, tmp_path):
    img_path, lab_path, affine = tmp_volume
    image = load_volume(img_path)
    label = load_label(lab_path, reference=image, class_ids=[0, 1, 2])
    assert label.data.dtype == np.uint8
    assert set(np.unique(label.data)) == {0, 1, 2}

    with pytest.raises(VolumeError, match=r"label.nii.gz: label values \[2\] are not in the label set \[0, 1\]"):
        load_label(lab_path, class_ids=[0, 1])

    frac = np.zeros((20, 24, 16), np.float32)
    frac[0, 0, 0] = 0.5
    with pytest.raises(VolumeError, match="soft.nii.gz: label map has 1 non-integer"):
        load_label(_write(tmp_path / "soft.nii.gz", frac, affine))

    # float-stored integral labels are fine
    as_float = load_label(_write(tmp_path / "float.nii.gz", np.asarray(label.data, np.float32), affine))
    np.testing.assert_array_equal(as_float.data, label.data)

    with pytest.raises(VolumeError, match="small.nii.gz: label shape"):
        load_label(_write(tmp_path / "small.nii.gz", np.zeros((20, 24, 15), np.uint8), affine), reference=image)
    shifted = affine.copy()
    shifted[0, 3] += 0.5
    with pytest.raises(VolumeError, match="shifted.nii.gz: label lies on a different grid"):
        load_label(_write(tmp_path / "shifted.nii.gz", label.data, shifted), reference=image)
    # below the tolerance (float32 header rounding) is the same grid
    nudged = affine.copy()
    nudged[0, 3] += 1e-4
    load_label(_write(tmp_path / "nudged.nii.gz", label.data, nudged), reference=image)


def test_save_load_roundtrip_keeps_affine_header_codes_and_data(tmp_path):
    affine = np.array([[0.0, 0.0, 1.2, -32.2], [-0.9, 0.0, 0.0, 31.8], [0.0, 2.5, 0.0, -19.3], [0, 0, 0, 1]])
    image = np.random.default_rng(1).integers(-1000, 2000, size=(12, 10, 8)).astype(np.int16)
    src = nib.Nifti1Image(image, affine)
    src.set_qform(affine, code=1)
    src.set_sform(affine, code=2)
    src.header.set_slope_inter(2.0, -5.0)  # the image's stored ints are scaled
    nib.save(src, str(tmp_path / "scan.nii.gz"))
    vol = load_volume(tmp_path / "scan.nii.gz")
    np.testing.assert_allclose(vol.data, image * 2.0 - 5.0)

    labels = (vol.data > 500).astype(np.int64) + (vol.data > 2000)
    out = save_volume(tmp_path / "out" / "seg.nii.gz", labels, vol)
    written = nib.load(str(out))
    assert written.header["sform_code"] == 2 and written.header["qform_code"] == 1
    np.testing.assert_array_equal(written.affine, nib.load(str(tmp_path / "scan.nii.gz")).affine)
    assert written.get_data_dtype() == np.uint8  # int64 labels stored compactly
    slope, inter = written.header.get_slope_inter()
    assert slope is None and inter is None  # the image's scaling must not apply to labels
    back = load_label(out, reference=vol)
    np.testing.assert_array_equal(back.data, labels)
    assert not [p for p in out.parent.iterdir() if p.name != "seg.nii.gz"], "temp files left behind"

    # float image round trip is exact too
    img_out = save_volume(tmp_path / "img.nii", vol.data, vol)
    np.testing.assert_array_equal(load_volume(img_out).data, vol.data)


def test_save_refuses_shape_mismatch_and_keeps_existing_file(tmp_path):
    ref = Volume.from_array(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    target = save_volume(tmp_path / "seg.nii.gz", np.ones((4, 5, 6), np.uint8), ref)
    with pytest.raises(VolumeError, match=r"seg.nii.gz: array shape \(4, 5, 7\) differs"):
        save_volume(target, np.zeros((4, 5, 7), np.uint8), ref)
    np.testing.assert_array_equal(load_label(target).data, 1)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    ref = Volume.from_array(np.zeros((4, 5, 6), np.float32), np.eye(4))
    target = save_volume(tmp_path / "seg.nii.gz", np.ones((4, 5, 6), np.uint8), ref)

    def broken_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_volume(target, np.full((4, 5, 6), 2, np.uint8), ref)
    monkeypatch.undo()
    np.testing.assert_array_equal(load_label(target).data, 1)  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]  # no temp debris


def test_in_memory_volume_gets_scanner_codes(tmp_path):
    affine = np.array([[-1.5, 0, 0, 10], [0, -1.5, 0, 20], [0, 0, 2.0, -5], [0, 0, 0, 1]])
    ref = Volume.from_array(np.zeros((3, 4, 5), np.float32), affine)
    assert ref.spacing == (1.5, 1.5, 2.0)
    out = save_volume(tmp_path / "a.nii.gz", np.arange(60, dtype=np.float64).reshape(3, 4, 5), ref)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.float32
    assert img.header["sform_code"] == 1 and img.header["qform_code"] == 1
    np.testing.assert_allclose(img.affine, affine)


def test_zero_pixdim_without_sform_or_qform_is_refused(tmp_path):
    # nibabel silently reads a 0 pixdim as 1 mm; with no sform/qform that invented grid is all there is.
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    img = nib.Nifti1Image(np.ones((6, 6, 6), np.float32), None, header=hdr)
    img.header["pixdim"][1:4] = (0.8, 0.0, 0.0)
    img.header["qform_code"] = img.header["sform_code"] = 0
    nib.save(img, str(tmp_path / "flat_grid.nii.gz"))
    with pytest.raises(VolumeError, match=r"flat_grid.nii.gz: voxel spacing \(0.8, 0.0, 0.0\).*pixdim"):
        load_volume(tmp_path / "flat_grid.nii.gz")
    with pytest.raises(VolumeError, match="flat_grid.nii.gz"):
        load_label(tmp_path / "flat_grid.nii.gz")
    # the same zero pixdim with an sform placing the voxels is a valid file (the sform wins)
    img.set_sform(np.diag([0.8, 0.8, 1.5, 1.0]), code=2)
    nib.save(img, str(tmp_path / "sform.nii.gz"))
    assert load_volume(tmp_path / "sform.nii.gz").spacing == pytest.approx((0.8, 0.8, 1.5))


def test_gzip_and_name_that_disagree_are_named_with_the_fix(tmp_path, shared_data):
    """A real scan gzipped but named .nii (or a plain one named .nii.gz) is a common mix-up that ITK
    tools read silently; it was refused as "cannot work out file type". The error says what to rename."""
    scan = shared_data / "spinal_cord_mri" / "t2_image.nii.gz"
    gzipped = tmp_path / "t2.nii"
    gzipped.write_bytes(scan.read_bytes())
    with pytest.raises(VolumeError, match=r"t2\.nii: .*gzip-compressed.*rename it to t2\.nii\.gz"):
        load_volume(gzipped)
    plain = tmp_path / "t2_plain.nii.gz"
    plain.write_bytes(gzip.decompress(scan.read_bytes()))
    with pytest.raises(VolumeError, match=r"t2_plain\.nii\.gz: .*not gzip-compressed.*rename it to t2_plain\.nii"):
        load_volume(plain)
    # garbage stays "corrupt", with no rename advice
    (tmp_path / "junk.nii").write_bytes(gzip.compress(b"not a nifti header" * 40))
    with pytest.raises(VolumeError, match="corrupt") as info:
        load_volume(tmp_path / "junk.nii")
    assert "rename" not in str(info.value)
