//! Per-thread CPU time from /proc, summed per thread name (what process-exporter does with
//! threads=true). Threads come and go, so the sums are kept as monotonic totals: each read adds
//! every live thread's increase since the previous read. A thread that exits keeps what it
//! contributed, a thread that starts contributes its whole lifetime.
//!
//! Thread names are the label, so their number per process is bounded: past the limit, new
//! names are folded into `other`.

use std::collections::{BTreeMap, HashMap};

use crate::proc_reader::ThreadSample;

/// The label that collects threads past the per-process thread-name limit.
pub const OTHER_THREADS: &str = "other";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub user: u64,
    pub system: u64,
}

#[derive(Debug)]
struct SeenThread {
    start_time_ticks: u64,
    last: CpuTicks,
}

/// CPU accounting of one process.
#[derive(Debug, Default)]
pub struct ProcessCpu {
    threads: HashMap<u32, SeenThread>,
    totals: BTreeMap<String, CpuTicks>,
    /// Threads folded into [`OTHER_THREADS`] so far.
    pub folded_threads: u64,
}

impl ProcessCpu {
    /// The label a thread name is counted under, given the limit.
    pub fn label_for<'a>(&self, name: &'a str, max_names: usize) -> &'a str {
        if self.totals.contains_key(name) || self.totals.len() < max_names {
            name
        } else {
            OTHER_THREADS
        }
    }

    /// Folds one read of the process's threads into the totals.
    pub fn update(&mut self, samples: &[ThreadSample], max_names: usize) {
        let mut live = HashMap::with_capacity(samples.len());
        for sample in samples {
            let now = CpuTicks {
                user: sample.user_ticks,
                system: sample.system_ticks,
            };
            let delta = match self.threads.get(&sample.tid) {
                // Same thread as before (a reused tid has another start time).
                Some(seen) if seen.start_time_ticks == sample.start_time_ticks => CpuTicks {
                    user: now.user.saturating_sub(seen.last.user),
                    system: now.system.saturating_sub(seen.last.system),
                },
                _ => now,
            };
            let label = self
                .label_for(&sample.name, max_names.max(1) - 1)
                .to_string();
            if label == OTHER_THREADS
                && sample.name != OTHER_THREADS
                && !self.threads.contains_key(&sample.tid)
            {
                self.folded_threads += 1;
            }
            let total = self.totals.entry(label).or_default();
            total.user += delta.user;
            total.system += delta.system;
            live.insert(
                sample.tid,
                SeenThread {
                    start_time_ticks: sample.start_time_ticks,
                    last: now,
                },
            );
        }
        // Forget exited threads so that churn does not grow the map.
        self.threads = live;
    }

    /// Totals per thread-name label, in clock ticks.
    pub fn totals(&self) -> &BTreeMap<String, CpuTicks> {
        &self.totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(tid: u32, name: &str, start: u64, user: u64, system: u64) -> ThreadSample {
        ThreadSample {
            tid,
            name: name.into(),
            start_time_ticks: start,
            user_ticks: user,
            system_ticks: system,
        }
    }

    #[test]
    fn threads_with_the_same_name_are_summed() {
        let mut cpu = ProcessCpu::default();
        cpu.update(
            &[
                sample(1, "redis-server", 10, 100, 10),
                sample(2, "io_thd_1", 11, 5, 1),
                sample(3, "io_thd_1", 11, 7, 2),
            ],
            64,
        );
        assert_eq!(
            cpu.totals()["redis-server"],
            CpuTicks {
                user: 100,
                system: 10
            }
        );
        assert_eq!(
            cpu.totals()["io_thd_1"],
            CpuTicks {
                user: 12,
                system: 3
            }
        );
    }

    #[test]
    fn totals_never_decrease_when_threads_exit_and_count_new_threads_whole() {
        let mut cpu = ProcessCpu::default();
        cpu.update(
            &[
                sample(1, "main", 10, 100, 0),
                sample(2, "worker", 11, 50, 5),
            ],
            64,
        );
        // Thread 2 exits; thread 3 (same name) starts and has used 3 ticks already.
        cpu.update(
            &[sample(1, "main", 10, 120, 0), sample(3, "worker", 20, 3, 0)],
            64,
        );
        assert_eq!(
            cpu.totals()["main"],
            CpuTicks {
                user: 120,
                system: 0
            }
        );
        assert_eq!(
            cpu.totals()["worker"],
            CpuTicks {
                user: 53,
                system: 5
            }
        );
    }

    #[test]
    fn a_reused_tid_is_a_new_thread() {
        let mut cpu = ProcessCpu::default();
        cpu.update(&[sample(7, "w", 10, 100, 0)], 64);
        // tid 7 reused by a thread started later, with less CPU than the old one had.
        cpu.update(&[sample(7, "w", 99, 4, 0)], 64);
        assert_eq!(cpu.totals()["w"].user, 104);
    }

    #[test]
    fn thread_names_past_the_limit_fold_into_other() {
        let mut cpu = ProcessCpu::default();
        let threads: Vec<_> = (0..10)
            .map(|i| sample(i, &format!("t{i}"), 1, 1, 0))
            .collect();
        cpu.update(&threads, 4);
        // Three names plus "other" make the limit of four labels.
        assert_eq!(cpu.totals().len(), 4);
        assert_eq!(cpu.totals()[OTHER_THREADS].user, 7);
        assert_eq!(cpu.folded_threads, 7);
        // A second read does not count the same folded threads again.
        cpu.update(&threads, 4);
        assert_eq!(cpu.folded_threads, 7);
    }

    #[test]
    fn exited_threads_are_forgotten() {
        let mut cpu = ProcessCpu::default();
        let many: Vec<_> = (0..1000).map(|i| sample(i, "w", 1, 1, 0)).collect();
        cpu.update(&many, 64);
        cpu.update(&[sample(1, "w", 1, 2, 0)], 64);
        assert_eq!(cpu.threads.len(), 1);
    }
}
