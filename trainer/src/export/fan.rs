//! The FAN backbone (`crate::model::fan`) written as ONNX nodes at the export's fixed input size,
//! as TAO's export runs it (BatchNorms on their running statistics): the ConvNeXt's 1×1
//! convolutions as MatMuls on the channels-last map, the Fourier position encoding (with its
//! 1×1 projection) a constant of the export size, both attentions as MatMul/Softmax, the
//! channel attention's softmax over the tokens on its axis, the BatchNorm as a per-channel
//! scale and shift, GELU in its erf form; the class token joined to each image by broadcast.

use tch::Device;

use super::proto::Attr;
use super::{Writer, INPUT_NAME, V};
use crate::model::fan::{
    fourier_features, BatchNorm, ChannelMlp, ClassAttentionBlock, ConvNeXtBlock, Fan, FanBlock,
};

const BODY: &str = "backbone.0.body";

/// Suffix of the BatchNorm's per-channel scale (the `Mul` operand) after the module path.
const BN_SCALE: &str = "scale";

/// Whether `init_name` is a BatchNorm's scale: its `Mul` is fvcore's eval `batch_norm`, 2 per
/// element with the shift.
pub fn is_batch_norm_scale(init_name: &str) -> bool {
    let base = crate::quantize::qdq::module_of(init_name);
    base.strip_suffix(BN_SCALE)
        .is_some_and(|m| m.ends_with(".bn."))
}

impl Writer {
    /// The FAN trunk from the input: the returned levels' NCHW maps with their sizes.
    pub(super) fn fan(
        &mut self,
        f: &Fan,
        stages: &[usize],
        input_hw: (i64, i64),
    ) -> Vec<(V, (i64, i64))> {
        let last = f.last_level();
        let cn = format!("{BODY}.patch_embed.backbone");
        let mut hw = input_hw;
        let (stem, stem_norm) = &f.stem;
        let x = self.gcvit_conv(INPUT_NAME, stem, &format!("{cn}.stem.0"), &mut hw);
        let mut x = self.layer_norm_2d(&x, stem_norm, &format!("{cn}.stem.1"));
        let mut levels = Vec::with_capacity(4);
        for (s, stage) in f.stages.iter().enumerate().take(last + 1) {
            let name = format!("{cn}.stages.{s}");
            if let Some((norm, conv)) = &stage.downsample {
                x = self.layer_norm_2d(&x, norm, &format!("{name}.downsample.0"));
                x = self.gcvit_conv(&x, conv, &format!("{name}.downsample.1"), &mut hw);
            }
            for (j, b) in stage.blocks.iter().enumerate() {
                x = self.convnext_block(&x, b, &format!("{name}.blocks.{j}"), hw);
            }
            levels.push((x.clone(), hw));
        }
        if last >= 2 {
            levels.extend(self.fan_tokens(f, &x, hw, last));
        }
        stages
            .iter()
            .map(|&s| {
                let (x, hw) = &levels[s];
                let norm = f.norms[s].as_ref().expect("a returned level has its norm");
                (
                    self.layer_norm_2d(x, norm, &format!("{BODY}.out_norm{s}")),
                    *hw,
                )
            })
            .collect()
    }

