//! One optimizer step, the same for `ddetr train` and `ddetr bench step`: gradients zeroed, the
//! detector's forward + loss + backward (under the loss scale), the strategy's gradient sync,
//! unscale, clip and update, then the loss scaler's update.

use tch::Tensor;

use crate::amp::Amp;
use crate::criterion::Losses;
use crate::detector::{Built, Detector};
use crate::matcher::Target;
use crate::optim::Optim;
use crate::step::StepMode;
use crate::strategy::{StepReport, Strategy};
use crate::TrainerError;

/// What a step changes besides the parameters.
pub struct StepState<'a, 'c> {
    pub strategy: &'a mut Strategy<'c>,
    pub optim: &'a mut Optim,
    pub amp: &'a mut Amp,
}

/// Runs one step on a batch already on the model's device; `num_boxes` is the loss normaliser
/// (averaged over ranks by the caller), `clip` `train.clip_grad_norm` (0: none).
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step<D: Detector>(
    built: &Built<D>,
    state: StepState<'_, '_>,
    images: &Tensor,
    mask: &Tensor,
    targets: &[Target],
    num_boxes: f64,
    clip: f64,
    activation_checkpoint: bool,
) -> Result<(Losses, StepReport), TrainerError> {
    for p in &built.params {
        let mut g = p.tensor.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let scale = state.amp.loss_scale();
    let losses = built.model.forward_backward(
        images,
        mask,
        targets,
        num_boxes,
        state.amp,
        StepMode {
            activation_checkpoint,
            loss_scale: scale,
        },
    )?;
    // fp16: the strategy unscales, and skips the update when the gradients overflowed
    // (GradScaler's rule).
    let report = state
        .strategy
        .step(state.optim, &built.params, clip, 1.0 / scale)?;
    if report.skipped {
        tracing::warn!(
            scale,
            "fp16 gradients overflowed: step skipped, loss scale halved"
        );
    }
    state.amp.update(report.skipped);
    Ok((losses, report))
}
