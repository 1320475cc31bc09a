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

use object::{Object, ObjectSection, SectionKind};

use super::machine_code::{branches_to, file_offset_of, BranchesTo, Functions};

/// More call sites than this and the entry probe is cheaper to attach (one link per site);
/// the builds of the version matrix have 2 to 8.
pub const MAX_CALL_SITES: usize = 32;

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
