//! Offsets of kernel struct fields, read from the kernel's own BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The scheduler program reads two of the kernel's own counters from the task being switched
//! out (see [`TaskCounterOffsets`]). `task_struct`'s layout differs between kernel builds, and
//! eBPF programs written in Rust get no CO-RE relocations, so the agent finds the offsets here
//! and hands them to the program through a map.
//!
//! Only what that needs is parsed: the type section's records (to walk them by id), struct and
//! union members, typedefs and qualifiers (to reach a member's type) and integer sizes.

use std::borrow::Cow;

const BTF_MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const TYPE_RECORD_LEN: usize = 12;

// BTF kinds (include/uapi/linux/btf.h).
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("not BTF data: {0}")]
    Format(String),
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {structure} has no member {member}")]
    NoMember { structure: String, member: String },
    #[error("{path} is a bitfield or not a {size}-byte integer")]
    NotAnInteger { path: String, size: u32 },
}

/// One type record: its kind, name, size-or-type word and kind-specific data.
struct TypeRecord<'a> {
    kind: u32,
    kind_flag: bool,
    name_off: u32,
    vlen: usize,
    size_or_type: u32,
    extra: &'a [u8],
}

/// A parsed BTF blob: its type records by id (id 0 is void) and its string section.
pub struct Btf<'a> {
    types: Vec<TypeRecord<'a>>,
    strings: &'a [u8],
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

/// Bytes of kind-specific data after a type record of `kind` with `vlen` entries.
fn extra_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        _ => return None,
    })
}

impl<'a> Btf<'a> {
    /// Parses a little-endian BTF blob (what this kernel exposes; x86-64 and arm64 are LE).
    pub fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        let bad = |what: &str| BtfError::Format(what.to_string());
        if data.len() < HEADER_LEN {
            return Err(bad("shorter than its header"));
        }
        if u16::from_le_bytes([data[0], data[1]]) != BTF_MAGIC {
            return Err(bad("bad magic (or big-endian)"));
        }
        let field = |at| {
            u32_at(data, at)
                .map(|v| v as usize)
                .ok_or_else(|| bad("header"))
        };
        let header_len = field(4)?;
        let (type_off, type_len) = (field(8)?, field(12)?);
        let (str_off, str_len) = (field(16)?, field(20)?);
        let section = |off: usize, len: usize| {
            let start = header_len.checked_add(off)?;
            data.get(start..start.checked_add(len)?)
        };
        let type_data =
            section(type_off, type_len).ok_or_else(|| bad("type section out of bounds"))?;
        let strings =
            section(str_off, str_len).ok_or_else(|| bad("string section out of bounds"))?;
        let mut types = vec![TypeRecord {
            kind: 0,
            kind_flag: false,
            name_off: 0,
            vlen: 0,
            size_or_type: 0,
            extra: &[],
        }];
        let mut at = 0;
        while at < type_data.len() {
            let (Some(name_off), Some(info), Some(size_or_type)) = (
                u32_at(type_data, at),
                u32_at(type_data, at + 4),
                u32_at(type_data, at + 8),
            ) else {
                return Err(bad("truncated type record"));
            };
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let len = extra_len(kind, vlen).ok_or_else(|| bad(&format!("unknown kind {kind}")))?;
            let start = at + TYPE_RECORD_LEN;
            let extra = type_data
                .get(start..start + len)
                .ok_or_else(|| bad("truncated type data"))?;
            types.push(TypeRecord {
                kind,
                kind_flag: info >> 31 == 1,
                name_off,
                vlen,
                size_or_type,
                extra,
            });
            at = start + len;
        }
        Ok(Self { types, strings })
    }

    fn name(&self, offset: u32) -> Cow<'a, str> {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        String::from_utf8_lossy(&rest[..end])
    }

    /// The id of the struct named `name` that has members (not a forward declaration).
    fn struct_id(&self, name: &str) -> Option<u32> {
        (1..self.types.len() as u32).find(|&id| {
            let t = &self.types[id as usize];
            t.kind == KIND_STRUCT && t.vlen > 0 && self.name(t.name_off) == name
        })
    }

    /// `id` with typedefs and qualifiers taken off.
    fn resolved(&self, mut id: u32) -> Option<&TypeRecord<'a>> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// (type id, bit offset, bitfield size) of the member `name` of the struct or union `t`,
    /// looking into anonymous struct and union members as C does.
    fn member(&self, t: &TypeRecord<'a>, name: &str, depth: u32) -> Option<(u32, u64, u32)> {
        if depth > 8 || !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for m in t.extra.chunks_exact(12).take(t.vlen) {
            let (name_off, type_id, offset) = (u32_at(m, 0)?, u32_at(m, 4)?, u32_at(m, 8)?);
            let (bit_offset, bitfield) = if t.kind_flag {
                (u64::from(offset & 0x00ff_ffff), offset >> 24)
            } else {
                (u64::from(offset), 0)
            };
            if name_off == 0 {
                let inner = self.resolved(type_id)?;
                if let Some((id, bits, size)) = self.member(inner, name, depth + 1) {
                    return Some((id, bit_offset + bits, size));
                }
            } else if self.name(name_off) == name {
                return Some((type_id, bit_offset, bitfield));
            }
        }
        None
    }

    /// Byte offset of `path` (members, outermost first) in struct `structure`, checked to be
    /// a whole `size`-byte integer.
    pub fn integer_offset(
        &self,
        structure: &str,
        path: &[&str],
        size: u32,
    ) -> Result<u32, BtfError> {
        let id = self
            .struct_id(structure)
            .ok_or_else(|| BtfError::NoStruct(structure.to_string()))?;
        let mut t = &self.types[id as usize];
        let mut bits = 0u64;
        let mut last_bitfield = 0;
        for (i, member) in path.iter().enumerate() {
            let (type_id, offset, bitfield) =
                self.member(t, member, 0)
                    .ok_or_else(|| BtfError::NoMember {
                        structure: if i == 0 {
                            structure.to_string()
                        } else {
                            path[..i].join(".")
                        },
                        member: member.to_string(),
                    })?;
            bits += offset;
            last_bitfield = bitfield;
            t = self.resolved(type_id).ok_or_else(|| {
                BtfError::Format(format!("type {type_id} of {member} out of range"))
            })?;
        }
        // An int's data word: its width in bits (0-7) and its bit offset (16-23), which a
        // struct without kind_flag uses for bitfields.
        let int_data = u32_at(t.extra, 0).unwrap_or(0);
        let whole = t.kind == KIND_INT
            && t.size_or_type == size
            && int_data & 0xff == size * 8
            && (int_data >> 16) & 0xff == 0
            && last_bitfield == 0;
        if !whole || bits % 8 != 0 {
            return Err(BtfError::NotAnInteger {
                path: format!("{structure}.{}", path.join(".")),
                size,
            });
        }
        u32::try_from(bits / 8).map_err(|_| BtfError::Format("offset too large".into()))
    }
}

