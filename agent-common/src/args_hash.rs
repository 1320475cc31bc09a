//! A hash of a blocking call's arguments that ignores the order of its keys, for the repeat
//! shortcut (`fastpath::RepeatTemplate`) of calls whose arguments are keys then a timeout.
//!
//! Sidekiq shuffles its queues before every fetch when they have weights (GitLab gives every
//! queue one), so each BRPOP lists the same keys in another order and its bytes never repeat.
//! Without this, each such fetch goes through the tokenizer, key by key: 37 us for 440 keys.
//! Here the buffer is read in chunks of [`ARGS_CHUNK`] bytes and each argument is hashed from
//! three words read at computed offsets (no loop over its bytes): its first 16 bytes as sent,
//! header included (so its length counts), and its last 8 (the key's last 6 and the CRLF).
//! The command name and the timeout are hashed in place; the keys' hashes are summed. The
//! same keys in any order then hash the same. Two key lists that differ only in the middle
//! of keys of the same length, with the same bytes at both ends, would too; the key-list
//! signature tells keys apart by about as much (length, first 8 bytes and last 8).
//!
//! Every chunk starts at an argument's header, so a header never straddles two reads; an
//! argument of 1000 bytes or more (a length of 4 digits; any shorter one fits in a chunk) is
//! not taken, and the call goes to the tokenizer as before.

use crate::mix::mix;
use crate::resp::{command, word_across, Opaque};

/// Bytes read at once (one `bpf_probe_read_user` in the probes). A chunk also ends after
/// `ARGS_PER_CHUNK` arguments, whose parse is what the verifier walks. GitLab's queue keys
/// take 35-70 bytes as sent, so a chunk holds 14 to 29 of them: half the reads and loop steps
/// of 512-byte chunks, 10-15% less time per fetch of 440 such keys (measured A/B with
/// `kernel.bpf_stats_enabled`).
pub const ARGS_CHUNK: usize = 1024;
/// Words of a chunk.
pub const ARGS_WORDS: usize = ARGS_CHUNK / 8;
/// Most arguments read from one chunk (the rest of a chunk of shorter ones is read again
/// from the next).
const ARGS_PER_CHUNK: u64 = 32;
/// Most digits of the array's length (a million arguments).
const COUNT_DIGITS: u64 = 7;

const MASK: u64 = ARGS_CHUNK as u64 - 1;

/// Whether the repeats of `command` may be recognised by [`ArgsHash`]: its arguments are keys
/// then a timeout (XREAD, BLMOVE and BLMPOP have arguments whose order means something).
pub fn keys_then_timeout(cmd: u32) -> bool {
    matches!(
        cmd,
        command::BRPOP | command::BLPOP | command::BZPOPMIN | command::BZPOPMAX
    )
}

/// The state of the hash between chunks: lives in a per-CPU map in the probes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArgsHash {
    /// Offset in the buffer of the next argument's header (0: the array's header).
    pub pos: u64,
    /// Arguments in the array; arguments still to read.
    pub total: u64,
    pub left: u64,
    /// The command's and the timeout's hashes, in order, and the keys' hashes, summed.
    pub ends: u64,
    pub keys: u64,
    /// 1 when the buffer is not one array of arguments this reads.
    pub failed: u64,
}

/// What one chunk did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkStep {
    /// Read on from `pos`.
    More,
    /// The last argument ended at the end of the buffer: the hash is [`ArgsHash::value`].
    Done,
    /// Not taken: `failed` is set.
    Failed,
}

/// A chunk's words as its bytes, in memory order (u8 has no alignment, and the sizes are
/// equal).
#[inline(always)]
fn chunk_bytes(words: &[u64; ARGS_WORDS]) -> &[u8; ARGS_CHUNK] {
    unsafe { &*(words as *const [u64; ARGS_WORDS] as *const [u8; ARGS_CHUNK]) }
}

/// [`chunk_bytes`], to fill a chunk (user space: [`args_hash_of`] and the tests).
fn chunk_bytes_mut(words: &mut [u64; ARGS_WORDS]) -> &mut [u8; ARGS_CHUNK] {
    unsafe { &mut *(words as *mut [u64; ARGS_WORDS] as *mut [u8; ARGS_CHUNK]) }
}

