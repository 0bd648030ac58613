//! Sine position embedding — upstream `models/position_encoding.py` `PositionEmbeddingSine`
//! (normalize = True, scale = 2π, temperature 10000, the −0.5 pixel-centre offset of Deformable
//! DETR's version), "Attention is all you need" §3.5 generalised to 2-d; and DINO's
//! `PositionEmbeddingSineHW` (a temperature per axis, TAO's 20, and no offset).

use std::f64::consts::PI;

use tch::{Kind, Tensor};

/// Sine frequencies' temperature.
pub const TEMPERATURE: f64 = 10000.0;
/// Normalised coordinates are scaled to [0, 2π].
pub const SCALE: f64 = 2.0 * PI;
/// Added to the cumulative sums' last row/column before dividing.
const NORMALIZE_EPS: f64 = 1e-6;

/// `PositionEmbeddingSine(num_pos_feats, normalize=True)` (Deformable DETR) or
/// `PositionEmbeddingSineHW(num_pos_feats, temperatureH, temperatureW, normalize=True)` (DINO).
#[derive(Debug, Clone, Copy)]
pub struct PositionEmbeddingSine {
    /// Features per axis (`hidden_dim / 2`); the output has `2 × num_pos_feats` channels.
    pub num_pos_feats: i64,
    pub temperature_h: f64,
    pub temperature_w: f64,
    /// Subtracted from the cumulative sums before normalising (0.5 for Deformable DETR, 0 for DINO).
    pub offset: f64,
}

/// `temperature ** (2 * (i // 2) / n)` for i in 0..n, in f32 as upstream.
pub(crate) fn sine_dim_t(n: i64, device: tch::Device) -> Tensor {
    sine_dim_t_at(n, TEMPERATURE, device)
}

/// [`sine_dim_t`] with another temperature.
pub(crate) fn sine_dim_t_at(n: i64, temperature: f64, device: tch::Device) -> Tensor {
    let i = Tensor::arange(n, (Kind::Float, device));
    let exponent = i.floor_divide_scalar(2.0) * 2.0 / n as f64;
    Tensor::pow_scalar(temperature, &exponent)
}

/// Interleaves sin of even and cos of odd features of `pos` (last axis), as
/// `stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)`.
pub(crate) fn interleave_sin_cos(pos: &Tensor) -> Tensor {
    let last = pos.dim() as i64 - 1;
    let n = pos.size()[last as usize];
    let even = pos.slice(last, 0, n, 2).sin();
    let odd = pos.slice(last, 1, n, 2).cos();
    Tensor::stack(&[even, odd], last + 1).flatten(last, last + 1)
}

impl PositionEmbeddingSine {
    /// Deformable DETR's.
    pub fn new(num_pos_feats: i64) -> Self {
        Self {
            num_pos_feats,
            temperature_h: TEMPERATURE,
            temperature_w: TEMPERATURE,
            offset: 0.5,
        }
    }

    /// DINO's `PositionEmbeddingSineHW`.
    pub fn hw(num_pos_feats: i64, temperature_h: f64, temperature_w: f64) -> Self {
        Self {
            num_pos_feats,
            temperature_h,
            temperature_w,
            offset: 0.0,
        }
    }

    /// `mask` `[B, H, W]` (true = padding) → position embedding `[B, 2·num_pos_feats, H, W]` (f32).
    pub fn forward(&self, mask: &Tensor) -> Tensor {
        let not_mask = mask.logical_not();
        let y_embed = not_mask.cumsum(1, Kind::Float);
        let x_embed = not_mask.cumsum(2, Kind::Float);
        let h = y_embed.size()[1];
        let w = x_embed.size()[2];
        let y_embed =
            (&y_embed - self.offset) / (y_embed.narrow(1, h - 1, 1) + NORMALIZE_EPS) * SCALE;
        let x_embed =
            (&x_embed - self.offset) / (x_embed.narrow(2, w - 1, 1) + NORMALIZE_EPS) * SCALE;
        let n = self.num_pos_feats;
        let dim_tx = sine_dim_t_at(n, self.temperature_w, mask.device());
        let dim_ty = sine_dim_t_at(n, self.temperature_h, mask.device());
        let pos_x = interleave_sin_cos(&(x_embed.unsqueeze(-1) / &dim_tx));
        let pos_y = interleave_sin_cos(&(y_embed.unsqueeze(-1) / &dim_ty));
        Tensor::cat(&[pos_y, pos_x], 3).permute([0, 3, 1, 2])
    }
}
