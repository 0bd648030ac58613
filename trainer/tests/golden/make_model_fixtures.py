"""Golden fixtures for the trainer's model parity tests (trainer/tests/model_parity.rs).

Reference: transformers' DeformableDetrForObjectDetection (timm ResNet-18 backbone) configured to
the official fundamentalvision/Deformable-DETR semantics: heads shared across decoder layers
without box refinement and independent with it, `model.decoder.bbox_embed`/`class_embed` aliasing
the top-level heads, eval mode. Losses follow the official `SetCriterion` (focal class loss with
cls coef 2, L1, GIoU, aux per decoder layer, two-stage encoder loss with every label set to 0) on
matches from scipy's `linear_sum_assignment` over the official matcher cost.

Weights: every tensor is filled from a counter-based hash of its *official* state-dict key
(`fill` below, reproduced bit for bit by `trainer/tests/common/mod.rs`), so fixtures stay small;
each fixture stores a per-key checksum so a drift in either copy of the rule is caught. HF names
reach official keys through `hf_to_official` — the same documented map `trainer/src/weights.rs`
uses. The `l1` fixture additionally stores the transformer and head weights (all but backbone and
input_proj) under transformers' names, prefixed `hf.`, to test that loader.

Run: $(../shared/peers/venv.sh) trainer/tests/golden/make_model_fixtures.py
Writes trainer/tests/golden/model_*.safetensors.
"""
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from scipy.optimize import linear_sum_assignment
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------
# Deterministic fill (mirror of trainer/tests/common/mod.rs)

M64 = (1 << 64) - 1


def fnv1a32(s: str) -> int:
    h = 0x811C9DC5
    for b in s.encode():
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def hash_uniform(key: str, n: int) -> np.ndarray:
    """n values in [-1, 1): splitmix64 of (fnv1a32(key), i), top 24 bits."""
    seed = np.uint64(fnv1a32(key))
    i = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = seed * np.uint64(0x100000001) + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    return 2.0 * u - 1.0


def fill(key: str, shape) -> torch.Tensor:
    n = int(np.prod(shape)) if len(shape) else 1
    v = hash_uniform(key, n)
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        v = v * math.sqrt(3.0 / fan_in)
    elif key.endswith("running_var"):
        v = 1.0 + 0.5 * v
    elif key.endswith("running_mean"):
        v = 0.1 * v
    elif key.endswith("sampling_offsets.bias"):
        v = 2.0 * v
    elif key.endswith("weight"):
        v = 1.0 + 0.1 * v
    else:
        v = 0.1 * v
    return torch.from_numpy(v.astype(np.float32)).reshape(shape)


# ---------------------------------------------------------------------------------------------
# transformers → official key map (documented in trainer/src/weights.rs)

ENC_RENAMES = [("self_attn_layer_norm", "norm1"), ("final_layer_norm", "norm2"), ("mlp.fc1", "linear1"),
               ("mlp.fc2", "linear2"), ("fc1", "linear1"), ("fc2", "linear2")]
DEC_RENAMES = [("encoder_attn_layer_norm", "norm1"), ("self_attn_layer_norm", "norm2"), ("final_layer_norm", "norm3"),
               ("encoder_attn", "cross_attn"), ("mlp.fc1", "linear1"), ("mlp.fc2", "linear2"), ("fc1", "linear1"),
               ("fc2", "linear2"), ("self_attn.o_proj", "self_attn.out_proj")]
QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def hf_to_official(k: str):
    """(official key, packed row block or None) for a transformers key; None for aliases."""
    if k.startswith("model.decoder.bbox_embed") or k.startswith("model.decoder.class_embed"):
        return None
    for pre in ("model.backbone.conv_encoder.model.", "model.backbone.model."):
        if k.startswith(pre):
            return "backbone.0.body." + k[len(pre):], None
    if k.startswith("class_embed") or k.startswith("bbox_embed"):
        return k, None
    if k.startswith("model.input_proj"):
        return k[len("model."):], None
    if k == "model.query_position_embeddings.weight":
        return "query_embed.weight", None
    k = "transformer." + k[len("model."):]
    if ".encoder.layers." in k:
        for a, b in ENC_RENAMES:
            k = k.replace("." + a + ".", "." + b + ".")
    if ".decoder.layers." in k:
        for a, b in DEC_RENAMES:
            k = k.replace("." + a + ".", "." + b + ".")
        m = re.search(r"\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)$", k)
        if m:
            return k[: m.start()] + ".self_attn.in_proj_" + m.group(2), QKV[m.group(1)]
    return k, None


