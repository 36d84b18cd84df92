"""GPU-only checks: mamba-ssm kernels against our PyTorch twin, batched HoME on the GPU, the full model.

Run on the GPU machine: ``python -m pytest -m gpu tests/test_gpu.py``. Where no CUDA device (or no
mamba-ssm) exists these tests are skipped and reported as skipped; their CPU twins run in CI
(tests/test_model.py).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine import MambaHoME, ModelConfig
from engine.model import HierarchicalSoftMoE, MambaMixer, cuda_kernels_available, home_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_kernels = pytest.mark.skipif(not cuda_kernels_available(), reason="needs mamba-ssm CUDA kernels")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    # floor the scale: some true gradients are exactly 0 (HoME gates, see docs/MODEL.md) and computed as noise
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1.0)).item()


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("d_model,length", [(48, 4096), (96, 1000), (384, 216)])
def test_mixer_kernel_matches_torch_forward_and_gradients(dtype, tol, d_model, length):
    torch.manual_seed(0)
    mixer = MambaMixer(d_model).cuda()
    x = torch.randn(2, length, d_model, device="cuda")
    grads, outs = {}, {}
    for backend in ("cuda", "torch"):
        mixer.zero_grad()
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = mixer(xi, backend=backend)
        assert mixer.last_backend.startswith("cuda") == (backend == "cuda")
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        outs[backend] = y.detach()
        grads[backend] = {"x": xi.grad.detach(), **{n: p.grad.detach().clone() for n, p in mixer.named_parameters()}}
    assert rel_err(outs["cuda"], outs["torch"]) < tol
    for name in grads["torch"]:
        assert rel_err(grads["cuda"][name], grads["torch"][name]) < tol, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [110_592 // 8, 1000])
def test_batched_home_matches_reference_on_gpu(n, dtype):
    torch.manual_seed(0)
    layer = HierarchicalSoftMoE(48, 2048, 4, 8, 4).cuda().to(dtype)
    x = torch.randn(2, n, 48, device="cuda", dtype=dtype, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = {k: p.grad.clone() for k, p in layer.named_parameters()}
    layer.zero_grad()
    yr = home_reference(layer, xr)
    (yr * g).sum().backward()
    if dtype == torch.float64:  # same computation, different summation order only
        assert torch.allclose(y, yr, atol=1e-10)
        assert torch.allclose(x.grad, xr.grad, atol=1e-10)
        for k, p in layer.named_parameters():
            assert torch.allclose(grads[k], p.grad, atol=1e-9), k
    else:
        # fp32: forward within 1e-5; gradients pass through softmaxes over 2048 tokens whose terms
        # cancel, so summation order shows at ~1e-4 of single elements: compare tensor-relative error
        assert torch.allclose(y, yr, atol=1e-5, rtol=1e-4)
        assert rel_err(x.grad, xr.grad) < 1e-4
        for k, p in layer.named_parameters():
            assert rel_err(grads[k], p.grad) < 1e-4, k


@needs_kernels
def test_full_model_kernels_match_torch_backend():
    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset("small", num_classes=3)).cuda().eval()
    x = torch.randn(1, 1, 64, 64, 64, device="cuda")
    with torch.no_grad():
        model.set_mamba_backend("cuda")
        y_cuda = model(x)
        assert all(b.startswith("cuda") for b in model.mamba_backends_used())
        model.set_mamba_backend("torch")
        y_torch = model(x)
    assert rel_err(y_cuda, y_torch) < 1e-3


@pytest.mark.parametrize("bf16,tol", [(False, 1e-5), (True, 3e-2)])
def test_unfolded_narrow_input_convolutions_give_the_plain_model_on_gpu(bf16, tol):
    """The image-facing convolutions as im2col matrix products on CUDA: same network output as Conv3d."""
    from engine.model.mambahome import NarrowInputConv3d

    torch.manual_seed(0)
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    model = MambaHoME(ModelConfig.preset("small", num_classes=3)).cuda().eval()
    narrow = [m for m in model.modules() if isinstance(m, NarrowInputConv3d)]
    x = torch.randn(2, 1, 64, 64, 64, device="cuda")
    outs = []
    try:
        for unfold in (True, False):  # False: every one of them runs nn.Conv3d's own forward
            for m in narrow:
                m.forward = m.unfolded_forward if unfold else super(NarrowInputConv3d, m).forward
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                outs.append(model(x).float())
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert len(narrow) == 3
    assert rel_err(outs[0], outs[1]) < tol


@needs_kernels
def test_compiled_regions_match_eager_forward_and_gradients_on_gpu():
    """compile_regions with inductor (what --compile runs): same outputs and gradients as eager, fp32."""
    import torch._dynamo

    from engine.model import compile_regions, decompile_regions

    torch._dynamo.reset()
    torch.manual_seed(0)
    # full fp32 convolutions: with cuDNN's default TF32 the two runs may pick different algorithms and
    # differ by TF32 rounding (5e-4 relative), which would hide what compilation itself changes
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    model = MambaHoME(ModelConfig.preset("small", num_classes=3)).cuda()
    x = torch.randn(2, 1, 64, 64, 64, device="cuda")
    results = []
    for compiled in (False, True):
        if compiled:
            compile_regions(model)
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.square().mean().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    decompile_regions(model)
    torch.backends.cudnn.allow_tf32 = tf32
    (y_eager, g_eager), (y_comp, g_comp) = results
    assert rel_err(y_comp, y_eager) < 1e-4
    assert max(rel_err(g_comp[n], g_eager[n]) for n in g_eager) < 1e-3


def test_paper_preset_trains_a_step_on_gpu():
    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset("paper", num_classes=3)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(2, 1, 64, 64, 64, device="cuda")
    target = (x > 0.5).long().squeeze(1) + (x > 1.5).long().squeeze(1)
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("spacing", [None, (1.0, 1.3, 2.0)])
def test_source_grid_labels_on_gpu_equal_cpu(spacing):
    """Post-processing runs where the logits are (MONAI's inverse on a CUDA tensor); labels must not change."""
    import numpy as np

    from engine.inference import source_grid_labels
    from engine.io import Volume
    from engine.preprocess import Preprocessing, to_network_space

    affine = np.array([[0, -0.9, 0, 10], [-0.8, 0, 0, -4], [0, 0, 2.0, 3], [0, 0, 0, 1]], dtype=float)
    volume = Volume(data=np.zeros((40, 36, 20), np.float32), affine=affine, spacing=(0.8, 0.9, 2.0), header=None,
                    path=None)
    image, ctx = to_network_space(volume, Preprocessing.for_modality("CT", target_spacing=spacing))
    torch.manual_seed(0)
    logits = torch.randn((6,) + tuple(image.shape[1:])) * 3
    np.testing.assert_array_equal(source_grid_labels(logits.cuda(), ctx), source_grid_labels(logits, ctx))


# ----------------------------------------------------------------------------- CUDA graphs
@needs_kernels
@pytest.mark.parametrize("bf16,tol", [(False, 1e-3), (True, 2e-2)])
def test_cuda_graphed_train_step_gives_eager_loss_and_gradients(bf16, tol):
    """TrainStep replayed as a CUDA graph (what --cuda-graphs runs) against the eager step on twin models,
    batch after batch: new inputs must reach the graph through its static buffers."""
    import copy

    from monai.losses import DiceCELoss

    from engine.train.step import TrainStep

    torch.manual_seed(0)
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    model = MambaHoME(ModelConfig.preset("small", num_classes=3)).cuda().train()
    twin = copy.deepcopy(model)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    eager, graphed = TrainStep(model, loss_fn, bf16=bf16), TrainStep(twin, loss_fn, bf16=bf16, cuda_graphs=True)
    try:
        for _ in range(5):
            x = torch.randn(2, 1, 64, 64, 64, device="cuda")
            y = torch.randint(0, 3, (2, 1, 64, 64, 64), device="cuda")
            loss_e, loss_g = eager(x, y).clone(), graphed(x, y).clone()
            assert abs(loss_g.item() - loss_e.item()) <= tol * abs(loss_e.item())
            worst = max(rel_err(q.grad, p.grad) for p, q in zip(model.parameters(), twin.parameters()))
            assert worst < tol
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert graphed.graphed.failure is None
    assert graphed.graphed.captured == 1 and graphed.graphed.replays == 3  # 2 eager warm-up steps


@needs_kernels
def test_cuda_graphed_train_step_draws_new_drop_path_masks_at_every_replay():
    """Stochastic depth inside a captured step: a graph that replayed its capture's random draws would skip the
    same branches of the same samples at every step. Same weights, same batch: the loss must still vary."""
    from monai.losses import DiceCELoss

    from engine.train.step import TrainStep

    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset("small", num_classes=3, drop_path=0.9)).cuda().train()
    step = TrainStep(model, DiceCELoss(to_onehot_y=True, softmax=True), bf16=True, cuda_graphs=True)
    x = torch.randn(4, 1, 64, 64, 64, device="cuda")
    y = torch.randint(0, 3, (4, 1, 64, 64, 64), device="cuda")
    losses = [step(x, y).item() for _ in range(8)]
    assert step.graphed.failure is None and step.graphed.captured == 1 and step.graphed.replays == 6
    replayed = losses[2:]
    assert all(np.isfinite(replayed)) and len(set(replayed)) > 1, replayed


