//! splitmix64: the small seeded generator of KID's subset draws and the A/B report's
//! bootstrap resamples (integer arithmetic only: the same draws on every machine).

pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `m` distinct indices below `n` (partial Fisher–Yates).
    pub fn choose(&mut self, n: usize, m: usize) -> Vec<i64> {
        let mut idx: Vec<i64> = (0..n as i64).collect();
        for i in 0..m {
            let j = i + (self.next() % (n - i) as u64) as usize;
            idx.swap(i, j);
        }
        idx.truncate(m);
        idx
    }
}
