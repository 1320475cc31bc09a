//! A streaming RESP tokenizer that needs no allocation and looks at most [`WINDOW`] bytes at a
//! time, so that the same code runs in the eBPF programs (on bytes copied from a worker's
//! send/receive buffers) and in user space (tests, fuzzing, key-list extraction).
//!
//! The request side follows the commands a worker sends: arrays of bulk strings. It recognises
//! blocking pops by name (any letter case), counts the keys they list, and computes a signature
//! of the key list so that the full list is read only when it changes. The reply side counts
//! complete top-level replies and classifies each reply as it starts (data, nil, error), which
//! is all the latency measurement needs. Bulk bodies (job payloads) are skipped by length,
//! never inspected, except for the few short arguments a command's shape depends on.
//!
//! The caller feeds windows: the next up to `WINDOW` bytes of the stream at the current
//! position (a request step also gets the `WINDOW` bytes after them, where a listened key's
//! last bytes may lie), and advances by what `step` consumed. When `step` asks for more, the caller keeps
//! the unconsumed bytes (fewer than `WINDOW`) and prepends them to the next buffer.

use crate::mix::mix;

/// Bytes looked at per step. A bulk header plus a command name (`$10\r\nXREADGROUP\r\n`, 17
/// bytes) or a numeric argument fits.
pub const WINDOW: usize = 32;
/// Bytes a request step is given: its window and the window after it, which it reads only for
/// a listened key's last bytes (a key of up to 57 bytes with a 2-digit length ends there, and
/// is hashed and consumed in one step).
pub const AHEAD: usize = 2 * WINDOW;
/// Deepest nesting of aggregate replies followed (BRPOP: 1; EXEC of arrays: 2; XREAD: 4).
pub const MAX_DEPTH: usize = 8;
/// Longest argument list or aggregate accepted; anything larger is taken for garbage.
pub const MAX_COUNT: i64 = 1 << 20;
/// Longest bulk string accepted (Redis's proto-max-bulk-len default is 512 MB).
pub const MAX_BULK: i64 = 512 * 1024 * 1024;

/// Blocking commands the worker side recognises.
pub mod command {
    pub const NONE: u32 = 0;
    pub const BRPOP: u32 = 1;
    pub const BLPOP: u32 = 2;
    pub const BLMOVE: u32 = 3;
    pub const BRPOPLPUSH: u32 = 4;
    pub const BLMPOP: u32 = 5;
    pub const BZPOPMIN: u32 = 6;
    pub const BZPOPMAX: u32 = 7;
    pub const BZMPOP: u32 = 8;
    pub const XREAD: u32 = 9;
    pub const XREADGROUP: u32 = 10;
    pub const COUNT: usize = 11;

    pub fn name(id: u32) -> &'static str {
        match id {
            BRPOP => "BRPOP",
            BLPOP => "BLPOP",
            BLMOVE => "BLMOVE",
            BRPOPLPUSH => "BRPOPLPUSH",
            BLMPOP => "BLMPOP",
            BZPOPMIN => "BZPOPMIN",
            BZPOPMAX => "BZPOPMAX",
            BZMPOP => "BZMPOP",
            XREAD => "XREAD",
            XREADGROUP => "XREADGROUP",
            _ => "",
        }
    }
}

/// How a reply starts.
pub mod reply_kind {
    /// An array, map, set or non-nil bulk: the pop returned data.
    pub const DATA: u32 = 0;
    /// A nil (`*-1`, `$-1`) or RESP3 null (`_`): the pop timed out.
    pub const NIL: u32 = 1;
    /// An error (`-`, `!`).
    pub const ERROR: u32 = 2;
    /// Anything else (a status or number): not a pop reply.
    pub const OTHER: u32 = 3;
}

// The helpers below avoid data-dependent branches where they can (table lookups and masks
// instead of `if`), because the eBPF verifier explores every branch path separately. The digit
// scan of a number line is the exception: it stops at the first non-digit, and hiding its
// results ([`Opaque`]) merges the paths of every digit count at once (a branchless scan of all
// 18 bytes made the compiler keep them on the stack; see `number_line`).

/// Hides a value from the eBPF verifier. The verifier follows every branch path separately and
/// cannot merge paths that differ only in a number (how many digits a length had); adding to
/// the result a zero read from a map (which the verifier cannot know to be zero) makes it an
/// unknown number on every path, so the paths become one again. In user space it is the
/// identity.
pub trait Opaque {
    fn hide(&self, x: u64) -> u64;
}

/// The identity [`Opaque`], for user space.
pub struct Transparent;

impl Opaque for Transparent {
    #[inline(always)]
    fn hide(&self, x: u64) -> u64 {
        x
    }
}

/// Byte classes as tables: a lookup is one load, where a comparison would be a branch (eBPF
/// has no conditional move), and a branch per byte multiplies the verifier's paths.
const fn class_table(kind: u8) -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut b = 0usize;
    while b < 256 {
        let c = b as u8;
        t[b] = match kind {
            // 1 for a decimal digit
            0 => c.is_ascii_digit() as u8,
            // upper-cased byte
            2 => c.to_ascii_uppercase(),
            // 1 for '\r'
            3 => (c == b'\r') as u8,
            // 1 for '\n'
            4 => (c == b'\n') as u8,
            // 1 for '-'
            _ => (c == b'-') as u8,
        };
        b += 1;
    }
    t
}

static IS_DIGIT: [u8; 256] = class_table(0);
static UPPER: [u8; 256] = class_table(2);
static IS_CR: [u8; 256] = class_table(3);
static IS_LF: [u8; 256] = class_table(4);
static IS_MINUS: [u8; 256] = class_table(5);

/// The window contract: bytes `w[..avail]` are data and, when `avail < WINDOW`, `w[avail]` is
/// not a digit (callers zero it), so scans stop at the end of the data without comparing
/// positions. Indexes wrap at the window size (never out of bounds); at `avail == WINDOW` the
/// wrap lands on `w[0]`, a type byte, which is not a digit either.
#[inline(always)]
fn at<const N: usize>(w: &[u8; N], i: usize) -> u8 {
    w[i & (N - 1)]
}

/// The upper-case bytes `w[start..start+len]` (len <= 8) packed little-endian into a u64,
/// zero past `len`.
#[inline(always)]
fn pack_upper<O: Opaque>(w: &[u8; WINDOW], start: usize, len: usize, o: &O) -> u64 {
    let mut packed = 0u64;
    let mut i = 0;
    while i < 8 {
        packed |= (UPPER[at(w, start + i) as usize] as u64) << (8 * i);
        i += 1;
    }
    let mask = if len >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * len)) - 1
    };
    o.hide(packed & mask)
}

/// The bytes `w[start..start+len]` (len <= 8) as they are, packed and zero past `len`.
#[inline(always)]
fn pack_raw<O: Opaque, const N: usize>(w: &[u8; N], start: usize, len: usize, o: &O) -> u64 {
    let mut packed = 0u64;
    let mut i = 0;
    while i < 8 {
        packed |= (at(w, start + i) as u64) << (8 * i);
        i += 1;
    }
    let mask = if len >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * len)) - 1
    };
    o.hide(packed & mask)
}

