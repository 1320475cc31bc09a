//! Where in a function to put a uprobe so that it stays cheap.
//!
//! A uprobe replaces one instruction with `int3`. After the BPF program ran, the kernel must
//! execute the displaced instruction: x86 emulates a few kinds (push, call, jmp, jcc, nop) and
//! single-steps every other one out of line, which takes a second trap (#DB). Under a
//! hypervisor that intercepts #DB (KVM on AMD always does) that second trap is a VM exit. On
//! the Firecracker VM this project is developed on, a probe on a single-stepped instruction
//! costs 13-16 us per hit, one on an emulated instruction about 1 us (measured with plain
//! tracefs uprobe events, no BPF involved; see BENCHMARKS.md).
//!
//! Redis 7.0's `handleClientsBlockedOnKeys` starts with a RIP-relative load, and glibc's
//! `read`/`write`/... start with `cmpb $0, __libc_single_threaded(%rip)`: both single-stepped.
//! Both are followed within a few bytes by an emulated instruction (`push`, `je`), and what
//! lies between only writes registers the probes never read. So the probe goes there: it fires
//! exactly once per call, with the arguments and the return address (`[rsp]`, which return
//! probes hijack) as they were at entry.
//!
//! The decoder below knows a deliberately small set of instructions. Anything else ends the
//! search and the probe stays at the function's entry (slower, never wrong).
//!
//! A read's data is there only when the call returns. A return probe costs a trap at the
//! entry (which also rewrites the return address on the stack) and a second one at the
//! return, plus a map entry carrying the buffer from one to the other. glibc's wrappers
//! (`read`, `recv`, `recvfrom`) return through `syscall; cmp $-4096,%rax; ja <error>`, once
//! per path (single-threaded and cancellable): at that `ja`, an emulated instruction, `rax`
//! holds the result and `rdi`/`rsi`/`rdx` still hold the arguments (the kernel preserves
//! them across `syscall`). [`syscall_exit_sites`] finds those branches; one probe there
//! replaces the entry probe, the return probe and the map.

use std::collections::BTreeMap;

/// How far into a function the search looks.
pub const PROLOGUE_BYTES: usize = 32;

/// Registers a skipped instruction may write: none of them carries an argument under the
/// System V ABI (rdi, rsi, rdx, rcx, r8, r9) and none is the stack pointer.
const SCRATCH_REGISTERS: [u8; 3] = [0 /* rax */, 10 /* r10 */, 11 /* r11 */];

/// Where the probe goes, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    /// Bytes from the function's start.
    pub offset: u64,
    /// Whether the instruction there is one the kernel emulates (the cheap case).
    pub emulated: bool,
}

impl ProbeSite {
    pub const ENTRY: ProbeSite = ProbeSite {
        offset: 0,
        emulated: false,
    };
}

/// What one decoded instruction is, as far as probe placement cares.
#[derive(Debug, PartialEq, Eq)]
enum Insn {
    /// The kernel emulates it: a probe here costs one trap.
    Emulated,
    /// Writes at most the flags and scratch registers: can be stepped over.
    Harmless,
    /// Anything else: the search stops.
    Stop,
}

/// Finds the cheapest probe site in a function whose first bytes are `code` (x86-64).
pub fn find(code: &[u8]) -> ProbeSite {
    if !cfg!(target_arch = "x86_64") {
        return ProbeSite::ENTRY;
    }
    let mut at = 0usize;
    while at < code.len() {
        match decode(&code[at..]) {
            // The whole instruction must be inside what was read (and so inside the function).
            Some((_, len)) if at + len > code.len() => break,
            Some((Insn::Emulated, _)) => {
                return ProbeSite {
                    offset: at as u64,
                    emulated: true,
                }
            }
            Some((Insn::Harmless, len)) => at += len,
            Some((Insn::Stop, _)) | None => break,
        }
    }
    ProbeSite::ENTRY
}

