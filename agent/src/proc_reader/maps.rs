//! What a process's executable and mappings say: whether it does its I/O through a C
//! library, which C library and which TLS library it maps (where the worker probes go), and
//! which symbols an ELF file defines.

use std::path::{Path, PathBuf};

use super::ProcRoot;

/// Which of `wanted` an ELF file defines, from `.dynsym` (kept by stripped builds linked with
/// `-rdynamic`, as Redis is) and `.symtab` when present. `None` when the file has no symbol
/// table at all (a stripped static binary): then nothing can be said from its symbols. Only the
/// headers and the symbol tables are read, not the whole file.
pub fn defined_symbols(
    path: &Path,
    wanted: &[&str],
) -> std::io::Result<Option<std::collections::BTreeSet<String>>> {
    use object::{Object, ObjectSymbol};
    let file = std::fs::File::open(path)?;
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let mut any = false;
    let found = elf
        .dynamic_symbols()
        .chain(elf.symbols())
        .inspect(|_| any = true)
        .filter(|s| s.is_definition())
        .filter_map(|s| s.name().ok())
        .filter(|name| wanted.contains(name))
        .map(String::from)
        .collect();
    Ok(any.then_some(found))
}

/// How an executable does its I/O, as far as libc probes are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExeKind {
    /// Dynamically linked: its reads and writes go through the libc.so it maps.
    Dynamic,
    /// Statically linked: there is no libc.so to probe.
    Static,
    /// A Go binary: its runtime makes network syscalls itself, even when it links libc (cgo).
    Go,
}

/// Classifies an executable from its ELF headers (read lazily: Go binaries can be large).
pub fn exe_kind(path: &Path) -> std::io::Result<ExeKind> {
    use object::Object;
    let file = std::fs::File::open(path)?;
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    if elf.section_by_name(".go.buildinfo").is_some()
        || elf.section_by_name(".gopclntab").is_some()
        || elf.section_by_name(".note.go.buildid").is_some()
    {
        return Ok(ExeKind::Go);
    }
    // A program interpreter (ld.so) means shared libraries; static-pie binaries have a
    // .dynamic section but no interpreter.
    Ok(if elf.section_by_name(".interp").is_some() {
        ExeKind::Dynamic
    } else {
        ExeKind::Static
    })
}

impl ProcRoot {
    /// The TLS library (OpenSSL's libssl) `pid` maps, as a path the agent can open; `None`
    /// when it maps none (it links no TLS library, or one built into it, or has not loaded
    /// it yet).
    pub fn libssl_path(&self, pid: u32) -> Option<PathBuf> {
        let maps = std::fs::read(self.root.join(pid.to_string()).join("maps")).ok()?;
        let path = mapped_files(&maps).find(|p| is_libssl(p))?;
        Some(self.host_path_of(pid, &path))
    }

    /// The C library through which a process does its I/O, as a path the agent can open
    /// (through `/proc/<pid>/root`): the one in `/proc/<pid>/maps`, or, for a process seen at
    /// exec before its loader ran, where distributions put it. `None` for static and Go
    /// executables, which do their I/O without one.
    pub fn libc_path(&self, pid: u32) -> Option<PathBuf> {
        let exe = self.root.join(pid.to_string()).join("exe");
        match exe_kind(&exe) {
            Ok(ExeKind::Dynamic) => {}
            Ok(_) => return None,
            // Unreadable: fall through to what the maps say.
            Err(_) => {}
        }
        let maps = std::fs::read(self.root.join(pid.to_string()).join("maps")).ok()?;
        if let Some(path) = mapped_files(&maps).find(|p| is_libc(p)) {
            return Some(self.host_path_of(pid, &path));
        }
        // Seen at exec, before the dynamic loader has mapped it: look where distributions put
        // it, inside the process's own root. Uprobes on that file fire once it is mapped.
        const USUAL: [&str; 4] = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/lib64/libc.so.6",
            "/usr/lib64/libc.so.6",
        ];
        USUAL
            .iter()
            .map(|p| self.host_path_of(pid, Path::new(p)))
            .find(|p| p.exists())
    }
}

