//! The raw bpf(2) calls that aya 0.14 does not make for the agent: loading a program with an
//! expected attach type, creating uprobe-multi links, reading a link's or a map's info, and
//! deleting a hash map entry while reading it. Each `union bpf_attr` prefix is a
//! `#[repr(C)]` struct whose layout the tests check against the kernel's UAPI and aya-obj's
//! bindings.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

/// `enum bpf_attach_type` values (checked against this kernel's BTF).
pub const BPF_TRACE_UPROBE_MULTI: u32 = 48;
pub const BPF_TRACE_UPROBE_SESSION: u32 = 57;
/// `link_create.uprobe_multi.flags`: the offsets are return probes.
pub const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;

pub(crate) const BPF_PROG_TYPE_KPROBE: u32 = 2;
pub(crate) const BPF_MAP_UPDATE_ELEM: u32 = 2;
pub(crate) const BPF_MAP_LOOKUP_AND_DELETE_ELEM: u32 = 21;
pub(crate) const BPF_PROG_LOAD: u32 = 5;
pub(crate) const BPF_BTF_LOAD: u32 = 18;
pub(crate) const BPF_LINK_CREATE: u32 = 28;
pub(crate) const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
/// The kernel-internal "not supported" errno, which some paths return to user space.
pub(crate) const ENOTSUPP: i32 = 524;

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `core_relo_cnt` (the kernel zero-fills the rest).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ProgLoadAttr {
    pub(crate) prog_type: u32,
    pub(crate) insn_cnt: u32,
    pub(crate) insns: u64,
    pub(crate) license: u64,
    pub(crate) log_level: u32,
    pub(crate) log_size: u32,
    pub(crate) log_buf: u64,
    pub(crate) kern_version: u32,
    pub(crate) prog_flags: u32,
    pub(crate) prog_name: [u8; 16],
    pub(crate) prog_ifindex: u32,
    pub(crate) expected_attach_type: u32,
    pub(crate) prog_btf_fd: u32,
    pub(crate) func_info_rec_size: u32,
    pub(crate) func_info: u64,
    pub(crate) func_info_cnt: u32,
    pub(crate) line_info_rec_size: u32,
    pub(crate) line_info: u64,
    pub(crate) line_info_cnt: u32,
    pub(crate) attach_btf_id: u32,
    pub(crate) attach_prog_fd: u32,
    pub(crate) core_relo_cnt: u32,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` with `link_create.uprobe_multi`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LinkCreateUprobeMultiAttr {
    pub(crate) prog_fd: u32,
    pub(crate) target_fd: u32,
    pub(crate) attach_type: u32,
    pub(crate) flags: u32,
    pub(crate) path: u64,
    pub(crate) offsets: u64,
    pub(crate) ref_ctr_offsets: u64,
    pub(crate) cookies: u64,
    pub(crate) cnt: u32,
    pub(crate) uprobe_flags: u32,
    pub(crate) pid: u32,
    pub(crate) _pad: u32,
}

/// `union bpf_attr` for `BPF_BTF_LOAD`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct BtfLoadAttr {
    pub(crate) btf: u64,
    pub(crate) btf_log_buf: u64,
    pub(crate) btf_size: u32,
    pub(crate) btf_log_size: u32,
    pub(crate) btf_log_level: u32,
    pub(crate) btf_log_true_size: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct InfoByFdAttr {
    pub(crate) bpf_fd: u32,
    pub(crate) info_len: u32,
    pub(crate) info: u64,
}

/// The start of `struct bpf_link_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LinkInfoHead {
    pub(crate) link_type: u32,
    pub(crate) id: u32,
    pub(crate) prog_id: u32,
    pub(crate) _pad: u32,
}

/// `union bpf_attr` for `BPF_MAP_UPDATE_ELEM` and `BPF_MAP_LOOKUP_AND_DELETE_ELEM`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct MapElemAttr {
    pub(crate) map_fd: u32,
    pub(crate) _pad: u32,
    pub(crate) key: u64,
    pub(crate) value: u64,
    pub(crate) flags: u64,
}

