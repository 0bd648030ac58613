//! The backbone: a ResNet, a GCViT (`super::gcvit`) or a FAN (`super::fan`). The ResNet is in
//! torchvision's layout with `FrozenBatchNorm2d` — upstream `models/backbone.py`
//! (`FrozenBatchNorm2d`, `BackboneBase`, `Backbone`) over torchvision's `resnet.py`. Paths are
//! `backbone.0.body.{conv1,bn1,layer1..layer4}.*` as in the official checkpoints; the stem and
//! `layer1` never train (upstream freezes every parameter whose name lacks
//! `layer2`/`layer3`/`layer4`), and with `train_backbone = false` nothing does.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::fan::{Fan, FanConfig, Pass};
use super::gcvit::{GcVit, GcVitConfig};
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
        Self::with_weight(p, channels, true)
    }

    /// `weight` starts at one, or at zero for the last norm of a residual block (timm's
    /// `zero_init_last`, see [`ResNetBody::new`]).
    fn with_weight(p: nn::Path, channels: i64, ones: bool) -> Self {
        Self {
            weight: if ones {
                p.ones_no_train("weight", &[channels])
            } else {
                p.zeros_no_train("weight", &[channels])
            },
            bias: p.zeros_no_train("bias", &[channels]),
            running_mean: p.zeros_no_train("running_mean", &[channels]),
            running_var: p.ones_no_train("running_var", &[channels]),
        }
    }

    /// Whether the output is zero whatever the input (weight and bias all zero): a residual
    /// branch ending in such a norm adds nothing, forward or backward.
    pub fn is_zero(&self) -> bool {
        let max_abs = |t: &Tensor| t.abs().max().double_value(&[]);
        self.weight.numel() > 0 && max_abs(&self.weight) == 0.0 && max_abs(&self.bias) == 0.0
    }

    /// The per-channel `(scale, shift)` the norm applies: `x · scale + shift`.
    fn affine(&self) -> (Tensor, Tensor) {
        let scale = &self.weight * (&self.running_var + FROZEN_BN_EPS).rsqrt();
        let shift = &self.bias - &self.running_mean * &scale;
        (scale, shift)
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (scale, shift) = self.affine();
        let kind = x.kind();
        x * scale.view([1, -1, 1, 1]).to_kind(kind) + shift.view([1, -1, 1, 1]).to_kind(kind)
    }

    /// `self.forward(conv.forward(x))` with the norm folded into the convolution: weight ·
    /// scale per output channel and the shift as its bias. Equal up to float rounding, and the
    /// activation-sized multiply and add (and the multiply's backward) disappear — ~50 of them
    /// per ResNet-50 pass. The weight's gradient flows through the fold. Under autocast the norm
    /// stays after the convolution, as upstream computes it.
    pub(crate) fn after(&self, conv: &Conv, x: &Tensor) -> Tensor {
        if crate::amp::autocast_enabled(x.device()) {
            // Folded, the bf16 gradients measured ~2× further from f32's (trainer/tests/amp.rs).
            return self.forward(&conv.forward(x));
        }
        let (scale, shift) = self.affine();
        let weight = &conv.weight * scale.view([-1, 1, 1, 1]);
        x.conv2d(
            &weight,
            Some(shift),
            [conv.stride],
            [conv.padding],
            [conv.dilation],
            1,
        )
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
    /// Built from scratch (zero last norm): check the norm and skip the branch while it is
    /// zero. Off otherwise, so pretrained models pay no check (a device sync on a GPU).
    pub(crate) skip_if_zero: bool,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        let identity = match &self.downsample {
            Some(d) => d.bn.after(&d.conv, x),
            None => x.shallow_clone(),
        };
        // A frozen all-zero last norm (a from-scratch backbone's zero-initialised residual
        // branch) contributes exactly zero and gets zero gradients: skip its convolutions.
        if self.skip_if_zero && self.bns.last().is_some_and(FrozenBatchNorm2d::is_zero) {
            return identity.relu();
        }
        let mut out = x.shallow_clone();
        let n = self.convs.len();
        for (i, (conv, bn)) in self.convs.iter().zip(&self.bns).enumerate() {
            out = bn.after(conv, &out);
            if i + 1 < n {
                out = out.relu();
            }
        }
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
        gcvit => unreachable!("{} is not a ResNet", gcvit.name()),
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
    /// replaces layer4's stride with dilation 2 (DC5, bottleneck ResNets only);
    /// `from_scratch` (`model.backbone_from_scratch`) starts each block's last norm at zero
    /// (timm's `zero_init_last`) and freezes the block's own convs, which can then never change
    /// the output, and trains the stem and layer1 (upstream freezes them because they come
    /// pretrained; random, they would be fixed noise filters).
    pub fn new(
        p: &nn::Path,
        kind: BackboneKind,
        num_stages: usize,
        train_backbone: bool,
        dilation: bool,
        from_scratch: bool,
    ) -> Self {
        let (blocks, bottleneck) = layout(kind);
        let zero_last = from_scratch;
        let expansion = if bottleneck { 4 } else { 1 };
        let stem_trainable = train_backbone && from_scratch;
        let conv1 = Conv::new(p, "conv1", 3, STEM_CHANNELS, 7, 2, 3, 1, stem_trainable);
        let bn1 = FrozenBatchNorm2d::new(p / "bn1", STEM_CHANNELS);
        let mut inplanes = STEM_CHANNELS;
        let mut cur_dilation = 1;
        let mut layers = Vec::new();
        for (stage, &stage_blocks_n) in blocks.iter().enumerate().take(num_stages) {
            let lp = p / format!("layer{}", stage + 1);
            let trainable = train_backbone && (stage > 0 || from_scratch);
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
                // A branch whose last norm is frozen at zero never learns: freeze its convs too.
                let branch_trainable = trainable && !zero_last;
                let (convs, bns) = if bottleneck {
                    (
                        vec![
                            Conv::new(&bp, "conv1", inplanes, planes, 1, 1, 0, 1, branch_trainable),
                            Conv::new(&bp, "conv2", planes, planes, 3, s, d, d, branch_trainable),
                            Conv::new(
                                &bp,
                                "conv3",
                                planes,
                                planes * 4,
                                1,
                                1,
                                0,
                                1,
                                branch_trainable,
                            ),
                        ],
                        vec![
                            FrozenBatchNorm2d::new(&bp / "bn1", planes),
                            FrozenBatchNorm2d::new(&bp / "bn2", planes),
                            FrozenBatchNorm2d::with_weight(&bp / "bn3", planes * 4, !zero_last),
                        ],
                    )
                } else {
                    (
                        vec![
                            Conv::new(&bp, "conv1", inplanes, planes, 3, s, 1, 1, branch_trainable),
                            Conv::new(&bp, "conv2", planes, planes, 3, 1, 1, 1, branch_trainable),
                        ],
                        vec![
                            FrozenBatchNorm2d::new(&bp / "bn1", planes),
                            FrozenBatchNorm2d::with_weight(&bp / "bn2", planes, !zero_last),
                        ],
                    )
                };
                inplanes = planes * expansion;
                stage_blocks.push(Block {
                    convs,
                    bns,
                    downsample,
                    skip_if_zero: zero_last,
                });
            }
            layers.push(stage_blocks);
        }
        Self { conv1, bn1, layers }
    }

    /// Runs the trunk and returns the output of every stage (`layer1`..).
    pub fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        let mut x =
            self.bn1
                .after(&self.conv1, x)
                .relu()
                .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
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

