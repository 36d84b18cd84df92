"""Server benchmarks: upload time, prompt round-trip overhead, and a bounded load test on localhost.

Starts ``mambahome serve`` as a subprocess on 127.0.0.1 (a free port), drives it with
``mambahome_client`` and prints a table, also written to ``benchmarks/results/server-<date>.md``.

- upload: a 512x512x300 CT-like int16 volume sent once (``create_session``, a raw pack), median of a
  few runs; then the same volume as an uncompressed ``.nii`` file (``upload_file``);
- prompt: client round trip minus the engine's own time for a 256^3 volume (image not re-sent);
  needs ``engine.interactive``; without it the floor is measured instead: an HTTP round trip plus
  packing/unpacking a 64^3 changed box, which is what the server adds around the engine;
- load: N concurrent clients (threads) each upload a 64^3 volume, segment it and close it; every
  answer must be a result or a clear 503 "busy"; the server's resident memory is compared with its
  baseline (after a warm-up segmentation) at the last close and 2 s later (closed sessions' memory
  is handed back to the OS by a background pass).

Usage: ``python benchmarks/bench_server.py [--clients 20] [--device auto] [--out benchmarks/results]``
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, write_report  # noqa: E402
from mambahome_client import BusyError, Client, ServerError, pack_array, unpack_array  # noqa: E402
from mambahome_client.wire import bbox_to_json  # noqa: E402
from tests.server_support import free_port  # noqa: E402


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(device: str, max_sessions: int, tmp: Path) -> tuple:
    port = free_port()
    # The bundled promptable model under --models, so prompts measure the real engine.
    # the server offers the bundled interactive model itself (id "interactive"), so prompts measure the real engine
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port", str(port), "--device", device,
                             "--max-sessions", str(max_sessions), "--busy-wait", "5",
                             "--models", str(tmp / "models"), "--cases", str(tmp / "cases")],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = Client(f"http://127.0.0.1:{port}", timeout=600)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.health()
            break
        except ServerError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
    client.connect()
    return proc, client


def ct_like(shape, seed: int = 0) -> np.ndarray:
    """An int16 volume with CT-like value ranges and smooth structure (compresses like a real CT)."""
    rng = np.random.default_rng(seed)
    z = np.linspace(-1, 1, shape[2])[None, None, :]
    y = np.linspace(-1, 1, shape[1])[None, :, None]
    x = np.linspace(-1, 1, shape[0])[:, None, None]
    body = (x ** 2 + y ** 2 < 0.8).astype(np.int16) * 1040 - 1000
    organ = ((x - 0.2) ** 2 + y ** 2 + z ** 2 < 0.1).astype(np.int16) * 60
    noise = rng.normal(0, 12, size=shape).astype(np.int16)
    return (body + organ + noise).astype(np.int16)


def bench_upload(client: Client, repeats: int, tmp: Path) -> List[Dict[str, object]]:
    """The CT sent as an array (a raw pack, what napari and Slicer send) and as a ``.nii`` file."""
    import nibabel as nib

    vol = ct_like((512, 512, 300))
    affine = np.diag([0.7, 0.7, 1.0, 1.0])

    def timed(send) -> List[float]:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            s = send()
            times.append(time.perf_counter() - t0)
            client.close_session(s.session_id)
        return times

    times = timed(lambda: client.create_session(vol, affine, name="ct"))
    t0 = time.perf_counter()
    body = pack_array(vol, {"affine": affine.tolist()}, level=1)
    pack_s = time.perf_counter() - t0
    nii = tmp / "ct.nii"
    nib.save(nib.Nifti1Image(vol, affine), str(nii))
    file_times = timed(lambda: client.upload_file(nii))
    return [{"what": "upload 512x512x300 int16 (once, raw pack)", "median_s": statistics.median(times),
             "min_s": min(times), "detail": f"{vol.nbytes / 2**20:.0f} MiB sent raw; zlib-1 would shrink it to "
                                            f"{len(body) / 2**20:.0f} MiB in {pack_s:.2f} s; goal <= 2 s"},
            {"what": "upload the same CT as a .nii file (upload_file)", "median_s": statistics.median(file_times),
             "min_s": min(file_times), "detail": "read by nibabel on the server, float32 at once"}]


def bench_prompt(client: Client, repeats: int) -> Dict[str, object]:
    vol = ct_like((256, 256, 256), seed=1)
    s = client.create_session(vol, np.eye(4), name="256")
    try:
        client.add_point(s.session_id, (128, 128, 128))  # warm-up (model load)
        overheads = []
        for i in range(repeats):
            u = client.add_point(s.session_id, (120 + i, 128, 128), positive=True)
            overheads.append(u.latency_s - u.server_s)
        return {"what": "prompt round trip minus engine time, 256^3", "median_s": statistics.median(overheads),
                "min_s": min(overheads), "detail": "image not re-sent; goal <= 0.05 s"}
    except ServerError as exc:
        if exc.status != 501:
            raise
    finally:
        client.close_session(s.session_id)
    # No engine.interactive on this server: measure what the server adds around the engine.
    mask = np.zeros((64, 64, 64), np.uint8)
    mask[16:48, 16:48, 16:48] = 1
    floors = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        client.health()
        unpack_array(pack_array(mask, {"bbox": bbox_to_json((slice(0, 64),) * 3), "engine_s": 0.0}))
        floors.append(time.perf_counter() - t0)
    return {"what": "prompt overhead floor (HTTP round trip + 64^3 box pack/unpack)",
            "median_s": statistics.median(floors), "min_s": min(floors),
            "detail": "engine.interactive not installed: the real prompt round trip is not measured; goal <= 0.05 s"}


def bench_load(client: Client, proc: subprocess.Popen, clients: int, settle_s: float = 2.0) -> List[Dict[str, object]]:
    vol = ct_like((64, 64, 64), seed=2)
    warm = client.create_session(vol, np.eye(4))
    client.segment(warm.session_id)  # the model is loaded: this is the baseline
    client.close_session(warm.session_id)
    time.sleep(settle_s)  # measured as the end state is: after the background memory pass
    baseline = rss_mib(proc.pid)
    counts = {"ok": 0, "busy": 0, "error": 0}
    errors: List[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        c = Client(client.url, timeout=600)
        sid = None
        try:
            sid = c.create_session(ct_like((64, 64, 64), seed=10 + i), np.eye(4)).session_id
            c.segment(sid)
            outcome = "ok"
        except BusyError:
            outcome = "busy"
        except ServerError as exc:
            outcome = "error"
            errors.append(str(exc))
        finally:
            if sid is not None:
                try:
                    c.close_session(sid)
                except ServerError:
                    pass
        with lock:
            counts[outcome] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    peak = baseline
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mib(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    alive = client.health()["status"] == "ok" and proc.poll() is None
    at_close = rss_mib(proc.pid)
    time.sleep(settle_s)  # the server frees closed sessions' memory in a background pass
    after = rss_mib(proc.pid)
    return [{"what": f"load: {clients} concurrent sessions (64^3 upload + segment + close)", "median_s": wall,
             "min_s": "", "detail": f"ok {counts['ok']}, busy {counts['busy']}, other errors {counts['error']}"
                                    f"{' (' + errors[0][:80] + ')' if errors else ''}; server alive: {alive}"},
            {"what": "server memory (RSS, MiB)", "median_s": "", "min_s": "",
             "detail": f"baseline {baseline:.0f}, peak {peak:.0f}, at the last close {at_close:.0f}, "
                       f"{settle_s:.0f} s later {after:.0f} ({after - baseline:+.0f})"}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--max-sessions", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tag", default="", help="suffix of the result file name (e.g. the machine)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, client = start_server(args.device, args.max_sessions, Path(tmp))
        try:
            rows = bench_upload(client, args.repeats, Path(tmp)) + [bench_prompt(client, args.repeats * 4)]
            rows += bench_load(client, proc, args.clients)
            rows += bench_load(client, proc, args.clients)[1:]  # a second round: memory must not grow
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    env = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": args.device,
           "cpus": str(os.cpu_count()), "python": platform.python_version(),
           "server": f"max_sessions {args.max_sessions}, busy_wait 5 s, localhost"}
    name = f"server-{dt.date.today().isoformat()}{('-' + args.tag) if args.tag else ''}.md"
    write_report(Path(args.out) / name, "MambaHoME server on localhost", env,
                 [("Results", markdown_table(rows, ["what", "median_s", "min_s", "detail"]))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
