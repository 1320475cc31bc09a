//! The TCP sockets of a process, from its descriptors and its network namespace's
//! `/proc/<pid>/net/tcp{,6}`: the peers of connections it opened before the agent started
//! (workers), and the addresses it listens on (Redis servers).

use procfs::net::{TcpNetEntry, TcpState};
use procfs::process::FDTarget;

use super::{ProcRoot, ReadError};

/// The remote end of a TCP socket, from `/proc/<pid>/net/tcp{,6}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketPeer {
    pub ip: std::net::IpAddr,
    pub port: u16,
}

impl From<std::net::SocketAddr> for SocketPeer {
    fn from(address: std::net::SocketAddr) -> Self {
        Self {
            ip: address.ip(),
            port: address.port(),
        }
    }
}

/// Socket inode -> entry, from the text of `/proc/<pid>/net/tcp` or `tcp6`. procfs parses the
/// table, but one line at a time: given the whole table (as `Process::tcp` does), it refuses
/// all of it for a single line it cannot read (truncated, not hex, not UTF-8, a TCP state
/// newer than the crate), where only that line should be skipped. Its parser only splits and
/// parses numbers (procfs-core 0.18: no slicing at offsets the text decides, unwraps only of
/// fixed-length slices), so no shape check precedes it; the `proc` fuzz target feeds it
/// arbitrary lines.
pub fn parse_proc_net_tcp(text: &[u8]) -> std::collections::HashMap<u64, TcpNetEntry> {
    use procfs::FromBufReadSI as _;
    let system = procfs::current_system_info();
    text.split(|&b| b == b'\n')
        // The header.
        .skip(1)
        .filter_map(|line| {
            // procfs skips the first line it is given, the header: an empty one here.
            let one = std::io::Read::chain(&b"\n"[..], line);
            let entries = procfs::net::TcpNetEntries::from_buf_read(one, system).ok()?;
            entries.0.into_iter().next()
        })
        .map(|entry| (entry.inode, entry))
        .collect()
}

/// Which address a server serves on, from its listening sockets: `preferred_port` (what its
/// title or arguments say) when it listens there, else its lowest listening port (a Redis
/// cluster bus listens on port + 10000). The address is given only when every listener on that
/// port is bound to a specific address, not to 0.0.0.0 or `::`; with several, the lowest
/// (IPv4 first).
pub fn service_address(
    listeners: &[std::net::SocketAddr],
    preferred_port: Option<u16>,
) -> Option<(u16, Option<std::net::IpAddr>)> {
    let port = preferred_port
        .filter(|p| listeners.iter().any(|l| l.port() == *p))
        .or_else(|| listeners.iter().map(|l| l.port()).min())?;
    let on_port: Vec<std::net::IpAddr> = listeners
        .iter()
        .filter(|l| l.port() == port)
        .map(|l| l.ip().to_canonical())
        .collect();
    let address = if on_port.iter().any(|ip| ip.is_unspecified()) {
        None
    } else {
        on_port.into_iter().min()
    };
    Some((port, address))
}

impl ProcRoot {
    /// (fd, socket inode) of each socket a process has open. procfs reads the fd links and
    /// skips those it cannot read (closed meanwhile) or parse; its link parser takes no
    /// slices of the text, so there is nothing to check before it.
    fn socket_inodes(&self, pid: u32) -> Vec<(u32, u64)> {
        let Ok(fds) = self
            .open(pid)
            .and_then(|process| process.fd().map_err(|e| ReadError::from_proc(pid, "fd", e)))
        else {
            return Vec::new();
        };
        fds.filter_map(|fd| {
            let fd = fd.ok()?;
            match fd.target {
                FDTarget::Socket(inode) => Some((u32::try_from(fd.fd).ok()?, inode)),
                _ => None,
            }
        })
        .collect()
    }

    /// The TCP sockets of the network namespace `pid` is in, by inode. The tables are read
    /// here rather than with `Process::tcp`, to be parsed line by line (see
    /// [`parse_proc_net_tcp`]).
    fn tcp_sockets(&self, pid: u32) -> std::collections::HashMap<u64, TcpNetEntry> {
        let base = self.root.join(pid.to_string());
        let mut by_inode = std::collections::HashMap::new();
        for table in ["net/tcp", "net/tcp6"] {
            if let Ok(text) = std::fs::read(base.join(table)) {
                by_inode.extend(parse_proc_net_tcp(&text));
            }
        }
        by_inode
    }

    /// The TCP peers of a process's open sockets, by fd: for connections it opened before
    /// the agent started (later ones are seen at connect()).
    pub fn socket_peers(&self, pid: u32) -> Vec<(u32, SocketPeer)> {
        let fds = self.socket_inodes(pid);
        if fds.is_empty() {
            return Vec::new();
        }
        let by_inode = self.tcp_sockets(pid);
        fds.into_iter()
            .filter_map(|(fd, inode)| Some((fd, by_inode.get(&inode)?.remote_address.into())))
            .collect()
    }

