//! `fanout top`: a live terminal view of Redis saturation and who causes it, read from the
//! agent running on this host (its `/api/v1/snapshot`). Rates and percentiles come from two
//! readings, the way Prometheus would compute them. `--once` (or a stdout that is not a
//! terminal) prints the same content as plain lines and exits.

pub mod columns;
pub mod model;
pub mod reading;
pub mod stats;
pub mod text;
pub mod ui;

use std::{
    io::IsTerminal as _,
    time::{Duration, Instant},
};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use crate::agent_http::Endpoint;
use model::View;
use reading::{Reading, ReadingError};
use ui::{Pane, UiState};

fn interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && (0.2..=3600.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("must be between 0.2 and 3600 seconds, got {s}"))
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub endpoint: crate::agent_http::EndpointArgs,
    /// Seconds between readings (and redraws).
    #[arg(long, default_value = "1", value_parser = interval, value_name = "SECONDS")]
    pub interval: f64,
    /// Print the view once as plain text and exit (what runs when stdout is not a terminal).
    #[arg(long)]
    pub once: bool,
    /// Quit by itself after this many seconds (for demos and recordings).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub exit_after: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(transparent)]
    Reading(#[from] ReadingError),
    #[error(transparent)]
    Endpoint(#[from] crate::agent_http::EndpointError),
    #[error("the terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

/// How long one reading may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(args: &TopArgs) -> Result<(), TopError> {
    let period = Duration::from_secs_f64(args.interval);
    let endpoint = Endpoint::new(&args.endpoint)?;
    if args.once || !std::io::stdout().is_terminal() {
        let first = Reading::fetch(&endpoint, READ_TIMEOUT)?;
        std::thread::sleep(period);
        let second = Reading::fetch(&endpoint, READ_TIMEOUT)?;
        print!(
            "{}",
            text::render(&View::compute(Some(&first), &second), &endpoint.name())
        );
        return Ok(());
    }
    // Fails here, before the terminal is taken over, when no agent answers.
    let first = Reading::fetch(&endpoint, READ_TIMEOUT)?;
    // ratatui::init restores the terminal on a panic too (its hook runs before the message).
    let mut terminal = ratatui::init();
    let result = interactive(&mut terminal, args, &endpoint, period, first);
    ratatui::restore();
    result
}

fn interactive(
    terminal: &mut ratatui::DefaultTerminal,
    args: &TopArgs,
    endpoint: &Endpoint,
    period: Duration,
    first: Reading,
) -> Result<(), TopError> {
    let name = endpoint.name();
    let mut state = UiState::new();
    let mut latest = first;
    let mut view = View::compute(None, &latest);
    let mut trouble: Option<String> = None;
    let mut next_reading = Instant::now() + period;
    let quit_at = args
        .exit_after
        .map(|s| Instant::now() + Duration::from_secs(s));
    loop {
        if quit_at.is_some_and(|at| Instant::now() >= at) {
            return Ok(());
        }
        terminal.draw(|frame| {
            ui::draw(frame, &view, &state, &name);
            if let Some(t) = &trouble {
                let area = frame.area();
                let line = ratatui::layout::Rect {
                    y: area.height.saturating_sub(1),
                    height: 1,
                    ..area
                };
                frame.render_widget(
                    ratatui::widgets::Paragraph::new(t.as_str())
                        .style(ratatui::style::Style::new().fg(ratatui::style::Color::Red)),
                    line,
                );
            }
        })?;
        let mut wait = next_reading.saturating_duration_since(Instant::now());
        if let Some(at) = quit_at {
            wait = wait.min(at.saturating_duration_since(Instant::now()));
        }
        if event::poll(wait)? {
            if let Event::Key(key) = event::read()? {
                if key.kind != KeyEventKind::Press {
                    continue;
                }
                match key.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(())
                    }
                    KeyCode::Tab | KeyCode::BackTab => {
                        state.pane = match state.pane {
                            Pane::Redis => Pane::Workers,
                            Pane::Workers => Pane::Redis,
                        }
                    }
                    KeyCode::Char('s') | KeyCode::Right => state.cycle_sort(true),
                    KeyCode::Char('S') | KeyCode::Left => state.cycle_sort(false),
                    KeyCode::Char('r') => state.ascending = !state.ascending,
                    KeyCode::Char('p') | KeyCode::Char(' ') => state.paused = !state.paused,
                    KeyCode::Char('?') | KeyCode::Char('h') => state.help = !state.help,
                    _ => {}
                }
            }
            continue;
        }
        next_reading = Instant::now() + period;
        if state.paused {
            continue;
        }
        match Reading::fetch(endpoint, READ_TIMEOUT) {
            Ok(reading) => {
                trouble = None;
                let previous = std::mem::replace(&mut latest, reading);
                view = View::compute(Some(&previous), &latest);
            }
            // Keep the last view; say why it is not refreshed.
            Err(e) => trouble = Some(format!("not refreshed: {e}")),
        }
    }
}
