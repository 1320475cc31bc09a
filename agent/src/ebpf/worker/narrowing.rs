//! Taking the probes off `write()` and `read()` for workers whose Redis connections never go
//! through them.
//!
//! # Why
//! Ruby's and Python's sockets send through `send`/`sendto` and read through `recvfrom`,
//! while `write` and `read` are what their log lines, pipes and files go through: a Sidekiq
//! worker writes two log lines and a deprecation warning per job. Followed through uprobes,
//! each is a trap in the worker; through the syscall tracepoints, `sys_enter_write` and
//! `sys_exit_read` run for every process on the node, Redis included. For
//! such workers those probes follow nothing.
//!
//! # How
//! The programs learn which kind of function each of a connection's writes and reads came
//! through (`agent_common::worker::io_site`: from a uprobe-multi link's attach cookie, or
//! from a syscall tracepoint's syscall number) and OR it into the connection's `write_sites`
//! and `read_sites`. A worker's `write` uprobe has a link of its own, so that it can go while
//! `send`/`sendto` stay (reads through uprobes keep their probes: Ruby and Python workers do
//! not call `read`); the tracepoints are one link each. Each second, [`verdict`] looks at a
//! followed process's connections, for one direction:
//! - *narrow* (take the probe out) once every connection that carried RESP went through the
//!   socket functions only, and every socket the process holds to those Redis servers is
//!   such a connection;
//! - *widen* (put it back) when a socket to one of those servers appears that is not a
//!   followed connection (a new connection, whose client may use `write`/`read`), or a
//!   connection did go through them.
//!
//! A tracepoint serves every worker followed through the tracepoints: it goes only when
//! [`Connections::verdict_for_all`] says none of them needs it, comes back at once when a
//! worker starts being followed, and stays at least [`SYSCALL_REST`] after that.
//!
//! Nothing that carries RESP loses its probe: the socket functions, close and connect keep
//! theirs. Only TCP connections narrow (unix sockets, syslog's and nscd's included, all look
//! alike); a server is matched whichever way it is reached (`::1`, an IPv4-mapped address)
//! and remembered after its connections close. What it can miss: what a new connection to a
//! server the process never talked to before, or one it opened while its probe was out,
//! sends or reads through `write`/`read` before the agent's next look (about a second) puts
//! the probe back, in a process whose earlier connections all used the socket functions (two
//! client libraries of different kinds in one process). A process that widens
//! [`MAX_WIDENINGS`] times (it keeps opening connections) keeps its `write` uprobe for good.
//!
//! Cost: the agent walks `CONNS` and `CONN_PEERS` at most once a second, and only when a
//! decision is due: after a followed worker's connect() (the kernel counts them in
//! `CONNECTS`), or while a worker is undecided (no connection told apart yet; looked at
//! after 1, 2, 4 ... 32 s). Settled workers (probe out, or a connection through
//! `write`/`read`) wait for their next connect().

use std::collections::BTreeSet;

use agent_common::worker::{io_site, ConnKey, ConnState, Peer};

/// Widenings after which a process keeps its `write` probe: its connections come and go,
/// and each attach and detach of a link costs a synchronisation in the kernel.
pub const MAX_WIDENINGS: u32 = 3;

/// How long a syscall tracepoint stays after it was attached again, at least: workers that
/// come and go would otherwise have it attached and detached over and over.
pub const SYSCALL_REST: std::time::Duration = std::time::Duration::from_secs(60);

/// How long after an undecided look a process is looked at again; doubled after each one up
/// to [`MAX_BACKOFF`], and back to this after a connect().
pub const FIRST_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);
pub const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(32);

/// When a process's (or the node's) `write` probe is looked at next: at once after a
/// connect(), then after 1, 2, 4 ... 32 s while nothing is decided.
#[derive(Clone, Debug)]
pub struct Schedule {
    next: std::time::Instant,
    backoff: std::time::Duration,
}

impl Schedule {
    pub fn now() -> Self {
        Self {
            next: std::time::Instant::now(),
            backoff: FIRST_BACKOFF,
        }
    }

