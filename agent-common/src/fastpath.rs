//! Shortcuts that spare the worker-side probes the tokenizer on a connection's common case,
//! without changing what it would have found.
//!
//! A worker sends the same blocking command over and over (Sidekiq: the same `BRPOP` of the
//! same queues, once per job), and most replies to it have one of a few shapes (`*2` of two
//! bulks, or a nil). The tokenizer follows both one token per `bpf_loop` step, which costs
//! about 140 ns a token. So:
//!
//! - Requests: when the tokenizer has seen one whole buffer hold exactly one blocking command,
//!   the connection keeps that buffer's length and a 64-bit hash of its bytes
//!   ([`RepeatTemplate`]). A later write at a command boundary of the same length whose bytes
//!   hash the same is the same command: same keys, same signature, one more command on the
//!   connection. A mismatch, or any other write, goes to the tokenizer as before.
//! - Other requests: a write at a command boundary whose bytes are exactly one whole command
//!   of a few arguments, whose name cannot be a blocking command's ([`quick_request`]), is
//!   counted as one more command (a worker's GET, SET, INCR... on the same connection or on
//!   its cache connections). Anything else goes to the tokenizer.
//! - Replies: a read at a reply boundary whose bytes are exactly one whole reply of a simple
//!   shape ([`quick_reply`]) is classified from its first bytes, and counted as one reply,
//!   whether a pop waits for it or not. Anything else goes to the tokenizer.
//!
//! Both are written for the eBPF verifier as the tokenizer is: indexes masked to the window,
//! and every value whose range differs between paths hidden before the paths meet. Unlike the
//! tokenizer's, their length lines stop at the first non-digit: the hidden result merges the
//! digit counts' paths at once, and a branch per digit costs less than the ten masked steps
//! it replaced (one or two digits are the rule).

use crate::mix::mix;
use crate::resp::{reply_kind, Opaque, MAX_BULK};

/// Bytes hashed per read of a request (one `bpf_probe_read_user`, and one `bpf_loop` step past
/// the first). A strict-order fleet repeats the same long key list every fetch (440 Sidekiq
/// queues make 20 KiB), and each read with its loop step cost about 80 ns beside the hashing
/// (measured: 40 reads of 512 bytes against 10 of 2 KiB). A page would save a little more
/// (about 0.5 us on 20 KiB) but its unrolled chunk takes the write programs past the
/// verifier budget that `tests/foundation.rs` holds them to (400k instructions). The chunk
/// size does not change the hash (see [`ByteHash`]).
pub const HASH_CHUNK: usize = 2048;
/// Words of a hashing chunk.
pub const HASH_WORDS: usize = HASH_CHUNK / 8;
/// Largest request remembered as a template (a BRPOP of 1000 Sidekiq queues is about 23 KiB).
pub const MAX_TEMPLATE_BYTES: u64 = 64 * 1024;

const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Lanes a buffer's words are hashed in: word `i` goes to lane `i % HASH_LANES`. Each lane's
/// multiply waits only for that lane's previous one, so the CPU runs the lanes side by side:
/// with one lane, a strict-order fleet's 20 KiB key list was a chain of 2500 dependent
/// multiplies, most of its repeat check.
pub const HASH_LANES: usize = 4;
/// Bytes of one word of each lane.
const GROUP_BYTES: u64 = 8 * HASH_LANES as u64;

/// A request buffer's hash, chunk by chunk: [`ByteHash::start`] with the buffer's length, one
/// [`ByteHash::chunk`] per chunk in order, then [`ByteHash::value`]. What it is: the buffer,
/// zero-padded to whole groups of `HASH_LANES` words, each word mixed into its lane (lanes
/// seeded from the length), the lanes then folded in order. The length is in the seed, so
/// the padding cannot make two buffers alike; a chunk is whole groups (`HASH_CHUNK`), so the
/// chunk size does not change the value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteHash {
    lanes: [u64; HASH_LANES],
}

const _: () = assert!(HASH_CHUNK as u64 % GROUP_BYTES == 0);

impl ByteHash {
    #[inline(always)]
    pub fn start(len: u64) -> Self {
        let seed = mix(SEED, len);
        Self {
            lanes: [seed, seed ^ 1, seed ^ 2, seed ^ 3],
        }
    }

    /// Folds the first `n` bytes of one chunk in (`n <= HASH_CHUNK`; only the last chunk of a
    /// buffer is shorter than a whole chunk). Bytes of the chunk past `n` are ignored, so the
    /// chunk need not be cleared before a short read into it.
    #[inline(always)]
    pub fn chunk(&mut self, words: &[u64; HASH_WORDS], n: u64) {
        let [mut l0, mut l1, mut l2, mut l3] = self.lanes;
        let mut group = 0;
        while group < HASH_WORDS / HASH_LANES {
            let start = group as u64 * GROUP_BYTES;
            if start >= n {
                break;
            }
            let at = group * HASH_LANES;
            let (w0, w1, w2, w3) = (words[at], words[at + 1], words[at + 2], words[at + 3]);
            if start + GROUP_BYTES <= n {
                l0 = mix(l0, w0);
                l1 = mix(l1, w1);
                l2 = mix(l2, w2);
                l3 = mix(l3, w3);
            } else {
                // The buffer's last group: its bytes past `n` count as zeros.
                let left = n - start;
                l0 = mix(l0, w0 & low_bytes(left));
                l1 = mix(l1, w1 & low_bytes(left.saturating_sub(8)));
                l2 = mix(l2, w2 & low_bytes(left.saturating_sub(16)));
                l3 = mix(l3, w3 & low_bytes(left.saturating_sub(24)));
                break;
            }
            group += 1;
        }
        self.lanes = [l0, l1, l2, l3];
    }

