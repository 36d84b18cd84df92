"""The harness that builds the released Mamba-HoME code beside ours (benchmarks/released.py), on the CPU.

The tests marked ``released_src`` need a checkout of gmum/MambaHoME (``$MAMBAHOME_RELEASED_SRC``, else
``<repo>/.released`` or ``<repo>/../released-src``) and are skipped, saying so, without one; CI has none.
They replace ``mamba_ssm.Mamba`` by our pure-PyTorch Mamba mixer (same constructor, same parameter
names), injected as a ``mamba_ssm`` module for the test only, so the released HoME, GSC and UNETR code
runs on the CPU and can be compared with ours. The other tests need no checkout: they check the clear
errors and the run-time construction patch on a minimal stand-in checkout that has the released
code's constructor bug (written here, labelled as such).
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from benchmarks.released import (ReleasedSourceError, build_released, check_parameter_parity, import_released,
                                 load_our_weights, released_kwargs)
from engine import MambaHoME, ModelConfig
from engine.model.mamba import MambaMixer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MAMBAHOME_SHARED", REPO.parent / "shared"))
OFFICIAL_JSON = SHARED / "paper" / "official-state-dict-14-classes.json"


def released_checkout() -> Path | None:
    """The released checkout to test against, or None. A set ``$MAMBAHOME_RELEASED_SRC`` is used as given
    (a wrong path then fails the tests instead of skipping them)."""
    env = os.environ.get("MAMBAHOME_RELEASED_SRC")
    if env:
        return Path(env)
    for candidate in (REPO / ".released", REPO.parent / "released-src"):
        if (candidate / "src" / "models" / "MambaHoME.py").is_file():
            return candidate
    return None


@pytest.fixture
def torch_mamba_ssm(monkeypatch):
    """``mamba_ssm`` whose ``Mamba`` is our pure-PyTorch mixer; the released modules are forgotten after."""
    fake = types.ModuleType("mamba_ssm")
    fake.Mamba = MambaMixer
    monkeypatch.setitem(sys.modules, "mamba_ssm", fake)
    yield fake
    for name in [n for n in sys.modules if n == "src" or n.startswith("src.")]:
        del sys.modules[name]


@pytest.fixture
def released_src(torch_mamba_ssm, monkeypatch) -> Path:
    src = released_checkout()
    if src is None:
        pytest.skip("no checkout of the released code gmum/MambaHoME (set MAMBAHOME_RELEASED_SRC, or copy it to "
                    f"{REPO / '.released'})")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the import puts the checkout on sys.path
    return src


def cpu_config(classes: int = 3) -> ModelConfig:
    """The ``tiny`` widths with what the released code hard-codes (stem kernel 7, Mamba state 16)."""
    return ModelConfig.preset("tiny", num_classes=classes, stem_kernel=7, d_state=16)


# ----------------------------------------------------------------------------- with the released checkout
def test_released_code_has_the_construction_bug(released_src):
    with pytest.raises(TypeError, match="drop_path_rate"):
        build_released(released_src, cpu_config(), patch=False)


def test_paper_configuration_has_our_parameters_and_the_released_keys(released_src):
    config = ModelConfig.preset("paper", num_classes=14)
    with torch.device("meta"):
        built = build_released(released_src, config)
        ours = MambaHoME(config)
    assert built.patched
    assert check_parameter_parity(built.model, ours) == 170_128_150
    if OFFICIAL_JSON.is_file():  # the key list recorded from the authors' own model
        recorded = {k: tuple(s) for k, s in json.loads(OFFICIAL_JSON.read_text())["state_dict"]}
        assert {k: tuple(v.shape) for k, v in built.model.state_dict().items()} == recorded


def test_bench_gpu_builds_the_released_paper_network(released_src, capsys):
    import benchmarks.bench_gpu as bench

    with torch.device("meta"):
        model = bench.build_released_paper(released_src)
    assert type(model).__module__ == "src.models.MambaHoME"
    assert "parameters: released 170,128,150, ours 170,128,150; construction patch applied: True" in \
        capsys.readouterr().out


def test_released_forward_equals_ours_with_our_weights(released_src):
    torch.manual_seed(0)
    config = cpu_config()
    ours = MambaHoME(config).eval()
    built = build_released(released_src, config)
    released = built.model.eval()
    assert type(released.mamba_encoder).__name__ == "MambaEncoder"  # their class, not a patched subclass
    check_parameter_parity(released, ours)
    load_our_weights(released, ours)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        want, got = ours(x), released(x)
    assert got.shape == (1, 3, 32, 32, 32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert built.version  # a git commit or a hash of the files, for the report


# ----------------------------------------------------------------------------- without it (CI)
def test_not_a_checkout_is_a_clear_error(tmp_path):
    with pytest.raises(ReleasedSourceError, match=str(tmp_path)) as info:
        import_released(tmp_path)
    assert "gmum/MambaHoME" in str(info.value)


def test_missing_mamba_ssm_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "src" / "models").mkdir(parents=True)
    (tmp_path / "src" / "models" / "MambaHoME.py").write_text("from mamba_ssm import Mamba\n")
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # import mamba_ssm raises ImportError
    with pytest.raises(ReleasedSourceError, match="mamba_ssm") as info:
        import_released(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_paper_preset_maps_onto_the_released_defaults():
    kw = released_kwargs(ModelConfig.preset("paper", num_classes=14))
    assert kw == dict(in_chans=1, out_chans=14, depths=[2, 2, 2, 2], feat_size=[48, 96, 192, 384], hidden_size=768,
                      expert_mult=2, moe_dropout=0.0, num_slots_per_expert_first=4, experts_list=[4, 8, 12, 16],
                      experts_list_second=[8, 16, 24, 32], group_list=[2048, 1024, 512, 256])
    with pytest.raises(ReleasedSourceError, match="stem_kernel"):
        released_kwargs(ModelConfig.preset("tiny"))


# A stand-in checkout, NOT the released code: just its constructor bug (an argument passed on that the
# encoder does not take) and its import layout (``src.models...``, ``from mamba_ssm import Mamba``).
STAND_IN = '''
from torch import nn
from mamba_ssm import Mamba
from src.models.parts import width


class MambaEncoder(nn.Module):
    def __init__(self, in_chans=1, dims=(4,){extra}):
        super().__init__()
        self.conv = nn.Conv3d(in_chans, width(dims), 1)


class MambaHoME(nn.Module):
    def __init__(self, in_chans=1, out_chans=2, feat_size=(4,), drop_path_rate=0, layer_scale_init_value=1e-6,
                 **unused):
        super().__init__()
        self.mamba_encoder = MambaEncoder(in_chans=in_chans, dims=feat_size, drop_path_rate=drop_path_rate,
                                          layer_scale_init_value=layer_scale_init_value)
        self.out = nn.Conv3d(width(feat_size), out_chans, 1)
'''


def stand_in_checkout(root: Path, fixed: bool = False) -> Path:
    models = root / "src" / "models"
    models.mkdir(parents=True)
    (models / "parts.py").write_text("def width(dims):\n    return dims[0]\n")
    extra = ", drop_path_rate=0, layer_scale_init_value=1e-6" if fixed else ""
    (models / "MambaHoME.py").write_text(textwrap.dedent(STAND_IN).format(extra=extra))
    return root


def test_construction_patch_is_applied_only_while_building(tmp_path, torch_mamba_ssm, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    src = stand_in_checkout(tmp_path / "buggy")
    config = ModelConfig.preset("paper", num_classes=5)
    with pytest.raises(TypeError, match="drop_path_rate"):
        build_released(src, config, patch=False)
    built = build_released(src, config)
    assert built.patched and built.version.startswith("sha256:")
    module = sys.modules["src.models.MambaHoME"]
    assert isinstance(built.model.mamba_encoder, module.MambaEncoder)
    assert module.MambaEncoder.__name__ == "MambaEncoder"  # the name is restored after construction
    with pytest.raises(TypeError, match="drop_path_rate"):
        module.MambaHoME(out_chans=5)
    # a release that accepts the two arguments is built as it is; the new path replaces the old import
    fixed = build_released(stand_in_checkout(tmp_path / "fixed", fixed=True), config)
    assert not fixed.patched
    assert Path(sys.modules["src.models.MambaHoME"].__file__).is_relative_to(tmp_path / "fixed")


def test_a_different_src_package_is_refused(tmp_path, torch_mamba_ssm, monkeypatch):
    other = types.ModuleType("src")
    other.__path__ = [str(tmp_path / "other_project" / "src")]
    monkeypatch.setitem(sys.modules, "src", other)
    with pytest.raises(ReleasedSourceError, match="different package named 'src'"):
        import_released(stand_in_checkout(tmp_path / "buggy"))


def test_unequal_parameter_counts_are_refused():
    with pytest.raises(ReleasedSourceError, match="not the same network"):
        check_parameter_parity(torch.nn.Linear(3, 4), torch.nn.Linear(3, 5))


# ----------------------------------------------------------------------------- bench_gpu's bookkeeping (CI)
def table_rows(report: str, heading: str) -> list:
    """The rows of the markdown table under ``## heading...`` as dicts of column -> cell."""
    lines = report.split(f"## {heading}", 1)[1].splitlines()
    end = next((i for i, line in enumerate(lines[2:], 2) if line.startswith("## ")), len(lines))
    table = [line for line in lines[1:end] if line.startswith("|")]
    columns = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]]


