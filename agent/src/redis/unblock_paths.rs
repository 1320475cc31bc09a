//! Whether every unblock of a Redis build goes through the exported `unblockClient`, read from
//! its machine code.
//!
//! Redis 7.2+ is built with `-flto`. In an upstream 7.4.1 build, GCC made an unexported copy of
//! `unblockClient` with `queue_for_reprocessing = 1` folded in (`unblockClient.constprop.0`)
//! and sent 29 of the 31 call sites to it: timeouts, disconnects (`freeClient`), CLIENT
//! UNBLOCK, role changes. A probe on the exported symbol then sees only the clients a key
//! woke. The copy has no symbol in a stripped binary, but two exported functions whose source
//! ends in `unblockClient(c, 1)` still exist there, `unblockClientOnError` and
//! `unblockClientOnTimeout`, and both end by jumping into it. Where both reach the same
//! unnamed function, and that function reads the client's block type at the same offset as
//! the exported `unblockClient` does first thing, it is that copy, and it gets the probe too.
//! (See ../shared/REDIS-INTERNALS.md.)

use std::collections::{BTreeMap, BTreeSet};

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, OpKind, Register};
use object::{Object, ObjectSection, ObjectSymbol};

/// The exported functions whose source ends in `unblockClient(c, 1)` (7.2+).
pub const UNBLOCK_WRAPPERS: [&str; 2] = ["unblockClientOnError", "unblockClientOnTimeout"];

/// How the unblocks of a build can be seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnblockCoverage {
    /// Through the exported `unblockClient`: its wrappers call it, or the build has none to
    /// check (6.x, 7.0; a bypass there is still caught at run time).
    Exported,
    /// Through the exported `unblockClient` and the compiler's copy of it at `file_offset`.
    Clone { address: u64, file_offset: u64 },
    /// The wrappers end somewhere else: unblocks would be missed.
    Bypassed(String),
}

/// A defined function in the symbol tables: start and size.
#[derive(Clone, Copy, Debug)]
struct Function {
    address: u64,
    size: u64,
}

/// Branches out of one function: direct calls and jumps whose target lies outside it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Exits {
    pub targets: BTreeSet<u64>,
}

/// Decodes `code`, loaded at `address`, and collects the targets of its direct calls and of
/// its jumps that leave it (tail calls).
pub fn exits(code: &[u8], address: u64) -> Exits {
    let end = address + code.len() as u64;
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    let mut out = Exits::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        if instruction.code() == Code::INVALID {
            break;
        }
        let direct = instruction.op0_kind() == OpKind::NearBranch64;
        match instruction.flow_control() {
            FlowControl::Call if direct => {
                out.targets.insert(instruction.near_branch_target());
            }
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch if direct => {
                let target = instruction.near_branch_target();
                if !(address..end).contains(&target) {
                    out.targets.insert(target);
                }
            }
            _ => {}
        }
    }
    out
}

/// The displacement of the first load from `[rdi + disp]` in the first instructions of a
/// function: in `unblockClient` and its copies that is `c->bstate.btype`.
pub fn first_client_field(code: &[u8], address: u64) -> Option<i64> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    for _ in 0..16 {
        if !decoder.can_decode() {
            return None;
        }
        decoder.decode_out(&mut instruction);
        if instruction.code() == Code::INVALID {
            return None;
        }
        let reads_rdi_field = (0..instruction.op_count()).any(|i| {
            instruction.op_kind(i) == OpKind::Memory
                && instruction.memory_base() == Register::RDI
                && instruction.memory_index() == Register::None
        });
        if reads_rdi_field {
            return Some(instruction.memory_displacement64() as i64);
        }
    }
    None
}

