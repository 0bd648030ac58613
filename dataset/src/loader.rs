//! The loader: sampler → decode (zune) → transform (fast_image_resize) → collate into tch tensors,
//! on `dataset.workers` threads with a bounded prefetch of batches.
//!
//! The output side is the hot path (TAO's scales upsample 640×480 to ~0.85 MP), so: the transform
//! is drawn as steps and run by the fused executor (a resize followed by a crop resamples only the
//! kept region; flips are applied by collation, which lays rows out right to left with SIMD
//! shuffles straight into the u8 batch tensor); each worker reuses its resizer. Pixels stay u8
//! through collation (a zero-padded u8 `[B, 3, H, W]` batch, 4× less to move than float);
//! [`Batch::normalized`] makes the float input once per batch on the training device
//! (`x · 1/(255·std) − mean/std`, padding zeroed as upstream, which pads after `Normalize`): one
//! vectorized pass on the CPU, libtorch's kernels on a GPU. Every random draw comes from the stream
//! `(seed, epoch, image index)`, so a batch is the same whatever the thread count or the order in
//! which workers finish. An image that fails to read or decode is reported once (naming the file)
//! and replaced by the next readable image in the dataset, so training never stops on it and batch
//! shapes stay constant.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use fast_image_resize::Resizer;
use tch::{Device, Kind, Tensor};

use crate::cache::Cache;
use crate::config::{AugmentationConfig, DatasetConfig, EvalPadding};
use crate::error::{DatasetError, Result};
use crate::eval_batches::{eval_size, size_grouped_batches};
use crate::image::decode_rgb8;
use crate::layout;
use crate::rng::Rng;
use crate::sampler::{DistributedSampler, IndexBatch, Mode};
use crate::transforms::{self, Sample, EVAL_MAX_SIZE};

/// How many other images are tried in place of one that cannot be read.
const MAX_REPLACEMENTS: usize = 16;

