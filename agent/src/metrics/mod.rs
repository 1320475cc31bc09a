//! The agent's metric model: one snapshot of every series, built at read time (a Prometheus
//! scrape or an OTLP push) and rendered to either format.
//!
//! Why not the OpenTelemetry SDK's instruments: the histograms are aggregated in the kernel and
//! arrive as cumulative bucket counts. The SDK API has no asynchronous histogram, and replaying
//! millions of events into a synchronous one would cost more than the probes themselves. So the
//! agent builds OTLP data points directly with the `opentelemetry-proto` types (the same wire
//! format the SDK's exporter sends) and follows the OpenTelemetry data model: cumulative
//! temporality, explicit bucket bounds, resource attributes.

pub mod json;
pub mod prometheus;

use std::time::SystemTime;

/// An attribute value. Only the kinds the agent emits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AttrValue {
    Str(String),
    Int(i64),
}

impl std::fmt::Display for AttrValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttrValue::Str(s) => f.write_str(s),
            AttrValue::Int(i) => write!(f, "{i}"),
        }
    }
}

impl From<&str> for AttrValue {
    fn from(s: &str) -> Self {
        AttrValue::Str(s.to_string())
    }
}
impl From<String> for AttrValue {
    fn from(s: String) -> Self {
        AttrValue::Str(s)
    }
}
impl From<u32> for AttrValue {
    fn from(i: u32) -> Self {
        AttrValue::Int(i as i64)
    }
}

pub type Attributes = Vec<(&'static str, AttrValue)>;

/// A cumulative histogram with explicit bounds: `counts[i]` counts values in
/// `(bounds[i-1], bounds[i]]`, and the last count is everything above the last bound.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramValue {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PointValue {
    /// Monotonic cumulative sum.
    Counter(f64),
    Gauge(f64),
    Histogram(HistogramValue),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub attributes: Attributes,
    /// When the cumulative series started (tracking began); ignored for gauges.
    pub start_time: SystemTime,
    pub value: PointValue,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric's identity, declared once (see [`catalog`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub name: &'static str,
    pub description: &'static str,
    pub unit: &'static str,
    pub kind: Kind,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    pub descriptor: Descriptor,
    pub points: Vec<Point>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub metrics: Vec<Metric>,
}

impl Snapshot {
    /// Adds a point under `descriptor`, creating the metric on first use (order is kept).
    pub fn push(&mut self, descriptor: Descriptor, point: Point) {
        if let Some(metric) = self
            .metrics
            .iter_mut()
            .find(|m| m.descriptor.name == descriptor.name)
        {
            metric.points.push(point);
        } else {
            self.metrics.push(Metric {
                descriptor,
                points: vec![point],
            });
        }
    }

    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.metrics.iter().find(|m| m.descriptor.name == name)
    }
}

/// Every metric the agent exports. One place, so the names used by exporters, dashboards and
/// tests cannot drift.
pub mod catalog {
    use super::{Descriptor, Kind};

