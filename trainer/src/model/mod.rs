//! The Deformable DETR network in tch, one file per upstream module of
//! `fundamentalvision/Deformable-DETR` (`models/backbone.py`, `models/position_encoding.py`,
//! `models/ops/modules/ms_deform_attn.py`, `models/deformable_transformer.py`,
//! `models/deformable_detr.py`). Parameter paths equal the official state-dict keys
//! (`backbone.0.body.layer1.0.conv1.weight`, `transformer.encoder.layers.0.self_attn.sampling_offsets.weight`,
//! `class_embed.0.bias`, …), so official weights load with no renaming, and initialisation follows
//! upstream's `_reset_parameters` exactly.

pub mod backbone;
pub mod box_ops;
pub mod deformable_detr;
pub mod deformable_transformer;
pub mod dino;
pub mod dropout;
pub mod fan;
pub mod gcvit;
pub mod ms_deform_attn;
pub mod position_encoding;

pub use deformable_detr::{DeformableDetr, DetrOutput, Prediction};

use tch::nn::{self, Init};
use tch::Tensor;

/// `torch.nn.init.xavier_uniform_` with the given gain, for a `[fan_out, fan_in, ...]` weight.
pub(crate) fn xavier_uniform(fan_in: i64, fan_out: i64, gain: f64) -> Init {
    let bound = gain * (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// PyTorch's default `nn.Linear`/`nn.Conv2d` bias init: U(−1/√fan_in, 1/√fan_in).
pub(crate) fn default_bias(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// PyTorch's default `nn.Linear` weight init (kaiming_uniform with a = √5): U(−1/√fan_in, 1/√fan_in).
pub(crate) fn default_weight(fan_in: i64) -> Init {
    default_bias(fan_in)
}

/// A linear layer with explicit weight and bias initialisers (`weight` `[out, in]`, `bias` `[out]`).
pub(crate) fn linear(
    p: nn::Path,
    input: i64,
    output: i64,
    ws_init: Init,
    bs_init: Init,
) -> nn::Linear {
    nn::linear(
        p,
        input,
        output,
        nn::LinearConfig {
            ws_init,
            bs_init: Some(bs_init),
            bias: true,
        },
    )
}

/// A linear layer initialised like upstream's transformer matrices: xavier_uniform weight, PyTorch's
/// default bias.
pub(crate) fn xavier_linear(p: nn::Path, input: i64, output: i64) -> nn::Linear {
    linear(
        p,
        input,
        output,
        xavier_uniform(input, output, 1.0),
        default_bias(input),
    )
}

/// `util/misc.py inverse_sigmoid(x, eps=1e-5)`.
pub const INVERSE_SIGMOID_EPS: f64 = 1e-5;

/// `inverse_sigmoid`: log(x / (1 − x)) with both clamped away from zero.
pub fn inverse_sigmoid(x: &Tensor) -> Tensor {
    inverse_sigmoid_eps(x, INVERSE_SIGMOID_EPS)
}

/// [`inverse_sigmoid`] with another clamp (DINO's `util/misc.py` uses 1e-3).
pub fn inverse_sigmoid_eps(x: &Tensor, eps: f64) -> Tensor {
    let x = x.clamp(0.0, 1.0);
    let x1 = x.clamp_min(eps);
    let x2 = (x.ones_like() - &x).clamp_min(eps);
    (x1 / x2).log()
}
