//! Forward, loss and backward of one batch — plainly, or with activation checkpointing
//! (`train.activation_checkpoint`; TAO checkpoints each encoder layer) as a staged backward:
//!
//! 1. the backbone runs without autograd (its activations are freed at once); its feature maps
//!    become leaves that require grad; the input projections run with autograd;
//! 2. each encoder layer runs without autograd, keeping only its input (`[N, S, d]`);
//! 3. the decoder, heads and criterion run from the encoder output (a leaf) with autograd, and
//!    backward fills their gradients and the encoder output's;
//! 4. from the last encoder layer down, the layer is recomputed from its kept input with
//!    autograd and backward of Σ⟨output, output gradient⟩ — whose gradient with respect to the
//!    output is exactly that gradient — fills the layer's parameter gradients and its input's
//!    (the vector–Jacobian product the one-graph backward computes); the position embeddings'
//!    gradient accumulates over the layers;
//! 5. the same through the input projections (and level embeddings), then the backbone, which
//!    is run once more with autograd: a ResNet whole, a GCViT one level at a time from the last
//!    (from level inputs kept by step 1; `Backbone::backward`).
//!
//! So at most one encoder layer's activations are alive at a time (deformable attention's
//! sampled values are the bulk at detection resolutions), and never together with the
//! backbone's, for one extra forward of the backbone and the encoder. Dropout in a recomputed
//! layer draws the masks of its first run (its RNG is seeded per layer). The gradients are the
//! one-graph path's (tests/activation_checkpoint.rs checks them equal with dropout off).

use tch::{Kind, Tensor};

use crate::amp::Amp;
use crate::criterion::Losses;
use crate::matcher::Target;
use crate::model::deformable_transformer::EncoderInputs;
use crate::TrainerError;

/// How one training step computes its gradients.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepMode {
    /// Recompute the backbone in backward instead of keeping its activations.
    pub activation_checkpoint: bool,
    /// The factor the loss is multiplied by before backward (fp16's loss scale; 1 otherwise).
    pub loss_scale: f64,
}

/// The stages of a backbone → deformable encoder → decoder detector, which the checkpointed
/// backward runs one at a time (Deformable DETR and DINO both are one).
pub trait Stages {
    /// The decoder's predictions.
    type Output;
    /// The backbone (its checkpointed backward runs through it).
    fn backbone(&self) -> &crate::model::backbone::Backbone;
    /// The returned backbone stages' feature maps and their padding masks (`train`: stochastic
    /// depth where the backbone has it).
    fn backbone_features(
        &self,
        images: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> Vec<(Tensor, Tensor)> {
        self.backbone().forward(images, mask, train)
    }
    /// Input projections and position embeddings, flattened for the encoder.
    fn encoder_inputs(&self, features: &[(Tensor, Tensor)], mask: &Tensor) -> EncoderInputs;
    fn num_encoder_layers(&self) -> usize;
    /// Encoder layer `i` on `x` with position embeddings `pos`.
    fn encoder_layer(
        &self,
        i: usize,
        x: &Tensor,
        pos: &Tensor,
        inputs: &EncoderInputs,
        train: bool,
    ) -> Tensor;
    /// The decoder and heads on the encoder output (`targets`, in training, feed training-only
    /// queries).
    fn decode(
        &self,
        memory: &Tensor,
        inputs: &EncoderInputs,
        targets: Option<&[Target]>,
        train: bool,
    ) -> Self::Output;

    /// The whole forward, one graph: the stages in order.
    fn forward_stages(
        &self,
        images: &Tensor,
        mask: &Tensor,
        targets: Option<&[Target]>,
        train: bool,
    ) -> Self::Output {
        self.forward_with_inputs(images, mask, targets, train).1
    }

    /// [`Stages::forward_stages`], keeping the encoder's inputs (the projected feature maps).
    fn forward_with_inputs(
        &self,
        images: &Tensor,
        mask: &Tensor,
        targets: Option<&[Target]>,
        train: bool,
    ) -> (EncoderInputs, Self::Output) {
        let features = self.backbone_features(images, mask, train);
        let inputs = self.encoder_inputs(&features, mask);
        let mut memory = inputs.src.shallow_clone();
        for i in 0..self.num_encoder_layers() {
            memory = self.encoder_layer(i, &memory, &inputs.pos, &inputs, train);
        }
        let out = self.decode(&memory, &inputs, targets, train);
        (inputs, out)
    }
}

/// The loss of one training step: the criterion on the decoder's output and, for feature
/// distillation, terms on the encoder's inputs (the projected feature maps).
pub struct StepLoss<'a, O> {
    pub output: &'a dyn Fn(&O) -> Result<Losses, TrainerError>,
    pub inputs: Option<&'a dyn Fn(&EncoderInputs) -> Losses>,
}