    /// Levels 2 (and 3 when `last` is 3) from the ConvNeXt's output `x` of size `hw`.
    fn fan_tokens(
        &mut self,
        f: &Fan,
        x: &str,
        hw: (i64, i64),
        last: usize,
    ) -> Vec<(V, (i64, i64))> {
        let mut hw = hw;
        let t = self.gcvit_conv(x, &f.proj, &format!("{BODY}.patch_embed.proj"), &mut hw);
        let (h, w) = hw;
        let e = f.config.embed_dim;
        let n = h * w;
        // The position encoding depends on the size only: computed here with its projection.
        let pos = f
            .token_projection
            .forward(&fourier_features(h, w, Device::Cpu));
        let pos = self.tensor(&format!("{BODY}.pos_embed.encoding"), &pos);
        let t = self.binary("Add", &t, &pos);
        let t = self.reshape(&t, &[0, e, n]);
        let mut t = self.transpose(&t, &[0, 2, 1]);
        let mut outs = Vec::new();
        let needed = if last == 2 {
            f.config.out_index + 1
        } else {
            f.config.depth
        };
        for (i, block) in f.blocks.iter().enumerate().take(needed) {
            t = self.fan_block(&t, block, &format!("{BODY}.blocks.{i}"), hw);
            if i == f.config.out_index {
                outs.push((self.tokens_to_map(&t, e, hw), hw));
            }
        }
        if last == 3 {
            // The class token for every image: broadcast onto a zeroed first token.
            let first = self.slice(&t, 1, 0, 1);
            let zero = self.scalar(0.0);
            let first = self.binary("Mul", &first, &zero);
            let cls = self.tensor(&format!("{BODY}.cls_token"), &f.cls_token);
            let cls = self.binary("Add", &first, &cls);
            let mut c = self.op("Concat", &[&cls, &t], &[("axis", Attr::Int(1))]);
            for (k, block) in f.cls_blocks.iter().enumerate() {
                c = self.class_attention(&c, block, &format!("{BODY}.cls_attn_blocks.{k}"), n);
            }
            let patches = self.slice(&c, 1, 1, n + 1);
            let map = self.tokens_to_map(&patches, e, hw);
            let down = self.gcvit_conv(
                &map,
                &f.downsample,
                &format!("{BODY}.learnable_downsample"),
                &mut hw,
            );
            outs.push((down, hw));
        }
        outs
    }

    /// `[B, N, C]` tokens of an `h × w` map → NCHW.
    fn tokens_to_map(&mut self, t: &str, c: i64, hw: (i64, i64)) -> V {
        let y = self.transpose(t, &[0, 2, 1]);
        self.reshape(&y, &[0, c, hw.0, hw.1])
    }

    /// `LayerNorm2d`: a LayerNorm over the channels of an NCHW map.
    fn layer_norm_2d(&mut self, x: &str, ln: &tch::nn::LayerNorm, name: &str) -> V {
        let y = self.transpose(x, &[0, 2, 3, 1]);
        let y = self.layer_norm(&y, ln, name);
        self.transpose(&y, &[0, 3, 1, 2])
    }

    /// The mean over `axis`, kept.
    fn reduce_mean_keep(&mut self, x: &str, axis: i64) -> V {
        if self.opset >= 18 {
            let a = self.ints(&[axis], &[1]);
            self.op("ReduceMean", &[x, &a], &[("keepdims", Attr::Int(1))])
        } else {
            self.op(
                "ReduceMean",
                &[x],
                &[("axes", Attr::Ints(vec![axis])), ("keepdims", Attr::Int(1))],
            )
        }
    }

    /// `[B, N, C]` → `[B, heads, N, C/heads]`.
    fn split_heads(&mut self, x: &str, n: i64, heads: i64) -> V {
        let y = self.reshape(x, &[0, n, heads, -1]);
        self.transpose(&y, &[0, 2, 1, 3])
    }

    fn convnext_block(&mut self, x: &str, b: &ConvNeXtBlock, name: &str, hw: (i64, i64)) -> V {
        let mut same = hw;
        let y = self.gcvit_conv(x, &b.conv_dw, &format!("{name}.conv_dw"), &mut same);
        let y = self.transpose(&y, &[0, 2, 3, 1]);
        let y = self.layer_norm(&y, &b.norm, &format!("{name}.norm"));
        let y = self.linear_wb(
            &y,
            &b.fc1.ws.flatten(1, 3),
            b.fc1.bs.as_ref(),
            &format!("{name}.mlp.fc1"),
        );
        let y = self.gelu(&y);
        let y = self.linear_wb(
            &y,
            &b.fc2.ws.flatten(1, 3),
            b.fc2.bs.as_ref(),
            &format!("{name}.mlp.fc2"),
        );
        let g = self.tensor(&format!("{name}.gamma"), &b.gamma);
        let y = self.binary("Mul", &y, &g);
        let y = self.transpose(&y, &[0, 3, 1, 2]);
        self.binary("Add", x, &y)
    }

