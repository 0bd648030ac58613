//! The deformable transformer — upstream `models/deformable_transformer.py`
//! (`DeformableTransformer`, encoder/decoder layers, two-stage proposal generation); paper §4.1
//! and appendix A.4. Post-norm layers; the decoder's self-attention is `nn.MultiheadAttention`,
//! stored under its packed upstream names `in_proj_weight`/`in_proj_bias`/`out_proj.*`.

use tch::nn::{self, Init, Module};
use tch::{Kind, Tensor};

use super::dropout;
use super::ms_deform_attn::MSDeformAttn;
use super::position_encoding::{interleave_sin_cos, sine_dim_t, SCALE};
use super::{inverse_sigmoid, linear, xavier_linear, xavier_uniform};

/// Two-stage proposals: box side 0.05·2^level (appendix A.4).
const PROPOSAL_BASE_WH: f64 = 0.05;
/// Two-stage proposals outside (0.01, 0.99) in any coordinate are invalid.
const PROPOSAL_VALID_MIN: f64 = 0.01;
const PROPOSAL_VALID_MAX: f64 = 0.99;

/// Sizes of a deformable transformer.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub d_model: i64,
    pub nhead: i64,
    pub enc_layers: i64,
    pub dec_layers: i64,
    pub dim_feedforward: i64,
    pub dropout: f64,
    pub num_feature_levels: i64,
    pub enc_n_points: i64,
    pub dec_n_points: i64,
    pub two_stage: bool,
    /// Queries (and two-stage proposals).
    pub num_queries: i64,
}

fn layer_norm(p: nn::Path, d: i64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![d], Default::default())
}

/// The feed-forward block shared by both layer kinds: linear1 → ReLU → dropout → linear2.
#[derive(Debug)]
pub(crate) struct Ffn {
    pub(crate) linear1: nn::Linear,
    pub(crate) linear2: nn::Linear,
}

impl Ffn {
    fn new(p: &nn::Path, d: i64, d_ffn: i64) -> Self {
        Self {
            linear1: xavier_linear(p / "linear1", d, d_ffn),
            linear2: xavier_linear(p / "linear2", d_ffn, d),
        }
    }
    fn forward(&self, x: &Tensor, p: f64, train: bool) -> Tensor {
        self.linear2
            .forward(&dropout::dropout(&self.linear1.forward(x).relu(), p, train))
    }
}

/// `DeformableTransformerEncoderLayer`.
#[derive(Debug)]
pub struct EncoderLayer {
    pub self_attn: MSDeformAttn,
    pub(crate) norm1: nn::LayerNorm,
    pub(crate) ffn: Ffn,
    pub(crate) norm2: nn::LayerNorm,
    pub(crate) dropout: f64,
}

impl EncoderLayer {
    pub(crate) fn new(p: nn::Path, c: &TransformerConfig) -> Self {
        Self {
            self_attn: MSDeformAttn::new(
                &p / "self_attn",
                c.d_model,
                c.num_feature_levels,
                c.nhead,
                c.enc_n_points,
            ),
            norm1: layer_norm(&p / "norm1", c.d_model),
            ffn: Ffn::new(&p, c.d_model, c.dim_feedforward),
            norm2: layer_norm(&p / "norm2", c.d_model),
            dropout: c.dropout,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        src: &Tensor,
        pos: &Tensor,
        reference_points: &Tensor,
        spatial_shapes: &[(i64, i64)],
        padding_mask: &Tensor,
        train: bool,
    ) -> Tensor {
        let src2 = self.self_attn.forward(
            &(src + pos),
            reference_points,
            src,
            spatial_shapes,
            Some(padding_mask),
        );
        let src = self
            .norm1
            .forward(&(src + dropout::dropout(&src2, self.dropout, train)));
        let src2 = self.ffn.forward(&src, self.dropout, train);
        self.norm2
            .forward(&(src + dropout::dropout(&src2, self.dropout, train)))
    }
}

/// `nn.MultiheadAttention(d, nhead, dropout)` with upstream's packed parameters.
#[derive(Debug)]
pub struct MultiheadAttention {
    pub in_proj_weight: Tensor,
    pub in_proj_bias: Tensor,
    pub out_proj: nn::Linear,
    pub(crate) nhead: i64,
    pub(crate) dropout: f64,
}

impl MultiheadAttention {
    fn new(p: nn::Path, d: i64, nhead: i64, dropout: f64) -> Self {
        // MHA's _reset_parameters: xavier in_proj, zero biases; the transformer re-applies xavier
        // to every matrix, out_proj included.
        let in_proj_weight = p.var("in_proj_weight", &[3 * d, d], xavier_uniform(d, 3 * d, 1.0));
        let in_proj_bias = p.var("in_proj_bias", &[3 * d], Init::Const(0.0));
        let out_proj = linear(
            &p / "out_proj",
            d,
            d,
            xavier_uniform(d, d, 1.0),
            Init::Const(0.0),
        );
        Self {
            in_proj_weight,
            in_proj_bias,
            out_proj,
            nhead,
            dropout,
        }
    }

