//! Activation ranges from calibration data. Every method sees each tensor's values over all the
//! calibration images:
//! - `minmax`: the smallest and largest value (asymmetric range);
//! - `max`: ±the largest magnitude (symmetric range, ModelOpt's `max`);
//! - `percentile`: the `p`-th and `(100 − p)`-th percentiles of the values (asymmetric; clips
//!   the rare outliers that stretch a min-max range);
//! - `entropy`: TensorRT's KL-divergence calibration: the clipping threshold `t` of |x| whose
//!   quantized distribution (128 levels; 256 for a tensor that is never negative) is closest to
//!   the observed one, giving the range `[max(min, −t), min(max, t)]`.
//!
//! `minmax` and `max` need one pass over the data ([`Extremes`]); the others a second pass that
//! fills a [`Histogram`] over the first pass's range.

/// Bins of the calibration histograms (TensorRT's entropy calibrator uses 2048).
pub const BINS: usize = 2048;

/// `quantize.algorithm`: how an activation's range is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    MinMax,
    Max,
    /// Keep the central `p` percent (e.g. 99.99).
    Percentile(f64),
    Entropy,
}

impl Method {
    /// Whether the method needs a histogram pass after the min/max pass.
    pub fn needs_histogram(self) -> bool {
        matches!(self, Self::Percentile(_) | Self::Entropy)
    }
}

/// Smallest and largest value seen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Extremes {
    pub min: f32,
    pub max: f32,
}

impl Default for Extremes {
    fn default() -> Self {
        Self {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }
}

impl Extremes {
    pub fn observe(&mut self, values: &[f32]) {
        for &v in values {
            if v.is_finite() {
                self.min = self.min.min(v);
                self.max = self.max.max(v);
            }
        }
    }

    fn seen(&self) -> bool {
        self.min <= self.max
    }
}

/// Counts of the values (`signed`) or of their magnitudes over a fixed range.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// Values (`false`: magnitudes |x|) binned over `[lo, hi]`.
    signed: bool,
    lo: f32,
    hi: f32,
    counts: Vec<u64>,
}

impl Histogram {
    /// The histogram a method fills for a tensor whose extremes are `e`.
    pub fn for_method(method: Method, e: Extremes) -> Self {
        let (signed, lo, hi) = match method {
            Method::Entropy => (false, 0.0, e.min.abs().max(e.max.abs())),
            _ => (true, e.min, e.max),
        };
        Self {
            signed,
            lo,
            hi,
            counts: vec![0; BINS],
        }
    }

    fn width(&self) -> f32 {
        (self.hi - self.lo) / BINS as f32
    }

    pub fn observe(&mut self, values: &[f32]) {
        let w = self.width();
        if w <= 0.0 {
            self.counts[0] += values.len() as u64;
            return;
        }
        for &v in values {
            let x = if self.signed { v } else { v.abs() };
            if !x.is_finite() {
                continue;
            }
            let b = (((x - self.lo) / w) as isize).clamp(0, BINS as isize - 1);
            self.counts[b as usize] += 1;
        }
    }

    /// The value below which `q` (0..1) of the counts lie (the upper edge of that bin).
    fn quantile(&self, q: f64) -> f32 {
        let total: u64 = self.counts.iter().sum();
        let target = (q * total as f64).ceil() as u64;
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= target.max(1) {
                return self.lo + self.width() * (i + 1) as f32;
            }
        }
        self.hi
    }
}

/// The range `[lo, hi]` an activation is quantized over (always containing 0, as the integer
/// zero point must represent 0 exactly).
pub fn range(method: Method, e: Extremes, hist: Option<&Histogram>) -> (f32, f32) {
    if !e.seen() {
        return (0.0, 0.0);
    }
    let (lo, hi) = match (method, hist) {
        (Method::MinMax, _) => (e.min, e.max),
        (Method::Max, _) => {
            let a = e.min.abs().max(e.max.abs());
            (-a, a)
        }
        (Method::Percentile(p), Some(h)) => {
            let tail = (100.0 - p) / 100.0;
            let lo = if e.min < 0.0 {
                h.quantile(tail) - h.width()
            } else {
                e.min
            };
            (lo.max(e.min), h.quantile(1.0 - tail).min(e.max))
        }
        (Method::Entropy, Some(h)) => {
            let levels = if e.min >= 0.0 { 256 } else { 128 };
            let t = entropy_threshold(&h.counts, levels) as f32 * h.width();
            (e.min.max(-t), e.max.min(t))
        }
        (_, None) => (e.min, e.max),
    };
    (lo.min(0.0), hi.max(0.0))
}

