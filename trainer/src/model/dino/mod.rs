//! DINO (Zhang et al., "DINO: DETR with Improved DeNoising Anchor Boxes", arXiv 2203.03605) —
//! the official `IDEA-Research/DINO` `models/dino/` and TAO's `nvidia_tao_pytorch/cv/dino`, in
//! tch. It stands on Deformable DETR's parts (backbone, input projections, MSDeformAttn encoder
//! and decoder layers, encoder proposals) and adds:
//!
//! - mixed query selection (§3.4): the top-k encoder proposals by their best class score give
//!   the decoder's anchor boxes (detached), the content queries are learned (`tgt_embed`);
//! - contrastive denoising (§3.3, [`dn`]): noised ground truth in positive/negative groups in
//!   front of the matching queries, under an attention mask;
//! - look forward twice (§3.5, [`decoder`]);
//! - heads shared by every decoder layer (by default) and separate encoder heads.
//!
//! Parameter paths equal the official state-dict keys (`docs/reference/dino-state-dict-keys.tsv`);
//! a shared head is one variable under its first name (`class_embed.0`, `bbox_embed.0`), and the
//! checkpoint loader maps the official aliases onto it. `docs/reference/dino.md` is the digest of
//! the reference code this follows, with sources.

pub mod decoder;
pub mod dn;

use tch::nn::{self, Init, Module};
use tch::{Device, Tensor};

use super::backbone::Backbone;
use super::deformable_detr::{
    build_input_proj, project_levels, DetrConfig, InputProj, Mlp, Prediction, PRIOR_PROB,
};
use super::deformable_transformer::{
    encoder_output_proposals, flatten_levels, EncoderInputs, EncoderLayer, TransformerConfig,
};
use super::position_encoding::PositionEmbeddingSine;
use super::{default_weight, inverse_sigmoid_eps, linear, xavier_linear, xavier_uniform};
use crate::matcher::Target;
use crate::param_groups::GROUP_BACKBONE;
use crate::spec::ModelConfig;
use crate::step::Stages;
use crate::TrainerError;
use decoder::DinoDecoder;
use dn::{DnConfig, DnMeta};

/// DINO's `inverse_sigmoid` clamp (`util/misc.py`).
pub const DINO_INVERSE_SIGMOID_EPS: f64 = 1e-3;
/// Layers of the box MLP.
const BBOX_MLP_LAYERS: i64 = 3;

/// `inverse_sigmoid` with DINO's clamp.
pub fn inverse_sigmoid(x: &Tensor) -> Tensor {
    inverse_sigmoid_eps(x, DINO_INVERSE_SIGMOID_EPS)
}

/// The resolved architecture of a [`Dino`].
#[derive(Debug, Clone)]
pub struct DinoConfig {
    /// Backbone, levels and transformer sizes (shared with Deformable DETR).
    pub base: DetrConfig,
    /// None: no denoising (`use_dn: false`).
    pub dn: Option<DnConfig>,
    pub embed_init_tgt: bool,
    pub share_class_head: bool,
    pub share_box_head: bool,
    pub pe_temperature_h: f64,
    pub pe_temperature_w: f64,
}

impl DinoConfig {
    /// From the spec's `model` section and the dataset's class count.
    pub fn from_spec(m: &ModelConfig, num_classes: u32) -> Result<Self, TrainerError> {
        let mut base = DetrConfig::from_spec(m, num_classes)?;
        base.with_box_refine = true;
        base.transformer.two_stage = true;
        Ok(Self {
            dn: m.use_dn.then(|| DnConfig {
                dn_number: i64::from(m.dn_number),
                label_noise_ratio: m.dn_label_noise_ratio,
                box_noise_scale: m.dn_box_noise_scale,
                num_classes: base.num_classes,
            }),
            base,
            embed_init_tgt: m.embed_init_tgt,
            share_class_head: m.dec_pred_class_embed_share,
            share_box_head: m.dec_pred_bbox_embed_share,
            pe_temperature_h: m.pe_temperature_h,
            pe_temperature_w: m.pe_temperature_w,
        })
    }
}

/// The denoising part of a training forward: every decoder layer's predictions on the
/// denoising queries, and their layout.
#[derive(Debug)]
pub struct DnOutput {
    pub layers: Vec<Prediction>,
    pub meta: DnMeta,
}

/// One forward's predictions.
#[derive(Debug)]
pub struct DinoOutput {
    /// The matching queries' predictions, one per decoder layer (the last is the final one).
    pub layers: Vec<Prediction>,
    /// The selected encoder proposals (`interm_outputs`): class logits of the selected encoder
    /// features and their boxes, with gradient into the encoder.
    pub interm: Prediction,
    /// Training with denoising only.
    pub dn: Option<DnOutput>,
}