    /// Batch-first `q`, `k`, `v` `[N, L, d]` → `[N, L, d]`. `attn_mask` `[Lq, Lk]` is
    /// `nn.MultiheadAttention`'s boolean mask: true where a query may not attend.
    fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        attn_mask: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let d = self.in_proj_weight.size()[1];
        let (n, lq) = (q.size()[0], q.size()[1]);
        let lk = k.size()[1];
        let hd = d / self.nhead;
        let proj = |x: &Tensor, i: i64, len: i64| {
            x.linear(
                &self.in_proj_weight.narrow(0, i * d, d),
                Some(self.in_proj_bias.narrow(0, i * d, d)),
            )
            .view([n, len, self.nhead, hd])
            .transpose(1, 2)
        };
        let (q, k, v) = (proj(q, 0, lq), proj(k, 1, lk), proj(v, 2, lk));
        let p = if train { self.dropout } else { 0.0 };
        let out = if p > 0.0 && q.device() == tch::Device::Cpu {
            // libtorch's CPU attention with dropout is this math path with its serial
            // `bernoulli_`; the same math with the parallel mask (see [`dropout`]).
            let mut scores = q
                .matmul(&k.transpose(-2, -1))
                .g_mul_scalar(1.0 / (hd as f64).sqrt());
            if let Some(m) = attn_mask {
                scores = scores.masked_fill(m, f64::NEG_INFINITY);
            }
            let w = scores.softmax(-1, q.kind());
            dropout::dropout(&w, p, train).matmul(&v)
        } else {
            // SDPA's boolean mask is the opposite: true where a query may attend.
            let allowed = attn_mask.map(|m| m.logical_not());
            Tensor::scaled_dot_product_attention(&q, &k, &v, allowed, p, false, None, false)
        };
        self.out_proj
            .forward(&out.transpose(1, 2).reshape([n, lq, d]))
    }
}

/// `DeformableTransformerDecoderLayer`.
#[derive(Debug)]
pub struct DecoderLayer {
    pub cross_attn: MSDeformAttn,
    pub(crate) norm1: nn::LayerNorm,
    pub self_attn: MultiheadAttention,
    pub(crate) norm2: nn::LayerNorm,
    pub(crate) ffn: Ffn,
    pub(crate) norm3: nn::LayerNorm,
    pub(crate) dropout: f64,
}

impl DecoderLayer {
    pub(crate) fn new(p: nn::Path, c: &TransformerConfig) -> Self {
        Self {
            cross_attn: MSDeformAttn::new(
                &p / "cross_attn",
                c.d_model,
                c.num_feature_levels,
                c.nhead,
                c.dec_n_points,
            ),
            norm1: layer_norm(&p / "norm1", c.d_model),
            self_attn: MultiheadAttention::new(&p / "self_attn", c.d_model, c.nhead, c.dropout),
            norm2: layer_norm(&p / "norm2", c.d_model),
            ffn: Ffn::new(&p, c.d_model, c.dim_feedforward),
            norm3: layer_norm(&p / "norm3", c.d_model),
            dropout: c.dropout,
        }
    }

    /// `self_attn_mask` `[Q, Q]` (true = may not attend) is DINO's denoising mask.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        tgt: &Tensor,
        query_pos: &Tensor,
        reference_points: &Tensor,
        src: &Tensor,
        spatial_shapes: &[(i64, i64)],
        padding_mask: &Tensor,
        self_attn_mask: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let q = tgt + query_pos;
        let tgt2 = self.self_attn.forward(&q, &q, tgt, self_attn_mask, train);
        let tgt = self
            .norm2
            .forward(&(tgt + dropout::dropout(&tgt2, self.dropout, train)));
        let tgt2 = self.cross_attn.forward(
            &(&tgt + query_pos),
            reference_points,
            src,
            spatial_shapes,
            Some(padding_mask),
        );
        let tgt = self
            .norm1
            .forward(&(tgt + dropout::dropout(&tgt2, self.dropout, train)));
        let tgt2 = self.ffn.forward(&tgt, self.dropout, train);
        self.norm3
            .forward(&(tgt + dropout::dropout(&tgt2, self.dropout, train)))
    }
}

