//! The detector — upstream `models/deformable_detr.py` (`DeformableDETR`, `MLP`): backbone,
//! per-level `input_proj`, the deformable transformer, and class/box heads on every decoder
//! layer, with iterative box refinement and the two-stage variant (paper §4.2, appendix A.4).

use tch::nn::{self, Init, Module};
use tch::{Device, Tensor};

use super::backbone::{resize_mask, Backbone, EXTRA_LEVEL_INDEX};
use super::deformable_transformer::{
    DecoderHeads, DeformableTransformer, EncoderInputs, TransformerConfig, TransformerOutput,
};
use super::position_encoding::PositionEmbeddingSine;
use super::{default_bias, default_weight, inverse_sigmoid, linear, xavier_uniform};
use crate::param_groups::GROUP_BACKBONE;
use crate::spec::ModelConfig;
use crate::TrainerError;

/// Focal-loss prior: class logits start at −log((1 − π)/π), π = 0.01 (RetinaNet §4.1).
pub const PRIOR_PROB: f64 = 0.01;
/// Initial size bias of the last box layer (boxes start at sigmoid(−2) ≈ 0.12 of the image).
pub const BBOX_SIZE_BIAS: f64 = -2.0;
/// `input_proj`'s GroupNorm groups.
pub const GROUP_NORM_GROUPS: i64 = 32;
/// Layers of the box MLP.
const BBOX_MLP_LAYERS: i64 = 3;

/// Upstream's `MLP(input_dim, hidden_dim, output_dim, num_layers)` (ReLU between layers).
#[derive(Debug)]
pub struct Mlp {
    pub layers: Vec<nn::Linear>,
}

impl Mlp {
    pub(crate) fn new(p: nn::Path, input: i64, hidden: i64, output: i64, num_layers: i64) -> Self {
        let layers = (0..num_layers)
            .map(|i| {
                let n = if i == 0 { input } else { hidden };
                let k = if i == num_layers - 1 { output } else { hidden };
                linear(&p / "layers" / i, n, k, default_weight(n), default_bias(n))
            })
            .collect();
        Self { layers }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let n = self.layers.len();
        let mut x = x.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x);
            if i + 1 < n {
                x = x.relu();
            }
        }
        x
    }
}

/// One `input_proj` entry: `Sequential(Conv2d, GroupNorm(32, d))`.
#[derive(Debug)]
pub(crate) struct InputProj {
    pub(crate) conv: nn::Conv2D,
    pub(crate) norm: nn::GroupNorm,
}

impl InputProj {
    fn new(p: nn::Path, cin: i64, d: i64, kernel: i64, stride: i64, padding: i64) -> Self {
        let fan_in = cin * kernel * kernel;
        let fan_out = d * kernel * kernel;
        let cfg = nn::ConvConfig {
            stride,
            padding,
            ws_init: xavier_uniform(fan_in, fan_out, 1.0),
            bs_init: Init::Const(0.0),
            ..Default::default()
        };
        let conv = nn::conv2d(&p / "0", cin, d, kernel, cfg);
        let norm = nn::group_norm(&p / "1", GROUP_NORM_GROUPS, d, Default::default());
        Self { conv, norm }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        self.norm.forward(&self.conv.forward(x))
    }
}

/// `input_proj` under `p`: a 1×1 conv per backbone level (`channels`), then 3×3 stride-2 convs
/// for the extra levels up to `levels`.
pub(crate) fn build_input_proj(
    p: &nn::Path,
    channels: &[i64],
    d: i64,
    levels: i64,
) -> Vec<InputProj> {
    let mut input_proj = Vec::new();
    for (i, &c) in channels.iter().enumerate() {
        input_proj.push(InputProj::new(p / i, c, d, 1, 1, 0));
    }
    let mut in_channels = *channels.last().expect("at least one backbone level");
    for i in channels.len() as i64..levels {
        input_proj.push(InputProj::new(p / i, in_channels, d, 3, 2, 1));
        in_channels = d;
    }
    input_proj
}

