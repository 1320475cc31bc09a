//! Fanout's eBPF programs. Each probe area lives in its own module; the maps it alone uses sit
//! at the top of its file, maps shared between areas live in `maps`.
#![no_std]
#![no_main]

mod counters;
mod lifecycle;
mod maps;
mod redis;
mod sched;
mod worker;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_probe_read_user, bpf_get_current_task_btf and the ring buffer helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
