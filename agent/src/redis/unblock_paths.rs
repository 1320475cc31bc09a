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

use std::collections::BTreeSet;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind, Register};

use super::machine_code::{
    branches_to, code_at, exits, file_offset_of, BranchesTo, Function, Functions,
};

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
pub fn unblock_coverage(file: &object::File<'_>, functions: &Functions) -> UnblockCoverage {
    let starts = functions.starts();
    let Some(exported) = functions.get("unblockClient") else {
        return UnblockCoverage::Exported;
    };
    let wrappers: Vec<(&str, Function)> = UNBLOCK_WRAPPERS
        .iter()
        .filter_map(|name| Some((*name, functions.get(name)?)))
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

/// Where `client->bstate` is, as `blockClient` writes the block type into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BstateAt {
    /// Embedded in `struct client` at this offset (Redis 7.2 to 8.x, Valkey 8.0).
    Embedded(u32),
    /// Allocated apart, its pointer at this offset in `struct client` (Valkey 8.1+).
    Pointer(u32),
}

/// Reads `c->bstate.btype = btype` in `blockClient`'s machine code: the first store of its
/// second argument (`esi`, or a copy of it) to memory reached through the client pointer
/// (`rdi`, or a copy of it), directly or through a pointer loaded from it.
pub fn bstate_in_block_client(code: &[u8], address: u64) -> Option<BstateAt> {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    let mut client = vec![Register::RDI];
    let mut btype = vec![Register::ESI, Register::RSI];
    // Registers loaded from [client + disp]: candidate pointers to the blocking state.
    let mut loaded: Vec<(Register, u32)> = Vec::new();
    for _ in 0..40 {
        if !decoder.can_decode() {
            return None;
        }
        decoder.decode_out(&mut instruction);
        let code = instruction.code();
        if code == Code::INVALID {
            return None;
        }
        let two_registers = instruction.op_count() == 2
            && instruction.op0_kind() == OpKind::Register
            && instruction.op1_kind() == OpKind::Register;
        match code {
            // mov %rdi,%rbx
            Code::Mov_rm64_r64 | Code::Mov_r64_rm64
                if two_registers && client.contains(&instruction.op1_register()) =>
            {
                client.push(instruction.op0_register());
            }
            // mov %esi,%r12d / movslq %esi,%r12
            Code::Mov_rm32_r32 | Code::Mov_r32_rm32 | Code::Movsxd_r64_rm32
                if two_registers && btype.contains(&instruction.op1_register()) =>
            {
                let to = instruction.op0_register();
                btype.push(to);
                btype.push(to.full_register32());
                btype.push(to.full_register());
            }
            // mov 0xb0(%rbx),%rax: maybe the pointer to the blocking state.
            Code::Mov_r64_rm64
                if instruction.op1_kind() == OpKind::Memory
                    && client.contains(&instruction.memory_base())
                    && instruction.memory_index() == Register::None =>
            {
                if let Ok(disp) = u32::try_from(instruction.memory_displacement64()) {
                    loaded.push((instruction.op0_register(), disp));
                }
            }
            // mov %esi,disp(%rbx) or mov %r12d,(%rax)
            Code::Mov_rm32_r32
                if instruction.op0_kind() == OpKind::Memory
                    && btype.contains(&instruction.op1_register())
                    && instruction.memory_index() == Register::None =>
            {
                let base = instruction.memory_base();
                let disp = instruction.memory_displacement64();
                if client.contains(&base) {
                    return u32::try_from(disp).ok().map(BstateAt::Embedded);
                }
                if disp == 0 {
                    if let Some((_, at)) = loaded.iter().rev().find(|(r, _)| *r == base) {
                        return Some(BstateAt::Pointer(*at));
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// Where `client->bstate` is in this binary (7.2+), from `blockClient`'s store of the block
/// type, confirmed by `unblockClient`'s first read of the client (the block type, or the
/// pointer to the blocking state). `None` when either is missing or they disagree.
pub fn bstate_offset(file: &object::File<'_>, functions: &Functions) -> Option<BstateAt> {
    let block_client = functions.get("blockClient")?;
    let at = bstate_in_block_client(
        code_at(file, block_client.address, block_client.size.clamp(1, 256))?,
        block_client.address,
    )?;
    let unblock = functions.get("unblockClient")?;
    let read = first_client_field(code_at(file, unblock.address, 96)?, unblock.address)?;
    let offset = match at {
        BstateAt::Embedded(o) | BstateAt::Pointer(o) => o,
    };
    (i64::from(offset) == read && offset > 0).then_some(at)
}

/// Where the "re-processing a command" flag is: `blockForKeys` tests it before anything else
/// it reads from the client (`if (!(c->flags & CLIENT_REPROCESSING_COMMAND))`), with a
/// `test` of one byte through the client pointer. Returns (byte offset, mask).
pub fn reprocessing_flag(file: &object::File<'_>, functions: &Functions) -> Option<(u32, u32)> {
    let Function { address, size } = functions.get("blockForKeys")?;
    let code = code_at(file, address, size.clamp(1, 192))?;
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    let mut client = vec![Register::RDI];
    for _ in 0..48 {
        if !decoder.can_decode() {
            return None;
        }
        decoder.decode_out(&mut instruction);
        match instruction.code() {
            Code::INVALID => return None,
            Code::Mov_rm64_r64 | Code::Mov_r64_rm64
                if instruction.op0_kind() == OpKind::Register
                    && instruction.op1_kind() == OpKind::Register
                    && client.contains(&instruction.op1_register()) =>
            {
                client.push(instruction.op0_register());
            }
            Code::Test_rm8_imm8
                if instruction.op0_kind() == OpKind::Memory
                    && client.contains(&instruction.memory_base())
                    && instruction.memory_index() == Register::None =>
            {
                let offset = u32::try_from(instruction.memory_displacement64()).ok()?;
                let mask = instruction.immediate8() as u32;
                return (mask != 0).then_some((offset, mask));
            }
            _ => {}
        }
    }
    None
}

/// The serve functions of 6.x and 7.0, in which a write serves the clients blocked on its key.
pub const SERVE_FUNCTIONS: [&str; 3] = [
    "serveClientsBlockedOnListKey",
    "serveClientsBlockedOnSortedSetKey",
    "serveClientsBlockedOnStreamKey",
];

/// How far a serve function's code is read, at most.
const MAX_FUNCTION_BYTES: u64 = 16 * 1024;

/// The return addresses (virtual addresses in the file) of the serve functions' calls to the
/// exported `unblockClient`: where it returns to exactly when a key woke the client. GCC
/// splits the serve functions into a short exported wrapper and a `.part.0` body that its
/// callers call directly; the body is what is read, from its start up to the next function.
/// Empty when the binary has no serve functions or none of them calls `unblockClient`, in
/// which case the serving window is probed instead.
pub fn serving_returns(file: &object::File<'_>, functions: &Functions) -> Vec<u64> {
    let mut starts = functions.starts().clone();
    let Some(unblock) = functions.get("unblockClient").map(|f| f.address) else {
        return Vec::new();
    };
    // Where each serve function's code is: its split body if it is a wrapper.
    let bodies: Vec<u64> = SERVE_FUNCTIONS
        .iter()
        .filter_map(|name| functions.get(name))
        .map(|f| {
            let wrapper = code_at(file, f.address, f.size.min(64));
            let body = (f.size > 0 && f.size <= 64)
                .then_some(wrapper)
                .flatten()
                .and_then(crate::probe_site::tail_jump)
                .and_then(|relative| f.address.checked_add_signed(relative));
            body.unwrap_or(f.address)
        })
        .collect();
    starts.extend(bodies.iter().copied());
    let mut returns = Vec::new();
    for body in bodies {
        // Up to the next function (a symbol or another body).
        let end = starts
            .range(body + 1..)
            .next()
            .copied()
            .unwrap_or(body + MAX_FUNCTION_BYTES)
            .min(body + MAX_FUNCTION_BYTES);
        let Some(code) = code_at(file, body, end - body) else {
            continue;
        };
        let mut found = BranchesTo::default();
        branches_to(code, body, unblock, &mut found);
        returns.extend(found.sites.iter().filter_map(|call| call.returns_to));
    }
    returns.sort_unstable();
    returns.dedup();
    returns
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
    fn the_block_type_store_of_block_client_gives_the_bstate_offset() {
        // blockClient of the upstream 7.4.1 build, up to `mov %esi,0x1d0(%rbx)` (after
        // `mov %rdi,%rbx`).
        let code = [
            0x55, 0x48, 0x89, 0xe5, 0x41, 0x56, 0x53, 0x48, 0x89, 0xfb, 0x48, 0x83, 0xec, 0x10,
            0x48, 0x8b, 0x47, 0x08, 0xa8, 0x02, 0x0f, 0x85, 0x16, 0x01, 0x00, 0x00, 0x48, 0x89,
            0xc2, 0x89, 0xb3, 0xd0, 0x01, 0x00, 0x00,
        ];
        assert_eq!(
            bstate_in_block_client(&code, 0x17c6c0),
            Some(BstateAt::Embedded(0x1d0))
        );
        // A store of esi through another pointer is not it.
        assert_eq!(
            bstate_in_block_client(&[0x89, 0x70, 0x10, 0xc3], 0x1000),
            None
        );
        // Valkey 8.1+: mov %rdi,%rbx; movslq %esi,%r12; mov 0xb0(%rbx),%rax; mov %r12d,(%rax)
        let pointer = [
            0x48, 0x89, 0xfb, 0x4c, 0x63, 0xe6, 0x48, 0x8b, 0x83, 0xb0, 0x00, 0x00, 0x00, 0x44,
            0x89, 0x20,
        ];
        assert_eq!(
            bstate_in_block_client(&pointer, 0x1000),
            Some(BstateAt::Pointer(0xb0))
        );
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
            let _ = bstate_in_block_client(&code, 0x400000);
            let mut found = BranchesTo::default();
            branches_to(&code, 0x400000, 0x400010, &mut found);
        }
    }
}
