//! The GCViT backbone (Hatamizadeh et al., "Global Context Vision Transformers", ICML 2023) as
//! TAO's Deformable DETR and DINO build it (`nvidia_tao_pytorch/cv/deformable_detr/model/
//! gc_vit.py` over `cv/backbone/gc_vit.py`): variables under TAO's names (`patch_embed.proj`,
//! `levels.{i}.blocks.{j}.attn.qkv`, `levels.{i}.q_global_gen.to_q_global.{k}`,
//! `levels.{i}.downsample`, `norm{i}` for each returned level), so a TAO checkpoint loads as is;
//! timm's names (`timm/models/gcvit.py`) reach them through [`timm_to_tao`].
//!
//! The network equals timm's `GlobalContextVit` built for 224² (windows 7, 7, 14, 7; 3, 2, 1, 1
//! global-query blocks per level) and, like TAO's detection variant, runs any input size: a block
//! pads its normalised input with zeros to a multiple of the window and crops the result, and a
//! level's pooled global query is resized to the window by bicubic interpolation when its size
//! differs. Each returned level's output (before its downsampling) passes TAO's `norm{i}` layer.
//! Stochastic depth as TAO (rates 0 → 0.2 over the blocks, training only;
//! `model.backbone_drop_path_rate`); PyTorch's default initialisation (TAO's detection GCViT
//! applies no other).

use tch::nn::{self, Init, Module};
use tch::Tensor;

use super::{default_bias, default_weight};
use crate::spec::Backbone as BackboneKind;

/// LayerNorm epsilon (PyTorch's default, as TAO and timm build them).
const LN_EPS: f64 = 1e-5;
/// The image size TAO's detection GCViT is built for (its `resolution` default): it fixes how
/// many pooling blocks make each level's global query.
const DESIGN_RESOLUTION: i64 = 224;
/// TAO's `drop_path_rate` for every detection GCViT.
pub const DROP_PATH_RATE: f64 = 0.2;
/// Squeeze-excitation reduction (`expansion=0.25`).
const SE_RATIO: f64 = 0.25;

/// One TAO GCViT size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GcVitConfig {
    pub dim: i64,
    pub depths: [usize; 4],
    pub num_heads: [i64; 4],
    pub window: [i64; 4],
    pub mlp_ratio: f64,
    pub layer_scale: Option<f64>,
    /// Stochastic depth of the last block (0 for the first, linear between).
    pub drop_path_rate: f64,
}

impl GcVitConfig {
    /// TAO's `gc_vit_model_dict` entry for `kind`; None for a ResNet.
    pub fn of(kind: BackboneKind) -> Option<Self> {
        let tiny = |depths| Self {
            dim: 64,
            depths,
            num_heads: [2, 4, 8, 16],
            window: [7, 7, 14, 7],
            mlp_ratio: 3.0,
            layer_scale: None,
            drop_path_rate: DROP_PATH_RATE,
        };
        let wide = |dim, num_heads, window| Self {
            dim,
            depths: [3, 4, 19, 5],
            num_heads,
            window,
            mlp_ratio: 2.0,
            layer_scale: Some(1e-5),
            drop_path_rate: DROP_PATH_RATE,
        };
        Some(match kind {
            BackboneKind::GcVitXxtiny => tiny([2, 2, 6, 2]),
            BackboneKind::GcVitXtiny => tiny([3, 4, 6, 5]),
            BackboneKind::GcVitTiny => tiny([3, 4, 19, 5]),
            BackboneKind::GcVitSmall => wide(96, [3, 6, 12, 24], [7, 7, 14, 7]),
            BackboneKind::GcVitBase => wide(128, [4, 8, 16, 32], [7, 7, 14, 7]),
            BackboneKind::GcVitLarge => wide(192, [6, 12, 24, 48], [7, 7, 14, 7]),
            BackboneKind::GcVitLarge384 => wide(192, [6, 12, 24, 48], [12, 12, 24, 12]),
            _ => return None,
        })
    }

    /// Channels of level `i`'s output.
    pub fn channels(&self, level: usize) -> i64 {
        self.dim << level
    }
}

