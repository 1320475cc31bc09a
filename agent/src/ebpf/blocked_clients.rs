//! The kernel's record of blocked clients (`BLOCKED_CLIENTS`, then the spill map
//! `BLOCKED_SPILL` for clients beyond the first map's room): reading it for the gauges, and
//! removing what no block needs any more.
//!
//! The probes keep a client's entry when its block ends, marked ended, and rewrite it at the
//! client's next block (a worker's connection blocks again within seconds), so a served pop
//! costs no map insert or delete. What the agent removes:
//! - entries blocked past their deadline and [`OVERDUE_GRACE_MS`]: their unblock was missed,
//!   and left in place they would hold the gauges up for ever (counted as missed unblocks);
//! - entries ended more than [`ENDED_KEEP_NS`] ago (the client went away or blocks seldom), or
//!   any ended one when the spill map is crowded;
//! - every entry of a Redis process that is no longer tracked.

use std::os::fd::AsFd as _;

use agent_common::{
    maps,
    redis::{BlockedClient, BlockedKey, MAX_BLOCKED_CLIENTS},
};
use aya::{
    maps::{HashMap, IterableMap as _, MapData},
    Ebpf,
};

use super::{
    bpf_sys::{lookup_and_delete, ENOTSUPP},
    take_map, ProbeError,
};

/// A blocked client still recorded this long after its deadline was unblocked where no probe
/// saw it: Redis unblocks a timed-out client in the event-loop iteration after its deadline,
/// so only a stalled server (a long script, SIGSTOP) comes near this.
pub const OVERDUE_GRACE_MS: i64 = 2_000;

/// How long the entry of a client whose block ended is kept for its next block, which then
/// rewrites it in place instead of inserting it (the kernel's `record_block`). A worker's
/// connection blocks again as soon as its job is done, well within this; a client seen less
/// often costs an insert and a delete per block, as every block did before.
pub const ENDED_KEEP_NS: u64 = 5_000_000_000;

/// With more entries than this (half the spill map), its ended ones go whatever their
/// age: its room is for clients blocked now, and an insert refused for want of it loses a
/// block. The first map needs no such rule: a client that finds it full goes to the spill map.
const CROWDED_SPILL: usize = MAX_BLOCKED_CLIENTS as usize / 2;

/// `BPF_NOEXIST`.
const BPF_NOEXIST: u64 = 1;

/// Why [`BlockedClients::sweep`] removes an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Removal {
    /// Blocked past its deadline and the grace: its unblock was missed.
    Overdue,
    /// Ended more than [`ENDED_KEEP_NS`] ago, or ended at all when the map is crowded.
    LetGo,
}

impl Removal {
    fn of(
        entry: &BlockedClient,
        now_unix_ms: i64,
        now_mono_ns: u64,
        crowded: bool,
    ) -> Option<Self> {
        if entry.is_blocked() {
            (entry.deadline_ms > 0 && now_unix_ms > entry.deadline_ms + OVERDUE_GRACE_MS)
                .then_some(Self::Overdue)
        } else {
            (crowded || now_mono_ns.saturating_sub(entry.ended_ns) > ENDED_KEEP_NS)
                .then_some(Self::LetGo)
        }
    }
}

/// One of the two maps.
struct Tier {
    map: HashMap<MapData, BlockedKey, BlockedClient>,
    /// Above this many entries, ended ones go whatever their age.
    crowded_above: usize,
}

impl Tier {
    /// Deletes `key` if its entry is still `seen`; returns whether it did. An entry the
    /// kernel rewrote since it was read is left as the kernel made it.
    fn delete_if_unchanged(
        &mut self,
        key: &BlockedKey,
        seen: &BlockedClient,
    ) -> std::io::Result<bool> {
        match lookup_and_delete::<BlockedKey, BlockedClient>(self.map.map().fd().as_fd(), key) {
            Ok(None) => Ok(false),
            Ok(Some(deleted)) if deleted == *seen => Ok(true),
            Ok(Some(rewritten)) => {
                // Unless the kernel inserted it again meanwhile (then its entry is newer).
                let _ = self.map.insert(key, rewritten, BPF_NOEXIST);
                Ok(false)
            }
            // Kernels before 5.14 have no look-up-and-delete for hash maps: a re-read and a
            // plain delete, whose window is this syscall's.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)
                ) =>
            {
                match self.map.get(key, 0) {
                    Ok(now) if now == *seen => Ok(self.map.remove(key).is_ok()),
                    _ => Ok(false),
                }
            }
            Err(e) => Err(e),
        }
    }
}