/// The trunk (`backbone.0.body`).
#[derive(Debug)]
pub enum Body {
    ResNet(ResNetBody),
    GcVit(GcVit),
    Fan(Fan),
}

/// `backbone.0`: the trunk plus which stages feed the transformer.
#[derive(Debug)]
pub struct Backbone {
    pub body: Body,
    /// Stage indices (0 = layer1) returned to the transformer, in order.
    pub return_stages: Vec<usize>,
    /// Channels of each returned stage.
    pub num_channels: Vec<i64>,
    /// Stride of each returned stage.
    pub strides: Vec<i64>,
}

impl Backbone {
    /// `p` is the `backbone.0` path. `stages` are the backbone entries of `return_interm_indices`
    /// (those below [`EXTRA_LEVEL_INDEX`]); `drop_path_rate` is a GCViT's stochastic depth.
    pub fn new(
        p: &nn::Path,
        kind: BackboneKind,
        stages: &[usize],
        train_backbone: bool,
        dilation: bool,
        from_scratch: bool,
        drop_path_rate: f64,
    ) -> Self {
        if let Some(mut config) = GcVitConfig::of(kind) {
            config.drop_path_rate = drop_path_rate;
            return Self {
                body: Body::GcVit(GcVit::new(&(p / "body"), config, stages)),
                return_stages: stages.to_vec(),
                num_channels: stages.iter().map(|&s| config.channels(s)).collect(),
                strides: stages.iter().map(|&s| 4i64 << s).collect(),
            };
        }
        if let Some(mut config) = FanConfig::of(kind) {
            config.drop_path_rate = drop_path_rate;
            return Self {
                body: Body::Fan(Fan::new(&(p / "body"), config, stages)),
                return_stages: stages.to_vec(),
                num_channels: stages.iter().map(|&s| config.channels(s)).collect(),
                strides: stages.iter().map(|&s| 4i64 << s).collect(),
            };
        }
        let num_stages = stages.iter().max().map_or(0, |m| m + 1);
        let body = ResNetBody::new(
            &(p / "body"),
            kind,
            num_stages,
            train_backbone,
            dilation,
            from_scratch,
        );
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
            body: Body::ResNet(body),
            return_stages: stages.to_vec(),
            num_channels,
            strides,
        }
    }

    /// Feature maps of the returned stages and their padding masks (true = padding), the masks
    /// nearest-resized from the pixel mask as upstream's `F.interpolate(m[None].float(), size)`.
    /// `train` enables the GCViT's stochastic depth (a ResNet's frozen norms have no mode).
    pub fn forward(
        &self,
        images: &Tensor,
        pixel_mask: &Tensor,
        train: bool,
    ) -> Vec<(Tensor, Tensor)> {
        let outs: Vec<Option<Tensor>> = match &self.body {
            Body::ResNet(r) => r.forward(images).into_iter().map(Some).collect(),
            Body::GcVit(g) => g.forward(images, train),
            Body::Fan(f) => f.forward(images, Pass::of(train)),
        };
        self.with_masks(outs, pixel_mask)
    }
}