const fn pack_const(name: &[u8], from: usize) -> u64 {
    let mut packed = 0u64;
    let mut i = 0;
    while i < 8 && from + i < name.len() {
        packed |= (name[from + i] as u64) << (8 * i);
        i += 1;
    }
    packed
}

/// A name as (length, first 8 bytes, next 8 bytes), for comparisons without loops.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Name(usize, u64, u64);

const fn name(text: &[u8]) -> Name {
    Name(text.len(), pack_const(text, 0), pack_const(text, 8))
}

#[inline(always)]
fn name_at<O: Opaque>(w: &[u8; WINDOW], start: usize, len: usize, o: &O) -> Name {
    let rest = if len > 8 { len - 8 } else { 0 };
    Name(
        len,
        pack_upper(w, start, len, o),
        pack_upper(w, start + 8, rest, o),
    )
}

const BLOCK: Name = name(b"BLOCK");
const STREAMS: Name = name(b"STREAMS");

fn command_of<O: Opaque>(w: &[u8; WINDOW], start: usize, len: usize, o: &O) -> u32 {
    if len < 5 || len > 10 {
        return command::NONE;
    }
    let n = name_at(w, start, len, o);
    if n == name(b"BRPOP") {
        command::BRPOP
    } else if n == name(b"BLPOP") {
        command::BLPOP
    } else if n == name(b"BLMOVE") {
        command::BLMOVE
    } else if n == name(b"BRPOPLPUSH") {
        command::BRPOPLPUSH
    } else if n == name(b"BLMPOP") {
        command::BLMPOP
    } else if n == name(b"BZPOPMIN") {
        command::BZPOPMIN
    } else if n == name(b"BZPOPMAX") {
        command::BZPOPMAX
    } else if n == name(b"BZMPOP") {
        command::BZMPOP
    } else if n == name(b"XREAD") {
        command::XREAD
    } else if n == name(b"XREADGROUP") {
        command::XREADGROUP
    } else {
        command::NONE
    }
}

/// A number line: `<digits>\r\n` starting at `start`.
enum Num {
    Value(i64, usize),
    Incomplete,
    Invalid,
}

/// Most digits of a number line (lengths and counts are far shorter).
const MAX_DIGITS: usize = 18;

#[inline(always)]
fn number_line<O: Opaque>(w: &[u8; WINDOW], start: usize, avail: usize, o: &O) -> Num {
    let negative = o.hide(IS_MINUS[at(w, start) as usize] as u64) & 1;
    let first = start + negative as usize;
    // Stops at the first byte that is not a digit, as the shortcuts' length lines do; the
    // hidden results below merge the digit counts' paths at once. Without a branch (a mask
    // that stayed 0 after the first non-digit, every byte read) the compiler computed the
    // value after the loop from all 18 bytes and masks, kept meanwhile on the stack: a frame
    // that, added to its callers', passed the 512 bytes a call chain may use where the kernel
    // gives uprobe programs no private stack.
    let mut value = 0u64;
    let mut digits = 0u64;
    while digits < MAX_DIGITS as u64 {
        let b = at(w, first + digits as usize);
        if IS_DIGIT[b as usize] == 0 {
            break;
        }
        value = value * 10 + (b & 0xf) as u64;
        digits += 1;
    }
    // One path from here on, whatever the number of digits.
    let digits = o.hide(digits) & 31;
    let value = o.hide(value) & ((1 << 60) - 1);
    let cr = (o.hide(first as u64 + digits) & 63) as usize;
    if cr >= avail {
        return if avail >= WINDOW || digits as usize >= MAX_DIGITS {
            Num::Invalid
        } else {
            Num::Incomplete
        };
    }
    if digits == 0 || digits as usize >= MAX_DIGITS || at(w, cr) != b'\r' || cr >= WINDOW {
        return Num::Invalid;
    }
    if cr + 1 >= avail {
        return if avail >= WINDOW {
            Num::Invalid
        } else {
            Num::Incomplete
        };
    }
    if at(w, cr + 1) != b'\n' {
        return Num::Invalid;
    }
    let v = value as i64;
    Num::Value(if negative != 0 { -v } else { v }, cr + 2)
}

/// Outcome of one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Consumed this many bytes (at least 1), possibly completing something.
    Consumed(usize),
    /// The window holds an incomplete token: keep the bytes and feed more.
    NeedMore,
    /// Not RESP, or not a state this tokenizer follows: stop following this stream.
    Invalid,
}

/// A blocking call recognised in the request stream.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockingCall {
    pub command: u32,
    pub keys: u32,
    /// The sum of the listed keys' hashes ([`key_hash`]: length, first and last 8 bytes):
    /// changes when the key list does, whatever the keys' order.
    pub signature: u64,
    /// Index of this command on its connection (0 for the first), i.e. of its reply.
    pub index: u64,
}

/// State of the request direction of one connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestState {
    /// Bytes of the current bulk body (with its CRLF) still to skip.
    pub skip: u64,
    /// Complete commands seen on this connection.
    pub commands: u64,
    pub signature: u64,
    /// Bulks left in the current command; 0 between commands.
    pub args_left: u32,
    pub arg_index: u32,
    pub argc: u32,
    pub command: u32,
    /// BLMPOP/BZMPOP: numkeys argument; XREAD: number of streams.
    pub numkeys: u32,
    /// XREAD/XREADGROUP: index of the STREAMS argument, 0 before it.
    pub streams_at: u32,
    /// XREAD/XREADGROUP: BLOCK was given (otherwise it does not block).
    pub block_seen: u32,
    /// 1 while a listened key's last bytes are still to be read: the body being skipped is
    /// that key's, and its last [`TAIL_SKIP`] bytes are not skipped but read.
    pub tail_pending: u32,
    /// [`key_head`] of the key whose tail is pending.
    pub key_head: u64,
}

/// Bytes of a key's end that its hash takes (with its length and first bytes).
pub const KEY_TAIL: usize = 8;
/// A pending tail as it lies in the stream: the key's last bytes and the CRLF.
const TAIL_SKIP: u64 = KEY_TAIL as u64 + 2;
const KEY_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// The first part of a listened key's hash: its length and its first (up to) 8 bytes,
/// zero-padded. Kept in the state while the key's body is skipped to its tail.
#[inline(always)]
pub fn key_head(len: u64, first: u64) -> u64 {
    mix(mix(KEY_SEED, len), first)
}

/// A listened key's hash, which the signature sums: its length and its first and last (up to)
/// 8 bytes. IDs and shard numbers sit at a key's end (`queue:mailers_3`, `reply:<uuid>`) and
/// prefixes at its start; only keys of the same length that differ nowhere in those 16 bytes
/// hash the same. A key of 8 bytes or fewer is all in `first`, and `last` is `first`.
#[inline(always)]
pub fn key_hash(head: u64, last: u64) -> u64 {
    mix(head, last)
}

