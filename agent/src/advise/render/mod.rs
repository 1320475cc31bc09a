//! The advice printed: as text for a person, as neutral JSON for other job systems, and as
//! GitLab's own configuration (gitlab.rb, Helm values) to paste.

pub mod gitlab;
pub mod json;
pub mod text;

/// Seconds with a unit that keeps three significant digits readable: `0.310 us`, `1.63 ms`.
pub fn duration(seconds: f64) -> String {
    let magnitude = seconds.abs();
    let (value, unit) = if magnitude == 0.0 {
        return "0 s".to_string();
    } else if magnitude < 1e-3 {
        (seconds * 1e6, "us")
    } else if magnitude < 1.0 {
        (seconds * 1e3, "ms")
    } else {
        (seconds, "s")
    };
    format!("{} {unit}", significant(value))
}

/// Three significant digits (at least none after the point for large values).
pub fn significant(value: f64) -> String {
    let magnitude = value.abs();
    let decimals = if magnitude >= 100.0 {
        0
    } else if magnitude >= 10.0 {
        1
    } else if magnitude >= 1.0 {
        2
    } else {
        3
    };
    format!("{value:.decimals$}")
}

/// A count that is usually whole (keys per pop): `440`, or `12.5` when it is not.
pub fn count(value: f64) -> String {
    if (value - value.round()).abs() < 0.05 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// A rate per second: `1520`, `12.0`, `0.35`.
pub fn rate(per_second: f64) -> String {
    if per_second >= 1000.0 {
        format!("{per_second:.0}")
    } else if per_second >= 1.0 {
        format!("{per_second:.1}")
    } else {
        format!("{per_second:.2}")
    }
}

pub fn percent(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

/// The window as a person says it: `300 s`, `since the agent started (2 h 5 min)`.
pub fn window(seconds: f64, since_start: bool) -> String {
    let length = if seconds >= 3600.0 {
        format!(
            "{} h {} min",
            (seconds / 3600.0) as u64,
            ((seconds % 3600.0) / 60.0) as u64
        )
    } else if seconds >= 120.0 {
        format!(
            "{} min {} s",
            (seconds / 60.0) as u64,
            (seconds % 60.0) as u64
        )
    } else {
        format!("{seconds:.0} s")
    };
    if since_start {
        format!("{length}, since the agent started")
    } else {
        length
    }
}

/// Text safe for one comment line: control characters (a newline would end the comment and
/// make the rest code) shown as `?`.
pub fn comment_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_keep_three_digits_in_a_readable_unit() {
        assert_eq!(duration(0.31e-6), "0.310 us");
        assert_eq!(duration(2e-6), "2.00 us");
        assert_eq!(duration(1.63e-3), "1.63 ms");
        assert_eq!(duration(0.2345), "234 ms");
        assert_eq!(duration(3.0), "3.00 s");
        assert_eq!(duration(0.0), "0 s");
        assert_eq!(count(440.0), "440");
        assert_eq!(count(2.5), "2.5");
        assert_eq!(percent(0.234), "23.4%");
        assert_eq!(window(300.0, false), "5 min 0 s");
        assert_eq!(window(30.0, true), "30 s, since the agent started");
        assert_eq!(comment_safe("a\nb"), "a?b");
    }
}
