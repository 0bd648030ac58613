"""Golden fixture for one training step at TAO's model defaults (trainer/tests/train_step_parity.rs).

Reference: transformers' DeformableDetrForObjectDetection in TAO Deformable DETR's default model
configuration — timm ResNet-50 (FrozenBatchNorm), return_interm_indices [1, 2, 3, 4] (4 levels,
the 4th an extra stride-2 conv on C5), 6 + 6 layers, 300 queries, d_model 256, 8 heads, FFN 1024,
4 + 4 sampling points, with_box_refine, auxiliary loss, focal alpha 0.25, matcher costs
class 2 / bbox 5 / giou 2, 91 classes (TAO's dataset.num_classes default) — except dropout 0:
TAO's dropout_ratio 0.3 draws random masks that two implementations cannot share. The heads are
independent per decoder layer and the decoder's refinement heads alias the top-level ones, as in
the official model (see make_model_fixtures.py).

Trainable set: upstream (and TAO) freeze every backbone parameter whose name lacks
layer2/layer3/layer4 — the stem and layer1. transformers 5.x does not for a timm backbone (it tests
"resnet" in the backbone config's model_type, which is "timm_backbone"), so upstream's rule is
applied here.

Weights: every tensor is the shared `fill` of its official key (make_model_fixtures.py), except
the class heads' bias, which is upstream's prior −log(0.99/0.01) as at the start of training
(with the fill alone loss_ce would be thousands and drown the box terms).

The model runs in train mode on a batch of two images of different sizes, zero-padded to one
size, with the pixel mask and labels. transformers' loss dict (DeformableDetrHungarianMatcher at
costs 2/5/2; num_boxes = the batch's target boxes, clamped to 1, on one process) is checked
against the official SetCriterion of make_model_fixtures.py, then weighted as TAO weights it —
2·loss_ce + 5·loss_bbox + 2·loss_giou over the final and the five auxiliary layers
(transformers' own `loss` weights loss_ce by 1, not by cls_loss_coef) — and backward runs on that
total.

The step runs twice on the same f32 weights and inputs: in float64, which is what is stored (the
truth an fp32 implementation is measured against), and in float32, whose distance from the
float64 gradients — transformers' own fp32 error — is stored too, as the scale the Rust test's
tolerances are set against. Both runs must match the same predictions to the same targets.

Stored (the images are not: they are 2·hash_uniform("train_step.images") with the padding
zeroed, which tests/common/mod.rs reproduces; only their checksums are kept):
  valid: (h, w) of each image's unpadded area; target<i>.labels / .boxes;
  images.checksum / images.abs_checksum: Σ x and Σ |x| of the padded batch;
  loss.<term>: every loss term (f64); loss.total_tao; loss.total_hf (transformers' own total);
  weights.count / weights.checksum: number of filled tensors and Σ of their sums;
  grad.<official key>.norm / .idx / .val: for every trainable parameter, the f64 gradient's L2
    norm and SAMPLES entries at seeded random flat indices (i32) (f64);
  frozen.<official key>: a byte per frozen backbone parameter;
  ref_fp32.norm_err / ref_fp32.entry_err: the worst error of transformers' own fp32 gradients
    against the f64 ones, in the Rust test's two measures.

Run: $(../shared/peers/venv.sh) trainer/tests/golden/make_train_step_fixture.py
Writes trainer/tests/golden/train_step_r50.safetensors.
"""
import copy
import math
import os
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_model_fixtures import fill, hash_uniform, hf_to_official, layer_losses, match  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

# ---------------------------------------------------------------------------------------------
# Configuration: TAO defaults (nvidia_tao_core deformable_detr model schema), dropout 0.

NUM_CLASSES = 91
NUM_QUERIES = 300
DEC_LAYERS = 6
COEF = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}  # cls / bbox / giou loss coefficients
H, W = 384, 480  # padded batch size
VALID = [(384, 480), (296, 360)]  # (h, w) of each image's unpadded area
SAMPLES = 64  # gradient entries stored per parameter
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)
IMAGE_KEY = "train_step.images"

TARGETS = [
    {"labels": [1, 18, 62],
     "boxes": [[0.30, 0.40, 0.20, 0.30], [0.62, 0.55, 0.35, 0.25], [0.50, 0.50, 0.90, 0.80]]},
    {"labels": [90, 3],
     "boxes": [[0.25, 0.70, 0.30, 0.20], [0.70, 0.30, 0.15, 0.40]]},
]


