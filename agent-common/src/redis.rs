//! Redis-side blocking probes: uprobes on redis-server's blocking bookkeeping functions.
//!
//! The kernel keeps one entry per blocked client (keyed by process and client pointer) from
//! `blockForKeys` to `unblockClient`, and aggregates fan-out, blocking time by outcome, and the
//! time spent registering/unregistering in one value per Redis process ([`RedisProcState`]).
//! Nothing goes to user space per call.
//!
//! Every probed function runs on Redis's main thread only (blocking bookkeeping is not done
//! by I/O threads, and modules may only block clients from the main thread), so the
//! per-process value is written by one thread at a time and needs neither per-CPU copies nor
//! atomics. That is what makes each probe cost one hash lookup for the process, not one per
//! counter: map operations cost 100-300 ns each on the VM this was measured on.

use crate::sched::Log2Histogram;

/// Clients in `BLOCKED_CLIENTS`, the map every block looks in first. Its buckets (16 bytes
/// each) then fit the 32 KiB that the kernel allocates from its direct map, which is mapped
/// with huge pages; a larger map's buckets are in vmalloc space, 4 KiB pages. Measured (the
/// bench's blocking section, 7.0 and 7.4.1): at 65536 entries the unblock probe, the first to
/// run after Redis's own work, took about 300 ns more per served pop, whether its entries
/// were preallocated or not; the size of the bucket array alone made the difference, most
/// likely a TLB miss (the VM it was measured on has no hardware counters to show it).
pub const HOT_BLOCKED_CLIENTS: u32 = 2048;
/// Clients in `BLOCKED_SPILL`, where a client goes when `BLOCKED_CLIENTS` is full. With
/// [`HOT_BLOCKED_CLIENTS`], the most clients blocked at once across all tracked Redis
/// processes (and clients kept after their block ended, which the agent lets go first when
/// this one fills up).
pub const MAX_BLOCKED_CLIENTS: u32 = 65536;
/// Most Redis processes with blocking probes.
pub const MAX_REDIS_PROCESSES: u32 = 1024;
/// Slots for raw `btype` values: 1..6 in every known version; anything else is folded into
/// slot 0, which no known block type uses and user space ignores.
pub const BTYPE_SLOTS: usize = 8;
/// served, timeout, other.
pub const OUTCOMES: usize = 3;

/// Upper bounds (inclusive) of the fan-out buckets: keys listed by one blocking call. Chosen
/// for the data: single-queue workers, tens of queues, and fleets listing hundreds to thousands.
/// A last, implicit bucket counts everything above the last bound.
pub const KEY_BOUNDS: [u32; 13] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000];
pub const KEY_BUCKETS: usize = KEY_BOUNDS.len() + 1;

/// How a blocking call ended.
pub mod outcome {
    /// A write to a key woke it (`unblockClient` inside the serving window).
    pub const SERVED: u32 = 0;
    /// Its timeout passed (`replyToBlockedClientTimedOut` at or after the deadline).
    pub const TIMEOUT: u32 = 1;
    /// Anything else: the client disconnected, CLIENT UNBLOCK, a role change.
    pub const OTHER: u32 = 2;
    /// Used in fan-out histogram keys, which have no outcome.
    pub const NONE: u32 = 3;
}

/// Phases of blocking bookkeeping on the main thread.
pub mod phase {
    /// Inside `blockForKeys`: registering the client on each key.
    pub const REGISTER: u32 = 0;
    /// Inside `unblockClient` for a key-blocked client: unregistering it from each key.
    pub const UNREGISTER: u32 = 1;
}

/// Probe points, for the per-process hit counters that tell a live probe from one that is
/// attached but never reached (e.g. a function the compiler inlined into its callers).
pub mod point {
    pub const BLOCK_FOR_KEYS: u32 = 0;
    pub const UNBLOCK_CLIENT: u32 = 1;
    pub const REPLY_TIMED_OUT: u32 = 2;
    /// The serving window: `serveClientsBlockedOn{List,SortedSet,Stream}Key`, or
    /// `handleClientsBlockedOnKeys` on builds that do not export those.
    pub const SERVING_WINDOW: u32 = 3;
    /// Not a probe: `blockForKeys` found the client still blocked from an earlier call, so an
    /// unblock was missed (the LTO case of REDIS-INTERNALS.md).
    pub const MISSED_UNBLOCK: u32 = 4;
    /// Not a probe: a client woken by a key (7.2+) found nothing and blocked again; its
    /// provisional `served` was taken back and the call goes on (see `RedisProcess`).
    pub const REBLOCKED: u32 = 5;
    pub const COUNT: usize = 6;
}