/// Where to probe one function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionSites {
    pub entry: ProbeSite,
    /// Where each of the function's system calls has returned (bytes from its start), if
    /// every one of them can be probed there (see [`syscall_exit_sites`]).
    pub syscall_exits: Option<Vec<u64>>,
    /// The body of a function the compiler split (GCC's partial inlining, `foo.part.0`): the
    /// exported symbol is a short wrapper that tests a condition and tail-jumps into the body,
    /// while callers in the same file test the condition themselves and call the body directly,
    /// so a probe on the wrapper alone never fires for them.
    pub split_body: Option<SplitBody>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitBody {
    /// Where the body is in the file (what a uprobe is attached at).
    pub file_offset: u64,
    pub site: ProbeSite,
}

/// Wrappers longer than this are not looked into for a split body.
const MAX_WRAPPER_BYTES: u64 = 64;

/// The probe sites of each function in `names` that `file` defines. Functions whose bytes
/// cannot be read get [`ProbeSite::ENTRY`].
pub fn sites_in(file: &object::File<'_>, names: &[&str]) -> BTreeMap<String, FunctionSites> {
    use object::{Object, ObjectSection, ObjectSymbol};
    fn code_at<'data>(
        section: &object::Section<'data, '_>,
        address: u64,
        length: u64,
    ) -> Option<&'data [u8]> {
        section.data_range(address, length).ok().flatten()
    }
    let mut sites = BTreeMap::new();
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        let Ok(name) = symbol.name() else { continue };
        if !symbol.is_definition() || !names.contains(&name) || sites.contains_key(name) {
            continue;
        }
        let section = symbol
            .section_index()
            .and_then(|index| file.section_by_index(index).ok());
        let Some(section) = section else {
            sites.insert(
                name.to_string(),
                FunctionSites {
                    entry: ProbeSite::ENTRY,
                    syscall_exits: None,
                    split_body: None,
                },
            );
            continue;
        };
        let size = symbol.size();
        let prologue = if size == 0 {
            PROLOGUE_BYTES as u64
        } else {
            size.min(PROLOGUE_BYTES as u64)
        };
        let entry = code_at(&section, symbol.address(), prologue).map_or(ProbeSite::ENTRY, find);
        let split_body = (size > 0 && size <= MAX_WRAPPER_BYTES)
            .then(|| code_at(&section, symbol.address(), size))
            .flatten()
            .and_then(tail_jump)
            .and_then(|relative| symbol.address().checked_add_signed(relative))
            .and_then(|body| {
                let (section_offset, _) = section.file_range()?;
                let file_offset = body.checked_sub(section.address())? + section_offset;
                let site =
                    code_at(&section, body, PROLOGUE_BYTES as u64).map_or(ProbeSite::ENTRY, find);
                Some(SplitBody { file_offset, site })
            });
        let syscall_exits = (size > 0 && size <= MAX_SYSCALL_WRAPPER_BYTES)
            .then(|| code_at(&section, symbol.address(), size))
            .flatten()
            .and_then(syscall_exit_sites);
        sites.insert(
            name.to_string(),
            FunctionSites {
                entry,
                syscall_exits,
                split_body,
            },
        );
    }
    sites
}

/// Functions longer than this are not swept for system calls: glibc's wrappers are 0xd0-0xf0
/// bytes.
const MAX_SYSCALL_WRAPPER_BYTES: u64 = 512;

