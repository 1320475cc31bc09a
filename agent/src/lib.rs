//! Fanout: an eBPF host agent that measures what Redis blocking pops cost, per thread, per
//! process and per queue, and exports it over OpenTelemetry and Prometheus.
//!
//! Stages, each testable alone: `proc_reader` (read /proc) -> `rules` + `discovery` (what to
//! track) -> `thread_cpu` and `ebpf` (measure) -> `collect` + `agent` (snapshot) -> `metrics`
//! and `export` (Prometheus text, OTLP).

pub mod advise;
pub mod agent;
pub mod agent_http;
pub mod applied;
pub mod cli;
pub mod collect;
pub mod config;
pub mod discovery;
pub mod ebpf;
pub mod export;
pub mod kernel_btf;
pub mod metrics;
pub mod privileges;
pub mod probe_site;
pub mod proc_reader;
pub mod proc_walk;
pub mod redis;
pub mod resource;
pub mod rules;
pub mod run;
pub mod state_lock;
pub mod thread_cpu;
pub mod top;
pub mod worker;
