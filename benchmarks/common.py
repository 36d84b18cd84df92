"""Shared helpers for benchmark scripts: timing with medians, peak memory, and writing result tables.

Benchmarks are scripts, not tests: they print a table and write it (with date, device and versions)
to a markdown file that is committed beside the code that produced it.
"""
from __future__ import annotations

import datetime as _dt
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> Dict[str, str]:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        env["cuda"] = str(torch.version.cuda)
        env["tf32"] = (f"matmul {torch.backends.cuda.matmul.allow_tf32}, "
                       f"cudnn {torch.backends.cudnn.allow_tf32}")
    try:
        from engine.model import mamba_backend_available

        env["mamba_backend"] = mamba_backend_available()
    except Exception:  # noqa: BLE001
        pass
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of ``fn``'s first call: cuDNN autotuning, allocations and, for compiled code, compilation."""
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 3) -> Dict[str, float]:
    """Median / min seconds of ``fn`` over ``repeats`` calls after ``warmup`` (each call's seconds in
    ``times``), and peak memory (GiB).

    ``peak_gib`` is the most memory tensors held during the timed calls; ``reserved_gib`` the most the
    process held from the device, cache included. Only the latter counts a CUDA graph's private pool,
    which is allocated at capture (during warm-up) and reused by every replay."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else float("nan")
    return {"median_s": statistics.median(times), "min_s": min(times), "peak_gib": peak, "reserved_gib": reserved,
            "repeats": repeats, "times": times}


def markdown_table(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "nan" if v != v else (f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}")
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(path: Optional[Path], title: str, env: Dict[str, str], sections: Sequence[tuple]) -> str:
    """``sections``: (heading, markdown body). Prints the report and writes it to ``path`` if given."""
    text = [f"# {title}", "", " | ".join(f"**{k}** {v}" for k, v in env.items()), ""]
    for heading, body in sections:
        text += [f"## {heading}", "", body, ""]
    report = "\n".join(text)
    print(report)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
        print(f"\nwritten to {path}")
    return report
