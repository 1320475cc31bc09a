//! What a snapshot reads from /proc (and the eBPF maps' occupancy), read without the state
//! lock.
//!
//! A scrape used to walk every tracked thread's stat file, and look up the listening
//! sockets of each Redis without a port, while holding the state lock: 163 ms of it (release
//! build) while 50 Redis servers started, with everything else waiting. The state now only
//! says what to read ([`ProcWalk`]); the reading happens unlocked, and the state takes the
//! result back, skipping processes that left meanwhile.

use std::net::IpAddr;

use crate::{
    discovery::TrackedProcess,
    proc_reader::{net::service_address, ProcRoot, ReadError, ThreadSample},
    redis::binary::port_from_title,
};

/// What to read: taken under the lock, read without it.
pub struct ProcWalk {
    pub proc: ProcRoot,
    /// Processes whose threads' CPU counters are read.
    pub processes: Vec<TrackedProcess>,
    /// Redis processes with no known listening port yet.
    pub unresolved_redis: Vec<u32>,
    /// The eBPF maps whose occupancy is read (walking a hash map's keys takes about 1 us
    /// per entry: off the lock too).
    pub maps: Option<std::sync::Arc<crate::ebpf::uprobe_multi::MapFds>>,
}

/// A Redis's listening port and, when it is a specific one, address.
pub type ListenAddress = (u16, Option<IpAddr>);

/// A process's threads' CPU counters and how many threads vanished mid-read, or why none
/// could be read.
pub type ThreadReading = Result<(Vec<ThreadSample>, u64), ReadError>;

/// What was read.
pub struct ProcWalked {
    pub threads: Vec<(TrackedProcess, ThreadReading)>,
    /// Ports found for the Redis processes that had none.
    pub addresses: Vec<(u32, ListenAddress)>,
    pub map_usage: Vec<crate::ebpf::map_usage::MapUsage>,
}

impl ProcWalk {
    pub fn read(self) -> ProcWalked {
        let threads = self
            .processes
            .into_iter()
            .map(|p| {
                let samples = self.proc.thread_samples(p.pid());
                (p, samples)
            })
            .collect();
        let addresses = self
            .unresolved_redis
            .iter()
            .filter_map(|&pid| Some((pid, listen_address(&self.proc, pid)?)))
            .collect();
        let map_usage = self
            .maps
            .as_deref()
            .map(crate::ebpf::map_usage::hash_map_usage)
            .unwrap_or_default();
        ProcWalked {
            threads,
            addresses,
            map_usage,
        }
    }
}

/// Where a Redis listens, from its listening sockets: the port its title or arguments name
/// when it listens there, else its lowest listening port. `None` before it has bound one
/// (a Redis picked up at exec).
pub fn listen_address(proc: &ProcRoot, pid: u32) -> Option<ListenAddress> {
    listen_address_given(proc, pid, &proc.cmdline(pid))
}

/// [`listen_address`] with the process's arguments already read.
pub fn listen_address_given(
    proc: &ProcRoot,
    pid: u32,
    cmdline: &[String],
) -> Option<ListenAddress> {
    service_address(&proc.listening_sockets(pid), port_from_title(cmdline))
}
