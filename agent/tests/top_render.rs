//! `fanout top`'s terminal view rendered on ratatui's TestBackend and compared with committed
//! snapshots (`tests/snapshots/top-*.txt`; `UPDATE_SNAPSHOTS=1 cargo test -p agent --test
//! top_render` rewrites them after a deliberate change), plus the colours at the alert rules'
//! thresholds. No terminal, no agent: the view is built from fixed rows.

use fanout::top::{
    model::{Health, RedisRow, View, WorkerRow},
    ui::{self, main_thread_style, UiState},
};
use ratatui::{backend::TestBackend, buffer::Buffer, style::Color, Terminal};

fn redis(pid: u32, port: u16, main: f64) -> RedisRow {
    RedisRow {
        pid,
        port: Some(port),
        main_cpu: Some(main),
        main_user: Some(main * 0.8),
        main_system: Some(main * 0.2),
        runqueue_p99_s: Some(0.000_85),
        io_threads_cpu: Some(0.02),
        bio_threads_cpu: Some(0.0),
        clients_blocked: Some(180.0),
        registrations: Some(79_200.0),
        pops_per_s: Some(1520.0),
        keys_mean: Some(440.0),
        keys_max: Some(500.0),
        served: Some(0.31),
        timeout: Some(0.68),
        other: Some(0.01),
        bookkeeping: Some(0.23),
        points_not_live: vec![],
    }
}

fn fixture() -> View {
    View {
        redis: vec![
            redis(4242, 6379, 0.97),
            redis(5151, 6380, 0.85),
            RedisRow {
                bookkeeping: Some(0.02),
                keys_mean: Some(1.0),
                keys_max: Some(1.0),
                ..redis(6161, 6381, 0.31)
            },
        ],
        workers: vec![
            WorkerRow {
                group: "catchall".into(),
                processes: Some(12.0),
                pops_per_s: Some(1500.0),
                keys_mean: Some(440.0),
                served_p50_s: Some(0.004),
                served_p99_s: Some(0.81),
                timeout_p99_s: Some(2.0),
                errors: Some(0.0),
                queues: Some(440.0),
                shared: Some(20.0),
            },
            WorkerRow {
                group: "urgent".into(),
                processes: Some(2.0),
                pops_per_s: Some(20.0),
                keys_mean: Some(20.0),
                served_p50_s: Some(0.0003),
                served_p99_s: Some(0.002),
                timeout_p99_s: None,
                errors: Some(3.0),
                queues: Some(20.0),
                shared: Some(20.0),
            },
        ],
        health: Health {
            points_not_live: 0,
            programs_not_attached: 0,
            events_lost: 0.0,
            events_lost_in_interval: Some(0.0),
            export_failures: 2.0,
        },
        interval_s: Some(1.0),
        agent_version: "0.1.0".into(),
        missing: vec![],
    }
}

fn render(view: &View, width: u16, height: u16) -> Buffer {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal
        .draw(|f| ui::draw(f, view, &UiState::new(), "127.0.0.1:9464"))
        .unwrap();
    terminal.backend().buffer().clone()
}

fn text(buffer: &Buffer) -> String {
    let area = buffer.area;
    let mut out = String::new();
    for y in 0..area.height {
        let line: String = (0..area.width).map(|x| buffer[(x, y)].symbol()).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn check_snapshot(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_SNAPSHOTS=1 writes it)", path.display()));
    assert_eq!(actual, expected, "{name} differs from {}", path.display());
}

/// Where `needle` starts in the rendered buffer.
fn find(buffer: &Buffer, needle: &str) -> (u16, u16) {
    let t = text(buffer);
    for (y, line) in t.lines().enumerate() {
        if let Some(byte) = line.find(needle) {
            return (line[..byte].chars().count() as u16, y as u16);
        }
    }
    panic!("{needle:?} not in\n{t}");
}

#[test]
fn the_view_fits_80x24() {
    let b = render(&fixture(), 80, 24);
    let t = text(&b);
    assert!(t.lines().all(|l| l.chars().count() <= 80));
    for needle in [
        "6379", "0.97", "440", "catchall", "urgent", "BLKD", "REGS", "BOOK", "q quit",
    ] {
        assert!(t.contains(needle), "{needle:?} missing at 80x24:\n{t}");
    }
    check_snapshot("top-80x24", &t);
}

#[test]
fn a_larger_terminal_shows_every_column() {
    let b = render(&fixture(), 160, 50);
    let t = text(&b);
    for header in ["USR", "SYS", "IO", "BIO", "KMAX", "OTH", "TMO99", "SRV50"] {
        assert!(t.contains(header), "{header} missing at 160x50:\n{t}");
    }
    check_snapshot("top-160x50", &t);
}

#[test]
fn the_main_thread_turns_warning_and_critical_at_the_alert_thresholds() {
    assert_eq!(main_thread_style(Some(0.79)).fg, Some(Color::Green));
    assert_eq!(main_thread_style(Some(0.80)).fg, Some(Color::Yellow));
    assert_eq!(main_thread_style(Some(0.949)).fg, Some(Color::Yellow));
    assert_eq!(main_thread_style(Some(0.95)).fg, Some(Color::Red));
    // And in the rendered table: the 0.97 server's value is red, the 0.85 one's yellow.
    let b = render(&fixture(), 80, 24);
    let (x, y) = find(&b, "0.97");
    assert_eq!(b[(x, y)].fg, Color::Red);
    let (x, y) = find(&b, "0.85");
    assert_eq!(b[(x, y)].fg, Color::Yellow);
    let (x, y) = find(&b, "0.31");
    assert_eq!(b[(x, y)].fg, Color::Green);
}

#[test]
fn an_empty_host_says_so() {
    let view = View {
        agent_version: "0.1.0".into(),
        ..Default::default()
    };
    let t = text(&render(&view, 80, 24));
    assert!(t.contains("no Redis tracked on this host"), "{t}");
    assert!(t.contains("no worker group tracked on this host"), "{t}");
    assert!(t.contains("one reading so far"), "{t}");
    check_snapshot("top-empty", &t);
}

#[test]
fn a_redis_with_missing_probe_points_is_marked_and_counted() {
    let mut view = fixture();
    view.redis[2].points_not_live = vec![
        "blockForKeys=missing".into(),
        "unblockClient=missing".into(),
    ];
    view.redis[2].pops_per_s = None;
    view.redis[2].keys_mean = None;
    view.health.points_not_live = 2;
    view.missing = vec!["process.thread.runqueue.delay"];
    let b = render(&view, 80, 24);
    let t = text(&b);
    assert!(t.contains("2 points not live"), "{t}");
    let (x, y) = find(&b, "6161");
    assert_eq!(
        b[(x, y)].fg,
        Color::Magenta,
        "the PID of a Redis whose points are not live"
    );
    check_snapshot("top-missing-points", &t);
    let once = fanout::top::text::render(&view, "127.0.0.1:9464");
    assert!(
        once.contains("probes=blockForKeys=missing,unblockClient=missing"),
        "{once}"
    );
    assert!(
        once.contains("note: the agent sent no process.thread.runqueue.delay"),
        "{once}"
    );
    assert!(!once.contains('\u{1b}'), "no escape codes in --once");
}
