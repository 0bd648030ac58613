#!/usr/bin/env python3
"""Checks an ONNX file written by `ddetr export` with the onnx checker and runs it in onnxruntime
(CPU) against the outputs of ddetr's own forward.

    python check_onnx.py CASE.json

CASE.json: {"model": "m.onnx", "tolerance": 1e-4, "repeat": 0,
            "runs": [{"input": {"file": "x.f32", "shape": [N,3,H,W]},
                      "expected": {"pred_logits": {"file":..., "shape":...}, "pred_boxes": {...}}}]}
Files are raw little-endian float32. Prints one JSON line (max abs difference per output, model
size, mean CPU latency when repeat > 0) and exits 1 when an output differs by more than the
tolerance, 2 when onnx/onnxruntime are missing.
"""
import json
import os
import sys
import time

try:
    import numpy as np
    import onnx
    import onnxruntime as ort
except ImportError as e:  # pragma: no cover
    print(f"check_onnx: {e}: run scripts/setup.sh (it installs onnx and onnxruntime into the venv)", file=sys.stderr)
    sys.exit(2)


def load(base, spec):
    return np.fromfile(os.path.join(base, spec["file"]), dtype="<f4").reshape(spec["shape"])


def main():
    case_path = sys.argv[1]
    base = os.path.dirname(os.path.abspath(case_path))
    case = json.load(open(case_path))
    model_path = os.path.join(base, case["model"])
    onnx.checker.check_model(model_path, full_check=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    report = {"bytes": os.path.getsize(model_path), "runs": []}
    ok = True
    for run in case["runs"]:
        x = load(base, run["input"])
        outs = sess.run(None, {in_name: x})
        names = [o.name for o in sess.get_outputs()]
        diffs = {}
        for name, got in zip(names, outs):
            want = load(base, run["expected"][name])
            if got.shape != want.shape:
                print(f"check_onnx: {name} has shape {got.shape}, expected {want.shape}", file=sys.stderr)
                ok = False
                continue
            d = float(np.abs(got - want).max())
            diffs[name] = d
            if not d <= case["tolerance"]:
                ok = False
        report["runs"].append({"batch": int(x.shape[0]), "max_abs_diff": diffs})
        if case.get("repeat", 0) > 0:
            sess.run(None, {in_name: x})
            t0 = time.perf_counter()
            for _ in range(case["repeat"]):
                sess.run(None, {in_name: x})
            report["runs"][-1]["latency_ms"] = 1000 * (time.perf_counter() - t0) / case["repeat"]
    report["ok"] = ok
    print(json.dumps(report))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
