"""engine.inference: sliding-window prediction back on the source grid, progress, cancel, OOM fallback."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.inference import (Prediction, PredictionError, Predictor, attempt_plan, count_windows, fit_roi,
                              predict_paths, probabilities_name, sliding_window_logits)
from engine.io import Volume, load_volume
from engine.networks import build_network
from engine.preprocess import Preprocessing
from engine.progress import CancelToken, Cancelled
from engine.synth import make_phantom

CLASSES = ["background", "organ", "vessel", "gland"]


def _tiny_model_and_metadata(in_channels=1, num_classes=4, spacing=(2.0, 2.0, 2.0), modality="CT", seed=0):
    torch.manual_seed(seed)
    model = build_network("mambahome", in_channels, num_classes, "tiny")
    pp = Preprocessing.for_modality(modality, target_spacing=spacing)
    meta = {"class_names": CLASSES[:num_classes] if num_classes <= 4 else [f"c{i}" for i in range(num_classes)],
            "preprocessing": pp.to_dict(), "patch_size": [32, 32, 32], "modality": modality}
    return model, meta


@pytest.fixture(scope="module")
def phantom_volume():
    image, _ = make_phantom((40, 44, 30), "CT", seed=1).to_volumes()
    return image


def test_prediction_lies_on_the_source_grid(phantom_volume):
    predictor = Predictor(_tiny_model_and_metadata(), device="cpu")
    pred = predictor.predict(phantom_volume, return_probabilities=True)
    assert isinstance(pred, Prediction)
    assert pred.labels.shape == phantom_volume.shape
    assert pred.labels.dtype == np.uint8
    assert pred.probabilities.shape == (4,) + phantom_volume.shape
    assert pred.probabilities.dtype == np.float32
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(pred.labels, pred.probabilities.argmax(0))
    assert pred.class_names == CLASSES
    assert pred.device_used == "cpu" and pred.notes == [] and pred.seconds > 0


def test_chunked_source_grid_argmax_equals_full_argmax(phantom_volume):
    from engine.inference import source_grid_argmax
    from engine.preprocess import to_network_space, to_source_grid

    pp = Preprocessing.for_modality("CT", target_spacing=(2.3, 1.7, 2.9))
    image, ctx = to_network_space(phantom_volume, pp)
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn((7,) + tuple(image.shape[1:])) * 3, dim=0)
    probs[:, :2] = 1.0 / 7  # exact ties must go to the lower class, as in one argmax
    resampled = to_source_grid(probs, ctx, mode="bilinear")
    full = resampled.argmax(0)
    # the slabs resample by one composed map instead of MONAI's two inverse steps: values agree to float32
    # rounding, so a voxel whose two best classes are that close may go either way, and no other voxel
    top2 = np.sort(resampled, axis=0)[-2:]
    near_tie = (top2[1] - top2[0]) < 1e-5
    for labels in (source_grid_argmax(probs, ctx, chunk_bytes=1), source_grid_argmax(probs, ctx)):
        differs = labels != full
        assert not (differs & ~near_tie).any()
        assert differs.sum() <= 0.001 * differs.size
        np.testing.assert_array_equal(labels[0], full[0])  # exact ties (the first rows) go to the lower class


@pytest.mark.parametrize("spacing, permutation", [(None, True), ((0.9, 0.8, 2.0), True), ((0.8, 0.9, 2.0), False)])
def test_labels_without_resampling_come_from_the_logits_argmax(spacing, permutation):
    """A grid that is only reoriented skips softmax and score resampling and gives the same labels."""
    from engine.inference import source_grid_labels
    from engine.preprocess import grid_is_axis_permutation, to_network_space, to_source_grid

    # LPS-like affine with a swapped axis pair: the RAS network grid is a permutation with flips.
    affine = np.array([[0, -0.9, 0, 10], [-0.8, 0, 0, -4], [0, 0, 2.0, 3], [0, 0, 0, 1]], dtype=float)
    volume = Volume(data=np.random.default_rng(0).normal(size=(24, 20, 12)).astype(np.float32), affine=affine,
                    spacing=(0.8, 0.9, 2.0), header=None, path=None)
    image, ctx = to_network_space(volume, Preprocessing.for_modality("CT", target_spacing=spacing))
    assert grid_is_axis_permutation(ctx) is permutation
    torch.manual_seed(0)
    logits = torch.randn((5,) + tuple(image.shape[1:])) * 3
    reference = to_source_grid(torch.softmax(logits, dim=0), ctx, mode="bilinear").argmax(0)
    labels = source_grid_labels(logits, ctx)
    assert labels.shape == volume.shape
    np.testing.assert_array_equal(labels, reference)


def test_sliding_window_equals_one_pass_when_the_window_covers_the_image():
    torch.manual_seed(0)
    model = build_network("mambahome", 1, 3, "tiny").eval()
    image = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        direct = model(image)
    windowed = sliding_window_logits(model, image, (32, 32, 32), overlap=0.5)
    torch.testing.assert_close(windowed, direct, atol=1e-5, rtol=1e-5)


def test_roi_fits_small_images_and_divisor():
    assert fit_roi((20, 100, 33), (32, 64, 64), (16, 16, 16)) == (32, 64, 48)
    assert count_windows((32, 32, 32), (32, 32, 32), 0.5) == 1
    assert count_windows((48, 32, 32), (32, 32, 32), 0.5) == 2


def test_progress_reports_every_window_and_cancel_stops(phantom_volume):
    model, meta = _tiny_model_and_metadata(spacing=(1.0, 1.0, 1.0))
    predictor = Predictor((model, meta), device="cpu", sw_batch_size=1)
    seen = []
    # windows first; then the steps back to the scan's grid, which report under their own message
    predictor.predict(phantom_volume, progress=lambda d, t, m: seen.append((d, t)) if m == "segmenting" else None)
    total = seen[-1][1]
    assert total > 4  # a 40x44x30 volume at 1.5-2 mm -> 1 mm needs several 32^3 windows
    assert [d for d, _ in seen] == list(range(1, total + 1))

    cancel = CancelToken()
    calls = []

    def progress(done, total, msg):
        calls.append(done)
        if done == 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        predictor.predict(phantom_volume, progress=progress, cancel=cancel)
    assert max(calls) == 2  # no window ran after the cancel


def test_channel_mismatch_names_both(phantom_volume):
    predictor = Predictor(_tiny_model_and_metadata(in_channels=2), device="cpu")
    with pytest.raises(PredictionError, match=r"expects 2 input channel.*provides 1"):
        predictor.predict(phantom_volume)
    # two channels on one grid work
    pred = predictor.predict([phantom_volume, phantom_volume])
    assert pred.labels.shape == phantom_volume.shape


def test_metadata_class_count_must_match_network():
    model, meta = _tiny_model_and_metadata()
    meta["class_names"] = meta["class_names"][:3]
    with pytest.raises(PredictionError, match="3 class names but the network has 4"):
        Predictor((model, meta), device="cpu")


class _OOMBelow(nn.Module):
    """Wraps a network; raises a CUDA out-of-memory error for window batches larger than ``max_batch``."""

    def __init__(self, inner: nn.Module, max_batch: int) -> None:
        super().__init__()
        self.inner = inner
        self.network_spec = inner.network_spec
        self.max_batch = max_batch
        self.batches = []

    def forward(self, x):
        self.batches.append(int(x.shape[0]))
        if x.shape[0] > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        return self.inner(x)


def test_out_of_memory_retries_with_fewer_windows(phantom_volume):
    model, meta = _tiny_model_and_metadata(spacing=(1.5, 1.5, 1.5))  # 8 windows
    reference = Predictor((model, meta), device="cpu", sw_batch_size=1).predict(phantom_volume)
    wrapped = _OOMBelow(model, max_batch=1)
    predictor = Predictor((wrapped, meta), device="cpu", sw_batch_size=4)
    pred = predictor.predict(phantom_volume)
    assert 4 in wrapped.batches and 2 in wrapped.batches
    assert len(pred.notes) == 2 and all("out of memory" in n for n in pred.notes)
    np.testing.assert_array_equal(pred.labels, reference.labels)
    assert predictor.sw_batch_size == 1  # the next volume starts with what fitted
    wrapped.batches.clear()
    assert predictor.predict(phantom_volume).notes == []
    assert set(wrapped.batches) == {1}


def test_out_of_memory_even_with_one_window_is_a_clear_error(phantom_volume):
    model, meta = _tiny_model_and_metadata()
    predictor = Predictor((_OOMBelow(model, max_batch=0), meta), device="cpu", sw_batch_size=2)
    with pytest.raises(MemoryError, match="out of memory even with 1 window"):
        predictor.predict(phantom_volume)


def test_cuda_plan_falls_back_to_host_stitching_then_cpu():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert attempt_plan(cuda, 4) == [(cuda, 4, cuda), (cuda, 2, cuda), (cuda, 1, cuda), (cuda, 1, cpu), (cpu, 4, cpu)]
    assert attempt_plan(cpu, 3) == [(cpu, 3, cpu), (cpu, 1, cpu)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_out_of_memory_falls_back_to_cpu():
    """A GPU capped at a few MiB cannot hold the model's activations: the prediction must still succeed."""
    model, meta = _tiny_model_and_metadata(spacing=None)
    image = Volume.from_array(np.random.default_rng(0).normal(size=(96, 96, 96)).astype(np.float32), np.eye(4))
    reference = Predictor((model, meta), device="cpu").predict(image)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    fraction = (torch.cuda.memory_allocated() + 48 * 2 ** 20) / total
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        predictor = Predictor((model, meta), device="cuda", sw_batch_size=8)
        pred = predictor.predict(image)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert pred.notes, "expected an out-of-memory fallback"
    assert pred.device_used == "cpu"
    np.testing.assert_array_equal(pred.labels, reference.labels)


