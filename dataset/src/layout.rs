//! Interleaved RGB8 rows → three u8 planes (HWC → CHW), optionally mirrored: collation's inner
//! loop, where a deferred horizontal flip is applied for free. SSSE3 byte shuffles on x86-64
//! (16 pixels per step), a scalar loop elsewhere and for the tail.

/// Splits `src` (`3·n` bytes, n = `r.len()`) into the planes `r`, `g`, `b`; with `mirror`, pixel
/// `x` goes to position `n − 1 − x`.
pub fn deinterleave_row(src: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8], mirror: bool) {
    let n = r.len();
    assert!(src.len() == 3 * n && g.len() == n && b.len() == n);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("ssse3") {
        // SAFETY: the CPU has SSSE3; the lengths are checked above.
        let done = unsafe { ssse3::deinterleave(src, r, g, b, mirror) };
        scalar(src, r, g, b, mirror, done);
        return;
    }
    scalar(src, r, g, b, mirror, 0);
}

/// Pixels `from..n` one at a time.
fn scalar(src: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8], mirror: bool, from: usize) {
    let n = r.len();
    for x in from..n {
        let o = if mirror { n - 1 - x } else { x };
        r[o] = src[3 * x];
        g[o] = src[3 * x + 1];
        b[o] = src[3 * x + 2];
    }
}

#[cfg(target_arch = "x86_64")]
mod ssse3 {
    use std::arch::x86_64::*;

    /// `pshufb` masks: for channel c, source register k (bytes 16k..16k+16 of 48), output lane j
    /// takes pixel p = j (or 15 − j mirrored) when its byte 3p + c lies in register k, else 0.
    const fn masks(mirror: bool) -> [[[u8; 16]; 3]; 3] {
        let mut m = [[[0x80u8; 16]; 3]; 3];
        let mut c = 0;
        while c < 3 {
            let mut j = 0;
            while j < 16 {
                let p = if mirror { 15 - j } else { j };
                let byte = 3 * p + c;
                m[c][byte / 16][j] = (byte % 16) as u8;
                j += 1;
            }
            c += 1;
        }
        m
    }
    const FORWARD: [[[u8; 16]; 3]; 3] = masks(false);
    const MIRRORED: [[[u8; 16]; 3]; 3] = masks(true);

    /// Whole 16-pixel groups; returns how many pixels were done.
    ///
    /// # Safety
    /// The CPU must support SSSE3; `src.len() == 3 * r.len()`, `g` and `b` as long as `r`.
    #[target_feature(enable = "ssse3")]
    pub(super) unsafe fn deinterleave(
        src: &[u8],
        r: &mut [u8],
        g: &mut [u8],
        b: &mut [u8],
        mirror: bool,
    ) -> usize {
        let n = r.len();
        let groups = n / 16;
        let m = if mirror { &MIRRORED } else { &FORWARD };
        let load = |a: &[u8; 16]| unsafe { _mm_loadu_si128(a.as_ptr().cast()) };
        let mk: [[__m128i; 3]; 3] = [
            [load(&m[0][0]), load(&m[0][1]), load(&m[0][2])],
            [load(&m[1][0]), load(&m[1][1]), load(&m[1][2])],
            [load(&m[2][0]), load(&m[2][1]), load(&m[2][2])],
        ];
        let s = src.as_ptr();
        let planes = [r.as_mut_ptr(), g.as_mut_ptr(), b.as_mut_ptr()];
        for k in 0..groups {
            // SAFETY: group k reads bytes 48k..48k+48 < 3n and writes 16 bytes at o ≤ n − 16.
            unsafe {
                let a0 = _mm_loadu_si128(s.add(48 * k).cast());
                let a1 = _mm_loadu_si128(s.add(48 * k + 16).cast());
                let a2 = _mm_loadu_si128(s.add(48 * k + 32).cast());
                let o = if mirror { n - 16 * (k + 1) } else { 16 * k };
                for (c, plane) in planes.iter().enumerate() {
                    let v = _mm_or_si128(
                        _mm_or_si128(
                            _mm_shuffle_epi8(a0, mk[c][0]),
                            _mm_shuffle_epi8(a1, mk[c][1]),
                        ),
                        _mm_shuffle_epi8(a2, mk[c][2]),
                    );
                    _mm_storeu_si128(plane.add(o).cast(), v);
                }
            }
        }
        groups * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_scalar_loop_for_every_width_and_both_directions() {
        for n in [0usize, 1, 5, 15, 16, 17, 31, 32, 33, 47, 100, 1066] {
            let src: Vec<u8> = (0..3 * n).map(|i| (i * 7 + i / 3) as u8).collect();
            for mirror in [false, true] {
                let mut got = [vec![0u8; n], vec![0u8; n], vec![0u8; n]];
                let [r, g, b] = &mut got;
                deinterleave_row(&src, r, g, b, mirror);
                for x in 0..n {
                    let o = if mirror { n - 1 - x } else { x };
                    for c in 0..3 {
                        assert_eq!(
                            got[c][o],
                            src[3 * x + c],
                            "n {n} x {x} c {c} mirror {mirror}"
                        );
                    }
                }
            }
        }
    }
}
