//! `nn.Dropout` for CPU tensors with a parallel mask generator.
//!
//! libtorch's CPU `bernoulli_` (what `F.dropout` draws its mask with) runs on one thread and
//! pulls every element from the Mersenne-Twister generator; only Intel CPUs get its MKL path.
//! With TAO's `dropout_ratio` 0.3 that was ~8% of a CPU training step on one thread and more on
//! several (`ddetr bench step`). Here the mask comes from a counter-based hash (two rounds of a
//! 32-bit integer hash over the element index, keyed by one seed drawn from libtorch's
//! generator), eight elements per AVX2 instruction on the calling thread (extra threads only
//! fought libtorch's spinning OpenMP workers): reseeding libtorch reproduces it (activation
//! checkpointing's recompute and resumed runs rely on that). `ddetr bench step` (TAO defaults,
//! 2 threads), median of 7 in the same minutes: 3.79 → 3.02 s and 4.27 → 3.58 s.
//!
//! Semantics are `F.dropout`'s: each element kept with probability 1 − p and scaled by 1/(1 − p),
//! the gradient masked and scaled alike (an autograd multiply by a constant mask). The random
//! stream differs from libtorch's, the distribution does not (p is applied with 2⁻³² resolution).
//! Tensors elsewhere than the CPU use libtorch's dropout (fused on CUDA).

use ddetr_dataset::rng::Rng;
use tch::{Device, Kind, Tensor};

/// `F.dropout(x, p, training)`.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return x.shallow_clone();
    }
    if p >= 1.0 || x.device() != Device::Cpu || !matches!(x.kind(), Kind::Float | Kind::Double) {
        return x.dropout(p, train);
    }
    x * mask(&x.size(), x.kind(), p)
}

/// A CPU tensor of `shape` holding 0 (probability `p`) or 1/(1 − p).
pub fn mask(shape: &[i64], kind: Kind, p: f64) -> Tensor {
    // One draw from libtorch's generator keys the whole mask.
    let seed =
        Tensor::randint_low(0, i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]) as u64;
    let n: usize = shape.iter().map(|&d| d as usize).product();
    let threshold = (p * 4_294_967_296.0).round().min(u32::MAX as f64) as u32;
    let scale = 1.0 / (1.0 - p);
    let out = Tensor::empty(shape, (kind, Device::Cpu));
    match kind {
        Kind::Float => {
            // SAFETY: `out` was just allocated, contiguous, with n f32 elements, unshared.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, n) };
            fill_range(dst, 0, seed, threshold, scale as f32);
        }
        Kind::Double => {
            // SAFETY: as above, n f64 elements.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f64, n) };
            fill_range(dst, 0, seed, threshold, scale);
        }
        other => unreachable!("dropout masks are float or double, not {other:?}"),
    }
    out
}

/// Elements `start..start + dst.len()` of the mask: element i keeps when the hash of i is at
/// least `threshold`. The stream is split at multiples of 2³² so the index fits 32 bits.
fn fill_range<T: Copy + Default>(dst: &mut [T], start: u64, seed: u64, threshold: u32, keep: T) {
    let (mut dst, mut start) = (dst, start);
    while !dst.is_empty() {
        let room = ((1u64 << 32) - (start & 0xffff_ffff)).min(dst.len() as u64) as usize;
        let (now, rest) = dst.split_at_mut(room);
        let key = mix(seed, start >> 32);
        let keys = [key as u32, (key >> 32) as u32];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            unsafe { hashed_avx2(now, start as u32, keys, threshold, keep) };
        } else {
            hashed(now, start as u32, keys, threshold, keep);
        }
        #[cfg(not(target_arch = "x86_64"))]
        hashed(now, start as u32, keys, threshold, keep);
        (dst, start) = (rest, start + room as u64);
    }
}

/// [`hashed`] compiled for AVX2 (eight 32-bit hashes per instruction).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hashed_avx2<T: Copy + Default>(
    dst: &mut [T],
    start: u32,
    keys: [u32; 2],
    threshold: u32,
    keep: T,
) {
    hashed(dst, start, keys, threshold, keep)
}

