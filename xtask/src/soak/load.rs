//! The soak's load: blocking and plain clients on the Redis servers, with exact client-side
//! tallies where the report compares them with the agent's counts, the raw client that
//! closes connections mid-pop, and a parent that forks a short-lived child per job.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use integration_tests::resp::{Conn, Reply};

/// Blocking calls a client made that blocked, by how they ended (what the agent counts).
#[derive(Debug, Default)]
pub struct Tally {
    pub served: AtomicU64,
    pub timeout: AtomicU64,
    /// The client closed its connection while blocked.
    pub closed: AtomicU64,
    /// Cycles abandoned because Redis did not answer as expected (none on a steady server).
    pub errors: AtomicU64,
}

/// `blocked_clients` from INFO.
fn blocked_clients(conn: &mut Conn) -> Option<u64> {
    let Reply::Bulk(Some(info)) = conn.call(&["INFO", "clients"]).ok()? else {
        return None;
    };
    String::from_utf8_lossy(&info).lines().find_map(|l| {
        l.strip_prefix("blocked_clients:")
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Waits (bounded) until INFO shows `n` blocked clients.
fn wait_blocked(control: &mut Conn, n: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if blocked_clients(control) == Some(n) {
            return true;
        }
        thread::sleep(Duration::from_millis(2));
    }
    false
}

/// One cycle of each outcome, again and again, each one certain to have blocked: a BRPOP
/// that times out on an empty key; a BRPOP served by a push made once INFO shows it blocked;
/// a BRPOP whose connection is closed once INFO shows it blocked. The server must see no
/// other blocking client.
pub fn exact_blocking(port: u16, stop: Arc<AtomicBool>, tally: Arc<Tally>) -> JoinHandle<()> {
    thread::spawn(move || {
        let (Ok(mut client), Ok(mut control)) = (Conn::connect(port), Conn::connect(port)) else {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            match n % 3 {
                0 => match client.call(&["BRPOP", "soak:exact:empty", "0.05"]) {
                    Ok(r) if r.is_nil() => {
                        tally.timeout.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                    }
                },
                1 => {
                    let key = format!("soak:exact:served:{n}");
                    if client.send(&["BRPOP", &key, "5"]).is_err() || !wait_blocked(&mut control, 1)
                    {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    let _ = control.call(&["LPUSH", &key, "job"]);
                    match client.read() {
                        Ok(Reply::Array(Some(_))) => {
                            tally.served.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            tally.errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                _ => {
                    let Ok(mut closing) = Conn::connect(port) else {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    if closing.send(&["BRPOP", "soak:exact:closed", "5"]).is_err()
                        || !wait_blocked(&mut control, 1)
                    {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    closing.shutdown();
                    if wait_blocked(&mut control, 0) {
                        tally.closed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tally.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
    })
}

/// A client that keeps a Redis busy with `BRPOP` (timing out) or `SET`/`GET`, reconnecting
/// whenever the server goes away (it is restarted under it). Returns the calls answered.
pub fn looping_client(port: u16, blocking: bool, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    thread::spawn(move || {
        let mut answered = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let Ok(mut conn) = Conn::connect(port) else {
                thread::sleep(Duration::from_millis(50));
                continue;
            };
            while !stop.load(Ordering::Relaxed) {
                let reply = if blocking {
                    conn.call(&["BRPOP", "soak:loop:q1", "soak:loop:q2", "0.05"])
                } else {
                    conn.call(&["SET", "soak:loop:k", "v"])
                        .and_then(|_| conn.call(&["GET", "soak:loop:k"]))
                };
                if reply.is_err() {
                    break;
                }
                answered += 1;
                if !blocking {
                    thread::sleep(Duration::from_millis(5));
                }
            }
        }
        answered
    })
}

/// The raw client: opens a connection, sends a blocking pop and closes the connection after
/// a few ms, mid-pop, again and again. Returns how many it closed.
pub fn mid_pop_closer(port: u16, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    thread::spawn(move || {
        let mut closed = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.write_all(b"*3\r\n$5\r\nBLPOP\r\n$15\r\nsoak:raw:closer\r\n$1\r\n5\r\n");
                thread::sleep(Duration::from_millis(15));
                let _ = s.set_read_timeout(Some(Duration::from_millis(1)));
                let _ = s.read(&mut [0u8; 16]);
                drop(s);
                closed += 1;
            } else {
                thread::sleep(Duration::from_millis(50));
            }
            thread::sleep(Duration::from_millis(30));
        }
        closed
    })
}

/// A worker parent that forks a child per job; each child pops once (BRPOP, 0.1 s timeout)
/// and exits. The tag in its command line matches the soak's worker rule.
pub fn forking_parent(port: u16, tag: &str, jobs_per_second: u32) -> std::io::Result<Child> {
    let script = format!(
        r#"import os, socket, sys, time
while True:
    pid = os.fork()
    if pid == 0:
        try:
            s = socket.create_connection(("127.0.0.1", {port}))
            s.sendall(b"*3\r\n$5\r\nBRPOP\r\n$13\r\nsoak:fork:job\r\n$3\r\n0.1\r\n")
            s.recv(64)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    time.sleep({pause})
"#,
        pause = 1.0 / jobs_per_second.max(1) as f64
    );
    let python = ["/usr/bin/python3", "/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .unwrap_or("python3");
    Command::new(python)
        .args(["-c", &script, tag])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}