@needs_kernels
def test_cuda_graphed_windows_equal_eager_for_new_inputs():
    from engine.model.graphs import CudaGraphed

    torch.manual_seed(0)
    model = MambaHoME(ModelConfig.preset("small", num_classes=3)).cuda().eval()

    def forward(windows):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(windows)

    graphed = CudaGraphed(forward, warmup=1)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(2, 1, 64, 64, 48, device="cuda")
            assert rel_err(graphed(x).clone(), forward(x)) < 1e-2
    assert graphed.failure is None and graphed.replays == 3


@needs_kernels
def test_training_run_with_cuda_graphs_follows_the_eager_run(tmp_path):
    """The whole loop (data, TrainStep, AdamW, cosine schedule, validation, checkpoints) with and without
    --cuda-graphs: same seeded patches, so the same losses up to float noise."""
    from engine.checkpoint import load_checkpoint
    from engine.synth import write_phantom_dataset
    from engine.train.config import TrainConfig
    from engine.train.loop import train

    data = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=4, shape=(48, 48, 32), seed=5)
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        runs = [train(TrainConfig(dataset=str(data), out=str(tmp_path / f"run{graphs}"), preset="small",
                                  patch_size=[32, 32, 32], steps=6, val_every=3, val_fraction=0.25, seed=1,
                                  device="cuda", lr=1e-3, cuda_graphs=graphs))
                for graphs in (False, True)]
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    eager, graphed = ([r["loss"] for r in run.history] for run in runs)
    assert len(graphed) == 6 and all(np.isfinite(graphed))
    np.testing.assert_allclose(graphed, eager, rtol=2e-3)
    model, _ = load_checkpoint(runs[1].last_checkpoint)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@needs_kernels
