//! The ResNet backbone in torchvision's layout with `FrozenBatchNorm2d` — upstream
//! `models/backbone.py` (`FrozenBatchNorm2d`, `BackboneBase`, `Backbone`) over torchvision's
//! `resnet.py`. Paths are `backbone.0.body.{conv1,bn1,layer1..layer4}.*` as in the official
//! checkpoints; the stem and `layer1` never train (upstream freezes every parameter whose name lacks
//! `layer2`/`layer3`/`layer4`), and with `train_backbone = false` nothing does.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::spec::Backbone as BackboneKind;

/// `FrozenBatchNorm2d`'s epsilon (upstream hard-codes 1e-5).
pub const FROZEN_BN_EPS: f64 = 1e-5;
/// Index in `return_interm_indices` that means "an extra stride-2 conv level on the last stage".
pub const EXTRA_LEVEL_INDEX: u32 = 4;
/// Channels of the stem (`conv1`).
const STEM_CHANNELS: i64 = 64;

/// BatchNorm2d with fixed statistics and affine parameters, all buffers (never trained).
#[derive(Debug)]
pub struct FrozenBatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

impl FrozenBatchNorm2d {
    pub fn new(p: nn::Path, channels: i64) -> Self {
        Self {
            weight: p.ones_no_train("weight", &[channels]),
            bias: p.zeros_no_train("bias", &[channels]),
            running_mean: p.zeros_no_train("running_mean", &[channels]),
            running_var: p.ones_no_train("running_var", &[channels]),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let scale = &self.weight * (&self.running_var + FROZEN_BN_EPS).rsqrt();
        let bias = &self.bias - &self.running_mean * &scale;
        let kind = x.kind();
        x * scale.view([1, -1, 1, 1]).to_kind(kind) + bias.view([1, -1, 1, 1]).to_kind(kind)
    }
}

/// A bias-free convolution (torchvision's `conv1x1`/`conv3x3`), kaiming-normal (fan_out, relu)
/// initialised as torchvision's ResNet does.
#[derive(Debug)]
pub(crate) struct Conv {
    pub(crate) weight: Tensor,
    pub(crate) stride: i64,
    pub(crate) padding: i64,
    pub(crate) dilation: i64,
}

impl Conv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        p: &nn::Path,
        name: &str,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        padding: i64,
        dilation: i64,
        trainable: bool,
    ) -> Self {
        let fan_out = cout * k * k;
        let init = Init::Randn {
            mean: 0.0,
            stdev: (2.0 / fan_out as f64).sqrt(),
        };
        let sub = p / name;
        // A frozen weight is still a named variable (saved and loaded) but never optimised.
        let weight = sub.add(
            "weight",
            nn::init::init(init, &[cout, cin, k, k], sub.device()),
            trainable,
        );
        Self {
            weight,
            stride,
            padding,
            dilation,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            None::<Tensor>,
            [self.stride],
            [self.padding],
            [self.dilation],
            1,
        )
    }
}

#[derive(Debug)]
pub(crate) struct Downsample {
    pub(crate) conv: Conv,
    pub(crate) bn: FrozenBatchNorm2d,
}

/// torchvision's `BasicBlock` (ResNet-18/34) or `Bottleneck` (ResNet-50, v1.5: stride on the 3×3).
#[derive(Debug)]
pub(crate) struct Block {
    pub(crate) convs: Vec<Conv>,
    pub(crate) bns: Vec<FrozenBatchNorm2d>,
    pub(crate) downsample: Option<Downsample>,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut out = x.shallow_clone();
        let n = self.convs.len();
        for (i, (conv, bn)) in self.convs.iter().zip(&self.bns).enumerate() {
            out = bn.forward(&conv.forward(&out));
            if i + 1 < n {
                out = out.relu();
            }
        }
        let identity = match &self.downsample {
            Some(d) => d.bn.forward(&d.conv.forward(x)),
            None => x.shallow_clone(),
        };
        (out + identity).relu()
    }
}

/// The ResNet trunk (`backbone.0.body`), truncated after the last stage anything uses, as
/// torchvision's `IntermediateLayerGetter` does.
#[derive(Debug)]
pub struct ResNetBody {
    pub(crate) conv1: Conv,
    pub(crate) bn1: FrozenBatchNorm2d,
    pub(crate) layers: Vec<Vec<Block>>,
}

/// (blocks per stage, bottleneck?) for each supported depth.
fn layout(kind: BackboneKind) -> ([i64; 4], bool) {
    match kind {
        BackboneKind::Resnet18 => ([2, 2, 2, 2], false),
        BackboneKind::Resnet34 => ([3, 4, 6, 3], false),
        BackboneKind::Resnet50 => ([3, 4, 6, 3], true),
    }
}

/// Output channels of ResNet stage `layer{i+1}`.
pub fn stage_channels(kind: BackboneKind, stage: usize) -> i64 {
    let (_, bottleneck) = layout(kind);
    let base = 64i64 << stage;
    if bottleneck {
        base * 4
    } else {
        base
    }
}

