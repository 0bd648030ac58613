//! FAN parity with TAO's own `FANFPN` (tests/golden/make_fan_fixtures.py runs TAO's
//! cv/dino/model/fan.py over cv/backbone_v2), weights filled by TAO key on both sides: every
//! returned level after its `out_norm{i}`, in eval mode at 224² and at a size that is not a
//! multiple of 32, and in training mode (batch statistics in the depthwise MLP's BatchNorm).

mod common;

use ddetr_trainer::model::fan::{Fan, FanConfig, Pass};
use ddetr_trainer::spec::Backbone;
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
    let net = Fan::new(&vs.root(), kind, config, &LEVELS);
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
        let _ = Fan::new(&vs.root(), kind, FanConfig::of(kind).unwrap(), &LEVELS);
        let n: i64 = vs
            .trainable_variables()
            .iter()
            .map(Tensor::numel)
            .map(|n| n as i64)
            .sum();
        assert_eq!(n, want, "{}", kind.name());
    }
}