    pub const THREAD_CPU_TIME: Descriptor = Descriptor {
        name: "process.thread.cpu.time",
        description: "CPU time used by the threads of a process that share a thread name, by CPU mode (from /proc)",
        unit: "s",
        kind: Kind::Counter,
    };
    pub const THREAD_RUNQUEUE_DELAY: Descriptor = Descriptor {
        name: "process.thread.runqueue.delay",
        description: "Time threads spent runnable but waiting for a CPU, per wait (eBPF sched_switch: the kernel's run-delay counter)",
        unit: "s",
        kind: Kind::Histogram,
    };
    pub const THREAD_ONCPU_DURATION: Descriptor = Descriptor {
        name: "process.thread.oncpu.duration",
        description: "Length of each stretch threads ran on a CPU before being switched out (eBPF sched_switch)",
        unit: "s",
        kind: Kind::Histogram,
    };
    pub const PROCESSES_TRACKED: Descriptor = Descriptor {
        name: "fanout.processes.tracked",
        description: "Processes the agent currently tracks, by group",
        unit: "{process}",
        kind: Kind::Gauge,
    };
    pub const PROBES_ATTACHED: Descriptor = Descriptor {
        name: "fanout.probes.attached",
        description: "Whether each eBPF program is attached (1) or not (0)",
        unit: "{probe}",
        kind: Kind::Gauge,
    };
    pub const PROC_READ_ERRORS: Descriptor = Descriptor {
        name: "fanout.proc.read.errors",
        description:
            "Reads of /proc that failed, by kind (vanished: the process or thread exited mid-read)",
        unit: "{error}",
        kind: Kind::Counter,
    };
    pub const WORKERS_UNFOLLOWED: Descriptor = Descriptor {
        name: "fanout.workers.unfollowed",
        description: "Tracked workers whose Redis traffic is not followed, by reason (redis_on_node: no uprobe target, and the syscall tracepoints would tax the Redis on this node; tls: followed, but holding TLS connections and no plain RESP one, so a Redis reached over TLS is not seen; probe_backlog: not probed until the probes of gone workers are released, see fanout.probes.closing)",
        unit: "{process}",
        kind: Kind::Gauge,
    };
    pub const PROBES_CLOSING: Descriptor = Descriptor {
        name: "fanout.probes.closing",
        description: "Probes the agent has closed (those of gone workers, and of gone Redis servers) and the kernel has yet to release (uprobe-multi links, or perf-event uprobes where those are refused, which the kernel releases about 10 a second); past 2048 perf-event uprobes (by default), new workers are held back (fanout.workers.unfollowed{reason=\"probe_backlog\"})",
        unit: "{probe}",
        kind: Kind::Gauge,
    };
    pub const WORKERS_PROBE_OFF: Descriptor = Descriptor {
        name: "fanout.workers.probe_off",
        description: "Followed workers whose calls of write() or read() (call) are not probed, by how they are followed (via: uprobes, their own link on write() is out; tracepoints, sys_enter_write or sys_exit_read is detached for all of them): their Redis connections use send/sendto and recv/recvfrom, and write()/read() carry only their logs, pipes and files",
        unit: "{process}",
        kind: Kind::Gauge,
    };
    pub const EVENTS_LOST: Descriptor = Descriptor {
        name: "fanout.events.lost",
        description: "Events the kernel side could not record or deliver, by reason",
        unit: "{event}",
        kind: Kind::Counter,
    };
    pub const EXPORT_FAILURES: Descriptor = Descriptor {
        name: "fanout.export.failures",
        description: "OTLP pushes that failed or timed out (exporter=otlp), scrapes that failed to render (exporter=prometheus)",
        unit: "{request}",
        kind: Kind::Counter,
    };
    pub const EBPF_MAP_ENTRIES: Descriptor = Descriptor {
        name: "fanout.ebpf.map.entries",
        description: "Entries in each of the agent's eBPF hash maps",
        unit: "{entry}",
        kind: Kind::Gauge,
    };
    pub const EBPF_MAP_CAPACITY: Descriptor = Descriptor {
        name: "fanout.ebpf.map.capacity",
        description: "Capacity (max_entries) of each of the agent's eBPF hash maps",
        unit: "{entry}",
        kind: Kind::Gauge,
    };
    pub const STATE_LOCK_WAIT: Descriptor = Descriptor {
        name: "fanout.state_lock.wait",
        description:
            "How long each user of the agent's state (scrape, rescan, event handlers) waited for it",
        unit: "s",
        kind: Kind::Histogram,
    };
    pub const WORKER_KEY_LISTS: Descriptor = Descriptor {
        name: "fanout.worker.key_lists",
        description: "Key lists of blocking calls received from the kernel: one per connection, and one more each time its list changes (the same keys in another order are the same list)",
        unit: "{list}",
        kind: Kind::Counter,
    };
    pub const THREAD_NAMES_OVERFLOW: Descriptor = Descriptor {
        name: "fanout.thread_names.overflow",
        description: "Threads whose name was folded into 'other' because a process exceeded the thread-name limit",
        unit: "{thread}",
        kind: Kind::Counter,
    };