#[inline(always)]
fn byte(chunk: &[u8; ARGS_CHUNK], i: u64) -> u8 {
    chunk[(i & MASK) as usize]
}

/// The 8 bytes at `at`, little-endian, wrapping inside the chunk as [`byte`] does (callers
/// keep the 8 bytes within the data, or mask what lies outside it): from the one or two aligned
/// words they lie in, two loads instead of eight byte loads with their shifts (three times per
/// key, 1320 times per BRPOP of 440 keys).
#[inline(always)]
fn word_at(words: &[u64; ARGS_WORDS], at: u64) -> u64 {
    let index = (at >> 3) as usize;
    let shift = (at & 7) * 8;
    // `from_le`: the bytes of the chunk are the words' bytes in memory order.
    let low = u64::from_le(words[index & (ARGS_WORDS - 1)]);
    let high = u64::from_le(words[index.wrapping_add(1) & (ARGS_WORDS - 1)]);
    // Without a branch for an aligned word: the keys' offsets follow their lengths, so such
    // a branch would go either way from one key to the next.
    word_across(low, high, shift)
}

/// `<digits>\r\n` at `start`, at most `max` digits, ending within `n`: its value and the
/// position after it.
#[inline(always)]
fn number<O: Opaque>(
    chunk: &[u8; ARGS_CHUNK],
    start: u64,
    n: u64,
    max: u64,
    o: &O,
) -> Option<(u64, u64)> {
    let mut value = 0u64;
    let mut digits = 0u64;
    while digits < max {
        let d = (byte(chunk, start + digits) as u64).wrapping_sub(b'0' as u64);
        if d >= 10 {
            break;
        }
        value = value * 10 + d;
        digits += 1;
    }
    let digits = o.hide(digits) & 15;
    let value = o.hide(value);
    let cr = start + digits;
    if digits == 0 || digits > max || cr + 2 > n {
        return None;
    }
    if byte(chunk, cr) != b'\r' || byte(chunk, cr + 1) != b'\n' {
        return None;
    }
    Some((value, cr + 2))
}

/// The hash of one argument and the offset after it: `$<len>\r\n<bytes>\r\n` starting at
/// `off` (its `$`) and ending within the `n` bytes read, or `None` when it does not (cut by
/// the chunk's end, a length of more than 3 digits, or not RESP).
///
/// What is hashed is the argument as sent, header included (so its length is in it): its
/// first 16 bytes and its last 8 (the key's last 6 and the CRLF), masked to the argument
/// where it is shorter, so that what lies around it (another order of the keys) never
/// counts. Three words, read whole, where the byte-wise reading took ten masked byte loads
/// per key, most of this hash's cost for 440 keys.
#[inline(always)]
fn argument<O: Opaque>(words: &[u64; ARGS_WORDS], off: u64, n: u64, o: &O) -> Option<(u64, u64)> {
    let head = word_at(words, off);
    let byte_at = |i: u64| (head >> (8 * i)) & 0xff;
    if byte_at(0) != b'$' as u64 {
        return None;
    }
    // The length's 1 to 3 digits, and where the CRLF after them starts.
    let digit = |i: u64| byte_at(i).wrapping_sub(b'0' as u64);
    let (d1, d2, d3) = (digit(1), digit(2), digit(3));
    let (len, cr) = if d1 >= 10 {
        return None;
    } else if d2 >= 10 {
        (d1, 2)
    } else if d3 >= 10 {
        (d1 * 10 + d2, 3)
    } else {
        (d1 * 100 + d2 * 10 + d3, 4)
    };
    let cr = o.hide(cr) & 7;
    if (head >> (8 * cr)) & 0xffff != 0x0a0d {
        return None;
    }
    let len = o.hide(len) & 0x3ff;
    // The CRLF after the bytes, and the argument's size (6 for an empty one).
    let end = off + cr + 2 + len;
    let next = end + 2;
    if next > n {
        return None;
    }
    let size = next - off;
    let mut tail = word_at(words, end.wrapping_sub(6));
    if tail >> 48 != 0x0a0d {
        return None;
    }
    let mut head = head;
    if size < 8 {
        // The bytes before the argument (tail's low ones) and after it (head's high ones).
        let outside = 8 * (8 - size);
        head &= u64::MAX >> outside;
        tail &= u64::MAX << outside;
    }
    let second = if size >= 16 {
        word_at(words, off + 8)
    } else if size > 8 {
        word_at(words, off + 8) & (u64::MAX >> (8 * (16 - size)))
    } else {
        0
    };
    Some((
        mix(mix(mix(0x243f_6a88_85a3_08d3, head), second), tail),
        next,
    ))
}

