"""GUI-thread gaps while the dock's Segment runs: a 10 ms Qt timer on the GUI thread records every interval (a gap is
an interval > 50 ms), ``gc.callbacks`` time every collection and say which thread ran it. One Segment of the bundled
default model on the shared abdomen MRI, in a fresh process; prints one ``RESULT {json}`` line (wall time, max/p95/p99
gap, the gaps > 50 ms with their start time, collections > 20 ms, the label map's md5).

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/segment_gui_gaps.py

Environment: ``MH_PREIMPORT=1`` imports the engine on the GUI thread first (a second Segment: no import in the
worker); ``MH_OLD=1`` turns off the worker's garbage-collector pause and thread cap (napari_mambahome._jobs, before
2026-12-05); ``MH_THREADS=n`` sets torch's threads in the worker after the import; ``MH_SWITCH=s`` sets
``sys.setswitchinterval``. Results: BENCHMARKS.md, "CPU: GUI gaps during the first Segment".
"""
import tempfile
import gc, json, os, sys, threading, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MAMBAHOME_SHARED_DATA", ROOT.parent / "shared" / "data"))
_tmp = Path(tempfile.mkdtemp(prefix="segment_gui_gaps_"))
for var, sub in (("MAMBAHOME_CONFIG_DIR", "cfg"), ("MAMBAHOME_CASES_DIR", "cases"), ("MAMBAHOME_MODELS_DIR", "models")):
    (_tmp / sub).mkdir()
    os.environ[var] = str(_tmp / sub)
import numpy as np
import napari
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QInputDialog, QApplication
QInputDialog.getItem = staticmethod(lambda parent, title, label, items, current=0, editable=True, *a, **k: (items[current], True))
from napari_mambahome._widget import MambaHoMEWidget
if os.environ.get("MH_SWITCH"):
    sys.setswitchinterval(float(os.environ["MH_SWITCH"]))
gcev = []; T0 = [1e18]
_gc_t = {}
def gccb(phase, info):
    if phase == "start":
        _gc_t[threading.get_ident()] = time.perf_counter()
    else:
        t0 = _gc_t.pop(threading.get_ident(), None)
        if t0 is not None:
            gcev.append((info["generation"], time.perf_counter() - t0, threading.current_thread() is threading.main_thread(), time.perf_counter()))
gc.callbacks.append(gccb)

viewer = napari.Viewer(show=True)
widget = MambaHoMEWidget(viewer)
viewer.window.add_dock_widget(widget, name="Mamba-HoME")
assert widget.session.load_model_file(str(ROOT / "napari_mambahome" / "models" / "default.safetensors")) is not None
[layer] = viewer.open(str(DATA / "abdomen_ct_mr" / "mr_image.nii.gz"), plugin="napari-mambahome")
widget.session.set_image(layer) if hasattr(widget.session, "set_image") else None
app = QApplication.instance()
for _ in range(50):
    app.processEvents(); time.sleep(0.01)
# warm torch import in worker-equivalent: import in main thread so not measured
if os.environ.get('MH_PREIMPORT', '0') == '1':
    from napari_mambahome._jobs import import_engine
    import_engine()
import napari_mambahome._jobs as _J
if os.environ.get("MH_OLD") == "1":
    import contextlib
    _J.no_full_collections = contextlib.nullcontext
    _J.leave_a_core_for_the_gui = contextlib.nullcontext
nthreads = os.environ.get("MH_THREADS")
if nthreads:
    _orig_ie = _J.import_engine
    def _ie(*a):
        _orig_ie(*a)
        import torch; torch.set_num_threads(int(nthreads))
    _J.import_engine = _ie

gaps = []
last = [time.perf_counter()]
big = []
def tick():
    now = time.perf_counter()
    gaps.append(now - last[0])
    if now - last[0] > 0.05: big.append((round(last[0]-T0[0], 2), round((now-last[0])*1000)))
    last[0] = now
timer = QTimer(); timer.setInterval(10); timer.timeout.connect(tick)
panel = widget.panels["segment"]
t0 = time.perf_counter(); T0[0] = t0
last[0] = t0
timer.start()
prog = []
widget.session.status.connect(lambda m: prog.append((round(time.perf_counter()-T0[0],2), m)))
job = panel.segment()
job.relay.progress.connect(lambda d,t,m: prog.append((round(time.perf_counter()-T0[0],2), d, t, m)) if d in (0, 1) or d == t else None)
assert job is not None
while job.running:
    app.processEvents(); time.sleep(0.002)
wall = time.perf_counter() - t0
timer.stop()
g = np.array(gaps) * 1000
import torch
res = dict(big=big, prog=prog[:12], threads=torch.get_num_threads(), outcome=job.outcome, wall=round(wall, 2), n=len(g), max=round(g.max(), 1),
           p95=round(float(np.percentile(g, 95)), 1), p99=round(float(np.percentile(g, 99)), 1), over50=int((g > 50).sum()),
           over100=int((g > 100).sum()),
           gc_main=[(a, round(b * 1000, 1)) for a, b, m, t in gcev if m and b > 0.01 and t > T0[0]],
           gc_big=[(round(t-T0[0]-b,2), a, round(b*1000), "M" if m else "W") for a, b, m, t in gcev if b > 0.02 and t > T0[0]], nobj=len(gc.get_objects()), thr=gc.get_threshold(), gc_worker_max=round(max([b for a, b, m, t in gcev if not m] or [0]) * 1000, 1), gc_n=len(gcev))
lab = viewer.layers[f"{layer.name} labels"].data
import hashlib
res["labels_md5"] = hashlib.md5(np.ascontiguousarray(lab).tobytes()).hexdigest()
res["status"] = widget.status_label.text(); res["img"] = str(layer.data.shape)
import shutil
shutil.rmtree(_tmp, ignore_errors=True)
print("RESULT", json.dumps(res), flush=True)
os._exit(0)