/// Every level's projected feature map, padding mask and position embedding: the backbone's
/// levels through their 1×1 projections, the extra levels by stride-2 convs on the last backbone
/// level (then on the previous extra level), their masks resized from the pixel mask.
pub(crate) fn project_levels(
    input_proj: &[InputProj],
    position_embedding: &PositionEmbeddingSine,
    features: &[(Tensor, Tensor)],
    pixel_mask: &Tensor,
) -> (Vec<Tensor>, Vec<Tensor>, Vec<Tensor>) {
    let mut srcs = Vec::with_capacity(input_proj.len());
    let mut masks = Vec::with_capacity(input_proj.len());
    let mut pos = Vec::with_capacity(input_proj.len());
    for (l, (feat, mask)) in features.iter().enumerate() {
        srcs.push(input_proj[l].forward(feat));
        pos.push(position_embedding.forward(mask).to_kind(feat.kind()));
        masks.push(mask.shallow_clone());
    }
    let n_backbone = features.len();
    for l in n_backbone..input_proj.len() {
        let src = if l == n_backbone {
            input_proj[l].forward(&features[n_backbone - 1].0)
        } else {
            input_proj[l].forward(srcs.last().expect("a previous level"))
        };
        let s = src.size();
        let mask = resize_mask(pixel_mask, s[2], s[3]);
        pos.push(position_embedding.forward(&mask).to_kind(src.kind()));
        srcs.push(src);
        masks.push(mask);
    }
    (srcs, masks, pos)
}

/// Class logits and normalised (cx, cy, w, h) boxes of one decoder layer (or the encoder).
#[derive(Debug)]
pub struct Prediction {
    /// `[N, Q, num_classes]`
    pub logits: Tensor,
    /// `[N, Q, 4]`
    pub boxes: Tensor,
}

/// Model output: one prediction per decoder layer (the last is the final one) and, two-stage,
/// the encoder's proposals.
#[derive(Debug)]
pub struct DetrOutput {
    pub layers: Vec<Prediction>,
    pub enc_outputs: Option<Prediction>,
}

impl DetrOutput {
    /// The last decoder layer's prediction.
    pub fn last(&self) -> &Prediction {
        self.layers.last().expect("at least one decoder layer")
    }
    /// The auxiliary predictions (every decoder layer but the last).
    pub fn aux(&self) -> &[Prediction] {
        &self.layers[..self.layers.len() - 1]
    }
}

/// The resolved architecture of a [`DeformableDetr`].
#[derive(Debug, Clone)]
pub struct DetrConfig {
    pub backbone: crate::spec::Backbone,
    pub train_backbone: bool,
    pub dilation: bool,
    /// `model.backbone_from_scratch` (see [`crate::model::backbone::ResNetBody::new`]).
    pub backbone_from_scratch: bool,
    /// `model.backbone_drop_path_rate`, resolved (a GCViT's or FAN's stochastic depth).
    pub backbone_drop_path_rate: f64,
    /// Backbone stages (0 = layer1) feeding the transformer.
    pub backbone_stages: Vec<usize>,
    pub num_classes: i64,
    pub with_box_refine: bool,
    pub aux_loss: bool,
    pub transformer: TransformerConfig,
}

