//! A small, portable PRNG (SplitMix64).
//!
//! Only integer arithmetic is used to produce values; `unit()` converts 53 random
//! bits to an `f64` exactly, so every draw is identical on every platform.

/// SplitMix64 (Steele, Lea & Flood 2014). Passes BigCrush; plenty for scene sampling.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Decorrelate nearby seeds before the first draw.
        let mut r = Rng { state: seed ^ 0x5EED_F215_4E75_0001 };
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform integer in `0..n` (unbiased; Lemire's multiply-and-reject).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform integer in `lo..=hi`.
    pub fn range_u32(&mut self, lo: u32, hi: u32) -> u32 {
        assert!(lo <= hi);
        lo + self.below((hi - lo) as u64 + 1) as u32
    }

    /// Uniform in `[0, 1)`, exactly representable (53 bits).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Uniform in `[lo, hi)`.
    pub fn range_f64(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_stream() {
        let mut r = Rng::new(0);
        let a = r.next_u64();
        let mut r2 = Rng::new(0);
        assert_eq!(a, r2.next_u64());
        let mut r3 = Rng::new(1);
        assert_ne!(a, r3.next_u64());
        for n in [1u64, 2, 3, 7, 1000] {
            for _ in 0..100 {
                assert!(r.below(n) < n);
            }
        }
        for _ in 0..100 {
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
