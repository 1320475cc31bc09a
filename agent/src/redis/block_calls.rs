//! Where `blockClient` is called from, read from the machine code.
//!
//! LTO builds of 7.2+ carry their own copy of `blockForKeys` inside `blmoveGenericCommand`
//! (BLMOVE, BRPOPLPUSH), so a probe on `blockForKeys` misses those blocks. They all end in
//! `blockClient(c, btype)`. Probing `blockClient`'s entry catches them, but every block then
//! traps twice: once in `blockForKeys` and once more in the `blockClient` it calls, for
//! nothing. Each trap is about 1 us on Redis's main thread.
//!
//! So the agent probes the calls instead: every direct `call` or tail `jmp` to `blockClient`
//! that is not `blockForKeys`'s own. At such a call the arguments are in `rdi` and `esi`, as
//! at the function's entry, and the kernel emulates both instructions (one trap, no single
//! step). A plain BRPOP then traps once to block, where it trapped twice.
//!
//! The code is decoded from each function start (`.dynsym`, `.symtab` where kept) up to the
//! next: decoding from a start is exact for compiler output, and the functions without a
//! symbol (static ones) follow the padding of the one before, which decodes as instructions.
//! A site is only ever the address of an instruction so decoded, so a probe never lands
//! inside one. Where a conditional jump goes to `blockClient` (a probe there would fire when
//! the jump is not taken) or the code cannot be read, the answer is `None`, and the agent
//! probes `blockClient`'s entry as before.

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, OpKind};
use object::{Object, ObjectSection, SectionKind};

use super::unblock_paths::{file_offset_of, Functions};

/// More call sites than this and the entry probe is cheaper to attach (one link per site);
/// the builds of the version matrix have 2 to 8.
pub const MAX_CALL_SITES: usize = 32;

/// A direct call or unconditional jump to the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Branch {
    /// The instruction's address.
    pub at: u64,
    /// Where a call returns to (the next instruction); `None` for a jump.
    pub returns_to: Option<u64>,
}

/// The direct branches to one target found in some code.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BranchesTo {
    /// The calls and unconditional jumps to it.
    pub sites: Vec<Branch>,
    /// Whether a conditional jump goes to it.
    pub conditional: bool,
}

/// Decodes `code`, loaded at `address`, and adds its direct branches to `target` to `out`.
/// Stops at the first byte that does not decode.
pub fn branches_to(code: &[u8], address: u64, target: u64, out: &mut BranchesTo) {
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        if instruction.code() == Code::INVALID {
            return;
        }
        if instruction.op0_kind() != OpKind::NearBranch64
            || instruction.near_branch_target() != target
        {
            continue;
        }
        match instruction.flow_control() {
            FlowControl::Call => out.sites.push(Branch {
                at: instruction.ip(),
                returns_to: Some(instruction.next_ip()),
            }),
            FlowControl::UnconditionalBranch => out.sites.push(Branch {
                at: instruction.ip(),
                returns_to: None,
            }),
            FlowControl::ConditionalBranch => out.conditional = true,
            _ => {}
        }
    }
}

/// The file offsets of the calls to `blockClient` outside `blockForKeys`, where the agent
/// probes blocks that `blockForKeys` did not announce; `None` when they cannot all be found
/// (see the module's comment), and then `blockClient`'s entry is probed.
pub fn block_client_calls(file: &object::File<'_>, functions: &Functions) -> Option<Vec<u64>> {
    let target = functions.get("blockClient")?.address;
    let own = functions.get("blockForKeys")?;
    if own.size == 0 {
        return None;
    }
    let mut found = BranchesTo::default();
    for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        let (start, end) = (section.address(), section.address() + section.size());
        let data = section.data().ok()?;
        let mut bounds: Vec<u64> = std::iter::once(start)
            .chain(functions.starts_in(start..end))
            .collect();
        bounds.dedup();
        for (i, &from) in bounds.iter().enumerate() {
            let to = bounds.get(i + 1).copied().unwrap_or(end);
            let code = data.get((from - start) as usize..(to - start) as usize)?;
            branches_to(code, from, target, &mut found);
        }
    }
    if found.conditional {
        return None;
    }
    let outside: Vec<u64> = found
        .sites
        .into_iter()
        .map(|branch| branch.at)
        .filter(|site| !(own.address..own.address + own.size).contains(site))
        .collect();
    if outside.len() > MAX_CALL_SITES {
        return None;
    }
    outside
        .into_iter()
        .map(|site| file_offset_of(file, site))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_tail_jumps_are_sites_and_a_conditional_jump_is_flagged() {
        // At 0x1000: call 0x2000; nop; jmp 0x2000; call 0x3000 (another function).
        let code = [
            0xe8, 0xfb, 0x0f, 0x00, 0x00, // call 0x2000
            0x90, // nop
            0xe9, 0xf5, 0x0f, 0x00, 0x00, // jmp 0x2000
            0xe8, 0xf0, 0x1f, 0x00, 0x00, // call 0x3000
        ];
        let mut found = BranchesTo::default();
        branches_to(&code, 0x1000, 0x2000, &mut found);
        assert_eq!(
            found,
            BranchesTo {
                sites: vec![
                    Branch {
                        at: 0x1000,
                        returns_to: Some(0x1005)
                    },
                    Branch {
                        at: 0x1006,
                        returns_to: None
                    }
                ],
                conditional: false
            }
        );
        // jne 0x2000 (0f 85 rel32)
        let jne = [0x0f, 0x85, 0xfa, 0x0f, 0x00, 0x00];
        branches_to(&jne, 0x1000, 0x2000, &mut found);
        assert!(found.conditional);
        assert_eq!(found.sites.len(), 2);
    }

    #[test]
    fn an_indirect_call_or_another_target_is_not_a_site() {
        // call *%rax; call 0x2001; jmp 0x1fff
        let code = [
            0xff, 0xd0, 0xe8, 0xfa, 0x0f, 0x00, 0x00, 0xe9, 0xf3, 0x0f, 0x00, 0x00,
        ];
        let mut found = BranchesTo::default();
        branches_to(&code, 0x1000, 0x2000, &mut found);
        assert_eq!(found, BranchesTo::default());
    }
}