impl DetrConfig {
    /// From the spec's `model` section and the dataset's class count.
    pub fn from_spec(m: &ModelConfig, num_classes: u32) -> Result<Self, TrainerError> {
        let backbone_stages: Vec<usize> = m
            .return_interm_indices
            .iter()
            .filter(|&&i| i < EXTRA_LEVEL_INDEX)
            .map(|&i| i as usize)
            .collect();
        if backbone_stages.is_empty() {
            return Err(TrainerError::UnsupportedModel(format!(
                "model.return_interm_indices {:?} names no ResNet stage: include at least one index in 0..=3",
                m.return_interm_indices
            )));
        }
        if m.return_interm_indices.len() != m.num_feature_levels as usize {
            return Err(TrainerError::UnsupportedModel(format!(
                "model.return_interm_indices has {} entries but model.num_feature_levels is {}: give one index per level",
                m.return_interm_indices.len(),
                m.num_feature_levels
            )));
        }
        if m.dilation && m.backbone != crate::spec::Backbone::Resnet50 {
            return Err(TrainerError::UnsupportedModel(
                "model.dilation needs a bottleneck ResNet: use backbone resnet_50 or set dilation: false".into(),
            ));
        }
        if m.two_stage && !m.with_box_refine {
            return Err(TrainerError::UnsupportedModel(
                "model.two_stage needs model.with_box_refine: true".into(),
            ));
        }
        if num_classes == 0 {
            return Err(TrainerError::UnsupportedModel(
                "dataset.num_classes is 0: set it to max category id + 1".into(),
            ));
        }
        Ok(Self {
            backbone: m.backbone,
            train_backbone: m.train_backbone,
            dilation: m.dilation,
            backbone_from_scratch: m.backbone_from_scratch,
            backbone_drop_path_rate: m
                .backbone_drop_path_rate
                .unwrap_or(m.backbone.default_drop_path_rate()),
            backbone_stages,
            num_classes: num_classes as i64,
            with_box_refine: m.with_box_refine,
            aux_loss: m.aux_loss,
            transformer: TransformerConfig {
                d_model: m.hidden_dim as i64,
                nhead: m.nheads as i64,
                enc_layers: m.enc_layers as i64,
                dec_layers: m.dec_layers as i64,
                dim_feedforward: m.dim_feedforward as i64,
                dropout: m.dropout_ratio,
                num_feature_levels: m.num_feature_levels as i64,
                enc_n_points: m.enc_n_points as i64,
                dec_n_points: m.dec_n_points as i64,
                two_stage: m.two_stage,
                num_queries: m.num_queries as i64,
            },
        })
    }
}

/// Class and box heads: one shared pair without refinement, one per prediction with it.
#[derive(Debug)]
pub(crate) struct Heads {
    pub(crate) class_embed: Vec<nn::Linear>,
    pub(crate) bbox_embed: Vec<Mlp>,
    pub(crate) refine: bool,
    pub(crate) dec_layers: usize,
}

impl Heads {
    pub(crate) fn class(&self, i: usize) -> &nn::Linear {
        &self.class_embed[if self.refine { i } else { 0 }]
    }
    pub(crate) fn bbox(&self, i: usize) -> &Mlp {
        &self.bbox_embed[if self.refine { i } else { 0 }]
    }
}

impl DecoderHeads for Heads {
    fn refine_delta(&self, layer: usize, hs: &Tensor) -> Option<Tensor> {
        self.refine.then(|| self.bbox(layer).forward(hs))
    }
    fn encoder_heads(&self, memory: &Tensor) -> (Tensor, Tensor) {
        (
            self.class(self.dec_layers).forward(memory),
            self.bbox(self.dec_layers).forward(memory),
        )
    }
}

/// `DeformableDETR`.
#[derive(Debug)]
pub struct DeformableDetr {
    pub config: DetrConfig,
    pub backbone: Backbone,
    pub(crate) position_embedding: PositionEmbeddingSine,
    pub(crate) input_proj: Vec<InputProj>,
    pub(crate) query_embed: Option<Tensor>,
    pub transformer: DeformableTransformer,
    pub(crate) heads: Heads,
}