impl RequestState {
    /// Whether argument `index` of the current command is a key it listens to. XREAD's keys
    /// are known once STREAMS is seen: the first half of the remaining arguments.
    fn is_listened_key(&self, index: u32) -> bool {
        let argc = self.argc;
        match self.command {
            command::BRPOP | command::BLPOP | command::BZPOPMIN | command::BZPOPMAX => {
                index >= 1 && index + 2 <= argc
            }
            command::BLMOVE | command::BRPOPLPUSH => index == 1,
            command::BLMPOP | command::BZMPOP => index >= 3 && index < 3 + self.numkeys,
            command::XREAD | command::XREADGROUP => {
                self.streams_at > 0
                    && index > self.streams_at
                    && index <= self.streams_at + (argc - self.streams_at - 1) / 2
            }
            _ => false,
        }
    }

    fn keys(&self) -> u32 {
        match self.command {
            command::BRPOP | command::BLPOP | command::BZPOPMIN | command::BZPOPMAX => {
                self.argc.saturating_sub(2)
            }
            command::BLMOVE | command::BRPOPLPUSH => 1,
            command::BLMPOP | command::BZMPOP => self.numkeys,
            command::XREAD | command::XREADGROUP if self.streams_at > 0 => {
                (self.argc - self.streams_at - 1) / 2
            }
            _ => 0,
        }
    }

    /// One step over the window `w[..min(ahead, WINDOW)]`, given `w[..ahead]` (ahead <= AHEAD):
    /// the bytes past the window are read only for a listened key that ends in them, which the
    /// step then consumes whole (the only step that consumes more than its window).
    /// Returns the step and, when a command completed and it was a blocking call, that call.
    pub fn step(&mut self, w: &[u8; AHEAD], ahead: usize) -> (Step, Option<BlockingCall>) {
        self.step_with(w, ahead, &Transparent)
    }

    /// [`Self::step`] with values hidden from the eBPF verifier by `o`.
    #[inline(never)]
    pub fn step_with<O: Opaque>(
        &mut self,
        lookahead: &[u8; AHEAD],
        ahead: usize,
        o: &O,
    ) -> (Step, Option<BlockingCall>) {
        let ahead = if ahead > AHEAD { AHEAD } else { ahead };
        let avail = if ahead > WINDOW { WINDOW } else { ahead };
        // The window is the first half.
        let w = unsafe { &*(lookahead.as_ptr() as *const [u8; WINDOW]) };
        if avail == 0 {
            return (Step::NeedMore, None);
        }
        if self.skip > 0 {
            if self.tail_pending != 0 {
                return self.step_to_tail(w, avail, o);
            }
            let n = if (avail as u64) < self.skip {
                avail
            } else {
                self.skip as usize
            };
            self.skip -= n as u64;
            return (Step::Consumed(n), self.finish_arg_if_done());
        }
        if self.args_left == 0 {
            // A command starts: `*<argc>\r\n`.
            if w[0] != b'*' {
                return (Step::Invalid, None);
            }
            return match number_line(w, 1, avail, o) {
                Num::Value(n, end) if n >= 1 && n <= MAX_COUNT => {
                    self.args_left = n as u32;
                    self.argc = n as u32;
                    self.arg_index = 0;
                    self.command = command::NONE;
                    self.numkeys = 0;
                    self.streams_at = 0;
                    self.block_seen = 0;
                    self.signature = 0;
                    self.tail_pending = 0;
                    (Step::Consumed(end), None)
                }
                Num::Incomplete => (Step::NeedMore, None),
                _ => (Step::Invalid, None),
            };
        }
        // An argument: `$<len>\r\n<body>\r\n`.
        if w[0] != b'$' {
            return (Step::Invalid, None);
        }
        let (len, header) = match number_line(w, 1, avail, o) {
            Num::Value(n, end) if n >= 0 && n <= MAX_BULK => (n as usize, end),
            Num::Incomplete => return (Step::NeedMore, None),
            _ => return (Step::Invalid, None),
        };
        let index = self.arg_index;
        // Arguments whose content matters are short; they must be whole in the window.
        let inspect = index == 0
            || ((self.command == command::BLMPOP || self.command == command::BZMPOP) && index == 2)
            || ((self.command == command::XREAD || self.command == command::XREADGROUP)
                && self.streams_at == 0
                && (len == 5 || len == 7));
        if inspect && header + len + 2 <= WINDOW {
            if header + len + 2 > avail {
                return (Step::NeedMore, None);
            }
            if index == 0 {
                self.command = o.hide(command_of(w, header, len, o) as u64) as u32;
            } else if index == 2
                && (self.command == command::BLMPOP || self.command == command::BZMPOP)
            {
                match number_line(w, header, header + len + 2, o) {
                    Num::Value(n, end) if n >= 1 && n <= MAX_COUNT && end == header + len + 2 => {
                        self.numkeys = n as u32
                    }
                    _ => return (Step::Invalid, None),
                }
            } else {
                let n = name_at(w, header, len, o);
                if n == BLOCK {
                    self.block_seen = 1;
                } else if n == STREAMS {
                    self.streams_at = index;
                }
            }
        }
        // Skip the body and its CRLF (possibly across buffers).
        let total = len as u64 + 2;
        let here = (avail - header) as u64;
        if self.is_listened_key(index) {
            // The key's hash takes its first bytes: they must be in the window whatever the
            // buffer boundaries, or the same keys would sign differently.
            let prefix = if len < KEY_TAIL { len } else { KEY_TAIL };
            if header + prefix > avail {
                return (Step::NeedMore, None);
            }
            let first = pack_raw(w, header, prefix, o);
            let head = key_head(len as u64, first);
            if len <= KEY_TAIL {
                self.add_key(key_hash(head, first), o);
            } else if header + len + 2 <= ahead {
                // The key ends in the window or the next: read its end and check its CRLF.
                let end = header + len;
                if at(lookahead, end) != b'\r' || at(lookahead, end + 1) != b'\n' {
                    return (Step::Invalid, None);
                }
                let last = pack_raw(lookahead, end - KEY_TAIL, KEY_TAIL, o);
                self.add_key(key_hash(head, last), o);
                // Consumed whole, past the window if need be: one step for the key, where
                // skipping its body took a second one.
                self.skip = 0;
                return (Step::Consumed(header + len + 2), self.finish_arg());
            } else {
                // The key's end is in a later window: skip to it, not past it.
                self.key_head = head;
                self.tail_pending = 1;
                let to_tail = total - TAIL_SKIP;
                let n = if here < to_tail { here } else { to_tail };
                self.skip = total - n;
                return (Step::Consumed(header + n as usize), None);
            }
        }
        if here >= total {
            // Hidden and masked: the compiler would otherwise drop the mask after the range
            // check below, in a form the verifier cannot follow.
            let body_end = (o.hide((header + len) as u64) & 63) as usize;
            if body_end + 1 < WINDOW
                && body_end + 1 < avail
                && (at(w, body_end) != b'\r' || at(w, body_end + 1) != b'\n')
            {
                return (Step::Invalid, None);
            }
            self.skip = 0;
            let consumed = header + total as usize;
            (Step::Consumed(consumed), self.finish_arg())
        } else {
            self.skip = total - here;
            (Step::Consumed(avail), None)
        }
    }