    /// The TCP addresses a process listens on: sockets in LISTEN state among its own fds (a
    /// forked child that closed its copies, such as a Redis BGSAVE child, has none). Sorted,
    /// without duplicates.
    pub fn listening_sockets(&self, pid: u32) -> Vec<std::net::SocketAddr> {
        let fds = self.socket_inodes(pid);
        if fds.is_empty() {
            return Vec::new();
        }
        let by_inode = self.tcp_sockets(pid);
        let mut listeners: Vec<std::net::SocketAddr> = fds
            .iter()
            .filter_map(|(_, inode)| by_inode.get(inode))
            .filter(|s| s.state == TcpState::Listen)
            .map(|s| s.local_address)
            .collect();
        listeners.sort_unstable();
        listeners.dedup();
        listeners
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> ProcRoot {
        ProcRoot::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/proc"))
    }

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    fn peer(ip: &str, port: u16) -> SocketPeer {
        SocketPeer {
            ip: ip.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn proc_net_tcp_lines_give_remote_peers_by_inode() {
        let text = format!(
            "{HEADER}   0: 0100007F:D431 0100007F:18EB 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n\
             \x20  1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0\n"
        );
        let sockets = parse_proc_net_tcp(text.as_bytes());
        assert_eq!(
            SocketPeer::from(sockets[&4242].remote_address),
            peer("127.0.0.1", 6379)
        );
        assert_eq!(sockets[&4242].local_address.port(), 54321);
        assert_eq!(sockets[&4242].state, TcpState::Established);
        assert_eq!(sockets[&77].remote_address.port(), 0);
        assert_eq!(sockets[&77].local_address.port(), 8080);
        assert_eq!(sockets[&77].state, TcpState::Listen);
        let v6 = format!(
            "{HEADER}   0: 00000000000000000000000001000000:18EB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1004 1 0000000000000000 100 0 0 10 0\n"
        );
        assert_eq!(
            SocketPeer::from(parse_proc_net_tcp(v6.as_bytes())[&1004].local_address),
            peer("::1", 6379)
        );
    }

    /// Each malformed line is skipped on its own, without a panic; the good lines around
    /// them are kept. A line with more columns than today's kernels write is read.
    #[test]
    fn malformed_proc_net_tcp_lines_are_skipped_not_fatal() {
        let good = "   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1001 1 0000000000000000 100 0 0 10 0";
        let bad = [
            // Truncated, at several points.
            "   1: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101",
            "   1: 0100007F:18EB 00000000:0000",
            "   1: 0100007F:18",
            "   1:",
            // Not hex, wrong widths, no port.
            "   1: zz00007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1002 1",
            "   1: 0100007F:18EB 00000000:0000 0Z 00000000:00000000 00:00000000 00000000   101        0 1002 1",
            "   1: 100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1002 1",
            "   1: 0100007F 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1002 1",
            "   1: 0100007F:FFFFF 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1002 1",
            "   1: é100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1002 1",
            "   1: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 -1 1",
            // A state procfs does not know.
            "   1: 0100007F:18EB 00000000:0000 0D 00000000:00000000 00:00000000 00000000   101        0 1002 1",
            "",
        ];
        for line in bad {
            let text = format!("{HEADER}{good}\n{line}\n");
            let sockets = parse_proc_net_tcp(text.as_bytes());
            assert_eq!(sockets.keys().collect::<Vec<_>>(), [&1001], "{line:?}");
        }
        let not_utf8 = [
            HEADER.as_bytes(),
            b"   1: \xff\xfe\n",
            good.as_bytes(),
            b"\n",
        ]
        .concat();
        assert_eq!(parse_proc_net_tcp(&not_utf8).len(), 1);
        let extra = format!("{HEADER}{good} extra columns 1 2 3\n");
        assert_eq!(
            parse_proc_net_tcp(extra.as_bytes())[&1001].state,
            TcpState::Listen
        );
        // Only a header, or nothing at all.
        assert!(parse_proc_net_tcp(HEADER.as_bytes()).is_empty());
        assert!(parse_proc_net_tcp(b"").is_empty());
        assert!(
            parse_proc_net_tcp(good.as_bytes()).is_empty(),
            "its first line is a header"
        );
    }

    /// A process tree in a temporary directory, with process 100's fds and net/tcp.
    fn process_with_fds(links: &[(&str, &str)], tcp: &str) -> (tempfile::TempDir, ProcRoot) {
        let dir = tempfile::tempdir().unwrap();
        let process = dir.path().join("100");
        std::fs::create_dir_all(process.join("fd")).unwrap();
        std::fs::create_dir_all(process.join("net")).unwrap();
        for (fd, target) in links {
            std::os::unix::fs::symlink(target, process.join("fd").join(fd)).unwrap();
        }
        std::fs::write(process.join("net/tcp"), format!("{HEADER}{tcp}")).unwrap();
        let proc = ProcRoot::new(dir.path());
        (dir, proc)
    }

    #[test]
    fn socket_fds_come_from_the_fd_links_and_odd_links_are_skipped() {
        let tcp = "   0: 0100007F:18EB 0100007F:D431 01 00000000:00000000 00:00000000 00000000   101        0 1003 1 0000000000000000 100 0 0 10 0\n\
                   \x20  1: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1001 1 0000000000000000 100 0 0 10 0\n";
        let (_dir, proc) = process_with_fds(
            &[
                ("6", "socket:[1001]"),
                ("8", "socket:[1003]"),
                // A socket in no TCP table (a UNIX socket, or UDP).
                ("9", "socket:[5000]"),
                ("3", "socket:[not-a-number]"),
                ("4", "socket:[]"),
                ("5", "socket:"),
                ("7", "socket:[18446744073709551616]"),
                ("10", "pipe:[1001]"),
                ("11", "/dev/null"),
                ("12", "anon_inode:[eventpoll]"),
                ("-1", "socket:[1003]"),
                ("not-an-fd", "socket:[1003]"),
            ],
            tcp,
        );
        let mut inodes = proc.socket_inodes(100);
        inodes.sort_unstable();
        assert_eq!(inodes, [(6, 1001), (8, 1003), (9, 5000)]);
        let mut peers = proc.socket_peers(100);
        peers.sort_unstable_by_key(|(fd, _)| *fd);
        // A listener's "peer" is 0.0.0.0:0, as the table says.
        assert_eq!(
            peers,
            [(6, peer("0.0.0.0", 0)), (8, peer("127.0.0.1", 54321))]
        );
        assert_eq!(
            proc.listening_sockets(100),
            ["127.0.0.1:6379".parse::<std::net::SocketAddr>().unwrap()]
        );
        // Gone: no fds, no peers.
        assert!(proc.socket_inodes(101).is_empty());
        assert!(proc.socket_peers(101).is_empty());
    }

    #[test]
    fn a_malformed_tcp_table_loses_only_its_bad_lines() {
        let tcp = "   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1001 1 0000000000000000 100 0 0 10 0\n\
                   \x20  1: 0100007F:18EB 0100007F:D431 01 00000000:000\n\
                   \x20  2: 0100007F:3FFB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1002 1 0000000000000000 100 0 0 10 0\n\
                   garbage\n";
        let (_dir, proc) = process_with_fds(&[("6", "socket:[1001]"), ("7", "socket:[1002]")], tcp);
        assert_eq!(
            proc.listening_sockets(100),
            [
                "127.0.0.1:6379".parse::<std::net::SocketAddr>().unwrap(),
                "127.0.0.1:16379".parse().unwrap()
            ]
        );
    }

    #[test]
    fn listening_sockets_are_the_processes_own_listeners() {
        let listeners = fixtures().listening_sockets(100);
        let expected: Vec<std::net::SocketAddr> = vec![
            "127.0.0.1:6379".parse().unwrap(),
            "127.0.0.1:16379".parse().unwrap(),
            "[::1]:6379".parse().unwrap(),
        ];
        let mut expected = expected;
        expected.sort();
        // Not sshd's 0.0.0.0:22 (another process's socket in the same namespace), not the
        // accepted connection.
        assert_eq!(listeners, expected);
        // The title's port, bound to loopback on both families: the IPv4 address.
        assert_eq!(
            service_address(&listeners, Some(6379)),
            Some((6379, Some("127.0.0.1".parse().unwrap())))
        );
        // No hint: the lowest port, not the cluster bus.
        assert_eq!(service_address(&listeners, None).unwrap().0, 6379);
        // A hint it does not listen on is ignored.
        assert_eq!(service_address(&listeners, Some(7000)).unwrap().0, 6379);
        // None yet (not bound, or gone), and processes without net or fd entries.
        assert!(fixtures().listening_sockets(400).is_empty());
        assert!(fixtures().listening_sockets(999).is_empty());
        assert_eq!(service_address(&[], Some(6379)), None);
    }

    #[test]
    fn service_address_only_when_bound_to_a_specific_address() {
        let addrs = |list: &[&str]| -> Vec<std::net::SocketAddr> {
            list.iter().map(|a| a.parse().unwrap()).collect()
        };
        // Redis's default `bind * -::*`.
        assert_eq!(
            service_address(&addrs(&["0.0.0.0:6379", "[::]:6379"]), Some(6379)),
            Some((6379, None))
        );
        assert_eq!(
            service_address(&addrs(&["10.0.0.5:6380", "[::]:6380"]), None),
            Some((6380, None))
        );
        // tls-port below port: the title's port wins.
        assert_eq!(
            service_address(&addrs(&["10.0.0.5:6379", "10.0.0.5:6380"]), Some(6380)),
            Some((6380, Some("10.0.0.5".parse().unwrap())))
        );
        assert_eq!(
            service_address(&addrs(&["[::ffff:10.0.0.5]:6379"]), None),
            Some((6379, Some("10.0.0.5".parse().unwrap())))
        );
    }
}