/// How a Redis build tells that a write to a key woke a blocked client.
pub mod served_by {
    /// 6.x and 7.0: `unblockClient` runs inside a serve function (the serving window).
    pub const SERVING_WINDOW: u32 = 0;
    /// 7.2+: `unblockClientOnKey` calls `unblockClient(c, 0)`, and it is the only caller that
    /// passes 0 for `queue_for_reprocessing` (every other path passes 1; the LTO clone has the
    /// 1 folded in). No probe on the event loop is needed.
    pub const REPROCESS_ARGUMENT: u32 = 1;
    /// 6.x and 7.0 where the serve functions' calls to `unblockClient` were found in the
    /// machine code: `unblockClient` returns to one of them exactly when a key woke the
    /// client, so its return address tells, and the serving window needs no probes.
    pub const RETURN_ADDRESS: u32 = 2;
}

/// Most call sites in the serve functions of one binary (7.0 has one per serve function).
pub const MAX_SERVING_RETURNS: usize = 8;

/// A woken client that blocks again does so while its command is re-run, within microseconds
/// of the wake; a later block of the same client is a new call.
pub const REBLOCK_WINDOW_NS: u64 = 100_000_000;

/// Flags of a blocked client.
pub mod flags {
    /// `replyToBlockedClientTimedOut` ran at or after the deadline.
    pub const TIMED_OUT: u32 = 1;
    /// `replyToBlockedClientTimedOut` ran before the deadline (CLIENT UNBLOCK TIMEOUT).
    pub const UNBLOCKED_EARLY: u32 = 2;
}

/// Value of `REDIS_PROCS`: per-process settings that depend on the Redis version.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedisProcess {
    /// Index of `blockForKeys`'s `timeout` argument: 4 in 6.x and 7.2+, 5 in 7.0.
    pub timeout_arg: u32,
    /// A [`served_by`] value.
    pub served_by: u32,
    /// Where the "re-processing a command" flag of a client is: the byte at this offset in
    /// `struct client`, tested with [`Self::reprocessing_mask`]. Read from the machine code
    /// of `blockForKeys`, which tests it first thing (7.2+: `CLIENT_REPROCESSING_COMMAND`,
    /// bit 50 of `flags`; Valkey 8: `flag.reprocessing_command`).
    pub reprocessing_offset: u32,
    /// 0 for builds whose woken clients never block again (6.x, 7.0 serve a client only with
    /// data) or where the flag was not found.
    pub reprocessing_mask: u32,
    /// With [`served_by::RETURN_ADDRESS`]: where in this process `unblockClient` returns to
    /// when a serve function called it (0 for unused slots).
    pub serving_returns: [u64; MAX_SERVING_RETURNS],
    /// Offset of `client->bstate` (its `btype` field), or of the pointer to it where it is
    /// allocated apart (Valkey 8.1+), for blocks the compiler inlined `blockForKeys` into
    /// (see `redis_block_client`); 0 when unknown.
    pub bstate_offset: u32,
    /// Bit `1 << btype` for each raw `btype` that blocks on keys (list, zset, stream).
    pub key_btypes: u32,
    /// Whether `bstate_offset` is that of a pointer to the blocking state.
    pub bstate_is_pointer: u32,
    /// Offset of `keys` (a `dict *`) in the blocking state: 24 in Redis 7.2 to 8.x, 32 in
    /// Valkey 8+ (a union of list nodes comes before it).
    pub bstate_keys: u32,
    /// 1 when `redis_block_client` is probed at the calls to `blockClient` other than
    /// `blockForKeys`'s own (see the agent's `redis::block_calls`), 0 when at its entry, where
    /// it also sees the blocks `blockForKeys` already counted.
    pub block_client_at_calls: u32,
    pub _pad: u32,
}

