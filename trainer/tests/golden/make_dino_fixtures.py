"""Golden fixture for the DINO parity test (trainer/tests/dino_parity.rs).

Reference: the official IDEA-Research/DINO code at commit faa8520 (not on PyPI: clone it and
point DINO_REPO at it), built on the CPU with these substitutions only:
- the CUDA `MultiScaleDeformableAttention` extension → the repository's own pure-PyTorch
  `ms_deform_attn_core_pytorch` (the same bilinear sampling);
- `Tensor.cuda()` and `Tensor.to('cuda')` → the CPU (prepare_for_cdn moves its tensors to CUDA
  unconditionally);
- no pretrained backbone download (`is_main_process` → False);
- torchvision's version string read as ≥ 0.7 (util/misc.py parses "0.26" as 0.2).

Configuration (DINO_4scale.py with smaller sizes; TAO's cls_loss_coef 2.0): ResNet-50 with
FrozenBatchNorm, 4 levels (layer2..4 + a stride-2 conv), d_model 256 (the official query sine
embedding assumes it), 8 heads, 1 encoder and 2 decoder layers, FFN 64, 30 queries, 5 classes,
shared decoder heads, dn_number 3 (6 groups: 2·3 < 100 is not divided) with the noise off
(label ratio 0, box scale 0) so the denoising queries are a function of the targets. Every
weight is `fill(official key)` (make_model_fixtures.py; the shared heads take head 0's key), so
the fixture holds no weights.

Stored: the inputs, the eval-mode outputs (every decoder layer's logits and boxes, the interm
proposals), the training-mode outputs with targets (the matching and the denoising parts, the
attention mask) and every term of the official criterion on them.

Run: DINO_REPO=/path/to/DINO $(../shared/peers/venv.sh) trainer/tests/golden/make_dino_fixtures.py
Writes trainer/tests/golden/dino_r50.safetensors.
"""
import os
import sys
import types

import torch
import torchvision
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_model_fixtures import fill  # noqa: E402

REPO = os.environ.get("DINO_REPO")
if not REPO or not os.path.isdir(os.path.join(REPO, "models", "dino")):
    sys.exit("set DINO_REPO to a clone of https://github.com/IDEA-Research/DINO (commit faa8520)")
sys.path.insert(0, REPO)
torch.set_num_threads(1)

# --- substitutions --------------------------------------------------------------------------
sys.modules["MultiScaleDeformableAttention"] = types.ModuleType("MultiScaleDeformableAttention")
torchvision.__version__ = "0.99.0"
torch.Tensor.cuda = lambda self, *a, **k: self
_to = torch.Tensor.to


def _on_cpu(x):
    cuda = (isinstance(x, str) and x.startswith("cuda")) or (
        isinstance(x, torch.device) and x.type == "cuda")
    return "cpu" if cuda else x


torch.Tensor.to = lambda self, *a, **k: _to(
    self, *map(_on_cpu, a), **{n: _on_cpu(v) for n, v in k.items()})

from models.dino.ops.functions import ms_deform_attn_func  # noqa: E402
from models.dino.ops.modules import ms_deform_attn  # noqa: E402


class PurePytorch:
    @staticmethod
    def apply(value, shapes, level_start_index, locations, weights, im2col_step):
        return ms_deform_attn_func.ms_deform_attn_core_pytorch(value, shapes, locations, weights)


ms_deform_attn.MSDeformAttnFunction = PurePytorch
import models.dino.backbone as official_backbone  # noqa: E402

official_backbone.is_main_process = lambda: False
from models.dino.dino import build_dino  # noqa: E402

# --- configuration --------------------------------------------------------------------------
cfg = {}
for name in ("coco_transformer.py", "DINO_4scale.py"):
    with open(os.path.join(REPO, "config", "DINO", name)) as f:
        exec(f.read(), {}, cfg)
cfg.update(
    device="cpu", num_classes=5, dn_labelbook_size=5, enc_layers=1, dec_layers=2,
    dim_feedforward=64, num_queries=30, num_select=30, cls_loss_coef=2.0, dn_number=3,
    dn_label_noise_ratio=0.0, dn_box_noise_scale=0.0,
)
args = types.SimpleNamespace(**{k: v for k, v in cfg.items() if not k.startswith("_")})
torch.manual_seed(0)
model, criterion, _ = build_dino(args)


def canonical(key: str) -> str:
    """The key whose fill a (shared-head alias) key takes: head 0's top-level name."""
    for stem in ("class_embed.", "bbox_embed."):
        for pre in ("", "transformer.decoder."):
            if key.startswith(pre + stem):
                rest = key[len(pre + stem):].split(".", 1)[1]
                return f"{stem}0.{rest}"
    return key


with torch.no_grad():
    for k, v in model.state_dict().items():
        v.copy_(fill(canonical(k), tuple(v.shape)))

# --- inputs -----------------------------------------------------------------------------------
from util.misc import NestedTensor  # noqa: E402

H, W = 96, 128
VALID = [(96, 128), (80, 100)]
g = torch.Generator().manual_seed(1)
images = torch.randn(2, 3, H, W, generator=g)
mask = torch.ones(2, H, W, dtype=torch.bool)
for i, (h, w) in enumerate(VALID):
    mask[i, :h, :w] = False
images = images.masked_fill(mask[:, None], 0.0)
targets = [
    {"labels": torch.tensor([1, 3, 4]),
     "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.25, 0.2], [0.5, 0.2, 0.1, 0.1]])},
    {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
]

out = {"images": images, "mask": mask}
for i, t in enumerate(targets):
    out[f"target{i}.labels"] = t["labels"]
    out[f"target{i}.boxes"] = t["boxes"]


def store(prefix, o):
    out[f"{prefix}.logits"] = o["pred_logits"].detach().contiguous()
    out[f"{prefix}.boxes"] = o["pred_boxes"].detach().contiguous()
    for i, a in enumerate(o.get("aux_outputs", [])):
        out[f"{prefix}.aux{i}.logits"] = a["pred_logits"].detach().contiguous()
        out[f"{prefix}.aux{i}.boxes"] = a["pred_boxes"].detach().contiguous()


model.eval()
with torch.no_grad():
    e = model(NestedTensor(images, mask))
store("eval", e)
out["eval.interm.logits"] = e["interm_outputs"]["pred_logits"].contiguous()
out["eval.interm.boxes"] = e["interm_outputs"]["pred_boxes"].contiguous()

model.train()
criterion.train()
with torch.no_grad():
    o = model(NestedTensor(images, mask), targets)
    losses = criterion(o, targets)
store("train", o)
out["train.interm.logits"] = o["interm_outputs"]["pred_logits"].contiguous()
out["train.interm.boxes"] = o["interm_outputs"]["pred_boxes"].contiguous()
dn = o["dn_meta"]
out["train.dn.pad_size"] = torch.tensor([dn["pad_size"]])
out["train.dn.num_groups"] = torch.tensor([dn["num_dn_group"]])
store("train.dn", dn["output_known_lbs_bboxes"])
for k, v in losses.items():
    if k.startswith("loss_") or k == "class_error":
        out[f"loss.{k}"] = v.detach().reshape(1).float()
save_file(out, os.path.join(HERE, "dino_r50.safetensors"))
print(f"wrote dino_r50.safetensors: {len(out)} tensors, pad {dn['pad_size']}, groups {dn['num_dn_group']}")
for k in sorted(losses):
    if k.startswith("loss_"):
        print(f"  {k} = {float(losses[k]):.6f}")
