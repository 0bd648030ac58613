//! The FAN backbone (Zhou et al., "Understanding The Robustness in Vision Transformers", ICML
//! 2022) in the hybrid form TAO's DINO builds (`nvidia_tao_pytorch/cv/dino/model/fan.py`
//! `FANFPN` over `cv/backbone_v2/fan.py` and `convnext_utils.py`): a two-stage ConvNeXt stem
//! (`patch_embed.backbone`), a 2×2 patch projection to stride 16 (`patch_embed.proj`), Fourier
//! position encoding (`pos_embed`), FAN blocks (token-mixing self-attention, then channel
//! attention over a depthwise-conv MLP), two class-attention blocks on a `cls_token`, and a
//! stride-2 3×3 convolution to 768 channels (`learnable_downsample`). Variables carry TAO's names,
//! so a TAO checkpoint loads as is.
//!
//! The four levels TAO's `forward_feature_pyramid` returns: 0 and 1 the ConvNeXt stages (strides 4
//! and 8), 2 the output of FAN block `out_index` (stride 16), 3 the class-attention output
//! downsampled (stride 32); each returned level passes TAO's `out_norm{i}` LayerNorm. DINO's
//! `return_interm_indices: [1, 2, 3, 4]` takes levels 1–3 and makes the fourth from level 3.
//!
//! As TAO: the depthwise-conv MLP's BatchNorm uses batch statistics and updates its running ones
//! in training; stochastic depth 0.3 on every FAN block (`model.backbone_drop_path_rate`);
//! TAO's initialisation (truncated normal 0.02 for linear layers and the ConvNeXt, normal
//! √(2/fan_out) for the depthwise convolutions, PyTorch's default for the other convolutions).

use tch::nn::{self, Init, Module};
use tch::{Kind, Tensor};

use super::gcvit::{drop_path, Conv};
use super::{default_bias, default_weight};
use crate::spec::Backbone as BackboneKind;

/// TAO's `drop_path_rate` for every FAN block of a detection FAN.
pub const DROP_PATH_RATE: f64 = 0.3;
/// The ConvNeXt's and the FAN blocks' LayerNorm epsilon (`partial(nn.LayerNorm, eps=1e-6)`).
const LN_EPS_BLOCK: f64 = 1e-6;
/// PyTorch's default LayerNorm epsilon: the channel MLP's `norm_v` and the `out_norm{i}` layers.
const LN_EPS_DEFAULT: f64 = 1e-5;
/// BatchNorm2d's defaults.
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;
/// `trunc_normal_(std=.02)` (its ±2 bounds are 100 standard deviations out).
const TRUNC_STD: f64 = 0.02;
/// The ConvNeXt's layer-scale initial value.
const CONVNEXT_LS_INIT: f64 = 1e-6;
/// Channels of the Fourier position features (`hidden_dim=32`, sine and cosine).
const POS_HIDDEN: i64 = 32;
/// Channels of `learnable_downsample`'s output (level 3).
const DOWNSAMPLE_DIM: i64 = 768;
/// Class-attention blocks (`cls_attn_layers=2`).
const CLS_ATTN_LAYERS: usize = 2;

/// One TAO FAN-hybrid size (`fan_model_dict`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FanConfig {
    /// Blocks of the two ConvNeXt stages.
    pub convnext_depths: [usize; 2],
    /// Channels of the two ConvNeXt stages.
    pub convnext_dims: [i64; 2],
    pub embed_dim: i64,
    /// FAN blocks.
    pub depth: usize,
    pub heads: i64,
    /// The block whose output is level 2.
    pub out_index: usize,
    /// Stochastic depth of every FAN block.
    pub drop_path_rate: f64,
}

