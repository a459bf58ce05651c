//! Percentiles and human-readable numbers.

/// p50/p99/max of a sample set.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: i64,
    /// 99th percentile.
    pub p99: i64,
    /// Maximum.
    pub max: i64,
}

impl Summary {
    /// Summarises `samples` (sorted in place).
    pub fn of(samples: &mut [i64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        Self {
            n: samples.len(),
            p50: percentile(samples, 50.0),
            p99: percentile(samples, 99.0),
            max: samples[samples.len() - 1],
        }
    }

    /// `p50 / p99 / max` in readable units.
    pub fn show(&self) -> String {
        if self.n == 0 {
            return "no samples".into();
        }
        format!("{} / {} / {}", dur(self.p50), dur(self.p99), dur(self.max))
    }
}

/// The nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Nanoseconds as µs, ms or s.
pub fn dur(ns: i64) -> String {
    let a = ns.unsigned_abs();
    if a < 1_000_000 {
        format!("{:.0} µs", ns as f64 / 1e3)
    } else if a < 10_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else if a < 10_000_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else {
        format!("{:.1} s", ns as f64 / 1e9)
    }
}

/// An integer with thousands separators.
pub fn thousands(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// KiB as KiB or MiB.
pub fn kib(v: u64) -> String {
    if v < 10 * 1024 {
        format!("{v} KiB")
    } else {
        format!("{:.1} MiB", v as f64 / 1024.0)
    }
}

/// The median of `v` (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        let mut s: Vec<i64> = (1..=100).rev().collect();
        let sum = Summary::of(&mut s);
        assert_eq!((sum.p50, sum.p99, sum.max), (50, 99, 100));
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
        assert_eq!(dur(420_000), "420 µs");
        assert_eq!(dur(2_500_000), "2.50 ms");
    }
}
