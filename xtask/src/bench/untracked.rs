//! What the scheduler programs cost tasks the agent does not track: the `sched_switch` program
//! (`sched_switch_counters`, or `sched_switch` on a kernel without BTF) runs on every context
//! switch of the node, tracked or not, and must drop the untracked ones at once; so does
//! `sched_wakeup` on every wakeup where it is attached (kernels without BTF only).
//!
//! Load: two threads of this (untracked) process ping-pong one byte over a socket pair, pinned
//! to one CPU, so that nearly every context switch and wakeup of the window is between two
//! untracked tasks. The agent runs in its default configuration, tracking nothing of its own or
//! an idle Redis (so that its filter maps are not empty).
//!
//! The kernel's accounting times the programs only, and adds two clock reads to each run.
//! What the node pays, the tracepoints' dispatch included, shows in the ping-pong's own pace:
//! [`paired_rounds`] runs it without the agent and beside it, accounting off.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use integration_tests::{Agent, Redis};

use super::bpf_stats::{StatsSample, Window};

#[derive(Clone, Debug, serde::Serialize)]
pub struct UntrackedSample {
    pub scenario: String,
    /// Round trips of the ping-pong per second.
    pub round_trips_per_second: f64,
    /// Per context switch (sched_switch run) of the node.
    pub stats: StatsSample,
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread (0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Ping-pongs for `seconds`; returns round trips.
fn ping_pong(seconds: f64) -> Result<u64> {
    let (mut a, mut b) = UnixStream::pair()?;
    let stop = Arc::new(AtomicBool::new(false));
    let trips = Arc::new(AtomicU64::new(0));
    let cpu = std::thread::available_parallelism()
        .map(|n| n.get() - 1)
        .unwrap_or(0);
    let echo = thread::spawn(move || {
        pin(cpu);
        let mut byte = [0u8; 1];
        while b.read_exact(&mut byte).is_ok() && byte[0] != 0 {
            if b.write_all(&byte).is_err() {
                break;
            }
        }
    });
    let (s, t) = (stop.clone(), trips.clone());
    let pinger = thread::spawn(move || -> std::io::Result<()> {
        pin(cpu);
        let mut byte = [1u8; 1];
        while !s.load(Ordering::Relaxed) {
            a.write_all(&[1])?;
            a.read_exact(&mut byte)?;
            t.fetch_add(1, Ordering::Relaxed);
        }
        a.write_all(&[0])
    });
    thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    pinger
        .join()
        .map_err(|_| anyhow::anyhow!("ping-pong thread panicked"))??;
    let _ = echo.join();
    Ok(trips.load(Ordering::Relaxed))
}

/// One window of the ping-pong under the agent, beside an idle tracked Redis or not.
pub fn measure(
    bin: &std::path::Path,
    beside_idle_redis: bool,
    seconds: f64,
) -> Result<UntrackedSample> {
    let redis = beside_idle_redis.then(|| Redis::start(&[]));
    let agent = Agent::start_binary(bin, &[], &[]);
    if let Some(r) = &redis {
        super::wait_for_redis_probes(&agent, r);
    }
    // Let the agent's start settle.
    thread::sleep(Duration::from_millis(300));
    let window = Window::start(agent.proc.pid())?;
    let started = Instant::now();
    let trips = ping_pong(seconds)?;
    let wall = started.elapsed().as_secs_f64();
    // Per sched_switch run: filled in below from the window itself.
    let mut stats = window.finish(1.0, "context switch")?;
    let switches = super::report::SWITCH_PROGRAMS
        .iter()
        .filter_map(|name| stats.program(name))
        .map(|p| p.runs)
        .sum::<u64>() as f64;
    if switches > 0.0 {
        for p in &mut stats.programs {
            p.runs_per_op = p.runs as f64 / switches;
            p.ns_per_op = p.run_time_ns as f64 / switches;
        }
        stats.ops = switches;
        stats.total_ns_per_op = stats.programs.iter().map(|p| p.ns_per_op).sum();
    }
    drop(agent);
    drop(redis);
    Ok(UntrackedSample {
        scenario: if beside_idle_redis {
            "agent tracking an idle Redis".into()
        } else {
            "agent tracking no process of the bench".into()
        },
        round_trips_per_second: trips as f64 / wall,
        stats,
    })
}

/// Ping-pong round trips per second without the agent and with it (default configuration,
/// tracking nothing of the bench, kernel accounting off), in `rounds` pairs that alternate
/// their order.
pub fn paired_rounds(
    bin: &std::path::Path,
    rounds: usize,
    seconds: f64,
) -> Result<Vec<(f64, f64)>> {
    let pace = || -> Result<f64> {
        let started = Instant::now();
        let trips = ping_pong(seconds)?;
        Ok(trips as f64 / started.elapsed().as_secs_f64())
    };
    let with_agent = || -> Result<f64> {
        let agent = Agent::start_binary(bin, &[], &[]);
        thread::sleep(Duration::from_millis(500));
        let pace = pace();
        drop(agent);
        pace
    };
    let mut pairs = Vec::new();
    for round in 0..rounds {
        let (without, with) = if round % 2 == 0 {
            let without = pace()?;
            (without, with_agent()?)
        } else {
            let with = with_agent()?;
            (pace()?, with)
        };
        pairs.push((without, with));
    }
    Ok(pairs)
}