impl FanConfig {
    /// TAO's entry for `kind`; None for another family.
    pub fn of(kind: BackboneKind) -> Option<Self> {
        let hybrid = |convnext_depths, embed_dim, depth: usize, heads, out_index| Self {
            convnext_depths,
            convnext_dims: [128, 256],
            embed_dim,
            depth,
            heads,
            out_index,
            drop_path_rate: DROP_PATH_RATE,
        };
        Some(match kind {
            BackboneKind::FanTiny => hybrid([3, 3], 192, 8, 8, 7),
            BackboneKind::FanSmall => hybrid([3, 3], 384, 10, 8, 9),
            BackboneKind::FanBase => hybrid([3, 3], 448, 16, 8, 15),
            BackboneKind::FanLarge => hybrid([3, 5], 480, 22, 10, 18),
            _ => return None,
        })
    }

    /// Channels of level `i` (TAO's `out_channels`).
    pub fn channels(&self, level: usize) -> i64 {
        match level {
            0 | 1 => self.convnext_dims[level],
            2 => self.embed_dim,
            _ => DOWNSAMPLE_DIM,
        }
    }
}

/// How a forward treats the BatchNorms and stochastic depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Running statistics, no stochastic depth.
    Eval,
    /// Batch statistics (running ones updated), stochastic depth.
    Train,
    /// As `Train` without updating the running statistics: a checkpointed backward's second run.
    Recompute,
}

impl Pass {
    pub fn of(train: bool) -> Self {
        if train {
            Self::Train
        } else {
            Self::Eval
        }
    }

    fn train(self) -> bool {
        self != Self::Eval
    }
}

fn trunc_normal() -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: TRUNC_STD,
    }
}

fn conv(p: nn::Path, shape: [i64; 4], stride: i64, padding: i64, groups: i64, init: Init) -> Conv {
    let bias = match init {
        // PyTorch's default layer: its bias is U(±1/√fan_in) too.
        Init::Kaiming { .. } | Init::Uniform { .. } => default_bias(shape[1] * shape[2] * shape[3]),
        _ => Init::Const(0.0),
    };
    Conv {
        ws: p.var("weight", &shape, init),
        bs: Some(p.var("bias", &[shape[0]], bias)),
        stride,
        padding,
        groups,
    }
}

/// A convolution with PyTorch's default initialisation.
fn default_conv(p: nn::Path, shape: [i64; 4], stride: i64, padding: i64) -> Conv {
    conv(
        p,
        shape,
        stride,
        padding,
        1,
        default_weight(shape[1] * shape[2] * shape[3]),
    )
}

/// A linear layer as TAO initialises FAN's: truncated normal 0.02, bias 0.
fn linear(p: nn::Path, cin: i64, cout: i64) -> nn::Linear {
    nn::linear(
        p,
        cin,
        cout,
        nn::LinearConfig {
            ws_init: trunc_normal(),
            bs_init: Some(Init::Const(0.0)),
            bias: true,
        },
    )
}

fn layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![dim],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

/// `LayerNorm2d`: a LayerNorm over the channels of an NCHW map.
fn layer_norm_2d(norm: &nn::LayerNorm, x: &Tensor) -> Tensor {
    norm.forward(&x.permute([0, 2, 3, 1])).permute([0, 3, 1, 2])
}

/// A 1×1 convolution's weight `[out, in, 1, 1]` applied as a linear layer to an NHWC map.
fn pointwise(c: &Conv, x: &Tensor) -> Tensor {
    let w = c.ws.flatten(1, 3);
    x.linear(&w, c.bs.as_ref())
}

/// `ConvNeXtBlock` (conv MLP): depthwise 7×7, LayerNorm2d, 1×1 → GELU → 1×1, layer scale,
/// residual; NCHW.
#[derive(Debug)]
pub(crate) struct ConvNeXtBlock {
    pub(crate) conv_dw: Conv,
    pub(crate) norm: nn::LayerNorm,
    pub(crate) fc1: Conv,
    pub(crate) fc2: Conv,
    pub(crate) gamma: Tensor,
}