impl ArgsHash {
    /// The hash of a buffer of `len` bytes, once [`ArgsHash::chunk`] said `Done`.
    pub fn value(&self, len: u64) -> u64 {
        // Never 0, which says "not taken".
        mix(mix(self.ends, self.keys), len) | 1
    }

    /// Reads the arguments whose header starts a chunk of `n` bytes (read at `pos` from a
    /// buffer of `len` bytes), held in `words`.
    #[inline(always)]
    pub fn chunk<O: Opaque>(
        &mut self,
        words: &[u64; ARGS_WORDS],
        n: u64,
        len: u64,
        o: &O,
    ) -> ChunkStep {
        let chunk = chunk_bytes(words);
        let fail = |s: &mut Self| {
            s.failed = 1;
            ChunkStep::Failed
        };
        if n == 0 || n > ARGS_CHUNK as u64 {
            return fail(self);
        }
        let mut off = 0u64;
        if self.pos == 0 {
            if byte(chunk, 0) != b'*' {
                return fail(self);
            }
            match number(chunk, 1, n, COUNT_DIGITS, o) {
                // The command, at least one key, the timeout.
                Some((count, end)) if count >= 3 => {
                    self.total = count;
                    self.left = count;
                    off = end;
                }
                _ => return fail(self),
            }
        }
        let mut read = 0u64;
        while read < ARGS_PER_CHUNK {
            if self.left == 0 {
                break;
            }
            // Before the mask: an argument that ends the chunk exactly leaves `off` at
            // `ARGS_CHUNK`, which the mask would turn into the chunk's first argument again.
            if off + 4 > n {
                break;
            }
            let off_now = o.hide(off) & MASK;
            let Some((h, next)) = argument(words, off_now, n, o) else {
                break;
            };
            let index = self.total - self.left;
            if index == 0 || self.left == 1 {
                self.ends = mix(self.ends, h);
            } else {
                self.keys = self.keys.wrapping_add(h);
            }
            self.left -= 1;
            off = next;
            read += 1;
        }
        if off == 0 {
            // Not one whole header and argument in a whole chunk: too long, or not RESP.
            return fail(self);
        }
        self.pos += off;
        if self.left == 0 {
            return if self.pos == len {
                ChunkStep::Done
            } else {
                fail(self)
            };
        }
        if self.pos >= len {
            return fail(self);
        }
        ChunkStep::More
    }
}