# ---------------------------------------------------------------------------------------------
# Official criterion and matcher (models/matcher.py, models/deformable_detr.py SetCriterion)

def box_cxcywh_to_xyxy(x):
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def generalized_box_iou(a, b):
    area1 = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area2 = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[:, :2])
    rb = torch.min(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    iou = inter / union
    lt = torch.min(a[:, None, :2], b[:, :2])
    rb = torch.max(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


COST_CLASS, COST_BBOX, COST_GIOU = 2.0, 5.0, 2.0
ALPHA, GAMMA = 0.25, 2.0


@torch.no_grad()
def match(logits, boxes, targets):
    bs, nq = logits.shape[:2]
    prob = logits.flatten(0, 1).sigmoid()
    out_bbox = boxes.flatten(0, 1)
    tgt_ids = torch.cat([t["labels"] for t in targets])
    tgt_bbox = torch.cat([t["boxes"] for t in targets])
    neg = (1 - ALPHA) * (prob ** GAMMA) * (-(1 - prob + 1e-8).log())
    pos = ALPHA * ((1 - prob) ** GAMMA) * (-(prob + 1e-8).log())
    cost_class = pos[:, tgt_ids] - neg[:, tgt_ids]
    cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
    cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
    C = (COST_BBOX * cost_bbox + COST_CLASS * cost_class + COST_GIOU * cost_giou).view(bs, nq, -1)
    sizes = [len(t["boxes"]) for t in targets]
    out = []
    for i, c in enumerate(C.split(sizes, -1)):
        r, col = linear_sum_assignment(c[i].numpy())
        out.append((torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(col, dtype=torch.int64)))
    return out


def sigmoid_focal_loss(inputs, targets, num_boxes):
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** GAMMA)
    alpha_t = ALPHA * targets + (1 - ALPHA) * (1 - targets)
    loss = alpha_t * loss
    return loss.mean(1).sum() / num_boxes


def layer_losses(logits, boxes, targets, indices, num_boxes):
    num_classes = logits.shape[2]
    batch_idx = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)])
    src_idx = torch.cat([s for s, _ in indices])
    tco = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
    tc = torch.full(logits.shape[:2], num_classes, dtype=torch.int64)
    tc[batch_idx, src_idx] = tco
    onehot = torch.zeros(logits.shape[0], logits.shape[1], num_classes + 1)
    onehot.scatter_(2, tc.unsqueeze(-1), 1)
    onehot = onehot[:, :, :-1]
    loss_ce = sigmoid_focal_loss(logits, onehot, num_boxes) * logits.shape[1]
    src_boxes = boxes[batch_idx, src_idx]
    tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
    loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
    loss_giou = (1 - torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes),
                                                    box_cxcywh_to_xyxy(tgt_boxes)))).sum() / num_boxes
    return loss_ce, loss_bbox, loss_giou


# ---------------------------------------------------------------------------------------------
# Configurations

BATCH, H, W = 2, 64, 72
VALID = [(64, 72), (48, 56)]  # (h, w) of each image's unpadded area
NUM_CLASSES, NUM_QUERIES, D_MODEL = 5, 12, 32
ORIG_SIZES = [(480, 640), (300, 200)]  # (h, w) the post-process scales to

CASES = {
    # name: (levels, refine, two_stage)
    "l1": (1, False, False),
    "l4": (4, False, False),
    "l4_refine": (4, True, False),
    "l1_refine": (1, True, False),
    "l4_two_stage": (4, True, True),
}


