//! `model_checkpoint::load_for_task`: every published checkpoint layout loads into the tiny model
//! with each variable bit-identical to the values the checkpoint holds, is named in the one-line
//! report, and a checkpoint of another model is a one-line error naming the spec field.
//! Fixtures: `tests/golden/make_checkpoint_fixtures.py` (real `torch.save`, PyTorch Lightning
//! and transformers writers; run it with the peers venv to regenerate).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use ddetr_trainer::amp::Amp;
use ddetr_trainer::checkpoint::{self, CheckpointMeta};
use ddetr_trainer::model::deformable_detr::DetrConfig;
use ddetr_trainer::model::DeformableDetr;
use ddetr_trainer::model_checkpoint::{load_for_task, CheckpointFormat, CheckpointReport};
use ddetr_trainer::spec::{Backbone, ModelConfig, Precision};
use ddetr_trainer::torch_pickle;
use tch::nn::VarStore;
use tch::{Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    golden_dir().join(name)
}

/// A fresh model of `cfg` with `classes` classes.
fn model(cfg: &ModelConfig, classes: u32) -> (VarStore, DeformableDetr) {
    let vs = VarStore::new(Device::Cpu);
    let m = DeformableDetr::new(&vs.root(), DetrConfig::from_spec(cfg, classes).unwrap());
    (vs, m)
}

/// Loads `path` into a fresh model of `cfg` (5 classes).
fn load(path: &Path, cfg: &ModelConfig) -> (VarStore, CheckpointReport) {
    let (vs, _m) = model(cfg, NUM_CLASSES);
    let report = load_for_task(&vs, path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (vs, report)
}

/// The one-line error loading `path` into a model of `cfg` with `classes` classes.
fn load_err(path: &Path, cfg: &ModelConfig, classes: u32) -> String {
    let (vs, _m) = model(cfg, classes);
    let e = load_for_task(&vs, path).unwrap_err().to_string();
    assert!(!e.contains('\n'), "one line: {e}");
    assert!(
        e.contains(&path.display().to_string()),
        "names the file: {e}"
    );
    e
}

/// Every variable equals `expected(key, shape)` bit for bit.
fn assert_values(vs: &VarStore, expected: impl Fn(&str, &[i64]) -> Tensor) {
    let vars = vs.variables();
    assert!(!vars.is_empty());
    for (name, var) in vars {
        let want = expected(&name, &var.size());
        assert!(var.equal(&want), "{name} differs from the checkpoint's");
    }
}

fn model_vars(cfg: &ModelConfig) -> usize {
    model(cfg, NUM_CLASSES).0.variables().len()
}

#[test]
fn an_official_pth_loads_its_model_entry_and_skips_the_shared_heads() {
    let path = fixture("ckpt_official_l1.pth");
    let cfg = model_config(1, false, false);
    let (vs, r) = load(&path, &cfg);
    assert_values(&vs, pth_fill);
    assert_eq!(r.format, CheckpointFormat::Official);
    assert_eq!(r.describe(), "official Deformable-DETR (model)");
    assert_eq!(r.loaded, model_vars(&cfg));
    // class_embed.1 (weight, bias) and bbox_embed.1 (3 layers × weight, bias) repeat head 0.
    assert_eq!((r.aliases, r.ignored), (8, 0));
    assert_eq!(
        r.to_string(),
        format!(
            "checkpoint {}: official Deformable-DETR (model) — {} tensors loaded, 0 missing, 0 unexpected, 8 aliases skipped",
            path.display(),
            r.loaded
        )
    );
}

#[test]
fn a_tao_lightning_checkpoint_loads_from_state_dict_under_model_model() {
    let path = fixture("ckpt_tao_l4_refine.pth");
    let cfg = model_config(4, true, false);
    let (vs, r) = load(&path, &cfg);
    assert_values(&vs, pth_fill);
    assert_eq!(r.format, CheckpointFormat::Lightning);
    assert_eq!(
        r.describe(),
        "TAO Lightning (state_dict, prefix model.model.)"
    );
    assert_eq!(r.loaded, model_vars(&cfg));
    // The decoder's aliases of the 2 box heads (3 layers × weight, bias each).
    assert_eq!((r.aliases, r.ignored), (12, 0));
    assert!(
        r.to_string().starts_with(&format!(
            "checkpoint {}: TAO Lightning (state_dict, prefix model.model.) — {} tensors loaded, 0 missing, 0 unexpected",
            path.display(),
            r.loaded
        )),
        "{r}"
    );
}

#[test]
fn the_pickle_reader_survives_a_real_lightning_checkpoint_and_reads_only_the_state_dict() {
    // hyper_parameters is an OmegaConf DictConfig; optimizer_states, lr_schedulers, callbacks and
    // loops hold Python objects and tensors the reader must pass over.
    let a = torch_pickle::read_archive(&fixture("ckpt_tao_l4_refine.pth")).unwrap();
    assert_eq!(a.container, Some("state_dict"));
    for k in [
        "hyper_parameters",
        "optimizer_states",
        "lr_schedulers",
        "callbacks",
        "loops",
        "pytorch-lightning_version",
    ] {
        assert!(a.top_level.iter().any(|t| t == k), "{k}: {:?}", a.top_level);
    }
    assert!(a.tensors.iter().all(|(k, _)| k.starts_with("model.model.")));
    // A broadcast view (stride 0 over 64 rows) comes back whole.
    let (_, t) = a
        .tensors
        .iter()
        .find(|(k, _)| k == "model.model.backbone.0.body.layer1.0.conv1.weight")
        .unwrap();
    assert_eq!(t.size(), [64, 64, 3, 3]);
    assert!(t.is_contiguous());
    assert!(t.equal(&pth_fill(
        "backbone.0.body.layer1.0.conv1.weight",
        &[64, 64, 3, 3]
    )));
}

#[test]
fn a_transformers_pytorch_model_bin_loads_through_the_key_map() {
    let path = fixture("ckpt_hf_l1.bin");
    let cfg = model_config(1, false, false);
    let (vs, r) = load(&path, &cfg);
    assert_values(&vs, pth_fill);
    assert_eq!(r.format, CheckpointFormat::Transformers);
    assert_eq!(
        r.describe(),
        "transformers DeformableDetrForObjectDetection"
    );
    assert_eq!(r.loaded, model_vars(&cfg));
    assert_eq!(r.aliases, 8, "the shared heads class_embed.1, bbox_embed.1");
}

/// Writes the `model.safetensors` the manifest describes, each tensor the fill of its official
/// key (q/k/v: their row block of the packed `in_proj_*` fill).
fn write_hf_safetensors(dir: &Path) -> PathBuf {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("ckpt_hf_l4_refine_manifest.json")).unwrap())
            .unwrap();
    let mut named = Vec::new();
    for e in manifest["tensors"].as_array().unwrap() {
        let key = e[0].as_str().unwrap().to_string();
        let mut shape: Vec<i64> = e[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_i64().unwrap())
            .collect();
        let fill_key = e[2].as_str().unwrap();
        let t = match e[3].as_i64() {
            None => fill(fill_key, &shape),
            Some(block) => {
                let d = shape[0];
                shape[0] *= 3;
                fill(fill_key, &shape).narrow(0, block * d, d).contiguous()
            }
        };
        named.push((key, t));
    }
    let path = dir.join("model.safetensors");
    Tensor::write_safetensors(&named, &path).unwrap();
    path
}

