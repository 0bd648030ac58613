"""Peer of `ddetr bench quantize`: onnxruntime's own static post-training quantization
(`onnxruntime.quantization.quantize_static`) of ddetr's float ONNX model: QDQ format, INT8
weights per channel, UINT8 activations per tensor, MinMax calibration over the same calibration
inputs ddetr used, and the same Conv/MatMul nodes left float (`--exclude`).

Prints one JSON line: {"seconds": quantization wall time, "bytes": size of the INT8 file}.

Usage: python ort_quantize_static.py --model fp32.onnx --out int8.onnx --calib calib.f32
       --shape 1,3,H,W --exclude exclude.json
(calib.f32: the calibration inputs, little-endian float32, one [1, 3, H, W] image after another;
exclude.json: a JSON list of node names.)
"""
import argparse
import json
import os
import time

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)


class Reader(CalibrationDataReader):
    def __init__(self, images):
        self.it = iter([{"inputs": x} for x in images])

    def get_next(self):
        return next(self.it, None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--shape", required=True)
    p.add_argument("--exclude", required=True)
    a = p.parse_args()
    shape = [int(v) for v in a.shape.split(",")]
    images = np.fromfile(a.calib, dtype="<f4").reshape([-1] + shape)
    with open(a.exclude) as f:
        exclude = json.load(f)
    t = time.time()
    quantize_static(
        a.model,
        a.out,
        Reader(images),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "MatMul"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        calibrate_method=CalibrationMethod.MinMax,
    )
    print(json.dumps({"seconds": time.time() - t, "bytes": os.path.getsize(a.out)}))


if __name__ == "__main__":
    main()
