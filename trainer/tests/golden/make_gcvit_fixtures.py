"""Golden fixtures for the GCViT backbone (trainer/tests/gcvit_parity.rs).

Reference: timm's `GlobalContextVit` (timm/models/gcvit.py), built for 224² inputs so its window
sizes are TAO's (7, 7, 14, 7) and its global-query blocks are TAO's (3, 2, 1, 1 of them), in eval
mode. At 224² the network runs unmodified. TAO's detection GCViT
(nvidia_tao_pytorch/cv/deformable_detr/model/gc_vit.py, over cv/backbone/gc_vit.py) runs any
input size with two rules timm lacks, substituted here into timm's own modules:
  * a block pads its normalised input with zeros at the right and bottom to a multiple of the
    window (`F.pad`), attends over the padded windows, and crops the result;
  * a stage's global query is resized to the window size by bicubic interpolation
    (`F.interpolate(..., mode='bicubic')`, align_corners False) when the pooled map differs.

Weights: every tensor is `fill(tao_key)` (make_model_fixtures.py; mirrored in
trainer/tests/common/mod.rs) where `tao_key` is the TAO name of timm's tensor through
`timm_to_tao` — the same documented key map trainer/src/model/gcvit.rs implements — so the test
fills ddetr's TAO-named variables by their own names. Stored per case: the four stage outputs
(timm's stage outputs before the last stage's norm = TAO's level outputs before the `norm{i}`
layers; and after it, = TAO's `norm3`), as channels 0..1 in full plus per-channel and
per-position means, so the fixture stays small.

Also writes timm's gcvit_xxtiny state-dict keys (with its 1000-class head) and shapes with this
script's TAO name for each, for the key-map and `model.pretrained_backbone_path` tests.

Run: $(../shared/peers/venv.sh) trainer/tests/golden/make_gcvit_fixtures.py
Writes trainer/tests/golden/gcvit_{xxtiny,tiny}.safetensors and gcvit_xxtiny_timm_keys.json.
"""
import json
import os
import re
import sys

import torch
import torch.nn.functional as F
import timm
from timm.models import gcvit
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_model_fixtures import fill, hash_uniform  # noqa: E402

torch.set_num_threads(1)

KEPT_CHANNELS = 2
# (height, width): 224² is a multiple of every window; 200×264 is not (stage maps 50×66, 25×33,
# 13×17, 7×9 against windows 7, 7, 14, 7) and pools to global queries of another size.
SIZES = [(224, 224), (200, 264)]


def timm_to_tao(k: str):
    """TAO's name of timm's GCViT key; None for keys TAO lacks (classifier head, index buffers)."""
    if k.startswith("head.") or k.endswith("relative_position_index"):
        return None
    k = k.replace("stem.conv1.", "patch_embed.proj.").replace("stem.down.", "patch_embed.conv_down.")
    m = re.match(r"stages\.(\d+)\.downsample\.(.*)", k)
    if m:
        k = f"levels.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
    m = re.match(r"stages\.(\d+)\.global_block\.blocks\.conv(\d+)\.(.*)", k)
    if m:
        k = f"levels.{m.group(1)}.q_global_gen.to_q_global.{int(m.group(2)) - 1}.{m.group(3)}"
    k = re.sub(r"^stages\.3\.norm\.", "norm3.", k)
    k = re.sub(r"^stages\.", "levels.", k)
    for a, b in [("conv_block.", ""), ("conv_dw.", "conv.0."), ("se.fc1.", "conv.2.fc.0."),
                 ("se.fc2.", "conv.2.fc.2."), ("conv_pw.", "conv.3."), ("attn.rel_pos.", "attn."),
                 ("ls1.gamma", "gamma1"), ("ls2.gamma", "gamma2")]:
        k = k.replace(a, b)
    return k


def padded_window_attn(self, x, q_global=None):
    B, H, W, C = x.shape
    wh, ww = self.window_size
    pad_b, pad_r = (wh - H % wh) % wh, (ww - W % ww) % ww
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    Hp, Wp = H + pad_b, W + pad_r
    x_win = gcvit.window_partition(x, self.window_size).view(-1, wh * ww, C)
    out = gcvit.window_reverse(self.attn(x_win, q_global), self.window_size, (Hp, Wp))
    return out[:, :H, :W, :].contiguous()


def stage_forward(self, x):
    x = self.downsample(x)
    gq = self.global_block(x)
    ws = self.blocks[0].window_size
    if tuple(gq.shape[-2:]) != tuple(ws):
        gq = F.interpolate(gq, size=ws, mode="bicubic")
    x = x.permute(0, 2, 3, 1)
    gq = self.global_norm(gq.permute(0, 2, 3, 1))
    for blk in self.blocks:
        x = blk(x, gq)
    x = self.norm(x)
    return x.permute(0, 3, 1, 2).contiguous()


gcvit.GlobalContextVitBlock._window_attn = padded_window_attn
gcvit.GlobalContextVitStage.forward = stage_forward


def main():
    classifier = timm.create_model("gcvit_xxtiny", pretrained=False, img_size=224)
    keys = [[k, list(t.shape), timm_to_tao(k)] for k, t in classifier.state_dict().items()]
    with open(os.path.join(HERE, "gcvit_xxtiny_timm_keys.json"), "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(k) for k in keys) + "\n]\n")
    for name in ["xxtiny", "tiny"]:
        model = timm.create_model(f"gcvit_{name}", pretrained=False, img_size=224, num_classes=0).eval()
        tao_keys = []
        with torch.no_grad():
            for k, t in model.state_dict().items():
                tao = timm_to_tao(k)
                if tao is None:
                    continue
                tao_keys.append(tao)
                t.copy_(fill(tao, list(t.shape)).reshape(t.shape))
        out = {}
        for ci, (h, w) in enumerate(SIZES):
            # The input is hash_uniform("gcvit.input.{h}x{w}") (mirrored by the test), not stored.
            x = torch.from_numpy(hash_uniform(f"gcvit.input.{h}x{w}", 2 * 3 * h * w).astype("float32"))
            x = x.reshape(2, 3, h, w)
            with torch.no_grad():
                y = model.stem(x)
                for s, stage in enumerate(model.stages):
                    y = stage(y)
                    out[f"case{ci}.stage{s}.channels"] = y[:, :KEPT_CHANNELS].contiguous()
                    out[f"case{ci}.stage{s}.channel_mean"] = y.mean((2, 3))
                    out[f"case{ci}.stage{s}.position_mean"] = y.mean(1)
        print(f"gcvit_{name}: {len(tao_keys)} tensors, {sum(p.numel() for p in model.parameters())} parameters")
        save_file(out, os.path.join(HERE, f"gcvit_{name}.safetensors"))


if __name__ == "__main__":
    main()