impl ConvNeXtBlock {
    fn new(p: nn::Path, dim: i64) -> Self {
        Self {
            conv_dw: conv(&p / "conv_dw", [dim, 1, 7, 7], 1, 3, dim, trunc_normal()),
            norm: layer_norm(&p / "norm", dim, LN_EPS_BLOCK),
            fc1: conv(
                &p / "mlp" / "fc1",
                [4 * dim, dim, 1, 1],
                1,
                0,
                1,
                trunc_normal(),
            ),
            fc2: conv(
                &p / "mlp" / "fc2",
                [dim, 4 * dim, 1, 1],
                1,
                0,
                1,
                trunc_normal(),
            ),
            gamma: p.var("gamma", &[dim], Init::Const(CONVNEXT_LS_INIT)),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        // The 1×1 convolutions run as linear layers on the NHWC map (the same arithmetic).
        let y = self
            .norm
            .forward(&self.conv_dw.forward(x).permute([0, 2, 3, 1]));
        let y = pointwise(&self.fc2, &pointwise(&self.fc1, &y).gelu("none")) * &self.gamma;
        x + y.permute([0, 3, 1, 2])
    }
}

/// `ConvNeXtStage`: an optional LayerNorm2d + 2×2 stride-2 convolution (`downsample.0`, `.1`),
/// then the blocks.
#[derive(Debug)]
pub(crate) struct ConvNeXtStage {
    pub(crate) downsample: Option<(nn::LayerNorm, Conv)>,
    pub(crate) blocks: Vec<ConvNeXtBlock>,
}

impl ConvNeXtStage {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = match &self.downsample {
            Some((norm, c)) => c.forward(&layer_norm_2d(norm, x)),
            None => x.shallow_clone(),
        };
        for b in &self.blocks {
            x = b.forward(&x);
        }
        x
    }
}

/// BatchNorm2d with its running statistics (`weight`, `bias`, `running_mean`, `running_var`).
#[derive(Debug)]
pub(crate) struct BatchNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) running_mean: Tensor,
    pub(crate) running_var: Tensor,
}

impl BatchNorm {
    fn new(p: nn::Path, dim: i64) -> Self {
        Self {
            weight: p.var("weight", &[dim], Init::Const(1.0)),
            bias: p.var("bias", &[dim], Init::Const(0.0)),
            running_mean: p.zeros_no_train("running_mean", &[dim]),
            running_var: p.ones_no_train("running_var", &[dim]),
        }
    }

    /// The running-statistics normalisation as a per-channel `(scale, shift)`.
    pub fn eval_affine(&self) -> (Tensor, Tensor) {
        let scale = &self.weight / (&self.running_var + BN_EPS).sqrt();
        let shift = &self.bias - &self.running_mean * &scale;
        (scale, shift)
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Tensor {
        let running = (pass != Pass::Recompute).then_some((&self.running_mean, &self.running_var));
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            running.map(|r| r.0),
            running.map(|r| r.1),
            pass.train(),
            BN_MOMENTUM,
            BN_EPS,
            false,
        )
    }
}

/// `Mlp` of the channel processing: `fc1`, `gamma · dwconv(x) + x`, `fc2` (TAO's forward never
/// applies its `act`). `dwconv`: depthwise 3×3 (`conv1`), GELU, BatchNorm (`bn`), depthwise
/// 3×3 (`conv2`).
#[derive(Debug)]
pub(crate) struct ChannelMlp {
    pub(crate) fc1: nn::Linear,
    pub(crate) conv1: Conv,
    pub(crate) bn: BatchNorm,
    pub(crate) conv2: Conv,
    pub(crate) gamma: Tensor,
    pub(crate) fc2: nn::Linear,
}

