"""Golden fixture for dataset/src/upsample.rs: Pillow's bilinear resize (`Image.resize` with a
`box`) of noise images, stretched horizontally, vertically up, down or not at all, with windows
touching the edges and fractional borders (multiples of 1/64, exact in JSON and f64).

Run: $(../shared/peers/venv.sh) dataset/tests/golden/make_upsample_fixture.py
Writes dataset/tests/golden/upsample_pil.json: per case the source size and RGB8 pixels (hex),
the window [left, top, width, height], the output size, Pillow's RGB8 pixels (hex), and whether
Pillow's result equals its horizontal pass followed by its vertical pass (each rounded to u8), the
order ddetr uses. (Pillow 13 runs the vertical pass first for some sizes, e.g. 23x13 -> 31x6.)
"""
import json
import os

import numpy as np
import PIL
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(2026)

# (width, height, window, out_w, out_h); window = [left, top, width, height].
CASES = [
    (17, 11, [0, 0, 17, 11], 29, 11),  # horizontal only
    (17, 11, [0, 0, 17, 11], 40, 23),  # both up
    (23, 13, [0, 0, 23, 13], 31, 6),  # up in x, down in y
    (31, 19, [3.25, 2.5, 20.125, 9.75], 37, 21),  # inside window, fractional
    (31, 19, [10.5, 7.0, 20.5, 12.0], 45, 12),  # touches the right and bottom edges
    (31, 19, [0, 4.015625, 12.75, 3.5], 30, 2),  # touches the left edge, shrinks rows
    (29, 9, [27.0, 0, 2.0, 9.0], 7, 9),  # the last two columns
    (29, 9, [0.5, 1.0, 1.0, 4.0], 5, 11),  # one column wide
    (1, 7, [0, 0, 1, 7], 4, 13),  # a one-pixel-wide image
    (1, 1, [0, 0, 1, 1], 3, 2),  # a one-pixel image
    (37, 15, [1.5, 0, 34.0, 15.0], 37, 30),  # scale just below 1
    (61, 21, [6.0, 3.0, 41.0, 13.0], 93, 40),  # wide enough for several SIMD pairs
]

cases = []
for w, h, win, ow, oh in CASES:
    px = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    left, top, ww, wh = (float(v) for v in win)
    box = (left, top, left + ww, top + wh)
    src = Image.fromarray(px, "RGB")
    out = src.resize((ow, oh), Image.Resampling.BILINEAR, box=box)
    # The same two passes as separate resizes: rows first (all of them), then columns.
    rows = src.resize((ow, h), Image.Resampling.BILINEAR, box=(box[0], 0, box[2], h))
    if (oh, top, wh) != (h, 0.0, h):
        rows = rows.resize((ow, oh), Image.Resampling.BILINEAR, box=(0, box[1], ow, box[3]))
    horizontal_first = bool((np.asarray(rows) == np.asarray(out)).all())
    cases.append(
        {
            "width": w,
            "height": h,
            "pixels": px.tobytes().hex(),
            "window": [left, top, ww, wh],
            "out_width": ow,
            "out_height": oh,
            "expected": np.asarray(out).tobytes().hex(),
            "horizontal_first": horizontal_first,
        }
    )

with open(os.path.join(HERE, "upsample_pil.json"), "w") as f:
    json.dump({"pillow": PIL.__version__, "cases": cases}, f, indent=1)
    f.write("\n")
