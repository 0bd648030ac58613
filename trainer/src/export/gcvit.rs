//! The GCViT backbone (`crate::model::gcvit`) written as ONNX nodes at the export's fixed input
//! size: channels-last LayerNormalization, windows by Reshape/Transpose (zero Pad and Slice when
//! a map is not a multiple of the window), attention as MatMul/Softmax with the relative-position
//! bias as a constant, GELU as its erf form, and the global query's bicubic resize as two
//! MatMuls by interpolation matrices made with libtorch's own bicubic kernel.

use tch::{Device, Kind, Tensor};

use super::proto::Attr;
use super::{conv_out, Writer, INPUT_NAME, V};
use crate::model::gcvit::{
    Block, Conv, ConvBranch, GcVit, GlobalQueryGen, ReduceSize, WindowAttention,
};

const BODY: &str = "backbone.0.body";

/// Names of the bicubic resize's interpolation matrices (after the level's module path).
const RESIZE_H: &str = "resize_h";
const RESIZE_W: &str = "resize_w_t";

/// Whether `init_name` is one of the global query's bicubic interpolation matrices: a constant
/// operand of a MatMul that is a resize, not a linear layer (neither quantized nor counted as
/// one).
pub fn is_resize_matrix(init_name: &str) -> bool {
    let module = crate::quantize::qdq::module_of(init_name);
    let last = module.rsplit('.').next().unwrap_or("");
    last == RESIZE_H || last == RESIZE_W
}

/// The `[out, in]` matrix `R` with `R · x` = the bicubic resize (align_corners false) of `x`
/// along one axis.
fn bicubic_matrix(input: i64, output: i64) -> Tensor {
    let eye = Tensor::eye(input, (Kind::Float, Device::Cpu)).view([1, input, input, 1]);
    eye.upsample_bicubic2d([output, 1], false, None, None)
        .view([input, output])
        .tr()
        .contiguous()
}

impl Writer {
    /// The GCViT trunk from the input: the returned levels' NCHW maps with their sizes.
    pub(super) fn gcvit(
        &mut self,
        g: &GcVit,
        stages: &[usize],
        input_hw: (i64, i64),
    ) -> Vec<(V, (i64, i64))> {
        let mut hw = input_hw;
        let x = self.gcvit_conv(
            INPUT_NAME,
            &g.patch_embed_proj,
            &format!("{BODY}.patch_embed.proj"),
            &mut hw,
        );
        let x = self.transpose(&x, &[0, 2, 3, 1]);
        let mut x = self.reduce_size(
            &x,
            &g.patch_embed_down,
            &format!("{BODY}.patch_embed.conv_down"),
            &mut hw,
        );
        let last = *stages.iter().max().expect("a returned level");
        let mut outs = vec![None; last + 1];
        for (i, level) in g.levels.iter().enumerate().take(last + 1) {
            let name = format!("{BODY}.levels.{i}");
            let xc = self.transpose(&x, &[0, 3, 1, 2]);
            let q = self.global_query(
                &xc,
                &level.q_global_gen,
                &format!("{name}.q_global_gen"),
                hw,
            );
            for (j, block) in level.blocks.iter().enumerate() {
                x = self.gcvit_block(&x, &q, block, &format!("{name}.blocks.{j}"), hw);
            }
            if let Some(norm) = &g.norms[i] {
                let y = self.layer_norm(&x, norm, &format!("{BODY}.norm{i}"));
                outs[i] = Some((self.transpose(&y, &[0, 3, 1, 2]), hw));
            }
            if i < last {
                let down = level.downsample.as_ref().expect("levels 0-2 downsample");
                x = self.reduce_size(&x, down, &format!("{name}.downsample"), &mut hw);
            }
        }
        stages
            .iter()
            .map(|&s| outs[s].clone().expect("a returned level"))
            .collect()
    }

    pub(super) fn gcvit_conv(&mut self, x: &str, c: &Conv, name: &str, hw: &mut (i64, i64)) -> V {
        let k = c.ws.size()[2];
        let w = self.tensor(&format!("{name}.weight"), &c.ws);
        let mut inputs = vec![x.to_string(), w];
        if let Some(b) = &c.bs {
            inputs.push(self.tensor(&format!("{name}.bias"), b));
        }
        *hw = (
            conv_out(hw.0, k, c.stride, c.padding, 1),
            conv_out(hw.1, k, c.stride, c.padding, 1),
        );
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.op(
            "Conv",
            &refs,
            &[
                ("kernel_shape", Attr::Ints(vec![k, k])),
                ("strides", Attr::Ints(vec![c.stride, c.stride])),
                ("pads", Attr::Ints(vec![c.padding; 4])),
                ("group", Attr::Int(c.groups)),
            ],
        )
    }