/// Where each `syscall` in `code` (a whole function) has returned: the offset of the
/// conditional branch that tests its result, when only flag-setting comparisons lie between
/// (so `rax` is the result and `rdi`, `rsi`, `rdx` are the arguments there), the branch is
/// one the kernel emulates, and no jump in the function lands between the `syscall` and it
/// (so the probe fires exactly once per call, right after it). `None` when the function has
/// no `syscall`, when any of them does not return that way (that function keeps its entry
/// and return probes), or when the sweep meets bytes it cannot decode.
pub fn syscall_exit_sites(code: &[u8]) -> Option<Vec<u64>> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic};
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut instructions = Vec::new();
    while decoder.can_decode() {
        let instruction = decoder.decode();
        if instruction.is_invalid() {
            return None;
        }
        instructions.push(instruction);
    }
    // Targets of jumps within the function: none may land on a probed branch or between it
    // and its `syscall`.
    let targets: Vec<u64> = instructions
        .iter()
        .filter(|i| {
            matches!(
                i.flow_control(),
                FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch
            )
        })
        .map(|i| i.near_branch_target())
        .collect();
    let mut sites = Vec::new();
    for (index, syscall) in instructions.iter().enumerate() {
        if syscall.mnemonic() != Mnemonic::Syscall {
            continue;
        }
        let mut site = None;
        for next in instructions.iter().skip(index + 1).take(3) {
            match next.mnemonic() {
                Mnemonic::Cmp | Mnemonic::Test => continue,
                _ => {
                    let at = next.ip() as usize;
                    let bytes = &code[at..at + next.len()];
                    // jcc rel8 or jcc rel32, without prefixes: what x86 uprobes emulate.
                    let emulated_jcc = matches!(bytes, [0x70..=0x7f, _])
                        || matches!(bytes, [0x0f, 0x80..=0x8f, _, _, _, _]);
                    if emulated_jcc {
                        site = Some(next.ip());
                    }
                    break;
                }
            }
        }
        let site = site?;
        if targets
            .iter()
            .any(|t| *t >= syscall.next_ip() && *t <= site)
        {
            return None;
        }
        sites.push(site);
    }
    if sites.is_empty() || !every_way_out_passes(&instructions, &sites) {
        return None;
    }
    Some(sites)
}

/// Whether every path from the function's entry to a way out of it (`ret`, a jump out of the
/// function or through a register, running off its end) passes one of `sites`. A wrapper
/// whose other path makes its system call elsewhere (glibc 2.41's `__syscall_cancel`) would
/// otherwise lose that path's reads once its entry and return probes are dropped. Calls are
/// taken to return. Branches within the function must land on an instruction of the sweep.
fn every_way_out_passes(instructions: &[iced_x86::Instruction], sites: &[u64]) -> bool {
    use iced_x86::FlowControl;
    let index_of = |ip: u64| instructions.binary_search_by_key(&ip, |i| i.ip()).ok();
    let end = instructions.last().map_or(0, |i| i.next_ip());
    let mut seen = vec![false; instructions.len()];
    let mut stack = vec![0usize];
    while let Some(index) = stack.pop() {
        let Some(instruction) = instructions.get(index) else {
            return false; // ran off the end
        };
        if std::mem::replace(&mut seen[index], true) || sites.contains(&instruction.ip()) {
            continue;
        }
        let mut branch_to = |target: u64| -> bool {
            match index_of(target) {
                Some(t) => {
                    stack.push(t);
                    true
                }
                // Out of the function (a tail call), or into the middle of an instruction.
                None => false,
            }
        };
        match instruction.flow_control() {
            FlowControl::Next | FlowControl::Call | FlowControl::IndirectCall => {
                stack.push(index + 1)
            }
            FlowControl::ConditionalBranch => {
                if !branch_to(instruction.near_branch_target()) {
                    return false;
                }
                stack.push(index + 1);
            }
            FlowControl::UnconditionalBranch => {
                if instruction.near_branch_target() >= end
                    || !branch_to(instruction.near_branch_target())
                {
                    return false;
                }
            }
            // ret, jumps through registers, int3/ud2-like exceptions, anything else.
            _ => return false,
        }
    }
    true
}

