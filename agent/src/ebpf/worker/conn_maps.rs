//! The kernel's record of the followed connections (`CONNS`, `CONN_PEERS`, `CONNECTS`), as the
//! agent reads it: what the narrowing of the `write()`/`read()` probes looks at, where the
//! peers of connections made before a worker was followed are seeded, and what a gone worker
//! leaves behind.

use std::collections::BTreeSet;

use agent_common::worker::{ConnKey, ConnState, Peer};
use aya::maps::{HashMap, MapData};

use super::narrowing::{Connections, Direction};

pub(super) struct ConnMaps {
    /// Each followed connection's state (`CONNS`).
    pub(super) conns: HashMap<MapData, ConnKey, ConnState>,
    /// The peer of each socket of a followed worker (`CONN_PEERS`).
    pub(super) peers: HashMap<MapData, ConnKey, Peer>,
    /// connect() calls per followed worker (`CONNECTS`).
    pub(super) connects: HashMap<MapData, u32, u64>,
}

impl ConnMaps {
    /// Whether `pid`'s connect() count moved since `seen` was noted, noting it.
    pub(super) fn connected(&self, pid: u32, seen: &mut Option<u64>) -> bool {
        let count = self.connects.get(&pid, 0).ok();
        std::mem::replace(seen, count) != count
    }

    /// The followed connections and sockets of `pids`.
    pub(super) fn gather(&self, pids: &BTreeSet<u32>, direction: Direction) -> Connections {
        Connections::gather(
            pids,
            direction,
            self.conns.iter().filter_map(Result::ok),
            self.peers.iter().filter_map(Result::ok),
        )
    }
}
