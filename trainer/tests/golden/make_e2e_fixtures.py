"""End-to-end golden fixtures at the sizes users run (trainer/tests/e2e_layers.rs, tests/e2e_golden.rs).

Reference: transformers' DeformableDetrForObjectDetection with a timm ResNet-50, 6+6 layers, 300
queries, d_model 256, 8 heads, FFN 1024, 4+4 points, dropout 0, configured to the official
semantics (independent refine heads, decoder heads aliasing the top-level ones), in eval mode, on
image FILES that go through the official val transform (PIL bilinear `RandomResize([800],
max_size=1333)`, ToTensor, Normalize) — the sizes the transform keeps and the sizes it changes
(upscaled ×2, capped by max_size, portrait), non-square, two of one size.

Cases: `l4_refine` (TAO's defaults), `l1` (one level, shared heads), `l4_two_stage` (refine +
two-stage). Weights: every tensor filled by the shared `fill(official_key, shape)` rule of
make_model_fixtures.py (reproduced in trainer/tests/common/mod.rs) times a per-key factor
(`SCALES`), so nothing large is committed; `manifest_<case>.json` lists transformers' own
state-dict keys with the official key, q/k/v block and factor each fills from, so a test can write
the transformers checkpoint file itself.

Modes (reference detections, official PostProcess: top-k of sigmoid over queries × classes, boxes
in original pixels):
- `none`: every image alone at its own transformed size (what ddetr's padding-free evaluation must
  reproduce for any batch size and world size);
- `tao_b1` / `tao_b3` (l4_refine only): TAO's padded evaluation — each image zero-padded to
  800×1333 (1333×800 portrait, TAO's FixedPad), then to the batch's largest, with the pixel mask,
  in file order with batches of 1 and of 3.

Also written: `annotations.json` (COCO ground truth made from the l4_refine reference detections,
jittered, so COCO stats are not trivially zero), the pycocotools stats of every case/mode,
the SHA-256 of every transformed image (so a test can tell a resize difference from a model
difference), and `layers_l4_refine.safetensors`: seeded samples and sums of the backbone features,
input projections, encoder memory and each decoder layer's hidden state for a.png.

Run: $(../shared/peers/venv.sh) trainer/tests/golden/make_e2e_fixtures.py [case …]   (about 20 minutes
on 2 cores; naming cases regenerates only those, l4_refine first since it writes the ground truth)
Writes trainer/tests/golden/e2e/.
"""
import copy
import hashlib
import io
import json
import os
import re
import sys
import contextlib

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from safetensors.torch import save_file
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_model_fixtures import box_cxcywh_to_xyxy, fill, hf_to_official  # noqa: E402

OUT = os.path.join(HERE, "e2e")
torch.set_num_threads(2)

NUM_CLASSES = 5  # category ids 1..4, logit column 0 unused by the ground truth
# (file, height, width): kept as is / upscaled ×2 / kept portrait / capped by max_size (×2) /
# portrait upscaled ×2 / a second image of a's size. The ×2 scales keep PIL's bilinear weights exact
# (0.25/0.75), so its output equals ddetr's resize byte for byte (other scales differ by one level
# in a few edge pixels, which would blur a model comparison).
IMAGES = [("a.png", 800, 1066), ("b.png", 400, 600), ("c.png", 1000, 800), ("d.png", 333, 666),
          ("e.png", 533, 400), ("f.png", 800, 1066)]
TEST_SIZE, MAX_SIZE = 800, 1333
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CASES = {
    # name: (levels, refine, two_stage, modes, factor on the class heads' fill — see SCALES)
    "l4_refine": (4, True, False, ["none", "tao_b1", "tao_b3"], 6.0),
    "l1": (1, False, False, ["none"], 1.5),
    "l4_two_stage": (4, True, True, ["none"], 6.0),
}
MAX_SELECT = 100  # TAO's PostProcess default
# Score gap required at the top-k boundary in every image and mode, so both sides select the same
# set (the two implementations agree to ~1e-7 in score).
MIN_GAP = 1e-5
# Filled weights give a detector whose queries all look at the image centre and score alike; these
# factors on the fill spread the reference points over the image and the class logits over (0, 1)
# (the class factor is per case, chosen so the top-100 scores do not saturate), so detections
# differ from query to query and a mix-up would show. The manifest carries them.
REFERENCE_POINTS_SCALE = 40.0


