//! `fanout advise`: turn what the agent saw (who listens to which queue, which queue served,
//! what the listening cost Redis) into routing rules, with the time they will save.
//!
//! `client` fetches the observation from the agent, `plan` decides (with `today`, `cost`,
//! `fit`, `predict` and `names`), `render` prints it as text, JSON, gitlab.rb or Helm values.
//! `window` is the agent's side: it keeps the counts an `observation::Observation` comes from.

pub mod client;
pub mod cost;
pub mod fit;
pub mod names;
pub mod observation;
pub mod plan;
pub mod predict;
pub mod render;
pub mod today;
// The agent side (not the command): cumulative counts, their history, a window's observation.
pub mod window;

#[cfg(test)]
pub(crate) mod fixtures;

use std::{io::Write as _, time::Duration};

pub use client::FetchError;
pub use plan::{plan, Advice};

/// The shortest and longest window one may ask for.
pub const MIN_WINDOW: Duration = Duration::from_secs(1);
pub const MAX_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long fetching the observation may take (the agent assembles it from readings it holds).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// For a person: Today, Cost, Proposal, Predicted, Rules.
    #[default]
    Text,
    /// Neutral JSON, for other job systems and scripts.
    Json,
    /// Ruby for /etc/gitlab/gitlab.rb (routing rules and queue groups).
    #[value(name = "gitlab-rb")]
    GitlabRb,
    /// Values for the GitLab Helm chart (routing rules and Sidekiq pods).
    Helm,
}

/// A window as seconds: `300`, `300s`, `5m`, `2h`, from 1 s to 7 days.
pub fn parse_window(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let (number, unit) = match trimmed.char_indices().last() {
        Some((at, 's')) => (&trimmed[..at], 1),
        Some((at, 'm')) => (&trimmed[..at], 60),
        Some((at, 'h')) => (&trimmed[..at], 3600),
        _ => (trimmed, 1),
    };
    let seconds = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| {
            format!("expected whole seconds (300) or a number with s, m or h (5m), got {text:?}")
        })?;
    if (MIN_WINDOW.as_secs()..=MAX_WINDOW.as_secs()).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(format!(
            "must be from 1 s to 7 days ({} s), got {seconds} s",
            MAX_WINDOW.as_secs()
        ))
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct AdviseArgs {
    #[command(flatten)]
    pub endpoint: crate::agent_http::EndpointArgs,
    /// How far back to look: seconds (300) or with a unit (300s, 5m, 2h), 1 s to 7 days.
    /// Default: since the agent started.
    #[arg(long, value_name = "DURATION", value_parser = parse_window)]
    pub window: Option<u64>,
    /// What to print.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, thiserror::Error)]
pub enum AdviseError {
    #[error(transparent)]
    Endpoint(#[from] crate::agent_http::EndpointError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("cannot write the advice: {0}")]
    Output(#[from] std::io::Error),
}

/// The advice in `format`.
pub fn render(advice: &Advice, format: Format) -> String {
    match format {
        Format::Text => render::text::render(advice),
        Format::Json => render::json::render(advice),
        Format::GitlabRb => render::gitlab::gitlab_rb(advice),
        Format::Helm => render::gitlab::helm(advice),
    }
}

/// Fetches, plans and prints. Too little data is an answer (printed, `Ok`), not an error.
pub fn run(args: &AdviseArgs) -> Result<(), AdviseError> {
    let endpoint = crate::agent_http::Endpoint::new(&args.endpoint)?;
    let observation = client::fetch(&endpoint, args.window, FETCH_TIMEOUT)?;
    let text = render(&plan(&observation), args.format);
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        // `fanout advise | head` closing early is not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_take_seconds_or_a_unit_within_bounds() {
        assert_eq!(parse_window("300"), Ok(300));
        assert_eq!(parse_window("300s"), Ok(300));
        assert_eq!(parse_window("5m"), Ok(300));
        assert_eq!(parse_window("2h"), Ok(7200));
        assert_eq!(parse_window("1"), Ok(1));
        assert_eq!(parse_window("168h"), Ok(604_800));
        for bad in ["0", "169h", "604801", "99999999999999999999h"] {
            let err = parse_window(bad).unwrap_err();
            assert!(
                err.contains("from 1 s to 7 days") || err.contains("expected"),
                "{bad}: {err}"
            );
        }
        assert!(parse_window("0")
            .unwrap_err()
            .contains("from 1 s to 7 days"));
        for bad in ["", "m", "5d", "-5", "1.5m", "five"] {
            assert!(parse_window(bad).unwrap_err().contains("expected"), "{bad}");
        }
    }

    #[test]
    fn the_formats_are_named_as_the_flag_takes_them() {
        use clap::ValueEnum as _;
        let names: Vec<String> = Format::value_variants()
            .iter()
            .filter_map(|f| f.to_possible_value().map(|v| v.get_name().to_string()))
            .collect();
        assert_eq!(names, ["text", "json", "gitlab-rb", "helm"]);
    }
}