/// What a checkpointed training step keeps of the backbone's gradient-free first pass: a
/// GCViT's level inputs (a ResNet or a FAN is recomputed whole).
#[derive(Debug, Default)]
pub struct Saved {
    level_inputs: Vec<Tensor>,
}

impl Backbone {
    /// [`Backbone::forward`] keeping what [`Backbone::backward`] recomputes from; level `i`
    /// of a GCViT runs after `tch::manual_seed(seed + i)` so its recomputation draws the same
    /// stochastic depth.
    pub fn forward_saved(
        &self,
        images: &Tensor,
        pixel_mask: &Tensor,
        train: bool,
        seed: i64,
    ) -> (Vec<(Tensor, Tensor)>, Saved) {
        let Body::GcVit(g) = &self.body else {
            if matches!(self.body, Body::Fan(_)) {
                // A FAN's stochastic depth, seeded so that its recomputation draws the same.
                tch::manual_seed(seed);
            }
            return (self.forward(images, pixel_mask, train), Saved::default());
        };
        let last = g.last_level();
        let mut x = g.stem(images);
        let mut saved = Saved::default();
        let mut outs = Vec::with_capacity(last + 1);
        for i in 0..=last {
            tch::manual_seed(seed + i as i64);
            saved.level_inputs.push(x.shallow_clone());
            let (raw, next) = g.level(i, &x, train, i < last);
            outs.push(g.output(i, &raw));
            if let Some(next) = next {
                x = next;
            }
        }
        (self.with_masks(outs, pixel_mask), saved)
    }

