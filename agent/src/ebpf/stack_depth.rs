//! The stack each program's deepest call chain uses, read from the eBPF object itself, as a
//! verifier without private BPF stacks counts it: at most 512 bytes over the program and
//! every function it calls, `bpf_loop` callbacks included (a callback runs inside the helper,
//! on the caller's stack).
//!
//! Kernels from 6.13 give some programs a private stack (where the JIT supports it) and check
//! each of its larger frames alone; others do not (kernels before 6.13, and a 6.18 build this project ran on, which
//! gave one to tracepoint programs and not to uprobe ones). A program that passes where it
//! gets a private stack can be refused elsewhere: the tokenizer's uprobes once took 736 bytes
//! (program 112, loop callback 256, tokenizer step 368) and loaded only where they had one.
//! This check reads the object, so it holds on every kernel, root or not.
//!
//! Each function's frame is the deepest stack byte its instructions reach through `r10`, or
//! through a register copied from it (or spilled and filled) and moved by constants, counted
//! where such a pointer is made (what it is handed to, a helper's buffer or a callee writing
//! into its caller's frame, counts in this frame for the verifier too). A register added to
//! such a pointer is taken for an index into an array that starts there (it moves up, toward
//! `r10`); one subtracted is an error: the object does not say how far down. Frames are
//! rounded up to 32 bytes (32 for an empty one), as kernels before 6.8 and programs run
//! without the JIT round them, the stricter of the verifier's two roundings. It reads every instruction, where the
//! verifier counts only the paths it explores, so it may err high, never low: on the object
//! the 6.18 build refused, its frames were the kernel's own for the programs and functions of
//! four of the five refused chains (write 96, read_done 168, read_ret 184, step_request 256,
//! step_reply 248, the two step_with 368 and 344, summing to the kernel's 720, 784 and 800),
//! and 16 bytes more for `worker_libc_sendmsg` (120 against 104), whose write shortcuts are
//! dead code there.

use std::collections::{BTreeMap, HashMap};

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionIndex, SymbolKind};

/// The most a call chain may use where the kernel gives the program no private stack.
pub const MAX_CHAIN_BYTES: u32 = 512;

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("the eBPF object cannot be parsed: {0}")]
    Parse(#[from] object::Error),
    #[error("{program}: a call chain deeper than the verifier's {MAX_CALL_FRAMES} frames")]
    TooDeep { program: String },
    #[error(
        "{function}: moves a stack pointer down by a register; its frame cannot be read from the object"
    )]
    VariableStackOffset { function: String },
    #[error("{caller} calls into {section}+{offset}, where no function starts")]
    UnknownCallee {
        caller: String,
        section: String,
        offset: u64,
    },
}

/// One program's deepest call chain: the functions from the program down, and the stack the
/// chain takes (each frame rounded as the verifier rounds it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub program: String,
    pub bytes: u32,
    /// (function, its frame in bytes), the program first.
    pub frames: Vec<(String, u32)>,
}

impl Chain {
    /// `program 112 -> step_request 256 -> ...`, with the functions' short names.
    pub fn describe(&self) -> String {
        self.frames
            .iter()
            .map(|(name, bytes)| format!("{} {bytes}", short_name(name)))
            .collect::<Vec<_>>()
            .join(" -> ")
    }
}

/// A Rust symbol's function name without its path and generic arguments
/// (`<agent_common::resp::RequestState>::step_with::<...>` -> `step_with`); other names as
/// they are.
pub fn short_name(symbol: &str) -> String {
    let demangled = format!("{:#}", rustc_demangle::demangle(symbol));
    let without_generics = demangled.split("::<").next().unwrap_or(&demangled);
    without_generics
        .rsplit("::")
        .next()
        .unwrap_or(without_generics)
        .to_string()
}

struct Function {
    name: String,
    section: SectionIndex,
    start: u64,
    size: u64,
}

