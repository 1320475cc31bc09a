//! Rates and percentiles between two readings, computed as Prometheus computes `rate()` and
//! `histogram_quantile()`: a counter that went down was reset (its process restarted), and its
//! whole current value is the increase; a quantile is interpolated linearly inside the bucket
//! it falls in, and the last finite bound is the answer when it falls above it.

use super::reading::Histogram;

/// The increase of a cumulative counter from `previous` to `current`.
pub fn increase(previous: f64, current: f64) -> f64 {
    if current < previous {
        current
    } else {
        current - previous
    }
}

/// Per-bucket increases of a histogram, with the same reset rule (a lower total count means
/// a new series). `None` when the two have different bounds.
pub fn histogram_increase(previous: Option<&Histogram>, current: &Histogram) -> Option<Histogram> {
    let Some(previous) = previous else {
        return Some(current.clone());
    };
    if previous.bounds != current.bounds || previous.counts.len() != current.counts.len() {
        return None;
    }
    if current.count < previous.count
        || current
            .counts
            .iter()
            .zip(&previous.counts)
            .any(|(c, p)| c < p)
    {
        return Some(current.clone());
    }
    Some(Histogram {
        bounds: current.bounds.clone(),
        counts: current
            .counts
            .iter()
            .zip(&previous.counts)
            .map(|(c, p)| c - p)
            .collect(),
        sum: current.sum - previous.sum,
        count: current.count - previous.count,
    })
}

/// Adds `other`'s buckets into `into` (same bounds; others are ignored).
pub fn merge(into: &mut Option<Histogram>, other: &Histogram) {
    match into {
        None => *into = Some(other.clone()),
        Some(h) if h.bounds == other.bounds && h.counts.len() == other.counts.len() => {
            for (a, b) in h.counts.iter_mut().zip(&other.counts) {
                *a += b;
            }
            h.sum += other.sum;
            h.count += other.count;
        }
        Some(_) => {}
    }
}

/// The `q` quantile (0..=1) of a histogram of increases, or `None` when it is empty.
pub fn quantile(q: f64, h: &Histogram) -> Option<f64> {
    let total: u64 = h.counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &count) in h.counts.iter().enumerate() {
        if count > 0 && (below + count) as f64 >= rank {
            let Some(&upper) = h.bounds.get(i) else {
                // Above the last bound: Prometheus answers the last finite bound.
                return h.bounds.last().copied();
            };
            let lower = if i == 0 {
                // Prometheus takes 0 as the lower edge of the first bucket when it is positive.
                if upper > 0.0 {
                    0.0
                } else {
                    upper
                }
            } else {
                h.bounds[i - 1]
            };
            let within = (rank - below as f64) / count as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        below += count;
    }
    h.bounds.last().copied()
}

/// The upper bound of the highest non-empty bucket ("at most"), or the last bound when the
/// highest values are above it.
pub fn max_bound(h: &Histogram) -> Option<f64> {
    let i = h.counts.iter().rposition(|&c| c > 0)?;
    h.bounds.get(i).or(h.bounds.last()).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(bounds: &[f64], counts: &[u64]) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            counts: counts.to_vec(),
            sum: 0.0,
            count: counts.iter().sum(),
        }
    }

    #[test]
    fn counters_increase_and_a_reset_counts_from_zero() {
        assert_eq!(increase(10.0, 15.0), 5.0);
        assert_eq!(increase(10.0, 10.0), 0.0);
        // The process restarted: 3 since the restart.
        assert_eq!(increase(10.0, 3.0), 3.0);
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_as_prometheus_does() {
        // 10 values in (0, 1], 10 in (1, 2]: the median is the top of the first bucket,
        // p75 halfway through the second, p99 at 1.98.
        let x = h(&[1.0, 2.0, 4.0], &[10, 10, 0, 0]);
        assert_eq!(quantile(0.5, &x), Some(1.0));
        assert_eq!(quantile(0.75, &x), Some(1.5));
        assert!((quantile(0.99, &x).unwrap() - 1.98).abs() < 1e-9);
        // All above the last bound: the last bound.
        assert_eq!(quantile(0.5, &h(&[1.0, 2.0], &[0, 0, 5])), Some(2.0));
        assert_eq!(quantile(0.5, &h(&[1.0], &[0, 0])), None);
        assert_eq!(max_bound(&x), Some(2.0));
        assert_eq!(max_bound(&h(&[1.0, 2.0], &[0, 0, 1])), Some(2.0));
    }

    #[test]
    fn histogram_increases_and_resets() {
        let before = h(&[1.0, 2.0], &[5, 5, 0]);
        let after = h(&[1.0, 2.0], &[6, 9, 1]);
        let d = histogram_increase(Some(&before), &after).unwrap();
        assert_eq!(d.counts, vec![1, 4, 1]);
        assert_eq!(d.count, 6);
        // A restarted process: everything since.
        let restarted = h(&[1.0, 2.0], &[1, 0, 0]);
        assert_eq!(
            histogram_increase(Some(&before), &restarted)
                .unwrap()
                .counts,
            vec![1, 0, 0]
        );
        // Different bounds cannot be compared.
        assert!(histogram_increase(Some(&h(&[1.0], &[1, 0])), &after).is_none());
        let mut merged = None;
        merge(&mut merged, &before);
        merge(&mut merged, &after);
        assert_eq!(merged.unwrap().counts, vec![11, 14, 1]);
    }
}