/// The target, relative to the function's start, of a jump out of `code` (the whole of a
/// short function), found by a linear sweep that gives up at any instruction it does not know.
pub fn tail_jump(code: &[u8]) -> Option<i64> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    let mut at = 0usize;
    while at < code.len() {
        let rest = &code[at..];
        let (len, relative) = match rest {
            [0xeb, rel, ..] => (2, Some(i64::from(*rel as i8))),
            [0x70..=0x7f, rel, ..] => (2, Some(i64::from(*rel as i8))),
            [0xe9, a, b, c, d, ..] => (5, Some(i64::from(i32::from_le_bytes([*a, *b, *c, *d])))),
            [0x0f, 0x80..=0x8f, a, b, c, d, ..] => {
                (6, Some(i64::from(i32::from_le_bytes([*a, *b, *c, *d]))))
            }
            [0xc3, ..] | [0xcc, ..] => (1, None),
            _ => match decode(rest)? {
                (Insn::Stop, _) => (prefixed_nop_len(rest)?, None),
                (_, len) => (len, None),
            },
        };
        if at + len > code.len() {
            return None;
        }
        if let Some(relative) = relative {
            let target = (at + len) as i64 + relative;
            if target < 0 || target >= code.len() as i64 {
                return Some(target);
            }
        }
        at += len;
    }
    None
}

/// Length of a padding nop with operand-size or segment prefixes (`66 2e 0f 1f 84 ...`).
fn prefixed_nop_len(code: &[u8]) -> Option<usize> {
    let prefixes = code.iter().take_while(|b| matches!(b, 0x66 | 0x2e)).count();
    match code.get(prefixes..)? {
        [0x0f, 0x1f, rest @ ..] if prefixes > 0 => Some(prefixes + 2 + modrm_len(rest)?),
        [0x90, ..] if prefixes > 0 => Some(prefixes + 1),
        _ => None,
    }
}

/// Decodes one instruction: its kind and length, or `None` when it is cut off.
fn decode(code: &[u8]) -> Option<(Insn, usize)> {
    let byte = |i: usize| code.get(i).copied();
    // endbr64: a no-op for everything but indirect-branch tracking.
    if code.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
        return Some((Insn::Harmless, 4));
    }
    let (rex, at) = match byte(0)? {
        r @ 0x40..=0x4f => (r, 1),
        _ => (0, 0),
    };
    let rex_r = (rex >> 2) & 1;
    let rex_b = rex & 1;
    let opcode = byte(at)?;
    match opcode {
        // push r64 (and with REX.B, r8-r15).
        0x50..=0x57 => Some((Insn::Emulated, at + 1)),
        // nop
        0x90 if rex == 0 => Some((Insn::Emulated, 1)),
        // jcc rel8, jmp rel8
        0x70..=0x7f | 0xeb if rex == 0 => Some((Insn::Emulated, 2)),
        // call rel32, jmp rel32
        0xe8 | 0xe9 if rex == 0 => Some((Insn::Emulated, 5)),
        0x0f => match byte(at + 1)? {
            // jcc rel32
            0x80..=0x8f if rex == 0 => Some((Insn::Emulated, 6)),
            // multi-byte nop: 0f 1f /0
            0x1f => {
                let len = modrm_len(&code[at + 2..])?;
                Some((Insn::Emulated, at + 2 + len))
            }
            _ => Some((Insn::Stop, 0)),
        },
        // cmp r/m8, imm8 (0x80 /7) and cmp r/m32/64, imm8 (0x83 /7): flags only.
        0x80 | 0x83 => {
            let modrm = byte(at + 1)?;
            if (modrm >> 3) & 7 != 7 {
                return Some((Insn::Stop, 0));
            }
            let len = modrm_len(&code[at + 1..])?;
            Some((Insn::Harmless, at + 1 + len + 1))
        }
        // test and cmp between registers: flags only.
        0x85 | 0x39 | 0x3b if byte(at + 1)? >> 6 == 3 => Some((Insn::Harmless, at + 2)),
        // mov r/m, r (0x89): writes r/m. Only register destinations are accepted.
        0x89 | 0x31 => {
            let modrm = byte(at + 1)?;
            let destination = (modrm & 7) | (rex_b << 3);
            Some((
                if modrm >> 6 == 3 && SCRATCH_REGISTERS.contains(&destination) {
                    Insn::Harmless
                } else {
                    Insn::Stop
                },
                at + 2,
            ))
        }
        // mov r, r/m (0x8b) and xor r, r/m (0x33): write the reg field. The source may be a
        // register or memory (a RIP-relative load is how Redis reads `server`).
        0x8b | 0x33 => {
            let modrm = byte(at + 1)?;
            let destination = ((modrm >> 3) & 7) | (rex_r << 3);
            let len = modrm_len(&code[at + 1..])?;
            Some((
                if SCRATCH_REGISTERS.contains(&destination) {
                    Insn::Harmless
                } else {
                    Insn::Stop
                },
                at + 1 + len,
            ))
        }
        _ => Some((Insn::Stop, 0)),
    }
}