/// The deepest call chain of every program in `object` (functions outside `.text`), deepest
/// first.
pub fn deepest_chains(object: &[u8]) -> Result<Vec<Chain>, StackError> {
    let file = object::File::parse(object)?;
    let mut functions: Vec<Function> = Vec::new();
    let mut at: HashMap<(SectionIndex, u64), usize> = HashMap::new();
    for symbol in file.symbols() {
        let (SymbolKind::Text, Some(section)) = (symbol.kind(), symbol.section_index()) else {
            continue;
        };
        if symbol.size() == 0 || at.contains_key(&(section, symbol.address())) {
            continue;
        }
        at.insert((section, symbol.address()), functions.len());
        functions.push(Function {
            name: symbol.name()?.to_string(),
            section,
            start: symbol.address(),
            size: symbol.size(),
        });
    }
    let mut frames = Vec::with_capacity(functions.len());
    let mut callees = Vec::with_capacity(functions.len());
    // Each section's relocations, read once for all its functions.
    let mut relocations_of: HashMap<SectionIndex, BTreeMap<u64, RelocationTarget>> = HashMap::new();
    for function in &functions {
        let section = file.section_by_index(function.section)?;
        let data = section.data()?;
        let relocations = relocations_of.entry(function.section).or_insert_with(|| {
            section
                .relocations()
                .map(|(offset, relocation)| (offset, relocation.target()))
                .collect()
        });
        let end = (function.start + function.size).min(data.len() as u64) as usize;
        let code = &data[function.start as usize..end];
        let scan = scan(&function.name, code, |index, call_imm, load_imm| {
            let offset = function.start + 8 * index as u64;
            let (section, target) = match relocations.get(&offset) {
                Some(RelocationTarget::Symbol(symbol)) => {
                    let symbol = file.symbol_by_index(*symbol)?;
                    let Some(section) = symbol.section_index() else {
                        return Ok(None);
                    };
                    // A call's immediate counts instructions after the next one; a loaded
                    // address's, bytes.
                    let addend = match (call_imm, load_imm) {
                        (Some(imm), _) => (imm as i64 + 1) * 8,
                        (None, Some(imm)) => imm as i64,
                        (None, None) => 0,
                    };
                    (section, symbol.address().wrapping_add_signed(addend))
                }
                Some(_) => return Ok(None),
                // A call inside the section, relative to the next instruction.
                None => match call_imm {
                    Some(imm) => (
                        function.section,
                        offset.wrapping_add_signed((imm as i64 + 1) * 8),
                    ),
                    None => return Ok(None),
                },
            };
            if load_imm.is_some() && !is_code(&file, section) {
                // The address of a map or of data, not of a function.
                return Ok(None);
            }
            match at.get(&(section, target)) {
                Some(callee) => Ok(Some(*callee)),
                None => Err(StackError::UnknownCallee {
                    caller: function.name.clone(),
                    section: file
                        .section_by_index(section)
                        .and_then(|s| s.name().map(str::to_string))
                        .unwrap_or_default(),
                    offset: target,
                }),
            }
        })?;
        frames.push(scan.frame);
        callees.push(scan.callees);
    }
    let mut memo: HashMap<usize, (u32, Vec<usize>, usize)> = HashMap::new();
    let mut chains = Vec::new();
    for (index, function) in functions.iter().enumerate() {
        let section = file.section_by_index(function.section)?;
        if section.name()? == ".text" {
            continue;
        }
        let (bytes, path) =
            deepest(index, &frames, &callees, &mut memo, 1).ok_or_else(|| StackError::TooDeep {
                program: function.name.clone(),
            })?;
        chains.push(Chain {
            program: function.name.clone(),
            bytes,
            frames: path
                .iter()
                .map(|f| (functions[*f].name.clone(), round_frame(frames[*f])))
                .collect(),
        });
    }
    chains.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.program.cmp(&b.program)));
    Ok(chains)
}

fn is_code(file: &object::File, section: SectionIndex) -> bool {
    file.section_by_index(section)
        .is_ok_and(|s| s.kind() == object::SectionKind::Text)
}

/// A frame as the verifier adds it to a chain: rounded up to 32 bytes, and 32 for an empty
/// one, as kernels before 6.8 do and later ones for programs not JIT-compiled (JIT-compiled
/// ones round to 16 since 6.8): the stricter of the two, so that a chain that passes here
/// passes on both.
fn round_frame(bytes: u32) -> u32 {
    bytes.max(1).div_ceil(32) * 32
}

/// Most frames on a chain: the verifier's own limit (`MAX_CALL_FRAMES`).
const MAX_CALL_FRAMES: usize = 8;

