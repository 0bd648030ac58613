//! FAN parity with TAO's own `FANFPN` (tests/golden/make_fan_fixtures.py runs TAO's
//! cv/dino/model/fan.py over cv/backbone_v2), weights filled by TAO key on both sides: every
//! returned level after its `out_norm{i}`, in eval mode at 224² and at a size that is not a
//! multiple of 32, and in training mode (batch statistics in the depthwise MLP's BatchNorm).

mod common;

use ddetr_trainer::model::fan::{Fan, FanConfig, Pass};
use ddetr_trainer::spec::Backbone;
use ddetr_trainer::weights;
use tch::nn::VarStore;
use tch::{Device, Tensor};

const LEVELS: [usize; 4] = [0, 1, 2, 3];
const KEPT_CHANNELS: i64 = 2;

/// One fixture case: `prefix` in the fixture, the input size, the pass, and whether the first
/// channels are stored in full.
struct Case {
    prefix: &'static str,
    hw: (i64, i64),
    pass: Pass,
    channels: bool,
}

fn check(kind: Backbone, fixture: &str, cases: &[Case]) {
    let golden = common::read_fixture(fixture);
    let vs = VarStore::new(Device::Cpu);
    let mut config = FanConfig::of(kind).unwrap();
    // The training case is made with TAO's stochastic depth switched off.
    config.drop_path_rate = 0.0;
    let net = Fan::new(&vs.root(), config, &LEVELS);
    common::fill_model(&vs);
    for case in cases {
        let (h, w) = case.hw;
        let x = common::hash_uniform_tensor(&format!("fan.input.{h}x{w}"), &[2, 3, h, w]);
        let outs = tch::no_grad(|| net.forward(&x, case.pass));
        for (i, out) in outs.iter().enumerate() {
            let out = out.as_ref().expect("every level is returned");
            let key = |k: &str| format!("{}.level{i}.{k}", case.prefix);
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
            if case.channels {
                compare(&out.narrow(1, 0, KEPT_CHANNELS), "channels");
            }
            compare(&out.mean_dim(&[2i64, 3][..], false, None), "channel_mean");
            compare(&out.mean_dim(&[1i64][..], false, None), "position_mean");
        }
    }
}

#[test]
fn fan_tiny_matches_tao_in_eval_at_224_and_off_the_stride_grid_and_in_training() {
    check(
        Backbone::FanTiny,
        "fan_tiny.safetensors",
        &[
            Case {
                prefix: "eval0",
                hw: (224, 224),
                pass: Pass::Eval,
                channels: true,
            },
            Case {
                prefix: "eval1",
                hw: (200, 264),
                pass: Pass::Eval,
                channels: true,
            },
            Case {
                prefix: "train0",
                hw: (224, 224),
                pass: Pass::Train,
                channels: false,
            },
        ],
    );
}

#[test]
fn fan_small_matches_tao_in_eval_at_224() {
    check(
        Backbone::FanSmall,
        "fan_small.safetensors",
        &[Case {
            prefix: "eval0",
            hw: (224, 224),
            pass: Pass::Eval,
            channels: true,
        }],
    );
}

#[test]
fn parameter_counts_equal_taos() {
    // TAO's FANFPN with out_indices [0, 1, 2, 3] (make_fan_fixtures.py prints them).
    for (kind, want) in [
        (Backbone::FanTiny, 8_604_416),
        (Backbone::FanSmall, 28_390_224),
    ] {
        let vs = VarStore::new(Device::Cpu);
        let _ = Fan::new(&vs.root(), FanConfig::of(kind).unwrap(), &LEVELS);
        let n: i64 = vs
            .trainable_variables()
            .iter()
            .map(Tensor::numel)
            .map(|n| n as i64)
            .sum();
        assert_eq!(n, want, "{}", kind.name());
    }
}

fn detector_trunk(kind: Backbone) -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    let body = vs.root() / "backbone" / 0 / "body";
    let _ = Fan::new(&body, FanConfig::of(kind).unwrap(), &[1, 2, 3]);
    vs
}

