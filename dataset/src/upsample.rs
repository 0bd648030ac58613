//! A faster bilinear resample for windows that the resize stretches horizontally (the TAO scales
//! mostly upsample 640×480 sources), equal to fast_image_resize's up to one u8 level.
//!
//! PIL's bilinear filter (Pillow `Resample.c`, `precompute_coeffs`, support 1) has exactly two
//! taps per output pixel when upsampling, so the generic multi-tap horizontal kernel of
//! fast_image_resize wastes most of its work. Here the horizontal pass is our own: per output
//! pixel the first source pixel and two 14-bit fixed-point weights, computed once per call; an
//! AVX2 kernel does eight output pixels per step with one `pshufb` + `pmaddwd` per 4 channel
//! values, a scalar loop the row ends. It runs only over the source rows the vertical pass can
//! reach; the vertical pass stays fast_image_resize's on that strip. Without AVX2 (checked at
//! run time, [`available`]) the transforms keep fast_image_resize for both passes.
//!
//! The order differs from fast_image_resize's (it filters vertically first for u8 images) and
//! is Pillow's when the rows do not shrink (Pillow 13 picks the order per size); each pass
//! rounds to u8 once, so the results differ by at most one level.

use std::cell::RefCell;

use fast_image_resize::{
    images::Image, images::ImageRef, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer,
};

use crate::image::Rgb8;

/// Fraction bits of the fixed-point weights: 1.0 is 16384, which fits an i16 lane of
/// `pmaddwd`, and 255 · 16384 · 2 fits its i32 sum.
const FRACTION_BITS: u32 = 14;
const ONE: i32 = 1 << FRACTION_BITS;
const HALF: i32 = ONE >> 1;
/// Bilinear (triangle) filter support in source pixels, before scaling for downsampling.
const BILINEAR_SUPPORT: f64 = 1.0;

thread_local! {
    /// The horizontally resampled strip the vertical pass reads (reused: a fresh megabyte per
    /// image costs page faults).
    static STRIP: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// PIL's triangle filter.
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// One output pixel of the horizontal pass: `w[0] · src[first] + w[1] · src[first + 1]`, in
/// 14-bit fixed point (`w[0] + w[1]` is exactly 1.0). `first + 1` is a valid pixel unless the
/// row is one pixel wide, where `w[1]` is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tap {
    first: u32,
    w: [i16; 2],
}