/// Deletes `key` from a hash map and returns the value it had at that moment
/// (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, hash maps since Linux 5.14; aya 0.14 has it for queues
/// and stacks only), or `None` if the key was absent. A delete that must know what it deleted,
/// when the kernel side may have rewritten the entry since it was read. `K` and `V` must be
/// the map's exact key and value types (plain `#[repr(C)]` data).
pub(crate) fn lookup_and_delete<K: Copy, V: Copy + Default>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = V::default();
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        ..Default::default()
    };
    match sys_bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn sys_bpf<T>(cmd: u32, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live, initialised #[repr(C)] bpf_attr prefix of the given size; the
    // pointers inside it are the caller's to keep valid for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_long,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A bpf(2) command that returns a new fd.
pub(crate) fn sys_bpf_fd<T>(cmd: u32, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = sys_bpf(cmd, attr)?;
    let fd =
        i32::try_from(fd).map_err(|_| io::Error::other(format!("bpf({cmd}) returned {fd}")))?;
    // SAFETY: the command returns a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs a load without a log, and on failure once more with a log buffer to say why. The
/// kernel's log rotates (6.4+): when it does not fit, the buffer holds its end, which is where
/// the reason is, and the retry fails with ENOSPC; the first error is the one returned.
pub(crate) fn with_verifier_log(
    mut load: impl FnMut(Option<&mut [u8]>) -> io::Result<OwnedFd>,
) -> (io::Result<OwnedFd>, String) {
    let first = loop {
        match load(None) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            other => break other,
        }
    };
    let Err(error) = first else {
        return (first, String::new());
    };
    let mut buf = vec![0u8; 4 << 20];
    let retry = load(Some(&mut buf));
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let log = String::from_utf8_lossy(&buf[..end]).into_owned();
    match retry {
        // Loaded on the second try (a transient failure): keep it.
        Ok(fd) => (Ok(fd), log),
        Err(_) => (Err(error), log),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn attr_layouts_match_the_uapi() {
        // Offsets from this kernel's `union bpf_attr` (bpftool btf dump ... format c).
        assert_eq!(offset_of!(ProgLoadAttr, prog_type), 0);
        assert_eq!(offset_of!(ProgLoadAttr, insns), 8);
        assert_eq!(offset_of!(ProgLoadAttr, license), 16);
        assert_eq!(offset_of!(ProgLoadAttr, log_buf), 32);
        assert_eq!(offset_of!(ProgLoadAttr, kern_version), 40);
        assert_eq!(offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(offset_of!(ProgLoadAttr, prog_btf_fd), 72);
        assert_eq!(offset_of!(ProgLoadAttr, func_info), 80);
        assert_eq!(offset_of!(ProgLoadAttr, line_info), 96);
        assert_eq!(offset_of!(ProgLoadAttr, core_relo_cnt), 116);
        assert_eq!(size_of::<ProgLoadAttr>(), 120);

        assert_eq!(offset_of!(LinkCreateUprobeMultiAttr, attach_type), 8);
        assert_eq!(offset_of!(LinkCreateUprobeMultiAttr, flags), 12);
        assert_eq!(offset_of!(LinkCreateUprobeMultiAttr, path), 16);
        assert_eq!(offset_of!(LinkCreateUprobeMultiAttr, offsets), 24);
        assert_eq!(offset_of!(LinkCreateUprobeMultiAttr, ref_ctr_offsets), 32);
        assert_eq!(offset_of!(LinkCreateUprobeMultiAttr, cookies), 40);
        assert_eq!(offset_of!(LinkCreateUprobeMultiAttr, cnt), 48);
        assert_eq!(offset_of!(LinkCreateUprobeMultiAttr, uprobe_flags), 52);
        assert_eq!(offset_of!(LinkCreateUprobeMultiAttr, pid), 56);
        assert_eq!(size_of::<LinkCreateUprobeMultiAttr>(), 64);

        assert_eq!(offset_of!(BtfLoadAttr, btf_size), 16);
        assert_eq!(offset_of!(BtfLoadAttr, btf_log_level), 24);
        assert_eq!(size_of::<BtfLoadAttr>(), 32);
        assert_eq!(offset_of!(InfoByFdAttr, info), 8);
        assert_eq!(offset_of!(LinkInfoHead, id), 4);
        assert_eq!(offset_of!(MapElemAttr, key), 8);
        assert_eq!(offset_of!(MapElemAttr, flags), 24);
    }

    #[test]
    fn attr_layouts_match_aya_obj_bindings() {
        use aya_obj::generated as g;
        type Load = g::bpf_attr__bindgen_ty_4;
        assert_eq!(
            offset_of!(ProgLoadAttr, insn_cnt),
            offset_of!(Load, insn_cnt)
        );
        assert_eq!(
            offset_of!(ProgLoadAttr, log_level),
            offset_of!(Load, log_level)
        );
        assert_eq!(
            offset_of!(ProgLoadAttr, log_size),
            offset_of!(Load, log_size)
        );
        assert_eq!(
            offset_of!(ProgLoadAttr, prog_flags),
            offset_of!(Load, prog_flags)
        );
        assert_eq!(
            offset_of!(ProgLoadAttr, prog_name),
            offset_of!(Load, prog_name)
        );
        assert_eq!(
            offset_of!(ProgLoadAttr, prog_ifindex),
            offset_of!(Load, prog_ifindex)
        );
        assert_eq!(
            offset_of!(ProgLoadAttr, expected_attach_type),
            offset_of!(Load, expected_attach_type)
        );
        assert_eq!(
            offset_of!(ProgLoadAttr, func_info_rec_size),
            offset_of!(Load, func_info_rec_size)
        );
        assert_eq!(
            offset_of!(ProgLoadAttr, func_info_cnt),
            offset_of!(Load, func_info_cnt)
        );
        assert_eq!(
            offset_of!(ProgLoadAttr, line_info_rec_size),
            offset_of!(Load, line_info_rec_size)
        );
        assert_eq!(
            offset_of!(ProgLoadAttr, line_info_cnt),
            offset_of!(Load, line_info_cnt)
        );
        assert_eq!(
            offset_of!(ProgLoadAttr, attach_btf_id),
            offset_of!(Load, attach_btf_id)
        );
        assert_eq!(
            offset_of!(ProgLoadAttr, core_relo_cnt),
            offset_of!(Load, core_relo_cnt)
        );

        type Link = g::bpf_attr__bindgen_ty_14;
        type Multi = g::bpf_attr__bindgen_ty_14__bindgen_ty_3__bindgen_ty_7;
        let multi = offset_of!(Link, __bindgen_anon_3);
        assert_eq!(
            offset_of!(LinkCreateUprobeMultiAttr, attach_type),
            offset_of!(Link, attach_type)
        );
        assert_eq!(
            offset_of!(LinkCreateUprobeMultiAttr, flags),
            offset_of!(Link, flags)
        );
        assert_eq!(
            offset_of!(LinkCreateUprobeMultiAttr, path),
            multi + offset_of!(Multi, path)
        );
        assert_eq!(
            offset_of!(LinkCreateUprobeMultiAttr, offsets),
            multi + offset_of!(Multi, offsets)
        );
        assert_eq!(
            offset_of!(LinkCreateUprobeMultiAttr, cookies),
            multi + offset_of!(Multi, cookies)
        );
        assert_eq!(
            offset_of!(LinkCreateUprobeMultiAttr, cnt),
            multi + offset_of!(Multi, cnt)
        );
        assert_eq!(
            offset_of!(LinkCreateUprobeMultiAttr, uprobe_flags),
            multi + offset_of!(Multi, flags)
        );
        assert_eq!(
            offset_of!(LinkCreateUprobeMultiAttr, pid),
            multi + offset_of!(Multi, pid)
        );
        assert!(size_of::<LinkCreateUprobeMultiAttr>() <= size_of::<g::bpf_attr>());

        assert_eq!(
            g::bpf_attach_type::BPF_TRACE_UPROBE_MULTI as u32,
            BPF_TRACE_UPROBE_MULTI
        );
        assert_eq!(g::bpf_cmd::BPF_PROG_LOAD as u32, BPF_PROG_LOAD);
        assert_eq!(g::bpf_cmd::BPF_BTF_LOAD as u32, BPF_BTF_LOAD);
        assert_eq!(g::bpf_cmd::BPF_LINK_CREATE as u32, BPF_LINK_CREATE);
        assert_eq!(g::bpf_cmd::BPF_MAP_UPDATE_ELEM as u32, BPF_MAP_UPDATE_ELEM);
        assert_eq!(
            g::bpf_cmd::BPF_MAP_LOOKUP_AND_DELETE_ELEM as u32,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM
        );
        assert_eq!(
            g::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as u32,
            BPF_OBJ_GET_INFO_BY_FD
        );
        assert_eq!(
            offset_of!(LinkInfoHead, id),
            offset_of!(g::bpf_link_info, id)
        );
        assert_eq!(
            offset_of!(LinkInfoHead, prog_id),
            offset_of!(g::bpf_link_info, prog_id)
        );
        assert_eq!(
            g::bpf_prog_type::BPF_PROG_TYPE_KPROBE as u32,
            BPF_PROG_TYPE_KPROBE
        );
        assert_eq!(size_of::<g::bpf_insn>(), 8);
    }
}