/// A convolution with PyTorch's default initialisation (`weight`, optional `bias`).
#[derive(Debug)]
pub(crate) struct Conv {
    pub(crate) ws: Tensor,
    pub(crate) bs: Option<Tensor>,
    pub(crate) stride: i64,
    pub(crate) padding: i64,
    pub(crate) groups: i64,
}

impl Conv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        p: nn::Path,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        padding: i64,
        groups: i64,
        bias: bool,
    ) -> Self {
        let fan_in = cin / groups * k * k;
        Self {
            ws: p.var(
                "weight",
                &[cout, cin / groups, k, k],
                default_weight(fan_in),
            ),
            bs: bias.then(|| p.var("bias", &[cout], default_bias(fan_in))),
            stride,
            padding,
            groups,
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.ws,
            self.bs.as_ref(),
            [self.stride],
            [self.padding],
            [1],
            self.groups,
        )
    }
}

fn linear(p: nn::Path, cin: i64, cout: i64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        cin,
        cout,
        nn::LinearConfig {
            ws_init: default_weight(cin),
            bs_init: Some(default_bias(cin)),
            bias,
        },
    )
}

fn layer_norm(p: nn::Path, dim: i64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![dim],
        nn::LayerNormConfig {
            eps: LN_EPS,
            ..Default::default()
        },
    )
}

/// `x · mask` with one Bernoulli(1 − p)/(1 − p) draw per sample (timm's `DropPath`).
pub(crate) fn drop_path(x: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return x.shallow_clone();
    }
    let keep = 1.0 - p;
    let mut shape = vec![1i64; x.dim()];
    shape[0] = x.size()[0];
    let mask = Tensor::empty(&shape, (x.kind(), x.device())).bernoulli_float_(keep) / keep;
    x * mask
}

/// `SqueezeExcitation`: `fc.0` (C → C/4) and `fc.2` (C/4 → C), both bias-free.
#[derive(Debug)]
pub(crate) struct SqueezeExcitation {
    pub(crate) fc0: nn::Linear,
    pub(crate) fc2: nn::Linear,
}

impl SqueezeExcitation {
    fn new(p: nn::Path, dim: i64) -> Self {
        let hidden = (dim as f64 * SE_RATIO) as i64;
        Self {
            fc0: linear(&p / "fc" / 0, dim, hidden, false),
            fc2: linear(&p / "fc" / 2, hidden, dim, false),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.mean_dim(&[2i64, 3][..], false, None);
        let y = self
            .fc2
            .forward(&self.fc0.forward(&y).gelu("none"))
            .sigmoid();
        x * y.unsqueeze(-1).unsqueeze(-1)
    }
}

/// The residual `conv` branch of `FeatExtract` and `ReduceSize`: depthwise 3×3 (`conv.0`),
/// GELU, squeeze-excitation (`conv.2`), pointwise 1×1 (`conv.3`); NCHW.
#[derive(Debug)]
pub(crate) struct ConvBranch {
    pub(crate) dw: Conv,
    pub(crate) se: SqueezeExcitation,
    pub(crate) pw: Conv,
}

impl ConvBranch {
    fn new(p: nn::Path, dim: i64) -> Self {
        let c = &p / "conv";
        Self {
            dw: Conv::new(&c / 0, dim, dim, 3, 1, 1, dim, false),
            se: SqueezeExcitation::new(&c / 2, dim),
            pw: Conv::new(&c / 3, dim, dim, 1, 1, 0, 1, false),
        }
    }