def build():
    cfg = DeformableDetrConfig(
        use_timm_backbone=True, backbone="resnet50", use_pretrained_backbone=False, num_queries=NUM_QUERIES,
        d_model=256, encoder_layers=6, decoder_layers=DEC_LAYERS, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
        encoder_attention_heads=8, decoder_attention_heads=8, encoder_n_points=4, decoder_n_points=4,
        num_feature_levels=4, with_box_refine=True, two_stage=False, num_labels=NUM_CLASSES,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, auxiliary_loss=True,
        class_cost=2, bbox_cost=5, giou_cost=2, bbox_loss_coefficient=5, giou_loss_coefficient=2,
        focal_alpha=0.25)
    model = DeformableDetrForObjectDetection(cfg)
    # transformers v5 ties class_embed.N / bbox_embed.N (N > 0) to head 0; the official model with
    # box refinement has independent copies.
    for heads in (model.class_embed, model.bbox_embed):
        for i in range(len(heads)):
            heads[i] = copy.deepcopy(heads[i])
    sd = model.state_dict()
    new_sd, filled = {}, {}
    for k, v in sd.items():
        mapped = hf_to_official(k)
        if mapped is None:
            continue
        ok, block = mapped
        if block is None:
            full = fill(ok, list(v.shape))
            t = full
        else:
            d = v.shape[0]
            full = fill(ok, [3 * d] + list(v.shape[1:]))
            t = full[block * d:(block + 1) * d].clone()
        filled[ok] = full
        assert t.shape == v.shape, (k, ok, t.shape, v.shape)
        new_sd[k] = t
    model.load_state_dict(new_sd, strict=False)
    missing = [k for k in sd if hf_to_official(k) is not None and k not in new_sd]
    assert not missing, missing
    # Official aliasing: the decoder's refinement heads are the top-level heads.
    model.model.decoder.bbox_embed = model.bbox_embed
    assert model.class_embed[0].weight.data_ptr() != model.class_embed[1].weight.data_ptr()
    assert model.bbox_embed[0].layers[0].weight.data_ptr() != model.bbox_embed[1].layers[0].weight.data_ptr()
    # The official class-head prior (deformable_detr.py: bias = -log((1 - 0.01) / 0.01)), so that
    # the focal loss is the size it is at the start of training rather than thousands.
    with torch.no_grad():
        for head in model.class_embed:
            head.bias.fill_(PRIOR_BIAS)
    for l in range(DEC_LAYERS):
        filled[f"class_embed.{l}.bias"] = torch.full([NUM_CLASSES], PRIOR_BIAS, dtype=torch.float32)
    # Upstream (and TAO) freeze every backbone parameter whose name lacks layer2/3/4: the stem and
    # layer1. transformers 5.x skips this for a timm backbone (it tests "resnet" in the backbone
    # config's model_type, which is "timm_backbone"), so apply upstream's rule here.
    hf_frozen = [k for k, p in model.model.backbone.named_parameters() if not p.requires_grad]
    for k, p in model.model.backbone.model.named_parameters():
        if "layer2" not in k and "layer3" not in k and "layer4" not in k:
            p.requires_grad_(False)
    return model.train(), filled, hf_frozen


def inputs():
    n = 2 * 3 * H * W
    images = torch.from_numpy((2.0 * hash_uniform(IMAGE_KEY, n)).astype(np.float32)).reshape(2, 3, H, W)
    mask = torch.ones(2, H, W, dtype=torch.bool)  # True = padding (official convention)
    for b, (vh, vw) in enumerate(VALID):
        mask[b, :vh, :vw] = False
    images = images.masked_fill(mask[:, None], 0.0)
    targets = [{"labels": torch.tensor(t["labels"], dtype=torch.int64),
                "boxes": torch.tensor(t["boxes"], dtype=torch.float32)} for t in TARGETS]
    return images, mask, targets


def official_param_grads(model):
    """{official key: gradient} over every parameter that requires grad, and the frozen keys."""
    grads, frozen, packed = {}, [], {}
    for k, p in model.named_parameters(remove_duplicate=False):
        mapped = hf_to_official(k)
        if mapped is None:
            continue
        ok, block = mapped
        if not p.requires_grad:
            frozen.append(ok)
            continue
        assert p.grad is not None, f"{k} requires grad but got none"
        if block is None:
            grads[ok] = p.grad.detach().clone()
        else:
            packed.setdefault(ok, {})[block] = p.grad.detach().clone()
    for ok, blocks in packed.items():
        assert sorted(blocks) == [0, 1, 2], ok
        grads[ok] = torch.cat([blocks[0], blocks[1], blocks[2]], 0)
    return grads, sorted(set(frozen))


