//! Where a training run starts: the checkpoint to resume from (`train.resume_training_checkpoint_path`,
//! else the newest verified one in the results folder), copied into the model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::LATEST;
use crate::checkpoint::{self, Checkpoint};
use crate::detector::Built;
use crate::spec::ExperimentSpec;
use crate::TrainerError;

/// `train.resume_training_checkpoint_path` when set, else the newest verified checkpoint in
/// `dir` (latest first, then the per-epoch files newest first); one failing its checksum is
/// reported and skipped.
pub fn find_resume(spec: &ExperimentSpec, dir: &Path) -> Result<Option<Checkpoint>, TrainerError> {
    if let Some(p) = spec
        .train
        .resume_training_checkpoint_path
        .as_deref()
        .filter(|p| !p.is_empty())
    {
        return checkpoint::load(Path::new(p)).map(Some);
    }
    let mut candidates = vec![dir.join(LATEST)];
    let mut epochs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with("model_epoch_") && n.ends_with(".safetensors")
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    epochs.sort();
    epochs.reverse();
    candidates.extend(epochs);
    // The latest file, when valid, is the newest; else the newest per-epoch file that verifies.
    for p in candidates.iter().filter(|p| p.exists()) {
        match checkpoint::load(p) {
            Ok(c) => return Ok(Some(c)),
            Err(e) => tracing::warn!("skipping checkpoint: {e}"),
        }
    }
    Ok(None)
}

/// Copies the model tensors of a checkpoint into the model; the first missing or mis-shaped key
/// is an error naming it.
pub fn load_model_tensors<D>(
    built: &Built<D>,
    saved: &BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<(), TrainerError> {
    const HINT: &str = "the checkpoint is from another model shape: check the model section or give another checkpoint";
    tch::no_grad(|| {
        let all = built
            .params
            .iter()
            .map(|p| (&p.name, &p.tensor))
            .chain(built.buffers.iter().map(|(n, t)| (n, t)));
        for (name, t) in all {
            let Some(s) = saved.get(name) else {
                return Err(TrainerError::MissingKeys {
                    path: path.display().to_string(),
                    count: 1,
                    first: name.clone(),
                    hint: HINT.into(),
                });
            };
            if s.size() != t.size() {
                return Err(TrainerError::ShapeMismatch {
                    path: path.display().to_string(),
                    key: name.clone(),
                    found: s.size(),
                    expected: t.size(),
                    hint: HINT.into(),
                });
            }
            t.shallow_clone().copy_(s);
        }
        Ok(())
    })
}
