"""A 4000×3000 selection round trip inside real Krita (read the target, the selection and its
feathered mask, write the result layer), 8- and 16-bit. Not a test (no timed asserts):
QT_QPA_PLATFORM=offscreen PYTHONPATH=tests/krita:plugin ANALOGON_NO_REGISTER=1
kritarunner -s bench_roundtrip -f main  (with a private XDG_DATA_HOME/XDG_CONFIG_HOME)."""
import json, os, sys, time, traceback
R = {}
def main(*a):
    try:
        run()
    except Exception:
        R["fatal"] = traceback.format_exc()
    with open(os.environ.get("ANALOGON_BENCH_OUT", "roundtrip.json"), "w") as f:
        f.write(json.dumps(R, indent=1, default=str))

def run():
    from krita import Krita, Selection
    from analogon_krita.document import document as kd
    app = Krita.instance()
    W, H = 4000, 3000
    for depth in ("U8", "U16"):
        doc = app.createDocument(W, H, "perf", "RGBA", depth, "", 72.0)
        n = doc.createNode("photo", "paintlayer")
        doc.rootNode().addChildNode(n, None)
        ps = 4 if depth == "U8" else 8
        n.setPixelData(bytes(range(256)) * (W * H * ps // 256), 0, 0, W, H)
        sel = Selection(); sel.select(100, 100, W - 200, H - 200, 255)
        doc.setSelection(sel); doc.waitForDone()
        t = {}
        t0 = time.perf_counter()
        roi, fs = kd.region_of_interest(doc, 32)
        rgba = kd.role_image(doc, n, {"name": "source"}, roi, True).rgba
        t["read_target"] = time.perf_counter() - t0
        t0 = time.perf_counter(); m = kd.selection_mask(doc, roi); mr = kd.mask_to_rgba(m, roi.w, roi.h); t["mask"] = time.perf_counter() - t0
        t0 = time.perf_counter(); fm = kd.feathered_mask(doc, roi, 8); t["feathered_mask"] = time.perf_counter() - t0
        t0 = time.perf_counter(); r = kd.insert_result(doc, n, rgba, roi.w, roi.h, roi, "res", fm); doc.waitForDone(); t["insert_result"] = time.perf_counter() - t0
        t["total"] = sum(t.values())
        R[depth] = {k: round(v, 2) for k, v in t.items()}; R[depth]["roi"] = roi.to_list()
        doc.waitForDone(); doc.setModified(False); doc.close()