    /// Multi-head attention of `q` `[B, h, Nq, hd]` over `k`, `v` `[B, h, N, hd]`, merged back
    /// to `[B, Nq, C]`.
    fn heads_attention(&mut self, q: &str, k: &str, v: &str, hd: i64, nq: i64, c: i64) -> V {
        let scale = self.scalar((hd as f32).powf(-0.5));
        let q = self.binary("Mul", q, &scale);
        let kt = self.transpose(k, &[0, 1, 3, 2]);
        let attn = self.binary("MatMul", &q, &kt);
        let attn = self.op("Softmax", &[&attn], &[("axis", Attr::Int(-1))]);
        let out = self.binary("MatMul", &attn, v);
        let out = self.transpose(&out, &[0, 2, 1, 3]);
        self.reshape(&out, &[0, nq, c])
    }

    fn fan_block(&mut self, x: &str, b: &FanBlock, name: &str, hw: (i64, i64)) -> V {
        let n = hw.0 * hw.1;
        let c = b.gamma1.size()[0];
        let (heads, hd) = (b.heads, c / b.heads);
        // Token mixing.
        let y = self.layer_norm(x, &b.norm1, &format!("{name}.norm1"));
        let q = self.linear(&y, &b.q, &format!("{name}.attn.q"));
        let q = self.split_heads(&q, n, heads);
        let kv = self.linear(&y, &b.kv, &format!("{name}.attn.kv"));
        let kv = self.reshape(&kv, &[0, n, 2, heads, hd]);
        let kv = self.transpose(&kv, &[2, 0, 3, 1, 4]);
        let (k, v) = (self.select(&kv, 0, 0), self.select(&kv, 0, 1));
        let o = self.heads_attention(&q, &k, &v, hd, n, c);
        let o = self.linear(&o, &b.proj, &format!("{name}.attn.proj"));
        let g1 = self.tensor(&format!("{name}.gamma1"), &b.gamma1);
        let o = self.binary("Mul", &o, &g1);
        let x = self.binary("Add", x, &o);
        // Channel processing: per-head channel attention from softmaxes over the tokens.
        let m = format!("{name}.mlp");
        let y = self.layer_norm(&x, &b.norm2, &format!("{name}.norm2"));
        let q = self.linear(&y, &b.cq, &format!("{m}.q"));
        let q = self.split_heads(&q, n, heads);
        let q = self.op("Softmax", &[&q], &[("axis", Attr::Int(2))]);
        let q = self.transpose(&q, &[0, 1, 3, 2]); // [B, h, hd, N]
        let k = self.split_heads(&y, n, heads);
        let k = self.op("Softmax", &[&k], &[("axis", Attr::Int(2))]);
        let k = self.reduce_mean_keep(&k, 3); // [B, h, N, 1]
        let a = self.binary("MatMul", &q, &k);
        let a = self.op("Sigmoid", &[&a], &[]);
        let t = self.tensor(&format!("{m}.temperature"), &b.temperature);
        let a = self.binary("Mul", &a, &t);
        let a = self.reshape(&a, &[0, 1, c]);
        let v = self.channel_mlp(&y, &b.mlp_v, &format!("{m}.mlp_v"), hw);
        let v = self.layer_norm(&v, &b.norm_v, &format!("{m}.norm_v"));
        let v = self.binary("Mul", &v, &a);
        let g2 = self.tensor(&format!("{name}.gamma2"), &b.gamma2);
        let v = self.binary("Mul", &v, &g2);
        self.binary("Add", &x, &v)
    }

