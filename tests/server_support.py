"""Running a real server (uvicorn on 127.0.0.1, a free port, in a thread) for the server and client tests."""
from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

from engine.server.config import ServerConfig


def raw_exchange(port: int, head: bytes, body: bytes = b"", wait_s: float = 20.0, source: str = "127.0.0.1",
                 until_close: bool = False) -> Tuple[int, dict]:
    """Send ``head`` and ``body`` as they are (no HTTP library to correct them) from ``source``, and read the answer:
    ``(status, JSON)``. Reading stops when the body of its Content-Length is in, or with ``until_close`` only when the
    server closes the connection. A server that never answers (or, with ``until_close``, keeps the connection open)
    fails the test at ``wait_s`` (socket.timeout) instead of hanging it."""
    with socket.create_connection(("127.0.0.1", port), source_address=(source, 0)) as s:
        s.settimeout(wait_s)
        s.sendall(head + body)
        data = b""
        while True:
            piece = s.recv(65536)
            if not piece:
                break
            data += piece
            if not until_close and b"\r\n\r\n" in data:
                head_text, _, payload = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head_text.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(payload) >= length[0]:
                    break
    head_text, _, payload = data.partition(b"\r\n\r\n")
    return int(head_text.split(b" ", 2)[1]), json.loads(payload.decode())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(config: ServerConfig) -> Iterator[Tuple[str, Any]]:
    """Start the real app with uvicorn in a thread; yields ``(url, app)`` and stops it afterwards."""
    import uvicorn

    from engine.server.app import create_app

    config.host, config.port = "127.0.0.1", free_port()
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{config.host}:{config.port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def cpu_server(root: Path, token: Optional[str], **settings: Any) -> Iterator[Tuple[str, Any]]:
    """:func:`running_server` on the CPU with model and case folders under ``root``; ``settings`` override the
    :class:`ServerConfig` defaults used by the tests (a short busy wait, six sessions)."""
    settings = {"busy_wait_s": 0.2, "max_sessions": 6, **settings}
    cfg = ServerConfig(token=token, models_dir=root / "models", cases_dir=root / "cases", device="cpu", **settings)
    with running_server(cfg) as served:
        yield served


@contextmanager
def echo_server(folder: Path, token: Optional[str], models: Optional[Path] = None) -> Iterator[Tuple[str, Any]]:
    """:func:`cpu_server` in ``folder/server`` offering the echo promptable model (:func:`echo_interactive_model`)
    besides the checkpoints of ``models`` (linked as its model folder), as ``(url, app)``."""
    (folder / "server").mkdir()
    if models is not None:
        (folder / "server" / "models").symlink_to(models)
    with cpu_server(folder / "server", token) as (url, app):
        app.state.models.add_in_memory("echo", *echo_interactive_model())
        yield url, app


def connected_client(url: str, token: str, timeout: float = 300) -> Any:
    """A :class:`mambahome_client.Client` that has checked the server's version and token."""
    from mambahome_client import Client

    client = Client(url, token=token, timeout=timeout)
    client.connect()
    return client


def echo_interactive_model(fill: bool = False) -> Tuple[Any, dict]:
    """A deterministic promptable stand-in ``(model, metadata)`` for engine.interactive sessions.

    Its object is (previous mask or a positive prompt) without a negative prompt, voxel by voxel, so
    the expected mask of every prompt is known exactly. With ``fill`` it is a second, different model:
    every voxel the network sees without a negative prompt (a click fills the whole window around it).
    Needs engine.interactive (import-skipped by callers).
    """
    import torch
    from torch import nn

    from engine.interactive import PromptEncoding
    from engine.preprocess import Preprocessing

    enc = PromptEncoding()

    class GuidanceEcho(nn.Module):
        in_channels = 1 + enc.num_channels
        size_divisor = 16

        def __init__(self) -> None:
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            def ch(name: str) -> torch.Tensor:
                return x[:, 1 + enc.channels.index(name)]

            pos = torch.stack([ch(n) for n in ("previous_mask", "point+", "box+", "scribble+")]).amax(0)
            neg = torch.stack([ch(n) for n in ("point-", "box-", "scribble-")]).amax(0)
            grown = torch.ones_like(pos) if fill else pos
            score = torch.where((grown > 0.5) & (neg == 0), 1.0, -1.0)[:, None]
            return torch.cat([-score, score], dim=1)

    metadata = {"task": {"name": "interactive", "encoding": enc.to_dict()}, "patch_size": [32, 32, 32],
                "preprocessing": Preprocessing.for_modality("MR").to_dict(), "modality": "MR",
                "class_names": ["background", "object"], "version": "fill-stand-in" if fill else "echo-stand-in"}
    return GuidanceEcho(), metadata


def instant_finetune(monkeypatch: Any) -> None:
    """The server's training (``engine.server.state.run_finetune``) replaced by a copy of the parent's weights saved
    as a new version, as a run folder would hold it: the job, its scoring and what clients do with it run for real,
    in seconds instead of minutes of training on a CPU. Keeps the parent's task (no warm start)."""
    from engine.server import state

    def run(checkpoint: Any, data: Any, out: Any, **settings: Any) -> Any:
        from engine.checkpoint import load_checkpoint, save_checkpoint
        from engine.train.config import RunResult

        model, meta = load_checkpoint(checkpoint)
        assert settings.get("task") in (None, (meta.get("task") or {}).get("name", "segmentation"))
        best = save_checkpoint(Path(out) / "best.safetensors", model,
                               dict(meta, version=f"{Path(out).name}-best", parent={"version": meta.get("version")}))
        settings["on_log"]({"step": 1, "loss": 0.5})
        settings["progress"](1, 1, "training")
        return RunResult(best_checkpoint=best, last_checkpoint=best, history=[], best_dice=None, run_dir=Path(out),
                         steps_done=1, checkpoint=best)

    monkeypatch.setattr(state, "run_finetune", run)


def scoring_waits_for_cancel(monkeypatch: Any) -> threading.Event:
    """The server's scoring (``engine.scoring.before_after``) waits, once started, until its job is cancelled, then
    runs as usual (its first check stops it): a test cancels while the server scores, never before or after.

    Returns:
        an event set when the scoring started.
    """
    import engine.scoring

    started = threading.Event()
    real = engine.scoring.before_after

    def waiting(*args: Any, cancel: Any = None, **kwargs: Any) -> Any:
        started.set()
        deadline = time.monotonic() + 120
        while not cancel.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        return real(*args, cancel=cancel, **kwargs)

    monkeypatch.setattr(engine.scoring, "before_after", waiting)
    return started


def save_a_real_case(client: Any, shared_data: Path, case_id: str) -> None:
    """Unless the server already holds saved cases, save one there: a real labelled MRI (hippocampus_001) as
    ``case_id``, uploaded and saved through ``client`` as an annotator's corrected case is."""
    import nibabel as nib
    import numpy as np

    if client.cases():
        return
    img = shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    lab = shared_data / "hippocampus" / "labelsTr" / "hippocampus_001.nii.gz"
    s = client.upload_file(img, modality="MR")
    client.save_case(s.session_id, np.asarray(nib.load(str(lab)).dataobj).astype(np.uint8),
                     ["background", "anterior", "posterior"], "MR", case_id=case_id)


@contextmanager
def finetune_server(root: Path, token: str, model_id: str) -> Iterator[Tuple[str, Any]]:
    """A CPU server (:func:`cpu_server`) whose models folder holds a tiny untrained CT model ``model_id`` and whose
    case store holds three saved phantom cases (with ``val_fraction`` 0.34 one is held out: a stopped model is
    validated, as at a spent time limit): what a fine-tune job needs, at seconds a step."""
    import numpy as np

    from engine.synth import make_phantom
    from train_support import tiny_parent

    (root / "models").mkdir(exist_ok=True)
    with cpu_server(root, token) as (url, app):
        client = connected_client(url, token)
        for seed in range(3):
            phantom = make_phantom((32, 32, 24), "CT", seed=seed)
            s = client.create_session(phantom.image.astype(np.float32), phantom.affine, name="phantom",
                                      modality="CT")
            client.save_case(s.session_id, phantom.label.astype(np.uint8), phantom.class_names, "CT",
                             case_id=f"p{seed}")
            client.close_session(s.session_id)
        tiny_parent(root / "models" / f"{model_id}.safetensors", phantom.class_names)
        yield url, app


def hold_finetune(monkeypatch: Any, at_step: int = 1, before_first_step: bool = False) -> threading.Event:
    """The server's real fine-tune (``engine.server.state.run_finetune``) held until its job's token asks to stop or
    cancel (at most 120 s): at its first reported step of ``at_step`` or later (the stop then arrives mid-run, never
    after the run's own end), or with ``before_first_step`` before it prepares anything. Returns an event set once
    held (the model has trained that far)."""
    from engine.server import state

    real = state.run_finetune
    held = threading.Event()

    def wait_for_the_client(cancel: Any) -> None:
        held.set()
        deadline = time.monotonic() + 120
        while not cancel.stop_requested and not cancel.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)

    def run(checkpoint: Any, data: Any, out: Any, *, cancel: Any, on_log: Any, **settings: Any) -> Any:
        if before_first_step:
            wait_for_the_client(cancel)

        def log(record: Any) -> None:
            on_log(record)
            if record["step"] >= at_step and not held.is_set():
                wait_for_the_client(cancel)
        return real(checkpoint, data, out, cancel=cancel, on_log=log, **settings)

    monkeypatch.setattr(state, "run_finetune", run)
    return held