def test_predict_paths_keeps_names_and_geometry(tmp_path, tmp_volume):
    import nibabel as nib

    img_path, _, affine = tmp_volume
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.nii.gz", "b.nii"):
        nib.save(nib.load(str(img_path)), str(src / name))
    (src / "notes.txt").write_text("not a volume")
    predictor = Predictor(_tiny_model_and_metadata(), device="cpu")
    logs = []
    results = predict_paths(predictor, src, tmp_path / "out", log=logs.append)
    assert sorted(p.name for p, _ in results) == ["a.nii.gz", "b.nii"]
    for out, _ in results:
        written = nib.load(str(out))
        np.testing.assert_allclose(written.affine, affine, atol=1e-5)
        assert written.shape == nib.load(str(img_path)).shape
        assert np.issubdtype(written.get_data_dtype(), np.integer)
    assert probabilities_name(tmp_path / "x.nii.gz").name == "x_probabilities.nii.gz"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .nii"):
        predict_paths(predictor, tmp_path / "empty", tmp_path / "o2")


def test_a_folder_of_cases_says_what_it_does_not_read(tmp_path, tmp_volume):
    """One NIfTI per patient subfolder was skipped without a word (a batch of 3 came back as 1, exit code 0), and
    `--output labels.nii.gz` for a folder of cases made a folder named labels.nii.gz."""
    img_path = tmp_volume[0]
    src = tmp_path / "patients"
    for sub in ("p1", "p2"):
        (src / sub).mkdir(parents=True)
        (src / sub / "scan.nii.gz").write_bytes(img_path.read_bytes())
    (src / "old_results").mkdir()  # a subfolder without volumes is not worth a note
    (src / "old_results" / "notes.txt").write_text("x")
    predictor = Predictor(_tiny_model_and_metadata(), device="cpu")
    with pytest.raises(ValueError, match=r"subfolder\(s\) p1/, p2/ hold volume files"):
        predict_paths(predictor, src, tmp_path / "out", log=lambda m: None)
    (src / "top.nii.gz").write_bytes(img_path.read_bytes())
    logs = []
    results = predict_paths(predictor, src, tmp_path / "out", log=logs.append)
    assert [p.name for p, _ in results] == ["top.nii.gz"]
    notes = [m for m in logs if m.startswith("note:") and "p1/, p2/" in m]
    assert len(notes) == 1 and "old_results" not in notes[0]
    for name in ("labels.nii.gz", "labels.seg.nrrd", "labels.mha"):
        with pytest.raises(ValueError, match="output must be a folder"):
            predict_paths(predictor, src, tmp_path / name, log=lambda m: None)
        assert not (tmp_path / name).exists()
    # a folder name with a dot is still a folder, and a trailing slash always names one
    assert [p.name for p, _ in predict_paths(predictor, src, tmp_path / "labels.v2", log=lambda m: None)] == \
        ["top.nii.gz"]
    assert (tmp_path / "labels.v2").is_dir()
    assert [p.parent.name for p, _ in predict_paths(predictor, src, str(tmp_path / "labels.nii.gz") + "/",
                                                    log=lambda m: None)] == ["labels.nii.gz"]


