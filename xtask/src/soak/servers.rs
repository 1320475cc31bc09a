//! The soak's Redis servers, each restartable the way it runs: in the foreground, daemonized
//! (its pid from its pidfile), or in its own mount and PID namespace (`unshare`).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use integration_tests::resp::{Conn, Reply};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Style {
    Foreground,
    Daemonized,
    Namespaced,
}

pub struct Server {
    pub style: Style,
    pub port: u16,
    binary: PathBuf,
    dir: PathBuf,
    /// The foreground process, or `unshare`.
    child: Option<Child>,
    /// The redis-server process itself (host pid).
    pub pid: u32,
}

fn ping(port: u16) -> bool {
    Conn::connect(port)
        .and_then(|mut c| c.call(&["PING"]))
        .is_ok_and(|r| matches!(r, Reply::Simple(ref s) if s == "PONG"))
}

/// A process's state letter in /proc (`R`, `S`, `Z`...), `None` when its stat cannot be read.
pub(super) fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name's closing parenthesis (the name may hold spaces).
    stat.rsplit_once(") ")?.1.chars().next()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && process_state(pid) != Some('Z')
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> Option<u32>) -> Result<u32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Server {
    pub fn start(style: Style, binary: &Path, dir: &Path, port: u16) -> Result<Self> {
        let mut server = Server {
            style,
            port,
            binary: binary.to_path_buf(),
            dir: dir.to_path_buf(),
            child: None,
            pid: 0,
        };
        server.launch()?;
        Ok(server)
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(self.dir.display().to_string());
        match self.style {
            Style::Daemonized => {
                args.extend(["--daemonize".into(), "yes".into(), "--pidfile".into()]);
                args.push(self.pidfile().display().to_string());
            }
            _ => args.extend(["--daemonize".into(), "no".into()]),
        }
        args
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join(format!("redis-{}.pid", self.port))
    }

    /// Starts it and waits until it answers; `self.pid` is then the server's host pid.
    fn launch(&mut self) -> Result<()> {
        let args = self.args();
        let spawn = |cmd: &mut Command| {
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        };
        match self.style {
            Style::Foreground => {
                let child = spawn(Command::new(&self.binary).args(&args))
                    .with_context(|| format!("start {}", self.binary.display()))?;
                self.pid = child.id();
                self.child = Some(child);
            }
            Style::Daemonized => {
                let _ = std::fs::remove_file(self.pidfile());
                let mut launcher = spawn(Command::new(&self.binary).args(&args))?;
                launcher.wait()?;
                let pidfile = self.pidfile();
                self.pid = wait_until("the daemon's pidfile", Duration::from_secs(10), || {
                    std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
                })?;
            }
            Style::Namespaced => {
                let child = spawn(
                    Command::new("unshare")
                        .args(["--mount", "--pid", "--fork", "--mount-proc"])
                        .arg(&self.binary)
                        .args(&args),
                )
                .context("unshare (util-linux)")?;
                let unshare = child.id();
                self.child = Some(child);
                self.pid = wait_until("the namespaced server", Duration::from_secs(10), || {
                    std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
                        .ok()?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                })?;
            }
        }
        let port = self.port;
        wait_until("the server to answer PING", Duration::from_secs(10), || {
            ping(port).then_some(0)
        })?;
        Ok(())
    }

    /// SIGTERM and wait (bounded) for the server to exit.
    pub fn stop(&mut self) {
        // SAFETY: signalling a server this soak started.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let pid = self.pid;
        let _ = wait_until("the server to exit", Duration::from_secs(10), || {
            (!alive(pid)).then_some(0)
        });
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts it again on the same port and binary; returns when it answers.
    pub fn restart(&mut self) -> Result<Instant> {
        self.stop();
        let started = Instant::now();
        self.launch()?;
        Ok(started)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if alive(self.pid) {
            self.stop();
        }
    }
}
