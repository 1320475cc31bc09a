//! What the agent has set up for each tracked process, by pid: its kernel filter entries,
//! probes and series. Kept apart from what discovery holds, because the two move at different
//! times: a rescan updates discovery at once and sets processes up or tears them down
//! afterwards, one at a time, while exit, exec and fork events change both in between. The
//! kernel's maps are keyed by pid alone, so a change applied against the wrong process at a
//! pid (an older `Removed` tearing down the live process a check set up meanwhile under the
//! same pid, an `Added` setting a process up twice) would leave them wrong for good: nothing
//! later would see a difference to mend.
//!
//! [`Applied::steps_for`] turns a discovery change into what to do given what is set up;
//! [`Applied::mend`] lists what differs from discovery, for the end of each rescan.

use crate::discovery::{Change, TrackedProcess};
use std::collections::{hash_map::Entry, HashMap};

/// One thing to do to the agent's set-up for one process.
#[derive(Debug)]
pub enum Step {
    SetUp(TrackedProcess),
    TearDown(TrackedProcess),
}

/// The processes set up, by pid.
#[derive(Default)]
pub struct Applied {
    by_pid: HashMap<u32, TrackedProcess>,
}

impl Applied {
    /// What carrying out `change` takes, recorded as done (a process is the one set up when
    /// `TrackedProcess::is_same_as` says so: a process that exec'd into another class or
    /// another binary is set up anew):
    /// - `Added(p)`: nothing if `p` is set up already; else tear down whatever other process
    ///   is set up at its pid, then set `p` up;
    /// - `Removed(p)`: tear `p` down if it is what is set up at its pid; nothing otherwise
    ///   (another process set up there since is discovery's, not this change's).
    pub fn steps_for(&mut self, change: Change) -> Vec<Step> {
        match change {
            Change::Added(p) => {
                let pid = p.pid();
                match self.by_pid.get(&pid) {
                    Some(current) if current.is_same_as(&p) => Vec::new(),
                    _ => {
                        let mut steps = Vec::new();
                        if let Some(other) = self.by_pid.insert(pid, p.clone()) {
                            steps.push(Step::TearDown(other));
                        }
                        steps.push(Step::SetUp(p));
                        steps
                    }
                }
            }
            Change::Removed(p) => match self.by_pid.get(&p.pid()) {
                Some(current) if current.is_same_as(&p) => {
                    let current = self.by_pid.remove(&p.pid()).expect("just looked up");
                    vec![Step::TearDown(current)]
                }
                _ => Vec::new(),
            },
        }
    }

