"""Peer figure for `ddetr bench flops` with a FAN backbone: fvcore's FlopCountAnalysis of TAO's own
FANFPN (tao_fan.py beside this script imports it from $TAO_PYTORCH_BACKEND), eval mode, batch 1,
the levels the detector reads, as TAO's export runs it:
- the class attention through its explicit matmuls (TAO's ONNX-export path; fvcore has no rule
  for scaled_dot_product_attention);
- the ConvNeXt's 1x1 convolutions (`mlp.fc1`, `mlp.fc2`) filed as the linear layers they are
  (same count);
- the position encoding's 1x1 projection left out and reported apart: it depends on the input
  size only, and ddetr's graph holds its result as a constant;
- the ConvNeXt's LayerNorm2d on its contiguous path, a LayerNorm (as on a GPU; on a CPU TAO's
  layer takes a var_mean path for PyTorch's channels-last depthwise output, which fvcore has no
  rule for and would not count).

Usage: python fvcore_fan_flops.py --variant small --height 544 --width 960 --levels 1,2,3
Prints one JSON object in fvcore_flops.py's schema, scope "backbone".
"""
import argparse
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from fvcore.nn import FlopCountAnalysis
except ImportError:
    sys.exit("fvcore is not installed in this python: pip install fvcore")
from tao_fan import load_tao  # noqa: E402


class Pyramid(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model.forward_feature_pyramid(x).values())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--levels", required=True)
    a = p.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    tao = load_tao(contiguous_layer_norm=True)
    torch.manual_seed(0)
    model = tao.fan_model_dict[f"fan_{a.variant}"](out_indices=levels, activation_checkpoint=False).eval()
    for m in model.modules():
        if hasattr(m, "fast_attn"):
            m.fast_attn = False
    net = Pyramid(model).eval()
    x = torch.randn(1, 3, a.height, a.width)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(net, x)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = fca.total()
        by_op = dict(fca.by_operator())
        per_module = fca.by_module_and_operator()
    pointwise = sum(ops.get("conv", 0) for name, ops in per_module.items()
                    if name.startswith("model.patch_embed.backbone.") and name.endswith((".mlp.fc1", ".mlp.fc2")))
    position = sum(per_module.get("model.pos_embed.token_projection", {}).values())
    by_op["conv"] -= pointwise + position
    by_op["linear"] = by_op.get("linear", 0) + pointwise
    total -= position
    print(json.dumps({
        "scope": "backbone",
        "total": total,
        "aux_heads": 0,
        "params": sum(t.numel() for t in model.parameters()),
        "by_operator": by_op,
        "by_module_deployed": {"backbone": total},
        "position_projection": position,
        "note": "TAO's FANFPN, the levels the detector reads; the position encoding's projection "
                f"({position / 1e9:.4f} G, a constant in ddetr's graph) left out",
        "model": f"TAO's fan_{a.variant} (FANFPN)",
        "fvcore": __import__("fvcore").__version__,
    }, sort_keys=True))


if __name__ == "__main__":
    main()