    /// `x + conv(x)`.
    fn residual(&self, x: &Tensor) -> Tensor {
        let y = self.dw.forward(x).gelu("none");
        x + self.pw.forward(&self.se.forward(&y))
    }
}

/// `ReduceSize`: norm, residual conv branch, stride-2 3×3 reduction, norm; NHWC in and out.
#[derive(Debug)]
pub(crate) struct ReduceSize {
    pub(crate) norm1: nn::LayerNorm,
    pub(crate) branch: ConvBranch,
    pub(crate) reduction: Conv,
    pub(crate) norm2: nn::LayerNorm,
}

impl ReduceSize {
    fn new(p: nn::Path, dim: i64, keep_dim: bool) -> Self {
        let out = if keep_dim { dim } else { 2 * dim };
        Self {
            norm1: layer_norm(&p / "norm1", dim),
            branch: ConvBranch::new(p.clone(), dim),
            reduction: Conv::new(&p / "reduction", dim, out, 3, 2, 1, 1, false),
            norm2: layer_norm(&p / "norm2", out),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.norm1.forward(x).permute([0, 3, 1, 2]);
        let x = self.reduction.forward(&self.branch.residual(&x));
        self.norm2.forward(&x.permute([0, 2, 3, 1]))
    }
}

/// `GlobalQueryGen`: `FeatExtract` blocks (residual conv branch, then a 3×3 stride-2 max pool
/// unless the block keeps the size) down to about the window, a bicubic resize to exactly the
/// window, split into heads: `[B, 1, heads, window², head_dim]`.
#[derive(Debug)]
pub(crate) struct GlobalQueryGen {
    pub(crate) blocks: Vec<(ConvBranch, bool)>,
    pub(crate) window: i64,
    pub(crate) heads: i64,
}

impl GlobalQueryGen {
    fn new(p: nn::Path, dim: i64, level: usize, window: i64, heads: i64) -> Self {
        let input = DESIGN_RESOLUTION >> (2 + level);
        // TAO's table: 3 pooling blocks at 1/4 of the design size, 2 at 1/8, one at 1/16 (it
        // keeps the size when the window already covers the map), one that keeps it at 1/32.
        let pools: Vec<bool> = match level {
            0 => vec![true; 3],
            1 => vec![true; 2],
            2 => vec![window != input],
            _ => vec![false],
        };
        let q = &p / "to_q_global";
        let blocks = pools
            .into_iter()
            .enumerate()
            .map(|(k, pool)| (ConvBranch::new(&q / k as i64, dim), pool))
            .collect();
        Self {
            blocks,
            window,
            heads,
        }
    }

    /// From the level's NCHW input.
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.shallow_clone();
        for (branch, pool) in &self.blocks {
            x = branch.residual(&x);
            if *pool {
                x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
            }
        }
        let (b, c, h, w) = x.size4().expect("NCHW");
        if h != self.window || w != self.window {
            x = x.upsample_bicubic2d([self.window, self.window], false, None, None);
        }
        x.permute([0, 2, 3, 1])
            .reshape([b, 1, self.window * self.window, self.heads, c / self.heads])
            .permute([0, 1, 3, 2, 4])
    }
}

/// The pairwise relative-position index of a `w × w` window (Swin's), `[w², w²]`.
fn relative_position_index(w: i64) -> Tensor {
    let n = (w * w) as usize;
    let mut idx = Vec::with_capacity(n * n);
    for a in 0..w * w {
        for b in 0..w * w {
            let dy = a / w - b / w + w - 1;
            let dx = a % w - b % w + w - 1;
            idx.push(dy * (2 * w - 1) + dx);
        }
    }
    Tensor::from_slice(&idx)
}

/// `WindowAttention` (keys, values and queries from the window) or `WindowAttentionGlobal`
/// (queries from the level's global query), with the relative-position bias.
#[derive(Debug)]
pub(crate) struct WindowAttention {
    pub(crate) qkv: nn::Linear,
    pub(crate) proj: nn::Linear,
    pub(crate) table: Tensor,
    pub(crate) index: Tensor,
    pub(crate) heads: i64,
    pub(crate) global: bool,
}

impl WindowAttention {
    fn new(p: nn::Path, dim: i64, heads: i64, window: i64, global: bool) -> Self {
        let span = 2 * window - 1;
        Self {
            qkv: linear(&p / "qkv", dim, dim * if global { 2 } else { 3 }, true),
            proj: linear(&p / "proj", dim, dim, true),
            table: p.var(
                "relative_position_bias_table",
                &[span * span, heads],
                Init::Const(0.0),
            ),
            index: relative_position_index(window).to_device(p.device()),
            heads,
            global,
        }
    }