#[test]
fn pretrained_backbone_path_loads_a_tao_fan_classifier() {
    let dir = tempfile::tempdir().unwrap();
    // TAO's classification FAN-hybrid: the trunk without the detector's output norms and
    // learnable downsampling, with its own `norm` and `head` and BatchNorm's batch counters,
    // under a `model.` prefix; every tensor filled by its name.
    let classifier = VarStore::new(Device::Cpu);
    let _ = Fan::new(
        &classifier.root(),
        FanConfig::of(Backbone::FanTiny).unwrap(),
        &[],
    );
    let mut named: Vec<(String, Tensor)> = classifier
        .variables()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("learnable_downsample."))
        .map(|(k, t)| (format!("model.{k}"), common::fill(&k, &t.size())))
        .collect();
    for (k, shape) in [
        ("norm.weight", vec![192]),
        ("head.weight", vec![1000, 192]),
        ("blocks.0.mlp.mlp_v.dwconv.bn.num_batches_tracked", vec![]),
    ] {
        named.push((format!("model.{k}"), common::fill(k, &shape)));
    }
    let file = dir.path().join("fan_tiny_hybrid_nvimagenet.safetensors");
    Tensor::write_safetensors(&named, &file).unwrap();

    let vs = detector_trunk(Backbone::FanTiny);
    let vars = vs.variables();
    let report = weights::load_fan_backbone(&vs, &file).unwrap();
    let mut missing = vec![
        "backbone.0.body.learnable_downsample.bias".to_string(),
        "backbone.0.body.learnable_downsample.weight".into(),
    ];
    for i in 1..=3 {
        missing.push(format!("backbone.0.body.out_norm{i}.bias"));
        missing.push(format!("backbone.0.body.out_norm{i}.weight"));
    }
    missing.sort();
    assert_eq!(report.missing, missing);
    assert_eq!(
        report.unexpected,
        ["backbone.0.body.head.weight", "backbone.0.body.norm.weight"]
    );
    assert_eq!(report.loaded, vars.len() - missing.len());
    for k in [
        "patch_embed.backbone.stages.1.blocks.2.mlp.fc2.weight",
        "blocks.5.mlp.mlp_v.dwconv.bn.running_var",
        "cls_token",
    ] {
        let var = &vars[&format!("backbone.0.body.{k}")];
        assert!(var.equal(&common::fill(k, &var.size())), "{k}");
    }

    // Another size: a small detector has other widths; the load names the key and the fix.
    let err = weights::load_fan_backbone(&detector_trunk(Backbone::FanSmall), &file)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.backbone must name the FAN size"),
        "{err}"
    );
    // A GCViT file fills nothing of a FAN.
    let gcvit = dir.path().join("gcvit.safetensors");
    Tensor::write_safetensors(
        &[(
            "levels.0.blocks.0.attn.qkv.weight",
            Tensor::ones([3, 3], tch::kind::FLOAT_CPU),
        )],
        &gcvit,
    )
    .unwrap();
    let err = weights::load_fan_backbone(&vs, &gcvit)
        .unwrap_err()
        .to_string();
    assert!(err.contains("give a FAN-hybrid state dict"), "{err}");
}

#[test]
fn train_backbone_false_freezes_the_whole_trunk_and_true_trains_all_of_it() {
    use ddetr_trainer::detector::{build_model, DinoDetector};
    let trunk = |train: bool| {
        let o = [
            "model_name=dino".to_string(),
            "model.backbone=fan_tiny".into(),
            format!("model.train_backbone={train}"),
            "dataset.num_classes=5".into(),
        ];
        let spec = ddetr_trainer::spec::load_str("", &o, None).unwrap().spec;
        let built = build_model::<DinoDetector>(&spec, Device::Cpu, 0).unwrap();
        let in_trunk = |n: &str| n.starts_with("backbone.0.body.");
        (
            built.params.iter().filter(|p| in_trunk(&p.name)).count(),
            built.buffers.iter().filter(|(n, _)| in_trunk(n)).count(),
        )
    };
    // The BatchNorms' running statistics (two per FAN block) are buffers either way.
    let (trained, stats) = trunk(true);
    assert_eq!(stats, 2 * 8);
    assert!(trained > 200, "{trained}");
    assert_eq!(trunk(false), (0, trained + stats));
}