thread_local! {
    /// Each worker keeps its resizer (and so its scratch buffers) across images.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// One image's training target (upstream's `target` dict).
#[derive(Debug)]
pub struct ImageTarget {
    /// Category ids, int64 `[n]`.
    pub labels: Tensor,
    /// Normalized (cx, cy, w, h) of the transformed image, float `[n, 4]`.
    pub boxes: Tensor,
    pub image_id: i64,
    /// (height, width) of the original image.
    pub orig_size: [i64; 2],
    /// (height, width) after the transform, before padding.
    pub size: [i64; 2],
}

/// A collated batch.
#[derive(Debug)]
pub struct Batch {
    pub step: usize,
    /// Images `[B, 3, H, W]` u8, zero-padded bottom/right: 4× less to copy to the device than
    /// float; [`Batch::normalized`] turns them into the model input there.
    pub images: Tensor,
    /// `[B, H, W]` bool, true on padding.
    pub mask: Tensor,
    pub targets: Vec<ImageTarget>,
    /// Cache indices of the images (after any replacement).
    pub indices: Vec<usize>,
    /// The last `padding` images repeat earlier ones (evaluation only): do not score them.
    pub padding: usize,
    /// Whether any image is smaller than the batch (the mask has a true entry).
    pub has_padding: bool,
    /// `dataset.augmentation.input_mean` / `input_std`.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Batch {
    /// The model input on `device`: `(x/255 − mean)/std` as float `[B, 3, H, W]`, zero on the
    /// padding (upstream pads after `Normalize`). On the CPU, one vectorized pass from the u8
    /// batch straight to the float tensor; elsewhere the u8 batch goes to the device and libtorch
    /// converts and normalizes it there ([`Batch::normalized_by_libtorch`]).
    pub fn normalized(&self, device: Device) -> Tensor {
        if device == Device::Cpu
            && self.images.device() == Device::Cpu
            && self.images.kind() == Kind::Uint8
        {
            self.normalized_on_cpu()
        } else {
            self.normalized_by_libtorch(device)
        }
    }

    /// Per channel, the multiplier `1/(255·std)` and the offset `−mean/std`.
    fn affine(&self) -> ([f32; 3], [f32; 3]) {
        (
            self.std.map(|s| 1.0 / (255.0 * s)),
            [0, 1, 2].map(|c| -self.mean[c] / self.std[c]),
        )
    }

    /// `normalized` with libtorch's kernels on `device`: conversion to float, then an in-place
    /// multiply and add by per-channel values (two vectorized passes), then the padding of each
    /// image smaller than the batch zeroed (two small fills per such image).
    pub fn normalized_by_libtorch(&self, device: Device) -> Tensor {
        let (scale, shift) = self.affine();
        let scale = Tensor::from_slice(&scale)
            .view([1, 3, 1, 1])
            .to_device(device);
        let shift = Tensor::from_slice(&shift)
            .view([1, 3, 1, 1])
            .to_device(device);
        let mut x = self.images.to_device(device).to_kind(Kind::Float);
        let _ = x.g_mul_(&scale);
        let _ = x.g_add_(&shift);
        if self.has_padding {
            let [_, _, hh, ww] = x.size()[..] else {
                unreachable!("images are [B, 3, H, W]")
            };
            for (k, t) in self.targets.iter().enumerate() {
                let [h, w] = t.size;
                let img = x.get(k as i64);
                if h < hh {
                    let _ = img.narrow(1, h, hh - h).fill_(0.0);
                }
                if w < ww {
                    let _ = img.narrow(1, 0, h).narrow(2, w, ww - w).fill_(0.0);
                }
            }
        }
        x
    }

    /// `normalized` on the CPU in one pass: each valid row converted, multiplied and offset in a
    /// loop the compiler vectorizes, padding written as zeros (same arithmetic as
    /// [`Batch::normalized_by_libtorch`]: a float multiply, then a float add).
    fn normalized_on_cpu(&self) -> Tensor {
        let images = self.images.contiguous();
        let [b, ch, hh, ww] = images.size()[..] else {
            unreachable!("images are [B, 3, H, W]")
        };
        let (b, hh, ww) = (b as usize, hh as usize, ww as usize);
        let plane = hh * ww;
        let out = Tensor::empty(
            [b as i64, ch, hh as i64, ww as i64],
            (Kind::Float, Device::Cpu),
        );
        let n = b * 3 * plane;
        // SAFETY: `images` is a contiguous CPU u8 tensor of n elements (checked by the caller and
        // by `contiguous`); `out` was just allocated, contiguous, with n floats, and is not yet
        // shared.
        let (src, dst) = unsafe {
            (
                std::slice::from_raw_parts(images.data_ptr() as *const u8, n),
                std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n),
            )
        };
        let (scale, shift) = self.affine();
        for k in 0..b {
            let (h, w) = match self.targets.get(k) {
                Some(t) if self.has_padding => (t.size[0] as usize, t.size[1] as usize),
                _ => (hh, ww),
            };
            for c in 0..3 {
                let at = (k * 3 + c) * plane;
                let (a, o) = (scale[c], shift[c]);
                for y in 0..hh {
                    let row = at + y * ww..at + (y + 1) * ww;
                    let (d, s) = (&mut dst[row.clone()], &src[row]);
                    let valid = if y < h { w } else { 0 };
                    for (d, &s) in d[..valid].iter_mut().zip(&s[..valid]) {
                        *d = s as f32 * a + o;
                    }
                    d[valid..].fill(0.0);
                }
            }
        }
        out
    }
}

/// Whether the loader augments (train) or only resizes (val/test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoaderMode {
    Train { seed: u64 },
    Eval,
}

/// Static description of a loader (what a worker needs).
struct Shared {
    cache: Arc<Cache>,
    aug: AugmentationConfig,
    mode: LoaderMode,
    reported: Mutex<HashSet<usize>>,
}

pub struct Loader {
    shared: Arc<Shared>,
    sampler: DistributedSampler,
    /// Evaluation with `eval_padding: none`: this rank's batches, grouped by transformed size
    /// ([`crate::eval_batches`]); `None` where the sampler's batches are used as they are.
    size_grouped: Option<Vec<IndexBatch>>,
    workers: usize,
    prefetch: usize,
}

impl Loader {
    /// A loader over `cache` for this rank, with `dataset.batch_size`, `dataset.workers` and
    /// `dataset.augmentation` from `config`.
    pub fn new(
        cache: Arc<Cache>,
        config: &DatasetConfig,
        mode: LoaderMode,
        world: usize,
        rank: usize,
    ) -> Result<Self> {
        check_augmentation(&config.augmentation)?;
        let sampler_mode = match mode {
            LoaderMode::Train { seed } => Mode::Train { seed },
            LoaderMode::Eval => Mode::Eval,
        };
        let sampler = DistributedSampler::new(
            cache.len(),
            world,
            rank,
            config.batch_size as usize,
            sampler_mode,
        )?;
        let workers = config.workers as usize;
        let size_grouped = (mode == LoaderMode::Eval
            && config.augmentation.eval_padding == EvalPadding::None)
            .then(|| {
                let images = cache.images();
                let sized: Vec<(usize, (u32, u32))> = sampler
                    .eval_shard()
                    .into_iter()
                    .map(|i| {
                        let r = &images[i];
                        (i, eval_size(r.width, r.height, &config.augmentation))
                    })
                    .collect();
                size_grouped_batches(&sized, config.batch_size as usize)
            });
        Ok(Self {
            shared: Arc::new(Shared {
                cache,
                aug: config.augmentation.clone(),
                mode,
                reported: Mutex::new(HashSet::new()),
            }),
            sampler,
            size_grouped,
            workers,
            prefetch: (2 * workers).max(2),
        })
    }