    /// The relative-position bias `[heads, N, N]` (`N` = window²).
    pub(crate) fn bias(&self) -> Tensor {
        let n = self.index.size()[0];
        let n = (n as f64).sqrt() as i64;
        self.table
            .index_select(0, &self.index)
            .view([n, n, self.heads])
            .permute([2, 0, 1])
    }

    /// `x` `[B·nW, N, C]`; `q_global` `[B, 1, heads, N, head_dim]`.
    fn forward(&self, x: &Tensor, q_global: &Tensor) -> Tensor {
        let (bw, n, c) = x.size3().expect("[B_, N, C]");
        let hd = c / self.heads;
        let parts = if self.global { 2 } else { 3 };
        let qkv = self
            .qkv
            .forward(x)
            .view([bw, n, parts, self.heads, hd])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = if self.global {
            let b = q_global.size()[0];
            let q = q_global
                .expand([b, bw / b, self.heads, n, hd], false)
                .reshape([bw, self.heads, n, hd]);
            (q, qkv.get(0), qkv.get(1))
        } else {
            (qkv.get(0), qkv.get(1), qkv.get(2))
        };
        let bias = self.bias();
        let attn = (q * (hd as f64).powf(-0.5)).matmul(&k.transpose(-2, -1)) + bias.unsqueeze(0);
        let out = attn
            .softmax(-1, attn.kind())
            .matmul(&v)
            .transpose(1, 2)
            .reshape([bw, n, c]);
        self.proj.forward(&out)
    }
}

/// `GCViTBlock`: windowed (global-query on odd blocks) attention and an MLP, pre-norm, with
/// layer scale and stochastic depth; NHWC.
#[derive(Debug)]
pub(crate) struct Block {
    pub(crate) norm1: nn::LayerNorm,
    pub(crate) attn: WindowAttention,
    pub(crate) norm2: nn::LayerNorm,
    pub(crate) fc1: nn::Linear,
    pub(crate) fc2: nn::Linear,
    pub(crate) gammas: Option<(Tensor, Tensor)>,
    pub(crate) window: i64,
    pub(crate) drop_path: f64,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn new(
        p: nn::Path,
        dim: i64,
        heads: i64,
        window: i64,
        c: &GcVitConfig,
        global: bool,
        drop_path: f64,
    ) -> Self {
        let hidden = (dim as f64 * c.mlp_ratio) as i64;
        let gammas = c.layer_scale.map(|s| {
            (
                p.var("gamma1", &[dim], Init::Const(s)),
                p.var("gamma2", &[dim], Init::Const(s)),
            )
        });
        Self {
            norm1: layer_norm(&p / "norm1", dim),
            attn: WindowAttention::new(&p / "attn", dim, heads, window, global),
            norm2: layer_norm(&p / "norm2", dim),
            fc1: linear(&p / "mlp" / "fc1", dim, hidden, true),
            fc2: linear(&p / "mlp" / "fc2", hidden, dim, true),
            gammas,
            window,
            drop_path,
        }
    }

    fn forward(&self, x: &Tensor, q_global: &Tensor, train: bool) -> Tensor {
        let (b, h, w, c) = x.size4().expect("NHWC");
        let ws = self.window;
        let (pad_b, pad_r) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
        let y = self.norm1.forward(x);
        let y = if pad_b > 0 || pad_r > 0 {
            y.constant_pad_nd([0, 0, 0, pad_r, 0, pad_b])
        } else {
            y
        };
        let (hp, wp) = (h + pad_b, w + pad_r);
        let windows = y
            .view([b, hp / ws, ws, wp / ws, ws, c])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([-1, ws * ws, c]);
        let y = self
            .attn
            .forward(&windows, q_global)
            .view([b, hp / ws, wp / ws, ws, ws, c])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([b, hp, wp, c]);
        let y = if pad_b > 0 || pad_r > 0 {
            y.narrow(1, 0, h).narrow(2, 0, w)
        } else {
            y
        };
        let scale = |t: Tensor, g: Option<&Tensor>| match g {
            Some(g) => t * g,
            None => t,
        };
        let (g1, g2) = match &self.gammas {
            Some((a, b)) => (Some(a), Some(b)),
            None => (None, None),
        };
        let x = x + drop_path(&scale(y, g1), self.drop_path, train);
        let m = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&x)).gelu("none"));
        &x + drop_path(&scale(m, g2), self.drop_path, train)
    }
}

