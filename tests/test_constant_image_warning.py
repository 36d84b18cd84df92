"""A blank or constant scan is normalised to zeros with a warning a user can read (not MONAI's "Divide by zero")."""
import pytest
import torch

from engine.preprocess import PAPER_INTENSITY, normalize_intensity_


@pytest.mark.parametrize("value", [0.0, 412.5])
def test_a_constant_image_warns_in_words_and_becomes_zero(value):
    t = torch.full((8, 9, 10), value, dtype=torch.float32)
    with pytest.warns(UserWarning, match=r"percentile range holds one value .*blank or nearly constant") as record:
        out = normalize_intensity_(t, PAPER_INTENSITY["MR"])
    assert not any("Divide by zero" in str(w.message) for w in record)
    assert torch.count_nonzero(out) == 0


def test_an_image_with_contrast_gives_no_warning(recwarn):
    t = torch.arange(1000, dtype=torch.float32).reshape(10, 10, 10)
    out = normalize_intensity_(t, PAPER_INTENSITY["MR"])
    assert not [w for w in recwarn if "one value" in str(w.message)]
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