    /// `F.gelu` (exact): `x · (1 + erf(x / √2)) / 2`.
    pub(super) fn gelu(&mut self, x: &str) -> V {
        let r = self.scalar(std::f32::consts::FRAC_1_SQRT_2);
        let half = self.scalar(0.5);
        let one = self.scalar(1.0);
        let e = self.binary("Mul", x, &r);
        let e = self.op("Erf", &[&e], &[]);
        let e = self.binary("Add", &e, &one);
        let y = self.binary("Mul", x, &e);
        self.binary("Mul", &y, &half)
    }

    /// `x + conv(x)`, NCHW (spatial size unchanged).
    fn conv_branch(&mut self, x: &str, b: &ConvBranch, name: &str, hw: (i64, i64)) -> V {
        let mut same = hw;
        let y = self.gcvit_conv(x, &b.dw, &format!("{name}.conv.0"), &mut same);
        let y = self.gelu(&y);
        // Squeeze-excitation: the channel means through fc.0, GELU, fc.2, a sigmoid gate.
        let axes = [2i64, 3];
        let s = if self.opset >= 18 {
            let a = self.ints(&axes, &[2]);
            self.op("ReduceMean", &[&y, &a], &[("keepdims", Attr::Int(0))])
        } else {
            self.op(
                "ReduceMean",
                &[&y],
                &[
                    ("axes", Attr::Ints(axes.to_vec())),
                    ("keepdims", Attr::Int(0)),
                ],
            )
        };
        let s = self.linear(&s, &b.se.fc0, &format!("{name}.conv.2.fc.0"));
        let s = self.gelu(&s);
        let s = self.linear(&s, &b.se.fc2, &format!("{name}.conv.2.fc.2"));
        let s = self.op("Sigmoid", &[&s], &[]);
        let a = self.ints(&axes, &[2]);
        let s = self.op("Unsqueeze", &[&s, &a], &[]);
        let y = self.binary("Mul", &y, &s);
        let y = self.gcvit_conv(&y, &b.pw, &format!("{name}.conv.3"), &mut same);
        self.binary("Add", x, &y)
    }

    /// `ReduceSize`, NHWC in and out.
    fn reduce_size(&mut self, x: &str, r: &ReduceSize, name: &str, hw: &mut (i64, i64)) -> V {
        let y = self.layer_norm(x, &r.norm1, &format!("{name}.norm1"));
        let y = self.transpose(&y, &[0, 3, 1, 2]);
        let y = self.conv_branch(&y, &r.branch, name, *hw);
        let y = self.gcvit_conv(&y, &r.reduction, &format!("{name}.reduction"), hw);
        let y = self.transpose(&y, &[0, 2, 3, 1]);
        self.layer_norm(&y, &r.norm2, &format!("{name}.norm2"))
    }

    /// The level's global query `[B, 1, heads, N, head_dim]` from its NCHW input.
    fn global_query(&mut self, x: &str, g: &GlobalQueryGen, name: &str, hw: (i64, i64)) -> V {
        let mut x = x.to_string();
        let mut hw = hw;
        for (k, (branch, pool)) in g.blocks.iter().enumerate() {
            x = self.conv_branch(&x, branch, &format!("{name}.to_q_global.{k}"), hw);
            if *pool {
                x = self.max_pool_3x3_s2(&x, &mut hw);
            }
        }
        let ws = g.window;
        if hw != (ws, ws) {
            let rh = self.tensor(&format!("{name}.{RESIZE_H}"), &bicubic_matrix(hw.0, ws));
            let rw = self.tensor(
                &format!("{name}.{RESIZE_W}"),
                &bicubic_matrix(hw.1, ws).tr(),
            );
            x = self.binary("MatMul", &rh, &x);
            x = self.binary("MatMul", &x, &rw);
        }
        let y = self.transpose(&x, &[0, 2, 3, 1]);
        let y = self.reshape(&y, &[0, 1, ws * ws, g.heads, -1]);
        self.transpose(&y, &[0, 1, 3, 2, 4])
    }

