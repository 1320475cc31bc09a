//! How full each eBPF hash map is: entries against capacity, for `fanout.ebpf.map.entries`
//! and `fanout.ebpf.map.capacity`. Every map is bounded; this shows how close each is to its
//! bound (a full map loses events, counted in `fanout.events.lost`) and, over a long run,
//! that entries of exited processes are let go.
//!
//! Entries are counted by walking the keys (`BPF_MAP_GET_NEXT_KEY`), so the cost grows with
//! what a map holds, not with its capacity: about 1 us per entry. Arrays are always full by
//! construction and are left out, as are ring buffers and queues.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use super::bpf_sys::{sys_bpf, BPF_OBJ_GET_INFO_BY_FD};
use super::uprobe_multi::MapFds;

const BPF_MAP_GET_NEXT_KEY: u32 = 4;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;
/// Keys longer than this are not walked (none of the agent's are near it).
const MAX_KEY_SIZE: usize = 512;

/// The start of `struct bpf_map_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct MapInfoHead {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `union bpf_attr` for `BPF_MAP_GET_NEXT_KEY`.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// One hash map's occupancy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapUsage {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
}

fn info(fd: BorrowedFd<'_>) -> std::io::Result<MapInfoHead> {
    let mut info = MapInfoHead::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<MapInfoHead>() as u32,
        info: &mut info as *mut MapInfoHead as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// Counts the keys of a map, stopping at `limit` (a map changing under the walk can make it
/// restart from the first key).
fn count_keys(fd: BorrowedFd<'_>, key_size: usize, limit: u64) -> u64 {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut count = 0;
    let mut first = true;
    while count < limit {
        let mut attr = NextKeyAttr {
            map_fd: fd.as_raw_fd() as u32,
            _pad: 0,
            // A null key asks for the first one.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        if sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr).is_err() {
            break; // ENOENT: the last key was reached.
        }
        first = false;
        count += 1;
        std::mem::swap(&mut key, &mut next);
    }
    count
}

/// The occupancy of every hash map among `maps`, by name.
pub fn hash_map_usage(maps: &MapFds) -> Vec<MapUsage> {
    maps.names()
        .filter_map(|name| {
            let fd = maps.get(name)?;
            let info = info(fd).ok()?;
            let hash = matches!(
                info.map_type,
                BPF_MAP_TYPE_HASH
                    | BPF_MAP_TYPE_PERCPU_HASH
                    | BPF_MAP_TYPE_LRU_HASH
                    | BPF_MAP_TYPE_LRU_PERCPU_HASH
            );
            let key_size = info.key_size as usize;
            if !hash || key_size == 0 || key_size > MAX_KEY_SIZE {
                return None;
            }
            let capacity = info.max_entries as u64;
            Some(MapUsage {
                name: name.to_string(),
                entries: count_keys(fd, key_size, capacity),
                capacity,
            })
        })
        .collect()
}
