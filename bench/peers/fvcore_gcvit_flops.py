"""Peer figure for `ddetr bench flops` with a GCViT backbone: fvcore's FlopCountAnalysis of
timm's GCViT (`forward_features`, eval mode, batch 1), turned into TAO's detection backbone:
- the stages after the last level the detector reads are left out (ddetr does not run them);
- the squeeze-excitation's channel mean is counted as TAO's `AdaptiveAvgPool2d` is (1 per input
  element, fvcore's adaptive_avg_pool2d rule; timm writes it as `mean`, which fvcore skips), and
  its two 1x1 convolutions on the pooled vector as TAO's `Linear` layers are (same count,
  filed under linear);
- TAO's output norm on each returned level is added (a LayerNorm, 5 per element) where timm's
  stage has none: timm's last stage ends in its own LayerNorm, which plays TAO's there.
timm's GCViT is TAO's network only at the size its windows were made for (224x224 for the
window-7 sizes): timm sizes the windows to `img_size`.

Usage: python fvcore_gcvit_flops.py --variant xxtiny --size 224 --levels 0,1,2,3
Prints one JSON object in fvcore_flops.py's schema, scope "backbone".
"""
import argparse
import json
import sys
import warnings

import torch

try:
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import elementwise_flop_counter
except ImportError:
    sys.exit("fvcore is not installed in this python: pip install fvcore")
import timm


class Features(torch.nn.Module):
    def __init__(self, model, last):
        super().__init__()
        self.model, self.last = model, last

    def forward(self, x):
        x = self.model.stem(x)
        outs = []
        for i, stage in enumerate(self.model.stages[: self.last + 1]):
            x = stage(x)
            outs.append(x)
        return tuple(outs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--levels", required=True)
    a = p.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    torch.manual_seed(0)
    model = timm.create_model(f"gcvit_{a.variant}", pretrained=False, num_classes=0).eval()
    net = Features(model, max(levels)).eval()
    x = torch.randn(1, 3, a.size, a.size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        outs = net(x)
        fca = FlopCountAnalysis(net, x)
        fca.set_op_handle("aten::mean", elementwise_flop_counter(1, 0))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = fca.total()
        by_op = dict(fca.by_operator())
        se_convs = sum(ops.get("conv", 0) for name, ops in fca.by_module_and_operator().items()
                       if name.endswith((".se.fc1", ".se.fc2")))
    by_op["conv"] -= se_convs
    by_op["linear"] = by_op.get("linear", 0) + se_convs
    level_norms = sum(5 * outs[i].numel() for i in levels
                      if not isinstance(net.model.stages[i].norm, torch.nn.LayerNorm))
    by_op["layer_norm"] = by_op.get("layer_norm", 0) + level_norms
    by_op["adaptive_avg_pool2d"] = by_op.pop("mean", 0)
    total += level_norms
    print(json.dumps({
        "scope": "backbone",
        "total": total,
        "aux_heads": 0,
        "params": sum(t.numel() for t in net.parameters()),
        "by_operator": by_op,
        "by_module_deployed": {"backbone": total},
        "level_norms": level_norms,
        "model": f"timm {timm.__version__}'s gcvit_{a.variant}",
        "fvcore": __import__("fvcore").__version__,
    }, sort_keys=True))


if __name__ == "__main__":
    main()
