//! Which processes are tracked. A full /proc scan at start and every rescan interval, and
//! single-pid checks driven by the kernel's exec, fork and exit events in between. Every
//! change is reported as [`Change`] so that the probes and the CPU state follow it exactly.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::Path,
    time::SystemTime,
};

use crate::{
    proc_reader::{BinaryKey, ProcRoot, ProcessInfo, ReadError},
    rules::{Classification, RuleSet, ServerBinary, SERVER_SYMBOLS},
};

/// Reads which of the wanted symbols an executable defines (`None`: no symbol table).
pub type SymbolReader = fn(&Path, &[&str]) -> std::io::Result<Option<BTreeSet<String>>>;

/// Binaries examined at most: a node runs few distinct Redis-looking executables; past this,
/// the cache starts over rather than grow.
const MAX_CACHED_BINARIES: usize = 256;

#[derive(Clone, Debug, PartialEq)]
pub struct TrackedProcess {
    pub info: ProcessInfo,
    pub class: Classification,
    /// The executable file it runs, when `/proc/<pid>/exe` could be read. An exec keeps the
    /// pid and the start time: one into another build of the same class (another Redis
    /// binary) is told by this, and set up anew, since probes and offsets are per binary.
    pub image: Option<BinaryKey>,
    /// When the agent started tracking it: the start of its cumulative series.
    pub since: SystemTime,
}

impl TrackedProcess {
    pub fn pid(&self) -> u32 {
        self.info.id.pid
    }
    /// This reading of a process tracking already holds as `previous`: the facts are this
    /// reading's (titles change), the start of its series stays, and so does its executable
    /// where this reading could not get it.
    fn refreshing(self, previous: Self) -> Self {
        Self {
            image: self.image.or(previous.image),
            since: previous.since,
            ..self
        }
    }

    /// Whether `other` is this process as tracking knows it: the same pid and start time,
    /// the same class, and the same executable file where both were read (a read that failed
    /// once, the process exiting, must not look like an exec). The file by device and inode
    /// only: a `touch` of a running binary changes its mtime, not what runs, and its inode
    /// cannot go to another file while a process still runs it.
    pub fn is_same_as(&self, other: &Self) -> bool {
        self.info.id == other.info.id
            && self.class == other.class
            && match (self.image, other.image) {
                (Some(a), Some(b)) => (a.dev, a.ino) == (b.dev, b.ino),
                _ => true,
            }
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
            // A zombie is no read error: it is skipped, every scan, while it waits.
            ReadError::Exited(_) => {}
        }
    }
}

/// What /proc said of one process, read by a [`ProcessReader`] and classified by
/// [`Discovery::check_reading`].
#[derive(Debug)]
pub struct Reading {
    pid: u32,
    /// `None` for the agent itself, which is never read.
    info: Option<Result<ProcessInfo, ReadError>>,
}

impl Reading {
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

/// Reads processes for discovery without its state, so that a caller holding no lock can: a
/// process's cmdline is read through its memory and waits on its mmap lock, which uprobe
/// registration takes for write in every process that maps the binary it probes (50 Redis
/// servers starting while the first one's probes go in), and the agent's state lock must not
/// be held across such a wait.
#[derive(Clone, Debug)]
pub struct ProcessReader {
    proc: ProcRoot,
    own_pid: u32,
}

impl ProcessReader {
    pub fn read(&self, pid: u32) -> Reading {
        Reading {
            pid,
            info: (pid != self.own_pid).then(|| self.proc.process_info(pid)),
        }
    }

    /// Every process of the node, for [`Discovery::rescan_from`].
    pub fn read_all(&self) -> std::io::Result<Vec<Reading>> {
        Ok(self
            .proc
            .pids()?
            .into_iter()
            .map(|pid| self.read(pid))
            .collect())
    }
}

pub struct Discovery {
    proc: ProcRoot,
    rules: RuleSet,
    /// The agent itself is never tracked, whatever the rules say.
    own_pid: u32,
    tracked: BTreeMap<u32, TrackedProcess>,
    /// What each examined executable is, so that each is read once.
    binaries: HashMap<BinaryKey, ServerBinary>,
    read_symbols: SymbolReader,
    /// How many executables were read (for tests and the log).
    pub binaries_read: u64,
}

impl Discovery {
    pub fn new(proc: ProcRoot, rules: RuleSet, own_pid: u32) -> Self {
        Self {
            proc,
            rules,
            own_pid,
            tracked: BTreeMap::new(),
            binaries: HashMap::new(),
            read_symbols: crate::proc_reader::maps::defined_symbols,
            binaries_read: 0,
        }
    }