    /// The hash, with its low bit set (0 stays free for "no hash").
    #[inline(always)]
    pub fn value(&self) -> u64 {
        let [l0, l1, l2, l3] = self.lanes;
        mix(mix(mix(l0, l1), l2), l3) | 1
    }
}

/// A mask of a little-endian word's first `bytes` bytes (all of them from 8 on).
#[inline(always)]
fn low_bytes(bytes: u64) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * bytes)) - 1
    }
}

/// The hash of a whole buffer, as the probes compute it chunk by chunk (for tests).
#[cfg(test)]
fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = ByteHash::start(bytes.len() as u64);
    for chunk in bytes.chunks(HASH_CHUNK) {
        // Garbage past the chunk's data, as a short read leaves it.
        let mut words = [0x5a5a_5a5a_5a5a_5a5a_u64; HASH_WORDS];
        for (i, b) in chunk.iter().enumerate() {
            let shift = 8 * (i % 8);
            words[i / 8] = (words[i / 8] & !(0xff << shift)) | ((*b as u64) << shift);
        }
        h.chunk(&words, chunk.len() as u64);
    }
    h.value()
}

/// The last blocking command a connection sent alone in one buffer, to recognise its repeats.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepeatTemplate {
    /// Bytes of the buffer; 0 when there is no template.
    pub len: u64,
    /// [`ByteHash`] of the buffer (its low bit set; 0: no hash).
    pub hash: u64,
    /// The call's key-list signature, as the tokenizer computed it.
    pub signature: u64,
    pub command: u32,
    pub keys: u32,
    /// [`crate::args_hash`] of the buffer, for a call whose keys may come in another order
    /// (`keys_then_timeout`); 0 otherwise.
    pub args: u64,
    /// 1 once a repeat listed the keys in another order (Sidekiq with weighted queues shuffles
    /// them before every fetch): the bytes will not repeat, so repeats are checked by `args`
    /// alone, without hashing the bytes first.
    pub order_varies: u32,
    pub _pad: u32,
}

/// Bytes of a buffer looked at by [`quick_reply`] and [`quick_request`].
pub const QUICK_WINDOW: usize = 128;
/// Most arguments of a command taken by [`quick_request`] (`SET key value EX 60 NX` has 6).
const QUICK_MAX_ARGS: u64 = 8;
/// Most elements of an array reply taken by [`quick_reply`] (BZPOPMIN's key, member, score).
const QUICK_MAX_ELEMENTS: u64 = 3;
/// Most digits of a length (1 GB has 10).
const LEN_DIGITS: usize = 10;

const MASK: usize = QUICK_WINDOW - 1;

#[inline(always)]
fn byte(w: &[u8; QUICK_WINDOW], i: u64) -> u8 {
    w[(i as usize) & MASK]
}

/// A length line `<digits>\r\n` at `start`: its value and the position after it. The line
/// may run past the data read (into whatever the window held before): callers reject a line
/// that ends past it.
#[inline(always)]
fn length_line<O: Opaque>(w: &[u8; QUICK_WINDOW], start: u64, o: &O) -> Option<(u64, u64)> {
    // Stops at the first byte that is not a digit: most lengths have one or two, and this
    // runs for every header of every plain command and reply.
    let mut value = 0u64;
    let mut digits = 0u64;
    while digits < LEN_DIGITS as u64 {
        let d = (byte(w, start + digits) as u64).wrapping_sub(b'0' as u64);
        if d >= 10 {
            break;
        }
        value = value * 10 + d;
        digits += 1;
    }
    // One path from here on, whatever the number of digits.
    let digits = o.hide(digits) & 15;
    let value = o.hide(value);
    let cr = start + digits;
    if digits == 0 || digits as usize >= LEN_DIGITS {
        return None;
    }
    if byte(w, cr) != b'\r' || byte(w, cr + 1) != b'\n' {
        return None;
    }
    Some((value, cr + 2))
}

/// A bulk header `$<len>\r\n` at `pos`, whole in the data read (`w[..avail]`): its length and
/// the position of its body.
#[inline(always)]
fn bulk_header<O: Opaque>(
    w: &[u8; QUICK_WINDOW],
    pos: u64,
    avail: u64,
    o: &O,
) -> Option<(u64, u64)> {
    if pos + 3 > avail {
        return None;
    }
    // Past that check the compiler knows `pos` lies in the window and may drop `byte`'s mask,
    // while the verifier may not see the check on the register it indexes with.
    let pos = o.hide(pos);
    if byte(w, pos) != b'$' {
        return None;
    }
    let (len, body) = length_line(w, pos + 1, o)?;
    (body <= avail).then_some((len, body))
}

/// A reply [`quick_reply`] recognised: its kind and, for data, where the key that served it
/// is named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuickReply {
    pub kind: u32,
    /// Position and length of the first bulk's body: for an array reply (BRPOP, BLPOP,
    /// BZPOPMIN) the key that served the pop; for a bare bulk (BLMOVE, BRPOPLPUSH) the
    /// element, and the key is the call's only source key. Meaningless for a nil.
    pub first_start: u64,
    pub first_len: u64,
    /// Whether the reply is an array (the first bulk is the key).
    pub array: bool,
}