/// Two-stage only modules.
#[derive(Debug)]
struct TwoStage {
    enc_output: nn::Linear,
    enc_output_norm: nn::LayerNorm,
    pos_trans: nn::Linear,
    pos_trans_norm: nn::LayerNorm,
}

/// The encoder's inputs (also what the decoder needs of them).
#[derive(Debug)]
pub struct EncoderInputs {
    /// Flattened levels `[N, S, d]`.
    pub src: Tensor,
    /// Position + level embeddings `[N, S, d]`.
    pub pos: Tensor,
    /// Padding `[N, S]` (true = padding).
    pub mask: Tensor,
    pub spatial_shapes: Vec<(i64, i64)>,
    /// `[N, L, 2]`.
    pub valid_ratios: Tensor,
    /// `[N, S, L, 2]`.
    pub reference_points: Tensor,
}

/// What the transformer returns to the detection heads.
#[derive(Debug)]
pub struct TransformerOutput {
    /// Decoder output of every layer, `[dec_layers, N, Q, d]`.
    pub hs: Tensor,
    /// Initial reference points `[N, Q, 2|4]`.
    pub init_reference: Tensor,
    /// Reference points after each layer `[dec_layers, N, Q, 2|4]` (equal to the initial ones
    /// without box refinement).
    pub inter_references: Tensor,
    /// Two-stage: class logits `[N, S, C]` and unactivated boxes `[N, S, 4]` of every encoder pixel.
    pub enc_outputs: Option<(Tensor, Tensor)>,
}

/// Per-layer heads the decoder needs for box refinement / two-stage (upstream's
/// `decoder.bbox_embed` / `decoder.class_embed` hack).
pub trait DecoderHeads {
    /// Box refinement: `bbox_embed[layer](hs)` (unactivated deltas), or None without refinement.
    fn refine_delta(&self, layer: usize, hs: &Tensor) -> Option<Tensor>;
    /// Two-stage: `class_embed[dec_layers](memory)` and `bbox_embed[dec_layers](memory)`.
    fn encoder_heads(&self, memory: &Tensor) -> (Tensor, Tensor);
}

/// `gen_encoder_output_proposals` (Deformable DETR appendix A.4, also DINO's): one box per
/// encoder pixel, centred on it with side 0.05·2^level, in logit space `[N, S, 4]` (+inf where
/// padded or outside (0.01, 0.99)), and the memory zeroed at those positions (before the
/// architecture's `enc_output` projection).
pub(crate) fn encoder_output_proposals(
    memory: &Tensor,
    mask_flatten: &Tensor,
    spatial_shapes: &[(i64, i64)],
) -> (Tensor, Tensor) {
    let n = memory.size()[0];
    let device = memory.device();
    let mut proposals = Vec::with_capacity(spatial_shapes.len());
    let mut cur = 0;
    for (lvl, &(h, w)) in spatial_shapes.iter().enumerate() {
        let not_mask = mask_flatten
            .narrow(1, cur, h * w)
            .view([n, h, w])
            .logical_not();
        let valid_h = not_mask.select(2, 0).sum_dim_intlist(1, false, Kind::Float);
        let valid_w = not_mask.select(1, 0).sum_dim_intlist(1, false, Kind::Float);
        let ys = Tensor::linspace(0.0, (h - 1) as f64, h, (Kind::Float, device));
        let xs = Tensor::linspace(0.0, (w - 1) as f64, w, (Kind::Float, device));
        let g = Tensor::meshgrid_indexing(&[ys, xs], "ij");
        let grid = Tensor::stack(&[&g[1], &g[0]], -1); // [H, W, 2] (x, y)
        let scale = Tensor::stack(&[valid_w, valid_h], 1).view([n, 1, 1, 2]);
        let grid = (grid.unsqueeze(0).expand([n, -1, -1, -1], false) + 0.5) / scale;
        let wh = grid.ones_like() * (PROPOSAL_BASE_WH * 2f64.powi(lvl as i32));
        proposals.push(Tensor::cat(&[grid, wh], -1).view([n, -1, 4]));
        cur += h * w;
    }
    let proposals = Tensor::cat(&proposals, 1);
    let valid = proposals
        .gt(PROPOSAL_VALID_MIN)
        .logical_and(&proposals.lt(PROPOSAL_VALID_MAX))
        .all_dims(Some(&[-1i64][..]), true);
    let invalid = valid.logical_not();
    let pad = mask_flatten.unsqueeze(-1);
    let proposals = (&proposals / (proposals.ones_like() - &proposals)).log();
    let proposals = proposals
        .masked_fill(&pad, f64::INFINITY)
        .masked_fill(&invalid, f64::INFINITY);
    let out_memory = memory.masked_fill(&pad, 0.0).masked_fill(&invalid, 0.0);
    (out_memory, proposals)
}