/// PIL's bilinear coefficients for upsampling the columns [`left`, `left + width`) of a row of
/// `in_width` pixels to `out_width` pixels: output x is centred at `left + (x + 0.5) · scale`,
/// reads the pixels `xmin..xmax` (clamped to the whole row, not the window) weighted by the
/// triangle at their centres, normalised by their sum.
fn bilinear_taps(in_width: u32, left: f64, width: f64, out_width: u32) -> Vec<Tap> {
    // As fast_image_resize computes it (`in1 - in0`), so both agree to the last bit.
    let scale = ((left + width) - left) / out_width as f64;
    debug_assert!(scale <= 1.0, "the two-tap pass only upsamples ({scale})");
    let last = in_width as i64 - 1;
    (0..out_width)
        .map(|x| {
            let center = left + (x as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero, as `as` does.
            let xmin = ((center - BILINEAR_SUPPORT + 0.5) as i64).max(0);
            let xmax = ((center + BILINEAR_SUPPORT + 0.5) as i64).min(in_width as i64);
            // The triangle is non-zero on an open interval two pixels long: at most two
            // neighbouring pixels (`xmax - xmin` can be 3 by round-off, with a zero weight).
            let (mut first, mut w) = (None, [0.0f64; 2]);
            for px in xmin..xmax {
                let weight = triangle(px as f64 - center + 0.5);
                if weight != 0.0 {
                    w[(px - *first.get_or_insert(px)) as usize] = weight;
                }
            }
            let first = first.expect("a pixel within half a pixel of every centre");
            let sum = w[0] + w[1];
            let w0 = (w[0] / sum * ONE as f64).round() as i32;
            let w1 = if w[1] != 0.0 { ONE - w0 } else { 0 };
            if first == last && last > 0 {
                // One tap on the last pixel: read it as the second of a pair, so that every
                // pair lies inside the row.
                Tap {
                    first: (last - 1) as u32,
                    w: [w1 as i16, w0 as i16],
                }
            } else {
                Tap {
                    first: first as u32,
                    w: [w0 as i16, w1 as i16],
                }
            }
        })
        .collect()
}

/// The horizontal pass for one window and output width, the same for every row.
struct HorizontalPlan {
    in_width: usize,
    taps: Vec<Tap>,
    /// Output pixels `0..8 · pairs.len()` go through the AVX2 kernel, the rest the scalar loop.
    #[cfg(target_arch = "x86_64")]
    pairs: Vec<avx2::Pair>,
}

impl HorizontalPlan {
    /// `simd`: use the AVX2 kernel where the CPU has it.
    fn new(in_width: u32, left: f64, width: f64, out_width: u32, simd: bool) -> Self {
        let taps = bilinear_taps(in_width, left, width, out_width);
        #[cfg(target_arch = "x86_64")]
        let pairs = if simd && is_x86_feature_detected!("avx2") {
            avx2::plan(&taps, in_width as usize)
        } else {
            Vec::new()
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = simd;
        Self {
            in_width: in_width as usize,
            taps,
            #[cfg(target_arch = "x86_64")]
            pairs,
        }
    }

    fn out_width(&self) -> usize {
        self.taps.len()
    }

    /// Resamples one row: `src` holds `in_width` RGB8 pixels, `dst` `out_width`.
    fn row(&self, src: &[u8], dst: &mut [u8]) {
        assert!(src.len() == self.in_width * 3 && dst.len() == self.out_width() * 3);
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if !self.pairs.is_empty() {
            // SAFETY: pairs exist only when the CPU has AVX2, and `avx2::plan` keeps every
            // load inside a row of `in_width` pixels and every store inside `out_width`.
            unsafe { avx2::row(src, dst, &self.pairs) };
            done = 8 * self.pairs.len();
        }
        let last = self.in_width - 1;
        for (tap, out) in self.taps[done..]
            .iter()
            .zip(dst[done * 3..].chunks_exact_mut(3))
        {
            let a = tap.first as usize * 3;
            let b = (tap.first as usize + 1).min(last) * 3;
            let (w0, w1) = (tap.w[0] as i32, tap.w[1] as i32);
            for c in 0..3 {
                let v = (src[a + c] as i32 * w0 + src[b + c] as i32 * w1 + HALF) >> FRACTION_BITS;
                out[c] = v.clamp(0, 255) as u8;
            }
        }
    }

    /// Resamples the source rows `rows` of `img` into consecutive rows of `dst`.
    fn rows(&self, img: &Rgb8, rows: std::ops::Range<usize>, dst: &mut [u8]) {
        let (src_row, dst_row) = (self.in_width * 3, self.out_width() * 3);
        let src = &img.data[rows.start * src_row..rows.end * src_row];
        for (s, d) in src.chunks_exact(src_row).zip(dst.chunks_exact_mut(dst_row)) {
            self.row(s, d);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Tap, FRACTION_BITS, HALF};

    /// Two groups of four output pixels, one per 128-bit lane. In each lane a 16-byte load at
    /// `src[g]` covers the (at most five) source pixels the group reads; `shuffle[r]` spreads
    /// them into zero-extended i16 pairs (tap 0, tap 1) for the channel values `4r..4r + 4` of
    /// the group (pixel-major), and `weights[r]` holds the matching weight pairs.
    #[repr(C, align(32))]
    pub(super) struct Pair {
        shuffle: [[u8; 32]; 3],
        weights: [[i16; 16]; 3],
        src: [u32; 2],
    }

    /// `pshufb` index that writes zero.
    const ZERO: u8 = 0x80;
    /// Source bytes one load covers.
    const LOAD: usize = 16;

    /// The pairs for the longest prefix of the output row whose loads stay inside a source row
    /// of `in_width` pixels and whose stores stay inside the output row (the rest is scalar).
    pub(super) fn plan(taps: &[Tap], in_width: usize) -> Vec<Pair> {
        let out_bytes = taps.len() * 3;
        let mut pairs = Vec::with_capacity(taps.len() / 8);
        for (p, eight) in taps.chunks_exact(8).enumerate() {
            // The second lane stores 16 bytes at 24p + 12; the last 4 are overwritten later.
            if 24 * p + 12 + LOAD > out_bytes {
                break;
            }
            let mut pair = Pair {
                shuffle: [[ZERO; 32]; 3],
                weights: [[0; 16]; 3],
                src: [0; 2],
            };
            for (lane, four) in eight.chunks_exact(4).enumerate() {
                let base = four[0].first as usize;
                let fits = four
                    .iter()
                    .all(|t| (t.first as usize - base) * 3 + 6 <= LOAD);
                if !fits || base * 3 + LOAD > in_width * 3 {
                    return pairs;
                }
                pair.src[lane] = (base * 3) as u32;
                for (k, t) in four.iter().enumerate() {
                    let rel = ((t.first as usize - base) * 3) as u8;
                    for c in 0..3u8 {
                        let value = 3 * k + c as usize;
                        let (r, slot) = (value / 4, value % 4);
                        let at = 16 * lane + 4 * slot;
                        pair.shuffle[r][at..at + 4].copy_from_slice(&[
                            rel + c,
                            ZERO,
                            rel + 3 + c,
                            ZERO,
                        ]);
                        let at = 8 * lane + 2 * slot;
                        pair.weights[r][at..at + 2].copy_from_slice(&t.w);
                    }
                }
            }
            pairs.push(pair);
        }
        pairs
    }

    /// Output pixels `0..8 · pairs.len()` of one row.
    ///
    /// # Safety
    /// The CPU has AVX2; `pairs` come from [`plan`] for the row widths of `src` and `dst`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn row(src: &[u8], dst: &mut [u8], pairs: &[Pair]) {
        let round = _mm256_set1_epi32(HALF);
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for (p, pair) in pairs.iter().enumerate() {
            debug_assert!(pair.src[1] as usize + LOAD <= src.len() && 24 * p + 28 <= dst.len());
            // SAFETY: `plan` checked both loads against the row length.
            let px = unsafe {
                _mm256_loadu2_m128i(
                    s.add(pair.src[1] as usize) as *const __m128i,
                    s.add(pair.src[0] as usize) as *const __m128i,
                )
            };
            let mut sums = [_mm256_setzero_si256(); 3];
            for (r, sum) in sums.iter_mut().enumerate() {
                // SAFETY: 32-byte arrays, read unaligned.
                let (shuffle, weights) = unsafe {
                    (
                        _mm256_loadu_si256(pair.shuffle[r].as_ptr() as *const __m256i),
                        _mm256_loadu_si256(pair.weights[r].as_ptr() as *const __m256i),
                    )
                };
                let products = _mm256_madd_epi16(_mm256_shuffle_epi8(px, shuffle), weights);
                *sum = _mm256_srai_epi32::<{ FRACTION_BITS as i32 }>(_mm256_add_epi32(
                    products, round,
                ));
            }
            // Per lane: bytes 0..12 are the group's 12 channel values in order.
            let bytes = _mm256_packus_epi16(
                _mm256_packs_epi32(sums[0], sums[1]),
                _mm256_packs_epi32(sums[2], sums[2]),
            );
            // SAFETY: `plan` keeps 24p + 28 within the output row; bytes 24p + 24.. are
            // rewritten by the next pair or the scalar tail.
            unsafe {
                let out = d.add(24 * p);
                _mm_storeu_si128(out as *mut __m128i, _mm256_castsi256_si128(bytes));
                _mm_storeu_si128(
                    out.add(12) as *mut __m128i,
                    _mm256_extracti128_si256::<1>(bytes),
                );
            }
        }
    }
}

/// Whether the fast path pays: with AVX2 its horizontal pass is 3-4x faster than
/// fast_image_resize's (640×480 → 853×480: 0.26 vs 0.83 ms); the scalar loop alone (used for
/// the row ends) is slower than fast_image_resize's SSE4.1/NEON kernels (2.8 ms).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Resamples the window (`left`, `top`, `width`, `height`) of `img`, in source pixels, to
/// `out_w` × `out_h` with PIL's bilinear filter, for `width <= out_w` (horizontal upsampling);
/// vertically anything. Pixels outside the window are read as the full-image resize reads them.
pub(crate) fn resample(
    img: &Rgb8,
    window: [f64; 4],
    out_w: u32,
    out_h: u32,
    resizer: &mut Resizer,
) -> Rgb8 {
    resample_with(img, window, out_w, out_h, resizer, true)
}

fn resample_with(
    img: &Rgb8,
    window: [f64; 4],
    out_w: u32,
    out_h: u32,
    resizer: &mut Resizer,
    simd: bool,
) -> Rgb8 {
    let [left, top, width, height] = window;
    debug_assert!(width <= out_w as f64 && out_w > 0 && out_h > 0);
    let plan = HorizontalPlan::new(img.width, left, width, out_w, simd);
    let row_bytes = out_w as usize * 3;
    // fast_image_resize's test: an integer top and the same height need no vertical pass.
    if out_h as f64 == height && top == top.round() {
        let top = top as usize;
        let mut data = vec![0; row_bytes * out_h as usize];
        plan.rows(img, top..top + out_h as usize, &mut data);
        return Rgb8 {
            width: out_w,
            height: out_h,
            data,
        };
    }
    // The rows the vertical filter reaches, with a margin so that none of its taps is clamped
    // at the strip's edges unless the full image clamps it there too.
    let support = BILINEAR_SUPPORT * (height / out_h as f64).max(1.0);
    let first = ((top - support).floor() - 1.0).max(0.0) as usize;
    let end = (((top + height + support).ceil() + 1.0) as usize).min(img.height as usize);
    let rows = end - first;
    STRIP.with_borrow_mut(|strip| {
        if strip.len() < rows * row_bytes {
            strip.resize(rows * row_bytes, 0);
        }
        let strip = &mut strip[..rows * row_bytes];
        plan.rows(img, first..end, strip);
        let src = ImageRef::new(out_w, rows as u32, strip, PixelType::U8x3)
            .expect("strip buffer matches its size");
        let mut dst = Image::new(out_w, out_h, PixelType::U8x3);
        let strip_top = top - first as f64;
        let opts = ResizeOptions::new()
            .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
            .crop(
                0.0,
                strip_top,
                out_w as f64,
                height.min(rows as f64 - strip_top),
            );
        resizer
            .resize(&src, &mut dst, &opts)
            .expect("same pixel type, non-empty sizes, window inside the strip");
        Rgb8 {
            width: out_w,
            height: out_h,
            data: dst.into_vec(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::transforms::resample_convolution;

    fn noise(w: u32, h: u32, rng: &mut Rng) -> Rgb8 {
        Rgb8 {
            width: w,
            height: h,
            data: (0..w * h * 3).map(|_| rng.below(256) as u8).collect(),
        }
    }

    /// A random window of a `w` × `h` image: often touching an edge, sometimes one pixel or
    /// less wide, with fractional borders.
    fn window(w: u32, h: u32, rng: &mut Rng) -> [f64; 4] {
        let side = |rng: &mut Rng, n: u32| -> (f64, f64) {
            let n = n as f64;
            match rng.below(5) {
                0 => (0.0, n),
                1 => {
                    let size = rng.uniform(0.3, n).min(n);
                    (0.0, size)
                }
                2 => {
                    let size = rng.uniform(0.3, n).min(n);
                    (n - size, size)
                }
                3 => {
                    let start = rng.below(n as usize) as f64;
                    (start, (n - start).min(1.0))
                }
                _ => {
                    let start = rng.uniform(0.0, n - 0.3);
                    (start, rng.uniform(0.3, n - start))
                }
            }
        };
        let (l, ww) = side(rng, w);
        let (t, wh) = side(rng, h);
        [l, t, ww, wh]
    }

    #[test]
    fn simd_and_scalar_rows_agree_bit_for_bit() {
        let mut rng = Rng::new(7);
        let mut simd_pixels = 0;
        for case in 0..300 {
            let w = match case % 3 {
                0 => 1 + rng.below(40) as u32,
                1 => 40 + rng.below(700) as u32,
                _ => 640,
            };
            let [left, _, width, _] = window(w, 1, &mut rng);
            let out_w = (width.ceil() as u32).max(1) + rng.below(3 * w as usize + 8) as u32;
            let img = noise(w, 1, &mut rng);
            let fast = HorizontalPlan::new(w, left, width, out_w, true);
            let scalar = HorizontalPlan::new(w, left, width, out_w, false);
            let mut a = vec![0; out_w as usize * 3];
            let mut b = vec![1; out_w as usize * 3];
            fast.row(&img.data, &mut a);
            scalar.row(&img.data, &mut b);
            assert_eq!(a, b, "{w} px, window {left}+{width} -> {out_w}");
            #[cfg(target_arch = "x86_64")]
            {
                simd_pixels += 8 * fast.pairs.len();
            }
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            assert!(
                simd_pixels > 100_000,
                "the AVX2 kernel ran on {simd_pixels} pixels"
            );
        }
        let _ = simd_pixels;
    }

    /// fast_image_resize filters vertically first, we horizontally first; each pass rounds once,
    /// so the results are within one level. Windows touch every edge, image widths are not
    /// multiples of 4 or 8, and some windows are a pixel wide or less.
    #[test]
    fn matches_fast_image_resize_within_one_level() {
        let mut rng = Rng::new(11);
        let mut r = Resizer::new();
        let (mut total, mut off, mut signed, mut mixed) = (0usize, 0usize, 0i64, 0);
        for case in 0..400 {
            let (w, h) = if case % 4 == 0 {
                (1 + rng.below(12) as u32, 1 + rng.below(12) as u32)
            } else {
                (5 + rng.below(90) as u32, 3 + rng.below(70) as u32)
            };
            let img = noise(w, h, &mut rng);
            let win = window(w, h, &mut rng);
            let out_w = (win[2].ceil() as u32).max(1) + rng.below(2 * w as usize + 4) as u32;
            // Up or down vertically (down up to 4x), sometimes the window's own height.
            let out_h = match rng.below(3) {
                0 => ((win[3] * rng.uniform(0.25, 1.0)).round() as u32).max(1),
                1 => (win[3].ceil() as u32).max(1) + rng.below(2 * h as usize + 2) as u32,
                _ => (win[3].round() as u32).max(1),
            };
            mixed += ((out_h as f64) < win[3] * 0.9) as u32;
            for simd in [true, false] {
                let got = resample_with(&img, win, out_w, out_h, &mut r, simd);
                let want = resample_convolution(&img, win, out_w, out_h, &mut r);
                assert_eq!((got.width, got.height), (out_w, out_h));
                for (i, (a, b)) in got.data.iter().zip(&want.data).enumerate() {
                    assert!(
                        a.abs_diff(*b) <= 1,
                        "{w}x{h} window {win:?} -> {out_w}x{out_h} (simd {simd}): \
                         value {i}: {a} vs {b}"
                    );
                    off += (a != b) as usize;
                    signed += *a as i64 - *b as i64;
                }
                total += got.data.len();
            }
        }
        assert!(mixed > 50, "{mixed} cases shrink vertically");
        // Noise is the worst case: every intermediate value rounds at random. Measured: 20% of
        // the values differ, by one level, without bias (signed sum -314).
        assert!(off * 4 < total, "{off} of {total} values differ");
        assert!(
            signed.unsigned_abs() * 100 < off as u64,
            "biased: {signed} over {off}"
        );
    }

    #[test]
    fn a_flat_image_stays_flat_and_taps_stay_in_the_row() {
        let mut r = Resizer::new();
        for (w, h) in [(1u32, 1u32), (1, 9), (9, 1), (2, 2), (37, 23)] {
            let img = Rgb8 {
                width: w,
                height: h,
                data: [17u8, 200, 255].repeat((w * h) as usize),
            };
            for out in [w, w + 1, 3 * w + 5] {
                let win = [0.0, 0.0, w as f64, h as f64];
                let got = resample_with(&img, win, out, out, &mut r, true);
                assert_eq!(got.data, [17u8, 200, 255].repeat((out * out) as usize));
                for t in bilinear_taps(w, 0.0, w as f64, out) {
                    assert!(t.first as u64 + 1 < w.max(2) as u64);
                    assert_eq!(t.w[0] as i32 + t.w[1] as i32, ONE);
                    assert!(t.w.iter().all(|&x| x >= 0));
                }
            }
        }
    }

    /// 93 -> 153 puts output 25's centre at 15.499999999999998, where `center + 1.5` rounds up
    /// to 17: three candidate pixels 14..17, the last with weight zero (it indexed past the two
    /// weights; the train transform's tests found it).
    #[test]
    fn a_centre_just_below_a_half_has_a_third_candidate_with_zero_weight() {
        let taps = bilinear_taps(93, 0.0, 93.0, 153);
        // Pixel 14 weighs 2e-15, 15 the rest, 16 nothing.
        assert_eq!(
            taps[25],
            Tap {
                first: 14,
                w: [0, ONE as i16]
            }
        );
        let img = noise(93, 4, &mut Rng::new(3));
        let mut r = Resizer::new();
        let got = resample_with(&img, [0.0, 0.0, 93.0, 4.0], 153, 4, &mut r, true);
        let want = resample_convolution(&img, [0.0, 0.0, 93.0, 4.0], 153, 4, &mut r);
        assert!(got
            .data
            .iter()
            .zip(&want.data)
            .all(|(a, b)| a.abs_diff(*b) <= 1));
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex fixture"))
            .collect()
    }

    /// Pillow (22 fraction bits) is within one level everywhere, and equal almost everywhere
    /// where it also filters horizontally first (Pillow 13 filters vertically first for some
    /// sizes; fast_image_resize always does for u8).
    /// Fixture: dataset/tests/golden/make_upsample_fixture.py (Pillow 13.0).
    #[test]
    fn matches_pillow_within_one_level() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../tests/golden/upsample_pil.json")).unwrap();
        let mut r = Resizer::new();
        let (mut same_order, mut off) = (0, 0);
        for case in fixture["cases"].as_array().unwrap() {
            let n = |k: &str| case[k].as_u64().unwrap() as u32;
            let img = Rgb8 {
                width: n("width"),
                height: n("height"),
                data: hex(case["pixels"].as_str().unwrap()),
            };
            let w = &case["window"];
            let win = [0, 1, 2, 3].map(|i| w[i].as_f64().unwrap());
            let want = hex(case["expected"].as_str().unwrap());
            let horizontal_first = case["horizontal_first"].as_bool().unwrap();
            for simd in [true, false] {
                let got = resample_with(&img, win, n("out_width"), n("out_height"), &mut r, simd);
                assert_eq!(got.data.len(), want.len());
                for (i, (a, b)) in got.data.iter().zip(&want).enumerate() {
                    assert!(
                        a.abs_diff(*b) <= 1,
                        "{win:?} value {i}: {a} vs Pillow's {b}"
                    );
                    off += (horizontal_first && a != b) as usize;
                }
                same_order += horizontal_first as usize * want.len();
            }
        }
        // Measured: 0.5% (the rounding of 14-bit weights).
        assert!(
            same_order > 20_000 && off * 100 < same_order,
            "{off} of {same_order} values differ from Pillow's"
        );
    }
}