impl ChannelMlp {
    fn new(p: nn::Path, dim: i64, hidden: i64) -> Self {
        let dw = &p / "dwconv";
        // normal(0, √(2 / fan_out)), fan_out = 3·3·out/groups = 9.
        let dw_init = || Init::Randn {
            mean: 0.0,
            stdev: (2.0f64 / 9.0).sqrt(),
        };
        Self {
            fc1: linear(&p / "fc1", dim, hidden),
            conv1: conv(&dw / "conv1", [hidden, 1, 3, 3], 1, 1, hidden, dw_init()),
            bn: BatchNorm::new(&dw / "bn", hidden),
            conv2: conv(&dw / "conv2", [hidden, 1, 3, 3], 1, 1, hidden, dw_init()),
            gamma: p.var("gamma", &[hidden], Init::Const(1.0)),
            fc2: linear(&p / "fc2", hidden, dim),
        }
    }

    /// `x` `[B, N, C]` of an `h × w` map.
    fn forward(&self, x: &Tensor, h: i64, w: i64, pass: Pass) -> Tensor {
        let x = self.fc1.forward(x);
        let (b, n, c) = x.size3().expect("[B, N, C]");
        let m = x.permute([0, 2, 1]).reshape([b, c, h, w]);
        let m = self.conv1.forward(&m).gelu("none");
        let m = self.conv2.forward(&self.bn.forward(&m, pass));
        let m = m.reshape([b, c, n]).permute([0, 2, 1]);
        self.fc2.forward(&(m * &self.gamma + x))
    }
}

/// `FANBlock`: pre-norm token mixing (multi-head self-attention over all tokens, `attn.q`,
/// `attn.kv`, `attn.proj`) and channel processing (`mlp`: per-head channel attention from a
/// softmax over the tokens, scaling `norm_v(mlp_v(x))`), each with layer scale and stochastic
/// depth.
#[derive(Debug)]
pub(crate) struct FanBlock {
    pub(crate) norm1: nn::LayerNorm,
    pub(crate) q: nn::Linear,
    pub(crate) kv: nn::Linear,
    pub(crate) proj: nn::Linear,
    pub(crate) gamma1: Tensor,
    pub(crate) norm2: nn::LayerNorm,
    pub(crate) temperature: Tensor,
    pub(crate) mlp_v: ChannelMlp,
    pub(crate) norm_v: nn::LayerNorm,
    pub(crate) cq: nn::Linear,
    pub(crate) gamma2: Tensor,
    pub(crate) heads: i64,
    pub(crate) drop_path: f64,
}

impl FanBlock {
    fn new(p: nn::Path, dim: i64, heads: i64, drop_path: f64) -> Self {
        let a = &p / "attn";
        let m = &p / "mlp";
        Self {
            norm1: layer_norm(&p / "norm1", dim, LN_EPS_BLOCK),
            q: linear(&a / "q", dim, dim),
            kv: linear(&a / "kv", dim, 2 * dim),
            proj: linear(&a / "proj", dim, dim),
            gamma1: p.var("gamma1", &[dim], Init::Const(1.0)),
            norm2: layer_norm(&p / "norm2", dim, LN_EPS_BLOCK),
            temperature: m.var("temperature", &[heads, 1, 1], Init::Const(1.0)),
            mlp_v: ChannelMlp::new(&m / "mlp_v", dim, 4 * dim),
            norm_v: layer_norm(&m / "norm_v", dim, LN_EPS_DEFAULT),
            cq: linear(&m / "q", dim, dim),
            gamma2: p.var("gamma2", &[dim], Init::Const(1.0)),
            heads,
            drop_path,
        }
    }

