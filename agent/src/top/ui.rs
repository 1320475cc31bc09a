//! The terminal view of `fanout top` (ratatui): the Redis table, the worker-group table, the
//! agent's health, and a footer with the keys. It fits 80x24 by dropping the least important
//! columns first, and uses the room a larger terminal gives.

use ratatui::{
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Table},
    Frame,
};

use super::{
    columns::{self, Column},
    model::{View, BOOKKEEPING_WARNING, MAIN_THREAD_CRITICAL, MAIN_THREAD_WARNING},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Pane {
    #[default]
    Redis,
    Workers,
}

/// What the keys changed.
#[derive(Clone, Debug, Default)]
pub struct UiState {
    pub pane: Pane,
    /// Index into the pane's full column list.
    pub redis_sort: usize,
    pub worker_sort: usize,
    pub ascending: bool,
    pub paused: bool,
    pub help: bool,
}

impl UiState {
    pub fn new() -> Self {
        UiState {
            // Busiest main thread first.
            redis_sort: 2,
            // Most pops first.
            worker_sort: 2,
            ..Default::default()
        }
    }

    /// Moves the sort to the next (or previous) column of the focused pane.
    pub fn cycle_sort(&mut self, forward: bool) {
        let (index, len) = match self.pane {
            Pane::Redis => (&mut self.redis_sort, columns::redis().len()),
            Pane::Workers => (&mut self.worker_sort, columns::workers().len()),
        };
        *index = if forward {
            (*index + 1) % len
        } else {
            (*index + len - 1) % len
        };
    }
}

/// The colour of a main-thread load: the alerts' warning and critical thresholds.
pub fn main_thread_style(cores: Option<f64>) -> Style {
    match cores {
        Some(c) if c >= MAIN_THREAD_CRITICAL => {
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
        }
        Some(c) if c >= MAIN_THREAD_WARNING => Style::new().fg(Color::Yellow),
        Some(_) => Style::new().fg(Color::Green),
        None => Style::new(),
    }
}

/// A 5-cell bar of a share of one core.
fn bar(cores: Option<f64>) -> String {
    let Some(c) = cores else {
        return "     ".to_string();
    };
    let filled = ((c.clamp(0.0, 1.0) * 5.0).round()) as usize;
    format!("{}{}", "█".repeat(filled), "░".repeat(5 - filled))
}

const MAIN_BAR_WIDTH: u16 = 6;

pub fn draw(frame: &mut Frame, view: &View, state: &UiState, address: &str) {
    let area = frame.area();
    let redis_height =
        (view.redis.len().max(1) as u16 + 3).min(area.height.saturating_sub(8).max(4));
    let [title, redis_area, worker_area, health_area, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(redis_height),
        Constraint::Min(4),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area);

    let status = match (state.paused, view.interval_s) {
        (true, _) => " [paused]".to_string(),
        (false, Some(dt)) => format!(" rates over {dt:.1} s"),
        (false, None) => " one reading so far: rates need a second".to_string(),
    };
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled("fanout top", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!(" {address} agent {}", view.agent_version)),
            Span::styled(status, Style::new().fg(Color::Cyan)),
        ])),
        title,
    );

    draw_redis(frame, redis_area, view, state);
    draw_workers(frame, worker_area, view, state);

    let h = &view.health;
    let warn = |bad: bool| {
        if bad {
            Style::new().fg(Color::Yellow)
        } else {
            Style::new()
        }
    };
    let mut health = vec![
        Span::raw("probes: "),
        Span::styled(
            format!("{} points not live", h.points_not_live),
            warn(h.points_not_live > 0),
        ),
        Span::raw(", "),
        Span::styled(
            format!("{} programs off", h.programs_not_attached),
            warn(h.programs_not_attached > 0),
        ),
        Span::raw(" · "),
        Span::styled(
            format!(
                "events lost {:.0}{}",
                h.events_lost,
                h.events_lost_in_interval
                    .map_or(String::new(), |d| format!(" (+{d:.0})"))
            ),
            warn(h.events_lost_in_interval.unwrap_or(0.0) > 0.0),
        ),
        Span::raw(" · "),
        Span::styled(
            format!("export errors {:.0}", h.export_failures),
            warn(h.export_failures > 0.0),
        ),
    ];
    if !view.missing.is_empty() {
        health.push(Span::styled(
            format!(" · agent sent no {}", view.missing.join(", ")),
            Style::new().fg(Color::Magenta),
        ));
    }
    frame.render_widget(Paragraph::new(Line::from(health)), health_area);
    frame.render_widget(
        Paragraph::new("Tab pane  s/S sort  r reverse  p pause  ? help  q quit")
            .style(Style::new().fg(Color::DarkGray)),
        footer,
    );
    if state.help {
        draw_help(frame, area);
    }
}

fn pane_block(title: String, focused: bool) -> Block<'static> {
    Block::new()
        .borders(Borders::TOP)
        .title(title)
        .border_style(if focused {
            Style::new().fg(Color::Cyan)
        } else {
            Style::new().fg(Color::DarkGray)
        })
}

