//! The testbed: real processes (redis-server, Sidekiq, the agent) started on loopback ports and
//! killed on drop, and small clients for RESP, HTTP and the Prometheus text format. Used by the
//! root-only integration tests and by `cargo xtask demo`/`bench`. Every wait is bounded and
//! panics with what it was waiting for.

pub mod otlp_receiver;
pub mod prom;
pub mod resp;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Panics loudly unless run as root through `cargo xtask test`: these tests attach eBPF
/// programs and start servers, and must never pass by doing nothing.
pub fn require_root() {
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if std::env::var("FANOUT_INTEGRATION").as_deref() != Ok("1") || !root {
        panic!(
            "integration tests need root and the agent binary: run them with `sudo cargo xtask test` \
             (FANOUT_INTEGRATION=1 and FANOUT_BIN set, euid 0); refusing to pass without running"
        );
    }
}

pub fn fanout_bin() -> PathBuf {
    PathBuf::from(std::env::var("FANOUT_BIN").expect("FANOUT_BIN is set by cargo xtask test"))
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 20 ms until it returns Some, for at most `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process that is terminated (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait (bounded) for the exit.
    pub fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// A real redis-server on a loopback port, without persistence.
pub struct Redis {
    pub proc: Proc,
    pub port: u16,
}

impl Redis {
    pub fn start(extra: &[&str]) -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server (Debian package redis-server) must be installed by cargo xtask setup",
            );
        let redis = Redis {
            proc: Proc {
                child,
                name: "redis-server".into(),
            },
            port,
        };
        wait_for(
            "redis-server to answer PING",
            Duration::from_secs(10),
            || {
                redis
                    .try_command(&["PING"])
                    .ok()
                    .filter(|r| r == "+PONG\r\n")
            },
        );
        redis
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Sends one command and returns the raw reply (one read of the first reply line and any
    /// bulk body that follows; enough for the simple replies tests use).
    pub fn try_command(&self, args: &[&str]) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.write_all(&resp_command(args))?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if let Some(len) = line
            .strip_prefix('$')
            .and_then(|n| n.trim().parse::<i64>().ok())
        {
            if len >= 0 {
                let mut body = vec![0; len as usize + 2];
                reader.read_exact(&mut body)?;
                line.push_str(&String::from_utf8_lossy(&body));
            }
        }
        Ok(line)
    }

    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn resp_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{}\r\n", a.len(), a).as_bytes());
    }
    out
}

/// A real Sidekiq worker (Debian's ruby-sidekiq) serving `queues` from the Redis on `port`.
pub struct Sidekiq {
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

impl Sidekiq {
    pub fn start(redis_port: u16, queues: &[&str], concurrency: u32) -> Self {
        Self::start_tagged(redis_port, None, queues, concurrency)
    }

    /// With `-g TAG`, which Sidekiq shows in its process title: rules can tell fleets apart.
    pub fn start_tagged(
        redis_port: u16,
        tag: Option<&str>,
        queues: &[&str],
        concurrency: u32,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("jobs.rb"),
            "require 'sidekiq'\nclass NoopJob\n  include Sidekiq::Worker\n  def perform(*args); end\nend\n",
        )
        .unwrap();
        let mut cmd = Command::new("sidekiq");
        cmd.current_dir(dir.path())
            .env("REDIS_URL", format!("redis://127.0.0.1:{redis_port}"))
            .args(["-r", "./jobs.rb", "-c", &concurrency.to_string()]);
        if let Some(tag) = tag {
            cmd.args(["-g", tag]);
        }
        for q in queues {
            cmd.args(["-q", q]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sidekiq (Debian package ruby-sidekiq)");
        let pid = child.id();
        let sidekiq = Sidekiq {
            proc: Proc {
                child,
                name: "sidekiq".into(),
            },
            _dir: dir,
        };
        // Ready once its processor threads exist.
        wait_for(
            "Sidekiq to start its processor threads",
            Duration::from_secs(30),
            || {
                let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
                let processors = tasks
                    .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                    .filter(|c| c.trim() == "processor")
                    .count();
                (processors == concurrency as usize).then_some(())
            },
        );
        sidekiq
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// The agent under test, with its Prometheus endpoint on a free port. Its log goes to a temp
/// file that is printed if the test fails while it runs.
pub struct Agent {
    pub proc: Proc,
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl Agent {
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_binary(&fanout_bin(), args, env)
    }

    pub fn start_binary(bin: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_wrapped(&[], bin, args, env)
    }

    /// Runs the agent under `wrapper` (a command that execs its last arguments, such as
    /// `setpriv ...`).
    pub fn start_wrapped(
        wrapper: &[&str],
        bin: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args([
                "run",
                "--prometheus-listen",
                &format!("127.0.0.1:{port}"),
                "--log-level",
                "info,fanout=debug",
            ])
            .args(args)
            .envs(env.iter().copied())
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("spawn the agent");
        let agent = Agent {
            proc: Proc {
                child,
                name: "fanout".into(),
            },
            port,
            log,
        };
        wait_for("the agent's /readyz", Duration::from_secs(20), || {
            (http_get(port, "/readyz").ok()?.0 == 200).then_some(())
        });
        agent
    }

    pub fn metrics_text(&self) -> String {
        let (status, body) = http_get(self.port, "/metrics")
            .unwrap_or_else(|e| panic!("scrape failed: {e}\nagent log:\n{}", self.log()));
        assert_eq!(status, 200);
        body
    }

    pub fn scrape(&self) -> prom::Scrape {
        prom::Scrape::parse(&self.metrics_text())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ---\n{}\n--- end of agent log ---",
                self.log()
            );
        }
    }
}

/// A minimal HTTP/1.0 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A no-op Sidekiq job for `queue`, in the format Sidekiq 6 reads.
pub fn sidekiq_job(queue: &str, jid: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    format!(
        r#"{{"class":"NoopJob","args":[],"retry":false,"queue":"{queue}","jid":"{jid:024x}","created_at":{now},"enqueued_at":{now}}}"#
    )
}

/// Pushes one no-op Sidekiq job onto `queue`.
pub fn enqueue_sidekiq_job(redis: &Redis, queue: &str, jid: u64) {
    redis.command(&["SADD", "queues", queue]);
    redis.command(&["LPUSH", &format!("queue:{queue}"), &sidekiq_job(queue, jid)]);
}
