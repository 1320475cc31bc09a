//! What the agent saw over a window, as `fanout advise` reads it from the agent
//! (`/api/v1/advise`, JSON). Everything is a total over the window, never a rate: the
//! planner divides by `window_seconds` itself, so the arithmetic it prints is checkable.
//!
//! Versioned like the snapshot: a reader refuses another `version` rather than misread it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The layout version this agent writes.
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub version: u32,
    /// How long the window is: since the agent started, or the `window` asked for when the
    /// agent has a reading that old (then a little more: the reading just before it).
    pub window_seconds: f64,
    /// Whether the window is the whole time since the agent started.
    pub since_start: bool,
    /// Whether queue names are real (a loopback client) or folded like the exporters fold
    /// them (`key_0`, `key_1`, ...: a client from another host).
    pub names_real: bool,
    pub servers: Vec<ServerObservation>,
}

/// One Redis server as the workers reach it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerObservation {
    /// `address:port` as the workers connect to it (`127.0.0.1:6379`).
    pub server: String,
    /// The Redis process behind it when the agent tracks it on this host; `None` for a
    /// remote Redis (then nothing is known of its cost, only of its listeners).
    pub redis: Option<RedisCost>,
    pub groups: Vec<GroupObservation>,
}

/// What the Redis process spent, from its probes and /proc, over the window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RedisCost {
    pub pid: u32,
    pub port: u16,
    pub version: Option<String>,
    /// CPU time of the main thread (user + system), seconds.
    pub main_thread_cpu_seconds: f64,
    /// Main-thread time inside blocking bookkeeping (registering in `blockForKeys`,
    /// unregistering in `unblockClient`), seconds. `None` when the probes that measure it
    /// are not live on this Redis.
    pub bookkeeping_seconds: Option<f64>,
    /// Blocking calls that blocked (registrations), and the keys they listed in total.
    pub blocking_calls: u64,
    pub keys_listed: u64,
    /// Blocking calls that ended served, as Redis saw them.
    pub served: u64,
    /// The bookkeeping time by fan-out: one entry per bucket of keys per call that saw
    /// calls, for fitting the cost per key on this Redis.
    pub by_keys: Vec<KeysBucket>,
}

/// Bookkeeping of the calls whose key count fell in one fan-out bucket.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeysBucket {
    /// Calls registered (`blockForKeys`) with a key count in this bucket.
    pub calls: u64,
    /// Keys summed over those calls.
    pub keys: u64,
    /// Their registering and unregistering time, seconds (a call that blocked has both).
    pub seconds: f64,
}

/// One worker group's traffic to one server.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupObservation {
    pub group: String,
    /// Processes of the group with a followed connection to this server.
    pub processes: u32,
    /// Followed connections of the group to this server whose key list is known.
    pub connections: u32,
    /// Blocking pops of the group's workers to this server that ended in the window (every
    /// outcome).
    pub pops: u64,
    /// Blocking pops sent in the window (counted when sent, so a pop still waiting at the
    /// window's end is here and not in `pops`), and the keys they listed in total: keys per
    /// pop is `keys_listed / pops_sent`.
    #[serde(default)]
    pub pops_sent: u64,
    pub keys_listed: u64,
    pub served: u64,
    pub timeouts: u64,
    pub errors: u64,
    /// Keys (queues) the group's connections listen to now, in no particular order.
    pub queues: Vec<String>,
    /// Served pops by the key that served them. Keys the group listens to and that served
    /// nothing are absent. Pops whose key could not be told (a reply too long for the
    /// kernel's window) count under `unattributed_served`.
    pub served_by_queue: BTreeMap<String, u64>,
    pub unattributed_served: u64,
}
