//! DINO's graph (TAO's DINO export: `inputs` → `pred_logits`, `pred_boxes` of the last decoder
//! layer; no denoising queries, no interm outputs). The backbone, input projections, constants and
//! encoder are Deformable DETR's writers; then, as [`Dino::decode`] runs them:
//!
//! - query selection: the encoder proposals at this input size are constants the model's own
//!   code computes (`encoder_output_proposals` on an unpadded input; the memory is zeroed where a
//!   proposal is invalid by a constant 0/1 factor), the best class per position by `TopK` k=1,
//!   the `num_queries` best positions by `TopK`, their boxes by `GatherND` (batch_dims 1);
//! - the decoder: each layer's query position from its anchor's sine embedding (`Sin`/`Cos`
//!   interleaved by constant masks, coordinates reordered (y, x, w, h) by `Gather`) through
//!   `ref_point_head`, the anchor refined after every layer but the last;
//! - the heads on the final-normed last output, relative to the anchor that layer read.

use tch::{Device, Kind, Tensor};

use super::graph::Graph;
use super::{
    Attr, ExportError, ExportOptions, Refs, Writer, INPUT_NAME, OUTPUT_BOXES, OUTPUT_LOGITS, V,
};
use crate::model::deformable_transformer::encoder_output_proposals;
use crate::model::dino::{Dino, DINO_INVERSE_SIGMOID_EPS};
use crate::model::position_encoding::{sine_dim_t, SCALE};

/// Exports `model` (eval mode) to an ONNX model's bytes.
pub fn to_onnx(model: &Dino, opts: &ExportOptions) -> Result<Vec<u8>, ExportError> {
    Ok(to_graph(model, opts)?.to_bytes())
}

/// Exports `model` (eval mode) to an in-memory ONNX graph.
pub fn to_graph(model: &Dino, opts: &ExportOptions) -> Result<Graph, ExportError> {
    opts.check()?;
    let (h, w) = (opts.input_height as i64, opts.input_width as i64);
    let positions = model.encoder_positions(h, w);
    if positions < model.num_queries() {
        return Err(ExportError::TooFewPositions {
            height: opts.input_height,
            width: opts.input_width,
            positions,
            queries: model.num_queries(),
        });
    }
    Ok(tch::no_grad(|| {
        Writer::new(opts.opset_version).dino(model, opts)
    }))
}

