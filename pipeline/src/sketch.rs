//! A small mergeable quantile sketch for RTT samples (µs).
//!
//! Log-linear buckets, like HDR histograms: values below 64 are exact; above, each power of two is split
//! into 32 buckets, so any quantile is within ~3 % of the true sample. Counts per bucket are all the
//! state, so the result does not depend on the order samples arrive in and two sketches merge exactly
//! (windows and shards combine without error). Storage is sparse: a flow with a handful of samples costs
//! a handful of entries.

const EXACT: u32 = 64;
const SUB_BITS: u32 = 5;

/// Mergeable RTT sketch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RttSketch {
    /// (bucket, count), sorted by bucket.
    buckets: Vec<(u16, u32)>,
    count: u64,
    min: u32,
    max: u32,
}

fn bucket_of(v: u32) -> u16 {
    if v < EXACT {
        return v as u16;
    }
    let exp = 31 - v.leading_zeros(); // >= 6
    let sub = (v >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    (EXACT + (exp - 6) * (1 << SUB_BITS) + sub) as u16
}

/// Smallest and largest value that fall in `bucket`.
fn bounds_of(bucket: u16) -> (u32, u32) {
    let b = u32::from(bucket);
    if b < EXACT {
        return (b, b);
    }
    let exp = (b - EXACT) / (1 << SUB_BITS) + 6;
    let sub = (b - EXACT) % (1 << SUB_BITS);
    let width = 1u64 << (exp - SUB_BITS);
    let lo = (1u64 << exp) + u64::from(sub) * width;
    (lo as u32, (lo + width - 1).min(u64::from(u32::MAX)) as u32)
}

impl RttSketch {
    pub fn insert(&mut self, v: u32) {
        self.add(bucket_of(v), 1);
        if self.count == 0 || v < self.min {
            self.min = v;
        }
        self.max = self.max.max(v);
        self.count += 1;
    }

    fn add(&mut self, bucket: u16, n: u32) {
        match self.buckets.binary_search_by_key(&bucket, |&(b, _)| b) {
            Ok(i) => self.buckets[i].1 = self.buckets[i].1.saturating_add(n),
            Err(i) => self.buckets.insert(i, (bucket, n)),
        }
    }

    /// Adds every sample of `other` to `self`.
    pub fn merge(&mut self, other: &RttSketch) {
        if other.count == 0 {
            return;
        }
        for &(b, n) in &other.buckets {
            self.add(b, n);
        }
        self.min = if self.count == 0 {
            other.min
        } else {
            self.min.min(other.min)
        };
        self.max = self.max.max(other.max);
        self.count += other.count;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn min(&self) -> Option<u32> {
        (self.count > 0).then_some(self.min)
    }

    pub fn max(&self) -> Option<u32> {
        (self.count > 0).then_some(self.max)
    }

    /// The `q`-quantile (nearest rank), as the middle of its bucket clamped to the observed min/max.
    pub fn quantile(&self, q: f64) -> Option<u32> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for &(b, n) in &self.buckets {
            seen += u64::from(n);
            if seen >= rank {
                let (lo, hi) = bounds_of(b);
                let mid = lo + (hi - lo) / 2;
                return Some(mid.clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_u32_contiguously() {
        let mut prev_hi = None;
        for b in 0..=bucket_of(u32::MAX) {
            let (lo, hi) = bounds_of(b);
            assert!(lo <= hi);
            if let Some(p) = prev_hi {
                assert_eq!(lo, p + 1, "gap before bucket {b}");
            }
            assert_eq!(bucket_of(lo), b);
            assert_eq!(bucket_of(hi), b);
            prev_hi = Some(hi);
        }
        assert_eq!(prev_hi, Some(u32::MAX));
    }

    #[test]
    fn quantiles_are_within_relative_error() {
        // A deterministic spread of values over five decades.
        let mut values: Vec<u32> = (0..10_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) % 1_000_000) + 10)
            .collect();
        let mut s = RttSketch::default();
        for &v in &values {
            s.insert(v);
        }
        values.sort_unstable();
        for q in [0.01, 0.5, 0.9, 0.99] {
            let exact = values[((q * values.len() as f64).ceil() as usize).max(1) - 1] as f64;
            let got = s.quantile(q).unwrap() as f64;
            assert!(
                (got - exact).abs() / exact <= 1.0 / 32.0,
                "q={q} exact={exact} got={got}"
            );
        }
        assert_eq!(s.min(), Some(values[0]));
        assert_eq!(s.max(), Some(*values.last().unwrap()));
    }

    #[test]
    fn merge_equals_inserting_everything_in_any_order() {
        let (mut a, mut b, mut all, mut rev) = Default::default();
        let vals: Vec<u32> = (0..500).map(|i| i * 37 % 5000).collect();
        for (i, &v) in vals.iter().enumerate() {
            if i % 3 == 0 {
                RttSketch::insert(&mut a, v)
            } else {
                RttSketch::insert(&mut b, v)
            }
            RttSketch::insert(&mut all, v);
        }
        for &v in vals.iter().rev() {
            RttSketch::insert(&mut rev, v);
        }
        RttSketch::merge(&mut a, &b);
        assert_eq!(a, all);
        assert_eq!(rev, all);
    }

    #[test]
    fn empty_sketch_has_no_quantiles() {
        let s = RttSketch::default();
        assert_eq!(s.quantile(0.5), None);
        assert_eq!(s.min(), None);
    }
}