    /// Replaces how executables' symbols are read (tests use fixture files).
    pub fn with_symbol_reader(mut self, read_symbols: SymbolReader) -> Self {
        self.read_symbols = read_symbols;
        self
    }

    pub fn tracked(&self) -> impl Iterator<Item = &TrackedProcess> {
        self.tracked.values()
    }

    pub fn get(&self, pid: u32) -> Option<&TrackedProcess> {
        self.tracked.get(&pid)
    }

    /// Reads processes as this discovery does, without borrowing it.
    pub fn reader(&self) -> ProcessReader {
        ProcessReader {
            proc: self.proc.clone(),
            own_pid: self.own_pid,
        }
    }

    fn classify(&mut self, reading: Reading, errors: &mut ScanErrors) -> Option<TrackedProcess> {
        let pid = reading.pid;
        match reading.info? {
            Ok(info) => {
                let Self {
                    proc,
                    rules,
                    binaries,
                    read_symbols,
                    binaries_read,
                    ..
                } = self;
                let class = rules.classify(&info, || {
                    server_binary(proc, pid, binaries, *read_symbols, binaries_read)
                })?;
                Some(TrackedProcess {
                    info,
                    class,
                    image: proc.exe_identity(pid).map(|(_, key)| key),
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
    /// another process (different start time), or that no longer match (an exec'd image), and
    /// sets anew one that exec'd another binary of its class.
    pub fn rescan(&mut self) -> std::io::Result<(Vec<Change>, ScanErrors)> {
        let readings = self.reader().read_all()?;
        Ok(self.scan(readings, false))
    }

    /// [`Discovery::rescan`] from readings of every process taken earlier, without this
    /// discovery's lock. Where a reading and what is tracked disagree (a process found and not
    /// tracked, tracked and not found, or found otherwise), the process is read again: an exec
    /// or exit event handled since the reading may have changed it, and the older reading
    /// must not undo that.
    pub fn rescan_from(&mut self, readings: Vec<Reading>) -> (Vec<Change>, ScanErrors) {
        self.scan(readings, true)
    }

    /// The rescan from `readings`; `older` when they may be older than what is tracked (taken
    /// without the lock), so that disagreements are read again. Readings taken just now, as
    /// [`Discovery::rescan`]'s (the initial scan's among them), are not read twice.
    fn scan(&mut self, readings: Vec<Reading>, older: bool) -> (Vec<Change>, ScanErrors) {
        let mut errors = ScanErrors::default();
        let mut changes = Vec::new();
        let mut seen = BTreeMap::new();
        for reading in readings {
            let pid = reading.pid;
            if let Some(found) = self.classify(reading, &mut errors) {
                seen.insert(pid, found);
            }
        }
        let disagreeing: BTreeSet<u32> = if !older {
            BTreeSet::new()
        } else {
            seen.iter()
                .filter(|(pid, found)| !self.tracked.get(pid).is_some_and(|t| t.is_same_as(found)))
                .map(|(pid, _)| *pid)
                .chain(
                    self.tracked
                        .keys()
                        .filter(|pid| !seen.contains_key(pid))
                        .copied(),
                )
                .collect()
        };
        let reader = self.reader();
        for pid in disagreeing {
            // A process gone since was found by the walk, not missed by it: its failed read
            // now is not a scan error.
            let mut ignored = ScanErrors::default();
            match self.classify(reader.read(pid), &mut ignored) {
                Some(found) => seen.insert(pid, found),
                None => seen.remove(&pid),
            };
        }
        let old = std::mem::take(&mut self.tracked);
        for (pid, previous) in old {
            match seen.remove(&pid) {
                Some(current) if current.is_same_as(&previous) => {
                    // Keep the original `since`, refresh the facts (titles change).
                    self.tracked.insert(pid, current.refreshing(previous));
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
        (changes, errors)
    }

    /// Re-examines one pid, after an exec or exit event, or a failed read.
    pub fn check(&mut self, pid: u32) -> (Vec<Change>, ScanErrors) {
        let reading = self.reader().read(pid);
        self.check_with(reading, false)
    }

    /// [`Discovery::check`] from a reading taken earlier, without this discovery's lock. A
    /// process it matches must still run (its `stat` only is read again): one that exited
    /// since, its exit event handled meanwhile, must not be set up.
    pub fn check_reading(&mut self, reading: Reading) -> (Vec<Change>, ScanErrors) {
        self.check_with(reading, true)
    }

    /// The check from `reading`; `older` when it may be older than what is tracked.
    fn check_with(&mut self, reading: Reading, older: bool) -> (Vec<Change>, ScanErrors) {
        let pid = reading.pid;
        let mut errors = ScanErrors::default();
        let mut changes = Vec::new();
        let current = self
            .classify(reading, &mut errors)
            .filter(|found| !older || self.proc.still_runs(found.info.id));
        match (self.tracked.remove(&pid), current) {
            (Some(previous), Some(current)) if previous.is_same_as(&current) => {
                self.tracked.insert(pid, current.refreshing(previous));
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

    /// Whether `change` still says what discovery holds: an `Added` process is still tracked
    /// (the same one), a `Removed` one is not. The rescan's changes are applied one at a time
    /// after the scan, each under the agent's lock in turn, and an exit or exec event may be
    /// handled in between: a process that exited meanwhile was already dropped (by
    /// [`Discovery::forget`], whose `Removed` went first), and setting it up now would leave
    /// its kernel filter entries with nothing left to remove them; one re-added meanwhile (by
    /// [`Discovery::check`]) must not be torn down by the scan's older `Removed`.
    pub fn still_holds(&self, change: &Change) -> bool {
        match change {
            Change::Added(p) => self.tracked.get(&p.pid()).is_some_and(|t| t.is_same_as(p)),
            Change::Removed(p) => self.tracked.get(&p.pid()).is_none_or(|t| !t.is_same_as(p)),
        }
    }

    /// Whether a process with this pid is tracked.
    pub fn is_tracked(&self, pid: u32) -> bool {
        self.tracked.contains_key(&pid)
    }

    /// The process exited (kernel event): drop it without reading /proc.
    pub fn forget(&mut self, pid: u32) -> Option<Change> {
        self.tracked.remove(&pid).map(Change::Removed)
    }
}

/// What the executable of `pid` is, read once per binary (by device, inode, size and mtime).
fn server_binary(
    proc: &ProcRoot,
    pid: u32,
    cache: &mut HashMap<BinaryKey, ServerBinary>,
    read_symbols: SymbolReader,
    reads: &mut u64,
) -> ServerBinary {
    let Some((path, key)) = proc.exe_identity(pid) else {
        return ServerBinary::Unknown;
    };
    if let Some(known) = cache.get(&key) {
        return *known;
    }
    *reads += 1;
    let verdict = match read_symbols(&path, &SERVER_SYMBOLS) {
        Ok(symbols) => ServerBinary::from_symbols(symbols.as_ref()),
        // Not an ELF file: nothing to learn from it, now or later.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => ServerBinary::Unknown,
        // The process exited meanwhile, or this one may not be read: remember nothing.
        Err(e) => {
            tracing::debug!(pid, error = %e, "cannot read the symbols of an executable");
            return ServerBinary::Unknown;
        }
    };
    if cache.len() >= MAX_CACHED_BINARIES {
        cache.clear();
    }
    cache.insert(key, verdict);
    verdict
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rules::default_rule_specs;

    /// A copy of the fixture tree's Redis (pid 100, with the tree's uptime), for tests that
    /// change what /proc says of it.
    pub(crate) fn proc_with_redis() -> tempfile::TempDir {
        let fixture = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/proc"));
        let root = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(fixture.join("100"))
            .arg(fixture.join("uptime"))
            .arg(root.path())
            .status()
            .unwrap();
        assert!(status.success());
        root
    }

    /// The fixture executables under tests/fixtures/bin list the symbols they stand for.
    fn fixture_symbols(path: &Path, wanted: &[&str]) -> std::io::Result<Option<BTreeSet<String>>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        Ok(Some(
            text.split_whitespace()
                .filter(|s| wanted.contains(s))
                .map(String::from)
                .collect(),
        ))
    }

    fn with_rules(rules: RuleSet) -> Discovery {
        let proc = ProcRoot::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/proc"));
        Discovery::new(proc, rules, 1).with_symbol_reader(fixture_symbols)
    }

    fn discovery() -> Discovery {
        with_rules(RuleSet::new(&default_rule_specs()).unwrap())
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
        // 600 and 610 are children Redis forked, 700 a copy named redis-server-7.4.1, 710 the
        // Redis binary run as redis-check-rdb, 720 redis-cli. 800 is a redis-server that has
        // exited, unreaped (a zombie): not tracked, and no read error. 810 is a worker whose
        // main thread exited while its other thread runs: alive.
        assert_eq!(
            found,
            vec![
                (100, "redis".into()),
                (200, "sidekiq".into()),
                (400, "redis".into()),
                (500, "sidekiq".into()),
                (700, "redis".into()),
                (810, "sidekiq".into()),
            ]
        );
        assert_eq!(changes.len(), 6);
        assert!(changes.iter().all(|c| matches!(c, Change::Added(_))));
        assert_eq!(errors, ScanErrors::default());
        // A second scan of an unchanged tree changes nothing.
        assert!(d.rescan().unwrap().0.is_empty());
    }

    #[test]
    fn each_binary_is_read_once_and_only_for_redis_looking_processes() {
        let mut d = discovery();
        d.rescan().unwrap();
        // bin/redis-server-7.4.1 (700), bin/redis-check-rdb (710), bin/redis-cli (720). Not
        // those named redis-server (100, 400, 600, 610): their name suffices. Never ruby or
        // python.
        assert_eq!(d.binaries_read, 3);
        d.rescan().unwrap();
        assert_eq!(d.binaries_read, 3, "cached");
    }

    #[test]
    fn redis_exclusions_apply_to_discovery() {
        use crate::rules::ExcludeSpec;
        let rules = RuleSet::new(&default_rule_specs())
            .unwrap()
            .with_redis_exclusions(&[ExcludeSpec::parse_flag("comm=redis-server-7.").unwrap()])
            .unwrap();
        let mut d = with_rules(rules);
        d.rescan().unwrap();
        assert!(d.get(700).is_none());
        assert!(d.get(100).is_some());
    }

    #[test]
    fn the_agent_never_tracks_itself() {
        let proc = ProcRoot::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/proc"));
        let mut d = Discovery::new(proc, RuleSet::new(&default_rule_specs()).unwrap(), 100)
            .with_symbol_reader(fixture_symbols);
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

    /// An exec keeps the pid and the start time. A Redis that exec's another Redis binary is
    /// set up anew, by a check (its exec event) or a rescan, since its probes were the old
    /// binary's; an exe link that cannot be read for a moment changes nothing.
    #[test]
    fn an_exec_into_another_binary_of_the_same_class_is_a_new_process() {
        let root = proc_with_redis();
        let bins = tempfile::tempdir().unwrap();
        let (old_build, new_build) = (bins.path().join("redis-7.2"), bins.path().join("redis-7.4"));
        std::fs::write(&old_build, "7.2").unwrap();
        std::fs::write(&new_build, "7.4").unwrap();
        let exe = root.path().join("100/exe");
        let point_exe_at = |target: &Path| {
            let _ = std::fs::remove_file(&exe);
            std::os::unix::fs::symlink(target, &exe).unwrap();
        };
        point_exe_at(&old_build);
        let rules = RuleSet::new(&default_rule_specs()).unwrap();
        let mut d = Discovery::new(ProcRoot::new(root.path()), rules, 1)
            .with_symbol_reader(fixture_symbols);
        let (added, _) = d.rescan().unwrap();
        assert!(matches!(added.as_slice(), [Change::Added(p)] if p.pid() == 100));
        let image_of = |d: &Discovery| d.get(100).and_then(|p| p.image).map(|k| k.ino);
        let ino =
            |path: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
        assert_eq!(image_of(&d), Some(ino(&old_build)));

        // The exec event's check: the same pid, start time and class, another binary.
        point_exe_at(&new_build);
        let (changes, _) = d.check(100);
        assert!(
            matches!(changes.as_slice(), [Change::Removed(old), Change::Added(new)]
                if old.image.map(|k| k.ino) == Some(ino(&old_build))
                    && new.image.map(|k| k.ino) == Some(ino(&new_build))),
            "{changes:?}"
        );
        assert!(changes.iter().all(|c| d.still_holds(c)));
        assert!(d.check(100).0.is_empty(), "the same binary again");

        // The link unreadable for a moment: no change, and the binary is still known.
        std::fs::remove_file(&exe).unwrap();
        assert!(d.check(100).0.is_empty());
        assert!(d.rescan().unwrap().0.is_empty());
        assert_eq!(image_of(&d), Some(ino(&new_build)));

        // Back to the first binary, seen by a rescan this time.
        point_exe_at(&old_build);
        let (changes, _) = d.rescan().unwrap();
        assert!(
            matches!(changes.as_slice(), [Change::Removed(_), Change::Added(p)]
                if p.image.map(|k| k.ino) == Some(ino(&old_build))),
            "{changes:?}"
        );
    }

    /// Readings are taken without the agent's lock, so an exit or exec event may be handled
    /// between a reading and its use: the older reading must not undo what the event did.
    #[test]
    fn readings_older_than_an_event_do_not_undo_it() {
        let root = proc_with_redis();
        let rules = RuleSet::new(&default_rule_specs()).unwrap();
        let mut d = Discovery::new(ProcRoot::new(root.path()), rules, 1)
            .with_symbol_reader(fixture_symbols);
        let reader = d.reader();
        let stat = root.path().join("100/stat");
        let original = std::fs::read_to_string(&stat).unwrap();

        // Read while the Redis ran; it exits (a zombie, then reaped) before the reading is
        // used: not set up, by an exec event's check or by a rescan.
        let reading = reader.read(100);
        let walk = reader.read_all().unwrap();
        std::fs::write(&stat, original.replacen(") S ", ") Z ", 1)).unwrap();
        std::fs::remove_dir_all(root.path().join("100/task")).unwrap();
        assert!(d.check_reading(reading).0.is_empty());
        let (changes, errors) = d.rescan_from(walk);
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(errors, ScanErrors::default());
        assert!(!d.is_tracked(100));

        // Another process now has the pid (another start time): the reading of the first
        // one is not it.
        let reading = {
            std::fs::write(&stat, &original).unwrap();
            reader.read(100)
        };
        // stat's field 22, the start time: the 20th after the command's ") ".
        let start = original
            .rsplit_once(") ")
            .unwrap()
            .1
            .split(' ')
            .nth(19)
            .unwrap();
        std::fs::write(
            &stat,
            original.replacen(&format!(" {start} "), " 999999 ", 1),
        )
        .unwrap();
        assert!(d.check_reading(reading).0.is_empty());

        // A walk taken before the process started, used after its exec event set it up: the
        // process is read again, and kept.
        let before = reader.read_all().unwrap();
        std::fs::write(&stat, &original).unwrap();
        let before: Vec<Reading> = before.into_iter().filter(|r| r.pid() != 100).collect();
        let (added, _) = d.check(100);
        assert!(matches!(added.as_slice(), [Change::Added(p)] if p.pid() == 100));
        let (changes, _) = d.rescan_from(before);
        assert!(changes.is_empty(), "{changes:?}");
        assert!(d.is_tracked(100));

        // A walk that saw it run, used after its exit was handled: not set up again.
        let walk = reader.read_all().unwrap();
        std::fs::remove_dir_all(root.path().join("100")).unwrap();
        assert!(d.forget(100).is_some());
        let (changes, errors) = d.rescan_from(walk);
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(errors, ScanErrors::default());
        assert!(!d.is_tracked(100));
    }

    /// A rescan's changes are applied after it, one at a time; an exit or a check handled in
    /// between makes some of them stale, and those are not applied.
    #[test]
    fn rescan_changes_overtaken_by_an_exit_or_a_check_are_stale() {
        let mut d = discovery();
        let (changes, _) = d.rescan().unwrap();
        let added = changes
            .iter()
            .find(|c| matches!(c, Change::Added(p) if p.pid() == 100))
            .unwrap()
            .clone();
        assert!(d.still_holds(&added));
        // The process exits before the scan's Added is applied: its exit was handled first.
        let removed = d.forget(100).unwrap();
        assert!(d.still_holds(&removed));
        assert!(!d.still_holds(&added));
        // Seen again by a check (an exec event): the scan's older Removed is stale.
        assert!(matches!(d.check(100).0.as_slice(), [Change::Added(_)]));
        assert!(!d.still_holds(&removed));
        assert!(d.still_holds(&added));
    }
}