impl Writer {
    fn dino(mut self, model: &Dino, opts: &ExportOptions) -> Graph {
        let (h, w) = (opts.input_height as i64, opts.input_width as i64);
        let tc = model.config.base.transformer;
        let (d, nq) = (tc.d_model, model.num_queries());
        let t = &model.transformer;
        let features = self.backbone(&model.backbone, (h, w));
        let srcs = self.input_levels(&model.input_proj, &features);
        let shapes: Vec<(i64, i64)> = srcs.iter().map(|(_, s)| *s).collect();
        let constants = self.level_constants(&model.position_embedding, &t.level_embed, &shapes);
        let memory = self.flatten_levels(&srcs, d);
        let memory = self.encoder(&t.encoder, memory, &constants, &shapes);

        // Query selection.
        let len: i64 = shapes.iter().map(|&(a, b)| a * b).sum();
        let (_, proposals) = encoder_output_proposals(
            &Tensor::zeros([1, len, d], (Kind::Float, Device::Cpu)),
            &Tensor::zeros([1, len], (Kind::Bool, Device::Cpu)),
            &shapes,
        );
        let valid = proposals
            .isfinite()
            .all_dims(Some(&[-1i64][..]), true)
            .to_kind(Kind::Float);
        let valid = self.tensor("proposal_valid", &valid);
        let out_memory = self.binary("Mul", &memory, &valid);
        let out_memory = self.linear(&out_memory, &t.enc_output, "transformer.enc_output");
        let out_memory = self.layer_norm(
            &out_memory,
            &t.enc_output_norm,
            "transformer.enc_output_norm",
        );
        let enc_class = self.linear(
            &out_memory,
            &t.enc_out_class_embed,
            "transformer.enc_out_class_embed",
        );
        let enc_delta = self.mlp(
            &out_memory,
            &t.enc_out_bbox_embed,
            "transformer.enc_out_bbox_embed",
        );
        let proposals = self.tensor("encoder_proposals", &proposals);
        let enc_coord = self.binary("Add", &enc_delta, &proposals);
        let one = self.ints(&[1], &[1]);
        let best = self.top_k(&enc_class, &one, -1);
        let axis2 = self.ints(&[2], &[1]);
        let best = self.op("Squeeze", &[&best.0, &axis2], &[]);
        let k = self.ints(&[nq], &[1]);
        let (_, index) = self.top_k(&best, &k, 1);
        let index = self.op("Unsqueeze", &[&index, &axis2], &[]);
        let anchors = self.op(
            "GatherND",
            &[&enc_coord, &index],
            &[("batch_dims", Attr::Int(1))],
        );
        let mut reference = self.op("Sigmoid", &[&anchors], &[]);

        // Content queries: tgt_embed for every image.
        let tgt_embed = t
            .tgt_embed
            .as_ref()
            .expect("exported DINO models have learned content queries");
        let batch = self.op(
            "Shape",
            &[INPUT_NAME],
            &[("start", Attr::Int(0)), ("end", Attr::Int(1))],
        );
        let qd = self.ints(&[nq, d], &[2]);
        let target_shape = self.op("Concat", &[&batch, &qd], &[("axis", Attr::Int(0))]);
        let tgt_c = self.tensor("transformer.tgt_embed", &tgt_embed.unsqueeze(0));
        let mut tgt = self.op("Expand", &[&tgt_c, &target_shape], &[]);

        // Decoder.
        let vr = &constants.valid_ratios;
        let vr4 = self.tensor("valid_ratios_box", &Tensor::cat(&[vr, vr], -1).unsqueeze(1));
        let layers = &t.decoder.layers;
        let mut head_reference = reference.clone();
        for (lid, layer) in layers.iter().enumerate() {
            head_reference = reference.clone();
            let un = self.op("Unsqueeze", &[&reference, &axis2], &[]);
            let ref_input = self.binary("Mul", &un, &vr4); // [N, Q, L, 4]
            let level0 = self.slice(&ref_input, 2, 0, 1);
            let level0 = self.op("Squeeze", &[&level0, &axis2], &[]);
            let sine = self.sine_embed_boxes(&level0, d, nq);
            let query_pos = self.mlp(
                &sine,
                &t.decoder.ref_point_head,
                "transformer.decoder.ref_point_head",
            );
            tgt = self.decoder_layer(
                layer,
                &format!("transformer.decoder.layers.{lid}"),
                &tgt,
                &query_pos,
                &Refs {
                    v: ref_input,
                    dim: 4,
                },
                &memory,
                &shapes,
                nq,
            );
            if lid + 1 < layers.len() {
                let delta = self.mlp(&tgt, model.box_head(lid), &format!("bbox_embed.{lid}"));
                let inv = self.inverse_sigmoid_eps(&reference, DINO_INVERSE_SIGMOID_EPS);
                let unact = self.binary("Add", &delta, &inv);
                reference = self.op("Sigmoid", &[&unact], &[]);
            }
        }
        let last = layers.len() - 1;
        let hs = self.layer_norm(&tgt, &t.decoder.norm, "transformer.decoder.norm");
        let logits = self.linear(&hs, model.class_head(last), "class_embed");
        let delta = self.mlp(&hs, model.box_head(last), "bbox_embed");
        let inv = self.inverse_sigmoid_eps(&head_reference, DINO_INVERSE_SIGMOID_EPS);
        let coord = self.binary("Add", &delta, &inv);
        self.op_into("Identity", &[&logits], &[], OUTPUT_LOGITS);
        self.op_into("Sigmoid", &[&coord], &[], OUTPUT_BOXES);
        self.finish(nq, model.config.base.num_classes, "dino", opts)
    }

    /// `TopK(x, k)` along `axis`, largest first → (values, indices).
    fn top_k(&mut self, x: &str, k: &str, axis: i64) -> (V, V) {
        let values = self.fresh("TopK_values");
        let indices = self.fresh("TopK_indices");
        let name = format!("TopK_node_{}", self.nodes.len());
        self.nodes.push(super::graph::Node::new(
            "TopK",
            &name,
            &[x, k],
            &[&values, &indices],
            &[
                ("axis", Attr::Int(axis)),
                ("largest", Attr::Int(1)),
                ("sorted", Attr::Int(1)),
            ],
        ));
        (values, indices)
    }

    /// `gen_sineembed_for_position` of boxes `[N, Q, 4]` → `[N, Q, 2d]`: each coordinate·2π over
    /// `d/2` frequencies, sin at even and cos at odd features, coordinates in the order (y, x, w, h).
    fn sine_embed_boxes(&mut self, boxes: &str, d: i64, nq: i64) -> V {
        let npf = d / 2;
        let dim_t = sine_dim_t(npf, Device::Cpu);
        let inv_dim_t = self.tensor("query_sine_inv_dim_t", &(dim_t.reciprocal() * SCALE));
        let axis3 = self.ints(&[3], &[1]);
        let x = self.op("Unsqueeze", &[boxes, &axis3], &[]); // [N, Q, 4, 1]
        let v = self.binary("Mul", &x, &inv_dim_t); // [N, Q, 4, d/2]
        let even = Tensor::arange(npf, (Kind::Int64, Device::Cpu))
            .remainder(2)
            .eq(0)
            .to_kind(Kind::Float);
        let odd = self.tensor("query_sine_odd", &(1.0 - &even));
        let even = self.tensor("query_sine_even", &even);
        let sin = self.op("Sin", &[&v], &[]);
        let cos = self.op("Cos", &[&v], &[]);
        let sin = self.binary("Mul", &sin, &even);
        let cos = self.binary("Mul", &cos, &odd);
        let emb = self.binary("Add", &sin, &cos);
        let order = self.ints(&[1, 0, 2, 3], &[4]);
        let emb = self.op("Gather", &[&emb, &order], &[("axis", Attr::Int(2))]);
        self.reshape(&emb, &[0, nq, 4 * npf])
    }
}
