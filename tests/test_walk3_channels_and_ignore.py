"""Two dataset.json settings that trained silently wrong are refused, naming the file and the way out.

Found by a new user's walk over dataset layouts: a CT + PET set normalised the PET channel by the CT window
(SUV 0-15 squeezed into 0.41-0.44 of the network's range), and nnU-Net v2's "ignore" label was learnt as a class.
"""
import json

import pytest

from engine.datasets import DatasetError, load_dataset
from engine.synth import write_phantom_dataset


@pytest.fixture
def dataset(tmp_path):
    return write_phantom_dataset(tmp_path / "Dataset001_P", cases=2, shape=(16, 16, 16), seed=2)


def _edit(root, **changes):
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("channels", [{"0": "CT", "1": "PET"}, {"0": "CT", "1": "T2"}, {"0": "T1", "1": "US"}])
def test_channels_of_different_kinds_are_refused_before_training(dataset, channels):
    _edit(dataset, channel_names=channels)
    with pytest.raises(DatasetError, match=r"dataset.json: the channels are of different kinds .*name every channel "
                                           r"of one kind") as info:
        load_dataset(dataset)
    assert repr(channels["1"]) in str(info.value)


@pytest.mark.parametrize("channels", [{"0": "T2W", "1": "ADC", "2": "HBV"}, {"0": "T1", "1": "zscore"}])
def test_mr_channels_beside_other_names_share_their_rule_and_are_read(dataset, channels):
    _edit(dataset, channel_names=channels)
    for case in sorted((dataset / "imagesTr").glob("*_0000.nii.gz")):
        for c in range(1, len(channels)):
            (case.parent / case.name.replace("_0000", f"_{c:04d}")).write_bytes(case.read_bytes())
    assert load_dataset(dataset).channel_names == list(channels.values())


def test_channels_of_one_kind_are_read(dataset):
    _edit(dataset, channel_names={"0": "T1", "1": "FLAIR"})
    for case in sorted((dataset / "imagesTr").glob("*_0000.nii.gz")):
        (case.parent / case.name.replace("_0000", "_0001")).write_bytes(case.read_bytes())
    ds = load_dataset(dataset)
    assert ds.channel_names == ["T1", "FLAIR"] and ds.modality == "MR"


@pytest.mark.parametrize("labels", [{"background": 0, "organ": 1, "ignore": 2}, {"0": "background", "1": "Ignore"}])
def test_nnunet_ignore_label_is_refused_naming_it(dataset, labels):
    _edit(dataset, labels=labels)
    with pytest.raises(DatasetError, match=r"nnU-Net's ignore label .*not supported"):
        load_dataset(dataset)