    #[inline(always)]
    fn add_key<O: Opaque>(&mut self, hash: u64, o: &O) {
        // Summed, not chained: the same keys in another order sign the same. Sidekiq
        // shuffles its queues before every fetch when they have weights (GitLab gives
        // every queue one), and the key list must not look new each time.
        self.signature = o.hide(self.signature.wrapping_add(hash));
    }

    /// A step inside a listened key's body whose last bytes are still to be hashed: skips up to
    /// them, then reads them and the CRLF when they are all in the window.
    #[inline(always)]
    fn step_to_tail<O: Opaque>(
        &mut self,
        w: &[u8; WINDOW],
        avail: usize,
        o: &O,
    ) -> (Step, Option<BlockingCall>) {
        let avail = avail as u64;
        if self.skip > avail {
            // The tail is not all here: consume what lies before it (a carry keeps the rest).
            let before = self.skip - TAIL_SKIP;
            let n = if avail < before { avail } else { before };
            if n == 0 {
                return (Step::NeedMore, None);
            }
            self.skip -= n;
            return (Step::Consumed(n as usize), None);
        }
        // `skip <= avail <= WINDOW` and `skip >= TAIL_SKIP` while a tail is pending.
        let end = (o.hide(self.skip) & (2 * WINDOW as u64 - 1)) as usize;
        if end < TAIL_SKIP as usize || end > WINDOW {
            return (Step::Invalid, None);
        }
        if at(w, end - 2) != b'\r' || at(w, end - 1) != b'\n' {
            return (Step::Invalid, None);
        }
        let last = pack_raw(w, end - TAIL_SKIP as usize, KEY_TAIL, o);
        self.add_key(key_hash(self.key_head, last), o);
        self.tail_pending = 0;
        self.skip = 0;
        (Step::Consumed(end), self.finish_arg())
    }

    /// Bytes of a bulk body still to skip (the caller may skip them without reading them).
    /// A listened key's tail is not skipped: a long key's body is jumped over up to its last
    /// bytes, which the next window reads; a tail less than a window away is read from there.
    pub fn pending_skip(&self) -> u64 {
        if self.tail_pending == 0 {
            self.skip
        } else if self.skip > WINDOW as u64 {
            self.skip - TAIL_SKIP
        } else {
            0
        }
    }

    /// Skips up to `n` body bytes without looking at them (at most [`Self::pending_skip`]);
    /// returns how many were skipped and the call completed by the skip, if any.
    pub fn skip_bytes(&mut self, n: u64) -> (u64, Option<BlockingCall>) {
        let pending = self.pending_skip();
        let k = if n < pending { n } else { pending };
        self.skip -= k;
        (
            k,
            if k > 0 && self.tail_pending == 0 {
                self.finish_arg_if_done()
            } else {
                None
            },
        )
    }

    fn finish_arg_if_done(&mut self) -> Option<BlockingCall> {
        if self.skip == 0 {
            self.finish_arg()
        } else {
            None
        }
    }

    fn finish_arg(&mut self) -> Option<BlockingCall> {
        self.arg_index += 1;
        self.args_left = self.args_left.saturating_sub(1);
        if self.args_left > 0 {
            return None;
        }
        let index = self.commands;
        self.commands += 1;
        let blocking = match self.command {
            command::NONE => false,
            // XREAD only blocks with BLOCK.
            command::XREAD | command::XREADGROUP => self.block_seen != 0 && self.streams_at > 0,
            _ => true,
        };
        if blocking && self.keys() > 0 {
            Some(BlockingCall {
                command: self.command,
                keys: self.keys(),
                signature: self.signature,
                index,
            })
        } else {
            None
        }
    }

    /// Whether the stream is between commands (a write starting here starts a command).
    pub fn at_command_boundary(&self) -> bool {
        self.args_left == 0 && self.skip == 0
    }
}

/// The start of a top-level reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyStart {
    /// Index of the reply on its connection, matching [`BlockingCall::index`].
    pub index: u64,
    /// A [`reply_kind`].
    pub kind: u32,
}

/// State of the reply direction of one connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyState {
    pub skip: u64,
    /// Complete top-level replies seen.
    pub replies: u64,
    /// Elements left at each open aggregate level.
    pub remaining: [u32; MAX_DEPTH],
    pub depth: u32,
    /// Inside a simple line longer than the window: looking for its CRLF.
    pub in_line: u32,
    /// The open top-level item is out of band (RESP3 push or attribute): not a reply.
    pub out_of_band: u32,
    pub _pad: u32,
}

impl ReplyState {
    fn element_done(&mut self) {
        // Close every aggregate that this element completes.
        let mut guard = 0;
        while guard < MAX_DEPTH {
            guard += 1;
            if self.depth == 0 {
                if self.out_of_band != 0 {
                    self.out_of_band = 0;
                } else {
                    self.replies += 1;
                }
                return;
            }
            let top = (self.depth - 1) as usize;
            if top >= MAX_DEPTH {
                return;
            }
            if self.remaining[top] > 1 {
                self.remaining[top] -= 1;
                return;
            }
            self.remaining[top] = 0;
            self.depth -= 1;
        }
    }

    /// Bytes of a bulk body still to skip.
    pub fn pending_skip(&self) -> u64 {
        self.skip
    }

    /// Skips up to `n` body bytes without looking at them; returns how many were skipped.
    pub fn skip_bytes(&mut self, n: u64) -> u64 {
        let k = if n < self.skip { n } else { self.skip };
        self.skip -= k;
        if k > 0 && self.skip == 0 {
            self.element_done();
        }
        k
    }

    /// One step over `w[..avail]`: returns the step and, if a top-level reply started here,
    /// its index and kind.
    pub fn step(&mut self, w: &[u8; WINDOW], avail: usize) -> (Step, Option<ReplyStart>) {
        self.step_with(w, avail, &Transparent)
    }