def test_nnunet_channel_folders_are_grouped_per_case(tmp_path, tmp_volume):
    import nibabel as nib

    from engine.inference import group_input_files

    img_path, _, affine = tmp_volume
    src = tmp_path / "imagesTs"
    src.mkdir()
    for name in ("caseA_0000.nii.gz", "caseA_0001.nii.gz", "caseB_0001.nii.gz", "caseB_0000.nii.gz"):
        nib.save(nib.load(str(img_path)), str(src / name))
    groups = group_input_files(sorted(src.iterdir()))
    assert [(name, [f.name for f in chans]) for chans, name in groups] == [
        ("caseA.nii.gz", ["caseA_0000.nii.gz", "caseA_0001.nii.gz"]),
        ("caseB.nii.gz", ["caseB_0000.nii.gz", "caseB_0001.nii.gz"])]
    predictor = Predictor(_tiny_model_and_metadata(in_channels=2), device="cpu")
    results = predict_paths(predictor, src, tmp_path / "pred", log=lambda m: None)
    assert sorted(p.name for p, _ in results) == ["caseA.nii.gz", "caseB.nii.gz"]
    np.testing.assert_allclose(nib.load(str(results[0][0])).affine, affine, atol=1e-5)
    # mixed names: every file is its own input, names kept
    (src / "other.nii.gz").write_bytes((src / "caseA_0000.nii.gz").read_bytes())
    assert [name for _, name in group_input_files(sorted(src.iterdir()))][-1] == "other.nii.gz"


