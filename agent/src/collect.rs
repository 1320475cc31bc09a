//! Turning the agent's state into a metric [`Snapshot`]: /proc thread CPU, kernel histograms,
//! self-metrics. Pure conversions live here so they can be tested without a kernel.

use agent_common::sched::{Log2Histogram, HIST_BUCKETS};

use crate::metrics::HistogramValue;

/// Kernel log2 buckets below this one are merged into the first exported bucket:
/// 2^10 ns = 1.024 us is finer than any scheduling delay worth an alert.
pub const FIRST_EXPORTED_BUCKET: usize = 10;
/// Buckets above this one (2^34 ns = 17.2 s) are merged into +Inf.
pub const LAST_EXPORTED_BUCKET: usize = 34;

/// Converts a kernel log2 histogram (nanoseconds) into explicit-bounds seconds.
///
/// Kernel bucket `i` counts values in `[2^(i-1), 2^i)` ns, so its upper bound is `2^i` ns. The
/// exported bound of the same bucket is `2^i` ns in seconds; OpenTelemetry bounds are
/// inclusive, so a value of exactly 2^i ns lands one bucket higher than the bound says: at most
/// 1 ns of difference, well under the resolution of the clock-tick-free measurement.
pub fn log2_to_seconds(h: &Log2Histogram) -> HistogramValue {
    log2_to_seconds_between(h, FIRST_EXPORTED_BUCKET, LAST_EXPORTED_BUCKET)
}

/// As [`log2_to_seconds`], exporting kernel buckets `first..=last` (`last < HIST_BUCKETS - 1`).
pub fn log2_to_seconds_between(h: &Log2Histogram, first: usize, last: usize) -> HistogramValue {
    let bounds: Vec<f64> = (first..=last).map(|i| (1u64 << i) as f64 / 1e9).collect();
    let mut counts = vec![0u64; bounds.len() + 1];
    for (i, &c) in h.buckets.iter().enumerate().take(HIST_BUCKETS) {
        let slot = i.clamp(first, last + 1) - first;
        counts[slot] += c;
    }
    HistogramValue {
        bounds,
        counts,
        sum: h.sum_ns as f64 / 1e9,
        count: h.count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_buckets_map_to_second_bounds_with_exact_counts() {
        let mut h = Log2Histogram::ZERO;
        for v in [
            0u64,
            5,
            1023,
            1024,
            1_000_000,
            2_000_000_000,
            600_000_000_000,
        ] {
            h.record(v);
        }
        let out = log2_to_seconds(&h);
        assert_eq!(out.count, 7);
        assert_eq!(out.counts.iter().sum::<u64>(), 7);
        assert_eq!(
            out.bounds.len(),
            LAST_EXPORTED_BUCKET - FIRST_EXPORTED_BUCKET + 1
        );
        assert_eq!(out.bounds[0], 1.024e-6);
        // 0, 5 and 1023 ns are all below 1.024 us.
        assert_eq!(out.counts[0], 3);
        // 1024 ns is in [2^10, 2^11): the bucket bounded by 2^11 ns.
        assert_eq!(out.counts[1], 1);
        // 1 ms is in [2^19, 2^20) ns.
        assert_eq!(out.counts[20 - FIRST_EXPORTED_BUCKET], 1);
        // 2 s is in [2^30, 2^31) ns.
        assert_eq!(out.counts[31 - FIRST_EXPORTED_BUCKET], 1);
        // 10 minutes is above the last bound: +Inf.
        assert_eq!(*out.counts.last().unwrap(), 1);
        assert!((out.sum - 602.001002052).abs() < 1e-9, "{}", out.sum);
    }

    #[test]
    fn bucket_index_matches_the_documented_ranges() {
        assert_eq!(Log2Histogram::bucket_index(0), 0);
        assert_eq!(Log2Histogram::bucket_index(1), 1);
        assert_eq!(Log2Histogram::bucket_index(1023), 10);
        assert_eq!(Log2Histogram::bucket_index(1024), 11);
        assert_eq!(Log2Histogram::bucket_index(u64::MAX), HIST_BUCKETS - 1);
    }
}