impl DinoOutput {
    /// The last decoder layer's prediction.
    pub fn last(&self) -> &Prediction {
        self.layers.last().expect("at least one decoder layer")
    }
}

/// DINO's transformer parts beyond the shared encoder layers.
#[derive(Debug)]
pub struct DinoTransformer {
    pub level_embed: Tensor,
    pub encoder: Vec<EncoderLayer>,
    pub decoder: DinoDecoder,
    /// `[num_queries, d]` learned content queries (`embed_init_tgt`).
    pub tgt_embed: Option<Tensor>,
    pub(crate) enc_output: nn::Linear,
    pub(crate) enc_output_norm: nn::LayerNorm,
    pub(crate) enc_out_class_embed: nn::Linear,
    pub(crate) enc_out_bbox_embed: Mlp,
}

/// `DINO`.
#[derive(Debug)]
pub struct Dino {
    pub config: DinoConfig,
    pub backbone: Backbone,
    pub(crate) position_embedding: PositionEmbeddingSine,
    pub(crate) input_proj: Vec<InputProj>,
    pub transformer: DinoTransformer,
    /// `label_enc`: `[num_classes + 1, d]` embeddings of the denoising queries' labels.
    pub label_enc: nn::Embedding,
    /// One per decoder layer, or one shared.
    pub(crate) class_embed: Vec<nn::Linear>,
    pub(crate) bbox_embed: Vec<Mlp>,
}

/// A class head initialised as upstream: PyTorch's default weight, the focal prior bias.
fn class_head(p: nn::Path, d: i64, num_classes: i64) -> nn::Linear {
    let bias_value = -((1.0 - PRIOR_PROB) / PRIOR_PROB).ln();
    linear(
        p,
        d,
        num_classes,
        default_weight(d),
        Init::Const(bias_value),
    )
}

/// A box head initialised as upstream: PyTorch's default layers, the last one zero.
fn box_head(p: nn::Path, d: i64) -> Mlp {
    let mlp = Mlp::new(p, d, d, 4, BBOX_MLP_LAYERS);
    let last = mlp.layers.last().expect("3 layers");
    tch::no_grad(|| {
        let _ = last.ws.shallow_clone().fill_(0.0);
        let _ = last.bs.as_ref().expect("bias").shallow_clone().fill_(0.0);
    });
    mlp
}

/// Copies `src`'s values into `dst` (upstream's `copy.deepcopy` of an initialised head).
fn copy_linear(dst: &nn::Linear, src: &nn::Linear) {
    tch::no_grad(|| {
        dst.ws.shallow_clone().copy_(&src.ws);
        if let (Some(d), Some(s)) = (&dst.bs, &src.bs) {
            d.shallow_clone().copy_(s);
        }
    });
}

fn copy_mlp(dst: &Mlp, src: &Mlp) {
    for (d, s) in dst.layers.iter().zip(&src.layers) {
        copy_linear(d, s);
    }
}

impl Dino {
    /// Builds the model under `root` (the var store's root), initialised as upstream.
    pub fn new(root: &nn::Path, config: DinoConfig) -> Self {
        let c = &config.base;
        let tc: TransformerConfig = c.transformer;
        let d = tc.d_model;
        let backbone = Backbone::new(
            &(root / "backbone" / 0).set_group(GROUP_BACKBONE),
            c.backbone,
            &c.backbone_stages,
            c.train_backbone,
            c.dilation,
            c.backbone_from_scratch,
            c.backbone_drop_path_rate,
        );
        let tp = root / "transformer";
        let encoder = (0..tc.enc_layers)
            .map(|i| EncoderLayer::new(&tp / "encoder" / "layers" / i, &tc))
            .collect();
        let decoder = DinoDecoder::new(&(&tp / "decoder"), &tc);
        let level_embed = tp.var(
            "level_embed",
            &[tc.num_feature_levels, d],
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        );
        let tgt_embed = config.embed_init_tgt.then(|| {
            (&tp / "tgt_embed").var(
                "weight",
                &[tc.num_queries, d],
                xavier_uniform(d, tc.num_queries, 1.0),
            )
        });
        let enc_output = xavier_linear(&tp / "enc_output", d, d);
        let enc_output_norm = nn::layer_norm(&tp / "enc_output_norm", vec![d], Default::default());

        let label_enc = nn::embedding(
            root / "label_enc",
            c.num_classes + 1,
            d,
            nn::EmbeddingConfig {
                ws_init: Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
                ..Default::default()
            },
        );
        let input_proj = build_input_proj(
            &(root / "input_proj"),
            &backbone.num_channels,
            d,
            tc.num_feature_levels,
        );

        // Heads: one initialised pair, shared by every decoder layer or deep-copied per layer,
        // and deep copies for the encoder proposals.
        let layers = tc.dec_layers as usize;
        let class_copies = if config.share_class_head { 1 } else { layers };
        let box_copies = if config.share_box_head { 1 } else { layers };
        let class_embed: Vec<nn::Linear> = (0..class_copies)
            .map(|i| class_head(root / "class_embed" / i, d, c.num_classes))
            .collect();
        let bbox_embed: Vec<Mlp> = (0..box_copies)
            .map(|i| box_head(root / "bbox_embed" / i, d))
            .collect();
        for head in &class_embed[1..] {
            copy_linear(head, &class_embed[0]);
        }
        for head in &bbox_embed[1..] {
            copy_mlp(head, &bbox_embed[0]);
        }
        let enc_out_class_embed = class_head(&tp / "enc_out_class_embed", d, c.num_classes);
        copy_linear(&enc_out_class_embed, &class_embed[0]);
        let enc_out_bbox_embed = box_head(&tp / "enc_out_bbox_embed", d);
        copy_mlp(&enc_out_bbox_embed, &bbox_embed[0]);

        Self {
            position_embedding: PositionEmbeddingSine::hw(
                d / 2,
                config.pe_temperature_h,
                config.pe_temperature_w,
            ),
            transformer: DinoTransformer {
                level_embed,
                encoder,
                decoder,
                tgt_embed,
                enc_output,
                enc_output_norm,
                enc_out_class_embed,
                enc_out_bbox_embed,
            },
            config,
            backbone,
            input_proj,
            label_enc,
            class_embed,
            bbox_embed,
        }
    }