    fn token_mixing(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("[B, N, C]");
        let hd = c / self.heads;
        let q = self
            .q
            .forward(x)
            .view([b, n, self.heads, hd])
            .transpose(1, 2);
        let kv = self
            .kv
            .forward(x)
            .view([b, n, 2, self.heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let (k, v) = (kv.get(0), kv.get(1));
        let attn = (q * (hd as f64).powf(-0.5)).matmul(&k.transpose(-2, -1));
        let out = attn
            .softmax(-1, attn.kind())
            .matmul(&v)
            .transpose(1, 2)
            .reshape([b, n, c]);
        self.proj.forward(&out)
    }

    fn channel_processing(&self, x: &Tensor, h: i64, w: i64, pass: Pass) -> Tensor {
        let (b, n, c) = x.size3().expect("[B, N, C]");
        let hd = c / self.heads;
        let heads = |t: Tensor| t.view([b, n, self.heads, hd]).transpose(1, 2);
        // Queries: a softmax over the tokens, [B, h, hd, N]; keys (the input itself): a softmax
        // over the tokens averaged over the head's channels, [B, h, N, 1].
        let q = heads(self.cq.forward(x))
            .softmax(-2, x.kind())
            .transpose(-1, -2);
        let k = heads(x.shallow_clone())
            .softmax(-2, x.kind())
            .mean_dim(&[-1i64][..], true, None);
        let attn = q.matmul(&k).sigmoid() * &self.temperature; // [B, h, hd, 1]
        let v = self.norm_v.forward(&self.mlp_v.forward(x, h, w, pass));
        (v.view([b, n, self.heads, hd]) * attn.squeeze_dim(-1).unsqueeze(1)).reshape([b, n, c])
    }

    /// `x` `[B, N, C]` of an `h × w` map.
    fn forward(&self, x: &Tensor, h: i64, w: i64, pass: Pass) -> Tensor {
        let train = pass.train();
        let y = self.token_mixing(&self.norm1.forward(x)) * &self.gamma1;
        let x = x + drop_path(&y, self.drop_path, train);
        let y = self.channel_processing(&self.norm2.forward(&x), h, w, pass) * &self.gamma2;
        &x + drop_path(&y, self.drop_path, train)
    }
}

/// `ClassAttentionBlock` (CaiT's, with `tokens_norm`): the class token attends to all tokens
/// (`attn.q`, `.k`, `.v`, `.proj`); every token is then normalised (`norm2`) and the class
/// token alone passes the MLP (`mlp.fc1`, `mlp.fc2`).
#[derive(Debug)]
pub(crate) struct ClassAttentionBlock {
    pub(crate) norm1: nn::LayerNorm,
    pub(crate) q: nn::Linear,
    pub(crate) k: nn::Linear,
    pub(crate) v: nn::Linear,
    pub(crate) proj: nn::Linear,
    pub(crate) gamma1: Tensor,
    pub(crate) norm2: nn::LayerNorm,
    pub(crate) fc1: nn::Linear,
    pub(crate) fc2: nn::Linear,
    pub(crate) gamma2: Tensor,
    pub(crate) heads: i64,
}

impl ClassAttentionBlock {
    fn new(p: nn::Path, dim: i64, heads: i64) -> Self {
        let a = &p / "attn";
        Self {
            norm1: layer_norm(&p / "norm1", dim, LN_EPS_BLOCK),
            q: linear(&a / "q", dim, dim),
            k: linear(&a / "k", dim, dim),
            v: linear(&a / "v", dim, dim),
            proj: linear(&a / "proj", dim, dim),
            gamma1: p.var("gamma1", &[dim], Init::Const(1.0)),
            norm2: layer_norm(&p / "norm2", dim, LN_EPS_BLOCK),
            fc1: linear(&p / "mlp" / "fc1", dim, 4 * dim),
            fc2: linear(&p / "mlp" / "fc2", 4 * dim, dim),
            gamma2: p.var("gamma2", &[dim], Init::Const(1.0)),
            heads,
        }
    }

    /// `x` `[B, 1 + N, C]`, the class token first.
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("[B, N, C]");
        let hd = c / self.heads;
        let xn = self.norm1.forward(x);
        let heads = |t: Tensor, n: i64| t.view([b, n, self.heads, hd]).transpose(1, 2);
        let q = heads(self.q.forward(&xn.narrow(1, 0, 1)), 1);
        let k = heads(self.k.forward(&xn), n);
        let v = heads(self.v.forward(&xn), n);
        let attn = (q * (hd as f64).powf(-0.5)).matmul(&k.transpose(-2, -1));
        let cls = attn
            .softmax(-1, attn.kind())
            .matmul(&v)
            .transpose(1, 2)
            .reshape([b, 1, c]);
        let cls = self.proj.forward(&cls);
        let x = x + Tensor::cat(&[cls, xn.narrow(1, 1, n - 1)], 1) * &self.gamma1;
        let x = self.norm2.forward(&x);
        let cls = self
            .fc2
            .forward(&self.fc1.forward(&x.narrow(1, 0, 1)).gelu("none"))
            * &self.gamma2;
        &x + Tensor::cat(&[cls, x.narrow(1, 1, n - 1)], 1)
    }
}

/// The FAN trunk (`backbone.0.body`).
#[derive(Debug)]
pub struct Fan {
    pub config: FanConfig,
    pub(crate) stem: (Conv, nn::LayerNorm),
    pub(crate) stages: Vec<ConvNeXtStage>,
    pub(crate) proj: Conv,
    pub(crate) token_projection: Conv,
    pub(crate) blocks: Vec<FanBlock>,
    pub(crate) cls_token: Tensor,
    pub(crate) cls_blocks: Vec<ClassAttentionBlock>,
    pub(crate) downsample: Conv,
    /// `out_norm{i}` of each returned level, by level.
    pub(crate) norms: Vec<Option<nn::LayerNorm>>,
}

impl Fan {
    /// `p` is the `backbone.0.body` path; `stages` the levels returned (TAO's `out_indices`).
    pub fn new(p: &nn::Path, config: FanConfig, stages: &[usize]) -> Self {
        let c = config;
        let [d0, d1] = c.convnext_dims;
        let pe = p / "patch_embed";
        let cn = &pe / "backbone";
        let stem = (
            conv(&cn / "stem" / 0, [d0, 3, 4, 4], 4, 0, 1, trunc_normal()),
            layer_norm(&cn / "stem" / 1, d0, LN_EPS_BLOCK),
        );
        let convnext = (0..2)
            .map(|s| {
                let sp = &cn / "stages" / s as i64;
                let dim = c.convnext_dims[s];
                let downsample = (s == 1).then(|| {
                    let dp = &sp / "downsample";
                    (
                        layer_norm(&dp / 0, d0, LN_EPS_BLOCK),
                        conv(&dp / 1, [d1, d0, 2, 2], 2, 0, 1, trunc_normal()),
                    )
                });
                let blocks = (0..c.convnext_depths[s])
                    .map(|j| ConvNeXtBlock::new(&sp / "blocks" / j as i64, dim))
                    .collect();
                ConvNeXtStage { downsample, blocks }
            })
            .collect();
        let e = c.embed_dim;
        let blocks = (0..c.depth)
            .map(|i| FanBlock::new(p / "blocks" / i as i64, e, c.heads, c.drop_path_rate))
            .collect();
        let cls_blocks = (0..CLS_ATTN_LAYERS)
            .map(|i| ClassAttentionBlock::new(p / "cls_attn_blocks" / i as i64, e, c.heads))
            .collect();
        let norms = (0..4)
            .map(|i| {
                stages
                    .contains(&i)
                    .then(|| layer_norm(p / format!("out_norm{i}"), c.channels(i), LN_EPS_DEFAULT))
            })
            .collect();
        Self {
            config,
            stem,
            stages: convnext,
            proj: default_conv(&pe / "proj", [e, d1, 2, 2], 2, 0),
            token_projection: default_conv(
                p / "pos_embed" / "token_projection",
                [e, 2 * POS_HIDDEN, 1, 1],
                1,
                0,
            ),
            blocks,
            cls_token: p.var("cls_token", &[1, 1, e], trunc_normal()),
            cls_blocks,
            downsample: default_conv(p / "learnable_downsample", [DOWNSAMPLE_DIM, e, 3, 3], 2, 1),
            norms,
        }
    }