    pub const REDIS_BLOCKING_KEYS: Descriptor = Descriptor {
        name: "redis.blocking.keys",
        description:
            "Keys listed by each blocking call that blocked (fan-out), seen inside redis-server",
        unit: "{key}",
        kind: Kind::Histogram,
    };
    pub const REDIS_BLOCKING_DURATION: Descriptor = Descriptor {
        name: "redis.blocking.duration",
        description: "How long clients stayed blocked, by outcome (served, timeout, other), seen inside redis-server",
        unit: "s",
        kind: Kind::Histogram,
    };
    pub const REDIS_CLIENTS_BLOCKED: Descriptor = Descriptor {
        name: "redis.clients.blocked",
        description: "Clients currently blocked on keys (blocking calls that started after the agent attached)",
        unit: "{client}",
        kind: Kind::Gauge,
    };
    pub const REDIS_BLOCKING_REGISTRATIONS: Descriptor = Descriptor {
        name: "redis.blocking.registrations",
        description:
            "Key registrations held by blocked clients: the sum of keys over blocked clients",
        unit: "{key}",
        kind: Kind::Gauge,
    };
    pub const REDIS_BLOCKING_CPU_TIME: Descriptor = Descriptor {
        name: "redis.blocking.cpu.time",
        description: "Main-thread time spent registering (blockForKeys) and unregistering (unblockClient) blocked clients; a call during which the thread was switched out counts at the mean",
        unit: "s",
        kind: Kind::Counter,
    };
    pub const REDIS_BLOCKING_PHASES: Descriptor = Descriptor {
        name: "redis.blocking.phases",
        description: "Registering and unregistering phases timed in redis.blocking.cpu.time; timing=switched_out: the main thread was switched out during the phase, which then counts at the mean of the phases with as many keys; timing=untimed: switched out before any phase of its kind was timed, it adds no time; timing=wall_clock: the kernel keeps no count to tell",
        unit: "{phase}",
        kind: Kind::Counter,
    };
    pub const PROBE_POINTS: Descriptor = Descriptor {
        name: "fanout.probe.points",
        description: "State of each Redis probe point per process (live, idle, missing, unreliable, attach_failed, unavailable)",
        unit: "{probe}",
        kind: Kind::Gauge,
    };

    pub const WORKER_POP_DURATION: Descriptor = Descriptor {
        name: "worker.blocking_pop.duration",
        description: "Blocking pops as workers see them: from the request's send to the first byte of its reply, by outcome",
        unit: "s",
        kind: Kind::Histogram,
    };
    pub const WORKER_POP_KEYS: Descriptor = Descriptor {
        name: "worker.blocking_pop.keys",
        description: "Keys listed by each blocking pop workers send (fan-out)",
        unit: "{key}",
        kind: Kind::Histogram,
    };
    pub const WORKER_POP_SERVED: Descriptor = Descriptor {
        name: "worker.blocking_pop.served",
        description: "Blocking pops served, by the Redis and (with --export-key-names) the key that served them; redis.key=unknown when the reply's key could not be read in the kernel",
        unit: "{pop}",
        kind: Kind::Counter,
    };
    pub const QUEUE_LISTENERS: Descriptor = Descriptor {
        name: "redis.queue.listeners",
        description: "Worker processes (listener=process) and currently blocked connections (listener=blocked_connection) listening to a group's queues",
        unit: "{listener}",
        kind: Kind::Gauge,
    };
    pub const WORKER_QUEUES: Descriptor = Descriptor {
        name: "worker.queues.listened",
        description: "Distinct queues (keys) a worker group's blocking pops list",
        unit: "{key}",
        kind: Kind::Gauge,
    };
    pub const QUEUES_SHARED: Descriptor = Descriptor {
        name: "worker.queues.shared",
        description: "Queues (keys on the same Redis) listened to by both process.group and peer.group; 0 means disjoint",
        unit: "{key}",
        kind: Kind::Gauge,
    };

    pub const ALL: &[Descriptor] = &[
        WORKER_POP_DURATION,
        WORKER_POP_KEYS,
        WORKER_POP_SERVED,
        QUEUE_LISTENERS,
        WORKER_QUEUES,
        QUEUES_SHARED,
        REDIS_BLOCKING_KEYS,
        REDIS_BLOCKING_DURATION,
        REDIS_CLIENTS_BLOCKED,
        REDIS_BLOCKING_REGISTRATIONS,
        REDIS_BLOCKING_CPU_TIME,
        REDIS_BLOCKING_PHASES,
        PROBE_POINTS,
        THREAD_CPU_TIME,
        THREAD_RUNQUEUE_DELAY,
        THREAD_ONCPU_DURATION,
        PROCESSES_TRACKED,
        PROBES_ATTACHED,
        PROC_READ_ERRORS,
        EVENTS_LOST,
        WORKERS_UNFOLLOWED,
        PROBES_CLOSING,
        WORKERS_PROBE_OFF,
        EXPORT_FAILURES,
        STATE_LOCK_WAIT,
        EBPF_MAP_ENTRIES,
        EBPF_MAP_CAPACITY,
        WORKER_KEY_LISTS,
        THREAD_NAMES_OVERFLOW,
    ];
}