def build(levels, refine, two_stage):
    cfg = DeformableDetrConfig(
        use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False, num_queries=NUM_QUERIES,
        d_model=D_MODEL, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=8, decoder_attention_heads=8, encoder_n_points=4, decoder_n_points=2,
        num_feature_levels=levels, with_box_refine=refine, two_stage=two_stage,
        two_stage_num_proposals=NUM_QUERIES, num_labels=NUM_CLASSES, dropout=0.0, auxiliary_loss=True)
    model = DeformableDetrForObjectDetection(cfg).eval()
    # transformers v5 ties class_embed.N / bbox_embed.N (N > 0) to head 0; the official model with
    # box refinement has independent copies, so break the ties before loading.
    import copy
    for heads in (model.class_embed, model.bbox_embed):
        for i in range(len(heads)):
            heads[i] = copy.deepcopy(heads[i])
    sd = model.state_dict()
    new_sd, checks, hf_named = {}, {}, {}
    for k, v in sd.items():
        mapped = hf_to_official(k)
        if mapped is None:
            continue
        ok, block = mapped
        if not refine and (ok.startswith("class_embed.") or ok.startswith("bbox_embed.")):
            ok = re.sub(r"^(class_embed|bbox_embed)\.\d+", r"\1.0", ok)  # one shared head upstream
        if block is None:
            t = fill(ok, list(v.shape))
            checks[ok] = t.double().sum().item()
        else:
            d = v.shape[0]
            full = fill(ok, [3 * d] + list(v.shape[1:]))
            t = full[block * d:(block + 1) * d].clone()
            checks[ok] = full.double().sum().item()
        assert t.shape == v.shape, (k, ok, t.shape, v.shape)
        new_sd[k] = t
        if not k.startswith("model.backbone") and not k.startswith("model.input_proj"):
            hf_named[k] = t
    model.load_state_dict(new_sd, strict=False)
    # Official aliasing: the decoder's refine/two-stage heads are the top-level heads.
    if refine:
        model.model.decoder.bbox_embed = model.bbox_embed
    if two_stage:
        model.model.decoder.class_embed = model.class_embed
    if refine:
        assert model.class_embed[0].weight.data_ptr() != model.class_embed[1].weight.data_ptr()
        assert torch.equal(model.class_embed[1].weight, fill("class_embed.1.weight", [NUM_CLASSES, D_MODEL]))
    missing = [k for k in sd if hf_to_official(k) is not None and k not in new_sd]
    assert not missing, missing
    return model, checks, hf_named


def inputs():
    g = torch.Generator().manual_seed(0)
    # Values representable in f16 so the stored f16 copy is exact.
    images = torch.randn(BATCH, 3, H, W, generator=g).half().float()
    mask = torch.ones(BATCH, H, W, dtype=torch.bool)  # True = padding (official convention)
    for b, (vh, vw) in enumerate(VALID):
        mask[b, :vh, :vw] = False
        images[b, :, vh:, :] = 0
        images[b, :, :, vw:] = 0
    targets = [
        {"labels": torch.tensor([1, 3, 3], dtype=torch.int64),
         "boxes": torch.tensor([[0.30, 0.40, 0.20, 0.30], [0.60, 0.55, 0.35, 0.25], [0.50, 0.50, 0.90, 0.80]])},
        {"labels": torch.tensor([4, 0], dtype=torch.int64),
         "boxes": torch.tensor([[0.25, 0.70, 0.30, 0.20], [0.70, 0.30, 0.15, 0.40]])},
    ]
    return images, mask, targets


