//! What listening costs one Redis now: its main thread's CPU, the part of it spent on blocking
//! bookkeeping, and the cost per key fitted from that bookkeeping.

use super::{
    fit::{fit_cost_per_key, CostFit},
    observation::ServerObservation,
    today::per_second,
};

/// Why a server gets no time prediction (only keys per pop).
pub const REMOTE_REDIS: &str = "this Redis is not on the agent's host: its cost is not measured, \
                                so only keys per pop are predicted, not time";
pub const NO_BOOKKEEPING: &str = "the bookkeeping probes are not live on this Redis (or the agent \
                                  runs with --no-redis-bookkeeping-time): only keys per pop are \
                                  predicted, not time";

#[derive(Clone, Debug, PartialEq)]
pub struct Cost {
    /// Main-thread CPU, seconds per second (a share of one core). `None` for a remote Redis.
    pub main_thread_cpu_per_second: Option<f64>,
    /// Blocking bookkeeping, seconds per second: a share of one core, which is the main
    /// thread's wall time.
    pub bookkeeping_per_second: Option<f64>,
    /// Bookkeeping as a share of the main thread's CPU.
    pub bookkeeping_share_of_main_thread: Option<f64>,
    /// Main-thread CPU seconds per served job (Redis's own count of served blocking calls).
    pub main_thread_seconds_per_job: Option<f64>,
    /// The cost line, or why there is none (then no time is predicted).
    pub fit: Result<CostFit, &'static str>,
}

impl Cost {
    pub fn of(server: &ServerObservation, window_seconds: f64) -> Self {
        let Some(redis) = &server.redis else {
            return Cost {
                main_thread_cpu_per_second: None,
                bookkeeping_per_second: None,
                bookkeeping_share_of_main_thread: None,
                main_thread_seconds_per_job: None,
                fit: Err(REMOTE_REDIS),
            };
        };
        let cpu = redis.main_thread_cpu_seconds.max(0.0);
        let bookkeeping = redis
            .bookkeeping_seconds
            .filter(|s| s.is_finite())
            .map(|s| s.max(0.0));
        Cost {
            main_thread_cpu_per_second: Some(per_second(cpu, window_seconds)),
            bookkeeping_per_second: bookkeeping.map(|b| per_second(b, window_seconds)),
            bookkeeping_share_of_main_thread: bookkeeping.filter(|_| cpu > 0.0).map(|b| b / cpu),
            main_thread_seconds_per_job: (redis.served > 0).then(|| cpu / redis.served as f64),
            fit: match bookkeeping {
                None => Err(NO_BOOKKEEPING),
                Some(_) => fit_cost_per_key(&redis.by_keys),
            },
        }
    }
}
