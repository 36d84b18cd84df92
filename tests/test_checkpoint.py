"""Checkpoints: safetensors + JSON round trip, refusal of pickles and tampered files, atomic writes,
and the released-code key mapping."""
from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch

from engine import CheckpointError, MambaHoME, ModelConfig, import_official_checkpoint, load_checkpoint, \
    read_checkpoint_metadata, save_checkpoint
from engine.cli import main as cli_main
from engine.official import export_official_state_dict

META = {"class_names": ["background", "liver", "spleen"], "modality": "CT", "patch_size": [32, 32, 32],
        "version": "v1", "provenance": {"note": "test"}}


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return MambaHoME(ModelConfig.preset("tiny", num_classes=3)).eval()


def test_round_trip_gives_bit_identical_outputs(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model, META)
    model, meta = load_checkpoint(path)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(tiny_model(x), model(x))
    assert meta["class_names"] == META["class_names"] and meta["version"] == "v1"
    assert meta["config"] == tiny_model.config.to_dict()
    assert read_checkpoint_metadata(path)["weights_sha256"] == meta["weights_sha256"]
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind


def test_paper_variant_round_trip(tmp_path):
    model = MambaHoME(ModelConfig.preset("tiny", num_classes=2, home_variant="paper")).eval()
    path = save_checkpoint(tmp_path / "p.safetensors", model, {"class_names": ["bg", "fg"]})
    loaded, meta = load_checkpoint(path)
    assert loaded.config.home_variant == "paper"
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_pickle_checkpoints_are_refused(tmp_path, tiny_model):
    zip_pt = tmp_path / "model.pth"
    torch.save(tiny_model.state_dict(), zip_pt)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(zip_pt)
    raw = tmp_path / "model.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(raw)


def test_tampered_weights_are_refused(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model, META)
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    data[8 + header_len + 100] ^= 0xFF  # flip bits of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_foreign_and_truncated_files_are_refused(tmp_path, tiny_model):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a napari-mambahome checkpoint"):
        load_checkpoint(foreign)
    good = save_checkpoint(tmp_path / "m.safetensors", tiny_model, META)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(cut)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"hello world, not a model")
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_files_that_are_not_checkpoints_are_named_for_what_they_are(tmp_path, tiny_model):
    """A volume, text, an empty file, a cut header or a run folder given as a checkpoint: the message
    says what the file is, not a JSON/safetensors parser's "Expecting value" or "header too large"."""
    import gzip

    good = save_checkpoint(tmp_path / "m.safetensors", tiny_model, META)
    cases = {
        "text.safetensors": (b"hello world, not a model" * 4, "does not start with a safetensors header"),
        "empty.safetensors": (b"", "empty"),
        "seg.nii.gz": (gzip.compress(b"\x5c\x01\x00\x00" + bytes(400)), "gzip-compressed"),
        "vol.nrrd": (b"NRRD0004\ntype: short\n", "NRRD volume"),
        "vol.nii": (b"\x5c\x01\x00\x00" + bytes(400), "NIfTI volume"),
        "head.safetensors": (good.read_bytes()[:200], "truncated"),
    }
    for name, (data, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for reader in (load_checkpoint, read_checkpoint_metadata):
            with pytest.raises(CheckpointError, match=expected) as exc:
                reader(path)
            assert str(path) in str(exc.value) and "not a napari-mambahome checkpoint" in str(exc.value)
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(good.read_bytes())
    for reader in (load_checkpoint, read_checkpoint_metadata):
        with pytest.raises(CheckpointError, match="is a folder.*best.safetensors"):
            reader(run)


def test_config_weights_mismatch_is_refused(tmp_path, tiny_model):
    from safetensors.torch import save_file

    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model, META)
    meta = read_checkpoint_metadata(path)
    meta["network"]["config"]["num_classes"] = 5  # config says 5 classes, weights have 3
    tensors = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    header = {"format": "napari-mambahome", "format_version": "1", "metadata": json.dumps(meta)}
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)


def test_class_names_must_fit_outputs(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="class names"):
        save_checkpoint(tmp_path / "m.safetensors", tiny_model, {"class_names": ["a", "b"]})


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model, META)
    before = path.read_bytes()
    other = MambaHoME(ModelConfig.preset("tiny", num_classes=3))

    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError):
        save_checkpoint(path, other, META)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    load_checkpoint(path)


def test_official_checkpoint_import_round_trip(tmp_path):
    torch.manual_seed(1)
    ours = MambaHoME(ModelConfig.preset("tiny", num_classes=4)).eval()
    released = export_official_state_dict(ours)
    assert "mamba_encoder.moe_layers.0.0.mlp.experts_first.1.3.weight" in released
    assert not any(".fc1." in k for k in released)
    pth = tmp_path / "MambaHoME_best.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in released.items()}}, pth)
    imported = import_official_checkpoint(pth, group_sizes=ours.config.group_sizes)
    assert imported.config == ours.config
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), imported(x))
    # through the CLI, into our format
    out = tmp_path / "imported.safetensors"
    assert cli_main(["import-official", str(pth), str(out), "--class-names", "bg,a,b,c"]) == 0
    # group sizes are not stored in released weights: the CLI assumes the released defaults
    model, meta = load_checkpoint(out)
    assert meta["class_names"] == ["bg", "a", "b", "c"] and meta["provenance"]["imported_from"] == str(pth)