impl ResNetBody {
    /// `num_stages` stages (1..=4); `train_backbone` makes layer2..layer4 trainable; `dilation`
    /// replaces layer4's stride with dilation 2 (DC5, bottleneck ResNets only).
    pub fn new(
        p: &nn::Path,
        kind: BackboneKind,
        num_stages: usize,
        train_backbone: bool,
        dilation: bool,
    ) -> Self {
        let (blocks, bottleneck) = layout(kind);
        let expansion = if bottleneck { 4 } else { 1 };
        let conv1 = Conv::new(p, "conv1", 3, STEM_CHANNELS, 7, 2, 3, 1, false);
        let bn1 = FrozenBatchNorm2d::new(p / "bn1", STEM_CHANNELS);
        let mut inplanes = STEM_CHANNELS;
        let mut cur_dilation = 1;
        let mut layers = Vec::new();
        for (stage, &stage_blocks_n) in blocks.iter().enumerate().take(num_stages) {
            let lp = p / format!("layer{}", stage + 1);
            let trainable = train_backbone && stage > 0;
            let planes = 64i64 << stage;
            let mut stride = if stage == 0 { 1 } else { 2 };
            let previous_dilation = cur_dilation;
            if dilation && stage == 3 {
                cur_dilation *= stride;
                stride = 1;
            }
            let mut stage_blocks = Vec::new();
            for b in 0..stage_blocks_n {
                let bp = &lp / b;
                let (s, d) = if b == 0 {
                    (stride, previous_dilation)
                } else {
                    (1, cur_dilation)
                };
                let downsample =
                    (b == 0 && (stride != 1 || inplanes != planes * expansion)).then(|| {
                        Downsample {
                            conv: Conv::new(
                                &(&bp / "downsample"),
                                "0",
                                inplanes,
                                planes * expansion,
                                1,
                                stride,
                                0,
                                1,
                                trainable,
                            ),
                            bn: FrozenBatchNorm2d::new(
                                &bp / "downsample" / "1",
                                planes * expansion,
                            ),
                        }
                    });
                let (convs, bns) = if bottleneck {
                    (
                        vec![
                            Conv::new(&bp, "conv1", inplanes, planes, 1, 1, 0, 1, trainable),
                            Conv::new(&bp, "conv2", planes, planes, 3, s, d, d, trainable),
                            Conv::new(&bp, "conv3", planes, planes * 4, 1, 1, 0, 1, trainable),
                        ],
                        vec![
                            FrozenBatchNorm2d::new(&bp / "bn1", planes),
                            FrozenBatchNorm2d::new(&bp / "bn2", planes),
                            FrozenBatchNorm2d::new(&bp / "bn3", planes * 4),
                        ],
                    )
                } else {
                    (
                        vec![
                            Conv::new(&bp, "conv1", inplanes, planes, 3, s, 1, 1, trainable),
                            Conv::new(&bp, "conv2", planes, planes, 3, 1, 1, 1, trainable),
                        ],
                        vec![
                            FrozenBatchNorm2d::new(&bp / "bn1", planes),
                            FrozenBatchNorm2d::new(&bp / "bn2", planes),
                        ],
                    )
                };
                inplanes = planes * expansion;
                stage_blocks.push(Block {
                    convs,
                    bns,
                    downsample,
                });
            }
            layers.push(stage_blocks);
        }
        Self { conv1, bn1, layers }
    }

    /// Runs the trunk and returns the output of every stage (`layer1`..).
    pub fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        let mut x = self.bn1.forward(&self.conv1.forward(x)).relu().max_pool2d(
            [3, 3],
            [2, 2],
            [1, 1],
            [1, 1],
            false,
        );
        let mut outs = Vec::with_capacity(self.layers.len());
        for stage in &self.layers {
            for block in stage {
                x = block.forward(&x);
            }
            outs.push(x.shallow_clone());
        }
        outs
    }
}

/// `backbone.0`: the trunk plus which stages feed the transformer.
#[derive(Debug)]
pub struct Backbone {
    pub body: ResNetBody,
    /// Stage indices (0 = layer1) returned to the transformer, in order.
    pub return_stages: Vec<usize>,
    /// Channels of each returned stage.
    pub num_channels: Vec<i64>,
    /// Stride of each returned stage.
    pub strides: Vec<i64>,
}

impl Backbone {
    /// `p` is the `backbone.0` path. `stages` are the backbone entries of `return_interm_indices`
    /// (those below [`EXTRA_LEVEL_INDEX`]).
    pub fn new(
        p: &nn::Path,
        kind: BackboneKind,
        stages: &[usize],
        train_backbone: bool,
        dilation: bool,
    ) -> Self {
        let num_stages = stages.iter().max().map_or(0, |m| m + 1);
        let body = ResNetBody::new(&(p / "body"), kind, num_stages, train_backbone, dilation);
        let num_channels = stages.iter().map(|&s| stage_channels(kind, s)).collect();
        let strides = stages
            .iter()
            .map(|&s| {
                let stride = 4i64 << s;
                if dilation && s == 3 {
                    stride / 2
                } else {
                    stride
                }
            })
            .collect();
        Self {
            body,
            return_stages: stages.to_vec(),
            num_channels,
            strides,
        }
    }

    /// Feature maps of the returned stages and their padding masks (true = padding), the masks
    /// nearest-resized from the pixel mask as upstream's `F.interpolate(m[None].float(), size)`.
    pub fn forward(&self, images: &Tensor, pixel_mask: &Tensor) -> Vec<(Tensor, Tensor)> {
        let outs = self.body.forward(images);
        self.return_stages
            .iter()
            .map(|&s| {
                let feat = outs[s].shallow_clone();
                let mask = resize_mask(pixel_mask, feat.size()[2], feat.size()[3]);
                (feat, mask)
            })
            .collect()
    }
}

/// Nearest-neighbour resize of a `[B, H, W]` bool mask to `[B, h, w]`.
pub fn resize_mask(mask: &Tensor, h: i64, w: i64) -> Tensor {
    mask.unsqueeze(0)
        .to_kind(Kind::Float)
        .upsample_nearest2d([h, w], None, None)
        .to_kind(Kind::Bool)
        .squeeze_dim(0)
}
