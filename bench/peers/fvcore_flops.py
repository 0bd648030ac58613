"""Peer figure for `ddetr bench flops`: fvcore's FlopCountAnalysis (the counter behind
detectron2's and mmdet's `get_flops`/`analyze_model` tools) of transformers' Deformable DETR, in
eval mode, for one image (batch 1). transformers runs the deformable attention in plain PyTorch
on the CPU (`grid_sample`), so fvcore sees the sampling as well; its FrozenBatchNorm is
elementwise (not counted), as ddetr folds it into the convolutions.

In eval mode transformers (like the official code) runs the class and box heads on every
decoder layer's output, for the auxiliary losses; a deployed graph (ddetr's export, TAO's) runs
them on the last layer only. `aux_heads` is what those extra head calls cost:
(dec - 1) class heads and (dec - 1) box heads, or dec box heads with box refinement (where the
decoder runs box head i for its refinement and the output runs it again).

Usage: python fvcore_flops.py --height H --width W [--backbone resnet50] [--levels 4]
       [--refine] [--two-stage] [--classes 91] [--queries 300] [--enc 6] [--dec 6]
       [--d-model 256] [--heads 8] [--ffn 1024] [--enc-points 4] [--dec-points 4]
Prints one JSON object: fvcore's total, per operator, per top-level module, the ops it skipped,
aux_heads, and `by_module_deployed`: the deployed graph's share per module in ddetr's groups
(`backbone` without the mask resize, `input_proj`, `transformer.encoder`, `transformer.decoder`
without the box refinement's head calls, `transformer.reference_points`, `heads` = the head
calls a deployed graph makes, refinement included).
"""
import argparse
import json
import sys
import warnings

import torch

try:
    from fvcore.nn import FlopCountAnalysis
except ImportError:
    sys.exit("fvcore is not installed in this python: pip install fvcore")
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection


class Detector(torch.nn.Module):
    """The model returning plain tensors (what a deployed graph outputs)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, pixel_mask):
        out = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return out.logits, out.pred_boxes


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--refine", action="store_true")
    p.add_argument("--two-stage", action="store_true")
    p.add_argument("--classes", type=int, default=91)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--enc", type=int, default=6)
    p.add_argument("--dec", type=int, default=6)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--enc-points", type=int, default=4)
    p.add_argument("--dec-points", type=int, default=4)
    a = p.parse_args()
    if a.levels not in (1, 4):
        sys.exit("transformers' Deformable DETR takes the backbone's last level (1) or its last "
                 "three plus one (4): --levels 1 or 4")
    torch.manual_seed(0)
    cfg = DeformableDetrConfig(
        use_timm_backbone=True, backbone=a.backbone, use_pretrained_backbone=False,
        num_queries=a.queries, d_model=a.d_model, encoder_layers=a.enc, decoder_layers=a.dec,
        encoder_ffn_dim=a.ffn, decoder_ffn_dim=a.ffn, encoder_attention_heads=a.heads,
        decoder_attention_heads=a.heads, encoder_n_points=a.enc_points,
        decoder_n_points=a.dec_points,
        num_feature_levels=a.levels, with_box_refine=a.refine, two_stage=a.two_stage,
        two_stage_num_proposals=a.queries, num_labels=a.classes, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, auxiliary_loss=True,
        attn_implementation="eager")  # fvcore counts eager attention's matmuls, not SDPA
    model = Detector(DeformableDetrForObjectDetection(cfg).eval())
    x = torch.randn(1, 3, a.height, a.width)
    mask = torch.ones(1, a.height, a.width, dtype=torch.long)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(model, (x, mask))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = fca.total()
        by_op = dict(fca.by_operator())
        by_module = fca.by_module()
        backbone_ops = fca.by_module_and_operator().get("model.model.backbone", {})
        skipped = dict(fca.unsupported_ops())
    top = {}
    for name, n in by_module.items():
        parts = name.split(".")
        # model.model.<part> (backbone, input_proj, encoder, decoder, …) or model.<head>.<i>
        if len(parts) == 3 and parts[:2] == ["model", "model"]:
            top[parts[2]] = n
        elif len(parts) == 3 and parts[0] == "model" and parts[1] in ("class_embed", "bbox_embed"):
            top[f"{parts[1]}.{parts[2]}"] = n
    d, q = a.d_model, a.queries
    class_call = q * d * a.classes
    bbox_call = q * (2 * d * d + 4 * d)
    aux_heads = (a.dec - 1) * class_call + (a.dec if a.refine else a.dec - 1) * bbox_call
    refine_calls = a.dec * bbox_call if a.refine else 0  # fvcore files them under the decoder
    heads = sum(v for k, v in top.items() if k.split(".")[0] in ("class_embed", "bbox_embed"))
    mask_resize = backbone_ops.get("upsample_nearest2d", 0)  # (the extra level's is outside)
    deployed = {
        "backbone": top.get("backbone", 0) - mask_resize,
        "input_proj": top.get("input_proj", 0),
        "transformer.encoder": top.get("encoder", 0),
        "transformer.decoder": top.get("decoder", 0) - refine_calls,
        "transformer.reference_points": top.get("reference_points", 0),
        "heads": heads + refine_calls - aux_heads,
    }
    print(json.dumps({
        "scope": "detector",
        "model": f"transformers {__import__('transformers').__version__}'s Deformable DETR",
        "aux_heads": aux_heads,
        "by_module_deployed": deployed,
        "total": total,
        "params": sum(t.numel() for t in model.parameters()),
        "by_operator": by_op,
        "by_module": top,
        "skipped": skipped,
        "fvcore": __import__("fvcore").__version__,
        "torch": torch.__version__,
    }, sort_keys=True))


if __name__ == "__main__":
    main()
