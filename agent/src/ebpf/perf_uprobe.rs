//! One uprobe as a perf event (`perf_event_open` of the `uprobe` PMU, then the program linked
//! to it by `BPF_LINK_CREATE`, with a cookie, or by `PERF_EVENT_IOC_SET_BPF`, without), made
//! from a raw program fd: what aya's `UProbe::attach` does,
//! without the aya object, so that a thread that holds only program fds (the worker
//! attaching thread, see `worker::attach`) can make them where uprobe-multi links are refused
//! (kernels before 6.6). Closing the fd detaches the probe; each close waits for an RCU grace
//! period in the kernel, so callers close them off their loop
//! (`link_closer::detach_in_background`).

use std::{
    ffi::CStr,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    sync::OnceLock,
};

/// `PERF_EVENT_IOC_ENABLE`: `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
/// `PERF_EVENT_IOC_SET_BPF`: `_IOW('$', 8, __u32)`.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER5` (112 bytes), which every kernel with
/// the `uprobe` PMU (4.17+) takes; the fields a uprobe needs, the rest zero.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    /// `uprobe_path`: the file's path, a C string.
    config1: u64,
    /// `probe_offset`: the file offset.
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved: u16,
}

const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == 112);

/// The `uprobe` PMU of this kernel: its type, and the `config` bit that makes a probe a
/// return probe.
#[derive(Clone, Copy, Debug)]
struct UprobePmu {
    type_: u32,
    retprobe_bit: u32,
}

const PMU_DIR: &str = "/sys/bus/event_source/devices/uprobe";

/// Reads the PMU's type and its `retprobe` format (`config:<bit>`), once per process.
fn pmu() -> Result<UprobePmu, String> {
    static PMU: OnceLock<Result<UprobePmu, String>> = OnceLock::new();
    PMU.get_or_init(|| {
        let read = |name: &str| {
            std::fs::read_to_string(format!("{PMU_DIR}/{name}"))
                .map_err(|e| format!("{PMU_DIR}/{name}: {e} (a kernel without the uprobe PMU)"))
        };
        let type_ = read("type")?
            .trim()
            .parse()
            .map_err(|e| format!("{PMU_DIR}/type: {e}"))?;
        let retprobe_bit = parse_config_bit(&read("format/retprobe")?)
            .ok_or_else(|| format!("{PMU_DIR}/format/retprobe: not config:<bit>"))?;
        Ok(UprobePmu {
            type_,
            retprobe_bit,
        })
    })
    .clone()
}

/// The bit of `config:<bit>` (a PMU format file's text), below 64.
fn parse_config_bit(format: &str) -> Option<u32> {
    format
        .trim()
        .strip_prefix("config:")?
        .parse()
        .ok()
        .filter(|bit| *bit < 64)
}

/// `BPF_PERF_EVENT`, the attach type of a link to a perf event (Linux 5.15; it carries the
/// cookie `bpf_get_attach_cookie` reads).
const BPF_PERF_EVENT: u32 = 41;

/// `union bpf_attr` for `BPF_LINK_CREATE` of a perf event link.
#[repr(C)]
#[derive(Default)]
struct PerfLinkAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    bpf_cookie: u64,
    _rest: [u64; 4],
}

fn link_perf_event(program: BorrowedFd<'_>, target_fd: u32, cookie: u64) -> io::Result<OwnedFd> {
    let mut attr = PerfLinkAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd,
        attach_type: BPF_PERF_EVENT,
        bpf_cookie: cookie,
        ..Default::default()
    };
    super::bpf_sys::sys_bpf_fd(super::bpf_sys::BPF_LINK_CREATE, &mut attr)
}

/// Whether this kernel links a program to a perf event with a cookie, probed once (as libbpf
/// does) with `program`: a kernel that knows the attach type looks for the perf event and
/// finds a bad fd (EBADF); one before 5.15 refuses the attach type (EINVAL).
pub fn cookies_supported(program: BorrowedFd<'_>) -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let supported = matches!(
            link_perf_event(program, u32::MAX, 0),
            Err(e) if e.raw_os_error() == Some(libc::EBADF)
        );
        if !supported {
            tracing::info!("this kernel links no cookie to a perf-event uprobe: workers' write() probes stay in");
        }
        supported
    })
}

/// Puts `program` (loaded as a uprobe program with no expected attach type) at the file
/// offset `offset` of `path`, for the process `pid` (all its threads: the kernel filters
/// uprobe perf events by the process's memory), as an entry or a return probe, with
/// `cookie` where one is given (see [`cookies_supported`]; without one the program reads 0).
/// The probe lives as long as the returned fds (the perf event's, and its link's).
pub fn attach(
    program: BorrowedFd<'_>,
    path: &CStr,
    offset: u64,
    pid: u32,
    retprobe: bool,
    cookie: Option<u64>,
) -> io::Result<Vec<OwnedFd>> {
    let pmu = pmu().map_err(io::Error::other)?;
    if pid == 0 || pid > i32::MAX as u32 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    let attr = PerfEventAttr {
        type_: pmu.type_,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: if retprobe { 1 << pmu.retprobe_bit } else { 0 },
        config1: path.as_ptr() as u64,
        config2: offset,
        ..Default::default()
    };
    // SAFETY: `attr` and the path it points to outlive the call, which only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            pid as libc::pid_t,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    if let Some(cookie) = cookie {
        let link = link_perf_event(program, event.as_raw_fd() as u32, cookie)?;
        return Ok(vec![link, event]);
    }
    let ioctl = |request: libc::c_ulong, arg: libc::c_int| {
        // SAFETY: both requests take an int argument, not a pointer.
        if unsafe { libc::ioctl(event.as_raw_fd(), request, arg) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    ioctl(PERF_EVENT_IOC_SET_BPF, program.as_raw_fd())?;
    ioctl(PERF_EVENT_IOC_ENABLE, 0)?;
    Ok(vec![event])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retprobe_bit_is_read_from_the_pmu_format() {
        assert_eq!(parse_config_bit("config:0\n"), Some(0));
        assert_eq!(parse_config_bit("config:63"), Some(63));
        assert_eq!(parse_config_bit("config:64"), None);
        assert_eq!(parse_config_bit("config1:0"), None);
        assert_eq!(parse_config_bit("config:0-1"), None);
        assert_eq!(parse_config_bit(""), None);
    }
}
