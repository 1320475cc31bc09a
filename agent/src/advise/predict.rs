//! What the proposal would save, with every term kept so the arithmetic can be printed and
//! checked: `saved = Σ_g calls_g × b × (keys_now_g − keys_new_g)`, the bookkeeping after it
//! floored at the fixed part of the calls that remain (`a × calls`).

use std::collections::BTreeMap;

use super::{cost::Cost, today::Today};

/// One group's share of the saving.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedTerm {
    pub group: String,
    /// Its blocking pops per second (each a call Redis registers when it blocks).
    pub calls_per_second: f64,
    pub keys_now: f64,
    pub keys_predicted: f64,
    /// `calls_per_second × per_key_seconds × (keys_now − keys_predicted)`, seconds per second.
    pub saved_per_second: f64,
}

/// The time side of the prediction; all rates are seconds per second (a share of one core).
#[derive(Clone, Debug, PartialEq)]
pub struct TimePrediction {
    pub per_call_seconds: f64,
    pub per_key_seconds: f64,
    pub terms: Vec<SavedTerm>,
    /// Σ of the terms: what the model saves.
    pub saved_per_second: f64,
    /// Pops per second of every group, and `per_call_seconds ×` those: the bookkeeping no
    /// fan-out can remove.
    pub calls_per_second: f64,
    pub fixed_floor_per_second: f64,
    pub bookkeeping_now: f64,
    /// `max(bookkeeping_now − saved, fixed floor)`.
    pub bookkeeping_predicted: f64,
    /// Whether the floor, not the saving, set the prediction (the model saved more than the
    /// bookkeeping measured above its fixed part: pops served at once never blocked).
    pub floored: bool,
    pub main_thread_cpu_now: f64,
    /// `main_thread_cpu_now − (bookkeeping_now − bookkeeping_predicted)`.
    pub main_thread_cpu_predicted: f64,
    /// Bookkeeping as a share of the main thread's CPU.
    pub share_of_main_thread_now: Option<f64>,
    pub share_of_main_thread_predicted: Option<f64>,
    /// Main-thread seconds per served job.
    pub seconds_per_job_now: Option<f64>,
    pub seconds_per_job_predicted: Option<f64>,
}

impl TimePrediction {
    /// What the prediction takes off the main thread, seconds per second (after the floor).
    pub fn effective_saving(&self) -> f64 {
        self.bookkeeping_now - self.bookkeeping_predicted
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Keys per pop over every group, weighted by their pops, now and after.
    pub keys_per_pop_now: Option<f64>,
    pub keys_per_pop_predicted: Option<f64>,
    /// `None` when the cost is not known (the reason is in `Cost::fit`).
    pub time: Option<TimePrediction>,
}

/// Predicts from how the groups listen `today`, what Redis pays (`cost`), and the keys per
/// pop each planned group will list (`keys_after`; a group not in it keeps its own).
pub fn predict(today: &Today, cost: &Cost, keys_after: &BTreeMap<&str, f64>) -> Prediction {
    let mut pops_after_weighted = 0.0;
    let mut terms = Vec::new();
    for g in &today.groups {
        let Some(now) = g.keys_per_pop() else {
            continue;
        };
        let after = keys_after.get(g.group.as_str()).copied().unwrap_or(now);
        pops_after_weighted += g.pops as f64 * after;
        if keys_after.contains_key(g.group.as_str()) {
            terms.push((g, now, after));
        }
    }
    let keys_per_pop_now = today.keys_per_pop();
    let keys_per_pop_predicted = (today.pops > 0).then(|| pops_after_weighted / today.pops as f64);

    let time = match (
        &cost.fit,
        cost.bookkeeping_per_second,
        cost.main_thread_cpu_per_second,
    ) {
        (Ok(fit), Some(bookkeeping_now), Some(main_thread_cpu_now)) => {
            let terms: Vec<SavedTerm> = terms
                .into_iter()
                .map(|(g, now, after)| SavedTerm {
                    group: g.group.clone(),
                    calls_per_second: g.pops_per_second,
                    keys_now: now,
                    keys_predicted: after,
                    // Never a cost: a group already at its new fan-out saves nothing.
                    saved_per_second: g.pops_per_second
                        * fit.per_key_seconds
                        * (now - after).max(0.0),
                })
                .collect();
            let saved_per_second: f64 = terms.iter().map(|t| t.saved_per_second).sum();
            let calls_per_second: f64 = today.groups.iter().map(|g| g.pops_per_second).sum();
            let fixed_floor_per_second = fit.per_call_seconds * calls_per_second;
            let unfloored = bookkeeping_now - saved_per_second;
            let floored = unfloored < fixed_floor_per_second;
            // A floor above today's bookkeeping would predict a rise: keep today's then.
            let bookkeeping_predicted = unfloored.max(fixed_floor_per_second).min(bookkeeping_now);
            let main_thread_cpu_predicted = (main_thread_cpu_now
                - (bookkeeping_now - bookkeeping_predicted))
                .max(bookkeeping_predicted);
            let share = |bookkeeping: f64, cpu: f64| (cpu > 0.0).then(|| bookkeeping / cpu);
            let seconds_per_job_now = cost.main_thread_seconds_per_job;
            let seconds_per_job_predicted = seconds_per_job_now
                .filter(|_| main_thread_cpu_now > 0.0)
                .map(|per_job| per_job * main_thread_cpu_predicted / main_thread_cpu_now);
            Some(TimePrediction {
                per_call_seconds: fit.per_call_seconds,
                per_key_seconds: fit.per_key_seconds,
                terms,
                saved_per_second,
                calls_per_second,
                fixed_floor_per_second,
                bookkeeping_now,
                bookkeeping_predicted,
                floored,
                main_thread_cpu_now,
                main_thread_cpu_predicted,
                share_of_main_thread_now: share(bookkeeping_now, main_thread_cpu_now),
                share_of_main_thread_predicted: share(
                    bookkeeping_predicted,
                    main_thread_cpu_predicted,
                ),
                seconds_per_job_now,
                seconds_per_job_predicted,
            })
        }
        _ => None,
    };
    Prediction {
        keys_per_pop_now,
        keys_per_pop_predicted,
        time,
    }
}
