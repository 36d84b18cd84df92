"""The Mamba-HoME model: parameter parity with the released code, shapes, errors, scan and HoME correctness."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import MambaHoME, ModelConfig
from engine.model import scan as scan_module
from engine.model import HierarchicalSoftMoE, MambaMixer, home_reference, linear_scan, selective_scan_torch
from engine.model.mambahome import drop_path_rates
from engine.official import official_key_map
from monai.networks.layers import DropPath

SHARED = Path(os.environ.get("MAMBAHOME_SHARED", Path(__file__).resolve().parents[2] / "shared"))
OFFICIAL_JSON = SHARED / "paper" / "official-state-dict-14-classes.json"


def meta_model(config: ModelConfig) -> MambaHoME:
    with torch.device("meta"):
        return MambaHoME(config)


# ----------------------------------------------------------------------------- parity with the release
@pytest.mark.parametrize("classes", [1, 2, 14, 105])
def test_paper_preset_parameter_count(classes):
    model = meta_model(ModelConfig.preset("paper", num_classes=classes))
    assert model.num_parameters() == 170_127_464 + 49 * classes


def test_paper_preset_matches_released_defaults():
    c = ModelConfig.preset("paper", num_classes=14)
    assert c.feature_sizes == (48, 96, 192, 384) and c.hidden_size == 768 and c.depths == (2, 2, 2, 2)
    assert (c.d_state, c.d_conv, c.expand) == (16, 4, 2)
    assert c.num_experts == (4, 8, 12, 16) and c.num_experts_second == (8, 16, 24, 32)
    assert c.group_sizes == (2048, 1024, 512, 256) and c.num_slots == 4 and c.expert_mult == 2
    assert c.home_variant == "official"


@pytest.mark.skipif(not OFFICIAL_JSON.is_file(), reason="shared paper folder not present")
def test_every_released_key_maps_to_ours():
    released = json.loads(OFFICIAL_JSON.read_text())
    model = meta_model(ModelConfig.preset("paper", num_classes=14))
    own = model.state_dict()
    mapping = official_key_map(model)
    released_keys = {k: tuple(s) for k, s in released["state_dict"]}
    assert set(released_keys) == set(mapping), "key sets differ"
    for key, shape in released_keys.items():
        ours, e = mapping[key]
        tensor = own[ours] if e is None else own[ours][e]
        assert tuple(tensor.shape) == shape, key
    # and nothing of ours is left unmapped
    assert {ours for ours, _ in mapping.values()} == set(own)
    assert sum(torch.Size(s).numel() for s in released_keys.values()) == released["parameters"]


# ----------------------------------------------------------------------------- shapes and errors
@pytest.mark.parametrize("preset,shape", [
    ("tiny", (32, 32, 32)), ("tiny", (32, 48, 64)), ("small", (32, 32, 32)), ("paper", (32, 32, 32)),
])
def test_forward_shapes(preset, shape):
    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset(preset, in_channels=2, num_classes=3)).eval()
    x = torch.randn(1, 2, *shape)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, *shape)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("in_channels,kernel,stride", [(1, 7, 2), (1, 3, 1), (3, 1, 1)])
def test_narrow_input_conv_unfolded_path_equals_the_convolution(in_channels, kernel, stride):
    from engine.model.mambahome import NarrowInputConv3d

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(in_channels, 6, kernel, stride, kernel // 2).double()
    narrow = NarrowInputConv3d.from_conv(conv)
    assert narrow.weight is conv.weight and narrow.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(2, in_channels, 9, 10, 11, dtype=torch.float64)
    y = narrow.unfolded_forward(x)  # what runs compiled on CUDA, here eagerly on the CPU
    assert narrow(x).is_contiguous()  # eager: nn.Conv3d's own forward
    assert torch.allclose(y, conv(x), atol=1e-12)
    (weight_grad,) = torch.autograd.grad(y.square().sum(), narrow.weight)
    assert weight_grad.shape == conv.weight.shape
    assert torch.allclose(weight_grad, torch.autograd.grad(conv(x).square().sum(), conv.weight)[0], atol=1e-9)


def test_image_facing_convolutions_are_narrow_input_convs_with_their_keys():
    from engine.model.mambahome import NarrowInputConv3d

    model = meta_model(ModelConfig.preset("paper", num_classes=14))
    narrow = {n for n, m in model.named_modules() if isinstance(m, NarrowInputConv3d)}
    assert narrow == {"mamba_encoder.downsample_layers.0.0", "encoder1.layer.conv1.conv", "encoder1.layer.conv3.conv"}
    wide_input = meta_model(ModelConfig.preset("tiny", in_channels=5))
    assert not any(isinstance(m, NarrowInputConv3d) for m in wide_input.modules())


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_forward_both_variants_and_ablations(variant):
    for overrides in ({}, {"use_home": False}, {"use_mamba": False, "use_home": False}):
        model = MambaHoME(ModelConfig.preset("tiny", num_classes=2, home_variant=variant, **overrides)).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 1, 32, 32, 32)).shape == (2, 2, 32, 32, 32)


@pytest.mark.parametrize("shape,match", [
    ((1, 1, 30, 32, 32), "multiples of 16"),
    ((1, 1, 32, 32, 8), "multiples of 16"),
    ((1, 2, 32, 32, 32), "input channel"),
    ((1, 32, 32, 32), "5D"),
    ((1, 1, 1, 32, 32, 32), "5D"),
])
def test_invalid_inputs_raise_value_error(shape, match):
    model = MambaHoME(ModelConfig.preset("tiny", num_classes=2))
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


@pytest.mark.parametrize("kwargs,match", [
    (dict(home_variant="bogus"), "home_variant"),
    (dict(feature_sizes=(8, 16, 32)), "4 stages"),
    (dict(num_experts=(2, 2, 2)), "num_experts"),
    (dict(dropout=1.5), "dropout"),
    (dict(drop_path=1.0), "drop_path"),
    (dict(drop_path=-0.1), "drop_path"),
    (dict(drop_path="abc"), "drop_path must be a number"),  # --override drop_path=abc: a TypeError before
    (dict(dropout=True), "dropout must be a number"),
])
def test_invalid_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.preset("tiny", **kwargs)


def test_drop_path_rates_rise_linearly_to_the_deepest_layer():
    rates = drop_path_rates(ModelConfig.preset("small", drop_path=0.3))  # depths (2, 2, 2, 2)
    flat = [r for stage in rates for r in stage]
    assert [len(stage) for stage in rates] == [2, 2, 2, 2]
    assert flat[0] == 0.0 and flat[-1] == pytest.approx(0.3)
    assert all(b - a == pytest.approx(0.3 / 7) for a, b in zip(flat, flat[1:]))
    assert drop_path_rates(ModelConfig.preset("tiny", depths=(1, 1, 1, 1), drop_path=0.2))[3] == [pytest.approx(0.2)]


def test_drop_path_acts_in_training_only_and_keeps_the_weights_layout():
    torch.manual_seed(0)
    plain = MambaHoME(ModelConfig.preset("tiny", num_classes=2))
    dropped = MambaHoME(ModelConfig.preset("tiny", num_classes=2, drop_path=0.5))
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # checkpoints load either way
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 32, 32, 32)
    plain.eval(), dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), dropped(x))  # inference uses every branch
    plain.train(), dropped.train()
    torch.manual_seed(1)
    with torch.no_grad():
        a, b = plain(x), dropped(x)
    # some sample skipped some branch: its output differs from the full network's
    assert not torch.allclose(a, b)
    layer = dropped.mamba_encoder.mamba_blocks[3][0]
    assert isinstance(layer.drop_path, DropPath) and layer.drop_path.drop_prob == pytest.approx(0.5)


def test_unknown_preset_and_config_json_round_trip():
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("huge")
    c = ModelConfig.preset("small", in_channels=2, num_classes=5, home_variant="paper")
    assert ModelConfig.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**c.to_dict(), "bogus": 1})


# ----------------------------------------------------------------------------- selective scan
def recurrence_reference(u, delta, A, B, C, D, z, delta_bias):
    """The SSM written as the step-by-step recurrence it is."""
    delta = F.softplus(delta + delta_bias[None, :, None])
    b, d, length = u.shape
    h = torch.zeros(b, d, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) + D[None, :, None] * u
    return y * F.silu(z)


def random_scan_inputs(length, dtype, seed=0, b=2, d=5, n=4):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(u=r(b, d, length), delta=r(b, d, length), A=-torch.rand(d, n, generator=g, dtype=dtype) * 4,
                B=r(b, n, length), C=r(b, n, length), D=r(d), z=r(b, d, length), delta_bias=r(d))


def assert_same_gradients(y_fast, a, y_ref, b, tol):
    """Backpropagate one random cotangent through both scans; every input's gradient must agree."""
    grad_out = torch.randn_like(y_ref)
    (y_fast * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    for k in a:
        scale = b[k].grad.abs().max().clamp(min=1.0)
        assert torch.allclose(a[k].grad, b[k].grad, atol=tol * scale, rtol=tol), k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [1, 7, 32, 33, 200, 1100])
