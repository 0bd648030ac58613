//! Stage-by-stage parity at a real size: TAO's default model (ResNet-50, 4 levels, 6+6 layers,
//! 300 queries, d_model 256, box refinement) on `a.png` (800×1066, a size the val transform
//! keeps) against transformers' Deformable DETR — backbone features, input projections, encoder
//! memory, every decoder layer's hidden state, final logits and boxes — so a regression names the
//! stage where it starts. The weights go the way a user's do: transformers' checkpoint file
//! (rebuilt from the fixture's manifest) through the tasks' loader; the image through the
//! loader's decode, collation and normalisation.
//!
//! Fixtures: `tests/golden/make_e2e_fixtures.py` (`e2e/layers_l4_refine.safetensors`: 512
//! seeded entries and the absolute sum of each stage's output).

mod common;

use common::e2e::{e2e_dir, r50_config, write_transformers_checkpoint};
use ddetr_dataset::image::decode_rgb8;
use ddetr_dataset::loader::{collate, LoaderMode, Meta};
use ddetr_dataset::transforms::Sample;
use ddetr_dataset::AugmentationConfig;
use ddetr_trainer::model::deformable_detr::DetrConfig;
use ddetr_trainer::model::DeformableDetr;
use ddetr_trainer::model_checkpoint::load_for_task;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Sampled entries must agree within `ABS + REL·|reference|`; the absolute sums within `SUM_REL`.
/// f32 through a 50-layer backbone and 12 transformer layers at 21k tokens, where libtorch's and
/// PyTorch's kernels sum in other orders: measured up to 6e-6 (sampled, 2e-5 for the logits) and
/// 5e-7 (relative sums), so the bounds leave a margin of about 5×.
const ABS: f64 = 5e-5;
const REL: f64 = 1e-4;
const SUM_REL: f64 = 1e-5;

struct Reference(std::collections::BTreeMap<String, Tensor>);

impl Reference {
    fn check(&self, stage: &str, ours: &Tensor) {
        let r = &self.0;
        let shape: Vec<i64> = Vec::try_from(&r[&format!("{stage}.shape")]).unwrap();
        assert_eq!(ours.size(), shape, "{stage}: shape");
        let idx = &r[&format!("{stage}.index")];
        let want = r[&format!("{stage}.values")].to_kind(Kind::Double);
        let got = ours
            .reshape([-1])
            .index_select(0, idx)
            .to_kind(Kind::Double);
        let bound = want.abs() * REL + ABS;
        let excess = ((&got - &want).abs() - &bound).max().double_value(&[]);
        let worst = (&got - &want).abs().max().double_value(&[]);
        assert!(
            excess <= 0.0,
            "{stage}: sampled entries differ from transformers' by up to {worst:e} (allowed {ABS:e} + {REL:e}·|x|)"
        );
        let sum_ref = r[&format!("{stage}.abs_sum")].double_value(&[0]);
        let sum = ours
            .to_kind(Kind::Double)
            .abs()
            .sum(Kind::Double)
            .double_value(&[]);
        let rel = (sum - sum_ref).abs() / sum_ref.max(1e-12);
        assert!(
            rel <= SUM_REL,
            "{stage}: Σ|x| {sum} vs transformers' {sum_ref} (relative {rel:e})"
        );
        eprintln!("{stage}: max sampled diff {worst:.2e}, Σ|x| rel diff {rel:.2e}");
    }
}

#[test]
fn tao_default_model_matches_transformers_stage_by_stage_at_800x1066() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("model.safetensors");
    write_transformers_checkpoint("l4_refine", &ckpt);
    let vs = VarStore::new(Device::Cpu);
    let model = DeformableDetr::new(
        &vs.root(),
        DetrConfig::from_spec(&r50_config(4, true, false), 5).unwrap(),
    );
    load_for_task(&vs, &ckpt).unwrap();

    let bytes = std::fs::read(e2e_dir().join("a.png")).unwrap();
    let rgb = decode_rgb8(&bytes, "a.png").unwrap();
    assert_eq!(
        (rgb.height, rgb.width),
        (800, 1066),
        "a size the val transform keeps"
    );
    let meta = Meta {
        index: 0,
        image_id: 1,
        orig_size: [800, 1066],
    };
    let aug = AugmentationConfig::default();
    let batch = collate(
        &[(Sample::new(rgb, vec![], vec![]), meta)],
        &aug,
        LoaderMode::Eval,
        0,
        0,
    );
    let images = batch.normalized(Device::Cpu);
    let mask = batch.mask.shallow_clone();
    let reference = Reference(
        Tensor::read_safetensors(e2e_dir().join("layers_l4_refine.safetensors"))
            .unwrap()
            .into_iter()
            .collect(),
    );

    tch::no_grad(|| {
        let features = model.backbone_features(&images, &mask, false);
        for (i, (f, _)) in features.iter().enumerate() {
            reference.check(&format!("backbone.{i}"), f);
        }
        let inputs = model.encoder_inputs(&features, &mask);
        let mut start = 0;
        for (l, &(h, w)) in inputs.spatial_shapes.iter().enumerate() {
            let level = inputs
                .src
                .narrow(1, start, h * w)
                .transpose(1, 2)
                .reshape([1, -1, h, w]);
            reference.check(&format!("input_proj.{l}"), &level);
            start += h * w;
        }
        let mut memory = inputs.src.shallow_clone();
        for i in 0..model.transformer.num_encoder_layers() {
            memory = model
                .transformer
                .encoder_layer(i, &memory, &inputs.pos, &inputs, false);
        }
        reference.check("encoder.memory", &memory);
        let heads = model.decode(&memory, &inputs, false);
        let out = model.decoder_states(&memory, &inputs, false);
        for layer in 0..out.hs.size()[0] {
            reference.check(&format!("decoder.{layer}"), &out.hs.get(layer));
        }
        reference.check("logits", &heads.last().logits);
        reference.check("boxes", &heads.last().boxes);
    });
}