#[test]
fn a_transformers_model_safetensors_uses_the_decoder_aliases_and_tied_class_heads() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_hf_safetensors(dir.path());
    let cfg = model_config(4, true, false);
    let (vs, r) = load(&path, &cfg);
    // save_pretrained keeps the box heads only as `model.decoder.bbox_embed.N` and leaves out
    // class_embed.N (N > 0), which transformers ties to head 0: those load head 0's values.
    assert_values(&vs, |key, shape| match key.strip_prefix("class_embed.") {
        Some(rest) if !rest.starts_with("0.") => {
            let tail = rest.split_once('.').unwrap().1;
            fill(&format!("class_embed.0.{tail}"), shape)
        }
        _ => fill(key, shape),
    });
    assert_eq!(r.format, CheckpointFormat::Transformers);
    assert_eq!(r.loaded, model_vars(&cfg));
    assert_eq!((r.aliases, r.ignored), (0, 0));
}

#[test]
fn a_ddetr_training_checkpoint_loads_its_model_and_leaves_the_optimizer_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dd_model_latest.safetensors");
    let cfg = model_config(4, true, false);
    let (src, _m) = model(&cfg, NUM_CLASSES);
    fill_model(&src);
    let mut tensors: Vec<(String, Tensor)> = src.variables().into_iter().collect();
    let state = vec![
        ("optim.steps".to_string(), Tensor::from_slice(&[40i64])),
        (
            "optim.transformer.level_embed.exp_avg".to_string(),
            Tensor::zeros([4, 32], tch::kind::FLOAT_CPU),
        ),
    ];
    let amp = Amp::new(Precision::Fp16, Device::Cpu).state_tensors();
    let n_state = state.len() + amp.len();
    tensors.extend(state);
    tensors.extend(amp);
    let meta = CheckpointMeta {
        epoch: 3,
        step: 0,
        global_step: 40,
        seed: 1,
        world: 1,
        spec_yaml: "model: {}\n".into(),
    };
    checkpoint::save(&path, &tensors, &meta).unwrap();
    let (vs, r) = load(&path, &cfg);
    assert_values(&vs, fill);
    assert_eq!(r.format, CheckpointFormat::Ddetr);
    assert_eq!(r.describe(), "ddetr training checkpoint");
    assert_eq!(
        (r.loaded, r.aliases, r.ignored),
        (model_vars(&cfg), 0, n_state)
    );

    // A flipped byte is the checksum's one-line error, not a load.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let e = load_err(&path, &cfg, NUM_CLASSES);
    assert!(e.contains("checksum mismatch"), "{e}");
}

