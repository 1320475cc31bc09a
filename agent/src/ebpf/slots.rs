//! Histograms the kernel keeps in per-CPU array slots: a hash map gives each key its slot,
//! and the kernel takes new slots from a queue of free ones (see
//! `agent_common::sched::SchedHistograms`). This side fills the queue at start, reads the
//! slots of every key, and gives a key's slot back, zeroed, when its process goes.

use aya::{
    maps::{HashMap, MapData, PerCpuArray, PerCpuValues, Queue},
    Ebpf, Pod,
};

use super::{take_map, ProbeError};

pub struct SlotTable<K: Pod, V: Pod> {
    slots: HashMap<MapData, K, u32>,
    values: PerCpuArray<MapData, V>,
    free: Queue<MapData, u32>,
    zero: V,
    cpus: usize,
}

impl<K: Pod, V: Pod> SlotTable<K, V> {
    /// Takes the three maps and puts every slot in the free queue (a new array is all zero).
    pub fn new(
        ebpf: &mut Ebpf,
        names: (&'static str, &'static str, &'static str),
        capacity: u32,
        zero: V,
    ) -> Result<Self, ProbeError> {
        let (slots_name, values_name, free_name) = names;
        let mut free: Queue<MapData, u32> = take_map(ebpf, free_name)?;
        for slot in 0..capacity {
            free.push(slot, 0).map_err(|e| ProbeError::Map {
                name: free_name,
                message: e.to_string(),
            })?;
        }
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| ProbeError::Map {
            name: values_name,
            message: format!("{what}: {e}"),
        })?;
        Ok(Self {
            slots: take_map(ebpf, slots_name)?,
            values: take_map(ebpf, values_name)?,
            free,
            zero,
            cpus,
        })
    }

    /// Every key with its per-CPU values.
    pub fn entries(&self) -> impl Iterator<Item = (K, PerCpuValues<V>)> + '_ {
        self.slots
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, slot)| Some((key, self.values.get(&slot, 0).ok()?)))
    }

    /// Removes the keys `gone` selects and gives their slots back to the kernel, zeroed (or
    /// not at all, if zeroing fails: a slot lost, never a number carried over). Returns how
    /// many keys it removed.
    pub fn release(&mut self, gone: impl Fn(&K) -> bool) -> usize {
        let stale: Vec<(K, u32)> = self
            .slots
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| gone(k))
            .collect();
        let released = stale.len();
        for (key, slot) in stale {
            let _ = self.slots.remove(&key);
            let Ok(zero) = PerCpuValues::try_from(vec![self.zero; self.cpus]) else {
                continue;
            };
            if self.values.set(slot, zero, 0).is_ok() {
                let _ = self.free.push(slot, 0);
            }
        }
        released
    }
}