def test_compiled_and_graphed_run_follows_the_eager_run_and_the_next_run_compiles_by_itself(tmp_path, monkeypatch,
                                                                                            capsys):
    """--compile with CUDA graphs (auto on with compilation now) through the whole loop, validation (eager) and
    checkpoints included: the eager run's losses up to float noise; the run marks the cache warm, so a short
    run of the same network and patch compiles by itself (auto), and a run of another patch does not."""
    import engine.train.step
    from engine.synth import write_phantom_dataset
    from engine.train.config import TrainConfig
    from engine.train.loop import train

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(engine.train.step, "COMPILE_WARM_PAYS_STEPS", 1)  # the thresholds are CPU-tested
    data = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=4, shape=(48, 48, 32), seed=5)

    def run(name, **kw):
        base = dict(dataset=str(data), out=str(tmp_path / name), preset="small", patch_size=[32, 32, 32], steps=6,
                    val_every=3, val_fraction=0.25, seed=1, device="cuda", lr=1e-3)
        return train(TrainConfig(**{**base, **kw}))

    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        eager = run("eager", compile=False, cuda_graphs=False)
        compiled = run("compiled", compile=True)
        capsys.readouterr()
        again = run("again", max_minutes=1.0)
        auto_note = capsys.readouterr().err
        other = run("other", max_minutes=1.0, patch_size=[32, 32, 16])
        other_note = capsys.readouterr().err
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    losses = [r["loss"] for r in compiled.history]
    assert len(losses) == 6 and all(np.isfinite(losses))
    np.testing.assert_allclose(losses, [r["loss"] for r in eager.history], rtol=5e-3)
    assert [r["val_dice"] for r in compiled.history if "val_dice" in r]  # validation ran (eagerly) beside it
    assert list((tmp_path / "inductor" / "napari-mambahome-warm").glob("*.json"))
    assert "compiling the network's blocks (auto: this network's compiled kernels are cached" in auto_note
    assert again.steps_done == 6 and "compiling" not in other_note and other.steps_done == 6


@needs_kernels
def test_cuda_graphed_training_with_loader_workers(tmp_path):
    """Capture while the DataLoader's workers and pin-memory thread run (seen on the H200: the default
    global capture mode failed the run with 'operation not permitted when stream is capturing')."""
    from engine.synth import write_phantom_dataset
    from engine.train.config import TrainConfig
    from engine.train.loop import train

    data = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=4, shape=(48, 48, 32), seed=5)
    run = train(TrainConfig(dataset=str(data), out=str(tmp_path / "run"), preset="tiny", patch_size=[32, 32, 32],
                            steps=8, val_every=8, val_fraction=0.25, seed=1, device="cuda", lr=1e-3,
                            cuda_graphs=True, num_workers=2))
    assert run.steps_done == 8 and all(np.isfinite([r["loss"] for r in run.history]))