    /// What differs between the set-up and `held` (what discovery tracks), as the steps that
    /// close the gap, recorded as done: processes set up that discovery no longer holds (or
    /// holds as another process) are torn down, processes it holds that are not set up are
    /// set up. Empty unless a change was lost between the two.
    pub fn mend<'a>(&mut self, held: impl Iterator<Item = &'a TrackedProcess>) -> Vec<Step> {
        let held: HashMap<u32, &TrackedProcess> = held.map(|p| (p.pid(), p)).collect();
        let mut steps = Vec::new();
        let stale: Vec<u32> = self
            .by_pid
            .iter()
            .filter(|(pid, p)| !held.get(pid).is_some_and(|h| h.is_same_as(p)))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in stale {
            steps.push(Step::TearDown(self.by_pid.remove(&pid).expect("listed")));
        }
        for (pid, p) in held {
            if let Entry::Vacant(slot) = self.by_pid.entry(pid) {
                slot.insert(p.clone());
                steps.push(Step::SetUp(p.clone()));
            }
        }
        steps
    }

    /// Whether a process is set up at `pid`.
    pub fn has(&self, pid: u32) -> bool {
        self.by_pid.contains_key(&pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc_reader::{ProcessId, ProcessInfo};
    use crate::rules::Classification;
    use std::time::SystemTime;

    fn process(pid: u32, start: u64, class: Classification) -> TrackedProcess {
        TrackedProcess {
            info: ProcessInfo {
                id: ProcessId {
                    pid,
                    start_time_ticks: start,
                },
                comm: "p".into(),
                exe: None,
                cmdline: Vec::new(),
                session: 0,
                flags: 0,
            },
            class,
            image: None,
            since: SystemTime::UNIX_EPOCH,
        }
    }

    fn worker(pid: u32, start: u64) -> TrackedProcess {
        process(
            pid,
            start,
            Classification::Worker {
                group: "sidekiq".into(),
            },
        )
    }

    /// `(set up?, pid, start)` of each step.
    fn shape(steps: &[Step]) -> Vec<(bool, u32, u64)> {
        steps
            .iter()
            .map(|s| match s {
                Step::SetUp(p) => (true, p.pid(), p.info.id.start_time_ticks),
                Step::TearDown(p) => (false, p.pid(), p.info.id.start_time_ticks),
            })
            .collect()
    }

    #[test]
    fn a_process_is_set_up_once_and_torn_down_once() {
        let mut applied = Applied::default();
        let p = worker(10, 1);
        assert_eq!(
            shape(&applied.steps_for(Change::Added(p.clone()))),
            [(true, 10, 1)]
        );
        // A second Added of the same process (a rescan's, overtaken by a drop and a re-add
        // that were applied at once) sets nothing up again.
        assert!(applied.steps_for(Change::Added(p.clone())).is_empty());
        assert_eq!(
            shape(&applied.steps_for(Change::Removed(p.clone()))),
            [(false, 10, 1)]
        );
        assert!(applied.steps_for(Change::Removed(p)).is_empty());
        assert!(!applied.has(10));
    }

    /// A rescan finds pid 10's process gone and queues its Removed; before it is applied, a
    /// check sets up the new process at pid 10. The older Removed must leave that one alone.
    #[test]
    fn an_older_removed_does_not_tear_down_a_new_process_at_the_same_pid() {
        let mut applied = Applied::default();
        let (old, new) = (worker(10, 1), worker(10, 2));
        applied.steps_for(Change::Added(old.clone()));
        // The check's Added replaces the old process: torn down first, then the new one.
        assert_eq!(
            shape(&applied.steps_for(Change::Added(new.clone()))),
            [(false, 10, 1), (true, 10, 2)]
        );
        assert!(applied.steps_for(Change::Removed(old)).is_empty());
        assert!(applied.has(10));
        assert!(applied.mend([&new].into_iter()).is_empty());
    }

    #[test]
    fn a_process_that_exec_d_into_another_class_is_set_up_anew() {
        let mut applied = Applied::default();
        let as_worker = worker(10, 1);
        let as_redis = process(10, 1, Classification::RedisServer);
        applied.steps_for(Change::Added(as_worker));
        assert_eq!(
            shape(&applied.steps_for(Change::Added(as_redis))),
            [(false, 10, 1), (true, 10, 1)]
        );
    }

    #[test]
    fn a_process_that_exec_d_another_binary_is_set_up_anew_and_an_unread_or_touched_one_is_not() {
        use crate::proc_reader::BinaryKey;
        let build = |ino| {
            Some(BinaryKey {
                dev: 1,
                ino,
                size: 10,
                mtime: 0,
            })
        };
        let mut applied = Applied::default();
        let mut redis = process(10, 1, Classification::RedisServer);
        redis.image = build(7);
        applied.steps_for(Change::Added(redis.clone()));
        let mut unread = redis.clone();
        unread.image = None;
        assert!(applied.steps_for(Change::Added(unread)).is_empty());
        let mut touched = redis.clone();
        touched.image = touched.image.map(|key| BinaryKey { mtime: 1, ..key });
        assert!(applied.steps_for(Change::Added(touched)).is_empty());
        let mut exec_d = redis;
        exec_d.image = build(8);
        assert_eq!(
            shape(&applied.steps_for(Change::Added(exec_d))),
            [(false, 10, 1), (true, 10, 1)]
        );
    }

    #[test]
    fn mending_closes_every_gap_with_discovery_and_only_those() {
        let mut applied = Applied::default();
        for p in [worker(10, 1), worker(11, 1), worker(12, 1)] {
            applied.steps_for(Change::Added(p));
        }
        // Discovery holds 10 as it is, 11 as a newer process, 13 not set up; 12 is gone.
        let held = [worker(10, 1), worker(11, 2), worker(13, 1)];
        let mut steps = shape(&applied.mend(held.iter()));
        steps.sort();
        assert_eq!(
            steps,
            [(false, 11, 1), (false, 12, 1), (true, 11, 2), (true, 13, 1)]
        );
        assert!(applied.mend(held.iter()).is_empty(), "nothing left to mend");
    }
}