def test_scan_matches_recurrence_forward_and_gradients(dtype, length):
    inputs = random_scan_inputs(length, dtype)
    a = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    b = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y_fast = selective_scan_torch(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"],
                                  delta_softplus=True)
    y_ref = recurrence_reference(**b)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert torch.allclose(y_fast, y_ref, atol=tol, rtol=tol)
    assert_same_gradients(y_fast, a, y_ref, b, tol)


def test_scan_is_stable_for_large_steps():
    # cumulative-product scans overflow here; ours only ever exponentiates non-positive numbers
    log_a = torch.full((1, 4096, 2), -50.0)
    b = torch.ones(1, 4096, 2)
    h = linear_scan(log_a, b)
    assert torch.isfinite(h).all() and torch.allclose(h, torch.ones_like(h))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk,length", [(4, 150), (8, 257), (32, 1100)])
def test_scan_across_segments_matches_recurrence(monkeypatch, dtype, chunk, length):
    # tiny segments: the state (forward) and the adjoint (backward) are carried across many segments
    monkeypatch.setattr(scan_module, "STEP_ELEMENTS", 2 * 5 * 4)
    inputs = random_scan_inputs(length, dtype, seed=1)
    a = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    b = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y_fast = selective_scan_torch(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"],
                                  delta_softplus=True, chunk=chunk)
    y_ref = recurrence_reference(**b)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert torch.allclose(y_fast, y_ref, atol=tol, rtol=tol)
    with torch.no_grad():  # the memory-lean inference path gives the same result
        y_nograd = selective_scan_torch(*(inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                                        delta_softplus=True, chunk=chunk)
    assert torch.equal(y_nograd, y_fast.detach())
    assert_same_gradients(y_fast, a, y_ref, b, tol)


@pytest.mark.parametrize("segment_elements", [None, 2 * 3 * 4])
def test_scan_hand_written_backward_passes_gradcheck(monkeypatch, segment_elements):
    if segment_elements is not None:
        monkeypatch.setattr(scan_module, "STEP_ELEMENTS", segment_elements)
    inputs = random_scan_inputs(37, torch.float64, seed=2, b=2, d=3, n=4)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    args = tuple(inputs[k].clone().requires_grad_(True) for k in names)

    def fn(*xs):
        return selective_scan_torch(*xs, delta_softplus=True, chunk=4)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-6)
    # also without softplus / D / z (the raw core), delta kept positive so decays stay <= 1
    u, delta, A, B, C = (inputs[k].clone() for k in names[:5])
    raw = (u.requires_grad_(True), F.softplus(delta).requires_grad_(True), A.requires_grad_(True),
           B.requires_grad_(True), C.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda *xs: selective_scan_torch(*xs, chunk=4), raw, eps=1e-6, atol=1e-7,
                                    rtol=1e-6)