    /// The class head of decoder layer `layer` (the shared one when shared).
    pub(crate) fn class_head(&self, layer: usize) -> &nn::Linear {
        &self.class_embed[layer.min(self.class_embed.len() - 1)]
    }

    /// The box head of decoder layer `layer` (the shared one when shared).
    pub(crate) fn box_head(&self, layer: usize) -> &Mlp {
        &self.bbox_embed[layer.min(self.bbox_embed.len() - 1)]
    }

    /// `images` `[N, 3, H, W]` (normalised, zero-padded), `pixel_mask` `[N, H, W]` true on
    /// padding; `targets` (training only) feed the denoising queries; `train` enables dropout.
    pub fn forward(
        &self,
        images: &Tensor,
        pixel_mask: &Tensor,
        targets: Option<&[Target]>,
        train: bool,
    ) -> DinoOutput {
        self.forward_stages(images, pixel_mask, targets, train)
    }

    /// Every encoder position's proposal: class logits `[N, S, C]` and box in logit space
    /// `[N, S, 4]` (+inf where padded or at the border), from the projected memory.
    pub fn encoder_proposals(&self, memory: &Tensor, inputs: &EncoderInputs) -> (Tensor, Tensor) {
        let (class, coord, _) = self.proposals(memory, inputs);
        (class, coord)
    }

    fn proposals(&self, memory: &Tensor, inputs: &EncoderInputs) -> (Tensor, Tensor, Tensor) {
        let t = &self.transformer;
        let (out_memory, proposals) =
            encoder_output_proposals(memory, &inputs.mask, &inputs.spatial_shapes);
        let out_memory = t
            .enc_output_norm
            .forward(&t.enc_output.forward(&out_memory));
        let class = t.enc_out_class_embed.forward(&out_memory);
        let coord = t.enc_out_bbox_embed.forward(&out_memory) + proposals;
        (class, coord, out_memory)
    }

    /// Device of the model's parameters.
    pub fn device(&self) -> Device {
        self.transformer.level_embed.device()
    }

    /// Query count.
    pub fn num_queries(&self) -> i64 {
        self.config.base.transformer.num_queries
    }

    /// The encoder positions of an `h`×`w` input: each returned ResNet stage s has
    /// ⌈h / 2^(s+2)⌉ × ⌈w / 2^(s+2)⌉ (every stride-2 layer rounds up), each extra level halves the
    /// last one, rounding up.
    pub fn encoder_positions(&self, h: i64, w: i64) -> i64 {
        let halve = |x: i64, times: u32| (0..times).fold(x, |v, _| (v + 1) / 2);
        let mut total = 0;
        let mut last = (h, w);
        for &s in &self.backbone.return_stages {
            last = (halve(h, s as u32 + 2), halve(w, s as u32 + 2));
            total += last.0 * last.1;
        }
        for _ in self.backbone.return_stages.len() as i64
            ..self.config.base.transformer.num_feature_levels
        {
            last = (halve(last.0, 1), halve(last.1, 1));
            total += last.0 * last.1;
        }
        total
    }

