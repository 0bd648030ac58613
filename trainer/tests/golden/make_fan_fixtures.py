"""Golden fixtures for the FAN backbone (trainer/tests/fan_parity.rs).

Reference: TAO's own code — `FANFPN` and `fan_model_dict` of nvidia_tao_pytorch/cv/dino/model/
fan.py, over cv/backbone_v2/fan.py (`FAN`, `FANBlock`, `TokenMixing`, `ChannelProcessing`,
`ClassAttentionBlock`, `PositionalEncodingFourier`, `HybridEmbed`) and cv/backbone_v2/
convnext_utils.py (`ConvNeXtFANBackbone`) — imported from a checkout of NVIDIA/
tao_pytorch_backend named by $TAO_PYTORCH_BACKEND by bench/peers/tao_fan.py, which stubs only the
package plumbing those files import; the network code runs as TAO ships it, with one substitution:
TAO's `LayerNorm2d` normalises with the unbiased variance (`torch.var_mean`) when its input is
not contiguous, which PyTorch's CPU depthwise convolution returns (channels-last) but the GPUs
TAO trains on do not; the fixture takes the layer's contiguous path (a LayerNorm over the
channels) everywhere, as on a GPU.

Weights: every tensor of TAO's state dict is `fill(key)` (make_model_fixtures.py; mirrored in
trainer/tests/common/mod.rs), so the test fills ddetr's TAO-named variables by their own names
(`num_batches_tracked` has no ddetr variable). Inputs are `hash_uniform("fan.input.{h}x{w}")`.
Stored per case and returned level (TAO's `out_indices` [0, 1, 2, 3], each after its
`out_norm{i}`): channels 0..1 in full (eval cases) and the per-channel and per-position means.
Cases: fan_tiny in eval mode at 224x224 and at 200x264 (not a multiple of 32: the patch
projection floors 25x33 to 12x16), fan_tiny in training mode with stochastic depth off (the
depthwise MLP's BatchNorm on batch statistics), fan_small in eval mode at 224x224.

Run: TAO_PYTORCH_BACKEND=<checkout> $(../shared/peers/venv.sh) trainer/tests/golden/make_fan_fixtures.py
(tao_pytorch_backend @ 3a8a971b817d9bcffb64bc17359d91f0dce4262e made the committed files.)
Writes trainer/tests/golden/fan_{tiny,small}.safetensors.
"""
import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "bench", "peers"))
from make_model_fixtures import fill, hash_uniform  # noqa: E402
from tao_fan import load_tao  # noqa: E402

torch.set_num_threads(1)
KEPT_CHANNELS = 2
OUT_INDICES = [0, 1, 2, 3]


def filled(tao, name):
    model = tao.fan_model_dict[name](out_indices=OUT_INDICES, activation_checkpoint=False)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if k.endswith("num_batches_tracked"):
                continue
            t.copy_(fill(k, list(t.shape)).reshape(t.shape))
    return model


def record(out, prefix, feats, keep_channels):
    for i in OUT_INDICES:
        y = feats[f"p{i}"]
        if keep_channels:
            out[f"{prefix}.level{i}.channels"] = y[:, :KEPT_CHANNELS].contiguous()
        out[f"{prefix}.level{i}.channel_mean"] = y.mean((2, 3)).contiguous()
        out[f"{prefix}.level{i}.position_mean"] = y.mean(1).contiguous()


def run(model, h, w, train):
    x = torch.from_numpy(hash_uniform(f"fan.input.{h}x{w}", 2 * 3 * h * w).astype("float32"))
    x = x.reshape(2, 3, h, w)
    model.train(train)
    with torch.no_grad():
        return model.forward_feature_pyramid(x)


def main():
    tao = load_tao(contiguous_layer_norm=True)
    out = {}
    tiny = filled(tao, "fan_tiny")
    for ci, (h, w) in enumerate([(224, 224), (200, 264)]):
        record(out, f"eval{ci}", run(tiny, h, w, False), True)
    for m in tiny.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    record(out, "train0", run(tiny, 224, 224, True), False)
    print(f"fan_tiny: {sum(p.numel() for p in tiny.parameters())} parameters")
    save_file(out, os.path.join(HERE, "fan_tiny.safetensors"))
    small = filled(tao, "fan_small")
    out = {}
    record(out, "eval0", run(small, 224, 224, False), True)
    print(f"fan_small: {sum(p.numel() for p in small.parameters())} parameters")
    save_file(out, os.path.join(HERE, "fan_small.safetensors"))


if __name__ == "__main__":
    main()
