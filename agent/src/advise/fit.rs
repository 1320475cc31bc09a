//! The cost of one blocking call on a Redis, as a line: `seconds per call = a + b × keys`.
//! `a` is the fixed part (parsing, the client's blocked state), `b` what each listed key adds
//! (one dictionary entry and one list node to add, then to remove). The agent measures the
//! bookkeeping time per fan-out bucket; a weighted least-squares line through the buckets'
//! means gives `a` and `b`, and `b` is what fewer keys per pop save.

use super::observation::KeysBucket;

/// A bucket with fewer calls than this is too noisy to place a point: a handful of calls
/// can sit on one preemption or one cold cache line.
pub const MIN_BUCKET_CALLS: u64 = 20;

/// How the line was obtained, which says how far to trust it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FitKind {
    /// Two or more fan-outs: a line through them.
    Fitted,
    /// One fan-out only: all of its time put on its keys, so the cost per key is at most this.
    UpperBound,
}

impl FitKind {
    /// The name the JSON form uses (`"fitted"`, `"upper_bound"`; no fit is `"none"`).
    pub fn as_str(self) -> &'static str {
        match self {
            FitKind::Fitted => "fitted",
            FitKind::UpperBound => "upper_bound",
        }
    }
}

/// A correction the raw fit needed, said aloud so the printed numbers stay checkable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FitCorrection {
    /// The line sloped down (noise between close fan-outs): taken as flat, `b = 0`, and `a`
    /// the calls' mean time.
    NegativeSlopeFlattened,
    /// The line crossed zero above zero keys: refitted through the origin (`a = 0`).
    NegativeInterceptThroughOrigin,
}

impl FitCorrection {
    pub fn explain(self) -> &'static str {
        match self {
            FitCorrection::NegativeSlopeFlattened => {
                "the fit sloped down (noise): taken as flat, no cost per key"
            }
            FitCorrection::NegativeInterceptThroughOrigin => {
                "the fit had a negative fixed part: refitted through the origin"
            }
        }
    }
}

/// `seconds per call = per_call_seconds + per_key_seconds × keys`.
#[derive(Clone, Debug, PartialEq)]
pub struct CostFit {
    pub per_call_seconds: f64,
    pub per_key_seconds: f64,
    pub kind: FitKind,
    pub correction: Option<FitCorrection>,
    /// Buckets with at least `MIN_BUCKET_CALLS` calls (the points of the fit).
    pub buckets_used: usize,
}

impl CostFit {
    /// What one call with `keys` keys costs, seconds.
    pub fn seconds_per_call(&self, keys: f64) -> f64 {
        self.per_call_seconds + self.per_key_seconds * keys
    }
}

/// Why there is no line.
pub const NO_USABLE_BUCKET: &str =
    "no fan-out saw enough blocking calls to fit a cost per key (at least 20 calls in one bucket)";

/// One point of the fit: mean keys and mean seconds of a bucket's calls, weighted by calls.
#[derive(Clone, Copy, Debug)]
struct Point {
    x: f64,
    y: f64,
    w: f64,
}