/// The deepest chain from function `index`, the `depth`-th frame of its caller's chain: its
/// bytes and the functions on it; `None` past the verifier's frame limit (a chain that deep,
/// or recursion, which the verifier refuses too).
fn deepest(
    index: usize,
    frames: &[u32],
    callees: &[Vec<usize>],
    memo: &mut HashMap<usize, (u32, Vec<usize>, usize)>,
    depth: usize,
) -> Option<(u32, Vec<usize>)> {
    if depth > MAX_CALL_FRAMES {
        return None;
    }
    if let Some((bytes, path, levels)) = memo.get(&index) {
        // Known from another caller; still within the limit from this one?
        return (depth + levels - 1 <= MAX_CALL_FRAMES).then(|| (*bytes, path.clone()));
    }
    let mut below = (0, Vec::new());
    for callee in &callees[index] {
        let candidate = deepest(*callee, frames, callees, memo, depth + 1)?;
        if candidate.0 > below.0 || below.1.is_empty() {
            below = candidate;
        }
    }
    let mut path = vec![index];
    path.extend(below.1);
    let bytes = round_frame(frames[index]) + below.0;
    memo.insert(index, (bytes, path.clone(), path.len()));
    Some((bytes, path))
}

/// What one function's instructions say: its frame, and the functions it calls or hands to
/// a helper (as the index `resolve` gives them).
struct Scan {
    frame: u32,
    callees: Vec<usize>,
}

