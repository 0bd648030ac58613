//! The loader end to end on a small synthetic set: tensor shapes and masks, normalization,
//! determinism across worker counts, resume, padding modes, and unreadable images skipped.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use ddetr_dataset::cache::{self, CacheOptions};
use ddetr_dataset::config::{AugmentationConfig, DataSource, DatasetConfig, EvalPadding};
use ddetr_dataset::image::decode_rgb8;
use ddetr_dataset::loader::{Loader, LoaderMode};
use ddetr_dataset::synth::{self, SynthOptions};
use tch::{Kind, Tensor};

fn setup(dir: &Path, images: usize, pack: bool) -> Arc<ddetr_dataset::Cache> {
    synth::generate(
        dir,
        &SynthOptions {
            images,
            width: 96,
            height: 72,
            classes: 3,
            seed: 7,
            tar: false,
            ..Default::default()
        },
    )
    .unwrap();
    let src = DataSource {
        image_dir: dir.join("images").display().to_string(),
        json_file: dir.join("annotations.json").display().to_string(),
    };
    let path = dir.join("c.ddetr-cache");
    Arc::new(
        cache::ensure(
            &[src],
            &CacheOptions {
                path: Some(path),
                pack_images: pack,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

fn small_aug() -> AugmentationConfig {
    AugmentationConfig {
        scales: vec![64, 80, 96],
        train_random_resize: vec![64, 72],
        train_random_crop_min: 48,
        train_random_crop_max: 64,
        random_resize_max_size: 128,
        test_random_resize: 72,
        fixed_padding: false,
        ..AugmentationConfig::default()
    }
}

fn config(batch: u32, workers: u32) -> DatasetConfig {
    DatasetConfig {
        batch_size: batch,
        workers,
        augmentation: small_aug(),
        ..DatasetConfig::default()
    }
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.equal(b)
}

#[test]
fn train_batches_have_padded_images_masks_and_normalized_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let c = setup(tmp.path(), 12, true);
    let loader = Loader::new(
        c.clone(),
        &config(4, 2),
        LoaderMode::Train { seed: 1 },
        1,
        0,
    )
    .unwrap();
    assert_eq!(loader.steps_per_epoch(), 3);
    let batches: Vec<_> = loader.epoch(0, 0).map(|b| b.unwrap()).collect();
    assert_eq!(
        batches.iter().map(|b| b.step).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    let mut seen = Vec::new();
    for b in &batches {
        let [n, ch, h, w] = b.images.size()[..] else {
            panic!()
        };
        assert_eq!((n, ch), (4, 3));
        assert_eq!(b.mask.size(), [4, h, w]);
        assert_eq!(b.mask.kind(), Kind::Bool);
        for (k, t) in b.targets.iter().enumerate() {
            let [th, tw] = t.size;
            assert!(th <= h && tw <= w);
            // The mask is false exactly on the image's own area.
            let valid = b
                .mask
                .get(k as i64)
                .logical_not()
                .sum(Kind::Int64)
                .int64_value(&[]);
            assert_eq!(valid, th * tw);
            assert_eq!(
                b.mask
                    .get(k as i64)
                    .narrow(0, 0, th)
                    .narrow(1, 0, tw)
                    .any()
                    .int64_value(&[]),
                0
            );
            // Padding is zero after normalization.
            if tw < w {
                assert_eq!(
                    b.images
                        .get(k as i64)
                        .narrow(2, tw, w - tw)
                        .abs()
                        .sum(Kind::Float)
                        .double_value(&[]),
                    0.0
                );
            }
            assert_eq!(t.boxes.size()[1], 4);
            assert_eq!(t.labels.size()[0], t.boxes.size()[0]);
            if t.boxes.numel() > 0 {
                assert!(
                    t.boxes.min().double_value(&[]) >= 0.0
                        && t.boxes.max().double_value(&[]) <= 1.0
                );
                assert!(
                    t.labels.min().int64_value(&[]) >= 1 && t.labels.max().int64_value(&[]) <= 3
                );
            }
            assert_eq!(t.orig_size, [72, 96]);
            assert_eq!(t.image_id, c.images()[b.indices[k]].id);
        }
        seen.extend(b.indices.iter().copied());
    }
    seen.sort();
    assert_eq!(seen, (0..12).collect::<Vec<_>>());
}

#[test]
fn batches_are_the_same_for_any_worker_count_and_resume_at_a_step() {
    let tmp = tempfile::tempdir().unwrap();
    let c = setup(tmp.path(), 10, false);
    let run = |workers, start| -> Vec<_> {
        let l = Loader::new(
            c.clone(),
            &config(2, workers),
            LoaderMode::Train { seed: 4 },
            1,
            0,
        )
        .unwrap();
        l.epoch(3, start).map(|b| b.unwrap()).collect()
    };
    let (a, b, resumed) = (run(0, 0), run(3, 0), run(2, 2));
    assert_eq!(a.len(), 5);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.indices, y.indices);
        assert!(same(&x.images, &y.images) && same(&x.mask, &y.mask));
        for (s, t) in x.targets.iter().zip(&y.targets) {
            assert!(same(&s.boxes, &t.boxes) && same(&s.labels, &t.labels));
        }
    }
    assert_eq!(resumed.len(), 3);
    for (x, y) in a[2..].iter().zip(&resumed) {
        assert_eq!((x.step, &x.indices), (y.step, &y.indices));
        assert!(same(&x.images, &y.images));
    }
    // Another epoch reshuffles.
    let l = Loader::new(
        c.clone(),
        &config(2, 1),
        LoaderMode::Train { seed: 4 },
        1,
        0,
    )
    .unwrap();
    let other: Vec<Vec<usize>> = l.epoch(4, 0).map(|b| b.unwrap().indices).collect();
    assert_ne!(
        other,
        a.iter().map(|b| b.indices.clone()).collect::<Vec<_>>()
    );
    // Stopping early joins the workers (the iterator is dropped mid-epoch).
    let mut it = l.epoch(0, 0);
    assert!(it.next().unwrap().is_ok());
    drop(it);
}

#[test]
fn eval_images_are_normalized_with_input_mean_and_std() {
    let tmp = tempfile::tempdir().unwrap();
    let c = setup(tmp.path(), 3, false);
    let loader = Loader::new(c.clone(), &config(3, 1), LoaderMode::Eval, 1, 0).unwrap();
    let b = loader.epoch(0, 0).next().unwrap().unwrap();
    assert_eq!(b.images.size(), [3, 3, 72, 96]); // test_random_resize 72 = the original short side
    let raw = decode_rgb8(&c.image_bytes(1).unwrap(), "x").unwrap();
    let px = Tensor::from_slice(&raw.data)
        .view([72, 96, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 255.0;
    let mean = Tensor::from_slice(&[0.485f32, 0.456, 0.406]).view([3, 1, 1]);
    let std = Tensor::from_slice(&[0.229f32, 0.224, 0.225]).view([3, 1, 1]);
    let want = (px - mean) / std;
    assert_eq!(b.images.kind(), Kind::Uint8);
    let diff = (b.normalized(tch::Device::Cpu).get(1) - want)
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-5, "max diff {diff}");
    // Eval targets: the JSON boxes, normalized.
    let rec = c.boxes_of(1);
    let t = &b.targets[1];
    assert_eq!(t.boxes.size()[0], rec.len() as i64);
    let first = Vec::<f32>::try_from(t.boxes.get(0)).unwrap();
    let bb = rec[0].bbox;
    let want = [
        (bb[0] + bb[2] / 2.0) / 96.0,
        (bb[1] + bb[3] / 2.0) / 72.0,
        bb[2] / 96.0,
        bb[3] / 72.0,
    ];
    for (a, w) in first.iter().zip(want) {
        assert!((a - w).abs() < 1e-6, "{first:?} vs {want:?}");
    }
}

#[test]
fn fixed_padding_and_size_divisor_set_the_batch_size() {
    let tmp = tempfile::tempdir().unwrap();
    let c = setup(tmp.path(), 4, false);
    let mut cfg = config(2, 1);
    cfg.augmentation.fixed_padding = true;
    let l = Loader::new(c.clone(), &cfg, LoaderMode::Train { seed: 0 }, 1, 0).unwrap();
    for b in l.epoch(0, 0) {
        // Each image pads to max(scales) × random_resize_max_size by its orientation (a crop can
        // turn a landscape image portrait); the batch takes the largest.
        let size = b.unwrap().images.size();
        assert!(
            [[2, 3, 96, 128], [2, 3, 128, 96], [2, 3, 128, 128]]
                .contains(&[size[0], size[1], size[2], size[3]]),
            "{size:?}"
        );
    }
    // Evaluation pads only when asked for TAO's padded evaluation.
    let l = Loader::new(c.clone(), &cfg, LoaderMode::Eval, 1, 0).unwrap();
    assert_eq!(
        l.epoch(0, 0).next().unwrap().unwrap().images.size(),
        [2, 3, 72, 96]
    );
    cfg.augmentation.eval_padding = EvalPadding::Tao;
    let l = Loader::new(c.clone(), &cfg, LoaderMode::Eval, 1, 0).unwrap();
    assert_eq!(
        l.epoch(0, 0).next().unwrap().unwrap().images.size(),
        [2, 3, 72, 1333]
    );
    cfg.augmentation.fixed_padding = false;
    cfg.augmentation.pad_size_divisor = Some(32);
    let l = Loader::new(c.clone(), &cfg, LoaderMode::Eval, 1, 0).unwrap();
    assert_eq!(
        l.epoch(0, 0).next().unwrap().unwrap().images.size(),
        [2, 3, 96, 96]
    );
    cfg.augmentation.fixed_random_crop = Some(64);
    let l = Loader::new(c, &cfg, LoaderMode::Train { seed: 0 }, 1, 0).unwrap();
    assert_eq!(
        l.epoch(0, 0).next().unwrap().unwrap().images.size(),
        [2, 3, 64, 64]
    );
}

#[test]
fn an_unreadable_image_is_replaced_and_training_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let c = setup(tmp.path(), 6, false);
    let bad = c.image_path(2);
    let bytes = fs::read(&bad).unwrap();
    fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let l = Loader::new(c.clone(), &config(3, 2), LoaderMode::Eval, 1, 0).unwrap();
    let batches: Vec<_> = l.epoch(0, 0).map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].indices, [0, 1, 3]); // 2 → the next readable image
    assert_eq!(batches[0].images.size()[0], 3);
    let Err(e) = l.sample(2, 0) else {
        panic!("a truncated image must not load")
    };
    let e = e.to_string();
    assert_eq!(
        e,
        format!("image {}: truncated: no end marker", bad.display())
    );
}