    /// Steps per epoch: the same on every rank in training; in padding-free evaluation, this
    /// rank's number of size-grouped batches.
    pub fn steps_per_epoch(&self) -> usize {
        match &self.size_grouped {
            Some(b) => b.len(),
            None => self.sampler.steps_per_epoch(),
        }
    }

    pub fn sampler(&self) -> &DistributedSampler {
        &self.sampler
    }

    /// Loads and transforms one image (no collation): what a worker does per image.
    pub fn sample(&self, index: usize, epoch: u64) -> Result<(Sample, Meta)> {
        self.shared.load(index, epoch)
    }

    /// The batches of `epoch` from `start_step` (a resumed run's step offset) on, prefetched by
    /// the worker threads. Dropping the iterator stops and joins them.
    pub fn epoch(&self, epoch: u64, start_step: usize) -> EpochIter {
        let jobs: Vec<IndexBatch> = match &self.size_grouped {
            Some(b) => b.iter().skip(start_step).cloned().collect(),
            None => self.sampler.batches(epoch, start_step).collect(),
        };
        let (job_tx, job_rx) = mpsc::channel::<IndexBatch>();
        let (res_tx, res_rx) = mpsc::channel::<(usize, Result<Batch>)>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let handles = (0..self.workers)
            .map(|_| {
                let (shared, job_rx, res_tx) =
                    (self.shared.clone(), job_rx.clone(), res_tx.clone());
                std::thread::spawn(move || loop {
                    let job = match job_rx.lock().expect("job queue poisoned").recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    let step = job.step;
                    if res_tx.send((step, shared.batch(job, epoch))).is_err() {
                        return;
                    }
                })
            })
            .collect();
        let mut it = EpochIter {
            shared: self.shared.clone(),
            epoch,
            jobs: jobs.into_iter(),
            job_tx: Some(job_tx),
            results: res_rx,
            ready: BTreeMap::new(),
            next_step: None,
            in_flight: 0,
            handles,
        };
        for _ in 0..self.prefetch {
            it.dispatch();
        }
        it
    }
}

/// Where a sample came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub index: usize,
    pub image_id: i64,
    /// (height, width).
    pub orig_size: [i64; 2],
}

impl Shared {
    fn load(&self, index: usize, epoch: u64) -> Result<(Sample, Meta)> {
        let c = &self.cache;
        let rec = c.images()[index];
        let bytes = c.image_bytes(index)?;
        let name = if rec.data_len > 0 {
            c.file_name(index).to_string()
        } else {
            c.image_path(index).display().to_string()
        };
        let image = decode_rgb8(&bytes, &name)?;
        if (image.width, image.height) != (rec.width, rec.height) {
            return Err(DatasetError::CorruptImage {
                name,
                reason: format!(
                    "is {}x{} but the annotations say {}x{}",
                    image.width, image.height, rec.width, rec.height
                ),
            });
        }
        // Upstream drops crowd boxes for training targets (ConvertCocoPolysToMask).
        let (boxes, labels) = c
            .boxes_of(index)
            .iter()
            .filter(|b| b.iscrowd == 0)
            .map(|b| {
                (
                    [
                        b.bbox[0],
                        b.bbox[1],
                        b.bbox[0] + b.bbox[2],
                        b.bbox[1] + b.bbox[3],
                    ],
                    b.category_id,
                )
            })
            .unzip();
        let mut s = Sample::new(image, boxes, labels);
        let ops = match self.mode {
            LoaderMode::Train { seed } => {
                let mut rng = Rng::derive(seed, &[epoch, index as u64]);
                transforms::train_ops(rec.width, rec.height, &self.aug, &mut rng)
            }
            LoaderMode::Eval => transforms::eval_ops(rec.width, rec.height, &self.aug),
        };
        RESIZER.with_borrow_mut(|r| transforms::apply_fused(&mut s, &ops, r));
        Ok((
            s,
            Meta {
                index,
                image_id: rec.id,
                orig_size: [rec.height as i64, rec.width as i64],
            },
        ))
    }