/// The loop the compiler vectorizes: two rounds of a 32-bit integer hash per element index.
#[inline(always)]
fn hashed<T: Copy + Default>(dst: &mut [T], start: u32, keys: [u32; 2], threshold: u32, keep: T) {
    for (i, d) in dst.iter_mut().enumerate() {
        let c = start.wrapping_add(i as u32);
        let h = lowbias32(lowbias32(c ^ keys[0]).wrapping_add(keys[1]));
        *d = if h >= threshold { keep } else { T::default() };
    }
}

/// Chris Wellons' `lowbias32` integer hash (a bijection on u32).
#[inline(always)]
fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// SplitMix64's output `j` of the stream keyed by `seed`.
fn mix(seed: u64, j: u64) -> u64 {
    Rng::output_at(seed, j)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_one_minus_p_scaled_and_the_gradient_follows_the_mask() {
        let _rng = crate::torch_rng_lock();
        tch::manual_seed(7);
        let x = Tensor::ones([1000, 1000], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = dropout(&x, 0.3, true);
        let kept = y
            .ne(0.0)
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[]);
        assert!((kept - 0.7).abs() < 0.002, "kept fraction {kept}");
        let vals = y.masked_select(&y.ne(0.0));
        let (lo, hi) = (vals.min().double_value(&[]), vals.max().double_value(&[]));
        assert!((lo - 1.0 / 0.7).abs() < 1e-6 && (hi - 1.0 / 0.7).abs() < 1e-6);
        y.sum(Kind::Float).backward();
        assert!(x.grad().equal(&y.detach()), "grad = mask / (1 - p)");
        // Not train, or p = 0: the identity.
        assert!(dropout(&x, 0.3, false).equal(&x));
        assert!(dropout(&x, 0.0, true).equal(&x));
    }

    #[test]
    fn reseeding_reproduces_the_mask_and_neighbours_are_independent() {
        let _rng = crate::torch_rng_lock();
        let shape = [3, 700_001];
        let draw = || {
            tch::manual_seed(11);
            (
                mask(&shape, Kind::Float, 0.1),
                mask(&shape, Kind::Float, 0.1),
            )
        };
        let (a1, b1) = draw();
        let (a2, b2) = draw();
        assert!(a1.equal(&a2) && b1.equal(&b2));
        assert!(!a1.equal(&b1), "consecutive masks differ");
        let x = a1.ne(0.0).to_kind(Kind::Double).view([-1]);
        let (even, odd) = (x.slice(0, 0, None, 2), x.slice(0, 1, None, 2));
        let n = odd.size()[0];
        let both = (even.narrow(0, 0, n) * &odd)
            .mean(Kind::Double)
            .double_value(&[]);
        assert!((both - 0.81).abs() < 0.003, "P(both kept) {both}");
    }

    #[test]
    fn simd_and_scalar_paths_agree_and_ranges_split_at_two_to_the_32() {
        let threshold = (0.3 * 4_294_967_296.0f64) as u32;
        let mut whole = vec![0f32; 1000];
        fill_range(&mut whole, (1 << 32) - 500, 99, threshold, 2.0);
        // The same elements in two calls, and by the plain loop with the keys of each side.
        let mut parts = vec![0f32; 1000];
        let (lo, hi) = parts.split_at_mut(500);
        fill_range(lo, (1 << 32) - 500, 99, threshold, 2.0);
        fill_range(hi, 1 << 32, 99, threshold, 2.0);
        assert_eq!(whole, parts);
        let mut plain = vec![0f32; 1000];
        let (lo, hi) = plain.split_at_mut(500);
        let keys = |k: u64| [k as u32, (k >> 32) as u32];
        hashed(lo, u32::MAX - 499, keys(mix(99, 0)), threshold, 2.0);
        hashed(hi, 0, keys(mix(99, 1)), threshold, 2.0);
        assert_eq!(whole, plain);
        let kept = whole.iter().filter(|&&v| v == 2.0).count();
        assert!((640..760).contains(&kept), "{kept}");
    }

    #[test]
    fn double_tensors_and_p_one() {
        let _rng = crate::torch_rng_lock();
        tch::manual_seed(3);
        let x = Tensor::ones([4097], (Kind::Double, Device::Cpu));
        let y = dropout(&x, 0.5, true);
        let kept = y.ne(0.0).sum(Kind::Int64).int64_value(&[]);
        assert!((1900..2200).contains(&kept), "{kept}");
        assert_eq!(
            dropout(&x, 1.0, true)
                .abs()
                .sum(Kind::Double)
                .double_value(&[]),
            0.0
        );
    }
}
