//! Forward, loss and backward of one batch — plainly, or with activation checkpointing
//! (`train.activation_checkpoint`) as a staged backward:
//!
//! 1. the backbone runs without recording autograd (its activations are freed at once) and its
//!    feature maps become leaves that require grad;
//! 2. the transformer, heads and criterion run from those leaves with autograd, and backward
//!    fills the transformer's gradients and the leaves' (the gradients of the feature maps);
//! 3. the backbone runs again with autograd, and backward of Σ⟨features, leaf.grad⟩ — whose
//!    gradient with respect to the features is exactly the leaves' gradients — fills the
//!    backbone's gradients (the vector–Jacobian product the one-graph backward computes).
//!
//! The backbone's activations (the largest tensors at detection resolutions) and the
//! transformer's are then never alive together, for one extra backbone forward. The gradients
//! are the plain path's (tests/activation_checkpoint.rs checks them equal).

use tch::{Kind, Tensor};

use crate::amp::Amp;
use crate::criterion::{Losses, SetCriterion};
use crate::matcher::Target;
use crate::model::DeformableDetr;
use crate::TrainerError;

/// How one training step computes its gradients.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepMode {
    /// Recompute the backbone in backward instead of keeping its activations.
    pub activation_checkpoint: bool,
    /// The factor the loss is multiplied by before backward (fp16's loss scale; 1 otherwise).
    pub loss_scale: f64,
}

/// Runs forward, the criterion and backward (gradients accumulate into the parameters'
/// `.grad`); returns the unscaled losses.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    model: &DeformableDetr,
    criterion: &SetCriterion,
    images: &Tensor,
    mask: &Tensor,
    targets: &[Target],
    num_boxes: f64,
    amp: &Amp,
    mode: StepMode,
) -> Result<Losses, TrainerError> {
    let scale = if mode.loss_scale == 0.0 {
        1.0
    } else {
        mode.loss_scale
    };
    let backward = |total: &Tensor| {
        if scale == 1.0 {
            total.backward();
        } else {
            (total * scale).backward();
        }
    };
    if !mode.activation_checkpoint {
        let losses = amp.autocast(|| {
            let out = model.forward(images, mask, true);
            criterion.forward(&out, targets, num_boxes)
        })?;
        backward(&losses.total);
        return Ok(losses);
    }
    let leaves: Vec<(Tensor, Tensor)> = tch::no_grad(|| {
        amp.autocast(|| model.backbone_features(images, mask))
            .into_iter()
            .map(|(f, m)| (f.detach().set_requires_grad(true), m))
            .collect()
    });
    let losses = amp.autocast(|| {
        let out = model.forward_from_features(&leaves, mask, true);
        criterion.forward(&out, targets, num_boxes)
    })?;
    backward(&losses.total);
    let again = amp.autocast(|| model.backbone_features(images, mask));
    let mut surrogate: Option<Tensor> = None;
    for ((f, _), (leaf, _)) in again.iter().zip(&leaves) {
        let g = leaf.grad();
        if !f.requires_grad() || !g.defined() {
            continue;
        }
        let term = (f * &g).sum(Kind::Float);
        surrogate = Some(match surrogate {
            Some(s) => s + term,
            None => term,
        });
    }
    if let Some(s) = surrogate {
        s.backward();
    }
    Ok(losses)
}