    /// The backward of the backbone given the gradients of its returned feature maps (one per
    /// returned stage; undefined where none flowed), recomputing from `saved` with autograd. A
    /// ResNet or FAN is recomputed whole (a FAN with the first pass's seed, batch statistics
    /// and no second update of its running ones); a GCViT one level at a time from the last
    /// (TAO checkpoints each level): level `i` is rerun from its kept input and backward of ⟨its feature map,
    /// its gradient⟩ + ⟨the next level's input, that input's gradient⟩ fills its parameters'
    /// gradients and its input's, then the patch embedding's. Only one level's activations are
    /// alive at a time.
    pub fn backward(
        &self,
        images: &Tensor,
        pixel_mask: &Tensor,
        saved: Saved,
        train: bool,
        seed: i64,
        grads: &[Tensor],
    ) {
        let surrogate = |terms: Vec<Tensor>| terms.into_iter().reduce(|a, b| a + b);
        let Body::GcVit(g) = &self.body else {
            let again = match &self.body {
                // The same stochastic depth and batch statistics; the running statistics were
                // updated by the first pass.
                Body::Fan(f) => {
                    tch::manual_seed(seed);
                    let pass = if train { Pass::Recompute } else { Pass::Eval };
                    self.with_masks(f.forward(images, pass), pixel_mask)
                }
                _ => self.forward(images, pixel_mask, train),
            };
            let terms = again
                .iter()
                .zip(grads)
                .filter(|((f, _), g)| f.requires_grad() && g.defined())
                .map(|((f, _), g)| (f * g).sum(Kind::Float))
                .collect();
            if let Some(s) = surrogate(terms) {
                s.backward();
            }
            return;
        };
        let last = saved.level_inputs.len() - 1;
        let mut next_grad: Option<Tensor> = None;
        for (i, input) in saved.level_inputs.into_iter().enumerate().rev() {
            let x = input.detach().set_requires_grad(true);
            tch::manual_seed(seed + i as i64);
            let (raw, next) = g.level(i, &x, train, i < last);
            let mut terms = Vec::new();
            if let Some(pos) = self.return_stages.iter().position(|&s| s == i) {
                let grad = &grads[pos];
                if grad.defined() {
                    let out = g.output(i, &raw).expect("a returned level has its norm");
                    terms.push((out * grad).sum(Kind::Float));
                }
            }
            if let (Some(next), Some(grad)) = (next, next_grad.take()) {
                terms.push((next * grad).sum(Kind::Float));
            }
            let Some(s) = surrogate(terms) else { continue };
            s.backward();
            let grad = x.grad();
            next_grad = grad.defined().then_some(grad);
        }
        if let Some(grad) = next_grad {
            (g.stem(images) * grad).sum(Kind::Float).backward();
        }
    }