/// `DeformableTransformer.forward`'s input side: levels flattened and concatenated, the level
/// embeddings added to the position embeddings, the encoder's reference points and the valid
/// ratios (shared by Deformable DETR and DINO).
pub(crate) fn flatten_levels(
    level_embed: &Tensor,
    srcs: &[Tensor],
    masks: &[Tensor],
    pos_embeds: &[Tensor],
) -> EncoderInputs {
    let mut src_flatten = Vec::with_capacity(srcs.len());
    let mut mask_flatten = Vec::with_capacity(srcs.len());
    let mut pos_flatten = Vec::with_capacity(srcs.len());
    let mut spatial_shapes = Vec::with_capacity(srcs.len());
    for (lvl, ((src, mask), pos)) in srcs.iter().zip(masks).zip(pos_embeds).enumerate() {
        let s = src.size();
        spatial_shapes.push((s[2], s[3]));
        src_flatten.push(src.flatten(2, 3).transpose(1, 2));
        mask_flatten.push(mask.flatten(1, 2));
        let pos = pos.flatten(2, 3).transpose(1, 2);
        pos_flatten.push(pos + level_embed.get(lvl as i64).view([1, 1, -1]));
    }
    let src = Tensor::cat(&src_flatten, 1);
    let mask = Tensor::cat(&mask_flatten, 1);
    let pos = Tensor::cat(&pos_flatten, 1);
    let valid_ratios = Tensor::stack(
        &masks
            .iter()
            .map(DeformableTransformer::valid_ratio)
            .collect::<Vec<_>>(),
        1,
    );
    let reference_points =
        DeformableTransformer::encoder_reference_points(&spatial_shapes, &valid_ratios)
            .to_kind(src.kind());
    EncoderInputs {
        src,
        pos,
        mask,
        spatial_shapes,
        valid_ratios,
        reference_points,
    }
}

/// `DeformableTransformer`.
#[derive(Debug)]
pub struct DeformableTransformer {
    pub config: TransformerConfig,
    pub level_embed: Tensor,
    pub encoder: Vec<EncoderLayer>,
    pub decoder: Vec<DecoderLayer>,
    pub(crate) reference_points: Option<nn::Linear>,
    two_stage: Option<TwoStage>,
}

impl DeformableTransformer {
    /// `p` is the `transformer` path.
    pub fn new(p: &nn::Path, c: TransformerConfig) -> Self {
        let d = c.d_model;
        let encoder = (0..c.enc_layers)
            .map(|i| EncoderLayer::new(p / "encoder" / "layers" / i, &c))
            .collect();
        let decoder = (0..c.dec_layers)
            .map(|i| DecoderLayer::new(p / "decoder" / "layers" / i, &c))
            .collect();
        let level_embed = p.var(
            "level_embed",
            &[c.num_feature_levels, d],
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        );
        let (reference_points, two_stage) = if c.two_stage {
            let ts = TwoStage {
                enc_output: xavier_linear(p / "enc_output", d, d),
                enc_output_norm: layer_norm(p / "enc_output_norm", d),
                pos_trans: xavier_linear(p / "pos_trans", 2 * d, 2 * d),
                pos_trans_norm: layer_norm(p / "pos_trans_norm", 2 * d),
            };
            (None, Some(ts))
        } else {
            (
                Some(linear(
                    (p / "reference_points").set_group(crate::param_groups::GROUP_LINEAR_PROJ),
                    d,
                    2,
                    xavier_uniform(d, 2, 1.0),
                    Init::Const(0.0),
                )),
                None,
            )
        };
        Self {
            config: c,
            level_embed,
            encoder,
            decoder,
            reference_points,
            two_stage,
        }
    }