    /// [`Self::step`] with values hidden from the eBPF verifier by `o`.
    #[inline(never)]
    pub fn step_with<O: Opaque>(
        &mut self,
        w: &[u8; WINDOW],
        avail: usize,
        o: &O,
    ) -> (Step, Option<ReplyStart>) {
        let avail = if avail > WINDOW { WINDOW } else { avail };
        if avail == 0 {
            return (Step::NeedMore, None);
        }
        if self.skip > 0 {
            let n = if (avail as u64) < self.skip {
                avail
            } else {
                self.skip as usize
            };
            self.skip -= n as u64;
            if self.skip == 0 {
                self.element_done();
            }
            return (Step::Consumed(n), None);
        }
        if self.in_line != 0 {
            return self.scan_line(w, 0, avail, None, o);
        }
        let kind_byte = w[0];
        let top_level = self.depth == 0;
        let start = |kind: u32, s: &Self| {
            if top_level && kind_byte != b'>' && kind_byte != b'|' {
                Some(ReplyStart {
                    index: s.replies,
                    kind,
                })
            } else {
                None
            }
        };
        match kind_byte {
            b'+' | b'-' | b':' | b',' | b'#' | b'(' => {
                let kind = match kind_byte {
                    b'-' => reply_kind::ERROR,
                    _ => reply_kind::OTHER,
                };
                let started = start(kind, self);
                self.scan_line(w, 1, avail, started, o)
            }
            b'_' => {
                if avail < 3 {
                    return (Step::NeedMore, None);
                }
                if w[1] != b'\r' || w[2] != b'\n' {
                    return (Step::Invalid, None);
                }
                let started = start(reply_kind::NIL, self);
                self.element_done();
                (Step::Consumed(3), started)
            }
            b'$' | b'!' | b'=' => match number_line(w, 1, avail, o) {
                Num::Value(-1, end) if kind_byte == b'$' => {
                    let started = start(reply_kind::NIL, self);
                    self.element_done();
                    (Step::Consumed(end), started)
                }
                Num::Value(n, end) if n >= 0 && n <= MAX_BULK => {
                    let started = start(
                        if kind_byte == b'!' {
                            reply_kind::ERROR
                        } else {
                            reply_kind::DATA
                        },
                        self,
                    );
                    self.skip = n as u64 + 2;
                    (Step::Consumed(end), started)
                }
                Num::Incomplete => (Step::NeedMore, None),
                _ => (Step::Invalid, None),
            },
            b'*' | b'%' | b'~' | b'>' | b'|' => match number_line(w, 1, avail, o) {
                Num::Value(-1, end) if kind_byte == b'*' => {
                    let started = start(reply_kind::NIL, self);
                    self.element_done();
                    (Step::Consumed(end), started)
                }
                Num::Value(n, end) if n >= 0 && n <= MAX_COUNT => {
                    let started = start(reply_kind::DATA, self);
                    if top_level && (kind_byte == b'>' || kind_byte == b'|') {
                        self.out_of_band = 1;
                    }
                    let elements = if kind_byte == b'%' || kind_byte == b'|' {
                        n * 2
                    } else {
                        n
                    };
                    if elements == 0 {
                        self.element_done();
                    } else {
                        if self.depth as usize >= MAX_DEPTH {
                            return (Step::Invalid, None);
                        }
                        self.remaining[self.depth as usize] = elements as u32;
                        self.depth += 1;
                    }
                    (Step::Consumed(end), started)
                }
                Num::Incomplete => (Step::NeedMore, None),
                _ => (Step::Invalid, None),
            },
            _ => (Step::Invalid, None),
        }
    }

    /// Consumes a simple line from `from` up to its CRLF, across windows if it is long.
    fn scan_line<O: Opaque>(
        &mut self,
        w: &[u8; WINDOW],
        from: usize,
        avail: usize,
        started: Option<ReplyStart>,
        o: &O,
    ) -> (Step, Option<ReplyStart>) {
        // Position of the first CRLF at or after `from`, found without branching per byte.
        // `from` is 0 or 1, and w[0] is a type byte, never '\r': searching from 0 is the same.
        let _ = from;
        let mut found = 0u64;
        let mut at_crlf = 0u64;
        let mut i = 0;
        while i + 1 < WINDOW {
            let here = (IS_CR[at(w, i) as usize] & IS_LF[at(w, i + 1) as usize]) as u64;
            let first = here & (1 - found);
            at_crlf += first * i as u64;
            found |= here;
            i += 1;
        }
        let at_crlf = o.hide(at_crlf) & (WINDOW as u64 - 1);
        // A CRLF found past the data is stale bytes, not this line's end.
        let found = (o.hide(found) & 1) != 0 && (at_crlf as usize) + 1 < avail;
        if found {
            self.in_line = 0;
            self.element_done();
            return (Step::Consumed(at_crlf as usize + 2), started);
        }
        if avail < WINDOW {
            // Could be completed by the next buffer; the start is reported when it is whole.
            return (Step::NeedMore, None);
        }
        // A long line: consume all but the last byte (which may be the '\r').
        self.in_line = 1;
        (Step::Consumed(avail - 1), started)
    }
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::RequestState {}
    unsafe impl aya::Pod for super::ReplyState {}
    unsafe impl aya::Pod for super::BlockingCall {}
}

const _: () = assert!(core::mem::size_of::<RequestState>() == 64);
const _: () = assert!(core::mem::size_of::<ReplyState>() == 16 + 4 * MAX_DEPTH + 16);

/// Either direction's state, for [`drive`].
pub trait Stepper {
    type Event: Copy;
    /// One step over `w[..ahead]` (see [`RequestState::step`]).
    fn step(&mut self, w: &[u8; AHEAD], ahead: usize) -> (Step, Option<Self::Event>);
    fn pending_skip(&self) -> u64;
    fn skip_bytes(&mut self, n: u64) -> (u64, Option<Self::Event>);
}

impl Stepper for RequestState {
    type Event = BlockingCall;
    fn step(&mut self, w: &[u8; AHEAD], ahead: usize) -> (Step, Option<BlockingCall>) {
        RequestState::step(self, w, ahead)
    }
    fn pending_skip(&self) -> u64 {
        RequestState::pending_skip(self)
    }
    fn skip_bytes(&mut self, n: u64) -> (u64, Option<BlockingCall>) {
        RequestState::skip_bytes(self, n)
    }
}

impl Stepper for ReplyState {
    type Event = ReplyStart;
    fn step(&mut self, w: &[u8; AHEAD], ahead: usize) -> (Step, Option<ReplyStart>) {
        // Replies look at their window only.
        let window: &[u8; WINDOW] = w[..WINDOW].try_into().unwrap();
        ReplyState::step(self, window, ahead.min(WINDOW))
    }
    fn pending_skip(&self) -> u64 {
        self.skip
    }
    fn skip_bytes(&mut self, n: u64) -> (u64, Option<ReplyStart>) {
        (ReplyState::skip_bytes(self, n), None)
    }
}

/// The 8 bytes that start `shift` bits (a multiple of 8, below 64) into `low` and go on into
/// `high`, two words that lie one after the other in memory, little-endian: how a word is read
/// at a byte offset from aligned words. `high << (64 - shift)` as two shifts, each below 64,
/// which is 0 when `shift` is 0, so that an aligned offset needs no branch of its own (a shift
/// by 64 is undefined, in Rust and in BPF alike).
#[inline(always)]
pub fn word_across(low: u64, high: u64, shift: u64) -> u64 {
    (low >> shift) | ((high << 1) << (63 - shift))
}

