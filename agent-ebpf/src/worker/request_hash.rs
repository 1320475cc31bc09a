//! The hash of a request buffer (`agent_common::fastpath`'s), by chunks under `bpf_loop`: what
//! tells a repeat of a connection's last blocking call from any other write.

use super::{quick::read_user_prefix, MapOpaque};
use agent_common::args_hash::{ArgsHash, ChunkStep, ARGS_CHUNK, ARGS_WORDS};
use agent_common::fastpath::{ByteHash, HASH_CHUNK, HASH_WORDS, MAX_TEMPLATE_BYTES};
use aya_ebpf::helpers::generated::bpf_loop;
use aya_ebpf::macros::map;
use aya_ebpf::maps::PerCpuArray;
use core::ffi::c_void;

/// The chunk of a request being hashed (see `agent_common::fastpath`).
#[map]
pub(super) static HASH_SCRATCH: PerCpuArray<[u64; HASH_WORDS]> =
    PerCpuArray::with_max_entries(1, 0);

/// Hashing state of a request buffer. It lives in a per-CPU map, as the tokenizer's does,
/// so that the verifier checks the loop body once rather than once per position.
#[repr(C)]
pub(super) struct HashState {
    buf: u64,
    len: u64,
    pos: u64,
    hash: ByteHash,
    failed: u64,
}

#[map]
pub(super) static HASH_STATE: PerCpuArray<HashState> = PerCpuArray::with_max_entries(1, 0);

/// Folds the next chunk of the buffer into the hash; returns 1 at the end (or on a failed
/// read).
#[inline(always)]
pub(super) fn hash_next_chunk() -> i64 {
    let (Some(state), Some(words), Some(opaque)) = (
        HASH_STATE.get_ptr_mut(0),
        HASH_SCRATCH.get_ptr_mut(0),
        MapOpaque::get(),
    ) else {
        return 1;
    };
    let (state, words) = unsafe { (&mut *state, &mut *words) };
    let left = state.len.saturating_sub(state.pos);
    if left == 0 {
        return 1;
    }
    let Some(n) = read_user_prefix::<HASH_CHUNK>(
        words.as_mut_ptr().cast(),
        state.buf + state.pos,
        left,
        &opaque,
    ) else {
        state.failed = 1;
        return 1;
    };
    state.hash.chunk(words, n);
    state.pos += n;
    (state.pos >= state.len) as i64
}

pub(super) extern "C" fn hash_step(_index: u32, _args: *mut c_void) -> i64 {
    hash_next_chunk()
}

/// `fastpath::ByteHash` of a request buffer of `len` bytes (at most `MAX_TEMPLATE_BYTES`),
/// with its low bit set; 0 when it could not be read. A plain number: an `Option`'s `None`
/// left a register the verifier refused to read uninitialised once a second hash was compared
/// next to it.
#[inline(never)]
pub(super) fn request_hash(buf: u64, len: u64) -> u64 {
    if len == 0 || len > MAX_TEMPLATE_BYTES {
        return 0;
    }
    let Some(state) = HASH_STATE.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        *state = HashState {
            buf,
            len,
            pos: 0,
            hash: ByteHash::start(len),
            failed: 0,
        }
    };
    // The common case (a short command) in one chunk, without a loop.
    if hash_next_chunk() == 0 {
        unsafe {
            bpf_loop(
                (MAX_TEMPLATE_BYTES / HASH_CHUNK as u64) as u32,
                hash_step as *mut c_void,
                core::ptr::null_mut(),
                0,
            );
        }
    }
    let state = unsafe { &*state };
    if state.failed == 0 && state.pos == len {
        state.hash.value()
    } else {
        0
    }
}

/// The buffer `args_hash` reads, and its state between chunks (per-CPU, as `HashState`).
#[repr(C)]
pub(super) struct ArgsHashState {
    buf: u64,
    len: u64,
    hash: ArgsHash,
}

#[map]
pub(super) static ARGS_STATE: PerCpuArray<ArgsHashState> = PerCpuArray::with_max_entries(1, 0);

/// The chunk of a request `args_hash` reads (larger than the byte hash's, see `ARGS_CHUNK`).
#[map]
pub(super) static ARGS_SCRATCH: PerCpuArray<[u64; ARGS_WORDS]> =
    PerCpuArray::with_max_entries(1, 0);

/// Reads the arguments of the next chunk; returns 1 when done (or not taken).
#[inline(always)]
fn args_next_chunk() -> i64 {
    let (Some(state), Some(words), Some(opaque)) = (
        ARGS_STATE.get_ptr_mut(0),
        ARGS_SCRATCH.get_ptr_mut(0),
        MapOpaque::get(),
    ) else {
        return 1;
    };
    let state = unsafe { &mut *state };
    let left = state.len.saturating_sub(state.hash.pos);
    let Some(n) =
        read_user_prefix::<ARGS_CHUNK>(words.cast(), state.buf + state.hash.pos, left, &opaque)
    else {
        state.hash.failed = 1;
        return 1;
    };
    match state.hash.chunk(unsafe { &*words }, n, state.len, &opaque) {
        ChunkStep::More => 0,
        ChunkStep::Done | ChunkStep::Failed => 1,
    }
}

extern "C" fn args_step(_index: u32, _args: *mut c_void) -> i64 {
    args_next_chunk()
}

/// `agent_common::args_hash` of a request buffer of `len` bytes (at most
/// `MAX_TEMPLATE_BYTES`): the same for the same keys in any order; 0 when not taken (a plain
/// number rather than an `Option`, whose `None` would leave a register the verifier refuses
/// to read uninitialised).
#[inline(never)]
pub(super) fn args_hash(buf: u64, len: u64) -> u64 {
    if len == 0 || len > MAX_TEMPLATE_BYTES {
        return 0;
    }
    let Some(state) = ARGS_STATE.get_ptr_mut(0) else {
        return 0;
    };
    unsafe {
        *state = ArgsHashState {
            buf,
            len,
            hash: ArgsHash::default(),
        }
    };
    // Each chunk starts at an argument and ends before the first one it cannot hold whole, or
    // after ARGS_PER_CHUNK (32) arguments. The bound, 130 reads, holds the largest template
    // (64 KiB) read 512 bytes or more at a time on average, or 2080 arguments read 16 or more
    // at a time: a Sidekiq fetch of 440 keys of GitLab's lengths takes about 25. Keys of very
    // different sizes can leave reads short (a key of 900 bytes after short ones); a list that
    // needs more reads is not taken (0) and goes to the tokenizer, which costs time but never
    // a wrong match.
    unsafe {
        bpf_loop(
            (2 * MAX_TEMPLATE_BYTES / ARGS_CHUNK as u64 + 2) as u32,
            args_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    let state = unsafe { &*state };
    if state.hash.failed == 0 && state.hash.left == 0 && state.hash.pos == len {
        state.hash.value(len)
    } else {
        0
    }
}