/// Where the scheduler program finds, in the task being switched out, the kernel's own
/// counters of its CPU time, of its time waiting for a CPU and of its arrivals on a CPU: the
/// figures `/proc/<pid>/task/<tid>/schedstat` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskCounterOffsets {
    /// `task_struct.se.sum_exec_runtime`: nanoseconds on a CPU, brought up to date by the
    /// scheduler before `sched_switch` fires.
    pub cpu_ns: u32,
    /// `task_struct.sched_info.pcount`, arrivals on a CPU; `sched_info.run_delay`, nanoseconds
    /// runnable but waiting, follows it (checked), so that one read gets both.
    pub arrivals_then_run_delay: u32,
}

impl TaskCounterOffsets {
    pub const KERNEL_BTF: &'static str = "/sys/kernel/btf/vmlinux";

    pub fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let arrivals = btf.integer_offset("task_struct", &["sched_info", "pcount"], 8)?;
        let run_delay = btf.integer_offset("task_struct", &["sched_info", "run_delay"], 8)?;
        if run_delay != arrivals + 8 {
            return Err(BtfError::Format(format!(
                "sched_info.run_delay at {run_delay} does not follow sched_info.pcount at {arrivals}"
            )));
        }
        Ok(Self {
            cpu_ns: btf.integer_offset("task_struct", &["se", "sum_exec_runtime"], 8)?,
            arrivals_then_run_delay: arrivals,
        })
    }

    /// From the running kernel's BTF.
    pub fn of_running_kernel() -> Result<Self, BtfError> {
        let data = std::fs::read(Self::KERNEL_BTF).map_err(|e| BtfError::Read {
            path: Self::KERNEL_BTF.to_string(),
            message: e.to_string(),
        })?;
        Self::from_btf(&Btf::parse(&data)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF blobs for the tests: types are added in order, ids from 1.
    #[derive(Default)]
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        count: u32,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                strings: vec![0],
                ..Default::default()
            }
        }
        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let at = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            at
        }
        fn record(&mut self, name: &str, kind: u32, kind_flag: bool, vlen: u32, word: u32) -> u32 {
            let name = self.string(name);
            let info = (kind << 24) | vlen | if kind_flag { 1 << 31 } else { 0 };
            for v in [name, info, word] {
                self.types.extend_from_slice(&v.to_le_bytes());
            }
            self.count += 1;
            self.count
        }
        fn int(&mut self, name: &str, size: u32) -> u32 {
            let id = self.record(name, KIND_INT, false, 0, size);
            self.types.extend_from_slice(&(size * 8).to_le_bytes());
            id
        }
        /// An int of `size` bytes whose data says `bits` wide at bit `offset`: how a struct
        /// without kind_flag describes a bitfield.
        fn int_bits(&mut self, name: &str, size: u32, bits: u32, offset: u32) -> u32 {
            let id = self.record(name, KIND_INT, false, 0, size);
            self.types
                .extend_from_slice(&(bits | offset << 16).to_le_bytes());
            id
        }
        fn typedef(&mut self, name: &str, of: u32) -> u32 {
            self.record(name, KIND_TYPEDEF, false, 0, of)
        }
        fn ptr(&mut self, to: u32) -> u32 {
            self.record("", KIND_PTR, false, 0, to)
        }
        fn fwd(&mut self, name: &str) -> u32 {
            self.record(name, KIND_FWD, false, 0, 0)
        }
        fn enumeration(&mut self, name: &str, values: &[&str]) -> u32 {
            let id = self.record(name, KIND_ENUM, false, values.len() as u32, 4);
            for (i, v) in values.iter().enumerate() {
                let n = self.string(v);
                self.types.extend_from_slice(&n.to_le_bytes());
                self.types.extend_from_slice(&(i as u32).to_le_bytes());
            }
            id
        }
        /// Members as (name, type, bit offset, bitfield size); a bitfield makes it kind_flag.
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let flag = members.iter().any(|m| m.3 != 0);
            let id = self.record(name, kind, flag, members.len() as u32, size);
            for &(m, ty, bits, bitfield) in members {
                let n = self.string(m);
                let offset = if flag { bits | (bitfield << 24) } else { bits };
                for v in [n, ty, offset] {
                    self.types.extend_from_slice(&v.to_le_bytes());
                }
            }
            id
        }
        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for v in [
                HEADER_LEN as u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A small kernel-like layout: task_struct { int state; (anonymous union { ... }) ;
    /// struct sched_entity se at 64; ...; struct sched_info sched_info at 256 } with typedefs
    /// in the way, a forward declaration first and unrelated kinds around.
    fn kernel_like() -> Vec<u8> {
        let mut b = Builder::new();
        b.fwd("task_struct");
        let int = b.int("int", 4);
        let ull = b.int("long long unsigned int", 8);
        let u64_t = b.typedef("u64", ull);
        b.enumeration("state", &["RUNNING", "SLEEPING"]);
        let entity = b.composite(
            KIND_STRUCT,
            "sched_entity",
            128,
            &[
                ("load", int, 0, 0),
                ("exec_start", u64_t, 64, 0),
                ("sum_exec_runtime", u64_t, 128, 0),
            ],
        );
        let info = b.composite(
            KIND_STRUCT,
            "sched_info",
            32,
            &[
                ("pcount", ull, 0, 0),
                ("run_delay", ull, 64, 0),
                ("flags", int, 128, 3),
            ],
        );
        let anon = b.composite(KIND_UNION, "", 8, &[("a", int, 0, 0), ("b", ull, 0, 0)]);
        let task = b.composite(
            KIND_STRUCT,
            "task_struct",
            512,
            &[
                ("state", int, 0, 0),
                ("", anon, 64, 0),
                ("se", entity, 512, 0),
                ("sched_info", info, 2048, 0),
            ],
        );
        b.ptr(task);
        b.build()
    }

    #[test]
    fn finds_nested_and_anonymous_members_through_typedefs() {
        let data = kernel_like();
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(
            TaskCounterOffsets::from_btf(&btf).unwrap(),
            TaskCounterOffsets {
                cpu_ns: 64 + 16,
                arrivals_then_run_delay: 256
            }
        );
        // A member of an anonymous union is found as C finds it.
        assert_eq!(btf.integer_offset("task_struct", &["b"], 8), Ok(8));
    }

    #[test]
    fn refuses_what_is_not_a_whole_integer_of_the_size() {
        let data = kernel_like();
        let btf = Btf::parse(&data).unwrap();
        // A struct, a 4-byte int, a bitfield.
        assert!(matches!(
            btf.integer_offset("task_struct", &["se"], 8),
            Err(BtfError::NotAnInteger { .. })
        ));
        assert!(matches!(
            btf.integer_offset("task_struct", &["state"], 8),
            Err(BtfError::NotAnInteger { .. })
        ));
        assert!(matches!(
            btf.integer_offset("task_struct", &["sched_info", "flags"], 4),
            Err(BtfError::NotAnInteger { .. })
        ));
        assert_eq!(
            btf.integer_offset("task_struct", &["se", "vruntime"], 8),
            Err(BtfError::NoMember {
                structure: "se".into(),
                member: "vruntime".into()
            })
        );
        assert_eq!(
            btf.integer_offset("mm_struct", &["x"], 8),
            Err(BtfError::NoStruct("mm_struct".into()))
        );
    }

    #[test]
    fn a_bitfield_described_by_its_int_type_is_refused() {
        let mut b = Builder::new();
        let narrow = b.int_bits("long long unsigned int", 8, 3, 0);
        let shifted = b.int_bits("long long unsigned int", 8, 64, 8);
        b.composite(
            KIND_STRUCT,
            "task_struct",
            16,
            &[("narrow", narrow, 0, 0), ("shifted", shifted, 64, 0)],
        );
        let data = b.build();
        let btf = Btf::parse(&data).unwrap();
        for member in ["narrow", "shifted"] {
            assert!(
                matches!(
                    btf.integer_offset("task_struct", &[member], 8),
                    Err(BtfError::NotAnInteger { .. })
                ),
                "{member}"
            );
        }
    }

    #[test]
    fn run_delay_must_follow_the_arrival_count() {
        let mut b = Builder::new();
        let ull = b.int("long long unsigned int", 8);
        let entity = b.composite(
            KIND_STRUCT,
            "sched_entity",
            8,
            &[("sum_exec_runtime", ull, 0, 0)],
        );
        let info = b.composite(
            KIND_STRUCT,
            "sched_info",
            24,
            &[
                ("pcount", ull, 0, 0),
                ("last_arrival", ull, 64, 0),
                ("run_delay", ull, 128, 0),
            ],
        );
        b.composite(
            KIND_STRUCT,
            "task_struct",
            64,
            &[("se", entity, 0, 0), ("sched_info", info, 64, 0)],
        );
        let data = b.build();
        let btf = Btf::parse(&data).unwrap();
        assert!(
            matches!(TaskCounterOffsets::from_btf(&btf), Err(BtfError::Format(m)) if m.contains("does not follow"))
        );
    }

    #[test]
    fn cut_or_garbled_data_is_an_error_never_a_panic() {
        let data = kernel_like();
        for len in 0..data.len() {
            let _ = Btf::parse(&data[..len]).and_then(|b| TaskCounterOffsets::from_btf(&b));
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut garbled = data.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = HEADER_LEN + (seed as usize) % (data.len() - HEADER_LEN);
                garbled[at] = (seed >> 32) as u8;
            }
            let _ = Btf::parse(&garbled).and_then(|b| TaskCounterOffsets::from_btf(&b));
        }
        assert!(matches!(
            Btf::parse(b"not btf at all, not at all"),
            Err(BtfError::Format(_))
        ));
    }

    /// On a kernel that exposes its BTF, the offsets are found and lie inside task_struct.
    #[test]
    fn the_running_kernel_has_both_counters() {
        if !std::path::Path::new(TaskCounterOffsets::KERNEL_BTF).exists() {
            eprintln!(
                "SKIPPED: {} does not exist on this machine",
                TaskCounterOffsets::KERNEL_BTF
            );
            return;
        }
        let offsets = TaskCounterOffsets::of_running_kernel().unwrap();
        for offset in [offsets.cpu_ns, offsets.arrivals_then_run_delay] {
            assert!(
                offset > 0 && offset < 16384 && offset % 8 == 0,
                "{offsets:?}"
            );
        }
        assert_ne!(offsets.cpu_ns, offsets.arrivals_then_run_delay);
    }
}