    /// The returned stages' maps from every level's (optional) output, with their masks.
    fn with_masks(&self, outs: Vec<Option<Tensor>>, pixel_mask: &Tensor) -> Vec<(Tensor, Tensor)> {
        self.return_stages
            .iter()
            .map(|&s| {
                let feat = outs[s].as_ref().expect("a returned stage").shallow_clone();
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::Device;

    /// A block computed in full (no skipping), as torchvision's `forward`; `folded` runs each
    /// norm folded into its convolution as [`Block::forward`] does, else after it (upstream).
    fn full_block(b: &Block, x: &Tensor, folded: bool) -> Tensor {
        let conv_bn = |conv: &Conv, bn: &FrozenBatchNorm2d, x: &Tensor| {
            if folded {
                bn.after(conv, x)
            } else {
                bn.forward(&conv.forward(x))
            }
        };
        let mut out = x.shallow_clone();
        for (i, (conv, bn)) in b.convs.iter().zip(&b.bns).enumerate() {
            out = conv_bn(conv, bn, &out);
            if i + 1 < b.convs.len() {
                out = out.relu();
            }
        }
        let identity = match &b.downsample {
            Some(d) => conv_bn(&d.conv, &d.bn, x),
            None => x.shallow_clone(),
        };
        (out + identity).relu()
    }

    fn trainable(vs: &VarStore) -> Vec<String> {
        let v = vs.variables_.lock().unwrap();
        let ptrs: Vec<usize> = v
            .trainable_variables
            .iter()
            .map(|t| t.tensor.data_ptr() as usize)
            .collect();
        let mut names: Vec<String> = v
            .named_variables
            .iter()
            .filter(|(_, t)| ptrs.contains(&(t.data_ptr() as usize)))
            .map(|(k, _)| k.clone())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn from_scratch_zeroes_last_norms_freezes_branches_skips_them_exactly_and_trains_the_stem() {
        let _rng = crate::torch_rng_lock();
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let body = ResNetBody::new(&vs.root(), BackboneKind::Resnet18, 3, true, false, true);
        let names = trainable(&vs);
        // The stem and the downsample convs train; the residual branches cannot.
        assert_eq!(
            names,
            [
                "conv1.weight",
                "layer2.0.downsample.0.weight",
                "layer3.0.downsample.0.weight"
            ],
            "{names:?}"
        );
        let block = &body.layers[1][0];
        assert!(block.bns[1].is_zero() && !block.bns[0].is_zero());
        let x = Tensor::randn([2, 64, 16, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let skipped = block.forward(&x);
        let full = full_block(block, &x, true);
        assert_eq!(skipped.size(), [2, 128, 8, 8]);
        assert!(skipped.allclose(&full, 0.0, 0.0, false));
        let g1 = Tensor::run_backward(&[skipped.sum(Kind::Float)], &[&x], false, false);
        let g2 = Tensor::run_backward(&[full.sum(Kind::Float)], &[&x], false, false);
        assert!(g1[0].allclose(&g2[0], 1e-6, 1e-6, false));

        // Weights loaded later (a non-zero last norm) are used: no skipping then.
        tch::no_grad(|| {
            let _ = block.bns[1].weight.shallow_clone().fill_(1.0);
        });
        assert!(!block.bns[1].is_zero());
        let with_branch = block.forward(&x);
        assert!(with_branch.allclose(&full_block(block, &x, true), 1e-6, 1e-6, false));
        // Folding the norm into the convolution changes only the rounding (upstream order).
        let upstream = full_block(block, &x, false);
        assert!(with_branch.allclose(&upstream, 1e-5, 1e-5, false));
        let g1 = Tensor::run_backward(&[with_branch.sum(Kind::Float)], &[&x], false, false);
        let g2 = Tensor::run_backward(&[upstream.sum(Kind::Float)], &[&x], false, false);
        assert!(g1[0].allclose(&g2[0], 1e-5, 1e-5, false));
        assert!(!with_branch.allclose(&full, 1e-3, 1e-3, false));
    }

    #[test]
    fn default_init_keeps_unit_norms_and_trainable_branches() {
        let _rng = crate::torch_rng_lock();
        let vs = VarStore::new(Device::Cpu);
        let body = ResNetBody::new(&vs.root(), BackboneKind::Resnet18, 2, true, false, false);
        assert!(body.layers[1]
            .iter()
            .all(|b| b.bns.iter().all(|n| !n.is_zero())));
        let names = trainable(&vs);
        assert!(
            names.contains(&"layer2.0.conv1.weight".to_string()),
            "{names:?}"
        );
        assert!(!names
            .iter()
            .any(|n| n.starts_with("layer1") || n == "conv1.weight"));
    }
}