/// The served key of a pop that cannot be told (a reply the quick path did not take).
pub const SERVED_KEY_UNKNOWN: u64 = 0;
/// The served key of a pop whose reply is a bare element (BLMOVE, BRPOPLPUSH): the call's
/// only source key, which user space knows from the key list.
pub const SERVED_KEY_ONLY_SOURCE: u64 = 1;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Keeps a key hash clear of the two reserved values above.
#[inline(always)]
fn reserve(h: u64) -> u64 {
    if h <= SERVED_KEY_ONLY_SOURCE {
        h + 2
    } else {
        h
    }
}

/// The hash that names a served key to user space (FNV-1a, kept clear of the reserved
/// values): user space hashes the names of the keys a connection lists the same way.
pub fn served_key_hash(key: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for b in key {
        h = (h ^ *b as u64).wrapping_mul(FNV_PRIME);
    }
    reserve(h)
}

/// [`served_key_hash`] of the `len` bytes at `start` of the window, when they all lie in the
/// data read (`avail`); otherwise [`SERVED_KEY_UNKNOWN`].
#[inline(always)]
pub fn served_key_hash_in_window(w: &[u8; QUICK_WINDOW], start: u64, len: u64, avail: u64) -> u64 {
    if len == 0 || start.saturating_add(len) > avail || avail as usize > QUICK_WINDOW {
        return SERVED_KEY_UNKNOWN;
    }
    let mut h = FNV_OFFSET;
    let mut i = 0;
    while i < QUICK_WINDOW {
        if i as u64 >= len {
            break;
        }
        h = (h ^ byte(w, start + i as u64) as u64).wrapping_mul(FNV_PRIME);
        i += 1;
    }
    reserve(h)
}

/// If `w[..avail]` is the start of a buffer of `total` bytes that holds exactly one whole
/// top-level reply of a simple shape, the reply ([`QuickReply`]); otherwise `None` (the
/// tokenizer decides). The shapes: a nil (`*-1`, `$-1`, RESP3 `_`), a simple line (status,
/// error, integer, and RESP3's double, boolean and big number) read whole, a bulk string, and
/// an array of one to three bulk strings whose headers all lie in the window (BRPOP/BLPOP's
/// key and element, BZPOPMIN's key, member and score). `w[avail..]` may hold anything (the
/// window is not cleared between reads): no byte past `avail` decides an answer.
#[inline(always)]
pub fn quick_reply<O: Opaque>(
    w: &[u8; QUICK_WINDOW],
    avail: u64,
    total: u64,
    o: &O,
) -> Option<QuickReply> {
    let nil = QuickReply {
        kind: reply_kind::NIL,
        first_start: 0,
        first_len: 0,
        array: false,
    };
    if avail < 3 || avail > total || avail as usize > QUICK_WINDOW {
        return None;
    }
    let first = w[0];
    if matches!(first, b'+' | b'-' | b':' | b',' | b'#' | b'(') {
        return simple_line(w, avail, total).then_some(QuickReply {
            kind: if first == b'-' {
                reply_kind::ERROR
            } else {
                reply_kind::OTHER
            },
            ..nil
        });
    }
    if first == b'_' {
        return (total == 3 && w[1] == b'\r' && w[2] == b'\n').then_some(nil);
    }
    if (first == b'*' || first == b'$') && w[1] == b'-' {
        return (total == 5 && w[2] == b'1' && w[3] == b'\r' && w[4] == b'\n').then_some(nil);
    }
    let (elements, mut pos) = match first {
        b'$' => (1, 0),
        b'*' => {
            let (n, end) = length_line(w, 1, o)?;
            if n == 0 || n > QUICK_MAX_ELEMENTS {
                return None;
            }
            (n, end)
        }
        _ => return None,
    };
    let mut first_start = 0;
    let mut first_len = 0;
    let mut i = 0;
    while i < QUICK_MAX_ELEMENTS {
        if i >= elements {
            break;
        }
        let (len, body) = bulk_header(w, pos, avail, o)?;
        // Longer than Redis allows: the tokenizer calls it invalid, and so must this.
        if len > MAX_BULK as u64 {
            return None;
        }
        if i == 0 {
            first_start = body;
            first_len = len;
        }
        pos = o.hide(body + len + 2);
        if pos > total {
            return None;
        }
        i += 1;
    }
    (pos == total).then_some(QuickReply {
        kind: reply_kind::DATA,
        first_start,
        first_len,
        array: first == b'*',
    })
}

/// Whether the buffer is one whole simple line (`+OK\r\n`, `:1\r\n`, `-ERR ...\r\n`), all of
/// it read: it ends with the buffer's only CR and LF.
#[inline(always)]
fn simple_line(w: &[u8; QUICK_WINDOW], avail: u64, total: u64) -> bool {
    if avail != total || total < 3 {
        return false;
    }
    let end = total - 2;
    if byte(w, end) != b'\r' || byte(w, end + 1) != b'\n' {
        return false;
    }
    // Two replies in one read (`+OK\r\n:1\r\n`) are the tokenizer's.
    let mut i = 1;
    while i < QUICK_WINDOW {
        if i as u64 >= end {
            break;
        }
        let b = byte(w, i as u64);
        if b == b'\r' || b == b'\n' {
            return false;
        }
        i += 1;
    }
    true
}