def test_mixer_has_mamba_ssm_parameter_layout():
    mixer = MambaMixer(48)
    shapes = {k: tuple(v.shape) for k, v in mixer.state_dict().items()}
    assert shapes == {
        "A_log": (96, 16), "D": (96,), "in_proj.weight": (192, 48), "conv1d.weight": (96, 1, 4),
        "conv1d.bias": (96,), "x_proj.weight": (35, 96), "dt_proj.weight": (96, 3), "dt_proj.bias": (96,),
        "out_proj.weight": (48, 96),
    }


def mixer_reference(mixer: MambaMixer, h: torch.Tensor) -> torch.Tensor:
    """mamba-ssm's ``Mamba.forward`` slow path, token-major with ``F.linear``, and the recurrence."""
    xz = F.linear(h, mixer.in_proj.weight).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    x = F.silu(mixer.conv1d(x)[..., :h.shape[1]])
    x_dbl = F.linear(x.transpose(1, 2), mixer.x_proj.weight)
    dt, B, C = torch.split(x_dbl, [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt = F.linear(dt, mixer.dt_proj.weight).transpose(1, 2)
    y = recurrence_reference(x, dt, -torch.exp(mixer.A_log), B.transpose(1, 2), C.transpose(1, 2), mixer.D, z,
                             mixer.dt_proj.bias)
    return F.linear(y.transpose(1, 2), mixer.out_proj.weight)


@pytest.mark.parametrize("channel_major_input", [False, True])
def test_mixer_equals_straightforward_reference_forward_and_gradients(channel_major_input):
    torch.manual_seed(0)
    mixer = MambaMixer(8, d_state=4).double()
    h = torch.randn(2, 8, 37, dtype=torch.float64)  # (B, d, L): the encoder hands its tokens over as this view
    h = h.transpose(1, 2) if channel_major_input else h.transpose(1, 2).contiguous()
    h.requires_grad_(True)
    y = mixer(h)
    ref_mixer = MambaMixer(8, d_state=4).double()
    ref_mixer.load_state_dict(mixer.state_dict())
    h_ref = h.detach().clone().requires_grad_(True)
    y_ref = mixer_reference(ref_mixer, h_ref)
    assert y.shape == y_ref.shape == h.shape and y.is_contiguous()
    assert torch.allclose(y, y_ref, atol=1e-10)
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-10)
    ref_params = dict(ref_mixer.named_parameters())
    for name, p in mixer.named_parameters():
        assert torch.allclose(p.grad, ref_params[name].grad, atol=1e-9), name


def test_mixer_torch_backend_reports_and_is_causal():
    torch.manual_seed(0)
    mixer = MambaMixer(16, d_state=8)
    x = torch.randn(2, 50, 16)
    y = mixer(x)
    assert mixer.last_backend == "torch" and y.shape == x.shape
    x2 = x.clone()
    x2[:, 30:] += 1.0  # a change in the future must not change the past
    y2 = mixer(x2)
    assert torch.allclose(y[:, :30], y2[:, :30], atol=1e-6)
    assert not torch.allclose(y[:, 30:], y2[:, 30:])
    with pytest.raises(RuntimeError):
        mixer(x, backend="cuda")  # no CUDA here (or no CUDA tensor)
    with pytest.raises(ValueError):
        MambaMixer(16, backend="fast")


# ----------------------------------------------------------------------------- HoME
def make_home(variant, d=16, k=8, e=2, e2=4, s=2, seed=0):
    torch.manual_seed(seed)
    layer = HierarchicalSoftMoE(d, k, e, e2, s, variant=variant)
    with torch.no_grad():  # non-trivial gates so the test sees them
        if variant == "official":
            layer.expert_gates.uniform_(0.5, 1.5)
        for p in layer.parameters():
            if p.ndim == 1 and p.shape[0] == d:
                p.add_(0.1 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_home_equivariant_to_permutations_inside_a_group(variant):
    layer = make_home(variant).double()
    x = torch.randn(2, 19, 16, dtype=torch.float64)  # 3 groups of 8, the last one padded
    perm = torch.arange(19)
    perm[8:16] = perm[8:16][torch.randperm(8)]  # shuffle inside the second group
    perm[16:] = perm[16:].flip(0)  # and inside the padded last group
    y = layer(x)
    y_perm = layer(x[:, perm])
    assert torch.allclose(y_perm, y[:, perm], atol=1e-12)


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_home_padded_and_masked_tokens_get_zero_weight(variant):
    layer = make_home(variant)
    x = torch.randn(2, 13, 16)
    w = layer.slot_weights(x)  # (B, G, K, M), 13 tokens -> 2 groups of 8
    assert w.shape == (2, 2, 8, 4)
    flat = w.reshape(2, 16, 4)
    assert torch.all(flat[:, 13:] == 0)
    assert torch.all(flat[:, :13].sum(-1) > 0)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[:, 5] = False
    assert torch.all(layer.slot_weights(x, mask).reshape(2, 16, 4)[:, 5] == 0)
    # a masked token's content cannot change the other tokens' outputs
    x2 = x.clone()
    x2[:, 5] = 100.0
    keep = mask[0]
    assert torch.allclose(layer(x, mask)[:, keep], layer(x2, mask)[:, keep], atol=1e-5)


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63])
def test_home_any_length_finite(variant, n):
    layer = make_home(variant)
    y = layer(torch.randn(3, n, 16))
    assert y.shape == (3, n, 16) and torch.isfinite(y).all()