def scale_of(official_key, class_scale):
    if re.match(r"^transformer\.reference_points\.weight$", official_key):
        return REFERENCE_POINTS_SCALE
    if re.match(r"^class_embed\.\d+\.weight$", official_key):
        return class_scale
    return 1.0
SAMPLES = 512  # sampled entries per layer-level tensor


# ---------------------------------------------------------------------------------------------
# Images and the official val transform

def make_image(name, h, w, seed):
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(40, 215, 3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 14))):
        bw, bh = int(rng.integers(w // 12, w // 3)), int(rng.integers(h // 12, h // 3))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            d.rectangle([x0, y0, x0 + bw, y0 + bh], fill=col)
        else:
            d.ellipse([x0, y0, x0 + bw, y0 + bh], fill=col)
    img.save(os.path.join(OUT, name), optimize=True)


def eval_size(w, h, size=TEST_SIZE, max_size=MAX_SIZE):
    """(height, width) after RandomResize([size], max_size) (datasets/transforms.py get_size)."""
    min_o, max_o = float(min(w, h)), float(max(w, h))
    if max_o / min_o * size > max_size:
        size = int(round(max_size * min_o / max_o))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def transformed(name):
    img = Image.open(os.path.join(OUT, name)).convert("RGB")
    w, h = img.size
    oh, ow = eval_size(w, h)
    if (oh, ow) != (h, w):
        img = img.resize((ow, oh), Image.BILINEAR)  # torchvision F.resize on a PIL image
    arr = np.asarray(img)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return x, (h, w), hashlib.sha256(arr.tobytes()).hexdigest()


def tao_pad_target(h, w):
    """TAO's FixedPad(800, 1333) in evaluation: orientation-aware, never smaller than the image."""
    ph, pw = (TEST_SIZE, MAX_SIZE) if w >= h else (MAX_SIZE, TEST_SIZE)
    return max(ph, h), max(pw, w)


def collate(xs, pad_sizes):
    """Zero-padded batch (bottom/right) and transformers' pixel mask (1 = valid)."""
    H = max(p[0] for p in pad_sizes)
    W = max(p[1] for p in pad_sizes)
    batch = torch.zeros(len(xs), 3, H, W)
    mask = torch.zeros(len(xs), H, W, dtype=torch.long)
    for i, x in enumerate(xs):
        batch[i, :, : x.shape[1], : x.shape[2]] = x
        mask[i, : x.shape[1], : x.shape[2]] = 1
    return batch, mask


# ---------------------------------------------------------------------------------------------
# The reference model

def build(levels, refine, two_stage, class_scale):
    cfg = DeformableDetrConfig(
        use_timm_backbone=True, backbone="resnet50", use_pretrained_backbone=False, num_queries=300,
        d_model=256, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
        encoder_attention_heads=8, decoder_attention_heads=8, encoder_n_points=4, decoder_n_points=4,
        num_feature_levels=levels, with_box_refine=refine, two_stage=two_stage,
        two_stage_num_proposals=300, num_labels=NUM_CLASSES, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, auxiliary_loss=True)
    model = DeformableDetrForObjectDetection(cfg).eval()
    for heads in (model.class_embed, model.bbox_embed):  # v5 ties heads N > 0 to head 0
        for i in range(len(heads)):
            heads[i] = copy.deepcopy(heads[i])
    sd = model.state_dict()
    new_sd, manifest = {}, []
    for k, v in sd.items():
        mapped = hf_to_official(k)
        if mapped is None:
            continue
        ok, block = mapped
        if not refine and (ok.startswith("class_embed.") or ok.startswith("bbox_embed.")):
            ok = re.sub(r"^(class_embed|bbox_embed)\.\d+", r"\1.0", ok)  # one shared head upstream
        if block is None:
            full_shape = list(v.shape)
            t = fill(ok, full_shape)
        else:
            d = v.shape[0]
            full_shape = [3 * d] + list(v.shape[1:])
            t = fill(ok, full_shape)[block * d:(block + 1) * d].clone()
        assert t.shape == v.shape, (k, ok, t.shape, v.shape)
        scale = scale_of(ok, class_scale)
        new_sd[k] = t * scale
        manifest.append({"hf": k, "official": ok, "block": block, "fill_shape": full_shape,
                         "shape": list(v.shape), "scale": scale})
    missing = [k for k in sd if hf_to_official(k) is not None and k not in new_sd]
    assert not missing, missing
    model.load_state_dict(new_sd, strict=False)
    if refine:
        model.model.decoder.bbox_embed = model.bbox_embed
    if two_stage:
        model.model.decoder.class_embed = model.class_embed
    return model, manifest


@torch.no_grad()
def detections(model, batch, mask, orig_sizes, k):
    out = model(pixel_values=batch, pixel_mask=mask)
    prob = out.logits.sigmoid()
    flat = prob.view(prob.shape[0], -1)
    sc, ix = torch.sort(flat, dim=1, descending=True)
    q_idx, lab = ix[:, :k] // NUM_CLASSES, ix[:, :k] % NUM_CLASSES
    xyxy = torch.gather(box_cxcywh_to_xyxy(out.pred_boxes), 1, q_idx.unsqueeze(-1).repeat(1, 1, 4))
    res = []
    for i, (h, w) in enumerate(orig_sizes):
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        res.append({"scores": sc[i, :k].clone(), "labels": lab[i].clone(), "boxes": xyxy[i] * scale,
                    "all_scores": sc[i, : k + 50].clone()})
    return res


def run_mode(model, mode, xs, origs, k):
    """Per image (in file order) the reference detections of `mode`."""
    n = len(xs)
    if mode == "none":
        out = []
        for i in range(n):
            b, m = collate([xs[i]], [xs[i].shape[1:]])
            out += detections(model, b, m, [origs[i]], k)
        return out
    bs = int(mode.split("_b")[1])
    out = []
    for lo in range(0, n, bs):
        idx = list(range(lo, min(lo + bs, n)))
        pads = [tao_pad_target(xs[i].shape[1], xs[i].shape[2]) for i in idx]
        b, m = collate([xs[i] for i in idx], pads)
        out += detections(model, b, m, [origs[i] for i in idx], k)
    return out


# ---------------------------------------------------------------------------------------------
# Layer-level samples

def layer_samples(model, x):
    """Backbone features, input projections, encoder memory and decoder states for one image."""
    got = {}
    hooks = [model.model.backbone.register_forward_hook(lambda m, i, o: got.__setitem__("backbone", o))]
    for level, proj in enumerate(model.model.input_proj):
        hooks.append(proj.register_forward_hook(
            lambda m, i, o, level=level: got.__setitem__(f"input_proj.{level}", o)))
    b, m = collate([x], [x.shape[1:]])
    with torch.no_grad():
        out = model(pixel_values=b, pixel_mask=m)
    for h in hooks:
        h.remove()
    feats = [t for t in _tensors(got.pop("backbone")) if t.dim() == 4 and t.dtype.is_floating_point]
    tensors = {f"backbone.{i}": f for i, f in enumerate(feats)}
    for k, v in got.items():
        tensors[k] = v
    tensors["encoder.memory"] = out.encoder_last_hidden_state
    for layer in range(out.intermediate_hidden_states.shape[1]):
        tensors[f"decoder.{layer}"] = out.intermediate_hidden_states[:, layer]
    tensors["logits"] = out.logits
    tensors["boxes"] = out.pred_boxes
    rng = np.random.default_rng(7)
    fx = {}
    for name, t in tensors.items():
        t = t.detach().contiguous()
        n = t.numel()
        idx = np.sort(rng.choice(n, size=min(SAMPLES, n), replace=False)).astype(np.int64)
        fx[f"{name}.shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
        fx[f"{name}.index"] = torch.from_numpy(idx)
        fx[f"{name}.values"] = t.reshape(-1)[torch.from_numpy(idx)].clone()
        fx[f"{name}.abs_sum"] = torch.tensor([t.double().abs().sum().item()], dtype=torch.float64)
    return fx


def _tensors(o):
    if isinstance(o, torch.Tensor):
        yield o
    elif isinstance(o, (list, tuple)):
        for x in o:
            yield from _tensors(x)
    elif hasattr(o, "values"):
        for x in o.values():
            yield from _tensors(x)


# ---------------------------------------------------------------------------------------------
# COCO

def coco_stats(gt_path, dets, image_ids):
    rows = []
    for img_id, d in zip(image_ids, dets):
        for s, l, b in zip(d["scores"].tolist(), d["labels"].tolist(), d["boxes"].tolist()):
            rows.append({"image_id": img_id, "category_id": int(l), "score": float(s),
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_path)
        ev = COCOeval(gt, gt.loadRes(rows), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def ground_truth(dets, sizes, seed=3):
    """Up to 6 GT boxes per image from the reference's top detections (labels 1..4), jittered."""
    rng = np.random.default_rng(seed)
    anns, aid = [], 1
    for img_id, (d, (h, w)) in enumerate(zip(dets, sizes), start=1):
        taken = 0
        for s, l, b in zip(d["scores"].tolist(), d["labels"].tolist(), d["boxes"].tolist()):
            if l < 1 or taken == 6:
                continue
            x1, y1, x2, y2 = [v + float(rng.uniform(-4, 4)) for v in b]
            x1, x2 = sorted((min(max(x1, 0.0), w - 2.0), min(max(x2, 0.0), w - 1.0)))
            y1, y2 = sorted((min(max(y1, 0.0), h - 2.0), min(max(y2, 0.0), h - 1.0)))
            if x2 - x1 < 2 or y2 - y1 < 2:
                continue
            anns.append({"id": aid, "image_id": img_id, "category_id": int(l), "iscrowd": 0,
                         "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                         "area": round((x2 - x1) * (y2 - y1), 2)})
            aid += 1
            taken += 1
    return anns


def choose_k(results):
    """The largest k ≤ MAX_SELECT with a clear score gap at the boundary in every image/mode."""
    for k in range(MAX_SELECT, 19, -1):
        if all(float(r["all_scores"][k - 1] - r["all_scores"][k]) > MIN_GAP
               for per_mode in results for r in per_mode):
            return k
    raise SystemExit("no top-k boundary with a clear gap: change the seed")


def main(cases):
    os.makedirs(OUT, exist_ok=True)
    for seed, (name, h, w) in enumerate(IMAGES):
        if name == "f.png":
            seed = 11
        make_image(name, h, w, seed)
    xs, origs, hashes = [], [], {}
    for name, _, _ in IMAGES:
        x, orig, digest = transformed(name)
        xs.append(x)
        origs.append(orig)
        hashes[name] = {"orig": list(orig), "transformed": list(x.shape[1:]), "sha256": digest}
    image_ids = list(range(1, len(IMAGES) + 1))
    meta_path = os.path.join(OUT, "meta.json")
    meta = {"cases": {}}
    if os.path.exists(meta_path):  # regenerating some cases keeps the others'
        with open(meta_path) as f:
            meta = json.load(f)
    meta.update({"images": hashes, "num_classes": NUM_CLASSES})
    gt_path = os.path.join(OUT, "annotations.json")
    for case in cases:
        levels, refine, two_stage, modes, class_scale = CASES[case]
        model, manifest = build(levels, refine, two_stage, class_scale)
        with open(os.path.join(OUT, f"manifest_{case}.json"), "w") as f:
            json.dump(manifest, f, separators=(",", ":"))
        results = {m: run_mode(model, m, xs, origs, MAX_SELECT) for m in modes}
        k = choose_k(list(results.values()))
        if case == "l4_refine":
            anns = ground_truth(results["none"], origs)
            coco = {"images": [{"id": i, "file_name": n, "height": h, "width": w}
                               for i, (n, h, w) in zip(image_ids, IMAGES)],
                    "annotations": anns,
                    "categories": [{"id": c, "name": f"class{c}"} for c in range(1, NUM_CLASSES)]}
            with open(gt_path, "w") as f:
                json.dump(coco, f, indent=1)
            save_file(layer_samples(model, xs[0]), os.path.join(OUT, "layers_l4_refine.safetensors"))
        case_meta = {"levels": levels, "refine": refine, "two_stage": two_stage, "num_select": k,
                     "modes": {}}
        det_tensors = {}
        for mode, dets in results.items():
            dets = [{"scores": d["scores"][:k], "labels": d["labels"][:k], "boxes": d["boxes"][:k]}
                    for d in dets]
            case_meta["modes"][mode] = {"coco_stats": coco_stats(gt_path, dets, image_ids)}
            for (name, _, _), d in zip(IMAGES, dets):
                for key in ("scores", "labels", "boxes"):
                    det_tensors[f"{mode}.{name}.{key}"] = d[key].contiguous()
        save_file(det_tensors, os.path.join(OUT, f"detections_{case}.safetensors"))
        meta["cases"][case] = case_meta
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=1)
        print(case, "k", k, {m: v["coco_stats"][:2] for m, v in case_meta["modes"].items()}, flush=True)


if __name__ == "__main__":
    # Cases to (re)generate, all by default; l4_refine first (it writes the ground truth).
    main(sys.argv[1:] or list(CASES))