    pub fn due(&self, now: std::time::Instant) -> bool {
        self.next <= now
    }

    /// Something changed (a connect(), a probe taken out or put back): look again soon.
    pub fn reset(&mut self, now: std::time::Instant) {
        self.next = now;
        self.backoff = FIRST_BACKOFF;
    }

    /// Nothing to look at until something changes ([`Self::reset`] after a connect()).
    pub fn park(&mut self) {
        self.next = std::time::Instant::now() + std::time::Duration::from_secs(365 * 24 * 3600);
    }

    /// Nothing was decided: look again later, less often.
    pub fn later(&mut self, now: std::time::Instant) {
        self.next = now + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// Which side of the connections a probe follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// `write` against `send`/`sendto`.
    Write,
    /// `read` against `recv`/`recvfrom`.
    Read,
}

impl Direction {
    fn sites(self, conn: &ConnState) -> u32 {
        match self {
            Direction::Write => conn.write_sites,
            Direction::Read => conn.read_sites,
        }
    }
}

/// What [`verdict`] looks at for each process of a set: its followed connections and the
/// sockets the kernel knows it holds (`CONN_PEERS`).
#[derive(Debug, Default)]
pub struct Connections {
    conns: std::collections::HashMap<u32, Vec<FollowedConn>>,
    sockets: std::collections::HashMap<u32, Vec<(u32, Peer)>>,
}

impl Connections {
    /// Gathers those of the processes in `pids` from the two maps' entries, with the sites of
    /// `direction`.
    pub fn gather(
        pids: &BTreeSet<u32>,
        direction: Direction,
        conns: impl IntoIterator<Item = (ConnKey, ConnState)>,
        sockets: impl IntoIterator<Item = (ConnKey, Peer)>,
    ) -> Self {
        let mut out = Self::default();
        for (key, conn) in conns {
            if pids.contains(&key.tgid) {
                out.conns.entry(key.tgid).or_default().push(FollowedConn {
                    fd: key.fd,
                    peer: conn.peer,
                    sites: direction.sites(&conn),
                });
            }
        }
        for (key, peer) in sockets {
            if pids.contains(&key.tgid) {
                out.sockets
                    .entry(key.tgid)
                    .or_default()
                    .push((key.fd, peer));
            }
        }
        out
    }

    /// [`verdict`] for process `pid`, which is known to have talked to the servers `known`.
    pub fn verdict(&self, pid: u32, narrowed: bool, known: &BTreeSet<Server>) -> Verdict {
        let conns = self.conns.get(&pid).map(Vec::as_slice).unwrap_or_default();
        let sockets = self
            .sockets
            .get(&pid)
            .map(Vec::as_slice)
            .unwrap_or_default();
        verdict(narrowed, conns, sockets, known)
    }

    /// The servers process `pid`'s followed connections talk to now.
    pub fn servers(&self, pid: u32) -> impl Iterator<Item = Server> + '_ {
        self.conns
            .get(&pid)
            .into_iter()
            .flatten()
            .filter_map(|c| Server::of(&c.peer))
    }

    /// The verdict for a probe that serves every process of `pids` at once (a syscall
    /// tracepoint): out only if each of them could do without it, back if any of them needs
    /// it. `known` holds the servers each has talked to.
    pub fn verdict_for_all(
        &self,
        pids: &BTreeSet<u32>,
        narrowed: bool,
        known: &std::collections::HashMap<u32, BTreeSet<Server>>,
    ) -> Verdict {
        let empty = BTreeSet::new();
        let verdicts: Vec<Verdict> = pids
            .iter()
            .map(|pid| self.verdict(*pid, narrowed, known.get(pid).unwrap_or(&empty)))
            .collect();
        if narrowed {
            if verdicts.contains(&Verdict::Widen) {
                Verdict::Widen
            } else {
                Verdict::Settled
            }
        } else if !verdicts.is_empty() && verdicts.iter().all(|v| *v == Verdict::Narrow) {
            Verdict::Narrow
        } else if verdicts.contains(&Verdict::Settled) {
            Verdict::Settled
        } else {
            Verdict::Keep
        }
    }
}