/// `blockingState`: `btype` at 0, `timeout` (Unix ms) at 8.
pub const BSTATE_TIMEOUT: u64 = 8;
/// `struct dict` (7.0 to 7.4): `ht_used[0]` at 24 and `ht_used[1]` at 32; their sum is the
/// number of distinct keys a client is blocked on.
pub const DICT_USED: u64 = 24;

/// Value of `LAST_WOKEN`, per Redis thread: the client a key woke last (7.2+), kept until the
/// next block so that a client that finds nothing and blocks again is seen as the same call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WokenClient {
    pub client: u64,
    pub woken_ns: u64,
    /// The blocked call as it was: restored if the client blocks again.
    pub blocked: BlockedClient,
}

/// Key of `BLOCKED_CLIENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockedKey {
    pub tgid: u32,
    pub _pad: u32,
    /// The `client *`: stable while the client is blocked.
    pub client: u64,
}

/// Value of `BLOCKED_CLIENTS`. An entry outlives the block it records: when the block ends it
/// is marked ended ([`BlockedClient::ended_ns`]) and the client's next block rewrites it in
/// place, so the steady state of a worker's connection costs no map insert or delete (the
/// delete was a third of `unblockClient`'s probe). The agent removes entries ended a while
/// ago (clients that went away).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockedClient {
    pub start_ns: u64,
    /// When the block ended (monotonic ns, as `start_ns`); 0 while the client is blocked.
    pub ended_ns: u64,
    /// Absolute deadline in Unix milliseconds, 0 for none (as Redis keeps it).
    pub deadline_ms: i64,
    pub numkeys: u32,
    pub btype: u32,
    pub flags: u32,
    pub _pad: u32,
}

impl BlockedClient {
    /// Whether the client is blocked now (its entry not yet marked ended).
    #[inline(always)]
    pub fn is_blocked(&self) -> bool {
        self.ended_ns == 0
    }
}

/// Fan-out histogram: keys per blocking call that blocked.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyHistogram {
    pub count: u64,
    pub sum: u64,
    pub buckets: [u64; KEY_BUCKETS],
}

impl KeyHistogram {
    pub const ZERO: Self = Self {
        count: 0,
        sum: 0,
        buckets: [0; KEY_BUCKETS],
    };

    #[inline(always)]
    pub fn bucket_index(keys: u32) -> usize {
        let mut i = 0;
        while i < KEY_BOUNDS.len() {
            if keys <= KEY_BOUNDS[i] {
                return i;
            }
            i += 1;
        }
        KEY_BOUNDS.len()
    }

    #[inline(always)]
    pub fn record(&mut self, keys: u32) {
        self.count += 1;
        self.sum += keys as u64;
        let i = Self::bucket_index(keys);
        if i < KEY_BUCKETS {
            self.buckets[i] += 1;
        }
    }

    pub fn merge(&mut self, other: &Self) {
        self.count += other.count;
        self.sum += other.sum;
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += *b;
        }
    }
}

/// Time and calls of one bookkeeping phase.
///
/// The time is the main thread's CPU time, not the wall time between the probes: a phase in
/// which the thread was switched out (preempted by another task on a busy node) would add
/// the milliseconds it waited, which dwarf the microseconds of the phase. Such a phase adds
/// the mean time of the phases before it with as many keys instead ([`phase_cost`]), and is
/// counted in `switched_out`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseTime {
    pub total_ns: u64,
    pub calls: u64,
    /// Phases in which the thread was switched out (their time is the mean).
    pub switched_out: u64,
    /// Of those, the phases that add no time: none of their kind was timed before them
    /// ([`phase_cost`]). `total_ns` is the time of the other `calls - untimed` phases.
    pub untimed: u64,
}

impl PhaseTime {
    /// Total time and count of the phases that were timed.
    #[inline(always)]
    pub fn timed(&self) -> (u64, u64) {
        (self.total_ns, self.calls.saturating_sub(self.untimed))
    }
}

