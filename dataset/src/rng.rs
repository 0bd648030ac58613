//! A small deterministic generator (SplitMix64) for everything that must repeat exactly per seed:
//! the synthetic dataset, the sampler's shuffle, the augmentation draws. Owning it (rather than
//! depending on a crate's generator) keeps streams stable across dependency upgrades.

/// SplitMix64 (Steele, Lea, Flood 2014): 64-bit state, passes BigCrush, trivially seekable by
/// deriving child streams with [`Rng::derive`].
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// An independent stream for `(seed, keys…)`, e.g. `(seed, epoch)` or `(seed, image index)`.
    pub fn derive(seed: u64, keys: &[u64]) -> Self {
        let mut h = mix(seed ^ 0x6A09_E667_F3BC_C909);
        for &k in keys {
            h = mix(h ^ mix(k.wrapping_add(GOLDEN_GAMMA)));
        }
        Self { state: h }
    }

    /// Output `j` (0-based) of `Rng::new(seed)` without stepping through the ones before it.
    pub fn output_at(seed: u64, j: u64) -> u64 {
        mix(seed.wrapping_add(j.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix(self.state)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    /// Uniform integer in [lo, hi] (inclusive, like Python's `random.randint`).
    pub fn range_inclusive(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "empty range {lo}..={hi}");
        let span = hi - lo + 1;
        if span == 0 {
            return self.next_u64();
        }
        // Lemire's multiply-shift; the bias is below 2^-64 · span, irrelevant here.
        lo + ((self.next_u64() as u128 * span as u128) >> 64) as u64
    }

    /// Uniform index in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "below(0)");
        self.range_inclusive(0, n as u64 - 1) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// SplitMix64's output function: a bijective 64-bit mix (also a good hash of a combined key).
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_at_seeks_the_stream() {
        let mut r = Rng::new(99);
        for j in 0..5 {
            assert_eq!(Rng::output_at(99, j), r.next_u64());
        }
    }

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // Reference values of SplitMix64 seeded with 1234567 (Vigna's splitmix64.c).
        let mut r = Rng::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
        assert_eq!(r.next_u64(), 9817491932198370423);
    }

    #[test]
    fn ranges_stay_inside_and_cover_their_ends() {
        let mut r = Rng::new(7);
        let mut seen = [false; 5];
        for _ in 0..1000 {
            let v = r.range_inclusive(3, 7);
            assert!((3..=7).contains(&v));
            seen[(v - 3) as usize] = true;
            let f = r.f64();
            assert!((0.0..1.0).contains(&f));
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn derived_streams_differ_and_repeat() {
        let a: Vec<u64> = (0..4).map(|_| Rng::derive(5, &[1]).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::derive(5, &[1]).next_u64(),
            Rng::derive(5, &[2]).next_u64()
        );
        assert_ne!(
            Rng::derive(5, &[1, 0]).next_u64(),
            Rng::derive(5, &[0, 1]).next_u64()
        );
    }
}