    /// `fc1`, `gamma · dwconv + ·`, `fc2` on `[B, N, C]` tokens of an `h × w` map.
    fn channel_mlp(&mut self, x: &str, mlp: &ChannelMlp, name: &str, hw: (i64, i64)) -> V {
        let z = self.linear(x, &mlp.fc1, &format!("{name}.fc1"));
        let c = mlp.gamma.size()[0];
        let m = self.tokens_to_map(&z, c, hw);
        let mut same = hw;
        let dw = format!("{name}.dwconv");
        let m = self.gcvit_conv(&m, &mlp.conv1, &format!("{dw}.conv1"), &mut same);
        let m = self.gelu(&m);
        let m = self.batch_norm(&m, &mlp.bn, &format!("{dw}.bn"));
        let m = self.gcvit_conv(&m, &mlp.conv2, &format!("{dw}.conv2"), &mut same);
        let m = self.reshape(&m, &[0, c, hw.0 * hw.1]);
        let m = self.transpose(&m, &[0, 2, 1]);
        let g = self.tensor(&format!("{name}.gamma"), &mlp.gamma);
        let m = self.binary("Mul", &m, &g);
        let z = self.binary("Add", &m, &z);
        self.linear(&z, &mlp.fc2, &format!("{name}.fc2"))
    }

    /// BatchNorm on its running statistics: a per-channel scale and shift of an NCHW map.
    fn batch_norm(&mut self, x: &str, bn: &BatchNorm, name: &str) -> V {
        let (scale, shift) = bn.eval_affine();
        let s = self.tensor(&format!("{name}.{BN_SCALE}"), &scale.view([-1, 1, 1]));
        let b = self.tensor(&format!("{name}.shift"), &shift.view([-1, 1, 1]));
        let y = self.binary("Mul", x, &s);
        self.binary("Add", &y, &b)
    }

    /// A class-attention block on `[B, 1 + n, C]`.
    fn class_attention(&mut self, x: &str, b: &ClassAttentionBlock, name: &str, n: i64) -> V {
        let c = b.gamma1.size()[0];
        let (heads, hd) = (b.heads, c / b.heads);
        let xn = self.layer_norm(x, &b.norm1, &format!("{name}.norm1"));
        let cls = self.slice(&xn, 1, 0, 1);
        let q = self.linear(&cls, &b.q, &format!("{name}.attn.q"));
        let q = self.split_heads(&q, 1, heads);
        let k = self.linear(&xn, &b.k, &format!("{name}.attn.k"));
        let k = self.split_heads(&k, n + 1, heads);
        let v = self.linear(&xn, &b.v, &format!("{name}.attn.v"));
        let v = self.split_heads(&v, n + 1, heads);
        let o = self.heads_attention(&q, &k, &v, hd, 1, c);
        let o = self.linear(&o, &b.proj, &format!("{name}.attn.proj"));
        let rest = self.slice(&xn, 1, 1, n + 1);
        let a = self.op("Concat", &[&o, &rest], &[("axis", Attr::Int(1))]);
        let g1 = self.tensor(&format!("{name}.gamma1"), &b.gamma1);
        let a = self.binary("Mul", &a, &g1);
        let x = self.binary("Add", x, &a);
        let x = self.layer_norm(&x, &b.norm2, &format!("{name}.norm2"));
        let cls = self.slice(&x, 1, 0, 1);
        let m = self.linear(&cls, &b.fc1, &format!("{name}.mlp.fc1"));
        let m = self.gelu(&m);
        let m = self.linear(&m, &b.fc2, &format!("{name}.mlp.fc2"));
        let g2 = self.tensor(&format!("{name}.gamma2"), &b.gamma2);
        let m = self.binary("Mul", &m, &g2);
        let rest = self.slice(&x, 1, 1, n + 1);
        let m = self.op("Concat", &[&m, &rest], &[("axis", Attr::Int(1))]);
        self.binary("Add", &x, &m)
    }
}