/// `GCViTLayer`: the global query from the level's input, the blocks, then (levels 0–2) the
/// downsampling to the next level.
#[derive(Debug)]
pub(crate) struct Level {
    pub(crate) q_global_gen: GlobalQueryGen,
    pub(crate) blocks: Vec<Block>,
    pub(crate) downsample: Option<ReduceSize>,
}

/// The GCViT trunk (`backbone.0.body`).
#[derive(Debug)]
pub struct GcVit {
    pub config: GcVitConfig,
    pub(crate) patch_embed_proj: Conv,
    pub(crate) patch_embed_down: ReduceSize,
    pub(crate) levels: Vec<Level>,
    /// `norm{i}` of each returned level, by level.
    pub(crate) norms: Vec<Option<nn::LayerNorm>>,
}

impl GcVit {
    /// `p` is the `backbone.0.body` path; `stages` the levels returned (TAO's `out_indices`).
    pub fn new(p: &nn::Path, config: GcVitConfig, stages: &[usize]) -> Self {
        let c = config;
        let dim = c.dim;
        let total: usize = c.depths.iter().sum();
        let rate = |i: usize| {
            if total > 1 {
                c.drop_path_rate * i as f64 / (total - 1) as f64
            } else {
                0.0
            }
        };
        let pe = p / "patch_embed";
        let patch_embed_proj = Conv::new(&pe / "proj", 3, dim, 3, 2, 1, 1, true);
        let patch_embed_down = ReduceSize::new(&pe / "conv_down", dim, true);
        let mut first = 0;
        let levels = (0..4)
            .map(|i| {
                let lp = p / "levels" / i as i64;
                let d = c.channels(i);
                let blocks = (0..c.depths[i])
                    .map(|j| {
                        Block::new(
                            &lp / "blocks" / j as i64,
                            d,
                            c.num_heads[i],
                            c.window[i],
                            &c,
                            j % 2 == 1,
                            rate(first + j),
                        )
                    })
                    .collect();
                first += c.depths[i];
                Level {
                    q_global_gen: GlobalQueryGen::new(
                        &lp / "q_global_gen",
                        d,
                        i,
                        c.window[i],
                        c.num_heads[i],
                    ),
                    blocks,
                    downsample: (i < 3).then(|| ReduceSize::new(&lp / "downsample", d, false)),
                }
            })
            .collect();
        let norms = (0..4)
            .map(|i| {
                stages
                    .contains(&i)
                    .then(|| layer_norm(p / format!("norm{i}"), c.channels(i)))
            })
            .collect();
        Self {
            config,
            patch_embed_proj,
            patch_embed_down,
            levels,
            norms,
        }
    }

    /// The last level any output needs.
    pub fn last_level(&self) -> usize {
        self.norms.iter().rposition(Option::is_some).unwrap_or(0)
    }

    /// Every level's normalised output up to the last returned one, NCHW (None for levels
    /// not returned).
    pub fn forward(&self, images: &Tensor, train: bool) -> Vec<Option<Tensor>> {
        let last = self.last_level();
        self.levels_up_to(images, last, train)
            .iter()
            .enumerate()
            .map(|(i, x)| self.output(i, x))
            .collect()
    }

    /// The outputs of levels `0..=last` before their `norm{i}` (and before the downsampling to
    /// the next level), NHWC.
    pub fn levels_up_to(&self, images: &Tensor, last: usize, train: bool) -> Vec<Tensor> {
        let mut x = self.stem(images);
        let mut outs = Vec::with_capacity(last + 1);
        for i in 0..=last {
            let (out, next) = self.level(i, &x, train, i < last);
            outs.push(out);
            if let Some(next) = next {
                x = next;
            }
        }
        outs
    }