def test_cancelled_file_prediction_writes_nothing(tmp_path, tmp_volume):
    img_path, _, _ = tmp_volume
    predictor = Predictor(_tiny_model_and_metadata(spacing=(0.5, 0.5, 0.5)), device="cpu", sw_batch_size=1)
    cancel = CancelToken()
    out = tmp_path / "pred.nii.gz"
    with pytest.raises(Cancelled):
        predictor.predict_file(img_path, out, progress=lambda d, t, m: cancel.cancel(), cancel=cancel)
    assert list(tmp_path.glob("pred*")) == [] and not any(p.name.startswith(".pred") for p in tmp_path.iterdir())


REAL_IMAGES = [
    ("abdomen_ct_mr/ct_image.nii.gz", "CT", (4.0, 4.0, 4.0)),
    ("abdomen_ct_mr/mr_image.nii.gz", "MR", (4.0, 4.0, 4.0)),
    ("spinal_cord_mri/t1_image.nii.gz", "MR", (2.0, 2.0, 2.0)),
    ("spinal_cord_mri/t2_image.nii.gz", "MR", (2.0, 2.0, 2.0)),
]


@pytest.mark.parametrize("rel, modality, spacing", REAL_IMAGES, ids=[r[0] for r in REAL_IMAGES])
def test_real_scans_prediction_keeps_affine_shape_orientation(shared_data, tmp_path, rel, modality, spacing):
    import nibabel as nib

    src = shared_data / rel
    src_img = nib.load(str(src))
    assert not np.allclose(src_img.affine, np.eye(4))
    predictor = Predictor(_tiny_model_and_metadata(spacing=spacing, modality=modality), device="cpu")
    out = tmp_path / "pred.nii.gz"
    pred = predictor.predict_file(src, out)
    written = nib.load(str(out))
    assert written.shape == src_img.shape
    np.testing.assert_allclose(written.affine, src_img.affine, atol=1e-4)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(src_img.affine)
    assert written.header.get_sform(coded=True)[1] == src_img.header.get_sform(coded=True)[1]
    np.testing.assert_array_equal(np.asarray(written.dataobj), pred.labels)
    assert load_volume(out).shape == load_volume(src).shape


def test_compiled_predictor_gives_the_eager_labels(phantom_volume):
    """`--compile` compiles the network's blocks in place (here dynamo with the eager backend, so CI needs
    no C compiler; the inductor backend was checked on the GPU, see BENCHMARKS.md)."""
    import torch._dynamo

    from engine.model import compiled_regions

    model, meta = _tiny_model_and_metadata()
    eager = Predictor((model, meta), device="cpu").predict(phantom_volume, return_probabilities=True)
    torch._dynamo.reset()
    compiled = Predictor((model, meta), device="cpu", compile="eager")
    assert compiled_regions(compiled.model)
    result = compiled.predict(phantom_volume, return_probabilities=True)
    np.testing.assert_allclose(result.probabilities, eager.probabilities, atol=1e-5)
    np.testing.assert_array_equal(result.labels, eager.labels)