    /// Loads `index`, or the next readable image after it when it cannot be read.
    fn load_or_replace(&self, index: usize, epoch: u64) -> Result<(Sample, Meta)> {
        let n = self.cache.len();
        let mut first_err = None;
        for k in 0..=MAX_REPLACEMENTS.min(n - 1) {
            let i = (index + k) % n;
            match self.load(i, epoch) {
                Ok(x) => return Ok(x),
                Err(e) => {
                    if self.reported.lock().expect("report set poisoned").insert(i) {
                        tracing::warn!(
                            "skipping unreadable image (it will be replaced in every batch): {e}"
                        );
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.expect("at least one attempt"))
    }

    fn batch(&self, job: IndexBatch, epoch: u64) -> Result<Batch> {
        let samples = job
            .indices
            .iter()
            .map(|&i| self.load_or_replace(i, epoch))
            .collect::<Result<Vec<_>>>()?;
        Ok(collate(
            &samples,
            &self.aug,
            self.mode,
            job.step,
            job.padding,
        ))
    }
}

fn check_augmentation(aug: &AugmentationConfig) -> Result<()> {
    let bad = |m: &str| {
        Err(DatasetError::InvalidArgument(format!(
            "dataset.augmentation.{m}"
        )))
    };
    if aug.scales.is_empty() || aug.scales.contains(&0) {
        return bad("scales must list positive sizes");
    }
    if aug.train_random_resize.is_empty() || aug.train_random_resize.contains(&0) {
        return bad("train_random_resize must list positive sizes");
    }
    if aug.input_mean.len() != 3 || aug.input_std.len() != 3 || aug.input_std.contains(&0.0) {
        return bad("input_mean and input_std need 3 values each, std non-zero");
    }
    if aug.train_random_crop_min == 0 || aug.train_random_crop_min > aug.train_random_crop_max {
        return bad("train_random_crop_min must be positive and at most train_random_crop_max");
    }
    if aug.test_random_resize == 0
        || aug.random_resize_max_size == 0
        || aug.fixed_random_crop == Some(0)
        || aug.pad_size_divisor == Some(0)
    {
        return bad("sizes must be positive");
    }
    Ok(())
}

/// (height, width) an image of (h, w) is padded to before batching: its own size, or TAO's
/// orientation-aware fixed size (`fixed_padding`; in evaluation only with `eval_padding: tao`),
/// or the LSJ square.
fn pad_target(h: u32, w: u32, aug: &AugmentationConfig, mode: LoaderMode) -> (u32, u32) {
    let fixed = |short: u32, long: u32| if w >= h { (short, long) } else { (long, short) };
    let (ph, pw) = match mode {
        LoaderMode::Train { .. } => match aug.fixed_random_crop {
            Some(out) => (out, out),
            None if aug.fixed_padding => fixed(
                *aug.scales.iter().max().expect("checked non-empty"),
                aug.random_resize_max_size,
            ),
            None => (h, w),
        },
        LoaderMode::Eval if aug.eval_padding == EvalPadding::None => (h, w),
        LoaderMode::Eval => match aug.pad_size_divisor {
            Some(d) => (h.div_ceil(d) * d, w.div_ceil(d) * d),
            None if aug.fixed_padding => fixed(aug.test_random_resize, EVAL_MAX_SIZE),
            None => (h, w),
        },
    };
    (ph.max(h), pw.max(w))
}

/// Lays the images out as one zero-padded (bottom/right) u8 `[B, 3, H, W]` tensor, applying any
/// deferred flip ([`Sample::mirrored`]) on the way, and builds the padding mask; targets become
/// normalized cxcywh tensors. [`Batch::normalized`] makes the float model input.
pub fn collate(
    samples: &[(Sample, Meta)],
    aug: &AugmentationConfig,
    mode: LoaderMode,
    step: usize,
    padding: usize,
) -> Batch {
    let (mut bh, mut bw) = (0u32, 0u32);
    for (s, _) in samples {
        let (h, w) = pad_target(s.image.height, s.image.width, aug, mode);
        (bh, bw) = (bh.max(h), bw.max(w));
    }
    let (b, hh, ww) = (samples.len(), bh as usize, bw as usize);
    let plane = hh * ww;
    let images = Tensor::empty(
        [b as i64, 3, hh as i64, ww as i64],
        (Kind::Uint8, Device::Cpu),
    );
    let mask = Tensor::empty([b as i64, hh as i64, ww as i64], (Kind::Bool, Device::Cpu));
    // SAFETY: both tensors were just allocated here, contiguous, on the CPU, with exactly these
    // many one-byte elements, and nothing else refers to them yet; a bool is stored as 0 or 1.
    let (pixels, valid) = unsafe {
        (
            std::slice::from_raw_parts_mut(images.data_ptr() as *mut u8, b * 3 * plane),
            std::slice::from_raw_parts_mut(mask.data_ptr() as *mut u8, b * plane),
        )
    };
    for (k, (s, _)) in samples.iter().enumerate() {
        let (w, h) = (s.image.width as usize, s.image.height as usize);
        let img = &mut pixels[k * 3 * plane..(k + 1) * 3 * plane];
        let (r, rest) = img.split_at_mut(plane);
        let (g, bl) = rest.split_at_mut(plane);
        let m = &mut valid[k * plane..(k + 1) * plane];
        for y in 0..h {
            let row = y * ww..y * ww + w;
            layout::deinterleave_row(
                &s.image.data[y * w * 3..(y + 1) * w * 3],
                &mut r[row.clone()],
                &mut g[row.clone()],
                &mut bl[row],
                s.mirrored,
            );
            if w < ww {
                for p in [&mut *r, &mut *g, &mut *bl] {
                    p[y * ww + w..(y + 1) * ww].fill(0);
                }
            }
            m[y * ww..y * ww + w].fill(0);
            m[y * ww + w..(y + 1) * ww].fill(1);
        }
        for p in [r, g, bl] {
            p[h * ww..].fill(0);
        }
        m[h * ww..].fill(1);
    }
    let f = |v: &[f64]| [v[0] as f32, v[1] as f32, v[2] as f32];
    let targets = samples
        .iter()
        .map(|(s, m)| {
            let boxes: Vec<f32> = transforms::normalized_cxcywh(s)
                .into_iter()
                .flatten()
                .collect();
            let labels: Vec<i64> = s.labels.iter().map(|&l| l as i64).collect();
            ImageTarget {
                labels: Tensor::from_slice(&labels),
                boxes: Tensor::from_slice(&boxes).view([labels.len() as i64, 4]),
                image_id: m.image_id,
                orig_size: m.orig_size,
                size: [s.image.height as i64, s.image.width as i64],
            }
        })
        .collect();
    Batch {
        step,
        images,
        mask,
        has_padding: samples
            .iter()
            .any(|(s, _)| (s.image.height, s.image.width) != (bh, bw)),
        mean: f(&aug.input_mean),
        std: f(&aug.input_std),
        targets,
        indices: samples.iter().map(|(_, m)| m.index).collect(),
        padding,
    }
}

/// The batches of one epoch in step order.
pub struct EpochIter {
    shared: Arc<Shared>,
    epoch: u64,
    jobs: std::vec::IntoIter<IndexBatch>,
    job_tx: Option<mpsc::Sender<IndexBatch>>,
    results: mpsc::Receiver<(usize, Result<Batch>)>,
    ready: BTreeMap<usize, Result<Batch>>,
    next_step: Option<usize>,
    in_flight: usize,
    handles: Vec<JoinHandle<()>>,
}

impl EpochIter {
    fn dispatch(&mut self) {
        if self.handles.is_empty() {
            return; // workers = 0: batches are made on the caller's thread
        }
        if let Some(job) = self.jobs.next() {
            self.next_step.get_or_insert(job.step);
            if let Some(tx) = &self.job_tx {
                if tx.send(job).is_ok() {
                    self.in_flight += 1;
                }
            }
        }
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.handles.is_empty() {
            let job = self.jobs.next()?;
            return Some(self.shared.batch(job, self.epoch));
        }
        let want = self.next_step?;
        while !self.ready.contains_key(&want) {
            if self.in_flight == 0 {
                return None;
            }
            match self.results.recv() {
                Ok((step, r)) => {
                    self.in_flight -= 1;
                    self.ready.insert(step, r);
                }
                Err(_) => return None,
            }
        }
        let batch = self.ready.remove(&want).expect("checked above");
        self.next_step = Some(want + 1);
        self.dispatch();
        if self.in_flight == 0 && self.ready.is_empty() && self.jobs.len() == 0 {
            self.next_step = None;
        }
        Some(batch)
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.job_tx = None; // workers finish their job, find the queue closed, and return
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