@pytest.fixture
def fake_gpu_bench(monkeypatch):
    """bench_gpu with its measurements replaced by fixed numbers (no GPU, no timing): the order of the
    calls is recorded; ours takes 200 ms a step and 4 s a volume, the released code 500 ms and 6 s."""
    import benchmarks.bench_gpu as bench

    calls = []
    seconds = {"mambahome": (0.2, 4.0), "released": (0.5, 6.0)}

    def train(name, size, dtype, reps, dev, released_src):
        calls.append(("train", size, dtype, name))
        return {"network": name, "patch": f"2 x 1 x {size}^3", "dtype": dtype, "_times": [seconds[name][0]] * reps,
                "peak (GiB)": 1.0, "reserved (GiB)": 2.0, "params (M)": 170.1, "first step (s)": 1.0, "note": ""}

    def infer(name, dtype, reps, dev, released_src):
        calls.append(("infer", 512, dtype, name))
        return {"network": name, "volume": "1 x 1 x 512 x 512 x 128", "dtype": dtype, "repeats": reps,
                "_times": [seconds[name][1]] * reps, "min (s)": seconds[name][1], "peak (GiB)": 1.0,
                "reserved (GiB)": 2.0, "first call (s)": 9.0, "note": ""}

    monkeypatch.setattr(bench, "measure_train", train)
    monkeypatch.setattr(bench, "measure_infer", infer)
    monkeypatch.setattr(bench, "environment", lambda dev: {"device": "none (test)"})
    return bench, calls


