"""Writes `flops_fvcore.json`: fvcore's FLOP counts (FlopCountAnalysis, by operator) of
transformers' Deformable DETR for a few configurations, each beside the ddetr spec and overrides
that build the same network and the peer arguments `ddetr bench flops` must derive from it.
`bench/tests/flops_fvcore.rs` checks that ddetr's count equals fvcore's, kind by kind and module
by module (a GCViT: its backbone against timm's; a FAN: its backbone against TAO's own).

Run with the peers' python (torch 2.11, transformers 5.x, timm, fvcore) and a checkout of
NVIDIA/tao_pytorch_backend for the FAN case (@ 3a8a971 made the committed file):
    TAO_PYTORCH_BACKEND=<checkout> python bench/tests/golden/make_flops_fixtures.py
"""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]
PEERS = ROOT / "bench/peers"


def args(h, w, backbone, levels, classes, queries, enc, dec, ffn, d, heads, refine):
    a = ["--height", h, "--width", w, "--backbone", backbone, "--levels", levels,
         "--classes", classes, "--queries", queries, "--enc", enc, "--dec", dec, "--ffn", ffn,
         "--d-model", d, "--heads", heads, "--enc-points", 4, "--dec-points", 4]
    return [str(x) for x in a] + (["--refine"] if refine else [])


CASES = [
    {   # the CPU demo's network with four levels, at a size off the stride-64 grid
        "name": "shapes_r18_l4_refine",
        "spec": "configs/shapes_tiny.yaml",
        "overrides": ["model.num_feature_levels=4", "model.return_interm_indices=[1,2,3,4]",
                      "export.input_height=100", "export.input_width=140"],
        "script": "fvcore_flops.py",
        "args": args(100, 140, "resnet18", 4, 4, 50, 2, 2, 256, 128, 4, True),
    },
    {   # TAO's COCO spec reduced to one level, no refinement, fewer layers and queries
        "name": "coco_r50_l1",
        "spec": "configs/coco_r50.yaml",
        "overrides": ["model.num_feature_levels=1", "model.return_interm_indices=[3]",
                      "model.with_box_refine=false", "model.enc_layers=2", "model.dec_layers=3",
                      "model.num_queries=30", "export.input_height=160",
                      "export.input_width=224"],
        "script": "fvcore_flops.py",
        "args": args(160, 224, "resnet50", 1, 91, 30, 2, 3, 1024, 256, 8, False),
    },
    {   # ResNet-34, four levels, refinement
        "name": "coco_r34_l4_refine",
        "spec": "configs/coco_r50.yaml",
        "overrides": ["model.backbone=resnet_34", "model.num_feature_levels=4",
                      "model.return_interm_indices=[1,2,3,4]", "model.enc_layers=1",
                      "model.dec_layers=2", "model.num_queries=20", "export.input_height=96",
                      "export.input_width=128"],
        "script": "fvcore_flops.py",
        "args": args(96, 128, "resnet34", 4, 91, 20, 1, 2, 1024, 256, 8, True),
    },
    {   # GCViT-XXTiny against timm's, the backbone alone, reading levels 1-3 (not the 0th)
        "name": "gcvit_xxtiny_backbone",
        "spec": "configs/coco_r50.yaml",
        "overrides": ["model.backbone=gc_vit_xxtiny", "model.num_feature_levels=3",
                      "model.return_interm_indices=[1,2,3]", "model.enc_layers=1",
                      "model.dec_layers=1", "export.input_height=224",
                      "export.input_width=224"],
        "script": "fvcore_gcvit_flops.py",
        "args": ["--variant", "xxtiny", "--size", "224", "--levels", "1,2,3"],
    },
    {   # FAN-Tiny (DINO's) against TAO's own FANFPN, the backbone alone, off the stride grid
        "name": "fan_tiny_backbone",
        "spec": "configs/dino_r50.yaml",
        "overrides": ["model.backbone=fan_tiny", "model.enc_layers=1", "model.dec_layers=1",
                      "model.num_queries=100", "model.num_select=100",
                      "export.input_height=100", "export.input_width=140"],
        "script": "fvcore_fan_flops.py",
        "args": ["--variant", "tiny", "--height", "100", "--width", "140", "--levels", "1,2,3"],
    },
]


def main():
    out = []
    for case in CASES:
        run = subprocess.run([sys.executable, str(PEERS / case["script"]), *case["args"]], check=True,
                             capture_output=True, text=True)
        count = json.loads(run.stdout.strip().splitlines()[-1])
        count.pop("skipped", None)
        out.append({**case, "fvcore": count})
        print(case["name"], count["total"], file=sys.stderr)
    path = pathlib.Path(__file__).with_name("flops_fvcore.json")
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
