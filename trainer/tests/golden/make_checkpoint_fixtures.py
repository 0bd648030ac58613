"""Fixtures for trainer/tests/checkpoint_formats.rs: the tiny model of make_model_fixtures.py
(ResNet-18, d 32, 2+2 layers, 12 queries, 5 classes) saved the ways published Deformable DETR
checkpoints come, with the real writers:

* ckpt_official_l1.pth: fundamentalvision/Deformable-DETR's main.py layout, `torch.save` of
  `{'model': state_dict, 'optimizer', 'lr_scheduler', 'epoch', 'args'}` (args an
  argparse.Namespace), one level, no box refinement: `class_embed.1`/`bbox_embed.1` repeat head 0
  as upstream's shared heads do.
* ckpt_tao_l4_refine.pth: a real PyTorch Lightning checkpoint (`Trainer.save_checkpoint` after
  one AdamW step at lr 0) of a LightningModule shaped as TAO's (`self.model = DDModel`, which
  holds `self.model = DeformableDETR`), so keys read `model.model.backbone.0.body.conv1.weight`;
  `hyper_parameters` is an OmegaConf DictConfig, plus optimizer_states, lr_schedulers, callbacks,
  loops. Four levels with box refinement (the decoder's `transformer.decoder.bbox_embed.*` aliases
  included, as upstream's state_dict() has them).
* ckpt_hf_l1.bin: transformers' `pytorch_model.bin` layout, `torch.save` of the flat state dict
  of a real DeformableDetrForObjectDetection (its own key names, q/k/v split).
* ckpt_hf_l4_refine_manifest.json: the keys and shapes of the `model.safetensors` that
  transformers' `save_pretrained` writes for the four-level refine model (the box heads only as
  `model.decoder.bbox_embed.N`, class_embed.N > 0 left out: transformers ties them to head 0);
  each with the official key whose fill it holds (and for q/k/v the row block of the packed
  `in_proj_*`). safetensors cannot hold views, so the Rust test writes that file itself.

Values: to keep the `.pth` files small every tensor is a view into two shared storages, the
broadcast trick torch.save keeps as is (it stores storages, not views): `pth_fill` below, mirrored
by `pth_fill` in trainer/tests/common/mod.rs. A tensor of two or more dims repeats one row of
BASE_ROWS (stride 0 on every leading dim), a vector is a slice of BASE_VECS; the offset comes from
the official key's hash, so every key has its own values. An alias holds its target's values.

Run: $(../shared/peers/venv.sh) trainer/tests/golden/make_checkpoint_fixtures.py
(needs pytorch-lightning and omegaconf in that venv: pip install pytorch-lightning omegaconf).
"""
import argparse
import collections
import json
import os
import re
import sys
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_model_fixtures as mm  # noqa: E402  (fill rule, key map, the tiny model)

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------
# Values (mirror of pth_fill in trainer/tests/common/mod.rs)

N_ROWS, N_VECS = 128, 1024
# Small weights and unit-ish vectors: a forward pass stays finite (running_var near 1).
BASE_ROWS = torch.from_numpy((0.05 * mm.hash_uniform("fixture.rows", N_ROWS)).astype(np.float32))
BASE_VECS = torch.from_numpy((1.0 + 0.05 * mm.hash_uniform("fixture.vectors", N_VECS)).astype(np.float32))


def pth_fill(key, shape):
    """The fixture value of official key `key`: a view of BASE_ROWS / BASE_VECS."""
    h = mm.fnv1a32(key)
    if len(shape) >= 2:
        row = shape[-1]
        off = h % (N_ROWS - row + 1)
        return BASE_ROWS.as_strided(list(shape), [0] * (len(shape) - 1) + [1], off)
    n = shape[0]
    off = h % (N_VECS - n + 1)
    return BASE_VECS.as_strided([n], [1], off)


# ---------------------------------------------------------------------------------------------
# Layouts

HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$")


def hf_model(levels, refine, two_stage):
    model, _, _ = mm.build(levels, refine, two_stage)
    return model


def value_key(hf_key, refine):
    """(official key whose value a transformers tensor holds, q/k/v block or None)."""
    m = re.match(r"^model\.decoder\.(bbox_embed|class_embed)\.(.*)$", hf_key)
    if m:  # the decoder's alias of a top-level head
        key, block = f"{m.group(1)}.{m.group(2)}", None
    else:
        key, block = mm.hf_to_official(hf_key)
    h = HEAD.match(key)
    if h and not refine:  # upstream's shared heads: every layer's head is head 0
        key = f"{h.group(1)}.0.{h.group(3)}"
    return key, block


def hf_value(hf_key, shape, refine):
    key, block = value_key(hf_key, refine)
    if block is None:
        return pth_fill(key, shape)
    d = shape[0]
    return pth_fill(key, [3 * d] + list(shape[1:]))[block * d:(block + 1) * d]


def official_state_dict(levels, refine, two_stage):
    """What upstream's `model.state_dict()` holds: official keys with aliases, filled."""
    sd = collections.OrderedDict()
    for k, v in hf_model(levels, refine, two_stage).state_dict().items():
        mapped = mm.hf_to_official(k)
        if mapped is None:
            continue
        key, block = mapped
        shape = list(v.shape)
        if block is not None:
            shape[0] *= 3
        vk, _ = value_key(k, refine)
        sd[key] = pth_fill(vk, shape)
        h = HEAD.match(key)
        if h and refine and h.group(1) == "bbox_embed":
            sd[f"transformer.decoder.{key}"] = sd[key]
        if h and two_stage and h.group(1) == "class_embed":
            sd[f"transformer.decoder.{key}"] = sd[key]
    return sd