    /// `get_valid_ratio`: (valid W / W, valid H / H) of a `[N, H, W]` mask → `[N, 2]`.
    pub(crate) fn valid_ratio(mask: &Tensor) -> Tensor {
        let (h, w) = (mask.size()[1], mask.size()[2]);
        let not_mask = mask.logical_not();
        let valid_h = not_mask.select(2, 0).sum_dim_intlist(1, false, Kind::Float);
        let valid_w = not_mask.select(1, 0).sum_dim_intlist(1, false, Kind::Float);
        Tensor::stack(&[valid_w / w as f64, valid_h / h as f64], -1)
    }

    /// Encoder reference points: pixel centres normalised by the valid size, times every level's
    /// valid ratio → `[N, S, L, 2]`.
    pub(crate) fn encoder_reference_points(
        spatial_shapes: &[(i64, i64)],
        valid_ratios: &Tensor,
    ) -> Tensor {
        let device = valid_ratios.device();
        let mut refs = Vec::with_capacity(spatial_shapes.len());
        for (lvl, &(h, w)) in spatial_shapes.iter().enumerate() {
            let ys = Tensor::linspace(0.5, h as f64 - 0.5, h, (Kind::Float, device));
            let xs = Tensor::linspace(0.5, w as f64 - 0.5, w, (Kind::Float, device));
            let grid = Tensor::meshgrid_indexing(&[ys, xs], "ij");
            let vr = valid_ratios.select(1, lvl as i64);
            let ref_y = grid[0].reshape([1, -1]) / (vr.select(1, 1).unsqueeze(1) * h as f64);
            let ref_x = grid[1].reshape([1, -1]) / (vr.select(1, 0).unsqueeze(1) * w as f64);
            refs.push(Tensor::stack(&[ref_x, ref_y], -1));
        }
        Tensor::cat(&refs, 1).unsqueeze(2) * valid_ratios.unsqueeze(1)
    }

    /// `get_proposal_pos_embed`: sine embedding of sigmoid(proposals)·2π with d/2 features per
    /// coordinate (128 for d = 256, upstream's constant) → `[N, Q, 2d]`.
    fn proposal_pos_embed(&self, proposals: &Tensor) -> Tensor {
        let npf = self.config.d_model / 2;
        let dim_t = sine_dim_t(npf, proposals.device());
        let pos = (proposals.sigmoid() * SCALE).unsqueeze(-1) / dim_t;
        interleave_sin_cos(&pos).flatten(2, 3)
    }

    /// The transformer: `srcs`/`masks`/`pos_embeds` per level (`[N, d, H, W]`, `[N, H, W]`,
    /// `[N, d, H, W]`), `query_embed` `[Q, 2d]` unless two-stage.
    pub fn forward(
        &self,
        srcs: &[Tensor],
        masks: &[Tensor],
        pos_embeds: &[Tensor],
        query_embed: Option<&Tensor>,
        heads: &dyn DecoderHeads,
        train: bool,
    ) -> TransformerOutput {
        let inputs = self.encoder_inputs(srcs, masks, pos_embeds);
        let mut memory = inputs.src.shallow_clone();
        for i in 0..self.encoder.len() {
            memory = self.encoder_layer(i, &memory, &inputs.pos, &inputs, train);
        }
        self.decode(&memory, &inputs, query_embed, heads, train)
    }

    /// Number of encoder layers.
    pub fn num_encoder_layers(&self) -> usize {
        self.encoder.len()
    }

    /// The encoder's inputs: levels flattened and concatenated, level embeddings added to the
    /// position embeddings, reference points and valid ratios.
    pub fn encoder_inputs(
        &self,
        srcs: &[Tensor],
        masks: &[Tensor],
        pos_embeds: &[Tensor],
    ) -> EncoderInputs {
        flatten_levels(&self.level_embed, srcs, masks, pos_embeds)
    }

    /// Encoder layer `i` on `x` with position embeddings `pos` (normally `inputs.pos`).
    pub fn encoder_layer(
        &self,
        i: usize,
        x: &Tensor,
        pos: &Tensor,
        inputs: &EncoderInputs,
        train: bool,
    ) -> Tensor {
        self.encoder[i].forward(
            x,
            pos,
            &inputs.reference_points,
            &inputs.spatial_shapes,
            &inputs.mask,
            train,
        )
    }