/// One pane: a table of `rows` sorted by column `sort` of `all`, with the columns that fit.
struct PaneSpec<'a, R> {
    rows: &'a [R],
    all: Vec<Column<R>>,
    sort: usize,
    /// Columns drawn wider than their text (the MAIN bar) take this much more room.
    reserved: u16,
    title: String,
    focused: bool,
    empty: &'static str,
    style_of: fn(&R, &Column<R>) -> Style,
    cell_text: fn(&R, &Column<R>) -> String,
}

fn draw_pane<R: Clone>(frame: &mut Frame, area: Rect, spec: PaneSpec<R>, ascending: bool) {
    let sort = &spec.all[spec.sort.min(spec.all.len() - 1)];
    let (sorted_header, key) = (sort.header, sort.key);
    let mut rows = spec.rows.to_vec();
    columns::sort(&mut rows, key, ascending);
    let columns = columns::fitting(spec.all, area.width.saturating_sub(spec.reserved));
    let block = pane_block(spec.title, spec.focused);
    if rows.is_empty() {
        frame.render_widget(Paragraph::new(spec.empty).block(block), area);
        return;
    }
    let header = Row::new(columns.iter().map(|c| {
        let mut text = c.header.to_string();
        if c.header == sorted_header {
            text.push(if ascending { '▲' } else { '▼' });
        }
        Cell::from(text)
    }))
    .style(Style::new().add_modifier(Modifier::BOLD));
    let body: Vec<Row> = rows
        .iter()
        .map(|r| {
            Row::new(
                columns
                    .iter()
                    .map(|c| Cell::from((spec.cell_text)(r, c)).style((spec.style_of)(r, c))),
            )
        })
        .collect();
    let widths: Vec<Constraint> = columns
        .iter()
        .map(|c| {
            Constraint::Length(
                c.width
                    + if c.header == "MAIN" {
                        MAIN_BAR_WIDTH
                    } else {
                        0
                    },
            )
        })
        .collect();
    frame.render_widget(Table::new(body, widths).header(header).block(block), area);
}

fn draw_redis(frame: &mut Frame, area: Rect, view: &View, state: &UiState) {
    let spec = PaneSpec {
        rows: &view.redis,
        all: columns::redis(),
        sort: state.redis_sort,
        reserved: MAIN_BAR_WIDTH,
        title: format!(
            " Redis ({}) — main thread in cores, BOOK = blocking bookkeeping share ",
            view.redis.len()
        ),
        focused: state.pane == Pane::Redis,
        empty: "no Redis tracked on this host",
        style_of: |r, c| match c.header {
            "MAIN" => main_thread_style(r.main_cpu),
            "BOOK" if r.bookkeeping.is_some_and(|b| b >= BOOKKEEPING_WARNING) => {
                Style::new().fg(Color::Yellow)
            }
            "PID" if !r.points_not_live.is_empty() => Style::new().fg(Color::Magenta),
            _ => Style::new(),
        },
        cell_text: |r, c| {
            if c.header == "MAIN" {
                format!("{} {}", bar(r.main_cpu), (c.show)(r))
            } else {
                (c.show)(r)
            }
        },
    };
    draw_pane(frame, area, spec, state.ascending);
}

fn draw_workers(frame: &mut Frame, area: Rect, view: &View, state: &UiState) {
    let spec = PaneSpec {
        rows: &view.workers,
        all: columns::workers(),
        sort: state.worker_sort,
        reserved: 0,
        title: format!(
            " Worker groups ({}) — latency p50/p99 of served pops, TMO99 of timed-out ones ",
            view.workers.len()
        ),
        focused: state.pane == Pane::Workers,
        empty: "no worker group tracked on this host",
        style_of: |w, c| match c.header {
            "ERR" if w.errors.unwrap_or(0.0) > 0.0 => Style::new().fg(Color::Red),
            "SHARED" if w.shared.unwrap_or(0.0) > 0.0 => Style::new().fg(Color::Yellow),
            _ => Style::new(),
        },
        cell_text: |w, c| (c.show)(w),
    };
    draw_pane(frame, area, spec, state.ascending);
}

fn draw_help(frame: &mut Frame, area: Rect) {
    let text = vec![
        Line::from("fanout top: Redis saturation and who causes it"),
        Line::from(""),
        Line::from("Tab       switch between the Redis and worker panes"),
        Line::from("s / S     sort the focused pane by the next / previous column"),
        Line::from("r         reverse the sort"),
        Line::from("p, space  pause / resume"),
        Line::from("?         this help"),
        Line::from("q, Esc    quit (Ctrl-C too)"),
        Line::from(""),
        Line::from("MAIN: main thread in cores; yellow at 0.8, red at 0.95"),
        Line::from("(the alert rules' thresholds). RQ99: run-queue p99."),
    ];
    let width = 62.min(area.width);
    let height = (text.len() as u16 + 2).min(area.height);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(text).block(Block::bordered().title(" help ")),
        popup,
    );
}