/// The hash of a whole buffer, as the probes compute it chunk by chunk (also for tests).
pub fn args_hash_of(bytes: &[u8]) -> Option<u64> {
    let mut state = ArgsHash::default();
    let len = bytes.len() as u64;
    loop {
        // Garbage past the data, as a short read leaves it.
        let mut words = [0x5a5a_5a5a_5a5a_5a5a_u64; ARGS_WORDS];
        let chunk = chunk_bytes_mut(&mut words);
        let from = state.pos as usize;
        let n = (bytes.len() - from).min(ARGS_CHUNK);
        chunk[..n].copy_from_slice(&bytes[from..from + n]);
        match state.chunk(&words, n as u64, len, &crate::resp::Transparent) {
            ChunkStep::More => continue,
            ChunkStep::Done => return Some(state.value(len)),
            ChunkStep::Failed => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{format, string::String, string::ToString, vec::Vec};

    use super::*;
    use crate::resp::encoding::encode;

    fn brpop(keys: &[String], timeout: &str) -> Vec<u8> {
        let mut args = std::vec!["BRPOP"];
        args.extend(keys.iter().map(String::as_str));
        args.push(timeout);
        encode(&args)
    }

    fn queues(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("queue:pipeline_processing:stage_{i}"))
            .collect()
    }

    #[test]
    fn a_word_is_the_eight_bytes_at_its_offset_wrapping_in_the_chunk() {
        let mut words = [0u64; ARGS_WORDS];
        let bytes = chunk_bytes_mut(&mut words);
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(151).wrapping_add(7);
        }
        let bytes = *bytes;
        for at in 0..ARGS_CHUNK as u64 {
            let expected = (0..8).fold(0u64, |w, i| w | (byte(&bytes, at + i) as u64) << (8 * i));
            assert_eq!(word_at(&words, at), expected, "at {at}");
        }
    }

    #[test]
    fn the_same_keys_in_any_order_hash_the_same() {
        let keys = queues(440);
        let a = args_hash_of(&brpop(&keys, "2")).unwrap();
        let mut shuffled = keys.clone();
        shuffled.reverse();
        shuffled.swap(7, 300);
        assert_eq!(args_hash_of(&brpop(&shuffled, "2")), Some(a));
        // Short keys (fewer than 8 bytes) and one key.
        let short: Vec<String> = (0..30).map(|i| format!("q{i}")).collect();
        let mut reversed = short.clone();
        reversed.reverse();
        assert_eq!(
            args_hash_of(&brpop(&short, "0")),
            args_hash_of(&brpop(&reversed, "0"))
        );
        assert!(args_hash_of(&brpop(&short[..1], "0")).is_some());
    }

    #[test]
    fn another_key_timeout_or_command_hashes_differently() {
        let keys = queues(100);
        let a = args_hash_of(&brpop(&keys, "2")).unwrap();
        assert_ne!(args_hash_of(&brpop(&keys, "5")), Some(a), "timeout");
        assert_ne!(
            args_hash_of(&brpop(&keys[1..], "2")),
            Some(a),
            "a key fewer"
        );
        let mut replaced = keys.clone();
        replaced[50] = "queue:pipeline_processing:stage_x".into();
        assert_ne!(
            args_hash_of(&brpop(&replaced, "2")),
            Some(a),
            "a key replaced"
        );
        // A byte among a key's first 11 ("$34\r\n" and 11 of the key) or last 6.
        for (from, to) in [("queue:pip", "queuX:pip"), ("stage_50", "stagX_50")] {
            let mut changed = keys.clone();
            changed[50] = changed[50].replacen(from, to, 1);
            assert_ne!(args_hash_of(&brpop(&changed, "2")), Some(a), "{to}");
        }
        // The middle of a key, where both ends and the length agree: the documented limit.
        let mut middle = keys.clone();
        middle[50] = middle[50].replace("processing", "procesXing");
        assert_eq!(args_hash_of(&brpop(&middle, "2")), Some(a));
        let mut blpop = std::vec!["BLPOP"];
        blpop.extend(keys.iter().map(String::as_str));
        blpop.push("2");
        assert_ne!(args_hash_of(&encode(&blpop)), Some(a), "command");
        // The timeout moved among the keys: another call.
        let mut moved = std::vec!["BRPOP", "2"];
        moved.extend(keys.iter().map(String::as_str));
        assert_ne!(args_hash_of(&encode(&moved)), Some(a));
    }

    /// The hash as specified, argument by argument from the whole buffer, without chunks or
    /// words: what the word-wise reading must agree with at every offset and size.
    fn specified(bytes: &[u8]) -> Option<u64> {
        let word = |b: &[u8]| b.iter().rev().fold(0u64, |w, &x| w << 8 | x as u64);
        let text = std::str::from_utf8(bytes).ok()?;
        let count: usize = text.strip_prefix('*')?.split("\r\n").next()?.parse().ok()?;
        let mut at = text.find("\r\n")? + 2;
        let (mut ends, mut keys) = (0u64, 0u64);
        for index in 0..count {
            let len: usize = text[at + 1..].split("\r\n").next()?.parse().ok()?;
            let digits = len.to_string().len();
            let size = 1 + digits + 2 + len + 2;
            let arg = &bytes[at..at + size];
            let head = word(&arg[..size.min(8)]);
            let second = if size > 8 {
                word(&arg[8..size.min(16)])
            } else {
                0
            };
            let tail = word(&arg[size.saturating_sub(8)..]) << (8 * 8usize.saturating_sub(size));
            let h = mix(mix(mix(0x243f_6a88_85a3_08d3, head), second), tail);
            if index == 0 || index == count - 1 {
                ends = mix(ends, h);
            } else {
                keys = keys.wrapping_add(h);
            }
            at += size;
        }
        (at == bytes.len()).then(|| mix(mix(ends, keys), bytes.len() as u64) | 1)
    }

    #[test]
    fn each_argument_is_hashed_as_specified_whatever_its_size_and_place_in_a_chunk() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        for round in 0..300 {
            // Keys of 0 to 40 bytes (arguments of 6 to 47), enough of them to span chunks.
            let keys: Vec<String> = (0..1 + next(120))
                .map(|i| {
                    let len = next(41) as usize;
                    (0..len)
                        .map(|j| (b'a' + ((i as usize * 7 + j * 3 + round) % 26) as u8) as char)
                        .collect()
                })
                .collect();
            let timeout = ["0", "2", "0.5", "10"][next(4) as usize];
            let bytes = brpop(&keys, timeout);
            let expected = specified(&bytes).expect("the specification reads it");
            assert_eq!(args_hash_of(&bytes), Some(expected), "round {round}");
            let mut shuffled = keys.clone();
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, next(i as u64 + 1) as usize);
            }
            assert_eq!(
                args_hash_of(&brpop(&shuffled, timeout)),
                Some(expected),
                "round {round}, shuffled"
            );
        }
    }

    #[test]
    fn an_argument_that_ends_a_chunk_exactly_is_not_read_twice() {
        // The first chunk ends after its ARGS_PER_CHUNK arguments (BRPOP and short keys); the
        // second starts at the next key, and ARGS_PER_CHUNK - 1 keys of 2-digit lengths end at
        // its last byte, where one more read wrapped to the chunk's first key and read it
        // again (the call then went to the tokenizer: most of GitLab's weighted fetches).
        let per_chunk = ARGS_PER_CHUNK as usize - 1;
        let mut keys: Vec<String> = (0..per_chunk).map(|i| format!("a{i:02}")).collect();
        keys.extend((0..per_chunk).map(|i| {
            // "$NN\r\n" and "\r\n" around each key: its size as sent is its length + 7.
            let size = ARGS_CHUNK / per_chunk + usize::from(i < ARGS_CHUNK % per_chunk);
            format!("{}{i:02}", "k".repeat(size - 7 - 2))
        }));
        keys.extend((0..5).map(|i| format!("after{i}")));
        let second: usize = keys[per_chunk..2 * per_chunk]
            .iter()
            .map(|k| 1 + 2 + 2 + k.len() + 2)
            .sum();
        assert_eq!(second, ARGS_CHUNK, "the second chunk's keys end it");
        let bytes = brpop(&keys, "2");
        assert!(args_hash_of(&bytes).is_some());
        assert_eq!(args_hash_of(&bytes), specified(&bytes));
    }

    #[test]
    fn what_it_cannot_read_is_refused() {
        // A length of 4 digits (every argument of 3 fits in a chunk, and is taken).
        assert!(args_hash_of(&encode(&["BRPOP", &"k".repeat(999), "0"])).is_some());
        let long = "k".repeat(1000);
        assert_eq!(
            args_hash_of(&encode(&["BRPOP", &long, "0"])),
            None,
            "a key longer than a chunk"
        );
        assert_eq!(args_hash_of(&encode(&["BRPOP", "0"])), None, "no key");
        let mut two = brpop(&queues(3), "0");
        two.extend(brpop(&queues(3), "0"));
        assert_eq!(args_hash_of(&two), None, "two calls in one buffer");
        let whole = brpop(&queues(3), "0");
        assert_eq!(args_hash_of(&whole[..whole.len() - 1]), None, "cut short");
        for bad in [
            &b"GET a\r\n"[..],
            b"*3\r\n$5\r\nBRPOP\r\n$1\r\nq\r\n:0\r\n",
            b"*3\r\n$x\r\n",
        ] {
            assert_eq!(args_hash_of(bad), None, "{bad:?}");
        }
        // Random bytes never panic.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..300)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    b"*$\r\n0123456789abc"[(seed % 17) as usize]
                })
                .collect();
            let _ = args_hash_of(&bytes);
        }
    }
}
