//! GCViT parity with timm's `GlobalContextVit` (tests/golden/make_gcvit_fixtures.py: timm's
//! modules, TAO's padding and global-query resize substituted for inputs that are not a multiple
//! of the window), weights filled by TAO key on both sides.

mod common;

use ddetr_trainer::model::gcvit::{self, GcVit, GcVitConfig};
use ddetr_trainer::spec::Backbone;
use ddetr_trainer::weights;
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// The fixture's (height, width) cases, in order.
const SIZES: [(i64, i64); 2] = [(224, 224), (200, 264)];
const KEPT_CHANNELS: i64 = 2;

fn check(kind: Backbone, fixture: &str) {
    let golden = common::read_fixture(fixture);
    let vs = VarStore::new(Device::Cpu);
    // timm has no norm after levels 0–2 (TAO's norm0..2): those are compared before TAO's
    // norm; level 3 after norm3, which is timm's `stages.3.norm`.
    let net = GcVit::new(&vs.root(), GcVitConfig::of(kind).unwrap(), &[3]);
    common::fill_model(&vs);
    for (ci, (h, w)) in SIZES.iter().enumerate() {
        let x = common::hash_uniform_tensor(&format!("gcvit.input.{h}x{w}"), &[2, 3, *h, *w]);
        let (mut outs, normed) = tch::no_grad(|| {
            let raw: Vec<Tensor> = net
                .levels_up_to(&x, 3, false)
                .iter()
                .map(|t| t.permute([0, 3, 1, 2]))
                .collect();
            (
                raw,
                net.forward(&x, false).pop().flatten().expect("level 3"),
            )
        });
        outs[3] = normed;
        for (s, out) in outs.iter().enumerate() {
            let key = |k: &str| format!("case{ci}.stage{s}.{k}");
            let compare = |ours: &Tensor, k: &str| {
                let want = &golden[&key(k)];
                assert_eq!(ours.size(), want.size(), "{fixture} {}", key(k));
                let diff = common::max_abs_diff(ours, want);
                let scale = want.abs().max().double_value(&[]);
                assert!(
                    diff <= 1e-4 * scale.max(1.0),
                    "{fixture} {}: max |diff| {diff:e} (values up to {scale:.3})",
                    key(k)
                );
            };
            compare(&out.narrow(1, 0, KEPT_CHANNELS), "channels");
            compare(&out.mean_dim(&[2i64, 3][..], false, None), "channel_mean");
            compare(&out.mean_dim(&[1i64][..], false, None), "position_mean");
        }
    }
}

#[test]
fn gc_vit_xxtiny_matches_timm_at_224_and_at_a_size_off_the_window_grid() {
    check(Backbone::GcVitXxtiny, "gcvit_xxtiny.safetensors");
}

#[test]
fn gc_vit_tiny_matches_timm_at_224_and_at_a_size_off_the_window_grid() {
    check(Backbone::GcVitTiny, "gcvit_tiny.safetensors");
}

/// timm's gcvit_xxtiny state-dict keys (with the classifier head), shapes, and the fixture
/// script's TAO name for each.
fn timm_keys() -> Vec<(String, Vec<i64>, Option<String>)> {
    let text = std::fs::read_to_string(common::golden_dir().join("gcvit_xxtiny_timm_keys.json"))
        .expect("gcvit_xxtiny_timm_keys.json");
    serde_json::from_str(&text).expect("[[key, shape, tao], …]")
}

fn detector_trunk(kind: Backbone) -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    let body = vs.root() / "backbone" / 0 / "body";
    let _ = GcVit::new(&body, GcVitConfig::of(kind).unwrap(), &[1, 2, 3]);
    vs
}

#[test]
fn timm_names_map_as_the_fixture_script_maps_them() {
    for (timm, _, tao) in timm_keys() {
        assert_eq!(gcvit::timm_to_tao(&timm), tao, "{timm}");
    }
}