/// The mappings of a `/proc/<pid>/maps` text. procfs parses each line on its own, so that a
/// line it cannot read (not UTF-8, truncated, or one [`maps_line_shape_ok`] refuses) is skipped
/// rather than losing the whole table. On its own, a line can also never be taken for an smaps
/// `Key: value kB` attribute of the mapping before it, whose value procfs multiplies by 1024
/// unchecked (an overflow panic in debug builds).
pub fn memory_maps(maps: &[u8]) -> impl Iterator<Item = procfs::process::MemoryMap> + '_ {
    use procfs::FromRead as _;
    maps.split(|&b| b == b'\n').filter_map(|line| {
        let line = std::str::from_utf8(line).ok()?;
        if !maps_line_shape_ok(line) {
            return None;
        }
        procfs::process::MemoryMaps::from_read(line.as_bytes())
            .ok()?
            .into_iter()
            .next()
    })
}

/// The files a `/proc/<pid>/maps` text maps, without the " (deleted)" the kernel appends to
/// a replaced file (the path is then that of its replacement, which is what can be opened).
fn mapped_files(maps: &[u8]) -> impl Iterator<Item = PathBuf> + '_ {
    use procfs::process::MMapPath;
    memory_maps(maps).filter_map(|map| {
        let MMapPath::Path(path) = map.pathname else {
            return None;
        };
        match path.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            Some(replaced) => Some(PathBuf::from(replaced)),
            None => Some(path),
        }
    })
}

/// Whether one `maps` line has the shape procfs's parser reads without panicking: it slices
/// the pathnames `[stack:TID]` and `/SYSVKEY…` at byte offsets (procfs-core 0.18,
/// `MMapPath::from`), which panics on a short `/SYSV` name or on a multi-byte character at an
/// offset. A kernel writes neither; a `--proc-root` of unknown origin might.
fn maps_line_shape_ok(line: &str) -> bool {
    match line.splitn(6, ' ').nth(5).map(str::trim) {
        Some(path) if path.starts_with("[stack:") => path.get(1..path.len() - 1).is_some(),
        Some(path) if path.starts_with("/SYSV") => path.get(5..13).is_some(),
        _ => true,
    }
}

/// OpenSSL's TLS library by its file name: `libssl.so.3`, `libssl.so.1.1`.
fn is_libssl(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|name| name.starts_with("libssl.so"))
}

