"""Peer of `ddetr bench converge`: transformers' Deformable DETR in the tiny configuration of
../shared/peers/hf_shapes_convergence.py (timm ResNet-18 from scratch, d_model 128, 4 heads,
FFN 256, 2+2 layers, 50 queries, 3 levels, box refinement, dropout 0, matcher costs 2/5/2, AdamW
lr 2e-4 and 1e-4 for the backbone, clip 0.1, batch 8), trained on the CPU on a COCO-format set
(the same files ddetr trains on) for a wall-clock budget, with a validation (pycocotools) every
`--eval-every` minutes and at the end; validation time counts in the budget, as ddetr's does.

Images are resized so the shorter side is `--size` (no augmentation, as the original peer).
Prints one JSON line per validation: {"minutes", "images", "map", "map50"}, and the same lines to
`--out`.

Usage: python hf_coco_convergence.py --train DIR --val DIR --minutes 15 [--size 128]
       [--eval-every 2.5] [--batch 8] [--threads 2] [--seed 5] [--out curve.jsonl]
(DIR holds annotations.json and the images it names, under DIR/images or DIR.)
"""
import argparse
import contextlib
import io
import json
import os
import random
import time

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def load_split(d, size):
    ann = json.load(open(os.path.join(d, "annotations.json")))
    img_dir = os.path.join(d, "images") if os.path.isdir(os.path.join(d, "images")) else d
    by_img = {}
    for a in ann["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    cats = sorted(c["id"] for c in ann["categories"])
    items = []
    for im in ann["images"]:
        pil = Image.open(os.path.join(img_dir, im["file_name"])).convert("RGB")
        w, h = pil.size
        s = size / min(w, h)
        ow, oh = int(round(w * s)), int(round(h * s))
        pil = pil.resize((ow, oh), Image.BILINEAR)
        x = torch.tensor((np.asarray(pil) / 255.0 - MEAN) / STD, dtype=torch.float32).permute(2, 0, 1)
        anns = [a for a in by_img.get(im["id"], []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        cxcywh = torch.stack([(boxes[:, 0] + boxes[:, 2] / 2) / w, (boxes[:, 1] + boxes[:, 3] / 2) / h,
                              boxes[:, 2] / w, boxes[:, 3] / h], 1)
        labels = torch.tensor([cats.index(a["category_id"]) for a in anns], dtype=torch.long)
        items.append({"x": x, "boxes": cxcywh, "labels": labels, "id": im["id"], "w": w, "h": h})
    return ann, cats, items


def collate(items):
    H = max(i["x"].shape[1] for i in items)
    W = max(i["x"].shape[2] for i in items)
    x = torch.zeros(len(items), 3, H, W)
    m = torch.zeros(len(items), H, W, dtype=torch.long)
    for k, i in enumerate(items):
        x[k, :, : i["x"].shape[1], : i["x"].shape[2]] = i["x"]
        m[k, : i["x"].shape[1], : i["x"].shape[2]] = 1
    return x, m


@torch.no_grad()
def validate(model, ann, cats, items, num_select=50):
    model.eval()
    dets = []
    for i in items:
        x, m = collate([i])
        out = model(pixel_values=x, pixel_mask=m)
        prob = out.logits.sigmoid()[0]
        boxes = out.pred_boxes[0] * torch.tensor([i["w"], i["h"], i["w"], i["h"]])
        sc, idx = prob.flatten().topk(min(num_select, prob.numel()))
        for s, k in zip(sc.tolist(), idx.tolist()):
            q, c = divmod(k, prob.shape[1])
            cx, cy, bw, bh = boxes[q].tolist()
            dets.append({"image_id": i["id"], "category_id": cats[c], "bbox": [cx - bw / 2, cy - bh / 2, bw, bh],
                         "score": s})
    model.train()
    gt = COCO()
    gt.dataset = ann
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0], ev.stats[1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--minutes", type=float, default=15)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--eval-every", type=float, default=2.5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--out")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    rng = random.Random(a.seed)
    start = time.time()
    _, cats, train = load_split(a.train, a.size)
    val_ann, _, val = load_split(a.val, a.size)
    cfg = DeformableDetrConfig(
        use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False, num_labels=len(cats),
        d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=256, decoder_ffn_dim=256, num_queries=50, num_feature_levels=3, with_box_refine=True,
        auxiliary_loss=True, dropout=0.0, class_cost=2, bbox_cost=5, giou_cost=2)
    model = DeformableDetrForObjectDetection(cfg).train()
    groups = [{"params": [q for n, q in model.named_parameters() if "backbone" not in n], "lr": 2e-4},
              {"params": [q for n, q in model.named_parameters() if "backbone" in n], "lr": 1e-4}]
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    out = open(a.out, "w") if a.out else None
    # The budget runs from the first step, as ddetr's train.max_minutes does (loading is before).
    t0 = time.time()
    end = t0 + a.minutes * 60
    next_eval = t0 + a.eval_every * 60
    seen, order = 0, []
    val_s = [0.0]  # the last validation's seconds: the final one must fit in the budget

    def record():
        t = time.time()
        m, m50 = validate(model, val_ann, cats, val)
        val_s[0] = time.time() - t
        rec = {"minutes": round((time.time() - t0) / 60, 3), "images": seen, "map": m, "map50": m50}
        line = json.dumps(rec)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    while True:
        # Keep back the final validation (as long as the last one took).
        if time.time() + val_s[0] >= end:
            break
        if len(order) < a.batch:
            order += rng.sample(range(len(train)), len(train))
        batch = [train[order.pop()] for _ in range(a.batch)]
        x, m = collate(batch)
        labels = [{"class_labels": i["labels"], "boxes": i["boxes"]} for i in batch]
        loss = model(pixel_values=x, pixel_mask=m, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        seen += a.batch
        if time.time() >= next_eval:
            record()
            next_eval += a.eval_every * 60
    record()
    print(f"loading took {t0 - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