def test_padded_last_batch_gives_the_same_logits():
    """Compiled networks get the last, smaller batch of windows padded to the full batch (one shape, no
    recompilation); the padding must not leak into the result."""
    model, _ = _tiny_model_and_metadata()
    model.eval()
    image = torch.randn(1, 1, 48, 40, 36)
    cpu = torch.device("cpu")
    calls = []

    def network(x):
        calls.append(int(x.shape[0]))
        return model(x)

    plain = sliding_window_logits(network, image, (32, 32, 32), sw_batch_size=3, overlap=0.5, device=cpu)
    plain_calls, calls[:] = list(calls), []
    padded = sliding_window_logits(network, image, (32, 32, 32), sw_batch_size=3, overlap=0.5, device=cpu,
                                   pad_batch=True)
    assert plain_calls[-1] < 3 and set(calls) == {3}
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)


def test_tiny_volume_is_padded_into_a_legal_window():
    # 8x8x8 at the model's spacing used to fail deep in torch: one bottleneck voxel in instance norm
    predictor = Predictor(_tiny_model_and_metadata(), device="cpu")
    vol = Volume.from_array(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32),
                            np.diag([2.0, 2.0, 2.0, 1.0]), path="tiny.nii.gz")
    pred = predictor.predict(vol)
    assert pred.labels.shape == (8, 8, 8)
    assert fit_roi((8, 8, 8), (32, 32, 32), (16, 16, 16)) == (32, 32, 32)
    assert fit_roi((8, 30, 8), (32, 32, 32), (16, 16, 16)) == (16, 32, 16)  # already legal: unchanged


def test_volume_that_resamples_to_a_voxel_is_refused_naming_file_and_minimum():
    from engine.preprocess import PreprocessingError

    predictor = Predictor(_tiny_model_and_metadata(), device="cpu")
    vol = Volume.from_array(np.zeros((40, 40, 40), np.float32), np.diag([0.001, 0.001, 0.001, 1.0]),
                            path="micro.nii.gz")
    with pytest.raises(PreprocessingError, match=r"micro.nii.gz: shape \(40, 40, 40\) at \(0.001, 0.001, 0.001\) "
                                                 r"mm spacing.*at least 2 voxels along every axis"):
        predictor.predict(vol)


def test_predict_reads_other_formats_and_writes_the_output_extension(tmp_path, tmp_volume):
    sitk = pytest.importorskip("SimpleITK")
    slicerio = pytest.importorskip("slicerio")
    from engine.io import load_label, save_volume

    img_path, _, affine = tmp_volume
    image = load_volume(img_path)
    nrrd_in = save_volume(tmp_path / "scan.nrrd", image.data, image)
    predictor = Predictor(_tiny_model_and_metadata(), device="cpu")
    [(seg_out, pred)] = predict_paths(predictor, nrrd_in, tmp_path / "scan_labels.seg.nrrd", log=lambda m: None)
    seg = slicerio.read_segmentation(str(seg_out))
    assert {s["name"] for s in seg["segments"]} <= set(CLASSES[1:])
    back = load_label(seg_out)
    np.testing.assert_array_equal(back.affine, affine)
    np.testing.assert_array_equal(back.data, pred.labels)
    # a folder of MetaImage files: names and formats kept
    folder = tmp_path / "mha"
    folder.mkdir()
    save_volume(folder / "a.mha", image.data, image)
    [(mha_out, _)] = predict_paths(predictor, folder, tmp_path / "mha_out", log=lambda m: None)
    assert mha_out.name == "a.mha"
    np.testing.assert_allclose(load_label(mha_out).affine, affine, atol=1e-9)
    # a DICOM series folder is one volume; probabilities of a non-NIfTI output go to NIfTI
    from tests.test_formats import write_dicom_series

    series = write_dicom_series(sitk.ReadImage(str(img_path)), tmp_path / "dicom")
    [(dcm_out, _)] = predict_paths(predictor, series, tmp_path / "dicom_labels.nrrd", probabilities=True,
                                   log=lambda m: None)
    assert load_label(dcm_out).shape == image.shape
    assert (tmp_path / "dicom_labels_probabilities.nii.gz").is_file()
    # a folder of cases, one a volume file and one a DICOM series subfolder (a patient's export): both segmented
    write_dicom_series(sitk.ReadImage(str(img_path)), folder / "patient_7")
    (folder / "notes").mkdir()  # a subfolder that is no series is not a case
    done = predict_paths(predictor, folder, tmp_path / "mixed_out", log=lambda m: None)
    assert sorted(out.name for out, _ in done) == ["a.mha", "patient_7.nii.gz"]
    np.testing.assert_array_equal(load_label(tmp_path / "mixed_out" / "patient_7.nii.gz").data,
                                  load_label(dcm_out).data)  # as the same series given alone