@pytest.mark.parametrize("n", [5, 64, 77])
def test_batched_home_equals_per_expert_reference(n):
    layer = make_home("official", d=24, k=16, e=3, e2=5, s=2).double()
    x = torch.randn(2, n, 24, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    grads = {k: p.grad.clone() for k, p in layer.named_parameters()}
    layer.zero_grad()
    y_ref = home_reference(layer, x_ref)
    (y_ref * grad_out).sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-10)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-10)
    for k, p in layer.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-10), k


def test_batched_home_equals_reference_float32_within_1e5():
    layer = make_home("official", d=48, k=64, e=4, e2=8, s=4)
    x = torch.randn(2, 300, 48, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = layer(x), home_reference(layer, xr)
    assert torch.allclose(y, yr, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = {k: p.grad.clone() for k, p in layer.named_parameters()}
    layer.zero_grad()
    (yr * g).sum().backward()

    def rel(a, b):  # gradients sum thousands of fp32 terms: compare relative to the tensor's size
        # (the expert and group gates scale whole slot tokens, which the second level's RMSNorm divides
        # out: their true gradient is 0 and the computed one is rounding noise, so floor the scale)
        return ((a - b).norm() / b.norm().clamp(min=1.0)).item()

    # forward within 1e-5; gradients reduce over all tokens in a different order, which in fp32 gives
    # ~1e-5 relative differences (the float64 test above shows the two computations are identical)
    assert rel(x.grad, xr.grad) < 3e-5
    for k, p in layer.named_parameters():
        assert rel(grads[k], p.grad) < 3e-5, k


@pytest.mark.parametrize("kwargs", [dict(variant="x"), dict(group_size=0), dict(num_slots=0)])
def test_home_invalid_arguments(kwargs):
    args = dict(dim=8, group_size=4, num_experts=2, num_experts_second=2, num_slots=2)
    args.update(kwargs)
    with pytest.raises(ValueError):
        HierarchicalSoftMoE(**args)
    with pytest.raises(ValueError):
        HierarchicalSoftMoE(8, 4, 2, 2, 2)(torch.randn(2, 5, 9))


# ----------------------------------------------------------------------------- training signal
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_every_parameter_gets_a_gradient(variant):
    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset("tiny", num_classes=3, home_variant=variant))
    y = model(torch.randn(2, 1, 32, 32, 32))
    (y.square().mean() + y[:, 1].mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert missing == []


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset("tiny", num_classes=2)).double()
    x = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    model(x).sum().backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(g1[n], p.grad, atol=1e-9), n


# ----------------------------------------------------------------------------- compiled regions
def test_compiled_regions_give_eager_outputs_and_gradients():
    """compile_regions (what `--compile` runs) with dynamo + AOT autograd and no code generation, so CI
    needs no C compiler; inductor is checked against eager on the GPU (tests/test_gpu.py)."""
    import torch._dynamo

    from engine.model import compile_regions, compiled_regions, decompile_regions
    from engine.model.compiled import region_types

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset("tiny", num_classes=3))
    keys = list(model.state_dict())
    x = torch.randn(2, 1, 32, 32, 32)
    results = []
    for compiled in (False, True):
        if compiled:
            assert compile_regions(model, backend="aot_eager") is model
            assert compile_regions(model, backend="aot_eager") is model  # a second call changes nothing
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.square().mean().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    regions = compiled_regions(model)
    kinds = {type(m).__name__ for m in regions}
    assert {"GSC", "MambaLayer", "HoMELayer", "UnetrBasicBlock", "UnetrUpBlock"} <= kinds
    assert all(isinstance(m, region_types()) for m in regions)
    assert list(model.state_dict()) == keys  # checkpoints of a compiled model load into an eager one
    (y_eager, g_eager), (y_comp, g_comp) = results
    torch.testing.assert_close(y_comp, y_eager, atol=1e-5, rtol=1e-5)
    for name, grad in g_eager.items():
        torch.testing.assert_close(g_comp[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    decompile_regions(model)
    assert not compiled_regions(model) and all("forward" not in vars(m) for m in regions)


def test_compiled_regions_with_gradient_checkpointing_give_eager_gradients():
    """--compile with --gradient-checkpointing: checkpointing wraps the compiled Mamba/HoME regions and
    recomputes them in the backward pass; the gradients stay those of the plain eager network."""
    import torch._dynamo

    from engine.model import compile_regions, decompile_regions

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset("tiny", num_classes=3))
    x = torch.randn(1, 1, 32, 32, 32)
    grads = []
    for fast in (False, True):
        if fast:
            compile_regions(model, backend="aot_eager")
            model.set_gradient_checkpointing(True)
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    decompile_regions(model)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compile_regions_whole_network_is_one_region_and_channels_last_is_undone():
    from engine.model import compile_regions, compiled_regions, decompile_regions

    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset("tiny", num_classes=2)).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = model(x)
        compile_regions(model, backend="eager", whole=True, channels_last=True)
        assert compiled_regions(model) == [model]
        assert model.encoder1.layer.conv1.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        assert torch.allclose(model(x), expected, atol=1e-5)
    decompile_regions(model)
    assert "forward" not in vars(model)
    assert all(p.is_contiguous() for p in model.parameters())  # safetensors saves contiguous tensors only


# ----------------------------------------------------------------------------- CUDA graphs (CPU side)
def test_cuda_graphed_runs_eagerly_off_the_gpu_and_checks_its_arguments():
    """On CPU tensors (or when disabled) CudaGraphed is the function itself; the capture path is tested
    on the GPU (tests/test_gpu.py)."""
    from engine.model.graphs import CudaGraphed

    calls = []

    def double(x):
        calls.append(x.shape)
        return 2 * x

    for enabled in (None, False):
        graphed = CudaGraphed(double, warmup=1, enabled=enabled)
        for i in range(3):
            x = torch.full((2, 3), float(i))
            assert torch.equal(graphed(x), 2 * x)
        assert graphed.captured == 0 and graphed.replays == 0 and graphed.failure is None
    assert len(calls) == 6
    with pytest.raises(ValueError, match="warmup"):
        CudaGraphed(double, warmup=0)
    with pytest.raises(ValueError, match="max_graphs"):
        CudaGraphed(double, max_graphs=0)