#[test]
fn pretrained_backbone_path_loads_timm_and_tao_state_dicts() {
    let dir = tempfile::tempdir().unwrap();
    let vs = detector_trunk(Backbone::GcVitXxtiny);
    let vars = vs.variables();
    // timm's classifier, every tensor filled by its timm key, under DDP's `module.` prefix.
    let keys = timm_keys();
    let named: Vec<(String, Tensor)> = keys
        .iter()
        .map(|(k, shape, _)| (format!("module.{k}"), common::fill(k, shape)))
        .collect();
    let timm_file = dir.path().join("gcvit_xxtiny_timm.safetensors");
    Tensor::write_safetensors(&named, &timm_file).unwrap();
    let report = weights::load_gcvit_backbone(&vs, &timm_file).unwrap();
    // The detector's output norms for levels 1 and 2 are not in a classifier (timm's last stage
    // norm is norm3); the classifier head has no place in the detector.
    assert_eq!(
        report.missing,
        [
            "backbone.0.body.norm1.bias",
            "backbone.0.body.norm1.weight",
            "backbone.0.body.norm2.bias",
            "backbone.0.body.norm2.weight"
        ]
    );
    assert_eq!(
        report.unexpected,
        ["module.head.fc.bias", "module.head.fc.weight"]
    );
    assert_eq!(report.loaded, vars.len() - 4);
    for (timm, shape, tao) in &keys {
        let Some(tao) = tao else { continue };
        let var = &vars[&format!("backbone.0.body.{tao}")];
        let want = common::fill(timm, shape).reshape(var.size());
        assert!(var.equal(&want), "{timm} → {tao}");
    }

    // TAO's names (a classifier's `norm` and `head` left over), as TAO's GCViT saves them.
    let tao_named: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(k, t)| (k["backbone.0.body.".len()..].to_string(), t.ones_like()))
        .chain([
            (
                "norm.weight".to_string(),
                Tensor::ones([512], tch::kind::FLOAT_CPU),
            ),
            (
                "head.weight".to_string(),
                Tensor::ones([1000, 512], tch::kind::FLOAT_CPU),
            ),
        ])
        .collect();
    let tao_file = dir.path().join("gcvit_xxtiny_tao.safetensors");
    Tensor::write_safetensors(&tao_named, &tao_file).unwrap();
    let report = weights::load_gcvit_backbone(&vs, &tao_file).unwrap();
    assert_eq!(report.loaded, vars.len());
    assert_eq!(
        report.unexpected,
        ["backbone.0.body.head.weight", "backbone.0.body.norm.weight"]
    );
    let qkv = &vars["backbone.0.body.levels.2.blocks.5.attn.qkv.weight"];
    assert_eq!(qkv.size(), [512, 256]); // a global block: keys and values only
    assert!(qkv.equal(&qkv.ones_like()));

    // Another size: a tiny detector misses the blocks xxtiny lacks; a small one has other widths.
    let err = weights::load_gcvit_backbone(&detector_trunk(Backbone::GcVitTiny), &timm_file)
        .unwrap_err()
        .to_string();
    assert!(err.contains("levels.0.blocks.2."), "{err}");
    let err = weights::load_gcvit_backbone(&detector_trunk(Backbone::GcVitSmall), &timm_file)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.backbone must name the GCViT size"),
        "{err}"
    );
}

#[test]
fn train_backbone_false_freezes_the_whole_trunk_and_true_trains_all_of_it() {
    use ddetr_trainer::detector::{build_model, DeformableDetrDetector};
    let trunk = |train: bool| {
        let o = [
            "model.backbone=gc_vit_xxtiny".to_string(),
            format!("model.train_backbone={train}"),
            "dataset.num_classes=5".into(),
        ];
        let spec = ddetr_trainer::spec::load_str("", &o, None).unwrap().spec;
        let built = build_model::<DeformableDetrDetector>(&spec, Device::Cpu, 0).unwrap();
        let in_trunk = |n: &str| n.starts_with("backbone.0.body.");
        (
            built.params.iter().filter(|p| in_trunk(&p.name)).count(),
            built.buffers.iter().filter(|(n, _)| in_trunk(n)).count(),
        )
    };
    let (trained, frozen) = trunk(true);
    assert!(trained > 200 && frozen == 0, "{trained} {frozen}");
    assert_eq!(trunk(false), (0, trained));
}
