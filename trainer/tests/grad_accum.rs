//! `train.grad_accum_steps`: N micro batches of b images in one optimizer step give the
//! gradients, losses and update of one batch of N·b images (the loss normalised by the boxes of
//! all of them; matching, focal, L1 and GIoU terms are per image, so they add up).

use ddetr_collective::Communicator;
use ddetr_trainer::amp::Amp;
use ddetr_trainer::criterion::{local_num_boxes, normalizer};
use ddetr_trainer::detector::{build_model, DeformableDetrDetector};
use ddetr_trainer::matcher::Target;
use ddetr_trainer::optim::Optim;
use ddetr_trainer::spec::{self, Precision};
use ddetr_trainer::strategy::Strategy;
use ddetr_trainer::train::update::{optimizer_step, MicroBatch, StepState};
use tch::{Device, Kind, Tensor};

fn target(labels: &[i64], boxes: &[f32]) -> Target {
    Target {
        labels: Tensor::from_slice(labels),
        boxes: Tensor::from_slice(boxes).view([-1, 4]),
    }
}

#[test]
fn two_micro_batches_step_as_one_batch_of_both() {
    let s = spec::load_str(
        "",
        &[
            "model.backbone=resnet_18",
            "model.backbone_from_scratch=true",
            "model.num_feature_levels=2",
            "model.return_interm_indices=[2,3]",
            "model.hidden_dim=64",
            "model.nheads=2",
            "model.enc_layers=1",
            "model.dec_layers=2",
            "model.dim_feedforward=64",
            "model.num_queries=12",
            "model.num_select=12",
            "model.dropout_ratio=0",
            "dataset.num_classes=4",
            // SGD: the update is proportional to the gradient (AdamW's first step is lr·g/|g|,
            // which turns float noise in gradients that are 0 in exact arithmetic, such as the
            // attention key bias's, into ±lr).
            "train.optim.optimizer=SGD",
        ]
        .map(String::from),
        None,
    )
    .unwrap()
    .spec;
    let built = build_model::<DeformableDetrDetector>(&s, Device::Cpu, 3).unwrap();
    let start: Vec<Tensor> = built.params.iter().map(|p| p.tensor.copy()).collect();
    tch::manual_seed(11);
    let images = Tensor::randn([4, 3, 64, 64], (Kind::Float, Device::Cpu));
    let mask = Tensor::zeros([4, 64, 64], (Kind::Bool, Device::Cpu));
    let targets = vec![
        target(&[1, 2], &[0.3, 0.3, 0.2, 0.2, 0.7, 0.6, 0.3, 0.2]),
        target(&[3], &[0.5, 0.5, 0.4, 0.4]),
        target(
            &[2, 2, 1],
            &[0.2, 0.7, 0.1, 0.2, 0.6, 0.3, 0.3, 0.3, 0.8, 0.8, 0.2, 0.2],
        ),
        target(&[1], &[0.4, 0.6, 0.5, 0.3]),
    ];
    let num_boxes = normalizer(local_num_boxes(&targets));
    let comm = Communicator::single();
    // One optimizer step from `start` over `parts` (image ranges): grads, losses, parameters.
    let step = |parts: &[(i64, i64)]| {
        tch::no_grad(|| {
            for (p, s) in built.params.iter().zip(&start) {
                p.tensor.shallow_clone().copy_(s);
            }
        });
        let mut optim = Optim::new(&s.train.optim, built.params.len());
        let mut strategy =
            Strategy::for_model(s.train.distributed_strategy, &comm, &built).unwrap();
        let mut amp = Amp::new(Precision::Fp32, Device::Cpu);
        let pieces: Vec<(Tensor, Tensor, &[Target])> = parts
            .iter()
            .map(|&(a, n)| {
                (
                    images.narrow(0, a, n),
                    mask.narrow(0, a, n),
                    &targets[a as usize..(a + n) as usize],
                )
            })
            .collect();
        let micro: Vec<MicroBatch<'_>> = pieces
            .iter()
            .map(|(images, mask, targets)| MicroBatch {
                images,
                mask,
                targets,
            })
            .collect();
        let (losses, _) = optimizer_step(
            &built,
            StepState {
                strategy: &mut strategy,
                optim: &mut optim,
                amp: &mut amp,
            },
            &micro,
            num_boxes,
            0.0,
            false,
        )
        .unwrap();
        let grads: Vec<Tensor> = built
            .params
            .iter()
            .map(|p| p.tensor.grad().copy())
            .collect();
        let params: Vec<Tensor> = built.params.iter().map(|p| p.tensor.copy()).collect();
        (losses, grads, params)
    };
    let (whole, g1, p1) = step(&[(0, 4)]);
    let (accum, g2, p2) = step(&[(0, 2), (2, 2)]);
    let total = |l: &ddetr_trainer::criterion::Losses| l.total.double_value(&[]);
    assert!(
        (total(&whole) - total(&accum)).abs() < 1e-5 * total(&whole).abs(),
        "{} vs {}",
        total(&whole),
        total(&accum)
    );
    assert_eq!(
        whole.terms.keys().collect::<Vec<_>>(),
        accum.terms.keys().collect::<Vec<_>>()
    );
    let mut compared = 0;
    for ((p, a), b) in built.params.iter().zip(&g1).zip(&g2) {
        if !a.defined() {
            assert!(!b.defined(), "{}", p.name);
            continue;
        }
        let scale = a.abs().max().double_value(&[]).max(1e-3);
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(
            diff <= 1e-5 * scale,
            "{}: grads differ by {diff} (max {scale})",
            p.name
        );
        compared += 1;
    }
    assert!(compared > 20, "only {compared} gradients compared");
    for ((p, a), b) in built.params.iter().zip(&p1).zip(&p2) {
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(
            diff <= 1e-5,
            "{}: parameters differ by {diff} after the step",
            p.name
        );
    }
    // Accumulating changed something: a different normaliser would not give these grads.
    assert!(total(&whole) > 0.0);
}