def main():
    images, mask, targets = inputs()
    tensors = {"images": images.half(), "mask": mask.to(torch.uint8)}
    for i, t in enumerate(targets):
        tensors[f"target{i}.labels"] = t["labels"]
        tensors[f"target{i}.boxes"] = t["boxes"]
    save_file(tensors, os.path.join(HERE, "model_inputs.safetensors"))

    for name, (levels, refine, two_stage) in CASES.items():
        model, checks, hf_named = build(levels, refine, two_stage)
        with torch.no_grad():
            out = model(pixel_values=images, pixel_mask=(~mask).long(), output_hidden_states=False)
        # Per-layer predictions: recompute as the model's forward does (class/bbox heads on every
        # decoder layer); transformers returns only the last layer, the aux ones via the loss path.
        hs = out.intermediate_hidden_states
        init_ref, inter = out.init_reference_points, out.intermediate_reference_points
        all_logits, all_boxes = [], []
        with torch.no_grad():
            for lvl in range(hs.shape[1]):
                r = init_ref if lvl == 0 else inter[:, lvl - 1]
                r = r.clamp(min=0, max=1)  # util/misc.py inverse_sigmoid
                r = torch.log(r.clamp(min=1e-5) / (1 - r).clamp(min=1e-5))
                lg = model.class_embed[lvl](hs[:, lvl])
                dl = model.bbox_embed[lvl](hs[:, lvl])
                if r.shape[-1] == 4:
                    dl = dl + r
                else:
                    dl[..., :2] += r
                all_logits.append(lg)
                all_boxes.append(dl.sigmoid())
        L = torch.stack(all_logits)
        B = torch.stack(all_boxes)
        assert torch.equal(L[-1], out.logits) and torch.equal(B[-1], out.pred_boxes)
        fx = {"logits": L.contiguous(), "boxes": B.contiguous()}
        # Matching and losses, official criterion.
        num_boxes = float(max(sum(len(t["labels"]) for t in targets), 1))
        for lvl in range(L.shape[0]):
            idx = match(L[lvl], B[lvl], targets)
            for b, (r, c) in enumerate(idx):
                fx[f"match.{lvl}.{b}.src"] = r
                fx[f"match.{lvl}.{b}.tgt"] = c
            ce, l1, giou = layer_losses(L[lvl], B[lvl], targets, idx, num_boxes)
            fx[f"loss.{lvl}"] = torch.tensor([ce.item(), l1.item(), giou.item()], dtype=torch.float64)
        if two_stage:
            el, eb = out.enc_outputs_class, out.enc_outputs_coord_logits.sigmoid()
            fx["enc_logits"] = el.contiguous()
            fx["enc_boxes"] = eb.contiguous()
            bin_t = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
            idx = match(el, eb, bin_t)
            for b, (r, c) in enumerate(idx):
                fx[f"match.enc.{b}.src"] = r
                fx[f"match.enc.{b}.tgt"] = c
            ce, l1, giou = layer_losses(el, eb, bin_t, idx, num_boxes)
            fx["loss.enc"] = torch.tensor([ce.item(), l1.item(), giou.item()], dtype=torch.float64)
        # Official PostProcess (top-k over queries × classes, xyxy in original pixels), k = 7.
        prob = L[-1].sigmoid()
        sc, ix = torch.topk(prob.view(BATCH, -1), 7, dim=1)
        q_idx, lab = ix // NUM_CLASSES, ix % NUM_CLASSES
        xyxy = torch.gather(box_cxcywh_to_xyxy(B[-1]), 1, q_idx.unsqueeze(-1).repeat(1, 1, 4))
        sizes = torch.tensor(ORIG_SIZES, dtype=torch.float32)
        img_h, img_w = sizes.unbind(1)
        xyxy = xyxy * torch.stack([img_w, img_h, img_w, img_h], 1)[:, None, :]
        fx["post.scores"], fx["post.labels"], fx["post.boxes"] = sc.contiguous(), lab.contiguous(), xyxy.contiguous()
        for k, s in checks.items():
            fx["checksum." + k] = torch.tensor([s], dtype=torch.float64)
        if name == "l1":
            for k, t in hf_named.items():
                fx["hf." + k] = t.contiguous()
        save_file(fx, os.path.join(HERE, f"model_{name}.safetensors"))
        print(name, "layers", L.shape[0], "keys", len(checks), "loss", [fx[f"loss.{i}"].tolist() for i in range(L.shape[0])])


if __name__ == "__main__":
    main()