    /// An input too small to select `num_queries` proposals from, as one line.
    pub fn check_input(&self, h: i64, w: i64) -> Result<(), TrainerError> {
        let positions = self.encoder_positions(h, w);
        let nq = self.num_queries();
        if positions < nq {
            return Err(TrainerError::Config(format!(
                "DINO selects model.num_queries = {nq} encoder proposals but a {h}x{w} input has only {positions} encoder positions: train on larger images or set fewer queries"
            )));
        }
        Ok(())
    }
}

impl Stages for Dino {
    type Output = DinoOutput;

    fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn encoder_inputs(&self, features: &[(Tensor, Tensor)], mask: &Tensor) -> EncoderInputs {
        let (srcs, masks, pos) =
            project_levels(&self.input_proj, &self.position_embedding, features, mask);
        flatten_levels(&self.transformer.level_embed, &srcs, &masks, &pos)
    }

    fn num_encoder_layers(&self) -> usize {
        self.transformer.encoder.len()
    }

    fn encoder_layer(
        &self,
        i: usize,
        x: &Tensor,
        pos: &Tensor,
        inputs: &EncoderInputs,
        train: bool,
    ) -> Tensor {
        self.transformer.encoder[i].forward(
            x,
            pos,
            &inputs.reference_points,
            &inputs.spatial_shapes,
            &inputs.mask,
            train,
        )
    }

    /// Query selection, denoising queries, the decoder and the heads on the encoder's output.
    ///
    /// # Panics
    /// When the feature maps have fewer positions than `num_queries` (upstream's `topk` fails the
    /// same way; the trainer checks the input size first).
    fn decode(
        &self,
        memory: &Tensor,
        inputs: &EncoderInputs,
        targets: Option<&[Target]>,
        train: bool,
    ) -> DinoOutput {
        let t = &self.transformer;
        let nq = self.num_queries();
        let (n, positions, d) = memory.size3().expect("memory is [N, S, d]");
        assert!(
            nq <= positions,
            "DINO selects model.num_queries = {nq} encoder proposals but the feature maps have only {positions} \
             positions: use larger images or fewer queries"
        );
        // Mixed query selection.
        let (enc_class, enc_coord, out_memory) = self.proposals(memory, inputs);
        let (best, _) = enc_class.max_dim(-1, false);
        let (_, topk) = best.topk(nq, 1, true, true);
        let anchors_undetached = enc_coord.gather(1, &topk.unsqueeze(-1).repeat([1, 1, 4]), false);
        let classes = enc_class.size()[2];
        let interm = Prediction {
            logits: enc_class.gather(1, &topk.unsqueeze(-1).repeat([1, 1, classes]), false),
            boxes: anchors_undetached.sigmoid(),
        };
        let anchors = anchors_undetached.detach();
        let content = match &t.tgt_embed {
            Some(w) => w
                .to_kind(memory.kind())
                .unsqueeze(0)
                .expand([n, -1, -1], false),
            None => out_memory
                .gather(1, &topk.unsqueeze(-1).repeat([1, 1, d]), false)
                .detach(),
        };

        // Denoising queries in front of the matching ones.
        let dn = match (self.config.dn.as_ref(), targets) {
            (Some(cfg), Some(targets)) if train => {
                dn::prepare_for_cdn(targets, cfg, nq, &self.label_enc, memory.device())
            }
            _ => None,
        };
        let (content, anchors, attn_mask) = match &dn {
            Some(q) => (
                Tensor::cat(&[q.content.to_kind(content.kind()), content], 1),
                Tensor::cat(&[q.anchors.to_kind(anchors.kind()), anchors], 1),
                Some(&q.attn_mask),
            ),
            None => (content, anchors, None),
        };

        let refine = |layer: usize, output: &Tensor| self.box_head(layer).forward(output);
        let out = t.decoder.forward(
            &content, &anchors, memory, inputs, attn_mask, &refine, train,
        );
        let mut predictions: Vec<Prediction> = out
            .hs
            .iter()
            .enumerate()
            .map(|(i, hs)| Prediction {
                logits: self.class_head(i).forward(hs),
                boxes: (self.box_head(i).forward(hs) + inverse_sigmoid(&out.references[i]))
                    .sigmoid(),
            })
            .collect();
        let dn = dn.map(|q| {
            let pad = q.meta.pad_size;
            let mut dn_layers = Vec::with_capacity(predictions.len());
            for p in &mut predictions {
                dn_layers.push(Prediction {
                    logits: p.logits.narrow(1, 0, pad),
                    boxes: p.boxes.narrow(1, 0, pad),
                });
                *p = Prediction {
                    logits: p.logits.narrow(1, pad, nq),
                    boxes: p.boxes.narrow(1, pad, nq),
                };
            }
            DnOutput {
                layers: dn_layers,
                meta: q.meta,
            }
        });
        DinoOutput {
            layers: predictions,
            interm,
            dn,
        }
    }
}
