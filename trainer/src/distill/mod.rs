//! DINO's `distill` task (TAO's `dino distill`): a DINO student trains as `train` does while a
//! frozen teacher (DINO, TAO's case, or Deformable DETR) runs on the same batch, and
//! `model.distillation_loss_coef × Σ_b weight_b² · criterion_b(student, teacher)` joins the
//! loss (TAO applies a binding's weight twice; see `docs/reference/dino-distill.md`).
//!
//! | file | holds |
//! |------|-------|
//! | `teacher.rs` | [`Teacher`]: the teacher network in its own variable store, loaded and frozen; its outputs on a batch ([`Taps`]) |
//! | `bindings.rs` | [`Bindings`]: the criteria and the `loss_distillation` terms on the feature maps and on the final predictions |
//! | `distiller.rs` | [`DinoDistiller`]: the student and the teacher as one [`crate::detector::Detector`] the training engine drives |

mod bindings;
mod distiller;
mod teacher;

pub use bindings::{criterion, level_maps, Bindings, DISTILL_TERM};
pub use distiller::DinoDistiller;
pub use teacher::{FinalPrediction, Taps, Teacher};
