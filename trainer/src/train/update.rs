//! One optimizer step, the same for `ddetr train` and `ddetr bench step`: gradients zeroed, the
//! detector's forward + loss + backward (under the loss scale) of each micro batch
//! (`train.grad_accum_steps` of them; the gradients add up, with no synchronisation between
//! them), the strategy's gradient sync, unscale, clip and update, then the loss scaler's update.

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

/// One micro batch of an optimizer step, on the model's device.
pub struct MicroBatch<'a> {
    pub images: &'a Tensor,
    pub mask: &'a Tensor,
    pub targets: &'a [Target],
}

/// Runs one step on its micro batches; `num_boxes` is the loss normaliser of all of them
/// together (their boxes, averaged over ranks by the caller), so the summed gradients are those
/// of one batch holding every micro batch's images; `clip` is `train.clip_grad_norm` (0: none).
/// Returns the losses summed over the micro batches (the whole batch's).
pub fn optimizer_step<D: Detector>(
    built: &Built<D>,
    state: StepState<'_, '_>,
    micro: &[MicroBatch<'_>],
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
    let mut losses: Option<Losses> = None;
    for m in micro {
        let l = built.model.forward_backward(
            m.images,
            m.mask,
            m.targets,
            num_boxes,
            state.amp,
            StepMode {
                activation_checkpoint,
                loss_scale: scale,
            },
        )?;
        // Keep values only: each micro batch's graph is freed after its backward.
        let l = Losses {
            terms: l.terms.into_iter().map(|(k, v)| (k, v.detach())).collect(),
            total: l.total.detach(),
        };
        match &mut losses {
            Some(sum) => sum.add(l),
            None => losses = Some(l),
        }
    }
    let losses = losses.ok_or_else(|| {
        TrainerError::Config("an optimizer step needs at least one micro batch".into())
    })?;
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