/// Most servers remembered per process (see [`verdict`]'s `known`).
pub const MAX_KNOWN_SERVERS: usize = 64;

/// Adds the servers a process's connections talk to `now` to those it is `known` to talk
/// to, up to [`MAX_KNOWN_SERVERS`].
pub fn remember_servers(known: &mut BTreeSet<Server>, now: impl Iterator<Item = Server>) {
    for server in now {
        if known.len() >= MAX_KNOWN_SERVERS {
            break;
        }
        known.insert(server);
    }
}

/// A Redis server as a process reaches it over TCP: its port, and its address with an
/// IPv4-mapped IPv6 address folded to IPv4 and every loopback address (127.0.0.0/8, ::1)
/// folded to one, so that the same server reached two ways is one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Server {
    port: u16,
    addr: [u8; 16],
}

impl Server {
    /// `None` for a peer that is not TCP (unix sockets all look alike) or not known.
    pub fn of(peer: &Peer) -> Option<Self> {
        const LOOPBACK: [u8; 16] = [0xff; 16];
        let v4 = |a: &[u8]| -> [u8; 16] {
            if a[0] == 127 {
                return LOOPBACK;
            }
            let mut out = [0; 16];
            out[..4].copy_from_slice(&a[..4]);
            out
        };
        let addr = match peer.family {
            2 => v4(&peer.addr[..4]),
            10 => {
                let a = &peer.addr;
                let mapped = a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff;
                if mapped {
                    v4(&a[12..])
                } else if std::net::Ipv6Addr::from(*a).is_loopback() {
                    LOOPBACK
                } else {
                    *a
                }
            }
            _ => return None,
        };
        Some(Self {
            port: peer.port,
            addr,
        })
    }
}

/// One followed connection of a process, as its `CONNS` entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FollowedConn {
    pub fd: u32,
    pub peer: Peer,
    /// The [`io_site`] bits of the direction looked at.
    pub sites: u32,
}

/// What to do with a probe on `write` (or `read`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing decided yet (no connection, or one not told apart yet): look again later.
    Keep,
    /// Nothing to do until the process connects again: its probe is out and nothing needs
    /// it, or a connection of it goes through `write`/`read`.
    Settled,
    /// Take it out: the process's Redis connections go through the socket functions.
    Narrow,
    /// Put it back: a connection it cannot vouch for appeared.
    Widen,
}