# ---------------------------------------------------------------------------------------------
# Writers


def official_pth(path):
    model = official_state_dict(1, False, False)
    ckpt = {
        "model": model,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
                      "param_groups": [{"lr": 2e-4, "params": [0]}]},
        "lr_scheduler": {"step_size": 40, "gamma": 0.1, "last_epoch": 50},
        "epoch": 49,
        "args": argparse.Namespace(lr=2e-4, with_box_refine=False, two_stage=False, num_feature_levels=1,
                                   dec_layers=2, enc_layers=2, num_queries=12, backbone="resnet18"),
    }
    torch.save(ckpt, path)


class Tree(nn.Module):
    """A module whose state_dict() is `tensors`: buffers at their dotted paths, except `trainable`,
    a parameter (the optimizer needs one)."""

    def __init__(self, tensors, trainable):
        super().__init__()
        for key, t in tensors.items():
            *path, leaf = key.split(".")
            mod = self
            for p in path:
                if p not in mod._modules:
                    mod.add_module(p, nn.Module())
                mod = mod._modules[p]
            if key == trainable:
                mod.register_parameter(leaf, nn.Parameter(t.contiguous()))
            else:
                mod.register_buffer(leaf, t)


def tao_pth(path):
    import pytorch_lightning as pl
    from omegaconf import OmegaConf
    from pytorch_lightning.callbacks import ModelCheckpoint

    tensors = official_state_dict(4, True, False)
    spec = OmegaConf.create({
        "model": {"backbone": "resnet_18", "num_feature_levels": 4, "return_interm_indices": [1, 2, 3, 4],
                  "with_box_refine": True, "hidden_dim": 32, "dec_layers": 2, "enc_layers": 2},
        "dataset": {"num_classes": 5, "train_data_sources": [{"image_dir": "/data/images", "json_file": "/data/a.json"}]},
        "train": {"optim": {"lr": 2e-4, "lr_steps": [10, 20]}, "freeze": []},
    })

    class DDModel(nn.Module):  # TAO's build_nn_model.DDModel: self.model = DeformableDETR(...)
        def __init__(self):
            super().__init__()
            self.model = Tree(tensors, "transformer.level_embed")

    class DeformableDETRModel(pl.LightningModule):  # TAO's pl_dd_model.DeformableDETRModel
        def __init__(self, experiment_spec):
            super().__init__()
            self.save_hyperparameters(experiment_spec)
            self.model = DDModel()

        def training_step(self, batch, batch_idx):
            return (self.model.model.transformer.level_embed * batch[0].sum()).sum()

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=0.0, weight_decay=1e-4)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, [10, 20])}

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.zeros(1, 1))
            return torch.utils.data.DataLoader(data, batch_size=1)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, default_root_dir=tmp,
                             callbacks=[ModelCheckpoint(dirpath=tmp, filename="dd_model_{epoch:03d}")],
                             enable_progress_bar=False, enable_model_summary=False)
        module = DeformableDETRModel(spec)
        trainer.fit(module)
        trainer.save_checkpoint(path)
    ck = torch.load(path, weights_only=False)
    assert isinstance(ck["hyper_parameters"], type(spec)), type(ck["hyper_parameters"])
    for k, t in tensors.items():  # lr 0: the step left every value as filled
        assert torch.equal(ck["state_dict"]["model.model." + k], t), k
    print("tao: top-level", sorted(ck))


def hf_bin(path):
    sd = hf_model(1, False, False).state_dict()
    torch.save(collections.OrderedDict((k, hf_value(k, list(v.shape), False)) for k, v in sd.items()), path)


def hf_manifest(path):
    from safetensors import safe_open
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    # A model as transformers makes it (no untying of the heads as mm.build does): what its
    # save_pretrained writes for a user's model.
    cfg = DeformableDetrConfig(
        use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False, num_queries=mm.NUM_QUERIES,
        d_model=mm.D_MODEL, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=8, decoder_attention_heads=8, encoder_n_points=4, decoder_n_points=2,
        num_feature_levels=4, with_box_refine=True, two_stage=False, num_labels=mm.NUM_CLASSES)
    model = DeformableDetrForObjectDetection(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        with safe_open(os.path.join(tmp, "model.safetensors"), "pt") as f:
            entries = []
            for k in f.keys():
                key, block = value_key(k, True)
                entries.append([k, list(f.get_slice(k).get_shape()), key, block])
    with open(path, "w") as f:
        # One [key, shape, official key of the fill, q/k/v block or null] per tensor.
        json.dump({"transformers": __import__("transformers").__version__, "levels": 4, "with_box_refine": True,
                   "tensors": entries}, f, separators=(",", ":"))
        f.write("\n")


def main():
    official_pth(os.path.join(HERE, "ckpt_official_l1.pth"))
    tao_pth(os.path.join(HERE, "ckpt_tao_l4_refine.pth"))
    hf_bin(os.path.join(HERE, "ckpt_hf_l1.bin"))
    hf_manifest(os.path.join(HERE, "ckpt_hf_l4_refine_manifest.json"))
    for n in ["ckpt_official_l1.pth", "ckpt_tao_l4_refine.pth", "ckpt_hf_l1.bin", "ckpt_hf_l4_refine_manifest.json"]:
        print(n, os.path.getsize(os.path.join(HERE, n)))


if __name__ == "__main__":
    main()