/// Bookkeeping time of the calls in one fan-out bucket: what the cost per key is fitted on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeysCost {
    /// Timed registrations (`blockForKeys`) with a key count in the bucket (an untimed one,
    /// see [`phase_cost`], stays out of the bucket).
    pub calls: u64,
    /// Keys summed over them.
    pub keys: u64,
    /// Registering and unregistering time of calls in the bucket, a phase that was switched
    /// out at the mean of the phases before it ([`phase_cost`]; an untimed one adds nothing).
    pub total_ns: u64,
    /// Phases (registering and unregistering) timed in `total_ns`.
    pub phases: u64,
}

impl KeysCost {
    pub const ZERO: Self = Self {
        calls: 0,
        keys: 0,
        total_ns: 0,
        phases: 0,
    };
}

/// What a bookkeeping phase adds to the totals: `elapsed` where the thread stayed on its CPU.
/// Where it was switched out, the mean of the timed phases before it with as many keys
/// (`same_keys`: their total time and count), or of all timed phases of its kind (`all`)
/// where there were none; never more than `elapsed`, which the phase's CPU time cannot
/// exceed. `None` (not timed) for a phase switched out before any phase of its kind was
/// timed: its wall time is mostly another task's (milliseconds where the phase takes
/// microseconds), and taken as it was it would also have become the mean that every later
/// switched-out phase costs. Redis's first blocking calls meet exactly that on a busy node (the
/// workers that make them are starting), and one such phase put 10 us on each of a fleet's
/// first thousands of calls.
/// Phases with many keys take longer, so they are the likelier to be switched out: the mean
/// is taken by fan-out, not over every call.
#[inline(always)]
pub fn phase_cost(
    elapsed: u64,
    switched_out: bool,
    same_keys: (u64, u64),
    all: (u64, u64),
) -> Option<u64> {
    if !switched_out {
        return Some(elapsed);
    }
    let mean = same_keys
        .0
        .checked_div(same_keys.1)
        .or_else(|| all.0.checked_div(all.1))?;
    Some(mean.min(elapsed))
}

/// Value of the duration histograms.
pub type DurationHistogram = Log2Histogram;

/// Value of `REDIS_PROCS`: everything the probes keep for one Redis process. Created by the
/// agent (settings, all else zero) when it starts tracking the process; updated in place by
/// the probes, which run on Redis's main thread only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedisProcState {
    pub settings: RedisProcess,
    /// Inside the serving window (6.x, 7.0).
    pub serving: u32,
    pub _pad: u32,
    /// Entry time of the bookkeeping phase in progress, per [`phase`]; 0 when none.
    pub phase_start: [u64; 2],
    /// Keys of the call whose phase is in progress, per [`phase`].
    pub phase_keys: [u32; 2],
    /// The main thread's arrivals on a CPU at the entry of the phase in progress, per
    /// [`phase`]: a phase that ends with another count was switched out.
    pub phase_arrivals: [u64; 2],
    pub bookkeeping: [PhaseTime; 2],
    /// Bookkeeping time by fan-out bucket ([`KeyHistogram::bucket_index`]).
    pub bookkeeping_by_keys: [KeysCost; KEY_BUCKETS],
    /// Per [`point`].
    pub hits: [u64; point::COUNT],
    /// The client a key woke last (7.2+), see [`WokenClient`].
    pub woken: WokenClient,
    /// The client `blockForKeys` registered last, until its `blockClient` (7.2+).
    pub registering: u64,
    /// Fan-out per raw `btype` slot.
    pub keys: [KeyHistogram; BTYPE_SLOTS],
    /// Blocking time per raw `btype` slot and [`outcome`].
    pub durations: [[DurationHistogram; OUTCOMES]; BTYPE_SLOTS],
}