/// The loader's fused path (crop-window resampling, flips deferred to collation, u8 batch
/// normalized by libtorch) against a plain reference: every transform step on the pixels in
/// order (`transforms::train`), then `(x/255 − mean)/std` in an f32 loop, zero padding.
/// Resampling a window instead of the whole image, and mirroring after resampling instead of
/// before, change only the resizer's fixed-point round-off: a value moves by at most 2 u8 levels,
/// i.e. 2/(255·std) ≤ 0.035 in normalized units (the tolerance, plus float round-off), and values
/// off at all must stay rare: < 10% of a batch (measured: none with the TAO transform, up to 4.9%
/// with large-scale jitter, whose strong upscales round differently in a window).
#[test]
fn fused_batches_equal_the_f32_reference_path() {
    use ddetr_dataset::rng::Rng;
    use ddetr_dataset::transforms::{self, Sample};
    let tmp = tempfile::tempdir().unwrap();
    let c = setup(tmp.path(), 8, true);
    let mut lsj = config(4, 0);
    lsj.augmentation.fixed_random_crop = Some(80);
    let mut flips = 0;
    for cfg in [config(4, 0), lsj] {
        let aug = &cfg.augmentation;
        let (mean, std) = (&aug.input_mean, &aug.input_std);
        let tol = 2.0 / (255.0 * std.iter().cloned().fold(f64::MAX, f64::min)) + 1e-5;
        let loader = Loader::new(c.clone(), &cfg, LoaderMode::Train { seed: 9 }, 1, 0).unwrap();
        for epoch in 0..3u64 {
            for b in loader.epoch(epoch, 0) {
                let b = b.unwrap();
                let [n, _, hh, ww] = b.images.size()[..] else {
                    panic!()
                };
                let normalized = b.normalized(tch::Device::Cpu);
                // The CPU pass and libtorch's kernels (what a GPU runs) agree.
                let by_libtorch = b.normalized_by_libtorch(tch::Device::Cpu);
                let gap = (&normalized - by_libtorch).abs().max().double_value(&[]);
                assert!(gap <= 1e-6, "CPU pass vs libtorch: {gap}");
                let got = Vec::<f32>::try_from(normalized.flatten(0, -1)).unwrap();
                let (hh, ww) = (hh as usize, ww as usize);
                let mut want = vec![0f32; got.len()];
                for k in 0..n as usize {
                    let i = b.indices[k];
                    let image = decode_rgb8(&c.image_bytes(i).unwrap(), "x").unwrap();
                    let (boxes, labels) = c
                        .boxes_of(i)
                        .iter()
                        .filter(|r| r.iscrowd == 0)
                        .map(|r| {
                            let [x, y, w, h] = r.bbox;
                            ([x, y, x + w, y + h], r.category_id)
                        })
                        .unzip();
                    let mut s = Sample::new(image, boxes, labels);
                    let mut rng = Rng::derive(9, &[epoch, i as u64]);
                    let ops = transforms::train_ops(96, 72, aug, &mut rng.clone());
                    flips += ops.contains(&transforms::Op::Flip) as usize;
                    transforms::train(
                        &mut s,
                        aug,
                        &mut rng,
                        &mut fast_image_resize::Resizer::new(),
                    );
                    let t = &b.targets[k];
                    let (h, w) = (s.image.height as usize, s.image.width as usize);
                    assert_eq!(t.size, [h as i64, w as i64]);
                    let boxes: Vec<f32> = transforms::normalized_cxcywh(&s)
                        .into_iter()
                        .flatten()
                        .collect();
                    assert_eq!(Vec::<f32>::try_from(t.boxes.flatten(0, -1)).unwrap(), boxes);
                    for ch in 0..3 {
                        for y in 0..h {
                            for x in 0..w {
                                let px = s.image.data[(y * w + x) * 3 + ch] as f32;
                                want[((k * 3 + ch) * hh + y) * ww + x] =
                                    (px / 255.0 - mean[ch] as f32) / std[ch] as f32;
                            }
                        }
                    }
                }
                let diffs: Vec<f64> = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs() as f64)
                    .collect();
                let max = diffs.iter().cloned().fold(0.0, f64::max);
                let off = diffs.iter().filter(|&&d| d > 1e-5).count();
                assert!(max <= tol, "step {} max diff {max} > {tol}", b.step);
                assert!(
                    off * 10 < diffs.len(),
                    "step {}: {off} of {} values off",
                    b.step,
                    diffs.len()
                );
            }
        }
    }
    assert!(flips > 4, "flipped images covered: {flips}");
}

