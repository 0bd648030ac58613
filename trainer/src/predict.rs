//! Distributed prediction: each rank runs a detector over its shard of a loader (eval mode), and
//! every rank ends with every rank's detections (padding entries excluded), gathered as rows.

use ddetr_collective::Communicator;
use ddetr_dataset::loader::Loader;
use tch::{Device, Kind, Tensor};

use crate::coco_eval::Detection;
use crate::detector::Detector;
use crate::input_sizes::InputSizes;
use crate::post_process::Detections;
use crate::TrainerError;

/// Runs `model` over this rank's shard of `loader` and gathers every rank's detections on every
/// rank; also returns the input sizes this rank ran at.
pub fn predict<D: Detector>(
    model: &D,
    loader: &Loader,
    comm: &Communicator,
    num_select: i64,
    conf_threshold: f64,
    device: Device,
) -> Result<(Vec<Detection>, InputSizes), TrainerError> {
    let mut rows: Vec<f64> = Vec::new();
    let mut sizes_seen = InputSizes::default();
    tch::no_grad(|| -> Result<(), TrainerError> {
        for batch in loader.epoch(0, 0) {
            let batch = batch?;
            let real = batch.targets.len() - batch.padding;
            let shape = batch.images.size();
            let own: Vec<[i64; 2]> = batch.targets[..real].iter().map(|t| t.size).collect();
            sizes_seen.record(shape[2], shape[3], &own);
            let images = batch.normalized(device);
            let out = model.forward(&images, &batch.mask.to_device(device), false);
            let sizes: Vec<(f64, f64)> = batch
                .targets
                .iter()
                .map(|t| (t.orig_size[0] as f64, t.orig_size[1] as f64))
                .collect();
            let dets = model.post_process(&out, &sizes, num_select, conf_threshold);
            for (t, d) in batch.targets.iter().zip(dets).take(real) {
                for det in coco_detections(t.image_id, &d)? {
                    rows.extend_from_slice(&det.to_row());
                }
            }
        }
        Ok(())
    })?;
    let rows = gather_rows(comm, rows)?;
    let dets = rows
        .chunks_exact(Detection::COLS)
        .map(Detection::from_row)
        .collect();
    Ok((dets, sizes_seen))
}

/// One image's post-processed detections (xyxy pixels) as COCO detections (xywh).
pub fn coco_detections(image_id: i64, d: &Detections) -> Result<Vec<Detection>, TrainerError> {
    let scores: Vec<f32> = Vec::try_from(&d.scores.to_device(Device::Cpu))?;
    let labels: Vec<i64> = Vec::try_from(&d.labels.to_device(Device::Cpu))?;
    let boxes: Vec<f32> = Vec::try_from(&d.boxes.to_device(Device::Cpu).reshape([-1]))?;
    Ok((0..scores.len())
        .map(|k| {
            let b = &boxes[4 * k..4 * k + 4];
            Detection {
                image_id,
                category_id: labels[k],
                bbox: [
                    f64::from(b[0]),
                    f64::from(b[1]),
                    f64::from(b[2] - b[0]),
                    f64::from(b[3] - b[1]),
                ],
                score: f64::from(scores[k]),
            }
        })
        .collect())
}

/// All-gathers variable-length f64 rows: sizes first, then the rows padded to the largest.
fn gather_rows(comm: &Communicator, rows: Vec<f64>) -> Result<Vec<f64>, TrainerError> {
    let world = comm.world();
    if world == 1 {
        return Ok(rows);
    }
    let mut n = Tensor::from_slice(&[rows.len() as i64]);
    let mut all_n = Tensor::zeros([world as i64], (Kind::Int64, Device::Cpu));
    comm.all_gather(&n, &mut all_n)?;
    let sizes: Vec<i64> = Vec::try_from(&all_n)?;
    let max = sizes.iter().copied().max().unwrap_or(0).max(1);
    let mut mine = vec![0.0f64; max as usize];
    mine[..rows.len()].copy_from_slice(&rows);
    n = Tensor::from_slice(&mine);
    let mut all = Tensor::zeros([world as i64 * max], (Kind::Double, Device::Cpu));
    comm.all_gather(&n, &mut all)?;
    let all: Vec<f64> = Vec::try_from(&all)?;
    let mut out = Vec::new();
    for (r, &s) in sizes.iter().enumerate() {
        let lo = r * max as usize;
        out.extend_from_slice(&all[lo..lo + s as usize]);
    }
    Ok(out)
}