    /// A GCViT block, NHWC `[B, h, w, C]` in and out.
    fn gcvit_block(&mut self, x: &str, q: &str, b: &Block, name: &str, hw: (i64, i64)) -> V {
        let (h, w) = hw;
        let ws = b.window;
        let c = b.norm1.ws.as_ref().expect("affine").size()[0];
        let (pad_b, pad_r) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
        let (hp, wp) = (h + pad_b, w + pad_r);
        let mut y = self.layer_norm(x, &b.norm1, &format!("{name}.norm1"));
        if pad_b > 0 || pad_r > 0 {
            let pads = self.ints(&[0, 0, 0, 0, 0, pad_b, pad_r, 0], &[8]);
            y = self.op("Pad", &[&y, &pads], &[]);
        }
        let y = self.reshape(&y, &[0, hp / ws, ws, wp / ws, ws, c]);
        let y = self.transpose(&y, &[0, 1, 3, 2, 4, 5]);
        let windows = self.reshape(&y, &[-1, ws * ws, c]);
        let nw = (hp / ws) * (wp / ws);
        let y = self.window_attention(&windows, q, &b.attn, &format!("{name}.attn"), nw, c);
        let y = self.reshape(&y, &[-1, hp / ws, wp / ws, ws, ws, c]);
        let y = self.transpose(&y, &[0, 1, 3, 2, 4, 5]);
        let mut y = self.reshape(&y, &[-1, hp, wp, c]);
        if pad_b > 0 {
            y = self.slice(&y, 1, 0, h);
        }
        if pad_r > 0 {
            y = self.slice(&y, 2, 0, w);
        }
        let gammas = b.gammas.as_ref().map(|(g1, g2)| {
            (
                self.tensor(&format!("{name}.gamma1"), g1),
                self.tensor(&format!("{name}.gamma2"), g2),
            )
        });
        if let Some((g1, _)) = &gammas {
            y = self.binary("Mul", &y, g1);
        }
        let x = self.binary("Add", x, &y);
        let m = self.layer_norm(&x, &b.norm2, &format!("{name}.norm2"));
        let m = self.linear(&m, &b.fc1, &format!("{name}.mlp.fc1"));
        let m = self.gelu(&m);
        let mut m = self.linear(&m, &b.fc2, &format!("{name}.mlp.fc2"));
        if let Some((_, g2)) = &gammas {
            m = self.binary("Mul", &m, g2);
        }
        self.binary("Add", &x, &m)
    }

    /// Attention over `windows` `[B·nW, N, C]`, keys and values (and, for a local block,
    /// queries) from the windows, queries of a global block from `q` `[B, 1, heads, N, hd]`.
    fn window_attention(
        &mut self,
        windows: &str,
        q_global: &str,
        a: &WindowAttention,
        name: &str,
        nw: i64,
        c: i64,
    ) -> V {
        let heads = a.heads;
        let hd = c / heads;
        let bias = a.bias();
        let n = bias.size()[1];
        let parts = if a.global { 2 } else { 3 };
        let qkv = self.linear(windows, &a.qkv, &format!("{name}.qkv"));
        let qkv = self.reshape(&qkv, &[-1, n, parts, heads, hd]);
        let qkv = self.transpose(&qkv, &[2, 0, 3, 1, 4]);
        let (q, k, v) = if a.global {
            let shape = self.ints(&[1, nw, heads, n, hd], &[5]);
            let q = self.op("Expand", &[q_global, &shape], &[]);
            let q = self.reshape(&q, &[-1, heads, n, hd]);
            (q, self.select(&qkv, 0, 0), self.select(&qkv, 0, 1))
        } else {
            (
                self.select(&qkv, 0, 0),
                self.select(&qkv, 0, 1),
                self.select(&qkv, 0, 2),
            )
        };
        let scale = self.scalar((hd as f32).powf(-0.5));
        let q = self.binary("Mul", &q, &scale);
        let kt = self.transpose(&k, &[0, 1, 3, 2]);
        let attn = self.binary("MatMul", &q, &kt);
        let bias = self.tensor(
            &format!("{name}.relative_position_bias"),
            &bias.unsqueeze(0),
        );
        let attn = self.binary("Add", &attn, &bias);
        let attn = self.op("Softmax", &[&attn], &[("axis", Attr::Int(-1))]);
        let out = self.binary("MatMul", &attn, &v);
        let out = self.transpose(&out, &[0, 2, 1, 3]);
        let out = self.reshape(&out, &[-1, n, c]);
        self.linear(&out, &a.proj, &format!("{name}.proj"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_matrix_is_libtorch_bicubic_resize() {
        let x = Tensor::randn([1, 2, 9, 13], (Kind::Float, Device::Cpu));
        let want = x.upsample_bicubic2d([7, 7], false, None, None);
        let got = bicubic_matrix(9, 7)
            .matmul(&x)
            .matmul(&bicubic_matrix(13, 7).tr());
        assert!(got.allclose(&want, 1e-5, 1e-5, false));
    }
}