    /// The decoder (and two-stage proposals) on the encoder's output `memory`.
    pub fn decode(
        &self,
        memory: &Tensor,
        inputs: &EncoderInputs,
        query_embed: Option<&Tensor>,
        heads: &dyn DecoderHeads,
        train: bool,
    ) -> TransformerOutput {
        let mask_flatten = &inputs.mask;
        let spatial_shapes = &inputs.spatial_shapes;
        let valid_ratios = &inputs.valid_ratios;
        // Decoder inputs.
        let (n, _, c) = memory.size3().expect("memory is [N, S, d]");
        let (query_pos, tgt, reference_points, enc_outputs) = match (&self.two_stage, query_embed) {
            (Some(ts), _) => {
                let (out_memory, proposals) =
                    encoder_output_proposals(memory, mask_flatten, spatial_shapes);
                let out_memory = ts
                    .enc_output_norm
                    .forward(&ts.enc_output.forward(&out_memory));
                let (enc_class, enc_delta) = heads.encoder_heads(&out_memory);
                let enc_coord_unact = enc_delta + proposals;
                let topk = self.config.num_queries;
                let positions = enc_class.size()[1];
                assert!(
                    topk <= positions,
                    "two-stage selects model.num_queries = {topk} proposals but the feature maps have only {positions} \
                     positions: use larger images or fewer queries"
                );
                let (_, topk_idx) = enc_class.select(2, 0).topk(topk, 1, true, true);
                let topk_coords = enc_coord_unact
                    .gather(1, &topk_idx.unsqueeze(-1).repeat([1, 1, 4]), false)
                    .detach();
                let reference_points = topk_coords.sigmoid();
                let pos_trans_out = ts
                    .pos_trans_norm
                    .forward(&ts.pos_trans.forward(&self.proposal_pos_embed(&topk_coords)));
                let parts = pos_trans_out.split(c, 2);
                (
                    parts[0].shallow_clone(),
                    parts[1].shallow_clone(),
                    reference_points,
                    Some((enc_class, enc_coord_unact)),
                )
            }
            (None, Some(qe)) => {
                let parts = qe.split(c, 1);
                let query_pos = parts[0].unsqueeze(0).expand([n, -1, -1], false);
                let tgt = parts[1].unsqueeze(0).expand([n, -1, -1], false);
                let rp = self
                    .reference_points
                    .as_ref()
                    .expect("reference_points exists without two-stage");
                let reference_points = rp.forward(&query_pos).sigmoid();
                (query_pos, tgt, reference_points, None)
            }
            (None, None) => panic!("the single-stage transformer needs query_embed"),
        };

        // Decoder.
        let init_reference = reference_points.shallow_clone();
        let mut reference_points = reference_points;
        let mut output = tgt;
        let mut hs = Vec::with_capacity(self.decoder.len());
        let mut refs = Vec::with_capacity(self.decoder.len());
        let vr = valid_ratios.to_kind(memory.kind());
        for (lid, layer) in self.decoder.iter().enumerate() {
            let ref_input = if reference_points.size()[2] == 4 {
                reference_points.unsqueeze(2) * Tensor::cat(&[&vr, &vr], -1).unsqueeze(1)
            } else {
                reference_points.unsqueeze(2) * vr.unsqueeze(1)
            };
            output = layer.forward(
                &output,
                &query_pos,
                &ref_input,
                memory,
                spatial_shapes,
                mask_flatten,
                None,
                train,
            );
            if let Some(delta) = heads.refine_delta(lid, &output) {
                let new_ref = if reference_points.size()[2] == 4 {
                    (delta + inverse_sigmoid(&reference_points)).sigmoid()
                } else {
                    let xy = delta.narrow(-1, 0, 2) + inverse_sigmoid(&reference_points);
                    Tensor::cat(&[xy, delta.narrow(-1, 2, 2)], -1).sigmoid()
                };
                reference_points = new_ref.detach();
            }
            hs.push(output.shallow_clone());
            refs.push(reference_points.shallow_clone());
        }
        TransformerOutput {
            hs: Tensor::stack(&hs, 0),
            init_reference,
            inter_references: Tensor::stack(&refs, 0),
            enc_outputs,
        }
    }
}