def test_bench_gpu_interleaves_the_released_code_with_ours(fake_gpu_bench, tmp_path, torch_mamba_ssm, monkeypatch):
    bench, calls = fake_gpu_bench
    monkeypatch.setattr(sys, "path", list(sys.path))
    src = stand_in_checkout(tmp_path / "released")
    out = tmp_path / "report.md"
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--released-src", str(src), "--networks", "mambahome",
                                      "--sizes", "96", "--dtypes", "bf16", "--out", str(out)])
    bench.main()
    assert calls == [("train", 96, "bf16", "mambahome"), ("train", 96, "bf16", "released"),
                     ("train", 96, "bf16", "released"), ("train", 96, "bf16", "mambahome"),
                     ("infer", 512, "bf16", "mambahome"), ("infer", 512, "bf16", "released"),
                     ("infer", 512, "bf16", "released"), ("infer", 512, "bf16", "mambahome")]
    report = out.read_text()
    train = {r["network"]: r for r in table_rows(report, "Training step")}
    assert train["mambahome"]["released / ours"] == "2.5" and train["mambahome"]["rounds"] == "2"
    assert train["released"]["step (ms)"] == "500" and train["released"]["ours / this"] == "0.4"
    infer = {r["network"]: r for r in table_rows(report, "Sliding-window inference")}
    assert infer["mambahome"]["released / ours"] == "1.5" and infer["mambahome"]["repeats"] == "4"
    assert "measured in this run" in report and "drop_path_rate" in report and "H100" not in report


def test_bench_gpu_without_the_released_code_labels_the_h100_constants(fake_gpu_bench, tmp_path, monkeypatch):
    bench, calls = fake_gpu_bench
    out = tmp_path / "report.md"
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--networks", "mambahome", "--sizes", "96", "--dtypes", "fp32",
                                      "--no-infer", "--out", str(out)])
    bench.main()
    assert [c[-1] for c in calls] == ["mambahome"]  # one round, nothing else measured
    (row,) = table_rows(out.read_text(), "Training step")
    assert row["released / ours (H100 constants, not this GPU)"] == "2.71"  # 542 ms / 200 ms
    assert "H100 constants, not this GPU" in out.read_text()


def test_bench_gpu_refuses_a_wrong_released_path_before_measuring(fake_gpu_bench, tmp_path, monkeypatch, capsys):
    bench, calls = fake_gpu_bench
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--released-src", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as info:
        bench.main()
    assert info.value.code == 2 and calls == []
    assert f"{tmp_path / 'nowhere'} is not a checkout of the released Mamba-HoME code" in capsys.readouterr().err