impl DeformableDetr {
    /// Builds the model under `root` (the var store's root), initialised as upstream.
    pub fn new(root: &nn::Path, config: DetrConfig) -> Self {
        let tc = config.transformer;
        let d = tc.d_model;
        let backbone = Backbone::new(
            &(root / "backbone" / 0).set_group(GROUP_BACKBONE),
            config.backbone,
            &config.backbone_stages,
            config.train_backbone,
            config.dilation,
            config.backbone_from_scratch,
            config.backbone_drop_path_rate,
        );
        let transformer = DeformableTransformer::new(&(root / "transformer"), tc);

        let input_proj = build_input_proj(
            &(root / "input_proj"),
            &backbone.num_channels,
            d,
            tc.num_feature_levels,
        );

        let query_embed = (!tc.two_stage).then(|| {
            (root / "query_embed").var(
                "weight",
                &[tc.num_queries, 2 * d],
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )
        });

        // Heads. Upstream builds one class/box head, initialises it, then either shares it across
        // predictions or deep-copies it (refinement); only copy 0 gets the −2 size bias in the
        // refine case (it is set after cloning), and two-stage resets every size bias to 0.
        let num_pred = (tc.dec_layers + i64::from(tc.two_stage)) as usize;
        let copies = if config.with_box_refine { num_pred } else { 1 };
        let bias_value = -((1.0 - PRIOR_PROB) / PRIOR_PROB).ln();
        let mut class_embed: Vec<nn::Linear> = Vec::with_capacity(copies);
        let mut bbox_embed: Vec<Mlp> = Vec::with_capacity(copies);
        for i in 0..copies {
            let cls = linear(
                root / "class_embed" / i,
                d,
                config.num_classes,
                default_weight(d),
                Init::Const(bias_value),
            );
            let mlp = Mlp::new(root / "bbox_embed" / i, d, d, 4, BBOX_MLP_LAYERS);
            tch::no_grad(|| {
                if i > 0 {
                    // Deep copies of copy 0 before its size bias was set.
                    cls.ws.shallow_clone().copy_(&class_embed[0].ws);
                    for (dst, src) in mlp.layers.iter().zip(&bbox_embed[0].layers) {
                        dst.ws.shallow_clone().copy_(&src.ws);
                        if let (Some(db), Some(sb)) = (&dst.bs, &src.bs) {
                            db.shallow_clone().copy_(sb);
                        }
                    }
                }
                let last = mlp.layers.last().expect("3 layers");
                let _ = last.ws.shallow_clone().fill_(0.0);
                let mut bias = last.bs.as_ref().expect("bias").shallow_clone();
                let _ = bias.fill_(0.0);
                if i == 0 && !tc.two_stage {
                    let _ = bias.narrow(0, 2, 2).fill_(BBOX_SIZE_BIAS);
                }
            });
            class_embed.push(cls);
            bbox_embed.push(mlp);
        }
        let heads = Heads {
            class_embed,
            bbox_embed,
            refine: config.with_box_refine,
            dec_layers: tc.dec_layers as usize,
        };
        Self {
            position_embedding: PositionEmbeddingSine::new(d / 2),
            config,
            backbone,
            input_proj,
            query_embed,
            transformer,
            heads,
        }
    }

    /// `images` `[N, 3, H, W]` (normalised, zero-padded), `pixel_mask` `[N, H, W]` true on padding;
    /// `train` enables dropout.
    ///
    /// # Panics
    /// Two-stage, when the feature maps have fewer positions than `num_queries` (upstream's
    /// `topk` fails the same way).
    pub fn forward(&self, images: &Tensor, pixel_mask: &Tensor, train: bool) -> DetrOutput {
        let features = self.backbone_features(images, pixel_mask, train);
        self.forward_from_features(&features, pixel_mask, train)
    }

    /// The backbone half of [`DeformableDetr::forward`]: the returned stages' feature maps and
    /// their padding masks (`train`: the GCViT's stochastic depth).
    pub fn backbone_features(
        &self,
        images: &Tensor,
        pixel_mask: &Tensor,
        train: bool,
    ) -> Vec<(Tensor, Tensor)> {
        self.backbone.forward(images, pixel_mask, train)
    }