/// Length of a ModRM byte with its SIB and displacement (64-bit addressing).
fn modrm_len(code: &[u8]) -> Option<usize> {
    let modrm = *code.first()?;
    let (mode, rm) = (modrm >> 6, modrm & 7);
    if mode == 3 {
        return Some(1);
    }
    let sib = usize::from(rm == 4);
    let displacement = match mode {
        0 if rm == 5 => 4,
        0 if rm == 4 && code.get(1).is_some_and(|s| s & 7 == 5) => 4,
        0 => 0,
        1 => 1,
        _ => 4,
    };
    let len = 1 + sib + displacement;
    (code.len() >= len).then_some(len)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn site(offset: u64) -> ProbeSite {
        ProbeSite {
            offset,
            emulated: true,
        }
    }

    #[test]
    fn functions_that_start_with_a_push_are_probed_at_entry() {
        // Debian's redis-server 7.0.15: blockForKeys (push %r15) and unblockClient (push %rbx).
        assert_eq!(find(&[0x41, 0x57, 0x41, 0x56]), site(0));
        assert_eq!(find(&[0x53, 0x8b, 0x87, 0xb8, 0x01, 0x00, 0x00]), site(0));
    }

    #[test]
    fn a_rip_relative_load_into_a_scratch_register_is_stepped_over() {
        // handleClientsBlockedOnKeys: mov 0x147992(%rip),%eax; push %r12
        assert_eq!(
            find(&[0x8b, 0x05, 0x92, 0x79, 0x14, 0x00, 0x41, 0x54, 0x55]),
            site(6)
        );
    }

    #[test]
    fn glibc_syscall_wrappers_are_probed_at_their_first_branch() {
        // write: cmpb $0x0,__libc_single_threaded(%rip); je
        assert_eq!(
            find(&[0x80, 0x3d, 0x91, 0x32, 0x0e, 0x00, 0x00, 0x74, 0x17, 0xb8]),
            site(7)
        );
        // sendto: cmpb ...; mov %ecx,%r10d; je
        assert_eq!(
            find(&[0x80, 0x3d, 0x31, 0x09, 0x0d, 0x00, 0x00, 0x41, 0x89, 0xca, 0x74, 0x14]),
            site(10)
        );
        // recvmsg: push %rbx
        assert_eq!(find(&[0x53, 0x48, 0x83, 0xec, 0x10]), site(0));
    }

    #[test]
    fn endbr64_and_nops_are_handled() {
        // endbr64; push %rbp
        assert_eq!(
            find(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5]),
            site(4)
        );
        // a 5-byte nop is emulated itself
        assert_eq!(find(&[0x0f, 0x1f, 0x44, 0x00, 0x00, 0x55]), site(0));
        // endbr64; call rel32
        assert_eq!(find(&[0xf3, 0x0f, 0x1e, 0xfa, 0xe8, 0, 0, 0, 0]), site(4));
    }

    #[test]
    fn instructions_that_write_arguments_or_the_stack_stop_the_search() {
        // mov %rdi,%rbx would be fine to skip, but mov ...,%edi writes an argument.
        assert_eq!(find(&[0x8b, 0x3d, 0, 0, 0, 0, 0x55]), ProbeSite::ENTRY);
        // sub $0x10,%rsp moves the stack pointer that return probes read.
        assert_eq!(find(&[0x48, 0x83, 0xec, 0x10, 0x55]), ProbeSite::ENTRY);
        // mov %rax,%rdi (89 c7) writes rdi.
        assert_eq!(find(&[0x48, 0x89, 0xc7, 0x55]), ProbeSite::ENTRY);
        // mov %rdi,0x8(%rax) writes memory.
        assert_eq!(find(&[0x48, 0x89, 0x78, 0x08, 0x55]), ProbeSite::ENTRY);
        // An unknown instruction.
        assert_eq!(find(&[0xc3]), ProbeSite::ENTRY);
    }

    #[test]
    fn a_split_wrapper_leads_to_its_body() {
        // Debian's redis-server 7.0.15, serveClientsBlockedOnListKey (0x15 bytes at 0x100040):
        //   mov 0x1482b6(%rip),%eax; test %eax,%eax; jne +6; ret; nopl 0x0(%rax,%rax,1);
        //   jmp ffec0 <serveClientsBlockedOnListKey.part.0>
        let wrapper = [
            0x8b, 0x05, 0xb6, 0x82, 0x14, 0x00, 0x85, 0xc0, 0x75, 0x06, 0xc3, 0x0f, 0x1f, 0x44,
            0x00, 0x00, 0xe9, 0x6b, 0xfe, 0xff, 0xff,
        ];
        assert_eq!(tail_jump(&wrapper), Some(0xffec0 - 0x100040));
        // The wrapper's own probe site is its jne.
        assert_eq!(find(&wrapper), site(8));
        // A function that only jumps within itself, or that the sweep cannot read, has none.
        assert_eq!(tail_jump(&[0x85, 0xc0, 0x75, 0x01, 0xc3, 0xc3]), None);
        assert_eq!(tail_jump(&[0x48, 0x83, 0xec, 0x10, 0xe9, 0, 0, 0, 0]), None);
        // Padding with prefixes is stepped over.
        assert_eq!(
            tail_jump(&[0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0, 0xeb, 0x10]),
            Some(13 + 0x10)
        );
    }

    #[test]
    fn truncated_code_never_reads_past_the_end() {
        let full = [0x80, 0x3d, 0x91, 0x32, 0x0e, 0x00, 0x00, 0x74, 0x17];
        for len in 0..full.len() - 1 {
            assert_eq!(find(&full[..len]), ProbeSite::ENTRY, "cut at {len}");
        }
        assert_eq!(find(&[0x0f]), ProbeSite::ENTRY);
        assert_eq!(find(&[0x41]), ProbeSite::ENTRY);
        assert_eq!(find(&[0x8b, 0x04]), ProbeSite::ENTRY);
    }

    /// glibc 2.36's `recvfrom` (Debian 12), whole: both paths end in syscall; cmp; ja.
    const RECVFROM: &str =
        "803d010c0d00004189ca7414b82d0000000f05483d00f0ffff7775c30f1f4000554883ec304c894c24284c89\
        44242048895424104889742408893c24894c241ce80baef7ff4c8b4c24284c8b44242089c5448b54241c8b3c\
        24b82d000000488b542410488b7424080f05483d00f0ffff773689ef48890424e853aef7ff488b04244883c4\
        305dc3660f1f840000000000488b1579830c00f7d864890248c7c0ffffffffc30f1f4000488b1561830c00f7\
        d864890248c7c0ffffffffebb5";

    /// `N` bytes from a xorshift generator, `seed` advanced.
    fn random_bytes<const N: usize>(seed: &mut u64) -> [u8; N] {
        let mut bytes = [0u8; N];
        for b in &mut bytes {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *b = *seed as u8;
        }
        bytes
    }

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    #[test]
    fn glibc_read_wrappers_are_probed_where_each_syscall_returned() {
        let code = hex(RECVFROM);
        // The `ja` after each `syscall`: 0x19 (single-threaded path), 0x70 (cancellable).
        assert_eq!(syscall_exit_sites(&code), Some(vec![0x19, 0x70]));
        // The entry site is unchanged: the first `je`.
        assert_eq!(find(&code[..PROLOGUE_BYTES]), site(10));
    }

    #[test]
    fn a_syscall_whose_result_is_moved_first_keeps_the_return_probe() {
        // syscall; mov %rax,%rbx; cmp $-4096,%rax; ja
        let code = hex("b800000000 0f05 4889c3 483d00f0ffff 7701 c3 c3");
        assert_eq!(syscall_exit_sites(&code), None);
        // No syscall at all (a wrapper that calls the real function).
        assert_eq!(syscall_exit_sites(&hex("e800000000 c3")), None);
        // One good path and one bad: the whole function keeps its return probe.
        let code = hex("0f05 483d00f0ffff 7708 0f05 4889c3 7702 c3 c3 c3 c3 c3");
        assert_eq!(syscall_exit_sites(&code), None);
    }

    #[test]
    fn a_path_out_that_passes_no_site_keeps_the_return_probe() {
        // The je takes the path that calls elsewhere:
        //   0 85c0        test %eax,%eax
        //   2 7408        je 0xc
        //   4 0f05        syscall
        //   6 4839c0      cmp %rax,%rax
        //   9 7700        ja 0xb
        //   b c3          ret
        //   c e800000000  call 0x11
        //  11 c3          ret          <- reached without passing the ja
        let code = hex("85c0 7408 0f05 4839c0 7700 c3 e800000000 c3");
        assert_eq!(syscall_exit_sites(&code), None);
        // The same with the second path making its own syscall: both sites, every way out
        // covered.
        let code = hex("85c0 7408 0f05 4839c0 7700 c3 0f05 4839c0 7700 c3");
        assert_eq!(syscall_exit_sites(&code), Some(vec![9, 17]));
        // A jump through a register before any site.
        let code = hex("ffe0 0f05 4839c0 7700 c3");
        assert_eq!(syscall_exit_sites(&code), None);
        // A tail jump out of the function before any site.
        let code = hex("e900010000 0f05 4839c0 7700 c3");
        assert_eq!(syscall_exit_sites(&code), None);
    }

    #[test]
    fn a_jump_into_the_window_keeps_the_return_probe() {
        // 0: jmp to 4 (the cmp after the syscall); 2: syscall; 4: cmp; 10: ja; 12: ret
        let code = hex("eb02 0f05 483d00f0ffff 7700 c3");
        assert_eq!(syscall_exit_sites(&code), None);
        // A jump to the syscall itself is fine: the probe still follows a fresh return.
        let code = hex("eb00 0f05 483d00f0ffff 7700 c3");
        assert_eq!(syscall_exit_sites(&code), Some(vec![10]));
    }

    #[test]
    fn cut_or_garbled_functions_have_no_exit_sites() {
        let code = hex(RECVFROM);
        for len in 0..code.len() {
            if let Some(sites) = syscall_exit_sites(&code[..len]) {
                assert!(sites.iter().all(|s| (*s as usize) < len), "cut at {len}");
            }
        }
        let mut seed = 0x9e3779b97f4a7c15u64;
        for _ in 0..5_000 {
            let mut code: [u8; 48] = random_bytes(&mut seed);
            code[20] = 0x0f;
            code[21] = 0x05;
            if let Some(sites) = syscall_exit_sites(&code) {
                for site in sites {
                    let at = site as usize;
                    assert!(matches!(code[at], 0x70..=0x7f | 0x0f), "{code:02x?}");
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x2545f4914f6cdd1du64;
        for _ in 0..20_000 {
            let code: [u8; 12] = random_bytes(&mut seed);
            let site = find(&code);
            assert!(site.offset < code.len() as u64);
        }
    }
}
