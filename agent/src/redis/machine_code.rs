//! A Redis binary's functions and their machine code, as the questions of `unblock_paths` and
//! `block_calls` need them: the symbol tables, the code at an address, where an address is in
//! the file, and the direct branches an x86-64 function makes.

use std::collections::{BTreeMap, BTreeSet};

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, OpKind};
use object::{Object, ObjectSection, ObjectSymbol};

/// A defined function in the symbol tables: start and size.
#[derive(Clone, Copy, Debug)]
pub(super) struct Function {
    pub address: u64,
    pub size: u64,
}

/// The functions of a binary's symbol tables (`.dynsym`, and `.symtab` where it was kept),
/// read once for every question below.
pub struct Functions {
    by_name: BTreeMap<String, Function>,
    /// Every function start, named or not: where another function begins.
    starts: BTreeSet<u64>,
}

impl Functions {
    pub fn read(file: &object::File<'_>) -> Self {
        let mut by_name = BTreeMap::new();
        let mut starts = BTreeSet::new();
        for symbol in file.dynamic_symbols().chain(file.symbols()) {
            if !symbol.is_definition() || symbol.kind() != object::SymbolKind::Text {
                continue;
            }
            starts.insert(symbol.address());
            if let Ok(name) = symbol.name() {
                by_name.entry(name.to_string()).or_insert(Function {
                    address: symbol.address(),
                    size: symbol.size(),
                });
            }
        }
        Self { by_name, starts }
    }

    pub(super) fn get(&self, name: &str) -> Option<Function> {
        self.by_name.get(name).copied()
    }

    /// Every function start, named or not.
    pub(super) fn starts(&self) -> &BTreeSet<u64> {
        &self.starts
    }

    /// The function starts in `range`, in order.
    pub(super) fn starts_in(&self, range: std::ops::Range<u64>) -> impl Iterator<Item = u64> + '_ {
        self.starts.range(range).copied()
    }
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

/// The virtual address the first loadable segment (file offset 0) starts at, page-aligned:
/// with the address that segment is mapped at in a process, it gives the load bias.
pub fn first_load_address(file: &object::File<'_>) -> Option<u64> {
    use object::ObjectSegment;
    file.segments()
        .find(|s| s.file_range().0 == 0)
        .map(|s| s.address() & !0xfff)
}

/// `length` bytes of code at virtual `address` (fewer at the end of its section).
pub(super) fn code_at<'data>(
    file: &object::File<'data>,
    address: u64,
    length: u64,
) -> Option<&'data [u8]> {
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
pub(super) fn file_offset_of(file: &object::File<'_>, address: u64) -> Option<u64> {
    let section = file
        .sections()
        .find(|s| (s.address()..s.address() + s.size()).contains(&address))?;
    let (offset, _) = section.file_range()?;
    Some(address - section.address() + offset)
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