/// Runs forward, `loss` and backward (gradients accumulate into the parameters' `.grad`);
/// returns the unscaled losses (both parts of `loss`, added).
#[allow(clippy::too_many_arguments)]
pub fn forward_backward<M: Stages>(
    model: &M,
    loss: StepLoss<'_, M::Output>,
    images: &Tensor,
    mask: &Tensor,
    targets: &[Target],
    amp: &Amp,
    mode: StepMode,
) -> Result<Losses, TrainerError> {
    let scale = if mode.loss_scale == 0.0 {
        1.0
    } else {
        mode.loss_scale
    };
    let backward = |total: &Tensor| {
        if scale == 1.0 {
            total.backward();
        } else {
            (total * scale).backward();
        }
    };
    if !mode.activation_checkpoint {
        let losses = amp.autocast(|| {
            let (inputs, out) = model.forward_with_inputs(images, mask, Some(targets), true);
            let mut losses = (loss.output)(&out)?;
            if let Some(on_inputs) = loss.inputs {
                losses.add(on_inputs(&inputs));
            }
            Ok::<_, TrainerError>(losses)
        })?;
        backward(&losses.total);
        return Ok(losses);
    }
    // The backbone without autograd, keeping what its staged backward recomputes from; its
    // random draws (stochastic depth) seeded so the recomputation repeats them.
    let backbone_seed =
        Tensor::randint(1 << 40, [1], (Kind::Int64, tch::Device::Cpu)).int64_value(&[0]);
    let (features, saved) = tch::no_grad(|| {
        amp.autocast(|| {
            model
                .backbone()
                .forward_saved(images, mask, true, backbone_seed)
        })
    });
    let leaves: Vec<(Tensor, Tensor)> = features
        .into_iter()
        .map(|(f, m)| (f.detach().set_requires_grad(true), m))
        .collect();
    // Input projections, with autograd (small next to the encoder's activations).
    let inputs = amp.autocast(|| model.encoder_inputs(&leaves, mask));
    // Encoder layers without autograd; each layer's input kept, each layer's dropout seeded so
    // that its recomputation draws the same masks.
    let layers = model.num_encoder_layers();
    let base_seed =
        Tensor::randint(1 << 40, [1], (Kind::Int64, tch::Device::Cpu)).int64_value(&[0]);
    let mut xs = vec![inputs.src.detach()];
    tch::no_grad(|| {
        for i in 0..layers {
            tch::manual_seed(base_seed + i as i64);
            let x = amp.autocast(|| model.encoder_layer(i, &xs[i], &inputs.pos, &inputs, true));
            xs.push(x);
        }
    });
    let memory = xs[layers].detach().set_requires_grad(true);
    let mut losses =
        amp.autocast(|| (loss.output)(&model.decode(&memory, &inputs, Some(targets), true)))?;
    backward(&losses.total);
    drop(xs.pop());

    // Encoder layers backwards, one recomputed layer at a time.
    let pos = inputs.pos.detach().set_requires_grad(true);
    let mut grad = memory.grad();
    for i in (0..layers).rev() {
        if !grad.defined() {
            break;
        }
        let x = xs
            .pop()
            .expect("one input per layer")
            .set_requires_grad(true);
        tch::manual_seed(base_seed + i as i64);
        let y = amp.autocast(|| model.encoder_layer(i, &x, &pos, &inputs, true));
        (y * &grad).sum(Kind::Float).backward();
        grad = x.grad();
    }
    // Input projections and level embeddings (through src and pos, and the terms on the
    // projected maps themselves), then the backbone.
    let mut pre = Vec::new();
    if let Some(on_inputs) = loss.inputs {
        let extra = amp.autocast(|| on_inputs(&inputs));
        pre.push(&extra.total * scale);
        losses.add(extra);
    }
    if grad.defined() {
        pre.push((&inputs.src * &grad).sum(Kind::Float));
    }
    let gpos = pos.grad();
    if gpos.defined() {
        pre.push((&inputs.pos * &gpos).sum(Kind::Float));
    }
    if let Some(s) = pre.into_iter().reduce(|a, b| a + b) {
        s.backward();
    }
    drop(inputs);
    let grads: Vec<Tensor> = leaves.iter().map(|(leaf, _)| leaf.grad()).collect();
    amp.autocast(|| {
        model
            .backbone()
            .backward(images, mask, saved, true, backbone_seed, &grads)
    });
    Ok(losses)
}