    /// The patch embedding: level 0's input, NHWC.
    pub fn stem(&self, images: &Tensor) -> Tensor {
        let x = self.patch_embed_proj.forward(images).permute([0, 2, 3, 1]);
        self.patch_embed_down.forward(&x)
    }

    /// Level `i` on its NHWC input: its output before `norm{i}` and, with `next`, the
    /// downsampled input of level `i + 1`.
    pub fn level(&self, i: usize, x: &Tensor, train: bool, next: bool) -> (Tensor, Option<Tensor>) {
        let level = &self.levels[i];
        let q = level.q_global_gen.forward(&x.permute([0, 3, 1, 2]));
        let mut x = x.shallow_clone();
        for block in &level.blocks {
            x = block.forward(&x, &q, train);
        }
        let down = next.then(|| {
            level
                .downsample
                .as_ref()
                .expect("levels 0-2 downsample")
                .forward(&x)
        });
        (x, down)
    }

    /// Level `i`'s returned feature map (`norm{i}` of its output, NCHW); None when the level
    /// is not returned.
    pub fn output(&self, i: usize, raw: &Tensor) -> Option<Tensor> {
        self.norms[i]
            .as_ref()
            .map(|n| n.forward(raw).permute([0, 3, 1, 2]).contiguous())
    }
}

