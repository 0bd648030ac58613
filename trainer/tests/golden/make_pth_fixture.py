"""Fixture for trainer/tests/torch_pickle.rs: a small checkpoint in the official
Deformable-DETR layout, written by torch.save (`{'model', 'optimizer', 'lr_scheduler', 'epoch',
'args'}` with an argparse.Namespace), holding tensors of several dtypes, a Parameter, a transposed
(non-contiguous) tensor and two views of one storage; the same tensors, contiguous, go to a
safetensors file the test compares against.

Run: $(../shared/peers/venv.sh) trainer/tests/golden/make_pth_fixture.py
"""
import argparse
import collections
import os

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
g = torch.Generator().manual_seed(0)
base = torch.randn(6, 8, generator=g)
model = collections.OrderedDict()
model["transformer.level_embed"] = torch.randn(4, 8, generator=g)
model["class_embed.0.weight"] = torch.nn.Parameter(torch.randn(3, 8, generator=g))
model["class_embed.0.bias"] = torch.full((3,), -4.59511985013459)
model["transformer.decoder.layers.0.self_attn.in_proj_weight"] = base.t()  # non-contiguous view
model["transformer.decoder.layers.0.self_attn.in_proj_bias"] = base[2, 1:5]  # offset view, same storage
model["backbone.0.body.bn1.running_var"] = torch.rand(5, generator=g, dtype=torch.float64)
model["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(7)
model["query_embed.weight"] = torch.randn(2, 3, generator=g).half()
ckpt = {
    "model": model,
    "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 2e-4}]},
    "lr_scheduler": {"step_size": 40, "gamma": 0.1},
    "epoch": 49,
    "args": argparse.Namespace(lr=2e-4, with_box_refine=True, num_feature_levels=4),
}
torch.save(ckpt, os.path.join(HERE, "official_ckpt.pth"))
save_file({k: v.detach().contiguous() for k, v in model.items()}, os.path.join(HERE, "official_ckpt_expected.safetensors"))
print("ok")