impl RedisProcState {
    pub fn new(settings: RedisProcess) -> Self {
        Self {
            settings,
            serving: 0,
            _pad: 0,
            phase_start: [0; 2],
            phase_keys: [0; 2],
            phase_arrivals: [0; 2],
            bookkeeping: [PhaseTime {
                total_ns: 0,
                calls: 0,
                switched_out: 0,
                untimed: 0,
            }; 2],
            bookkeeping_by_keys: [KeysCost::ZERO; KEY_BUCKETS],
            hits: [0; point::COUNT],
            woken: WokenClient {
                client: 0,
                woken_ns: 0,
                blocked: BlockedClient {
                    start_ns: 0,
                    ended_ns: 0,
                    deadline_ms: 0,
                    numkeys: 0,
                    btype: 0,
                    flags: 0,
                    _pad: 0,
                },
            },
            registering: 0,
            keys: [KeyHistogram::ZERO; BTYPE_SLOTS],
            durations: [[Log2Histogram::ZERO; OUTCOMES]; BTYPE_SLOTS],
        }
    }

    /// The slot of a raw `btype`.
    #[inline(always)]
    pub fn btype_slot(btype: u32) -> usize {
        if (btype as usize) < BTYPE_SLOTS {
            btype as usize
        } else {
            0
        }
    }
}

const _: () = assert!(core::mem::size_of::<RedisProcess>() == 16 + 8 * MAX_SERVING_RETURNS + 24);
const _: () = assert!(core::mem::size_of::<WokenClient>() == 56);
const _: () = assert!(core::mem::size_of::<BlockedKey>() == 16);
const _: () = assert!(core::mem::size_of::<BlockedClient>() == 40);
const _: () = assert!(
    core::mem::size_of::<RedisProcState>()
        == core::mem::size_of::<RedisProcess>()
            + 8
            + 16
            + 8
            + 16
            + 64
            + 32 * KEY_BUCKETS
            + 8 * point::COUNT
            + 56
            + 8
            + (16 + 8 * KEY_BUCKETS) * BTYPE_SLOTS
            + core::mem::size_of::<Log2Histogram>() * OUTCOMES * BTYPE_SLOTS
);
const _: () = assert!(core::mem::size_of::<KeyHistogram>() == 16 + 8 * KEY_BUCKETS);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for RedisProcess {}
    unsafe impl aya::Pod for WokenClient {}
    unsafe impl aya::Pod for BlockedKey {}
    unsafe impl aya::Pod for BlockedClient {}
    unsafe impl aya::Pod for RedisProcState {}
    unsafe impl aya::Pod for KeyHistogram {}
    unsafe impl aya::Pod for PhaseTime {}
    unsafe impl aya::Pod for KeysCost {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_buckets_are_inclusive_upper_bounds() {
        assert_eq!(KeyHistogram::bucket_index(1), 0);
        assert_eq!(KeyHistogram::bucket_index(2), 1);
        assert_eq!(KeyHistogram::bucket_index(3), 2);
        assert_eq!(KeyHistogram::bucket_index(5), 2);
        assert_eq!(KeyHistogram::bucket_index(440), 8);
        assert_eq!(KeyHistogram::bucket_index(10000), 12);
        assert_eq!(KeyHistogram::bucket_index(10001), 13);
        let mut h = KeyHistogram::ZERO;
        for k in [1, 5, 440, 440] {
            h.record(k);
        }
        assert_eq!((h.count, h.sum), (4, 886));
        assert_eq!(h.buckets[8], 2);
    }

    #[test]
    fn a_phase_switched_out_costs_the_mean_of_the_phases_before_it_with_as_many_keys() {
        let (forty_keys, all) = ((40_000, 4), (50_000, 10));
        // On its CPU, a phase adds what it took.
        assert_eq!(phase_cost(12_000, false, forty_keys, all), Some(12_000));
        assert_eq!(phase_cost(12_000, false, (0, 0), (0, 0)), Some(12_000));
        // Switched out (its wall time mostly another task's): the mean of the phases with as
        // many keys, else of all phases; never more than its wall time.
        assert_eq!(phase_cost(3_000_000, true, forty_keys, all), Some(10_000));
        assert_eq!(phase_cost(3_000_000, true, (0, 0), all), Some(5_000));
        assert_eq!(phase_cost(7_000, true, forty_keys, all), Some(7_000));
        // With no timed phase to go on, not timed: its wall time would have become the mean
        // every later switched-out phase costs.
        assert_eq!(phase_cost(3_000_000, true, (0, 0), (0, 0)), None);
    }
}