    /// The last level any output needs.
    pub fn last_level(&self) -> usize {
        self.norms.iter().rposition(Option::is_some).unwrap_or(0)
    }

    /// Every level's normalised output up to the last returned one, NCHW (None for levels not
    /// returned).
    pub fn forward(&self, images: &Tensor, pass: Pass) -> Vec<Option<Tensor>> {
        self.levels(images, pass)
            .iter()
            .enumerate()
            .map(|(i, x)| self.output(i, x))
            .collect()
    }

    /// The outputs of levels `0..=last_level()` before their `out_norm{i}`, NCHW.
    pub fn levels(&self, images: &Tensor, pass: Pass) -> Vec<Tensor> {
        let last = self.last_level();
        let (conv, norm) = &self.stem;
        let mut x = layer_norm_2d(norm, &conv.forward(images));
        let mut outs = Vec::with_capacity(4);
        for stage in &self.stages {
            x = stage.forward(&x);
            outs.push(x.shallow_clone());
        }
        if last < 2 {
            outs.truncate(last + 1);
            return outs;
        }
        let x = self.proj.forward(&x);
        let (b, e, h, w) = x.size4().expect("NCHW");
        let pos = self
            .token_projection
            .forward(&fourier_features(h, w, x.device()).to_kind(x.kind()));
        let mut x = (x + pos).flatten(2, 3).transpose(1, 2);
        let spatial = |t: &Tensor| t.transpose(1, 2).reshape([b, e, h, w]);
        let needed = if last == 2 {
            self.config.out_index + 1
        } else {
            self.config.depth
        };
        for (i, block) in self.blocks.iter().take(needed).enumerate() {
            x = block.forward(&x, h, w, pass);
            if i == self.config.out_index {
                outs.push(spatial(&x));
            }
        }
        if last == 3 {
            let mut t = Tensor::cat(&[self.cls_token.expand([b, 1, e], false), x], 1);
            for block in &self.cls_blocks {
                t = block.forward(&t);
            }
            let n = t.size()[1];
            outs.push(self.downsample.forward(&spatial(&t.narrow(1, 1, n - 1))));
        }
        outs
    }