/// TensorRT's entropy calibration over a histogram of |x|: for each candidate threshold bin
/// `i ≥ levels`, the reference distribution is the first `i` bins with the rest folded into the
/// last; it is quantized to `levels` bins and expanded back (each level's mass spread evenly over
/// its non-empty bins); the `i` with the smallest KL(reference ‖ quantized) wins. Returns the
/// threshold in bins.
pub fn entropy_threshold(counts: &[u64], levels: usize) -> usize {
    let n = counts.len();
    if n <= levels {
        return n;
    }
    let last_nonzero = counts.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1);
    if last_nonzero <= levels {
        return levels.max(last_nonzero);
    }
    let mut best = (f64::INFINITY, n);
    for i in levels..=n {
        let mut p: Vec<f64> = counts[..i].iter().map(|&c| c as f64).collect();
        let outliers: f64 = counts[i..].iter().map(|&c| c as f64).sum();
        p[i - 1] += outliers;
        // Quantize the first i bins (original counts) into `levels` merged bins.
        let mut q = vec![0f64; i];
        for l in 0..levels {
            let start = l * i / levels;
            let end = ((l + 1) * i / levels).max(start + 1);
            let mass: f64 = counts[start..end].iter().map(|&c| c as f64).sum();
            let nonzero = counts[start..end].iter().filter(|&&c| c > 0).count();
            if nonzero > 0 {
                let share = mass / nonzero as f64;
                for j in start..end {
                    if counts[j] > 0 {
                        q[j] = share;
                    }
                }
            }
        }
        let kl = kl_divergence(&p, &q);
        if kl < best.0 {
            best = (kl, i);
        }
    }
    best.1
}

/// KL(p ‖ q) of two unnormalised distributions (bins where p is 0 contribute nothing; a bin
/// with p > 0 and q = 0 gets q a small mass, as TensorRT's smoothing does).
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let sp: f64 = p.iter().sum();
    let sq: f64 = q.iter().sum();
    if sp == 0.0 || sq == 0.0 {
        return f64::INFINITY;
    }
    p.iter()
        .zip(q)
        .filter(|(&a, _)| a > 0.0)
        .map(|(&a, &b)| {
            let pa = a / sp;
            let qb = (b / sq).max(1e-12);
            pa * (pa / qb).ln()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extremes(v: &[f32]) -> Extremes {
        let mut e = Extremes::default();
        e.observe(v);
        e
    }

    #[test]
    fn minmax_and_max_ranges_contain_zero() {
        let v = [0.5f32, 2.0, 3.0];
        assert_eq!(range(Method::MinMax, extremes(&v), None), (0.0, 3.0));
        let v = [-1.0f32, 2.0];
        assert_eq!(range(Method::MinMax, extremes(&v), None), (-1.0, 2.0));
        assert_eq!(range(Method::Max, extremes(&v), None), (-2.0, 2.0));
    }

    #[test]
    fn percentile_clips_a_lone_outlier() {
        // 10 000 values in [0, 1) and one at 100: the 99.9th percentile ignores the outlier.
        let mut v: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0).collect();
        v.push(100.0);
        let e = extremes(&v);
        let m = Method::Percentile(99.9);
        let mut h = Histogram::for_method(m, e);
        h.observe(&v);
        let (lo, hi) = range(m, e, Some(&h));
        assert_eq!(lo, 0.0);
        assert!(hi > 0.9 && hi < 1.2, "hi {hi}");
    }

    #[test]
    fn entropy_clips_a_long_tail_and_keeps_a_flat_range() {
        // Flat in [0, 1]: nothing to clip.
        let flat: Vec<f32> = (0..20_000).map(|i| i as f32 / 20_000.0).collect();
        let e = extremes(&flat);
        let mut h = Histogram::for_method(Method::Entropy, e);
        h.observe(&flat);
        let (_, hi) = range(Method::Entropy, e, Some(&h));
        assert!(hi > 0.95, "flat data keeps its range, got {hi}");
        // Exponential(1) samples (max ≈ 12) and ten outliers at 100: the threshold drops the
        // outliers and keeps the bulk.
        let mut tail: Vec<f32> = (1..=100_000)
            .map(|i| -((i as f32 - 0.5) / 100_000.0).ln())
            .collect();
        tail.extend([100.0f32; 10]);
        let e = extremes(&tail);
        let mut h = Histogram::for_method(Method::Entropy, e);
        h.observe(&tail);
        let (_, hi) = range(Method::Entropy, e, Some(&h));
        assert!(hi > 10.0 && hi < 30.0, "max {} clipped to {hi}", e.max);
    }

    #[test]
    fn an_unseen_tensor_gets_an_empty_range() {
        assert_eq!(range(Method::MinMax, Extremes::default(), None), (0.0, 0.0));
    }
}