    /// The rest of [`DeformableDetr::forward`] from [`DeformableDetr::backbone_features`].
    pub fn forward_from_features(
        &self,
        features: &[(Tensor, Tensor)],
        pixel_mask: &Tensor,
        train: bool,
    ) -> DetrOutput {
        let inputs = self.encoder_inputs(features, pixel_mask);
        let mut memory = inputs.src.shallow_clone();
        for i in 0..self.transformer.num_encoder_layers() {
            memory = self
                .transformer
                .encoder_layer(i, &memory, &inputs.pos, &inputs, train);
        }
        self.decode(&memory, &inputs, train)
    }

    /// Input projections and position embeddings of every level, flattened for the encoder.
    pub fn encoder_inputs(
        &self,
        features: &[(Tensor, Tensor)],
        pixel_mask: &Tensor,
    ) -> EncoderInputs {
        let (srcs, masks, pos) = project_levels(
            &self.input_proj,
            &self.position_embedding,
            features,
            pixel_mask,
        );
        self.transformer.encoder_inputs(&srcs, &masks, &pos)
    }

    /// The decoder on the encoder's output: every layer's hidden state and reference points
    /// (and the two-stage proposals), before the detection heads.
    pub fn decoder_states(
        &self,
        memory: &Tensor,
        inputs: &EncoderInputs,
        train: bool,
    ) -> TransformerOutput {
        self.transformer.decode(
            memory,
            inputs,
            self.query_embed.as_ref(),
            &self.heads,
            train,
        )
    }

    /// The decoder and the detection heads on the encoder's output.
    pub fn decode(&self, memory: &Tensor, inputs: &EncoderInputs, train: bool) -> DetrOutput {
        let out = self.decoder_states(memory, inputs, train);
        let mut layers = Vec::with_capacity(self.transformer.decoder.len());
        for lvl in 0..out.hs.size()[0] {
            let reference = if lvl == 0 {
                out.init_reference.shallow_clone()
            } else {
                out.inter_references.get(lvl - 1)
            };
            let reference = inverse_sigmoid(&reference);
            let hs = out.hs.get(lvl);
            let logits = self.heads.class(lvl as usize).forward(&hs);
            let delta = self.heads.bbox(lvl as usize).forward(&hs);
            let coord = if reference.size()[2] == 4 {
                delta + reference
            } else {
                Tensor::cat(
                    &[delta.narrow(-1, 0, 2) + reference, delta.narrow(-1, 2, 2)],
                    -1,
                )
            };
            layers.push(Prediction {
                logits,
                boxes: coord.sigmoid(),
            });
        }
        let enc_outputs = out.enc_outputs.map(|(logits, coord_unact)| Prediction {
            logits,
            boxes: coord_unact.sigmoid(),
        });
        DetrOutput {
            layers,
            enc_outputs,
        }
    }

    /// Device of the model's parameters.
    pub fn device(&self) -> Device {
        self.transformer.level_embed.device()
    }

    /// Query count.
    pub fn num_queries(&self) -> i64 {
        self.config.transformer.num_queries
    }
}

impl crate::step::Stages for DeformableDetr {
    type Output = DetrOutput;
    fn backbone(&self) -> &Backbone {
        &self.backbone
    }
    fn encoder_inputs(&self, features: &[(Tensor, Tensor)], mask: &Tensor) -> EncoderInputs {
        Self::encoder_inputs(self, features, mask)
    }
    fn num_encoder_layers(&self) -> usize {
        self.transformer.num_encoder_layers()
    }
    fn encoder_layer(
        &self,
        i: usize,
        x: &Tensor,
        pos: &Tensor,
        inputs: &EncoderInputs,
        train: bool,
    ) -> Tensor {
        self.transformer.encoder_layer(i, x, pos, inputs, train)
    }
    fn decode(
        &self,
        memory: &Tensor,
        inputs: &EncoderInputs,
        _targets: Option<&[crate::matcher::Target]>,
        train: bool,
    ) -> DetrOutput {
        Self::decode(self, memory, inputs, train)
    }
}