    /// Level `i`'s returned feature map (`out_norm{i}` of its output); None when the level is
    /// not returned.
    pub fn output(&self, i: usize, raw: &Tensor) -> Option<Tensor> {
        self.norms[i]
            .as_ref()
            .map(|n| layer_norm_2d(n, raw).contiguous())
    }
}

/// `PositionalEncodingFourier`'s features before `token_projection`: `[1, 64, h, w]`, the
/// row then the column positions (1-based, divided by the size + 1e-6, times 2π) over
/// 10000^(2⌊i/2⌋/32), sine and cosine interleaved.
pub fn fourier_features(h: i64, w: i64, device: tch::Device) -> Tensor {
    let eps = 1e-6;
    let scale = 2.0 * std::f64::consts::PI;
    let opts = (Kind::Float, device);
    let dim_t = Tensor::arange(POS_HIDDEN, opts)
        .divide_scalar_mode(2, "floor")
        .multiply_scalar(2.0 / POS_HIDDEN as f64);
    let dim_t = Tensor::from(10000.0f32).to_device(device).pow(&dim_t);
    let axis = |n: i64| {
        let pos = Tensor::arange_start(1, n + 1, opts) / (n as f64 + eps) * scale;
        let p = pos.unsqueeze(-1) / &dim_t; // [n, 32]
        Tensor::stack(
            &[
                p.slice(1, 0, POS_HIDDEN, 2).sin(),
                p.slice(1, 1, POS_HIDDEN, 2).cos(),
            ],
            2,
        )
        .flatten(1, 2) // [n, 32]: sin, cos interleaved
    };
    let y = axis(h).unsqueeze(1).expand([h, w, POS_HIDDEN], false);
    let x = axis(w).unsqueeze(0).expand([h, w, POS_HIDDEN], false);
    Tensor::cat(&[y, x], 2).permute([2, 0, 1]).unsqueeze(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::Device;

    #[test]
    fn variables_carry_tao_names_and_shapes() {
        let vs = VarStore::new(Device::Cpu);
        let c = FanConfig::of(BackboneKind::FanTiny).unwrap();
        let _ = Fan::new(&vs.root(), c, &[1, 2, 3]);
        let vars = vs.variables();
        for (k, shape) in [
            ("patch_embed.backbone.stem.0.weight", vec![128, 3, 4, 4]),
            (
                "patch_embed.backbone.stages.1.downsample.1.weight",
                vec![256, 128, 2, 2],
            ),
            (
                "patch_embed.backbone.stages.0.blocks.2.mlp.fc1.weight",
                vec![512, 128, 1, 1],
            ),
            ("patch_embed.backbone.stages.1.blocks.0.gamma", vec![256]),
            ("patch_embed.proj.weight", vec![192, 256, 2, 2]),
            ("pos_embed.token_projection.weight", vec![192, 64, 1, 1]),
            ("blocks.7.attn.kv.weight", vec![384, 192]),
            ("blocks.0.mlp.temperature", vec![8, 1, 1]),
            ("blocks.0.mlp.mlp_v.dwconv.conv1.weight", vec![768, 1, 3, 3]),
            ("blocks.0.mlp.mlp_v.dwconv.bn.running_var", vec![768]),
            ("blocks.0.mlp.norm_v.weight", vec![192]),
            ("cls_token", vec![1, 1, 192]),
            ("cls_attn_blocks.1.attn.v.bias", vec![192]),
            ("cls_attn_blocks.1.mlp.fc2.weight", vec![192, 768]),
            ("learnable_downsample.weight", vec![768, 192, 3, 3]),
            ("out_norm1.weight", vec![256]),
            ("out_norm3.bias", vec![768]),
        ] {
            assert_eq!(vars.get(k).map(Tensor::size), Some(shape), "{k}");
        }
        assert!(!vars.contains_key("out_norm0.weight"));
        assert!(!vars.contains_key("patch_embed.backbone.stages.0.downsample.0.weight"));
    }

    #[test]
    fn levels_have_taos_strides_and_batch_elements_are_independent() {
        let _rng = crate::torch_rng_lock();
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let c = FanConfig::of(BackboneKind::FanTiny).unwrap();
        let net = Fan::new(&vs.root(), c, &[1, 2, 3]);
        let x = Tensor::randn([2, 3, 100, 136], (Kind::Float, Device::Cpu));
        let outs = tch::no_grad(|| net.forward(&x, Pass::Eval));
        let sizes: Vec<Vec<i64>> = outs.iter().flatten().map(Tensor::size).collect();
        assert_eq!(
            sizes,
            [vec![2, 256, 12, 17], vec![2, 192, 6, 8], vec![2, 768, 3, 4]]
        );
        let one = tch::no_grad(|| net.forward(&x.narrow(0, 1, 1), Pass::Eval));
        let a = outs[3].as_ref().unwrap().narrow(0, 1, 1);
        assert!(a.allclose(one[3].as_ref().unwrap(), 1e-5, 1e-5, false));
    }

    #[test]
    fn a_recompute_repeats_the_training_pass_without_touching_running_statistics() {
        let _rng = crate::torch_rng_lock();
        let vs = VarStore::new(Device::Cpu);
        let c = FanConfig::of(BackboneKind::FanTiny).unwrap();
        let net = Fan::new(&vs.root(), c, &[2]);
        let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let stats = || vs.variables()["blocks.3.mlp.mlp_v.dwconv.bn.running_mean"].copy();
        let before = stats();
        tch::manual_seed(11);
        let train = tch::no_grad(|| net.forward(&x, Pass::Train));
        let after = stats();
        assert!(
            !after.allclose(&before, 0.0, 0.0, false),
            "training updates the statistics"
        );
        tch::manual_seed(11);
        let again = tch::no_grad(|| net.forward(&x, Pass::Recompute));
        assert!(stats().equal(&after), "a recompute leaves them");
        assert!(train[2].as_ref().unwrap().equal(again[2].as_ref().unwrap()));
    }
}