/// A C library by its file name: `libc.so.6`, or glibc's old `libc-2.31.so`.
fn is_libc(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.starts_with("libc.so") || (name.starts_with("libc-") && name.ends_with(".so"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIBC: &str = "7f3c1e84e000-7f3c1e9a3000 r-xp 00026000 08:01 5678                       /usr/lib/x86_64-linux-gnu/libc.so.6";

    /// Process 100 with the given maps and no exe (so that the maps are read).
    fn with_maps(maps: &[u8]) -> (tempfile::TempDir, ProcRoot) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("100")).unwrap();
        std::fs::write(dir.path().join("100/maps"), maps).unwrap();
        let proc = ProcRoot::new(dir.path());
        (dir, proc)
    }

    fn mapped_libc(proc: &ProcRoot) -> Option<PathBuf> {
        let root = proc.path().join("100/root");
        Some(proc.libc_path(100)?.strip_prefix(root).ok()?.to_path_buf())
    }

    #[test]
    fn the_mapped_libc_is_found_in_the_fixture_maps() {
        let fixture = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/proc/100/maps"
        ))
        .unwrap();
        let (_dir, proc) = with_maps(&fixture);
        assert_eq!(
            mapped_libc(&proc).as_deref(),
            Some(Path::new("usr/lib/x86_64-linux-gnu/libc.so.6"))
        );
        let files: Vec<PathBuf> = mapped_files(&fixture).collect();
        assert_eq!(files.len(), 11, "{files:?}");
        // Old glibc names, and a libc replaced on disk since it was mapped.
        for (line, expected) in [
            (
                "7f0000000000-7f0000001000 r-xp 00000000 08:01 9 /lib/x86_64-linux-gnu/libc-2.31.so",
                "lib/x86_64-linux-gnu/libc-2.31.so",
            ),
            (
                "7f0000000000-7f0000001000 r-xp 00000000 08:01 9   /usr/lib/libc.so.6 (deleted)",
                "usr/lib/libc.so.6",
            ),
        ] {
            let (_dir, proc) = with_maps(line.as_bytes());
            assert_eq!(mapped_libc(&proc).as_deref(), Some(Path::new(expected)));
        }
    }

    /// Lines procfs's maps parser would panic on (a pathname it slices at byte offsets), or
    /// that it cannot read, are skipped one by one: the libc line after them is still found.
    #[test]
    fn malformed_maps_lines_are_skipped_not_fatal() {
        let bad: [&[u8]; 14] = [
            b"7f0000000000-7f0000001000 rw-p 00000000 00:00 0 [stack:\xc3\xa9",
            b"7f0000000000-7f0000001000 rw-p 00000000 00:00 0 [stack:1\xc3\xa9",
            b"7f0000000000-7f0000001000 rw-s 00000000 00:01 0 /SYSV1",
            b"7f0000000000-7f0000001000 rw-s 00000000 00:01 0 /SYSV0000000\xc3\xa9 (deleted)",
            // An smaps attribute line, which procfs multiplies by 1024 unchecked (it is read
            // on its own here, with no mapping for it to belong to).
            b"Size: 99999999999999999999 kB",
            b"Rss: 18446744073709551615 kB",
            // Truncated, not hex, not UTF-8, empty.
            b"7f0000000000-7f0000001000 r-xp 00000000 08:01",
            b"7f0000000000 r-xp 00000000 08:01 5678 /usr/lib/libc.so.6",
            b"zz0000000000-7f0000001000 r-xp 00000000 08:01 5678 /usr/lib/libc.so.6",
            b"7f0000000000-7f0000001000 r-xp 0000000g 08:01 5678 /usr/lib/libc.so.6",
            b"7f0000000000-7f0000001000 r-xp 00000000 08:01 -1 /usr/lib/libc.so.6",
            b"7f0000000000-7f0000001000 r-xp 00000000 08:01 5678 /usr/lib/\xff/libc.so.6",
            b"",
            b"\n\n",
        ];
        for line in bad {
            let maps = [line, b"\n", LIBC.as_bytes(), b"\n"].concat();
            let (_dir, proc) = with_maps(&maps);
            assert_eq!(
                mapped_libc(&proc).as_deref(),
                Some(Path::new("usr/lib/x86_64-linux-gnu/libc.so.6")),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        assert!(!maps_line_shape_ok(
            "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 [stack:\u{e9}"
        ));
        assert!(!maps_line_shape_ok(
            "7f0000000000-7f0000001000 rw-s 00000000 00:01 0 /SYSV1"
        ));
        assert!(maps_line_shape_ok(
            "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 [stack:123]"
        ));
        assert!(maps_line_shape_ok(
            "7f0000000000-7f0000001000 rw-s 00000000 00:01 32769 /SYSV0000162e (deleted)"
        ));
        assert!(maps_line_shape_ok(LIBC));
        // Unreadable maps: no libc, as before.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ProcRoot::new(dir.path()).libc_path(100), None);
    }

    #[test]
    fn executables_are_classified_by_their_elf_headers() {
        // This test binary is a dynamically linked Rust program.
        assert_eq!(
            exe_kind(&std::env::current_exe().unwrap()).unwrap(),
            ExeKind::Dynamic
        );
        let script = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(script.path(), b"#!/bin/sh\n").unwrap();
        assert!(exe_kind(script.path()).is_err(), "not an ELF file");
        assert!(exe_kind(Path::new("/nonexistent")).is_err());
    }

    #[test]
    fn symbols_of_a_real_elf() {
        let me = std::env::current_exe().unwrap();
        // This test binary defines main, not Redis's functions.
        let found = defined_symbols(&me, &["main", "processCommand"])
            .unwrap()
            .expect("a symbol table");
        assert!(!found.contains("processCommand"));
        let text = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(text.path(), b"#!/bin/sh\n").unwrap();
        assert!(defined_symbols(text.path(), &["main"]).is_err());
        if let Ok(redis) = std::fs::canonicalize("/usr/bin/redis-server") {
            let found = defined_symbols(&redis, &crate::rules::SERVER_SYMBOLS)
                .unwrap()
                .unwrap();
            assert_eq!(found.len(), 2, "{}: {found:?}", redis.display());
        }
    }
}