/// Whether `w[..avail]`, the start of a write of `total` bytes, holds exactly one whole
/// command (`*<argc>` and that many bulks) of at most [`QUICK_MAX_ARGS`] arguments, whose
/// bulk headers all lie in the window and whose name is not one a blocking command can have
/// (none starts with B or X). Then the tokenizer would find one command and no blocking call:
/// the write counts as one more command without it. A last argument may run past the window
/// (a SET's large value): it is skipped by its length. `w[avail..]` may hold anything.
#[inline(always)]
pub fn quick_request<O: Opaque>(w: &[u8; QUICK_WINDOW], avail: u64, total: u64, o: &O) -> bool {
    if avail < 4 || avail > total || avail as usize > QUICK_WINDOW || w[0] != b'*' {
        return false;
    }
    let Some((argc, mut pos)) = length_line(w, 1, o) else {
        return false;
    };
    if argc == 0 || argc > QUICK_MAX_ARGS || pos > avail {
        return false;
    }
    let mut i = 0;
    while i < QUICK_MAX_ARGS {
        if i >= argc {
            break;
        }
        let Some((len, body)) = bulk_header(w, pos, avail, o) else {
            return false;
        };
        if len > MAX_BULK as u64 {
            return false;
        }
        let end = body + len;
        if i == 0 {
            // The name decides: it must be read, and a name that may block (BRPOP, BLMOVE,
            // BZPOPMIN, XREAD BLOCK...) goes to the tokenizer, which counts its keys.
            if len == 0 || end + 2 > avail {
                return false;
            }
            let initial = byte(w, body) | 0x20;
            if initial == b'b' || initial == b'x' {
                return false;
            }
        }
        // The body's CRLF, where it was read.
        if end + 2 <= avail && (byte(w, end) != b'\r' || byte(w, end + 1) != b'\n') {
            return false;
        }
        pos = o.hide(end + 2);
        if pos > total {
            return false;
        }
        i += 1;
    }
    pos == total
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{format, vec, vec::Vec};

    use super::*;
    use crate::resp::encoding::encode_bytes;
    use crate::resp::Transparent;

    fn quick(bytes: &[u8]) -> Option<u32> {
        quick_full(bytes).map(|r| r.kind)
    }

    fn quick_full(bytes: &[u8]) -> Option<QuickReply> {
        // Digits and line ends past the data, as a previous read may leave them.
        let mut w = [0u8; QUICK_WINDOW];
        for (i, b) in w.iter_mut().enumerate() {
            *b = b"12\r\n"[i % 4];
        }
        let n = bytes.len().min(QUICK_WINDOW);
        w[..n].copy_from_slice(&bytes[..n]);
        quick_reply(&w, n as u64, bytes.len() as u64, &Transparent)
    }

    #[test]
    fn nil_replies() {
        assert_eq!(quick(b"*-1\r\n"), Some(reply_kind::NIL));
        assert_eq!(quick(b"$-1\r\n"), Some(reply_kind::NIL));
        assert_eq!(quick(b"_\r\n"), Some(reply_kind::NIL));
        // Two nils in one read: the tokenizer's business.
        assert_eq!(quick(b"*-1\r\n*-1\r\n"), None);
        assert_eq!(quick(b"*-2\r\n"), None);
    }

    #[test]
    fn brpop_reply_with_a_payload_past_the_window() {
        let payload = vec![b'x'; 5000];
        let mut reply = b"*2\r\n$13\r\nqueue:default\r\n$5000\r\n".to_vec();
        reply.extend_from_slice(&payload);
        reply.extend_from_slice(b"\r\n");
        assert_eq!(quick(&reply), Some(reply_kind::DATA));
        // Cut short (the rest comes in the next read), or followed by another reply.
        assert_eq!(quick(&reply[..reply.len() - 1]), None);
        let mut two = reply.clone();
        two.extend_from_slice(b"+OK\r\n");
        assert_eq!(quick(&two), None);
    }

    #[test]
    fn other_simple_shapes() {
        assert_eq!(quick(b"$3\r\nabc\r\n"), Some(reply_kind::DATA));
        assert_eq!(quick(b"$0\r\n\r\n"), Some(reply_kind::DATA));
        assert_eq!(
            quick(b"*3\r\n$1\r\nz\r\n$1\r\nm\r\n$3\r\n1.5\r\n"),
            Some(reply_kind::DATA)
        );
        // Statuses, integers and errors read whole.
        assert_eq!(quick(b"-ERR wrong\r\n"), Some(reply_kind::ERROR));
        assert_eq!(quick(b":1\r\n"), Some(reply_kind::OTHER));
        assert_eq!(quick(b"+OK\r\n"), Some(reply_kind::OTHER));
        assert_eq!(quick(b"+\r\n"), Some(reply_kind::OTHER));
        // Two of them, one cut short, a bare CR inside, a missing LF: not quick.
        assert_eq!(quick(b"+OK\r\n:1\r\n"), None);
        assert_eq!(quick(b"+OK\r"), None);
        assert_eq!(quick(b"+O\rK\r\n"), None);
        assert_eq!(quick(b"+OK\r\r"), None);
        // A line longer than the window cannot be seen whole.
        let long = format!("+{}\r\n", "x".repeat(QUICK_WINDOW));
        assert_eq!(quick(long.as_bytes()), None);
        // Nested and long arrays: not quick.
        assert_eq!(quick(b"*1\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n"), None);
        assert_eq!(
            quick(b"*4\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$1\r\nd\r\n"),
            None
        );
        // Malformed lengths.
        assert_eq!(quick(b"*2\r\n$x\r\nab\r\n"), None);
        assert_eq!(quick(b"*2\n$1\r\na\r\n$1\r\nb\r\n"), None);
    }

    /// A bulk longer than Redis allows (512 MiB) is the tokenizer's, which calls it invalid:
    /// the shortcut must not count it as a reply, even when the read holds all of it.
    #[test]
    fn a_bulk_longer_than_redis_allows_is_not_quick() {
        for len in [MAX_BULK as u64, MAX_BULK as u64 + 1] {
            let header = format!("*2\r\n$1\r\nq\r\n${len}\r\n");
            let mut w = [0u8; QUICK_WINDOW];
            w[..header.len()].copy_from_slice(header.as_bytes());
            let total = header.len() as u64 + len + 2;
            let answer = quick_reply(&w, header.len() as u64, total, &Transparent);
            assert_eq!(answer.is_some(), len <= MAX_BULK as u64, "{len}");
        }
    }

    #[test]
    fn second_header_outside_the_window_is_not_quick() {
        let key = vec![b'k'; 200];
        let mut reply = format!("*2\r\n${}\r\n", key.len()).into_bytes();
        reply.extend_from_slice(&key);
        reply.extend_from_slice(b"\r\n$1\r\nv\r\n");
        assert_eq!(quick(&reply), None);
    }

    /// Wherever the shortcut answers, the tokenizer over the same bytes finds exactly one
    /// reply, of the same kind, ending at the buffer's end.
    #[test]
    fn agrees_with_the_tokenizer() {
        use crate::resp::{drive, Carry, ReplyState};
        let mut candidates: Vec<Vec<u8>> = Vec::new();
        let bulks = ["", "a", "queue:default", &"k".repeat(60), &"v".repeat(300)];
        for a in bulks {
            candidates.push(format!("${}\r\n{a}\r\n", a.len()).into_bytes());
            for b in bulks {
                candidates.push(
                    format!("*2\r\n${}\r\n{a}\r\n${}\r\n{b}\r\n", a.len(), b.len()).into_bytes(),
                );
                candidates.push(
                    format!(
                        "*3\r\n${}\r\n{a}\r\n$1\r\nm\r\n${}\r\n{b}\r\n",
                        a.len(),
                        b.len()
                    )
                    .into_bytes(),
                );
            }
        }
        for fixed in [
            &b"*-1\r\n"[..],
            b"$-1\r\n",
            b"_\r\n",
            b"-ERR x\r\n",
            b"*0\r\n",
            b":3\r\n",
            b"+OK\r\n",
            b"+\r\n",
            b",1.5\r\n",
            b"#t\r\n",
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        ] {
            candidates.push(fixed.to_vec());
        }
        let mut answered = 0;
        for whole in &candidates {
            // The whole reply, cut short, and followed by a second reply.
            let mut variants = vec![whole.clone(), whole[..whole.len() - 1].to_vec()];
            let mut two = whole.clone();
            two.extend_from_slice(b"+OK\r\n");
            variants.push(two);
            for bytes in variants {
                let Some(kind) = quick(&bytes) else { continue };
                answered += 1;
                let (mut state, mut carry, mut starts) =
                    (ReplyState::default(), Carry::default(), Vec::new());
                drive(&mut state, &mut carry, &bytes, |e, _| starts.push(e)).unwrap();
                assert_eq!(
                    state.replies,
                    1,
                    "{:?}",
                    std::string::String::from_utf8_lossy(&bytes)
                );
                assert_eq!(starts.len(), 1);
                assert_eq!(starts[0].kind, kind);
                assert_eq!((state.depth, state.skip, carry.len), (0, 0, 0));
            }
        }
        assert!(answered > 40, "the shortcut answered only {answered} cases");
    }

    fn quick_req(bytes: &[u8]) -> bool {
        // Headers and line ends past the data, as a previous buffer may leave them.
        let mut w = [0u8; QUICK_WINDOW];
        for (i, b) in w.iter_mut().enumerate() {
            *b = b"$1\r\n"[i % 4];
        }
        let n = bytes.len().min(QUICK_WINDOW);
        w[..n].copy_from_slice(&bytes[..n]);
        quick_request(&w, n as u64, bytes.len() as u64, &Transparent)
    }

    #[test]
    fn one_plain_command_is_quick() {
        let big = vec![b'v'; 5000];
        for parts in [
            &[&b"GET"[..], b"cache:1"][..],
            &[b"set", b"cache:1", b"value"],
            &[b"SET", b"cache:1", &big],
            &[b"HSET", b"h", b"f", b"v"],
            &[b"INCR", b"stat:processed"],
            &[b"SET", b"k", b"v", b"EX", b"60", b"NX"],
            &[b"PING"],
            &[b"LPUSH", b"queue:default", &big],
        ] {
            assert!(quick_req(&encode_bytes(parts)), "{parts:?}");
        }
    }

    #[test]
    fn blocking_names_pipelines_and_odd_shapes_are_not_quick() {
        let big = vec![b'v'; 200];
        for parts in [
            // Names a blocking command may have, and every other name starting as they do.
            &[&b"BRPOP"[..], b"queue:default", b"2"][..],
            &[b"blpop", b"q", b"0"],
            &[b"BLMOVE", b"a", b"b", b"LEFT", b"RIGHT", b"0"],
            &[b"BZPOPMIN", b"z", b"1"],
            &[b"XREAD", b"BLOCK", b"0", b"STREAMS", b"s", b"$"],
            &[b"xreadgroup", b"GROUP", b"g", b"c", b"STREAMS", b"s", b">"],
            &[b"XADD", b"s", b"*", b"f", b"v"],
            &[b"BITCOUNT", b"k"],
            // A middle argument past the window: the next header is not in it.
            &[b"SET", b"k", &big, b"EX", b"60"],
            // Too many arguments.
            &[b"DEL", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8"],
            // An empty name.
            &[b""],
        ] {
            assert!(!quick_req(&encode_bytes(parts)), "{parts:?}");
        }
        let get = encode_bytes(&[b"GET", b"k"]);
        let mut two = get.clone();
        two.extend_from_slice(&get);
        assert!(!quick_req(&two), "a pipeline of two");
        assert!(!quick_req(&get[..get.len() - 1]), "cut short");
        let mut bad_crlf = get.clone();
        let at = bad_crlf.len() - 2;
        bad_crlf[at] = b'x';
        assert!(!quick_req(&bad_crlf), "a body without its CRLF");
        assert!(!quick_req(b"PING\r\n"), "an inline command");
        assert!(!quick_req(b"*0\r\n"));
        assert!(!quick_req(b"*1\r\n$-1\r\n"));
        assert!(
            !quick_req(b"*1\r\n$4\r\nPING\r\n\r\n"),
            "a stray CRLF after it"
        );
    }

    /// Wherever the shortcut answers, the tokenizer over the same bytes from a command
    /// boundary finds exactly one command, no blocking call, and ends at a command boundary.
    #[test]
    fn quick_requests_agree_with_the_tokenizer() {
        use crate::resp::{drive, Carry, RequestState};
        let names: [&[u8]; 8] = [
            b"GET", b"set", b"INCRBY", b"BRPOP", b"XREAD", b"HSET", b"EXPIRE", b"PUBLISH",
        ];
        let args: [&[u8]; 5] = [b"", b"k", b"queue:default", &[b'x'; 60], &[b'y'; 300]];
        let mut candidates: Vec<Vec<u8>> = Vec::new();
        for name in names {
            candidates.push(encode_bytes(&[name]));
            for a in args {
                candidates.push(encode_bytes(&[name, a]));
                for b in args {
                    candidates.push(encode_bytes(&[name, a, b]));
                    candidates.push(encode_bytes(&[name, a, b, b"EX", b"60"]));
                }
            }
        }
        let mut answered = 0;
        for whole in &candidates {
            let mut variants = vec![whole.clone(), whole[..whole.len() - 1].to_vec()];
            let mut two = whole.clone();
            two.extend(encode_bytes(&[b"GET", b"k"]));
            variants.push(two);
            for bytes in variants {
                if !quick_req(&bytes) {
                    continue;
                }
                answered += 1;
                let (mut state, mut carry, mut calls) =
                    (RequestState::default(), Carry::default(), Vec::new());
                let text = std::string::String::from_utf8_lossy(&bytes).into_owned();
                drive(&mut state, &mut carry, &bytes, |call, _| calls.push(call))
                    .unwrap_or_else(|()| panic!("the tokenizer refused {text:?}"));
                assert_eq!(state.commands, 1, "{text:?}");
                assert!(calls.is_empty(), "{text:?}");
                assert!(state.at_command_boundary() && carry.len == 0, "{text:?}");
            }
        }
        assert!(
            answered > 100,
            "the shortcut answered only {answered} cases"
        );
    }

    /// One of `bytes`, at random.
    fn pick(next: &mut dyn FnMut() -> u64, bytes: &[u8]) -> u8 {
        bytes[(next() % bytes.len() as u64) as usize]
    }

    /// One random RESP2 or RESP3 reply: simple lines, bulks (CR and LF inside), nulls, blob
    /// errors and verbatim strings, and aggregates (arrays, maps, sets, pushes, attributes)
    /// of them up to two levels deep.
    fn random_reply(next: &mut impl FnMut() -> u64, depth: u32, out: &mut Vec<u8>) {
        let body = |next: &mut dyn FnMut() -> u64, out: &mut Vec<u8>, lines: bool| {
            let len = [0, 1, 3, 9, 13, 60, 121, 300][(next() % 8) as usize];
            for _ in 0..len {
                let b = pick(next, b"ab:\r\n$*_01");
                out.push(if lines && (b == b'\r' || b == b'\n') {
                    b'x'
                } else {
                    b
                });
            }
        };
        match next() % if depth < 2 { 10 } else { 6 } {
            0 => {
                out.push(b"+-:,#("[(next() % 6) as usize]);
                body(next, out, true);
                out.extend_from_slice(b"\r\n");
            }
            1 | 2 => {
                let mut b = Vec::new();
                body(next, &mut b, false);
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(&b);
                out.extend_from_slice(b"\r\n");
            }
            3 => out
                .extend_from_slice([&b"*-1\r\n"[..], b"$-1\r\n", b"_\r\n"][(next() % 3) as usize]),
            4 => {
                let mut b = Vec::new();
                body(next, &mut b, false);
                out.push(if next().is_multiple_of(2) { b'!' } else { b'=' });
                out.extend_from_slice(format!("{}\r\n", b.len()).as_bytes());
                out.extend_from_slice(&b);
                out.extend_from_slice(b"\r\n");
            }
            5 => out.extend_from_slice(b"$5\r\nqueue\r\n"),
            _ => {
                let kind = b"*%~>|*"[(next() % 6) as usize];
                let n = next() % 4;
                out.push(kind);
                out.extend_from_slice(format!("{n}\r\n").as_bytes());
                let elements = if kind == b'%' || kind == b'|' {
                    2 * n
                } else {
                    n
                };
                for _ in 0..elements {
                    random_reply(next, depth + 1, out);
                }
            }
        }
    }

    /// The first `QUICK_WINDOW` bytes of `data` in a window whose rest holds what a previous
    /// read may have left: digits, line ends and type bytes.
    fn window_over(data: &[u8], next: &mut impl FnMut() -> u64) -> ([u8; QUICK_WINDOW], u64) {
        let mut w = [0u8; QUICK_WINDOW];
        for b in w.iter_mut() {
            *b = pick(next, b"0123\r\n$*+:-");
        }
        let n = data.len().min(QUICK_WINDOW);
        w[..n].copy_from_slice(&data[..n]);
        (w, n as u64)
    }

    /// Random streams, whole, cut short, followed by more, or with a byte changed: wherever a
    /// shortcut answers and the tokenizer reads the same bytes without fault, the tokenizer
    /// finds what the shortcut said (one reply of that kind, or one command and no blocking
    /// call) and ends at a boundary. Where the tokenizer finds a fault, it lies past the bytes
    /// the shortcut reads.
    #[test]
    fn shortcuts_agree_with_the_tokenizer_on_random_streams() {
        use crate::resp::{drive, encoding::xorshift, Carry, ReplyState, RequestState};
        let mut next = xorshift(0x6a09_e667_f3bc_c908);
        let mut answered = [0u32; 2];
        // Replies.
        for _ in 0..30_000 {
            let mut data = Vec::new();
            random_reply(&mut next, 0, &mut data);
            match next() % 4 {
                0 => data.truncate((next() % data.len() as u64) as usize),
                1 => random_reply(&mut next, 0, &mut data),
                2 => {
                    let at = (next() % data.len() as u64) as usize;
                    data[at] = pick(&mut next, b"0\r\n$*:+_9x");
                }
                _ => {}
            }
            if data.is_empty() {
                continue;
            }
            let (w, n) = window_over(&data, &mut next);
            let Some(quick) = quick_reply(&w, n, data.len() as u64, &Transparent) else {
                continue;
            };
            let text = std::string::String::from_utf8_lossy(&data).into_owned();
            let (mut state, mut carry, mut starts) =
                (ReplyState::default(), Carry::default(), Vec::new());
            if drive(&mut state, &mut carry, &data, |e, _| starts.push(e)).is_err() {
                assert!(data.len() > QUICK_WINDOW, "the shortcut took {text:?}");
                continue;
            }
            answered[0] += 1;
            assert_eq!(state.replies, 1, "{text:?}");
            assert_eq!(starts.len(), 1, "{text:?}");
            assert_eq!(starts[0].kind, quick.kind, "{text:?}");
            assert_eq!(
                (
                    state.depth,
                    state.skip,
                    state.in_line,
                    state.out_of_band,
                    carry.len
                ),
                (0, 0, 0, 0, 0),
                "{text:?}"
            );
            if quick.kind == reply_kind::DATA && quick.array {
                // The served key: the first element's body, a bulk's (whose CRLF neither
                // reads: bodies are skipped by their length).
                let (start, len) = (quick.first_start as usize, quick.first_len as usize);
                let header = format!("${len}\r\n");
                assert!(data[..start].ends_with(header.as_bytes()), "{text:?}");
                assert!(data[..start].starts_with(b"*"), "{text:?}");
                assert!(start + len + 2 <= data.len(), "{text:?}");
            }
        }
        // Requests: commands of random names and arguments, some blocking.
        let names: [&[u8]; 10] = [
            b"GET",
            b"SET",
            b"BRPOP",
            b"blpop",
            b"XREAD",
            b"BZPOPMIN",
            b"INCR",
            b"",
            b"B",
            b"x",
        ];
        for _ in 0..30_000 {
            let argc = 1 + next() % 10;
            let mut args: Vec<Vec<u8>> = Vec::new();
            args.push(names[(next() % 10) as usize].to_vec());
            for _ in 1..argc {
                let len = [0, 1, 5, 20, 60, 120, 1100][(next() % 7) as usize];
                args.push((0..len).map(|_| pick(&mut next, b"k:\r\n$*1")).collect());
            }
            let parts: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
            let mut data = encode_bytes(&parts);
            match next() % 4 {
                0 => data.truncate((next() % data.len() as u64) as usize),
                1 => data.extend(encode_bytes(&[b"GET", b"k"])),
                2 => {
                    let at = (next() % data.len() as u64) as usize;
                    data[at] = pick(&mut next, b"0\r\n$*:9x");
                }
                _ => {}
            }
            if data.is_empty() {
                continue;
            }
            let (w, n) = window_over(&data, &mut next);
            if !quick_request(&w, n, data.len() as u64, &Transparent) {
                continue;
            }
            let text = std::string::String::from_utf8_lossy(&data).into_owned();
            let (mut state, mut carry, mut calls) =
                (RequestState::default(), Carry::default(), Vec::new());
            if drive(&mut state, &mut carry, &data, |c, _| calls.push(c)).is_err() {
                assert!(data.len() > QUICK_WINDOW, "the shortcut took {text:?}");
                continue;
            }
            answered[1] += 1;
            assert_eq!(state.commands, 1, "{text:?}");
            assert!(calls.is_empty(), "{text:?}");
            assert!(state.at_command_boundary() && carry.len == 0, "{text:?}");
        }
        // Enough answers of each kind that the agreement means something.
        assert!(answered[0] > 3000 && answered[1] > 1000, "{answered:?}");
    }

    #[test]
    fn hash_depends_on_every_byte_and_the_length() {
        let a = b"*3\r\n$5\r\nbrpop\r\n$13\r\nqueue:default\r\n$1\r\n2\r\n".to_vec();
        let mut b = a.clone();
        b[20] ^= 1;
        assert_ne!(hash_bytes(&a), hash_bytes(&b));
        assert_eq!(hash_bytes(&a), hash_bytes(&a.clone()));
        // Trailing zero bytes are not the same buffer.
        let mut c = a.clone();
        c.push(0);
        assert_ne!(hash_bytes(&a), hash_bytes(&c));
        // Across chunks: a byte of the second one.
        let long: Vec<u8> = (0..2 * HASH_CHUNK as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut long2 = long.clone();
        long2[HASH_CHUNK + 700] ^= 0x80;
        assert_ne!(hash_bytes(&long), hash_bytes(&long2));
    }

    /// The hash is what `ByteHash` says it is, whatever the chunk size: the zero-padded
    /// buffer's words mixed into four lanes, folded in order. `HASH_CHUNK` only sets how many
    /// reads the probes make.
    #[test]
    fn hash_is_the_same_whatever_the_chunk_size() {
        fn by_definition(bytes: &[u8]) -> u64 {
            let seed = mix(SEED, bytes.len() as u64);
            let mut lanes = [seed, seed ^ 1, seed ^ 2, seed ^ 3];
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(32) * 32, 0);
            for (i, word) in padded.chunks_exact(8).enumerate() {
                lanes[i % 4] = mix(lanes[i % 4], u64::from_le_bytes(word.try_into().unwrap()));
            }
            mix(mix(mix(lanes[0], lanes[1]), lanes[2]), lanes[3]) | 1
        }
        for len in [
            0, 1, 7, 8, 9, 31, 32, 33, 255, 256, 257, 511, 512, 513, 1025, 20_000,
        ] {
            let bytes: Vec<u8> = (0..len as u32).map(|i| (i * 7 % 253) as u8).collect();
            assert_eq!(hash_bytes(&bytes), by_definition(&bytes), "{len} bytes");
        }
    }

    /// Any one byte changed, in the first chunk or the second, and any of these word swaps (a
    /// queue list in another order), one of them across the chunks: another hash.
    #[test]
    fn hash_sees_every_byte_and_the_order_of_words() {
        let len = HASH_CHUNK as u32 + 100;
        let list: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        let base = hash_bytes(&list);
        for at in 0..list.len() {
            for flip in [0x01, 0x20, 0x40, 0x80] {
                let mut changed = list.clone();
                changed[at] ^= flip;
                assert_ne!(hash_bytes(&changed), base, "byte {at} ^ {flip:#x}");
            }
        }
        let words = list.len() / 8;
        for (i, j) in [(0, 1), (0, 4), (3, 7), (10, 70), (0, words - 1)] {
            let mut swapped = list.clone();
            let (a, b) = (
                swapped[8 * i..8 * i + 8].to_vec(),
                swapped[8 * j..8 * j + 8].to_vec(),
            );
            swapped[8 * i..8 * i + 8].copy_from_slice(&b);
            swapped[8 * j..8 * j + 8].copy_from_slice(&a);
            assert_ne!(swapped, list);
            assert_ne!(hash_bytes(&swapped), base, "words {i} and {j} swapped");
        }
    }

    fn served_key(bytes: &[u8]) -> u64 {
        let mut w = [b'q'; QUICK_WINDOW];
        let n = bytes.len().min(QUICK_WINDOW);
        w[..n].copy_from_slice(&bytes[..n]);
        let r = quick_full(bytes).expect("a quick reply");
        assert!(r.array);
        served_key_hash_in_window(&w, r.first_start, r.first_len, n as u64)
    }

    #[test]
    fn the_served_key_is_hashed_as_user_space_hashes_key_names() {
        let mut reply = b"*2\r\n$13\r\nqueue:default\r\n$300\r\n".to_vec();
        reply.extend(vec![b'x'; 300]);
        reply.extend(b"\r\n");
        assert_eq!(served_key(&reply), served_key_hash(b"queue:default"));
        assert_ne!(served_key(&reply), served_key_hash(b"queue:defaulu"));
        // BZPOPMIN: key, member, score.
        assert_eq!(
            served_key(b"*3\r\n$2\r\nzq\r\n$1\r\nm\r\n$3\r\n1.5\r\n"),
            served_key_hash(b"zq")
        );
        // A key whose name runs past the window cannot be told.
        let long = vec![b'k'; 120];
        let mut reply = format!("*2\r\n${}\r\n", long.len()).into_bytes();
        reply.extend(&long);
        reply.extend(b"\r\n$1\r\nv\r\n");
        // Its headers are not all in the window either: not quick at all.
        assert_eq!(quick(&reply), None);
        let mut w = [0u8; QUICK_WINDOW];
        w.copy_from_slice(&reply[..QUICK_WINDOW]);
        assert_eq!(
            served_key_hash_in_window(&w, 9, 120, QUICK_WINDOW as u64),
            SERVED_KEY_UNKNOWN
        );
        // A bare element (BLMOVE): not an array, the key is the call's only source.
        let r = quick_full(b"$3\r\nabc\r\n").expect("a bulk");
        assert!(!r.array);
        assert_eq!(r.kind, reply_kind::DATA);
    }

    #[test]
    fn key_hashes_never_take_the_reserved_values() {
        for i in 0..10_000u32 {
            let h = served_key_hash(format!("queue:{i}").as_bytes());
            assert!(h > SERVED_KEY_ONLY_SOURCE);
        }
        assert!(served_key_hash(b"") > SERVED_KEY_ONLY_SOURCE);
    }
}
