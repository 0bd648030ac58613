//! `ddetr model info`'s FLOPs against fvcore's, kind by kind and module by module: fvcore's
//! `FlopCountAnalysis` of transformers' Deformable DETR (fixture by
//! `golden/make_flops_fixtures.py`) and ddetr's count
//! of the spec that builds the same network, for three networks (ResNet-18/34/50, one and four
//! levels, with and without box refinement, sizes off the stride grid), and a GCViT backbone
//! against fvcore's count of timm's GCViT turned into TAO's (the backbone alone). Also checks that
//! `ddetr bench flops` derives the peer's arguments from each spec as the fixture was made.

use std::path::Path;

use ddetr_bench::flops::{kinds, module_totals, peer_args, FvcoreCount, Peer};
use ddetr_trainer::export::{self, ExportOptions};
use ddetr_trainer::flops::FlopCount;

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    spec: String,
    overrides: Vec<String>,
    script: String,
    args: Vec<String>,
    fvcore: FvcoreCount,
}

#[test]
fn ddetr_counts_what_fvcore_counts_on_transformers_deformable_detr() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fixture = root.join("bench/tests/golden/flops_fvcore.json");
    let cases: Vec<Case> = serde_json::from_slice(&std::fs::read(&fixture).unwrap()).unwrap();
    assert_eq!(cases.len(), 5);
    let names = ["conv", "linear", "attention", "norms", "sampling", "other"];
    for case in &cases {
        let spec = ddetr_trainer::spec::load(&root.join(&case.spec), &case.overrides, None)
            .unwrap()
            .spec;
        let Peer { script, args } = peer_args(&spec).unwrap();
        assert_eq!(
            (script, &args),
            (case.script.as_str(), &case.args),
            "{}",
            case.name
        );
        let opts = ExportOptions::from_spec(&spec.export);
        let graph = export::spec_graph(&spec, None, &opts).unwrap();
        let modules =
            ddetr_trainer::flops::count_by_module(&graph, (opts.input_height, opts.input_width))
                .unwrap();
        // A backbone-alone peer (timm's GCViT, TAO's FAN) is held to the backbone's share.
        let backbone_only = case.fvcore.scope == "backbone";
        let ours = if backbone_only {
            modules["backbone"]
        } else {
            FlopCount::sum(modules.values())
        };
        // Module by module: the groups fvcore's by_module gives, in ddetr's names.
        let mine = module_totals(&modules);
        if !backbone_only {
            assert_eq!(
                mine.keys().collect::<Vec<_>>(),
                case.fvcore.by_module_deployed.keys().collect::<Vec<_>>(),
                "{}",
                case.name
            );
        }
        assert!(!case.fvcore.by_module_deployed.is_empty());
        for (m, t) in &case.fvcore.by_module_deployed {
            let o = mine[m];
            assert!(
                (o - t).abs() <= 1e-9 * t.abs().max(1.0),
                "{}: module {m}: ddetr {o} vs fvcore {t}",
                case.name
            );
        }
        let theirs = case.fvcore.kinds();
        for ((name, o), t) in names.iter().zip(kinds(&ours)).zip(theirs) {
            assert!(
                (o - t).abs() <= 1e-9 * t.abs().max(1.0),
                "{}: {name}: ddetr {o} vs fvcore {t}",
                case.name
            );
        }
        assert!(theirs[0] > 0.0 && theirs[1] > 0.0);
        assert_eq!(theirs[4] > 0.0, !backbone_only, "{}: sampling", case.name);
        let deployed = case.fvcore.deployed();
        assert!(
            (ours.total() - deployed).abs() <= 1e-9 * deployed,
            "{}",
            case.name
        );
    }
}

#[test]
fn networks_no_library_builds_have_no_peer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let load = |spec: &str, o: &[&str]| {
        let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
        ddetr_trainer::spec::load(&root.join(spec), &o, None)
            .unwrap()
            .spec
    };
    let three_levels = peer_args(&load("configs/shapes_tiny.yaml", &[])).unwrap_err();
    assert!(
        three_levels.contains("num_feature_levels 1"),
        "{three_levels}"
    );
    let gcvit = peer_args(&load(
        "configs/coco_r50.yaml",
        &["model.backbone=gc_vit_xxtiny"],
    ));
    assert!(gcvit.unwrap_err().contains("224x224 only"));
    let large = peer_args(&load(
        "configs/coco_r50.yaml",
        &["model.backbone=gc_vit_large_384"],
    ));
    assert!(large.unwrap_err().contains("large_384"));
    let dino = peer_args(&load("configs/dino_r50.yaml", &[])).unwrap_err();
    assert!(dino.contains("DINO"), "{dino}");
}