def step(dtype):
    """One training step in `dtype`: (loss terms, TAO total, transformers' total, gradients by
    official key, frozen keys, matches per layer, filled tensors, keys transformers froze)."""
    model, filled, hf_frozen = build()
    model = model.to(dtype)
    images, mask, targets = inputs()
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"].to(dtype)} for t in targets]
    out = model(pixel_values=images.to(dtype), pixel_mask=(~mask).long(), labels=labels)
    ld = out.loss_dict

    # transformers' matching and losses equal the official criterion on its own outputs.
    num_boxes = float(max(sum(len(t["labels"]) for t in targets), 1))
    sets = [(out.logits, out.pred_boxes, "")] + [
        (a["logits"], a["pred_boxes"], f"_{i}") for i, a in enumerate(out.auxiliary_outputs)]
    assert len(sets) == DEC_LAYERS
    matches = {}
    with torch.no_grad():
        for lg, bx, suffix in sets:
            tg = [{"labels": t["labels"], "boxes": t["boxes"].to(dtype)} for t in targets]
            idx = match(lg.detach(), bx.detach(), tg)
            matches[suffix] = [(r.tolist(), c.tolist()) for r, c in idx]
            ce, l1, giou = layer_losses(lg.detach().float(), bx.detach().float(),
                                        targets, idx, num_boxes)
            for name, v in (("loss_ce", ce), ("loss_bbox", l1), ("loss_giou", giou)):
                hf = ld[name + suffix].item()
                assert abs(hf - v.item()) <= 1e-5 * abs(v.item()), (name + suffix, hf, v.item())

    # TAO's weighted total (transformers' own weights loss_ce by 1).
    terms = {k: v for k, v in ld.items() if k.startswith("loss_")}
    assert len(terms) == 3 * DEC_LAYERS, sorted(terms)
    total = sum(COEF["_".join(k.split("_")[:2])] * v for k, v in terms.items())
    ce_sum = sum(v for k, v in terms.items() if k.startswith("loss_ce"))
    assert abs(total.item() - (out.loss + ce_sum).item()) <= 1e-5 * total.item()
    total.backward()
    grads, frozen = official_param_grads(model)
    terms = {k: v.item() for k, v in terms.items()}
    return terms, total.item(), out.loss.item(), grads, frozen, matches, filled, hf_frozen, images


def errors(ours, ref, idx):
    """(relative norm error, worst sampled-entry error relative to |g| + rms(g)) — the measures
    of the Rust test."""
    ours, ref = ours.double().reshape(-1), ref.double().reshape(-1)
    norm = ref.norm().item()
    rms = norm / math.sqrt(ref.numel())
    entry = ((ours[idx] - ref[idx]).abs() / (ref[idx].abs() + rms)).max().item()
    return abs(ours.norm().item() - norm) / norm, entry


def main():
    t0 = time.time()
    terms, total, total_hf, grads, frozen, matches, filled, hf_frozen, images = step(torch.float64)
    terms32, _, _, grads32, frozen32, matches32, _, _, _ = step(torch.float32)
    assert matches == matches32, "fp32 and fp64 match differently: pick other inputs"
    assert frozen == frozen32 and sorted(grads) == sorted(grads32)
    loss_err32 = max(abs(terms32[k] - v) / abs(v) for k, v in terms.items())

    _, _, targets = inputs()
    fx = {
        "valid": torch.tensor(VALID, dtype=torch.int64),
        "images.checksum": images.double().sum().reshape(1),
        "images.abs_checksum": images.double().abs().sum().reshape(1),
        "loss.total_tao": torch.tensor([total], dtype=torch.float64),
        "loss.total_hf": torch.tensor([total_hf], dtype=torch.float64),
        "weights.count": torch.tensor([len(filled)], dtype=torch.int64),
        "weights.checksum": torch.tensor([sum(t.double().sum().item() for t in filled.values())],
                                         dtype=torch.float64),
    }
    for i, t in enumerate(targets):
        fx[f"target{i}.labels"] = t["labels"]
        fx[f"target{i}.boxes"] = t["boxes"]
    for k, v in terms.items():
        fx["loss." + k] = torch.tensor([v], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    worst_norm, worst_entry = (0.0, ""), (0.0, "")
    for k in sorted(grads):
        g = grads[k].reshape(-1)
        idx = torch.randperm(g.numel(), generator=gen)[:SAMPLES].sort().values
        fx[f"grad.{k}.norm"] = g.norm().reshape(1)
        fx[f"grad.{k}.idx"] = idx.to(torch.int32)
        fx[f"grad.{k}.val"] = g[idx].contiguous()
        ne, ee = errors(grads32[k], g, idx)
        worst_norm = max(worst_norm, (ne, k))
        worst_entry = max(worst_entry, (ee, k))
    fx["ref_fp32.norm_err"] = torch.tensor([worst_norm[0]], dtype=torch.float64)
    fx["ref_fp32.entry_err"] = torch.tensor([worst_entry[0]], dtype=torch.float64)
    for k in frozen:
        fx[f"frozen.{k}"] = torch.ones(1, dtype=torch.uint8)
    path = os.path.join(HERE, "train_step_r50.safetensors")
    save_file(fx, path)
    print(f"total {total:.6f} (transformers' own {total_hf:.6f}); {len(grads)} trainable, "
          f"{len(frozen)} frozen ({len(hf_frozen)} by transformers itself), {len(filled)} filled "
          f"tensors; {os.path.getsize(path)} bytes; {time.time() - t0:.1f} s")
    print(f"transformers fp32 vs fp64: losses {loss_err32:.2e}, gradient norms {worst_norm[0]:.2e} "
          f"({worst_norm[1]}), sampled entries {worst_entry[0]:.2e} ({worst_entry[1]})")
    for k in sorted(terms):
        print(f"  {k} {terms[k]:.6f}")


if __name__ == "__main__":
    main()