/// The `WINDOW` bytes of a two-window scratch (as its 8 little-endian words) that start at
/// byte `from` (< `WINDOW`), as 4 words: how the probes keep the unconsumed tail of a carry.
/// Two loads and three shifts per word, where a copy byte by byte, unrolled, had the compiler
/// compute its 32 addresses ahead and keep them on the stack.
#[inline(always)]
pub fn shifted_window(words: &[u64; 2 * WINDOW / 8], from: usize) -> [u64; WINDOW / 8] {
    let first = (from & (WINDOW - 1)) >> 3;
    let shift = ((from & 7) * 8) as u64;
    let mut out = [0u64; WINDOW / 8];
    let mut k = 0;
    while k < WINDOW / 8 {
        let low = u64::from_le(words[(first + k) & (2 * WINDOW / 8 - 1)]);
        let high = u64::from_le(words[(first + k + 1) & (2 * WINDOW / 8 - 1)]);
        out[k] = word_across(low, high, shift);
        k += 1;
    }
    out
}

/// Bytes of an incomplete token kept between buffers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carry {
    pub bytes: [u8; WINDOW],
    pub len: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Carry {}

/// Feeds one buffer of a stream through `state` (the user-space twin of the eBPF loop).
/// `on` gets each event with the offset in `data` just after the step that produced it.
/// Returns `Err(())` when the stream is not RESP this tokenizer follows.
pub fn drive<S: Stepper>(
    state: &mut S,
    carry: &mut Carry,
    data: &[u8],
    mut on: impl FnMut(S::Event, usize),
) -> Result<(), ()> {
    let mut pos = 0usize;
    loop {
        // Bulk bodies are jumped over without being read, as the kernel does.
        if carry.len == 0 && state.pending_skip() > 0 && pos < data.len() {
            let (n, event) = state.skip_bytes((data.len() - pos) as u64);
            pos += n as usize;
            if let Some(e) = event {
                on(e, pos);
            }
            continue;
        }
        let mut w = [0u8; AHEAD];
        let c = (carry.len as usize).min(WINDOW);
        w[..c].copy_from_slice(&carry.bytes[..c]);
        // The window, and the bytes after it that a step may look at; none after a carry,
        // as in the probes.
        let room = if c == 0 { AHEAD } else { WINDOW - c };
        let read = room.min(data.len() - pos);
        w[c..c + read].copy_from_slice(&data[pos..pos + read]);
        let take = read.min(WINDOW - c);
        let avail = c + take;
        if avail == 0 {
            return Ok(());
        }
        match state.step(&w, c + read) {
            (Step::Consumed(n), event) => {
                let n = n.min(c + read).max(1);
                if n >= c {
                    pos += n - c;
                    carry.len = 0;
                } else {
                    carry.bytes.copy_within(n..c, 0);
                    carry.len = (c - n) as u32;
                }
                if let Some(e) = event {
                    on(e, pos);
                }
            }
            (Step::NeedMore, _) => {
                if avail >= WINDOW {
                    return Err(());
                }
                carry.bytes[..avail].copy_from_slice(&w[..avail]);
                carry.len = avail as u32;
                return Ok(());
            }
            (Step::Invalid, _) => return Err(()),
        }
    }
}

/// Walks one complete command in `bytes` (the start of a write) and calls `on_key` with each key
/// it listens to, in order. Returns the blocking call, or `None` when `bytes` does not start
/// with a complete blocking command. Used in user space on the full requests the kernel sends
/// when a connection's key list changes; its count and signature agree with [`RequestState`].
pub fn listened_keys<'a>(
    bytes: &'a [u8],
    mut on_key: impl FnMut(&'a [u8]),
) -> Option<BlockingCall> {
    let mut state = RequestState::default();
    let mut pos = 0usize;
    let mut guard = 0usize;
    while pos < bytes.len() && guard < bytes.len() + 2 {
        guard += 1;
        let mut w = [0u8; AHEAD];
        let read = (bytes.len() - pos).min(AHEAD);
        w[..read].copy_from_slice(&bytes[pos..pos + read]);
        let take = read.min(WINDOW);
        // Before the step: is the argument about to be read a listened key?
        let at_key = state.args_left > 0
            && state.skip == 0
            && state.is_listened_key(state.arg_index)
            && w[0] == b'$';
        let (step, call) = state.step(&w, read);
        match step {
            Step::Consumed(n) => {
                if at_key {
                    // `$<len>\r\n<body>`: the body follows the header line.
                    let header_end = w[..take].iter().position(|&b| b == b'\n')? + 1;
                    let len: usize = core::str::from_utf8(&w[1..header_end - 2])
                        .ok()?
                        .parse()
                        .ok()?;
                    let start = pos + header_end;
                    on_key(bytes.get(start..start + len)?);
                }
                pos += n;
                if state.at_command_boundary() {
                    return call;
                }
            }
            Step::NeedMore | Step::Invalid => return None,
        }
    }
    None
}

/// Requests as a client sends them, and a random generator, for the tests of this crate.
#[cfg(test)]
pub(crate) mod encoding {
    extern crate std;
    use std::{format, vec::Vec};