def test_official_import_refuses_wrong_files(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, bad)
    with pytest.raises(CheckpointError, match="not a released Mamba-HoME"):
        import_official_checkpoint(bad)
    evil = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state_dict": Evil()}, evil)  # a .pth carrying code: weights_only loading must refuse it
    with pytest.raises(CheckpointError, match="weights-only"):
        import_official_checkpoint(evil)


def test_official_import_never_replaces_a_file_it_was_not_asked_to(tmp_path, capsys):
    """`import-official` silently replaced an existing checkpoint (a trained model lost), and even the .pth it
    was importing when given as its own output."""
    ours = MambaHoME(ModelConfig.preset("tiny", num_classes=2)).eval()
    pth = tmp_path / "released.pth"
    torch.save({"state_dict": export_official_state_dict(ours)}, pth)
    released = pth.read_bytes()
    assert cli_main(["import-official", str(pth), str(pth)]) == 2
    assert "replace the released weights" in capsys.readouterr().err
    assert pth.read_bytes() == released
    trained = tmp_path / "trained.safetensors"
    save_checkpoint(trained, MambaHoME(ModelConfig.preset("tiny", num_classes=3)), META)
    before = trained.read_bytes()
    assert cli_main(["import-official", str(pth), str(trained)]) == 2
    assert "--overwrite" in capsys.readouterr().err and trained.read_bytes() == before
    assert cli_main(["import-official", str(pth), str(trained), "--overwrite"]) == 0
    assert load_checkpoint(trained)[0].config.num_classes == 2


def test_official_import_says_a_safetensors_file_needs_no_import(tmp_path):
    """torch.load reads a .safetensors file as a plain dict of our own keys; the import then failed with
    "feature_sizes, depths, experts and group sizes must all be >= 1", naming no file."""
    ours = tmp_path / "ours.safetensors"
    save_checkpoint(ours, MambaHoME(ModelConfig.preset("tiny", num_classes=3)), META)
    with pytest.raises(CheckpointError, match=r"ours\.safetensors is already a napari-mambahome checkpoint"):
        import_official_checkpoint(ours)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(CheckpointError, match=r"other\.safetensors is a safetensors file, not a released"):
        import_official_checkpoint(other)


def test_cli_info_reports_parameters_and_backend(capsys, tmp_path, tiny_model):
    assert cli_main(["info", "--preset", "paper", "--classes", "14"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 170_128_150
    assert info["config"]["num_experts"] == [4, 8, 12, 16]
    assert info["mamba_backend"] in ("torch", "mamba-ssm", "mamba-ssm+causal-conv1d")
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model, META)
    assert cli_main(["info", "--checkpoint", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == tiny_model.num_parameters()
    assert info["metadata"]["class_names"] == META["class_names"]


def test_cli_info_describes_the_network_train_override_would_build(capsys, tmp_path, tiny_model):
    """``info --override`` counts the network ``train --preset P --override K=V`` builds, with train's checks."""
    from engine.config import ModelConfig
    from engine.model.mambahome import MambaHoME

    assert cli_main(["info", "--preset", "tiny", "--override", "use_home=false"]) == 0
    info = json.loads(capsys.readouterr().out)
    plain = MambaHoME(ModelConfig.preset("tiny", num_classes=2, use_home=False)).num_parameters()
    assert info["config"]["use_home"] is False and info["parameters"] == plain
    assert cli_main(["info", "--preset", "tiny", "--override", "bogus=1"]) == 2
    assert "unknown ModelConfig fields: ['bogus']" in capsys.readouterr().err
    assert cli_main(["info", "--preset", "tiny", "--override", "num_classes=5"]) == 2
    assert "--override num_classes: give --classes instead" in capsys.readouterr().err
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_model, META)
    assert cli_main(["info", str(path), "--override", "use_home=false"]) == 2
    assert "--override describe a network to build, and a checkpoint brings its own" in capsys.readouterr().err


def test_header_length_starting_with_pickle_byte_is_still_a_checkpoint(tmp_path, tiny_model):
    # a safetensors header length of 128 mod 256 starts the file with 0x80, a pickle's first byte
    for pad in range(0, 400, 8):
        path = save_checkpoint(tmp_path / "m.safetensors", tiny_model, {**META, "provenance": {"pad": "x" * pad}})
        if path.read_bytes()[0] == 0x80:
            load_checkpoint(path)
            return
    pytest.fail("no header length starting with 0x80 was produced")


def test_checkpoint_file_mode_is_not_private(tmp_path, tiny_model):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "m.safetensors", tiny_model, META)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name", ["dynunet", "segresnet"])
def test_monai_peers_round_trip_including_shared_modules(tmp_path, name):
    # DynUNet registers its blocks twice (skip_layers and the lists), so its state_dict shares tensors
    from engine.networks import build_network

    torch.manual_seed(0)
    model = build_network(name, 1, 3, preset="tiny", **({"patch_size": (32, 32, 32)} if name == "dynunet" else {})).eval()
    path = save_checkpoint(tmp_path / f"{name}.safetensors", model, {"class_names": ["bg", "a", "b"]})
    loaded, meta = load_checkpoint(path)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    if name == "dynunet":
        assert meta["aliases"]  # stored once, restored on load
    shared = dict(loaded.named_parameters())  # still one parameter object for both names
    assert len(shared) == len(dict(model.named_parameters()))