pub struct BlockedClients {
    tiers: [Tier; 2],
}

impl BlockedClients {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        Ok(Self {
            tiers: [
                Tier {
                    map: take_map(ebpf, maps::BLOCKED_CLIENTS)?,
                    crowded_above: usize::MAX,
                },
                Tier {
                    map: take_map(ebpf, maps::BLOCKED_SPILL)?,
                    crowded_above: CROWDED_SPILL,
                },
            ],
        })
    }

    /// Every entry, ended or not.
    pub fn entries(&self) -> impl Iterator<Item = (BlockedKey, BlockedClient)> + '_ {
        self.tiers
            .iter()
            .flat_map(|tier| tier.map.iter().filter_map(Result::ok))
    }

    /// Removes every entry of process `tgid`.
    pub fn release(&mut self, tgid: u32) {
        for tier in &mut self.tiers {
            super::remove_keys_where(&mut tier.map, |k| k.tgid == tgid);
        }
    }

    /// Removes what no block needs any more (see the module's doc), and returns the entries
    /// it removed as missed unblocks, by tgid.
    ///
    /// The kernel may rewrite an entry between this walk and its delete (the client blocked
    /// again): each delete returns the value it removed, and one that is not what the walk saw
    /// is put back. What that cannot catch: a probe that looked the entry up before the
    /// delete and writes it after (a block starting in the same ~100 ns, of a client idle for
    /// [`ENDED_KEEP_NS`]): that block goes unrecorded, and its end unseen.
    /// `now_mono_ns` is `CLOCK_MONOTONIC`, the probes' clock.
    pub fn sweep(&mut self, now_unix_ms: i64, now_mono_ns: u64) -> Vec<u32> {
        let mut missed = Vec::new();
        for tier in &mut self.tiers {
            let entries: Vec<(BlockedKey, BlockedClient)> =
                tier.map.iter().filter_map(Result::ok).collect();
            let crowded = entries.len() > tier.crowded_above;
            for (key, seen) in entries {
                let Some(why) = Removal::of(&seen, now_unix_ms, now_mono_ns, crowded) else {
                    continue;
                };
                match tier.delete_if_unchanged(&key, &seen) {
                    Ok(true) if why == Removal::Overdue => missed.push(key.tgid),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot remove a blocked-client entry");
                    }
                }
            }
        }
        missed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: i64 = 1_800_000_000_000;
    const NOW_NS: u64 = 3_600_000_000_000;

    fn blocked(deadline_ms: i64) -> BlockedClient {
        BlockedClient {
            start_ns: NOW_NS - 1_000_000_000,
            deadline_ms,
            numkeys: 3,
            ..Default::default()
        }
    }

    fn ended(ago_ns: u64) -> BlockedClient {
        BlockedClient {
            ended_ns: NOW_NS - ago_ns,
            ..blocked(NOW_MS)
        }
    }

    #[test]
    fn a_blocked_client_goes_only_past_its_deadline_and_the_grace() {
        let of = |entry: &BlockedClient, crowded| Removal::of(entry, NOW_MS, NOW_NS, crowded);
        assert_eq!(of(&blocked(NOW_MS - OVERDUE_GRACE_MS), false), None);
        assert_eq!(
            of(&blocked(NOW_MS - OVERDUE_GRACE_MS - 1), false),
            Some(Removal::Overdue)
        );
        // Blocked for ever (timeout 0), and in a crowded map: its block is not over.
        assert_eq!(of(&blocked(0), false), None);
        assert_eq!(of(&blocked(NOW_MS + 60_000), true), None);
    }

    #[test]
    fn an_ended_entry_is_kept_for_the_clients_next_block_unless_the_map_is_crowded() {
        let of = |entry: &BlockedClient, crowded| Removal::of(entry, NOW_MS, NOW_NS, crowded);
        assert_eq!(of(&ended(ENDED_KEEP_NS), false), None);
        assert_eq!(of(&ended(ENDED_KEEP_NS + 1), false), Some(Removal::LetGo));
        assert_eq!(of(&ended(1), true), Some(Removal::LetGo));
        // Its deadline is that of the ended block: long past, and no reason to go.
        let long_ago = BlockedClient {
            deadline_ms: NOW_MS - 3_600_000,
            ..ended(1)
        };
        assert_eq!(of(&long_ago, false), None);
        // An end stamped after this reading of the clock (another CPU) is recent.
        let just_now = BlockedClient {
            ended_ns: NOW_NS + 5,
            ..blocked(0)
        };
        assert_eq!(of(&just_now, false), None);
    }
}
