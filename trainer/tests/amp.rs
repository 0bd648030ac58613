//! Mixed precision through the whole training computation: forward, matcher, criterion and
//! backward under libtorch autocast. CI has no GPU, so this runs CPU autocast to bf16, which
//! sends the same ops (convolutions, linears, matmuls, grid_sample) through reduced-precision
//! kernels as CUDA's fp16/bf16; the gradients must stay f32 (the parameters' dtype), finite, and
//! close to the f32 ones.

mod common;

use common::*;
use ddetr_trainer::amp::AutocastGuard;
use ddetr_trainer::criterion::{local_num_boxes, normalizer, SetCriterion};
use ddetr_trainer::matcher::Target;
use tch::{Device, Kind, Tensor};

fn grads_of(
    cfg: &ddetr_trainer::spec::ModelConfig,
    autocast: bool,
) -> (f64, Vec<(String, Tensor)>, Kind) {
    let (vs, model) = build(cfg);
    fill_model(&vs);
    let (images, mask) = inputs();
    let targets: Vec<Target> = targets()
        .into_iter()
        .map(|(labels, boxes)| Target { labels, boxes })
        .collect();
    let criterion = SetCriterion::from_spec(cfg, NUM_CLASSES);
    let num_boxes = normalizer(local_num_boxes(&targets));
    let (losses, logits_kind) = {
        let _g = autocast.then(|| AutocastGuard::new(Device::Cpu, Kind::BFloat16));
        let out = model.forward(&images, &mask, true);
        let k = out.last().logits.kind();
        (criterion.forward(&out, &targets, num_boxes).unwrap(), k)
    };
    losses.total.backward();
    let vars: std::collections::BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let named: Vec<(String, Tensor)> = vars
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, t)| (n, t.grad()))
        .filter(|(_, g)| g.defined())
        .collect();
    (losses.total.double_value(&[]), named, logits_kind)
}

#[test]
fn forward_loss_and_backward_run_under_autocast_with_f32_gradients_near_f32s() {
    let cfg = model_config(4, true, false);
    let (loss32, g32, k32) = grads_of(&cfg, false);
    let (loss16, g16, k16) = grads_of(&cfg, true);
    assert_eq!(k32, Kind::Float);
    assert_eq!(k16, Kind::BFloat16, "autocast reached the heads");
    assert!(loss16.is_finite());
    assert!(
        (loss16 - loss32).abs() < 0.05 * loss32.abs(),
        "bf16 loss {loss16} vs f32 {loss32}"
    );
    assert!(!g32.is_empty());
    assert_eq!(g32.len(), g16.len());
    let (mut num, mut den) = (0.0, 0.0);
    for ((n32, a), (n16, b)) in g32.iter().zip(&g16) {
        assert_eq!(n32, n16);
        assert_eq!(
            b.kind(),
            Kind::Float,
            "{n16}: gradients keep the parameter dtype"
        );
        assert!(
            b.isfinite().all().int64_value(&[]) == 1,
            "{n16}: non-finite gradient"
        );
        num += (a - b).square().sum(Kind::Double).double_value(&[]);
        den += a.square().sum(Kind::Double).double_value(&[]);
    }
    // bf16 keeps 8 significant bits; through 17 convolutions, two encoder and two decoder layers
    // (sampling-location gradients are the most sensitive) the whole gradient lands ~20% (relative
    // L2, cosine ≈ 0.98) from f32's here. A wrong cast or a lost path gives ≥ 100%.
    let rel = (num / den).sqrt();
    assert!(
        rel < 0.35,
        "bf16 gradients are {rel} (relative L2) from f32's"
    );
}