@needs_kernels
@pytest.mark.parametrize("recipe", ["paper", "nnunet"])  # fused AdamW, fused Nesterov SGD; both clipped
def test_cuda_graphed_loop_stops_at_a_nan_step_with_the_weights_from_before(tmp_path, monkeypatch, recipe):
    """The sync-free loop (engine.train.guard): NaN patches at step 5 of a CUDA-graphed run whose losses are
    read at steps 4 and 8; the optimiser skips steps 5-8 on the device (fused found_inf), the run raises
    naming step 5, and the weights and optimiser state in memory are those step 4 saved, bit for bit."""
    import engine.train.loop as loop
    from engine.synth import write_phantom_dataset
    from engine.train.config import TrainConfig
    from engine.train.resume import load_resume_state

    batch = 2

    class NaNAtStep5(loop.PatchStream):
        def __getitem__(self, index):
            item = super().__getitem__(index)
            if 4 * batch <= index < 5 * batch:
                item["image"] = torch.full_like(item["image"], float("nan"))
            return item

    seen = {}

    class RecordingGuard(loop.StepGuard):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["guard"] = self

    class RecordingStep(loop.TrainStep):
        def __init__(self, model, *args, **kwargs):
            super().__init__(model, *args, **kwargs)
            seen["model"], seen["step"] = model, self

    monkeypatch.setattr(loop, "PatchStream", NaNAtStep5)
    monkeypatch.setattr(loop, "StepGuard", RecordingGuard)
    monkeypatch.setattr(loop, "TrainStep", RecordingStep)
    monkeypatch.setattr(loop, "READ_EVERY_SECONDS", 1e9)
    data = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=4, shape=(48, 48, 32), seed=5)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 5;"):
        loop.train(TrainConfig(dataset=str(data), out=str(out), preset="small", patch_size=[32, 32, 32],
                               batch_size=batch, steps=12, val_every=4, val_fraction=0.25, seed=1, device="cuda",
                               recipe=recipe, grad_clip=1.0, cuda_graphs=True, num_workers=0))
    guard, step = seen["guard"], seen["step"]
    assert guard.on_device and step.graphed.captured == 1  # fused optimiser, graphed steps
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    tensors, state = load_resume_state(out / "resume.safetensors")
    assert state["info"]["step"] == 4
    weights = seen["model"].state_dict()
    for name, value in tensors.items():
        if name.startswith("model/"):
            assert torch.equal(weights[name[len("model/"):]].cpu(), value), name
    moments = guard.optimizer.state_dict()["state"]
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, pid, key = name.split("/", 2)
            assert torch.equal(torch.as_tensor(moments[int(pid)][key]).cpu().float(), value.float()), name


# last in the file: a failed capture must leave the process usable, but if not, nothing runs after it
def test_cuda_graph_capture_failure_falls_back_to_eager():
    from engine.model.graphs import CudaGraphed

    def syncs(x):  # .item() cannot be recorded in a graph
        return x * float(x.sum().item())

    graphed = CudaGraphed(syncs, warmup=1)
    x = torch.arange(4.0, device="cuda")
    assert torch.equal(graphed(x), x * 6)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        out = graphed(x)
    assert torch.equal(out, x * 6) and graphed.failure and graphed.captured == 0
    assert torch.equal(graphed(x + 1), (x + 1) * 10)


def test_graphed_corrective_rounds_give_the_eager_rounds_batch():
    """The interactive task's CUDA-graphed no-gradient rounds (training's default on one GPU) build the
    same network input and target as the eager rounds, call after call (replays see new inputs)."""
    from engine.interactive import InteractiveTask
    from engine.interactive.simulate import SimulationConfig
    from engine.synth import make_phantom

    torch.manual_seed(0)
    simulation = SimulationConfig(max_rounds=3, p_empty_prior=0.0)
    graphed = InteractiveTask(simulation=simulation, patch_size=(32, 32, 32))
    graphed.set_cuda_graphs(True)
    eager = InteractiveTask(simulation=simulation, patch_size=(32, 32, 32))
    in_ch, out_ch = eager.network_channels(1, ["background", "organ", "vessel"])
    model = MambaHoME(ModelConfig.preset("tiny", in_channels=in_ch, num_classes=out_ch)).cuda().train()
    for seed in range(5):
        phantoms = [make_phantom((32, 32, 32), "CT", seed=seed * 4 + s) for s in range(4)]
        image = torch.from_numpy(np.stack([p.image for p in phantoms]).astype(np.float32))[:, None].cuda() / 500.0
        label = torch.from_numpy(np.stack([p.label for p in phantoms]).astype(np.int64))[:, None].cuda()
        xg, yg = graphed.make_batch(model, image, label, np.random.default_rng(seed))
        xe, ye = eager.make_batch(model, image, label, np.random.default_rng(seed))
        assert model.training
        assert torch.equal(yg, ye)
        torch.testing.assert_close(xg, xe, rtol=0, atol=0)
    assert graphed._round_forward[1].captured == 1
