//! DINO's decoder (official `models/dino/deformable_transformer.py` `TransformerDecoder`):
//! Deformable DETR's decoder layers (self-attention under the denoising mask, deformable
//! cross-attention on 4-d anchors, FFN), each layer's query position recomputed from its anchor
//! box (`ref_point_head` on the box's sine embedding, as DAB-DETR), the anchors refined layer by
//! layer on the raw layer output and detached for the next layer (the undetached ones are what
//! the predictions build on: "look forward twice", paper §3.5), and one final LayerNorm
//! applied to every layer's output.

use tch::nn::{self, Module};
use tch::Tensor;

use super::inverse_sigmoid;
use crate::model::deformable_detr::Mlp;
use crate::model::deformable_transformer::{DecoderLayer, EncoderInputs, TransformerConfig};
use crate::model::position_encoding::{interleave_sin_cos, sine_dim_t, SCALE};
use crate::model::{default_bias, linear, xavier_uniform};

/// What the decoder returns.
#[derive(Debug)]
pub struct DecoderOutput {
    /// Every layer's output after the final norm, `[N, T, d]` each.
    pub hs: Vec<Tensor>,
    /// The anchors each layer's prediction builds on, sigmoid boxes `[N, T, 4]`: the (detached)
    /// initial anchors, then each layer's refined anchors with their gradient.
    pub references: Vec<Tensor>,
}

/// `TransformerDecoder` with `ref_point_head` and the final `norm`.
#[derive(Debug)]
pub struct DinoDecoder {
    pub layers: Vec<DecoderLayer>,
    pub(crate) norm: nn::LayerNorm,
    pub(crate) ref_point_head: Mlp,
    d_model: i64,
}

/// `gen_sineembed_for_position`: each of a box's (x, y, w, h) scaled by 2π through `d/2` sine
/// frequencies (temperature 10000), concatenated in the order (y, x, w, h) → `[.., 2d]`.
pub fn sine_embed_boxes(boxes: &Tensor, d_model: i64) -> Tensor {
    let dim_t = sine_dim_t(d_model / 2, boxes.device()).to_kind(boxes.kind());
    let coordinate = |i: i64| {
        let v = boxes.select(-1, i) * SCALE;
        interleave_sin_cos(&(v.unsqueeze(-1) / &dim_t))
    };
    Tensor::cat(
        &[coordinate(1), coordinate(0), coordinate(2), coordinate(3)],
        -1,
    )
}

impl DinoDecoder {
    /// `p` is the `transformer.decoder` path. Matrices start xavier-uniform, biases as PyTorch's
    /// default (the transformer's `_reset_parameters`).
    pub fn new(p: &nn::Path, c: &TransformerConfig) -> Self {
        let d = c.d_model;
        let layers = (0..c.dec_layers)
            .map(|i| DecoderLayer::new(p / "layers" / i, c))
            .collect();
        let norm = nn::layer_norm(p / "norm", vec![d], Default::default());
        let head = p / "ref_point_head" / "layers";
        let ref_point_head = Mlp {
            layers: vec![
                linear(
                    &head / 0,
                    2 * d,
                    d,
                    xavier_uniform(2 * d, d, 1.0),
                    default_bias(2 * d),
                ),
                linear(&head / 1, d, d, xavier_uniform(d, d, 1.0), default_bias(d)),
            ],
        };
        Self {
            layers,
            norm,
            ref_point_head,
            d_model: d,
        }
    }

    /// `tgt` `[N, T, d]` content queries, `anchors` `[N, T, 4]` in logit space, `memory` the
    /// encoder output; `refine(layer, output)` is the layer's box head (unactivated deltas);
    /// `attn_mask` the denoising mask.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        tgt: &Tensor,
        anchors: &Tensor,
        memory: &Tensor,
        inputs: &EncoderInputs,
        attn_mask: Option<&Tensor>,
        refine: &dyn Fn(usize, &Tensor) -> Tensor,
        train: bool,
    ) -> DecoderOutput {
        let vr = inputs.valid_ratios.to_kind(memory.kind());
        let vr4 = Tensor::cat(&[&vr, &vr], -1).unsqueeze(1);
        let mut reference = anchors.sigmoid();
        let mut references = vec![reference.shallow_clone()];
        let mut hs = Vec::with_capacity(self.layers.len());
        let mut output = tgt.shallow_clone();
        for (lid, layer) in self.layers.iter().enumerate() {
            let ref_input = reference.unsqueeze(2) * &vr4; // [N, T, L, 4]
            let sine = sine_embed_boxes(&ref_input.select(2, 0), self.d_model);
            let query_pos = self.ref_point_head.forward(&sine);
            output = layer.forward(
                &output,
                &query_pos,
                &ref_input,
                memory,
                &inputs.spatial_shapes,
                &inputs.mask,
                attn_mask,
                train,
            );
            let refined = (refine(lid, &output) + inverse_sigmoid(&reference)).sigmoid();
            reference = refined.detach();
            references.push(refined);
            hs.push(self.norm.forward(&output));
        }
        DecoderOutput { hs, references }
    }
}
