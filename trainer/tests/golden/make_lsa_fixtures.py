"""Golden fixtures for trainer/tests/lsa_scipy.rs: scipy.optimize.linear_sum_assignment on random
and tied cost matrices (square, wide, tall; integer ties; constant; repeated rows/columns).

Run: $(../shared/peers/venv.sh) trainer/tests/golden/make_lsa_fixtures.py
Writes trainer/tests/golden/lsa_scipy.safetensors: for case i, `cost.i` (f64) and `rows.i`,
`cols.i` (i64).
"""
import os

import numpy as np
import torch
from safetensors.torch import save_file
from scipy.optimize import linear_sum_assignment

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(1234)
cases = []
for shape in [(1, 1), (3, 3), (7, 7), (5, 9), (9, 5), (30, 4), (4, 30), (50, 50), (300, 7), (12, 3)]:
    cases.append(rng.standard_normal(shape))
for shape in [(6, 6), (8, 5), (5, 8), (20, 6), (40, 40)]:
    cases.append(rng.integers(0, 3, size=shape).astype(np.float64))  # many ties
cases.append(np.zeros((5, 5)))
cases.append(np.ones((7, 3)))
cases.append(np.ones((3, 7)))
base = rng.standard_normal((1, 6))
cases.append(np.repeat(base, 10, axis=0))  # identical rows
cases.append(np.repeat(rng.standard_normal((8, 1)), 4, axis=1))  # identical columns
cases.append(np.round(rng.standard_normal((25, 9)), 1))  # coarse values, occasional ties
cases.append(np.array([[np.inf, 1.0], [2.0, np.inf], [3.0, 4.0]]))  # inf entries, feasible
out = {}
for i, c in enumerate(cases):
    r, k = linear_sum_assignment(c)
    out[f"cost.{i}"] = torch.from_numpy(np.ascontiguousarray(c))
    out[f"rows.{i}"] = torch.from_numpy(r.astype(np.int64))
    out[f"cols.{i}"] = torch.from_numpy(k.astype(np.int64))
save_file(out, os.path.join(HERE, "lsa_scipy.safetensors"))
print(len(cases), "cases")