/// Reads the symbol tables and decides how unblocks can be seen in `file`.
pub fn unblock_coverage(file: &object::File<'_>) -> UnblockCoverage {
    let mut functions: BTreeMap<String, Function> = BTreeMap::new();
    let mut starts: BTreeSet<u64> = BTreeSet::new();
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        if !symbol.is_definition() || symbol.kind() != object::SymbolKind::Text {
            continue;
        }
        starts.insert(symbol.address());
        if let Ok(name) = symbol.name() {
            functions.entry(name.to_string()).or_insert(Function {
                address: symbol.address(),
                size: symbol.size(),
            });
        }
    }
    let Some(exported) = functions.get("unblockClient").copied() else {
        return UnblockCoverage::Exported;
    };
    let wrappers: Vec<(&str, Function)> = UNBLOCK_WRAPPERS
        .iter()
        .filter_map(|name| Some((*name, *functions.get(*name)?)))
        .collect();
    if wrappers.is_empty() {
        return UnblockCoverage::Exported;
    }
    let code = |f: Function| code_at(file, f.address, f.size);
    // Per wrapper: does it reach the exported function, and which unnamed functions it reaches.
    let mut reaches_exported = false;
    let mut common_unnamed: Option<BTreeSet<u64>> = None;
    for (name, wrapper) in &wrappers {
        let Some(bytes) = code(*wrapper) else {
            return UnblockCoverage::Bypassed(format!("the code of {name} cannot be read"));
        };
        let exits = exits(bytes, wrapper.address);
        reaches_exported |= exits.targets.contains(&exported.address);
        let unnamed: BTreeSet<u64> = exits
            .targets
            .iter()
            .copied()
            .filter(|t| !starts.contains(t))
            .collect();
        common_unnamed = Some(match common_unnamed {
            None => unnamed,
            Some(before) => before.intersection(&unnamed).copied().collect(),
        });
    }
    if reaches_exported {
        return UnblockCoverage::Exported;
    }
    let candidates: Vec<u64> = common_unnamed.unwrap_or_default().into_iter().collect();
    let [clone] = candidates.as_slice() else {
        return UnblockCoverage::Bypassed(format!(
            "{} do not call unblockClient, and no single copy of it was found ({} candidates)",
            UNBLOCK_WRAPPERS.join(" and "),
            candidates.len()
        ));
    };
    let field =
        |address: u64| code_at(file, address, 96).and_then(|c| first_client_field(c, address));
    let (theirs, ours) = (field(exported.address), field(*clone));
    if theirs.is_none() || theirs != ours {
        return UnblockCoverage::Bypassed(format!(
            "the function at {clone:#x} that {} end in does not look like unblockClient",
            UNBLOCK_WRAPPERS.join(" and ")
        ));
    }
    match file_offset_of(file, *clone) {
        Some(file_offset) => UnblockCoverage::Clone {
            address: *clone,
            file_offset,
        },
        None => UnblockCoverage::Bypassed(format!("no file offset for {clone:#x}")),
    }
}

/// `length` bytes of code at virtual `address` (fewer at the end of its section).
fn code_at<'data>(file: &object::File<'data>, address: u64, length: u64) -> Option<&'data [u8]> {
    let section = file
        .sections()
        .find(|s| (s.address()..s.address() + s.size()).contains(&address))?;
    let available = section.address() + section.size() - address;
    section
        .data_range(address, length.min(available))
        .ok()
        .flatten()
}

/// Where virtual `address` is in the file: what a uprobe is attached at.
fn file_offset_of(file: &object::File<'_>, address: u64) -> Option<u64> {
    let section = file
        .sections()
        .find(|s| (s.address()..s.address() + s.size()).contains(&address))?;
    let (offset, _) = section.file_range()?;
    Some(address - section.address() + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `unblockClientOnError` of the upstream 7.4.1 build (../shared/redis-builds), at 0x17cf90:
    /// it calls addReplyError and updateStatsOnUnblock, then tail-jumps into the copy at
    /// 0x1ff190.
    const ON_ERROR_741: &[u8] = &[
        0x55, 0x48, 0x89, 0xe5, 0x53, 0x48, 0x89, 0xfb, 0x48, 0x83, 0xec, 0x08, 0x48, 0x85, 0xf6,
        0x74, 0x05, 0xe8, 0x2a, 0x15, 0xf4, 0xff, 0xb9, 0x01, 0x00, 0x00, 0x00, 0x31, 0xd2, 0x31,
        0xf6, 0x48, 0x89, 0xdf, 0xe8, 0xd9, 0xfd, 0xff, 0xff, 0x48, 0x8b, 0x43, 0x08, 0xa9, 0x00,
        0x00, 0x00, 0x40, 0x74, 0x0a, 0x48, 0x25, 0xff, 0xff, 0xff, 0xbf, 0x48, 0x89, 0x43, 0x08,
        0x48, 0x89, 0xdf, 0x48, 0x8b, 0x5d, 0xf8, 0xc9, 0xe9, 0xb7, 0x21, 0x08, 0x00,
    ];

    #[test]
    fn the_exits_of_a_real_wrapper_are_its_calls_and_its_tail_jump() {
        let exits = exits(ON_ERROR_741, 0x17cf90);
        assert_eq!(
            exits.targets,
            BTreeSet::from([0xbe4d0, 0x17cd90, 0x1ff190]),
            "addReplyError, updateStatsOnUnblock, the copy of unblockClient"
        );
    }

    #[test]
    fn the_first_client_field_is_the_block_type_load() {
        // push %rbp; mov %rsp,%rbp; push %rbx; mov %rdi,%rbx; sub $0x18,%rsp;
        // mov 0x1d0(%rdi),%eax
        let code = [
            0x55, 0x48, 0x89, 0xe5, 0x53, 0x48, 0x89, 0xfb, 0x48, 0x83, 0xec, 0x18, 0x8b, 0x87,
            0xd0, 0x01, 0x00, 0x00,
        ];
        assert_eq!(first_client_field(&code, 0x1000), Some(0x1d0));
        assert_eq!(first_client_field(&[0xc3], 0x1000), None);
        assert_eq!(first_client_field(&[], 0x1000), None);
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        for _ in 0..2000 {
            let code: Vec<u8> = (0..64)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = exits(&code, 0x400000);
            let _ = first_client_field(&code, 0x400000);
        }
    }
}
