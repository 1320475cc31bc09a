//! `fanout top` against a real agent, Redis and Sidekiq fleet: the `--once` lines, and the
//! interactive view driven in a real terminal (tmux: keys sent, the pane captured). Root
//! only; run with `sudo cargo xtask test`.

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    fanout_bin, require_root, resp::Conn, sidekiq_job, wait_for, Agent, Redis, Sidekiq,
};

/// The `key=value` pairs of the first line starting with `kind` that `keep` accepts.
fn line_of(
    text: &str,
    kind: &str,
    keep: impl Fn(&BTreeMap<String, String>) -> bool,
) -> Option<BTreeMap<String, String>> {
    text.lines()
        .filter(|l| l.split_whitespace().next() == Some(kind))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        })
        .find(|pairs| keep(pairs))
}

fn top_once(agent: &Agent, interval: &str) -> String {
    let out = Command::new(fanout_bin())
        .args(["top", "--once", "--interval", interval, "--address"])
        .arg(format!("127.0.0.1:{}", agent.port))
        .output()
        .expect("run fanout top");
    assert!(
        out.status.success(),
        "fanout top --once: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn queues(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("top{i}")).collect()
}

#[test]
fn top_once_shows_the_redis_row_and_the_sidekiq_group_on_20_queues() {
    require_root();
    let redis = Redis::start(&[]);
    let agent = Agent::start(&[]);
    let names = queues(20);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let sidekiq = Sidekiq::start(redis.port, &refs, 4);
    // Jobs on a few of the queues, so that pops are served as well as timed out.
    let producer = std::thread::spawn({
        let port = redis.port;
        move || {
            let mut conn = Conn::connect(port).expect("connect to Redis");
            for jid in 0..200u64 {
                let queue = format!("top{}", jid % 3);
                let _ = conn.call(&["SADD", "queues", &queue]);
                let _ = conn.call(&[
                    "LPUSH",
                    &format!("queue:{queue}"),
                    &sidekiq_job(&queue, jid),
                ]);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    let port = redis.port.to_string();
    let text = wait_for(
        "a Redis row with pops and 20 keys per pop",
        Duration::from_secs(30),
        || {
            let text = top_once(&agent, "2");
            let row = line_of(&text, "redis", |p| p.get("port") == Some(&port))?;
            let pops: f64 = row.get("pops/s")?.parse().ok()?;
            (pops > 0.0 && row.get("keys").map(String::as_str) == Some("20.0")).then_some(text)
        },
    );
    let _ = producer.join();
    let redis_row = line_of(&text, "redis", |p| p.get("port") == Some(&port)).unwrap();
    assert_eq!(redis_row["pid"], redis.pid().to_string(), "{text}");
    assert_eq!(redis_row["probes"], "live", "{text}");
    let group = line_of(&text, "worker", |p| {
        p.get("group").map(String::as_str) == Some("sidekiq")
    })
    .unwrap_or_else(|| panic!("no sidekiq group line:\n{text}"));
    assert_eq!(group["queues"], "20", "{text}");
    assert_eq!(group["keys"], "20.0", "{text}");
    assert_eq!(group["procs"], "1", "{text}");
    assert!(text.lines().any(|l| l.starts_with("health ")), "{text}");
    assert!(!text.contains('\u{1b}'), "no escape codes: {text:?}");
    drop(sidekiq);
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux (cargo xtask setup installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tmux server of its own (its socket named after this process), killed on drop.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let mut all = vec!["-L", self.0.as_str()];
        all.extend_from_slice(args);
        tmux(&all)
    }
    fn capture(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }
    fn wait_screen(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let screen = self.capture();
            if f(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

#[test]
fn the_interactive_view_sorts_pauses_and_quits_restoring_the_terminal() {
    require_root();
    let redis = Redis::start(&[]);
    let agent = Agent::start(&[]);
    let names = queues(5);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let _sidekiq = Sidekiq::start(redis.port, &refs, 2);
    let t = Tmux(format!("fanout-top-test-{}", std::process::id()));
    // tmux runs the command through sh, which then records its exit status: tmux itself
    // learns it only when it reaps the child, which on a loaded machine it was once seen not
    // to do within 10 s of the pane dying.
    let dir = tempfile::tempdir().unwrap();
    let status_file = dir.path().join("status");
    let command = format!(
        "{} top --interval 0.5 --address 127.0.0.1:{}; echo $? > {}",
        fanout_bin().display(),
        agent.port,
        status_file.display()
    );
    t.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "100",
        "-y",
        "30",
        &command,
    ]);
    t.run(&["set-option", "-t", "top", "remain-on-exit", "on"]);
    let screen = t.wait_screen("the Redis pane with its rates", |s| {
        s.contains("Redis (") && s.contains("rates over") && s.contains(&redis.port.to_string())
    });
    assert!(
        screen.contains("MAIN▼"),
        "sorted by the main thread at first:\n{screen}"
    );
    assert_eq!(
        t.run(&["display", "-p", "-t", "top", "#{alternate_on}"])
            .trim(),
        "1"
    );

    // r reverses the Redis sort; Tab then s moves the worker pane's sort to its next column.
    t.run(&["send-keys", "-t", "top", "r"]);
    t.wait_screen("the reversed sort", |s| s.contains("MAIN▲"));
    t.run(&["send-keys", "-t", "top", "Tab", "s"]);
    let screen = t.wait_screen("the worker pane sorted by keys", |s| s.contains("KEYS▲"));
    assert!(screen.contains("sidekiq"), "{screen}");
    t.run(&["send-keys", "-t", "top", "p"]);
    t.wait_screen("paused", |s| s.contains("[paused]"));
    t.run(&["send-keys", "-t", "top", "?"]);
    t.wait_screen("the help", |s| {
        s.contains("switch between the Redis and worker panes")
    });
    t.run(&["send-keys", "-t", "top", "?", "q"]);

    // Quit: the program exits 0 (a signal would show as 128 + its number) and the terminal
    // is back from the alternate screen.
    let status = wait_for("fanout top to quit", Duration::from_secs(10), || {
        let status = std::fs::read_to_string(&status_file).ok()?;
        status.ends_with('\n').then_some(status)
    });
    assert_eq!(
        status.trim(),
        "0",
        "fanout top's exit status:\n{}",
        t.capture()
    );
    t.wait_screen("the pane dead", |_| {
        t.run(&["display", "-p", "-t", "top", "#{pane_dead}"])
            .trim()
            == "1"
    });
    assert_eq!(
        t.run(&["display", "-p", "-t", "top", "#{alternate_on}"])
            .trim(),
        "0"
    );
    let after = t.capture();
    assert!(
        !after.contains("Redis ("),
        "the view is gone from the restored screen:\n{after}"
    );
}