/// What to do with the `write` (or `read`) probe of a process whose followed connections are
/// `conns`, whose sockets (fd and peer, from `CONN_PEERS`) are `sockets`, and which has
/// talked to the servers `known` before (those of connections since closed included);
/// `narrowed` says whether the probe is out now. Only TCP connections narrow: unix sockets
/// (syslog, nscd) all look alike, so a Redis reached through one keeps its probes.
pub fn verdict(
    narrowed: bool,
    conns: &[FollowedConn],
    sockets: &[(u32, Peer)],
    known: &BTreeSet<Server>,
) -> Verdict {
    let mut servers: BTreeSet<Server> = known.clone();
    servers.extend(conns.iter().filter_map(|c| Server::of(&c.peer)));
    let followed: BTreeSet<u32> = conns.iter().map(|c| c.fd).collect();
    // A socket to a Redis this process talks or talked to that is not followed yet: a new
    // connection (its first command is still to come, maybe through `write`/`read`).
    let unvouched = sockets.iter().any(|(fd, peer)| {
        !followed.contains(fd) && Server::of(peer).is_some_and(|s| servers.contains(&s))
    });
    let through_generic = conns.iter().any(|c| c.sites & io_site::GENERIC != 0);
    if narrowed {
        return if unvouched || through_generic {
            Verdict::Widen
        } else {
            Verdict::Settled
        };
    }
    if through_generic {
        return Verdict::Settled;
    }
    let socket_only = !conns.is_empty()
        && conns
            .iter()
            .all(|c| Server::of(&c.peer).is_some() && c.sites == io_site::SOCKET);
    if socket_only && !unvouched {
        Verdict::Narrow
    } else {
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> Peer {
        Peer {
            family: 2,
            port,
            addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    fn conn(fd: u32, port: u16, sites: u32) -> FollowedConn {
        FollowedConn {
            fd,
            peer: peer(port),
            sites,
        }
    }

    fn none() -> BTreeSet<Server> {
        BTreeSet::new()
    }

    const SOCKET: u32 = io_site::SOCKET;
    /// `write()` or `read()`.
    const WRITE: u32 = io_site::GENERIC;

    #[test]
    fn socket_only_connections_narrow() {
        let conns = [conn(10, 6379, SOCKET), conn(11, 6379, SOCKET)];
        let sockets = [(10, peer(6379)), (11, peer(6379)), (12, peer(443))];
        assert_eq!(verdict(false, &conns, &sockets, &none()), Verdict::Narrow);
        // Once out, it stays out while nothing changes.
        assert_eq!(verdict(true, &conns, &sockets, &none()), Verdict::Settled);
    }

    #[test]
    fn a_connection_through_write_keeps_the_probe() {
        let conns = [conn(10, 6379, SOCKET), conn(11, 6379, WRITE)];
        assert_eq!(verdict(false, &conns, &[], &none()), Verdict::Settled);
        let both = [conn(10, 6379, SOCKET | WRITE)];
        assert_eq!(verdict(false, &both, &[], &none()), Verdict::Settled);
        assert_eq!(verdict(true, &both, &[], &none()), Verdict::Widen);
    }

    #[test]
    fn nothing_known_yet_keeps_the_probe() {
        // No followed connection yet, one whose function is not told (followed through
        // the tracepoints before), or one whose peer is not known yet.
        assert_eq!(
            verdict(false, &[], &[(10, peer(6379))], &none()),
            Verdict::Keep
        );
        assert_eq!(
            verdict(false, &[conn(10, 6379, 0)], &[], &none()),
            Verdict::Keep
        );
        let mut unknown_peer = conn(10, 6379, SOCKET);
        unknown_peer.peer = Peer::default();
        assert_eq!(verdict(false, &[unknown_peer], &[], &none()), Verdict::Keep);
    }

    #[test]
    fn a_new_socket_to_the_same_redis_widens_or_waits() {
        let conns = [conn(10, 6379, SOCKET)];
        let sockets = [(10, peer(6379)), (14, peer(6379))];
        assert_eq!(verdict(true, &conns, &sockets, &none()), Verdict::Widen);
        assert_eq!(verdict(false, &conns, &sockets, &none()), Verdict::Keep);
        // Once it carried a command through send, the process narrows again.
        let conns = [conn(10, 6379, SOCKET), conn(14, 6379, SOCKET)];
        assert_eq!(verdict(false, &conns, &sockets, &none()), Verdict::Narrow);
    }

    #[test]
    fn a_probe_shared_by_processes_goes_only_if_none_needs_it() {
        let state = |sites: u32| ConnState {
            peer: peer(6379),
            write_sites: sites,
            ..ConnState::default()
        };
        let key = |tgid: u32, fd: u32| ConnKey { tgid, fd };
        let pids: BTreeSet<u32> = [1, 2].into();
        let socket_only = Connections::gather(
            &pids,
            Direction::Write,
            [
                (key(1, 10), state(SOCKET)),
                (key(2, 10), state(SOCKET)),
                (key(3, 9), state(WRITE)),
            ],
            [(key(1, 10), peer(6379)), (key(2, 10), peer(6379))],
        );
        // Process 3 is not in the set: its write() does not count.
        assert_eq!(
            socket_only.verdict_for_all(&pids, false, &Default::default()),
            Verdict::Narrow
        );
        assert_eq!(
            socket_only.verdict_for_all(&pids, true, &Default::default()),
            Verdict::Settled
        );
        let one_writes = Connections::gather(
            &pids,
            Direction::Write,
            [(key(1, 10), state(SOCKET)), (key(2, 10), state(WRITE))],
            [],
        );
        assert_eq!(
            one_writes.verdict_for_all(&pids, false, &Default::default()),
            Verdict::Settled
        );
        assert_eq!(
            one_writes.verdict_for_all(&pids, true, &Default::default()),
            Verdict::Widen
        );
        // A process that has no connection yet (it just started) keeps the probe in.
        let one_new =
            Connections::gather(&pids, Direction::Write, [(key(1, 10), state(SOCKET))], []);
        assert_eq!(
            one_new.verdict_for_all(&pids, false, &Default::default()),
            Verdict::Keep
        );
        assert_eq!(
            Connections::default().verdict_for_all(&BTreeSet::new(), false, &Default::default()),
            Verdict::Keep
        );
    }

    #[test]
    fn each_direction_reads_its_own_sites() {
        let pids: BTreeSet<u32> = [1].into();
        // Sends through sendto, reads through read(): the write probe can go, the read one
        // cannot.
        let conn = ConnState {
            peer: peer(6379),
            write_sites: SOCKET,
            read_sites: WRITE,
            ..ConnState::default()
        };
        let entries = || [(ConnKey { tgid: 1, fd: 10 }, conn)];
        let write = Connections::gather(&pids, Direction::Write, entries(), []);
        let read = Connections::gather(&pids, Direction::Read, entries(), []);
        assert_eq!(
            write.verdict_for_all(&pids, false, &Default::default()),
            Verdict::Narrow
        );
        assert_eq!(
            read.verdict_for_all(&pids, false, &Default::default()),
            Verdict::Settled
        );
        assert_eq!(
            read.verdict_for_all(&pids, true, &Default::default()),
            Verdict::Widen
        );
    }

    #[test]
    fn schedule_backs_off_and_resets() {
        let t0 = std::time::Instant::now();
        let mut s = Schedule::now();
        assert!(s.due(t0 + std::time::Duration::from_millis(1)));
        s.later(t0);
        assert!(!s.due(t0));
        assert!(s.due(t0 + FIRST_BACKOFF));
        s.later(t0);
        assert!(!s.due(t0 + FIRST_BACKOFF));
        assert!(s.due(t0 + 2 * FIRST_BACKOFF));
        for _ in 0..20 {
            s.later(t0);
        }
        assert!(s.due(t0 + MAX_BACKOFF));
        s.reset(t0);
        assert!(s.due(t0));
    }

    #[test]
    fn the_same_server_reached_another_way_or_known_before_widens() {
        let conns = [conn(10, 6379, SOCKET)];
        // ::1 and ::ffff:127.0.0.1 are the loopback server of 127.0.0.1:6379.
        let v6 = |addr: [u8; 16]| Peer {
            family: 10,
            port: 6379,
            addr,
        };
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[127, 0, 0, 1]);
        let mut one = [0u8; 16];
        one[15] = 1;
        for other in [v6(one), v6(mapped)] {
            let sockets = [(10, peer(6379)), (15, other)];
            assert_eq!(verdict(true, &conns, &sockets, &none()), Verdict::Widen);
        }
        // Every followed connection closed: a new socket to a server talked to before still
        // brings the probe back.
        let known: BTreeSet<Server> = Server::of(&peer(6379)).into_iter().collect();
        assert_eq!(
            verdict(true, &[], &[(16, peer(6379))], &known),
            Verdict::Widen
        );
        assert_eq!(
            verdict(true, &[], &[(16, peer(6379))], &none()),
            Verdict::Settled
        );
    }

    #[test]
    fn unix_socket_connections_keep_their_probes() {
        let unix = FollowedConn {
            fd: 10,
            peer: Peer {
                family: 1,
                port: 0,
                addr: [0; 16],
            },
            sites: SOCKET,
        };
        assert_eq!(verdict(false, &[unix], &[], &none()), Verdict::Keep);
        assert!(Server::of(&unix.peer).is_none());
    }

    #[test]
    fn sockets_to_other_servers_do_not_matter() {
        let conns = [conn(10, 6379, SOCKET)];
        let sockets = [(10, peer(6379)), (15, peer(5432)), (16, peer(443))];
        assert_eq!(verdict(true, &conns, &sockets, &none()), Verdict::Settled);
        assert_eq!(verdict(false, &conns, &sockets, &none()), Verdict::Narrow);
    }
}
