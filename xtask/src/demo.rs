//! `cargo xtask demo`: a Redis, two real Sidekiq fleets (one listening to 20 queues, one to a
//! single queue), a producer, and the agent, shown live with `fanout top` (in a terminal; the
//! `--once` text every 5 s otherwise).

use std::{
    io::IsTerminal as _,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use integration_tests::{resp::Conn, sidekiq_job, Agent, Redis, Sidekiq};

use crate::util::{build_agent, is_root};

pub fn run(seconds: u64) -> Result<()> {
    if !is_root() {
        bail!("the demo attaches eBPF programs: run `sudo cargo xtask demo`");
    }
    let bin = build_agent(true)?;
    println!("starting redis-server, Sidekiq fleets 'wide' (20 queues) and 'narrow' (1 queue), and the agent");
    let redis = Redis::start(&["--io-threads", "2"]);
    let wide_queues: Vec<String> = (0..20).map(|i| format!("wide{i}")).collect();
    let wide_refs: Vec<&str> = wide_queues.iter().map(String::as_str).collect();
    let _wide = Sidekiq::start_tagged(redis.port, Some("wide"), &wide_refs, 5);
    let _narrow = Sidekiq::start_tagged(redis.port, Some("narrow"), &["narrow"], 5);
    let agent = Agent::start_binary(
        &bin,
        &[
            "--worker-rule",
            r"wide:cmdline=sidekiq.*\bwide\b",
            "--worker-rule",
            r"narrow:cmdline=sidekiq.*\bnarrow\b",
        ],
        &[],
    );
    let address = format!("127.0.0.1:{}", agent.port);
    println!("agent metrics: http://{address}/metrics (for {seconds} s)");

    // About 100 jobs a second, spread over both fleets' queues.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (stop, port) = (stop.clone(), redis.port);
        std::thread::spawn(move || -> u64 {
            let Ok(mut conn) = Conn::connect(port) else {
                return 0;
            };
            let mut jid = 0u64;
            while !stop.load(Ordering::Relaxed) {
                jid += 1;
                let queue = if jid.is_multiple_of(2) {
                    "narrow".to_string()
                } else {
                    format!("wide{}", jid % 20)
                };
                let _ = conn.call(&["SADD", "queues", &queue]);
                let _ = conn.call(&[
                    "LPUSH",
                    &format!("queue:{queue}"),
                    &sidekiq_job(&queue, jid),
                ]);
                std::thread::sleep(Duration::from_millis(10));
            }
            jid
        })
    };

    let deadline = Instant::now() + Duration::from_secs(seconds);
    if std::io::stdout().is_terminal() {
        Command::new(&bin)
            .args([
                "top",
                "--address",
                &address,
                "--exit-after",
                &seconds.to_string(),
            ])
            .status()
            .context("fanout top")?;
    } else {
        while Instant::now() + Duration::from_secs(5) <= deadline {
            Command::new(&bin)
                .args(["top", "--once", "--interval", "5", "--address", &address])
                .status()
                .context("fanout top --once")?;
            println!();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let jobs = producer.join().unwrap_or(0);
    println!("enqueued {jobs} jobs; stopping everything");
    Ok(())
}