/// Fits the cost per call against keys per call over `buckets` (see the module doc).
/// `Err` carries the one-line reason there is no line.
pub fn fit_cost_per_key(buckets: &[KeysBucket]) -> Result<CostFit, &'static str> {
    let points: Vec<Point> = buckets
        .iter()
        .filter(|b| b.calls >= MIN_BUCKET_CALLS && b.keys > 0 && b.seconds.is_finite())
        .map(|b| Point {
            x: b.keys as f64 / b.calls as f64,
            y: b.seconds.max(0.0) / b.calls as f64,
            w: b.calls as f64,
        })
        .collect();
    if points.is_empty() {
        return Err(NO_USABLE_BUCKET);
    }
    let buckets_used = points.len();
    let total_weight: f64 = points.iter().map(|p| p.w).sum();
    let mean_x = points.iter().map(|p| p.w * p.x).sum::<f64>() / total_weight;
    let mean_y = points.iter().map(|p| p.w * p.y).sum::<f64>() / total_weight;
    let spread_x: f64 = points.iter().map(|p| p.w * (p.x - mean_x).powi(2)).sum();

    // Every point at (about) the same fan-out: the fixed part and the per-key part cannot be
    // told apart, so all the time goes on the keys: an upper bound of the cost per key.
    let distinct = points.iter().any(|p| (p.x - points[0].x).abs() > 1e-9);
    if !distinct || spread_x <= 0.0 {
        return Ok(CostFit {
            per_call_seconds: 0.0,
            per_key_seconds: mean_y / mean_x,
            kind: FitKind::UpperBound,
            correction: None,
            buckets_used,
        });
    }

    let covariance: f64 = points
        .iter()
        .map(|p| p.w * (p.x - mean_x) * (p.y - mean_y))
        .sum();
    let slope = covariance / spread_x;
    let intercept = mean_y - slope * mean_x;
    let (per_call_seconds, per_key_seconds, correction) = if slope < 0.0 {
        (mean_y, 0.0, Some(FitCorrection::NegativeSlopeFlattened))
    } else if intercept < 0.0 {
        let xy: f64 = points.iter().map(|p| p.w * p.x * p.y).sum();
        let xx: f64 = points.iter().map(|p| p.w * p.x * p.x).sum();
        (
            0.0,
            xy / xx,
            Some(FitCorrection::NegativeInterceptThroughOrigin),
        )
    } else {
        (intercept, slope, None)
    };
    Ok(CostFit {
        per_call_seconds,
        per_key_seconds,
        kind: FitKind::Fitted,
        correction,
        buckets_used,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: f64 = 1e-6;

    /// A bucket of `calls` calls of `keys_per_call` keys each costing `a + b × keys`.
    fn bucket(calls: u64, keys_per_call: u64, a: f64, b: f64) -> KeysBucket {
        KeysBucket {
            calls,
            keys: calls * keys_per_call,
            seconds: calls as f64 * (a + b * keys_per_call as f64),
        }
    }

    fn close(found: f64, expected: f64) -> bool {
        (found - expected).abs() <= 1e-9 * expected.abs().max(1e-6)
    }

    #[test]
    fn two_buckets_on_a_line_give_that_line() {
        let fit = fit_cost_per_key(&[
            bucket(1000, 1, 2.0 * US, 0.3 * US),
            bucket(300, 440, 2.0 * US, 0.3 * US),
        ])
        .unwrap();
        assert_eq!(fit.kind, FitKind::Fitted);
        assert_eq!(fit.correction, None);
        assert!(close(fit.per_call_seconds, 2.0 * US), "{fit:?}");
        assert!(close(fit.per_key_seconds, 0.3 * US), "{fit:?}");
        assert_eq!(fit.buckets_used, 2);
    }

    #[test]
    fn buckets_with_too_few_calls_are_left_out() {
        let fit = fit_cost_per_key(&[
            bucket(1000, 1, 2.0 * US, 0.3 * US),
            bucket(300, 440, 2.0 * US, 0.3 * US),
            // Far off the line, but only 19 calls: must not move it.
            bucket(MIN_BUCKET_CALLS - 1, 100, 500.0 * US, 0.0),
        ])
        .unwrap();
        assert!(close(fit.per_key_seconds, 0.3 * US), "{fit:?}");
        assert_eq!(fit.buckets_used, 2);
    }

    #[test]
    fn one_bucket_is_an_upper_bound_of_the_cost_per_key() {
        let fit = fit_cost_per_key(&[bucket(500, 440, 2.0 * US, 0.3 * US)]).unwrap();
        assert_eq!(fit.kind, FitKind::UpperBound);
        assert_eq!(fit.per_call_seconds, 0.0);
        // All of 2 + 0.3 × 440 = 134 us on 440 keys.
        assert!(close(fit.per_key_seconds, 134.0 * US / 440.0), "{fit:?}");
    }

    #[test]
    fn a_negative_intercept_is_refitted_through_the_origin() {
        // y = -10us + 1us × k at k = 20 and 40: 10us and 30us.
        let buckets = [
            KeysBucket {
                calls: 100,
                keys: 2000,
                seconds: 100.0 * 10.0 * US,
            },
            KeysBucket {
                calls: 100,
                keys: 4000,
                seconds: 100.0 * 30.0 * US,
            },
        ];
        let fit = fit_cost_per_key(&buckets).unwrap();
        assert_eq!(
            fit.correction,
            Some(FitCorrection::NegativeInterceptThroughOrigin)
        );
        assert_eq!(fit.per_call_seconds, 0.0);
        // Σw·x·y / Σw·x² = (20·10 + 40·30) / (20² + 40²) us = 1400 / 2000 us.
        assert!(close(fit.per_key_seconds, 0.7 * US), "{fit:?}");
    }

    #[test]
    fn a_negative_slope_is_taken_as_flat() {
        let buckets = [
            KeysBucket {
                calls: 100,
                keys: 100,
                seconds: 100.0 * 5.0 * US,
            },
            KeysBucket {
                calls: 300,
                keys: 3000,
                seconds: 300.0 * 3.0 * US,
            },
        ];
        let fit = fit_cost_per_key(&buckets).unwrap();
        assert_eq!(fit.correction, Some(FitCorrection::NegativeSlopeFlattened));
        assert_eq!(fit.per_key_seconds, 0.0);
        // The calls' mean: (100 × 5 + 300 × 3) / 400 = 3.5 us.
        assert!(close(fit.per_call_seconds, 3.5 * US), "{fit:?}");
    }

    #[test]
    fn no_bucket_with_enough_calls_is_no_fit() {
        assert_eq!(fit_cost_per_key(&[]), Err(NO_USABLE_BUCKET));
        assert_eq!(
            fit_cost_per_key(&[bucket(5, 10, US, US)]),
            Err(NO_USABLE_BUCKET)
        );
    }
}