/// TAO's name of a timm GCViT key (`timm/models/gcvit.py`), relative to the trunk; None for keys
/// TAO has no tensor for (timm's classifier `head.*`, the `relative_position_index` buffers).
/// The squeeze-excitation weights are 1×1 convolutions in timm and linear layers in TAO: the
/// loader reshapes them.
///
/// | timm | TAO |
/// |---|---|
/// | `stem.conv1`, `stem.down` | `patch_embed.proj`, `patch_embed.conv_down` |
/// | `stages.{i}.downsample` (i ≥ 1) | `levels.{i−1}.downsample` |
/// | `stages.{i}.global_block.blocks.conv{k}` | `levels.{i}.q_global_gen.to_q_global.{k−1}` |
/// | `stages.{i}.blocks.{j}` | `levels.{i}.blocks.{j}` |
/// | `…conv_block.conv_dw`, `se.fc1`, `se.fc2`, `conv_pw` | `…conv.0`, `conv.2.fc.0`, `conv.2.fc.2`, `conv.3` |
/// | `attn.rel_pos.relative_position_bias_table` | `attn.relative_position_bias_table` |
/// | `ls1.gamma`, `ls2.gamma` | `gamma1`, `gamma2` |
/// | `stages.3.norm` | `norm3` |
pub fn timm_to_tao(key: &str) -> Option<String> {
    if key.starts_with("head.") || key.ends_with("relative_position_index") {
        return None;
    }
    let mut k = key
        .replacen("stem.conv1.", "patch_embed.proj.", 1)
        .replacen("stem.down.", "patch_embed.conv_down.", 1);
    let parts: Vec<&str> = k.splitn(4, '.').collect();
    if parts.len() == 4 && parts[0] == "stages" {
        let i: usize = parts[1].parse().ok()?;
        let rest = format!("{}.{}", parts[2], parts[3]);
        k = if let Some(r) = rest.strip_prefix("downsample.") {
            format!("levels.{}.downsample.{r}", i.checked_sub(1)?)
        } else if let Some(r) = rest.strip_prefix("global_block.blocks.conv") {
            let (n, r) = r.split_once('.')?;
            let n: usize = n.parse().ok()?;
            format!(
                "levels.{i}.q_global_gen.to_q_global.{}.{r}",
                n.checked_sub(1)?
            )
        } else if let Some(r) = rest.strip_prefix("norm.") {
            format!("norm{i}.{r}")
        } else {
            format!("levels.{i}.{rest}")
        };
    }
    for (a, b) in [
        ("conv_block.", ""),
        ("conv_dw.", "conv.0."),
        ("se.fc1.", "conv.2.fc.0."),
        ("se.fc2.", "conv.2.fc.2."),
        ("conv_pw.", "conv.3."),
        ("attn.rel_pos.", "attn."),
        ("ls1.gamma", "gamma1"),
        ("ls2.gamma", "gamma2"),
    ] {
        k = k.replace(a, b);
    }
    Some(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    #[test]
    fn timm_keys_map_to_tao_keys() {
        let cases = [
            ("stem.conv1.bias", Some("patch_embed.proj.bias")),
            (
                "stem.down.conv_block.se.fc1.weight",
                Some("patch_embed.conv_down.conv.2.fc.0.weight"),
            ),
            (
                "stages.2.downsample.reduction.weight",
                Some("levels.1.downsample.reduction.weight"),
            ),
            (
                "stages.0.global_block.blocks.conv3.conv_pw.weight",
                Some("levels.0.q_global_gen.to_q_global.2.conv.3.weight"),
            ),
            (
                "stages.1.blocks.3.attn.rel_pos.relative_position_bias_table",
                Some("levels.1.blocks.3.attn.relative_position_bias_table"),
            ),
            (
                "stages.2.blocks.0.ls2.gamma",
                Some("levels.2.blocks.0.gamma2"),
            ),
            ("stages.3.norm.weight", Some("norm3.weight")),
            (
                "stages.0.blocks.0.attn.rel_pos.relative_position_index",
                None,
            ),
            ("head.fc.weight", None),
        ];
        for (timm, tao) in cases {
            assert_eq!(timm_to_tao(timm).as_deref(), tao, "{timm}");
        }
    }

    #[test]
    fn variables_carry_tao_names_and_counts() {
        let vs = VarStore::new(Device::Cpu);
        let c = GcVitConfig::of(BackboneKind::GcVitXxtiny).unwrap();
        let _ = GcVit::new(&vs.root(), c, &[1, 2, 3]);
        let vars = vs.variables();
        for k in [
            "patch_embed.proj.weight",
            "patch_embed.conv_down.conv.2.fc.0.weight",
            "levels.0.q_global_gen.to_q_global.2.conv.0.weight",
            "levels.3.q_global_gen.to_q_global.0.conv.3.weight",
            "levels.1.blocks.1.attn.qkv.weight",
            "levels.2.downsample.norm2.bias",
            "norm1.weight",
            "norm3.bias",
        ] {
            assert!(vars.contains_key(k), "{k} missing");
        }
        assert!(!vars.contains_key("norm0.weight"));
        assert!(!vars.contains_key("levels.3.downsample.norm1.weight"));
        // A global block's qkv holds keys and values only.
        assert_eq!(vars["levels.1.blocks.1.attn.qkv.weight"].size(), [256, 128]);
        assert_eq!(vars["levels.1.blocks.0.attn.qkv.weight"].size(), [384, 128]);
    }

    #[test]
    fn any_input_size_runs_and_batch_elements_are_independent() {
        let _rng = crate::torch_rng_lock();
        tch::manual_seed(5);
        let vs = VarStore::new(Device::Cpu);
        let c = GcVitConfig::of(BackboneKind::GcVitXxtiny).unwrap();
        let net = GcVit::new(&vs.root(), c, &[1, 2, 3]);
        let x = Tensor::randn([2, 3, 90, 130], (Kind::Float, Device::Cpu));
        let outs = tch::no_grad(|| net.forward(&x, false));
        let sizes: Vec<Vec<i64>> = outs.iter().flatten().map(Tensor::size).collect();
        assert_eq!(
            sizes,
            [vec![2, 128, 12, 17], vec![2, 256, 6, 9], vec![2, 512, 3, 5]]
        );
        let one = tch::no_grad(|| net.forward(&x.narrow(0, 1, 1), false));
        let a = outs[3].as_ref().unwrap().narrow(0, 1, 1);
        let b = one[3].as_ref().unwrap();
        assert!(a.allclose(b, 1e-5, 1e-5, false));
    }
}