/// Reads one function's instructions. `resolve(index, call_imm, load_imm)` names the function
/// a call (`call_imm`) or a 64-bit load (`load_imm`) at instruction `index` refers to, if any.
fn scan(
    function: &str,
    code: &[u8],
    mut resolve: impl FnMut(usize, Option<i32>, Option<i32>) -> Result<Option<usize>, StackError>,
) -> Result<Scan, StackError> {
    const FRAME_POINTER: u8 = 10;
    // The offset from r10 a register holds, while it holds one.
    let mut from_frame: [Option<i64>; 11] = [None; 11];
    from_frame[FRAME_POINTER as usize] = Some(0);
    let mut deepest = 0i64;
    // Stack slots (by depth) holding a frame pointer, and its offset.
    let mut spilled: HashMap<i64, i64> = HashMap::new();
    let mut callees = Vec::new();
    let count = code.len() / 8;
    let mut i = 0;
    while i < count {
        let insn = &code[8 * i..8 * i + 8];
        let op = insn[0];
        let dst = (insn[1] & 0x0f) as usize;
        let src = (insn[1] >> 4) as usize;
        let off = i16::from_le_bytes([insn[2], insn[3]]) as i64;
        let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
        let class = op & 0x07;
        let touched = |from_frame: &[Option<i64>; 11], base: usize| {
            from_frame
                .get(base)
                .copied()
                .flatten()
                .map(|at| -(at + off))
        };
        let reached = |deepest: &mut i64, bytes: Option<i64>| {
            if let Some(bytes) = bytes {
                *deepest = (*deepest).max(bytes);
            }
        };
        // The verifier refuses writes to r10: `dst` is at most 9 where one is done.
        let dst_reg = dst.min(9);
        match op {
            // ld_imm64: two slots; the address of a callback, a map, or data.
            0x18 => {
                if let Some(callee) = resolve(i, None, Some(imm))? {
                    callees.push(callee);
                }
                from_frame[dst_reg] = None;
                i += 2;
                continue;
            }
            // call: a function of the object (src 1), or a helper (r1-r5 clobbered).
            0x85 => {
                if src == 1 {
                    if let Some(callee) = resolve(i, Some(imm), None)? {
                        callees.push(callee);
                    }
                }
                for reg in from_frame.iter_mut().take(6) {
                    *reg = None;
                }
            }
            // mov64 reg: copies a frame pointer.
            0xbf => from_frame[dst_reg] = from_frame.get(src).copied().flatten(),
            // add64 imm: moves it. A pointer into the frame counts where it is made: what it is
            // handed to (a helper's buffer, a callee writing into its caller's frame) is
            // counted by the verifier in this frame.
            // sub64 imm likewise, the other way.
            0x07 | 0x17 => {
                let by = if op == 0x07 {
                    imm as i64
                } else {
                    -(imm as i64)
                };
                from_frame[dst_reg] = from_frame[dst_reg].map(|o| o + by);
                reached(&mut deepest, from_frame[dst_reg].map(|o| -o));
            }
            // add64 reg on a frame pointer: an index into an array that starts there (a loop
            // over a stack buffer), which moves up from its start, where it was counted.
            0x0f if from_frame[dst_reg].is_some() => {}
            // sub64 reg: down by an amount the object does not say.
            0x1f if from_frame[dst_reg].is_some() => {
                return Err(StackError::VariableStackOffset {
                    function: function.to_string(),
                })
            }
            _ => match class {
                // ldx: reads through src, writes dst.
                0x01 => {
                    let slot = touched(&from_frame, src);
                    reached(&mut deepest, slot);
                    // A frame pointer spilled to the stack comes back with its offset.
                    let refilled = slot.filter(|_| op == 0x79).and_then(|s| spilled.get(&s));
                    from_frame[dst_reg] = refilled.copied();
                }
                // st, stx (and atomics): write through dst.
                0x02 | 0x03 => {
                    let slot = touched(&from_frame, dst);
                    reached(&mut deepest, slot);
                    if let Some(slot) = slot {
                        match from_frame.get(src).copied().flatten() {
                            Some(offset) if op == 0x7b => spilled.insert(slot, offset),
                            _ => spilled.remove(&slot),
                        };
                    }
                }
                // Any other ALU operation or load writes dst.
                0x00 | 0x04 | 0x07 => from_frame[dst_reg] = None,
                _ => {}
            },
        }
        i += 1;
    }
    callees.sort_unstable();
    callees.dedup();
    Ok(Scan {
        frame: deepest.clamp(0, u32::MAX as i64) as u32,
        callees,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Instructions as the tests spell them: (opcode, dst, src, off, imm).
    fn code(insns: &[(u8, u8, u8, i16, i32)]) -> Vec<u8> {
        insns
            .iter()
            .flat_map(|(op, dst, src, off, imm)| {
                let mut insn = vec![*op, dst | (src << 4)];
                insn.extend(off.to_le_bytes());
                insn.extend(imm.to_le_bytes());
                insn
            })
            .collect()
    }

    fn frame_of(insns: &[(u8, u8, u8, i16, i32)]) -> u32 {
        scan("test", &code(insns), |_, _, _| Ok(None))
            .unwrap()
            .frame
    }

    #[test]
    fn a_frame_is_the_deepest_byte_addressed_through_r10_or_a_copy() {
        // *(u64 *)(r10 - 8) = r1; r2 = *(u32 *)(r10 - 40)
        assert_eq!(frame_of(&[(0x7b, 10, 1, -8, 0), (0x61, 2, 10, -40, 0)]), 40);
        // r2 = r10; r2 += -96; *(u8 *)(r2 + 4) = 0: the pointer made reaches 96 bytes down,
        // whatever is done through it (a helper's buffer, a key).
        assert_eq!(
            frame_of(&[
                (0xbf, 2, 10, 0, 0),
                (0x07, 2, 0, 0, -96),
                (0x72, 2, 0, 4, 0)
            ]),
            96
        );
        // r3 = r10; r3 += -8; r3 -= 120; call: handed to a helper, never dereferenced here.
        assert_eq!(
            frame_of(&[
                (0xbf, 3, 10, 0, 0),
                (0x07, 3, 0, 0, -8),
                (0x17, 3, 0, 0, 120),
                (0x85, 0, 0, 0, 4)
            ]),
            128
        );
        // Indexed upward by a register (a loop over a stack buffer): its start counts.
        assert_eq!(
            frame_of(&[
                (0xbf, 5, 10, 0, 0),
                (0x07, 5, 0, 0, -36),
                (0x0f, 5, 3, 0, 0),
                (0x71, 8, 5, 3, 0)
            ]),
            36
        );
        // A pointer spilled to the stack and filled again keeps its offset.
        assert_eq!(
            frame_of(&[
                (0xbf, 4, 10, 0, 0),
                (0x07, 4, 0, 0, -24),
                (0x7b, 10, 4, -8, 0),
                (0x85, 0, 0, 0, 1),
                (0x79, 5, 10, -8, 0),
                (0x7b, 5, 1, -200, 0),
            ]),
            224
        );
        // The copy is forgotten once the register is written otherwise, or by a helper call.
        assert_eq!(
            frame_of(&[
                (0xbf, 2, 10, 0, 0),
                (0xb7, 2, 0, 0, 1000),
                (0x7b, 2, 1, -300, 0),
                (0xbf, 3, 10, 0, 0),
                (0x85, 0, 0, 0, 1),
                (0x7b, 3, 1, -200, 0),
            ]),
            0
        );
        // A 64-bit load takes two slots: its second half is not an instruction.
        assert_eq!(
            frame_of(&[
                (0x18, 1, 0, 0, 0),
                (0x00, 0, 0, 0, 0),
                (0x7b, 10, 1, -16, 0)
            ]),
            16
        );
    }

    #[test]
    fn calls_and_callbacks_are_reported_where_the_resolver_names_them() {
        let insns = code(&[
            (0x85, 0, 1, 0, -1),     // call a function of the object
            (0x85, 0, 0, 0, 181),    // call a helper: not a function
            (0x18, 2, 0, 0, 0x7468), // r2 = &callback ll
            (0x00, 0, 0, 0, 0),
        ]);
        let mut asked = Vec::new();
        let scanned = scan("test", &insns, |index, call, load| {
            asked.push((index, call, load));
            Ok(Some(index + 100))
        })
        .unwrap();
        assert_eq!(asked, vec![(0, Some(-1), None), (2, None, Some(0x7468))]);
        assert_eq!(scanned.callees, vec![100, 102]);
    }

    #[test]
    fn frames_round_as_the_stricter_verifier_rounds_them() {
        assert_eq!(round_frame(0), 32);
        assert_eq!(round_frame(8), 32);
        assert_eq!(round_frame(168), 192);
        assert_eq!(round_frame(256), 256);
    }

    /// A stack pointer moved down by a register is refused, not guessed; a chain is bounded.
    #[test]
    fn what_the_object_cannot_say_is_an_error() {
        let moved = code(&[(0xbf, 2, 10, 0, 0), (0x1f, 2, 3, 0, 0)]);
        assert!(matches!(
            scan("f", &moved, |_, _, _| Ok(None)),
            Err(StackError::VariableStackOffset { .. })
        ));
        // Nine functions calling each other in a line: past the verifier's 8 frames.
        let frames = [8u32; 9];
        let callees: Vec<Vec<usize>> = (0..9)
            .map(|i| if i < 8 { vec![i + 1] } else { vec![] })
            .collect();
        let mut memo = HashMap::new();
        assert_eq!(deepest(0, &frames, &callees, &mut memo, 1), None);
        let mut memo = HashMap::new();
        assert_eq!(
            deepest(1, &frames, &callees, &mut memo, 1).map(|c| c.0),
            Some(8 * 32)
        );
    }

    #[test]
    fn short_names_are_the_last_path_segment() {
        assert_eq!(
            short_name("_RNvNtNtCs42rr3dcdXEe_11fanout_ebpf6worker9tokenizer12step_request"),
            "step_request"
        );
        assert_eq!(short_name("worker_libc_write"), "worker_libc_write");
        assert_eq!(short_name("memset"), "memset");
    }

    /// The object this binary carries: every program's deepest chain within 512 bytes, and
    /// the chains through the tokenizer found (a resolver that missed the `bpf_loop` callbacks
    /// would pass the first check for nothing).
    #[test]
    fn every_program_of_this_object_fits_a_stack_without_private_stacks() {
        let Some(object) = crate::ebpf::EBPF_OBJECT else {
            panic!("this test needs the eBPF object: build without AYA_BUILD_SKIP");
        };
        let chains = deepest_chains(object).unwrap();
        assert!(chains.len() >= 35, "{} programs", chains.len());
        for chain in &chains {
            assert!(
                chain.bytes <= MAX_CHAIN_BYTES,
                "{}: {} bytes on its deepest call chain ({})",
                chain.program,
                chain.bytes,
                chain.describe()
            );
        }
        let write = chains
            .iter()
            .find(|c| c.program == "worker_libc_write")
            .expect("worker_libc_write");
        let path = write.describe();
        assert!(
            path.contains("step_request") || path.contains("step_with"),
            "the write program's deepest chain does not go through the tokenizer: {path}"
        );
    }
}
