"""TAO's FAN backbone (`FANFPN`, `fan_model_dict` of nvidia_tao_pytorch/cv/dino/model/fan.py over
cv/backbone_v2/fan.py and convnext_utils.py) imported from a checkout of NVIDIA/
tao_pytorch_backend named by $TAO_PYTORCH_BACKEND, with only the package plumbing those files
import stubbed (the backbone registry, `BackboneBase`'s constructor, the Swin class fan.py names
but FAN does not use). Used by trainer/tests/golden/make_fan_fixtures.py and, as the peer of
`ddetr bench step --backbone fan_*`, run as a script:

Usage: python tao_fan.py <variant: tiny|small|base|large> batch height width steps threads
One training step of TAO's FAN backbone alone, as TAO's DINO builds it for training (levels
1-3, stochastic depth 0.3, BatchNorm on batch statistics; TAO's per-block activation
checkpointing off, as ddetr's side runs without it): forward, loss = sum over levels 1-3 of the
mean squared output, backward, AdamW, on CPU."""
import importlib.util
import os
import sys
import time
import types

import torch
import torch.nn as nn


def load_tao(contiguous_layer_norm=False):
    """TAO's dino/model/fan.py module. `contiguous_layer_norm`: TAO's `LayerNorm2d` normalises
    with the unbiased variance when its input is not contiguous (which PyTorch's CPU depthwise
    convolution returns, but not the GPUs TAO trains on); True takes its contiguous path, a
    LayerNorm over the channels, everywhere."""
    root = os.environ.get("TAO_PYTORCH_BACKEND")
    if not root or not os.path.isdir(os.path.join(root, "nvidia_tao_pytorch")):
        sys.exit("set TAO_PYTORCH_BACKEND to a checkout of NVIDIA/tao_pytorch_backend")

    def package(name):
        m = types.ModuleType(name)
        m.__path__ = []
        sys.modules[name] = m
        return m

    for name in ["nvidia_tao_pytorch", "nvidia_tao_pytorch.cv", "nvidia_tao_pytorch.cv.dino",
                 "nvidia_tao_pytorch.cv.dino.model"]:
        package(name)
    v2 = package("nvidia_tao_pytorch.cv.backbone_v2")

    class Registry:
        def register(self):
            return lambda f: f

    v2.BACKBONE_REGISTRY = Registry()
    base = types.ModuleType("nvidia_tao_pytorch.cv.backbone_v2.backbone_base")

    class BackboneBase(nn.Module):
        def __init__(self, in_chans=3, num_classes=1000, activation_checkpoint=False, freeze_at=None,
                     freeze_norm=False, export=False):
            super().__init__()
            self.in_chans, self.num_classes = in_chans, num_classes
            self.activation_checkpoint, self.export = activation_checkpoint, export

    base.BackboneBase = BackboneBase
    sys.modules[base.__name__] = base
    swin = types.ModuleType("nvidia_tao_pytorch.cv.backbone_v2.swin")
    swin.SwinTransformer = object
    sys.modules[swin.__name__] = swin

    def real(name, rel):
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, rel))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    convnext = real("nvidia_tao_pytorch.cv.backbone_v2.convnext_utils",
                    "nvidia_tao_pytorch/cv/backbone_v2/convnext_utils.py")
    if contiguous_layer_norm:
        convnext._is_contiguous = lambda tensor: True
    real("nvidia_tao_pytorch.cv.backbone_v2.fan", "nvidia_tao_pytorch/cv/backbone_v2/fan.py")
    return real("nvidia_tao_pytorch.cv.dino.model.fan", "nvidia_tao_pytorch/cv/dino/model/fan.py")


def main():
    variant, batch, height, width, steps, threads = sys.argv[1], *map(int, sys.argv[2:7])
    tao = load_tao()
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = tao.fan_model_dict[f"fan_{variant}"](out_indices=[1, 2, 3], activation_checkpoint=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    x = torch.randn(batch, 3, height, width)
    print(f"params={sum(p.numel() for p in model.parameters())}")
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        outs = model.forward_feature_pyramid(x)
        loss = sum(o.square().mean() for o in outs.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        print(f"step {i} loss={loss.item():.4f} {times[-1]:.3f}s", flush=True)
    s = sorted(times[1:])
    print(f"tao-fan variant={variant} batch={batch} size={height}x{width} median_step={s[len(s)//2]:.4f}s")


if __name__ == "__main__":
    main()