def test_cli_predict_on_a_corrupt_file_prints_one_line(tmp_path, capsys):
    from engine.checkpoint import save_checkpoint
    from engine.cli import main

    model, meta = _tiny_model_and_metadata()
    ckpt = save_checkpoint(tmp_path / "tiny.safetensors", model, meta)
    bad = tmp_path / "broken.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 40 40 40\nencoding: raw\n\n" + b"\0" * 100)
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(bad), "--output", str(tmp_path / "o.nrrd"),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.nrrd: cannot read" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o.nrrd").exists()


def test_cli_predict_notes_a_modality_it_does_not_know(tmp_path, capsys, tmp_volume):
    """An unknown --modality falls back to the 'other' rule; the command says so (a typo is likely)."""
    from engine.checkpoint import save_checkpoint
    from engine.cli import main

    model, meta = _tiny_model_and_metadata()
    ckpt = save_checkpoint(tmp_path / "tiny.safetensors", model, meta)
    image = tmp_volume[0]
    for modality, noted in (("TC", True), ("T2w", False), ("other", False)):
        out = tmp_path / f"o_{modality}.nii.gz"
        assert main(["predict", "--checkpoint", str(ckpt), "--input", str(image), "--output", str(out),
                     "--modality", modality, "--device", "cpu", "--quiet"]) == 0
        err = capsys.readouterr().err
        assert ("--modality 'TC' is not CT, MR or US" in err) == noted, (modality, err)
        assert out.is_file()


def test_predict_says_when_it_found_nothing(tmp_path, tmp_volume):
    """An empty label map is written (a valid answer) but said: on the wrong anatomy or modality a silent empty file
    looks like a failed run."""
    model, meta = _tiny_model_and_metadata()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():  # a network that answers "background" everywhere
        head.weight.zero_()
        head.bias.copy_(torch.tensor([10.0] + [-10.0] * (head.bias.numel() - 1)))
    lines = []
    [(out, pred)] = predict_paths(Predictor((model, meta), device="cpu"), tmp_volume[0], tmp_path / "empty.nrrd",
                                  log=lines.append)
    assert out.is_file() and not pred.labels.any()
    assert any(line.startswith("note: empty.nrrd: no voxel of any class was found (") for line in lines), lines
    lines.clear()
    predict_paths(Predictor(_tiny_model_and_metadata(), device="cpu"), tmp_volume[0], tmp_path / "some.nrrd",
                  log=lines.append)
    assert not any("no voxel" in line for line in lines)


def test_device_names_are_checked_with_a_clear_message(tmp_path, capsys, tmp_volume):
    """``--device gpu0`` used to end every command in torch's RuntimeError traceback."""
    from engine.checkpoint import save_checkpoint
    from engine.cli import main
    from engine.inference import resolve_device

    assert resolve_device("CPU") == torch.device("cpu") and resolve_device(" cpu ") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0': use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        for name in ("GPU", "cuda", "gpu:1"):
            with pytest.raises(ValueError, match=f"device '{name}' asked for, but this machine has no CUDA GPU"):
                resolve_device(name)
    else:
        assert resolve_device("GPU") == torch.device("cuda")
        with pytest.raises(ValueError, match="CUDA GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    ckpt = save_checkpoint(tmp_path / "tiny.safetensors", *_tiny_model_and_metadata())
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(tmp_volume[0]), "--output",
                 str(tmp_path / "o.nii.gz"), "--device", "gpu0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unknown device 'gpu0'" in err


def test_a_window_batch_below_one_is_refused_not_silently_changed(tmp_path, tmp_volume, capsys):
    from engine.checkpoint import save_checkpoint
    from engine.cli import main

    ckpt = save_checkpoint(tmp_path / "m.safetensors", *_tiny_model_and_metadata())
    for bad in ("0", "-2"):
        assert main(["predict", "--checkpoint", str(ckpt), "--input", str(tmp_volume[0]), "--output",
                     str(tmp_path / "o.nii.gz"), "--sw-batch-size", bad, "--quiet"]) == 2
        assert "sw_batch_size" in capsys.readouterr().err and not (tmp_path / "o.nii.gz").exists()