#[test]
fn a_flat_state_dict_saved_from_ddp_loads_without_its_module_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let cfg = model_config(1, false, false);
    let (src, _m) = model(&cfg, NUM_CLASSES);
    fill_model(&src);
    let named: Vec<(String, Tensor)> = src
        .variables()
        .into_iter()
        .map(|(k, t)| (format!("module.{k}"), t))
        .collect();
    Tensor::write_safetensors(&named, &path).unwrap();
    let (vs, r) = load(&path, &cfg);
    assert_values(&vs, fill);
    assert_eq!(
        r.describe(),
        "official Deformable-DETR state dict (prefix module.)"
    );
}

#[test]
fn a_checkpoint_of_other_classes_names_dataset_num_classes() {
    let e = load_err(
        &fixture("ckpt_official_l1.pth"),
        &model_config(1, false, false),
        7,
    );
    assert!(
        e.contains("class_embed.0.") && e.contains("set dataset.num_classes to 5"),
        "{e}"
    );
}

#[test]
fn a_checkpoint_of_other_decoder_depth_names_model_dec_layers() {
    let path = fixture("ckpt_tao_l4_refine.pth");
    for (dec, first) in [(3, "lack"), (1, "no place for")] {
        let mut cfg = model_config(4, true, false);
        cfg.dec_layers = dec;
        let e = load_err(&path, &cfg, NUM_CLASSES);
        assert!(
            e.contains(first)
                && e.contains("transformer.decoder.layers.")
                && e.contains("set model.dec_layers to 2"),
            "{e}"
        );
    }
}

#[test]
fn refine_and_shared_head_checkpoints_name_model_with_box_refine() {
    let dir = tempfile::tempdir().unwrap();
    let hf = write_hf_safetensors(dir.path());
    // A refine checkpoint into a spec without refinement: independent heads / the decoder's box
    // heads have no place.
    for path in [fixture("ckpt_tao_l4_refine.pth"), hf] {
        let e = load_err(&path, &model_config(4, false, false), NUM_CLASSES);
        assert!(
            e.contains("bbox_embed.") && e.contains("set model.with_box_refine to true"),
            "{e}"
        );
    }
    // Shared heads (class_embed.1 = class_embed.0) into a refine spec.
    let e = load_err(
        &fixture("ckpt_official_l1.pth"),
        &model_config(1, true, false),
        NUM_CLASSES,
    );
    assert!(
        e.contains("bbox_embed.1.") && e.contains("set model.with_box_refine to false"),
        "{e}"
    );
}

#[test]
fn other_feature_levels_name_model_num_feature_levels() {
    let e = load_err(
        &fixture("ckpt_tao_l4_refine.pth"),
        &model_config(1, true, false),
        NUM_CLASSES,
    );
    assert!(
        e.contains("input_proj.1.") && e.contains("set model.num_feature_levels to 4"),
        "{e}"
    );
}

#[test]
fn a_file_that_is_not_a_checkpoint_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = model_config(1, false, false);
    let text = dir.path().join("notes.pth");
    std::fs::write(&text, "epoch 3: mAP 0.41\n").unwrap();
    let e = load_err(&text, &cfg, NUM_CLASSES);
    assert!(e.contains("not a Deformable DETR checkpoint"), "{e}");
    // A safetensors file of something else.
    let e = load_err(&fixture("lsa_scipy.safetensors"), &cfg, NUM_CLASSES);
    assert!(e.contains("holds no Deformable DETR weights"), "{e}");
    // A torchvision backbone alone.
    let bb = dir.path().join("resnet18.safetensors");
    let (src, _m) = model(&cfg, NUM_CLASSES);
    let named: Vec<(String, Tensor)> = src
        .variables()
        .into_iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("backbone.0.body.")
                .map(|r| (r.to_string(), t))
        })
        .collect();
    Tensor::write_safetensors(&named, &bb).unwrap();
    let e = load_err(&bb, &cfg, NUM_CLASSES);
    assert!(e.contains("holds no Deformable DETR weights"), "{e}");
}

#[test]
fn each_other_size_names_its_spec_field() {
    let path = fixture("ckpt_official_l1.pth");
    type Change = fn(&mut ModelConfig);
    let cases: [(&str, Change, &str); 7] = [
        (
            "queries",
            |c| c.num_queries = 20,
            "set model.num_queries to 12",
        ),
        (
            "ffn",
            |c| c.dim_feedforward = 128,
            "set model.dim_feedforward to 64",
        ),
        ("d", |c| c.hidden_dim = 64, "set model.hidden_dim to 32"),
        ("heads", |c| c.nheads = 4, "model.nheads"),
        ("points", |c| c.enc_n_points = 2, "model.enc_n_points"),
        ("encoder", |c| c.enc_layers = 3, "set model.enc_layers to 2"),
        (
            "backbone",
            |c| c.backbone = Backbone::Resnet34,
            "set model.backbone to resnet_18",
        ),
    ];
    for (what, change, needle) in cases {
        let mut cfg = model_config(1, false, false);
        change(&mut cfg);
        let e = load_err(&path, &cfg, NUM_CLASSES);
        assert!(e.contains(needle), "{what}: {e}");
    }
}