/// A cache over two synthetic sets: `n` landscape 96×72 images, then `n` portrait 72×96 ones.
fn mixed_sizes(dir: &Path, n: usize) -> Arc<ddetr_dataset::Cache> {
    let mut sources = Vec::new();
    for (k, (w, h)) in [(96, 72), (72, 96)].into_iter().enumerate() {
        let d = dir.join(format!("set{k}"));
        synth::generate(
            &d,
            &SynthOptions {
                images: n,
                width: w,
                height: h,
                classes: 3,
                seed: 7 + k as u64,
                tar: false,
                ..Default::default()
            },
        )
        .unwrap();
        sources.push(DataSource {
            image_dir: d.join("images").display().to_string(),
            json_file: d.join("annotations.json").display().to_string(),
        });
    }
    Arc::new(
        cache::ensure(
            &sources,
            &CacheOptions {
                path: Some(dir.join("mixed.ddetr-cache")),
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

#[test]
fn padding_free_eval_batches_hold_one_size_and_cover_every_image_once_per_world() {
    let tmp = tempfile::tempdir().unwrap();
    let c = mixed_sizes(tmp.path(), 5);
    let mut cfg = config(3, 2);
    cfg.augmentation.test_random_resize = 72;
    for world in [1, 2, 3] {
        let mut seen = Vec::new();
        for rank in 0..world {
            let l = Loader::new(c.clone(), &cfg, LoaderMode::Eval, world, rank).unwrap();
            let batches: Vec<_> = l.epoch(0, 0).map(|b| b.unwrap()).collect();
            assert_eq!(batches.len(), l.steps_per_epoch());
            for b in batches {
                assert!(!b.has_padding, "world {world} rank {rank}: a padded batch");
                assert_eq!(
                    b.mask.any().int64_value(&[]),
                    0,
                    "the mask marks no padding"
                );
                assert_eq!(b.padding, 0, "no repeated images");
                let [_, _, h, w] = b.images.size()[..] else {
                    unreachable!()
                };
                assert!(b.targets.iter().all(|t| t.size == [h, w]));
                assert!(b.targets.len() <= 3);
                seen.extend(b.indices);
            }
        }
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>(), "world {world}");
    }
    // One rank, batch 3: the five landscape images in two batches, then the five portrait ones.
    let l = Loader::new(c.clone(), &cfg, LoaderMode::Eval, 1, 0).unwrap();
    let sizes: Vec<(Vec<usize>, Vec<i64>)> = l
        .epoch(0, 0)
        .map(|b| {
            let b = b.unwrap();
            (b.indices, b.images.size())
        })
        .collect();
    assert_eq!(
        sizes,
        [
            (vec![0, 1, 2], vec![3, 3, 72, 96]),
            (vec![3, 4], vec![2, 3, 72, 96]),
            (vec![5, 6, 7], vec![3, 3, 96, 72]),
            (vec![8, 9], vec![2, 3, 96, 72]),
        ]
    );
}