    /// A deterministic xorshift generator for the randomised tests.
    pub fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// A command as an array of bulk strings.
    pub fn encode_bytes(args: &[&[u8]]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// [`encode_bytes`] of text arguments.
    pub fn encode(args: &[&str]) -> Vec<u8> {
        let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        encode_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::encoding::{encode, encode_bytes, xorshift};
    use super::*;
    use std::{format, string::String, vec, vec::Vec};

    fn requests(chunks: &[&[u8]]) -> Result<Vec<BlockingCall>, ()> {
        let (mut s, mut c, mut out) = (RequestState::default(), Carry::default(), Vec::new());
        for chunk in chunks {
            drive(&mut s, &mut c, chunk, |e, _| out.push(e))?;
        }
        Ok(out)
    }

    fn replies(chunks: &[&[u8]]) -> Result<(Vec<ReplyStart>, u64), ()> {
        let (mut s, mut c, mut out) = (ReplyState::default(), Carry::default(), Vec::new());
        for chunk in chunks {
            drive(&mut s, &mut c, chunk, |e, _| out.push(e))?;
        }
        Ok((out, s.replies))
    }

    /// Every way of cutting `data` in two, and one byte at a time, gives the same events.
    fn same_under_any_split<T: PartialEq + core::fmt::Debug>(
        data: &[u8],
        run: impl Fn(&[&[u8]]) -> T,
    ) -> T {
        let whole = run(&[data]);
        for cut in 0..=data.len() {
            assert_eq!(run(&[&data[..cut], &data[cut..]]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(run(&bytes), whole, "byte by byte");
        whole
    }

    fn queues(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("queue:q{i}")).collect()
    }

    fn brpop(keys: &[String], timeout: &str) -> Vec<u8> {
        let mut args: Vec<&str> = vec!["BRPOP"];
        args.extend(keys.iter().map(String::as_str));
        args.push(timeout);
        encode(&args)
    }

    #[test]
    fn brpop_with_1_5_and_440_keys() {
        for n in [1, 5, 440] {
            let data = brpop(&queues(n), "2");
            let calls = if n == 440 {
                requests(&[&data]).unwrap()
            } else {
                same_under_any_split(&data, requests).unwrap()
            };
            assert_eq!(calls.len(), 1);
            assert_eq!(
                (calls[0].command, calls[0].keys, calls[0].index),
                (command::BRPOP, n as u32, 0)
            );
        }
        // The 440-key request split at a few awkward places.
        let data = brpop(&queues(440), "2");
        for cut in [
            1,
            2,
            5,
            7,
            11,
            12,
            13,
            100,
            5000,
            data.len() - 3,
            data.len() - 1,
        ] {
            assert_eq!(
                requests(&[&data[..cut], &data[cut..]]).unwrap()[0].keys,
                440,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn names_in_any_case_and_every_blocking_command() {
        let cases: Vec<(Vec<u8>, u32, u32)> = vec![
            (encode(&["brpop", "a", "b", "0"]), command::BRPOP, 2),
            (encode(&["BlPoP", "a", "1.5"]), command::BLPOP, 1),
            (
                encode(&["BLMOVE", "src", "dst", "LEFT", "RIGHT", "0"]),
                command::BLMOVE,
                1,
            ),
            (
                encode(&["BRPOPLPUSH", "src", "dst", "5"]),
                command::BRPOPLPUSH,
                1,
            ),
            (
                encode(&["BLMPOP", "0", "3", "a", "b", "c", "LEFT", "COUNT", "2"]),
                command::BLMPOP,
                3,
            ),
            (
                encode(&["BZPOPMIN", "z1", "z2", "z3", "0"]),
                command::BZPOPMIN,
                3,
            ),
            (encode(&["bzpopmax", "z1", "0"]), command::BZPOPMAX, 1),
            (
                encode(&["BZMPOP", "1", "2", "z1", "z2", "MIN"]),
                command::BZMPOP,
                2,
            ),
            (
                encode(&[
                    "XREAD", "COUNT", "10", "BLOCK", "2000", "STREAMS", "s1", "s2", "$", "$",
                ]),
                command::XREAD,
                2,
            ),
            (
                encode(&[
                    "XREADGROUP",
                    "GROUP",
                    "g",
                    "c",
                    "block",
                    "0",
                    "streams",
                    "s1",
                    ">",
                ]),
                command::XREADGROUP,
                1,
            ),
        ];
        for (data, cmd, keys) in cases {
            let calls = same_under_any_split(&data, requests).unwrap();
            assert_eq!(calls.len(), 1, "{}", String::from_utf8_lossy(&data));
            assert_eq!(
                (calls[0].command, calls[0].keys),
                (cmd, keys),
                "{}",
                String::from_utf8_lossy(&data)
            );
        }
    }

    #[test]
    fn non_blocking_commands_and_xread_without_block_are_not_reported() {
        let mut data = encode(&["XREAD", "COUNT", "1", "STREAMS", "s1", "0"]);
        data.extend(encode(&["SET", "k", "v"]));
        data.extend(encode(&["BRPOPX", "a", "0"]));
        assert_eq!(same_under_any_split(&data, requests).unwrap(), vec![]);
    }

    #[test]
    fn pipelined_commands_give_the_blocking_call_its_reply_index() {
        let mut data = encode(&["LPUSH", "other", "job payload that is never inspected"]);
        data.extend(encode(&["SET", "a", "b"]));
        data.extend(brpop(&queues(3), "1"));
        data.extend(encode(&["GET", "a"]));
        let calls = same_under_any_split(&data, requests).unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].index, 2);
    }

    #[test]
    fn signature_follows_the_keys_not_the_timeout() {
        let sig = |d: Vec<u8>| requests(&[&d]).unwrap()[0].signature;
        let a = sig(brpop(&queues(20), "2"));
        assert_eq!(a, sig(brpop(&queues(20), "5")));
        assert_ne!(a, sig(brpop(&queues(21), "2")));
        let mut other = queues(20);
        other[7] = "queue:zz".into();
        assert_ne!(a, sig(brpop(&other, "2")));
    }

    /// The key-list signature as documented, byte by byte: the sum over the keys of
    /// `key_hash(key_head(length, first 8 bytes), last 8 bytes)`, each part zero-padded.
    fn specified_signature(keys: &[Vec<u8>]) -> u64 {
        let pack = |b: &[u8]| {
            b.iter()
                .enumerate()
                .fold(0u64, |w, (i, &x)| w | (x as u64) << (8 * i))
        };
        keys.iter().fold(0u64, |sum, k| {
            let first = pack(&k[..k.len().min(8)]);
            let last = pack(&k[k.len().saturating_sub(8)..]);
            sum.wrapping_add(key_hash(key_head(k.len() as u64, first), last))
        })
    }

    #[test]
    fn signature_is_each_keys_length_and_both_ends_whatever_the_cuts() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for round in 0..400 {
            // Keys of 0 to 120 bytes, any bytes (CR and LF included: bulk strings are binary).
            let keys: Vec<Vec<u8>> = (0..1 + next() % 12)
                .map(|_| (0..next() % 121).map(|_| next() as u8).collect())
                .collect();
            let mut args: Vec<&[u8]> = vec![b"BRPOP"];
            args.extend(keys.iter().map(Vec::as_slice));
            args.push(b"2");
            let mut data = encode_bytes(&args);
            // A plain command around it: the tail's state must not leak into the next one.
            data.extend(encode(&["LPUSH", "x", &"v".repeat((next() % 80) as usize)]));
            data.extend(encode_bytes(&args));
            let expected = specified_signature(&keys);
            let whole = requests(&[&data]).unwrap();
            assert_eq!(whole.len(), 2, "round {round}");
            assert_eq!(whole[0].signature, expected, "round {round}");
            assert_eq!(whole[1].signature, expected, "round {round}");
            assert_eq!(whole[0].keys as usize, keys.len());
            let a = (next() as usize) % (data.len() + 1);
            let b = a + (next() as usize) % (data.len() - a + 1);
            assert_eq!(
                requests(&[&data[..a], &data[a..b], &data[b..]]).unwrap(),
                whole,
                "round {round}, cuts {a} {b}"
            );
            let mut listed = Vec::new();
            let call = listened_keys(&data, |k| listed.push(k.to_vec())).unwrap();
            assert_eq!((call, &listed), (whole[0], &keys), "round {round}");
            if round < 20 {
                same_under_any_split(&data, requests).unwrap();
            }
        }
    }

    #[test]
    fn keys_that_differ_only_at_their_end_sign_differently() {
        let sig = |keys: &[&str]| {
            let mut args = vec!["BLPOP"];
            args.extend(keys);
            args.push("5");
            same_under_any_split(&encode(&args), requests).unwrap()[0].signature
        };
        // A reply key per request, a shard number, a queue name past a long prefix (longer
        // than a window: its end lies in the look past it).
        for (a, b) in [
            (
                "reply:6c5e2b1a-3f4d-4e8a-9b1c-0d2e3f4a5b6c",
                "reply:6c5e2b1a-3f4d-4e8a-9b1c-0d2e3f4a5b6d",
            ),
            ("queue:mailers_3", "queue:mailers_4"),
            (
                "queue:pipeline_processing:build_finished",
                "queue:pipeline_processing:build_finishes",
            ),
        ] {
            assert_ne!(sig(&[a]), sig(&[b]), "{a} {b}");
            assert_ne!(sig(&["queue:default", a]), sig(&["queue:default", b]));
            assert_eq!(sig(&["queue:default", a]), sig(&[a, "queue:default"]));
        }
    }

    #[test]
    fn signature_is_the_same_for_the_same_keys_in_any_order() {
        // Sidekiq with weighted queues shuffles them before every fetch.
        let sig = |keys: &[String]| requests(&[&brpop(keys, "2")]).unwrap()[0].signature;
        let keys = queues(440);
        let a = sig(&keys);
        let mut shuffled = keys.clone();
        shuffled.reverse();
        shuffled.swap(3, 200);
        assert_eq!(a, sig(&shuffled));
        // Under any split of the buffer too.
        let reversed: Vec<String> = keys[..20].iter().rev().cloned().collect();
        let calls = same_under_any_split(&brpop(&reversed, "2"), requests).unwrap();
        assert_eq!(calls[0].signature, sig(&keys[..20]));
        // A key fewer, one key more, one key replaced: another list.
        assert_ne!(a, sig(&keys[1..]));
        let mut more = keys.clone();
        more.push("queue:extra".into());
        assert_ne!(a, sig(&more));
        let mut replaced = shuffled;
        replaced[0] = "queue:other".into();
        assert_ne!(a, sig(&replaced));
    }

    #[test]
    fn malformed_bytes_are_rejected_not_misread() {
        for bad in [
            &b"GET a\r\n"[..],
            b"*x\r\n",
            b"*2\r\n+OK\r\n",
            b"*1\r\n$3\r\nabcde\r\n",
            b"*-5\r\n",
            b"*99999999999999999999\r\n",
            b"*1\r\n$-1\r\n",
        ] {
            assert_eq!(
                requests(&[bad]),
                Err(()),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn reply_kinds_and_indexes() {
        let data = b"+OK\r\n*-1\r\n*2\r\n$7\r\nqueue:a\r\n$11\r\n{\"job\":\"x\"}\r\n_\r\n-ERR wrong type\r\n$-1\r\n:5\r\n";
        let (starts, replies) = same_under_any_split(data, replies).unwrap();
        let kinds: Vec<(u64, u32)> = starts.iter().map(|s| (s.index, s.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, reply_kind::OTHER),
                (1, reply_kind::NIL),
                (2, reply_kind::DATA),
                (3, reply_kind::NIL),
                (4, reply_kind::ERROR),
                (5, reply_kind::NIL),
                (6, reply_kind::OTHER)
            ]
        );
        assert_eq!(replies, 7);
    }

    #[test]
    fn nested_replies_long_lines_and_out_of_band_pushes() {
        let long_error = format!("-ERR {}\r\n", "x".repeat(100));
        let mut data = Vec::new();
        data.extend_from_slice(b"*2\r\n*2\r\n$1\r\na\r\n:1\r\n%1\r\n+k\r\n*0\r\n");
        data.extend_from_slice(b">3\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n$1\r\nx\r\n");
        data.extend_from_slice(long_error.as_bytes());
        data.extend_from_slice(b"*-1\r\n");
        let (starts, replies) = same_under_any_split(&data, replies).unwrap();
        let kinds: Vec<(u64, u32)> = starts.iter().map(|s| (s.index, s.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, reply_kind::DATA),
                (1, reply_kind::ERROR),
                (2, reply_kind::NIL)
            ]
        );
        assert_eq!(replies, 3, "the push is not a reply");
    }

    #[test]
    fn listened_keys_agree_with_the_stream_tokenizer() {
        let data = brpop(&queues(440), "2");
        let mut keys = Vec::new();
        let call = listened_keys(&data, |k| {
            keys.push(String::from_utf8_lossy(k).into_owned())
        })
        .unwrap();
        assert_eq!(call, requests(&[&data]).unwrap()[0]);
        assert_eq!(keys, queues(440));
        let data = encode(&[
            "XREADGROUP",
            "GROUP",
            "g",
            "c",
            "BLOCK",
            "0",
            "STREAMS",
            "s1",
            "s2",
            ">",
            ">",
        ]);
        let mut keys = Vec::new();
        listened_keys(&data, |k| keys.push(k.to_vec())).unwrap();
        assert_eq!(keys, vec![b"s1".to_vec(), b"s2".to_vec()]);
        assert!(listened_keys(&encode(&["GET", "a"]), |_| {}).is_none());
        assert!(listened_keys(&data[..data.len() - 1], |_| {}).is_none());
    }

    /// A deterministic stand-in for the fuzz target: random mixes of valid commands, random
    /// bytes and random cuts must never panic, and valid streams must give the same events
    /// whatever the cuts.
    #[test]
    fn random_streams_and_cuts() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..3000 {
            let mut data = Vec::new();
            for _ in 0..(next() % 5) {
                match next() % 4 {
                    0 => data.extend(brpop(&queues((next() % 50) as usize + 1), "2")),
                    1 => data.extend(encode(&["SET", "k", &"v".repeat((next() % 100) as usize)])),
                    2 => data.extend(encode(&[
                        "XREAD", "BLOCK", "5", "STREAMS", "a", "b", "0", "0",
                    ])),
                    _ => data.extend(encode(&["blmpop", "1", "2", "x", "y", "LEFT"])),
                }
            }
            let whole = requests(&[&data]);
            assert!(whole.is_ok());
            let a = (next() as usize) % (data.len() + 1);
            let b = a + (next() as usize) % (data.len() - a + 1);
            assert_eq!(requests(&[&data[..a], &data[a..b], &data[b..]]), whole);
            // Garbage in the middle of a stream: no panic, whatever the result.
            let mut noisy = data.clone();
            for _ in 0..(next() % 4) {
                if !noisy.is_empty() {
                    let i = (next() as usize) % noisy.len();
                    noisy[i] = next() as u8;
                }
            }
            let _ = requests(&[&noisy[..a.min(noisy.len())], &noisy[a.min(noisy.len())..]]);
            let _ = replies(&[&noisy]);
            let _ = listened_keys(&noisy, |_| {});
        }
    }

    #[test]
    fn malformed_replies_are_rejected() {
        for bad in [&b"?\r\n"[..], b"$abc\r\n", b"*2\r\n$1\r\nab\r\n", b"_x\r\n"] {
            assert!(replies(&[bad]).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1);
        assert!(replies(&[deep.as_bytes()]).is_err());
    }

    /// The word-wise shift gives the bytes a copy byte by byte gives, from every offset.
    #[test]
    fn shifted_window_is_the_bytes_from_the_offset() {
        let mut bytes = [0u8; 2 * WINDOW];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        let mut words = [0u64; 2 * WINDOW / 8];
        for (k, word) in words.iter_mut().enumerate() {
            *word = u64::from_le_bytes(bytes[8 * k..8 * k + 8].try_into().unwrap());
        }
        for from in 0..WINDOW {
            let out = shifted_window(&words, from);
            let got: std::vec::Vec<u8> = out.iter().flat_map(|w| w.to_le_bytes()).collect();
            assert_eq!(got[..], bytes[from..from + WINDOW], "from {from}");
        }
    }
}
