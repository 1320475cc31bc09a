//! Which processes are tracked. A full /proc scan at start and every rescan interval, and
//! single-pid checks driven by the kernel's exec and exit events in between. Every change is
//! reported as [`Change`] so that the probes and the CPU state follow it exactly.

use std::{collections::BTreeMap, time::SystemTime};

use crate::{
    proc_reader::{ProcRoot, ProcessInfo, ReadError},
    rules::{Classification, RuleSet},
};

#[derive(Clone, Debug, PartialEq)]
pub struct TrackedProcess {
    pub info: ProcessInfo,
    pub class: Classification,
    /// When the agent started tracking it: the start of its cumulative series.
    pub since: SystemTime,
}

impl TrackedProcess {
    pub fn pid(&self) -> u32 {
        self.info.id.pid
    }
    pub fn group(&self) -> &str {
        self.class.group()
    }
    /// `process.executable.name`: the exe's basename (OpenTelemetry semantic conventions),
    /// falling back to comm when the exe link cannot be read.
    pub fn executable_name(&self) -> &str {
        self.info.exe_name().unwrap_or(&self.info.comm)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Added(TrackedProcess),
    Removed(TrackedProcess),
}

/// Errors met during a scan, by kind; they are counted, never fatal.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanErrors {
    pub vanished: u64,
    pub failed: u64,
}

impl ScanErrors {
    fn count(&mut self, e: &ReadError) {
        match e {
            ReadError::Vanished(_) => self.vanished += 1,
            ReadError::Failed { .. } => self.failed += 1,
        }
    }
}

pub struct Discovery {
    proc: ProcRoot,
    rules: RuleSet,
    /// The agent itself is never tracked, whatever the rules say.
    own_pid: u32,
    tracked: BTreeMap<u32, TrackedProcess>,
}

impl Discovery {
    pub fn new(proc: ProcRoot, rules: RuleSet, own_pid: u32) -> Self {
        Self {
            proc,
            rules,
            own_pid,
            tracked: BTreeMap::new(),
        }
    }

    pub fn tracked(&self) -> impl Iterator<Item = &TrackedProcess> {
        self.tracked.values()
    }

    pub fn get(&self, pid: u32) -> Option<&TrackedProcess> {
        self.tracked.get(&pid)
    }

    fn classify(&self, pid: u32, errors: &mut ScanErrors) -> Option<TrackedProcess> {
        if pid == self.own_pid {
            return None;
        }
        match self.proc.process_info(pid) {
            Ok(info) => {
                let class = self.rules.classify(&info)?;
                Some(TrackedProcess {
                    info,
                    class,
                    since: SystemTime::now(),
                })
            }
            Err(e) => {
                errors.count(&e);
                None
            }
        }
    }

    /// Full scan: adds new matches, removes processes that are gone or whose pid now names
    /// another process (different start time), or that no longer match (an exec'd image).
    pub fn rescan(&mut self) -> std::io::Result<(Vec<Change>, ScanErrors)> {
        let mut errors = ScanErrors::default();
        let pids = self.proc.pids()?;
        let mut changes = Vec::new();
        let mut seen = BTreeMap::new();
        for pid in pids {
            if let Some(found) = self.classify(pid, &mut errors) {
                seen.insert(pid, found);
            }
        }
        let old = std::mem::take(&mut self.tracked);
        for (pid, previous) in old {
            match seen.remove(&pid) {
                Some(current)
                    if current.info.id == previous.info.id && current.class == previous.class =>
                {
                    // Keep the original `since`, refresh the facts (titles change).
                    self.tracked.insert(
                        pid,
                        TrackedProcess {
                            since: previous.since,
                            ..current
                        },
                    );
                }
                Some(current) => {
                    changes.push(Change::Removed(previous));
                    changes.push(Change::Added(current.clone()));
                    self.tracked.insert(pid, current);
                }
                None => changes.push(Change::Removed(previous)),
            }
        }
        for (pid, new) in seen {
            changes.push(Change::Added(new.clone()));
            self.tracked.insert(pid, new);
        }
        Ok((changes, errors))
    }

    /// Re-examines one pid, after an exec or exit event, or a failed read.
    pub fn check(&mut self, pid: u32) -> (Vec<Change>, ScanErrors) {
        let mut errors = ScanErrors::default();
        let mut changes = Vec::new();
        let current = self.classify(pid, &mut errors);
        match (self.tracked.remove(&pid), current) {
            (Some(previous), Some(current))
                if previous.info.id == current.info.id && previous.class == current.class =>
            {
                self.tracked.insert(
                    pid,
                    TrackedProcess {
                        since: previous.since,
                        ..current
                    },
                );
            }
            (previous, current) => {
                if let Some(previous) = previous {
                    changes.push(Change::Removed(previous));
                }
                if let Some(current) = current {
                    changes.push(Change::Added(current.clone()));
                    self.tracked.insert(pid, current);
                }
            }
        }
        (changes, errors)
    }

    /// The process exited (kernel event): drop it without reading /proc.
    pub fn forget(&mut self, pid: u32) -> Option<Change> {
        self.tracked.remove(&pid).map(Change::Removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::default_rule_specs;

    fn discovery() -> Discovery {
        let proc = ProcRoot::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/proc"));
        Discovery::new(proc, RuleSet::new(&default_rule_specs()).unwrap(), 1)
    }

    #[test]
    fn scan_finds_redis_servers_and_workers_in_a_fixture_tree() {
        let mut d = discovery();
        let (changes, errors) = d.rescan().unwrap();
        let mut found: Vec<(u32, String)> = d
            .tracked()
            .map(|p| (p.pid(), p.group().to_string()))
            .collect();
        found.sort();
        assert_eq!(
            found,
            vec![
                (100, "redis".into()),
                (200, "sidekiq".into()),
                (400, "redis".into()),
                (500, "sidekiq".into())
            ]
        );
        assert_eq!(changes.len(), 4);
        assert!(changes.iter().all(|c| matches!(c, Change::Added(_))));
        assert_eq!(errors, ScanErrors::default());
        // A second scan of an unchanged tree changes nothing.
        assert!(d.rescan().unwrap().0.is_empty());
    }

    #[test]
    fn the_agent_never_tracks_itself() {
        let proc = ProcRoot::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/proc"));
        let mut d = Discovery::new(proc, RuleSet::new(&default_rule_specs()).unwrap(), 100);
        d.rescan().unwrap();
        assert!(d.get(100).is_none());
    }

    #[test]
    fn check_and_forget_follow_single_pids() {
        let mut d = discovery();
        let (changes, _) = d.check(100);
        assert!(matches!(changes.as_slice(), [Change::Added(p)] if p.pid() == 100));
        // Checking again is a no-op.
        assert!(d.check(100).0.is_empty());
        // A pid that is gone is dropped and counted as vanished.
        let (changes, errors) = d.check(999);
        assert!(changes.is_empty());
        assert_eq!(errors.vanished, 1);
        assert!(matches!(d.forget(100), Some(Change::Removed(p)) if p.pid() == 100));
        assert!(d.forget(100).is_none());
    }
}
