//! One device's loaded models under a memory budget (`serve --model-memory-mib`): each
//! model's size is the bytes of its weight tensors; a model that does not fit beside the
//! loaded ones makes room by unloading the least recently used models that no running job
//! uses. The worker owns one cache per device and does the loading, logging and lifecycle
//! states; this keeps the sizes, the use order and the budget's arithmetic.
use std::collections::HashMap;
use tonic::Status;

/// Bytes as MiB for messages.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

struct Entry<M> {
    model: M,
    bytes: u64,
    /// The cache's use clock when the model was last used.
    used: u64,
}

/// Loaded models by name, each with its size and last use.
pub struct Cache<M> {
    entries: HashMap<String, Entry<M>>,
    /// Bytes the loaded models may hold in all; None: no limit.
    budget: Option<u64>,
    clock: u64,
    /// Sizes of models loaded before (loaded now or not), so that a model known not to
    /// fit is refused, and room is made, before it is loaded again.
    sizes: HashMap<String, u64>,
}

/// Why a model cannot be loaded within the budget: RESOURCE_EXHAUSTED with the sizes.
#[derive(Debug, PartialEq)]
pub enum NoRoom {
    /// The model alone is larger than the whole budget.
    TooLarge { bytes: u64, budget: u64 },
    /// It does not fit beside the models that running jobs use.
    InUse { bytes: u64, budget: u64, in_use: Vec<(String, u64)> },
}

impl NoRoom {
    pub fn status(&self, model: &str) -> Status {
        match self {
            NoRoom::TooLarge { bytes, budget } => Status::resource_exhausted(format!(
                "model {model:?} needs {} of weights, more than the whole model memory budget \
                 (--model-memory-mib) of {}",
                mib(*bytes),
                mib(*budget)
            )),
            NoRoom::InUse { bytes, budget, in_use } => {
                let held: u64 = in_use.iter().map(|(_, b)| b).sum();
                let names: Vec<&str> = in_use.iter().map(|(n, _)| n.as_str()).collect();
                Status::resource_exhausted(format!(
                    "model {model:?} needs {} of weights and does not fit in the model memory budget \
                     (--model-memory-mib) of {} beside {names:?} ({}), which running jobs use; \
                     try again when they end",
                    mib(*bytes),
                    mib(*budget),
                    mib(held)
                ))
            }
        }
    }
}

impl<M> Cache<M> {
    pub fn new(budget: Option<u64>) -> Self {
        Self { entries: HashMap::new(), budget, clock: 0, sizes: HashMap::new() }
    }

    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Option<&M> {
        self.entries.get(name).map(|e| &e.model)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut M> {
        self.entries.get_mut(name).map(|e| &mut e.model)
    }

    /// Marks a loaded model as used now.
    pub fn touch(&mut self, name: &str) {
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(name) {
            e.used = self.clock;
        }
    }

    /// The size a model had when it was last loaded, if it was.
    pub fn known_size(&self, name: &str) -> Option<u64> {
        self.sizes.get(name).copied()
    }

    /// The loaded models' names.
    pub fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// Bytes the loaded models hold.
    pub fn loaded_bytes(&self) -> u64 {
        self.entries.values().map(|e| e.bytes).sum()
    }

    /// Makes room for `bytes` of the model `name` (not loaded): unloads the least recently
    /// used models other than those named in `in_use` until it fits, and returns them with
    /// their sizes, least recently used first. When it cannot fit, nothing is unloaded.
    pub fn make_room(&mut self, name: &str, bytes: u64, in_use: &[&str]) -> Result<Vec<(String, M, u64)>, NoRoom> {
        self.sizes.insert(name.to_string(), bytes);
        let Some(budget) = self.budget else { return Ok(Vec::new()) };
        if bytes > budget {
            return Err(NoRoom::TooLarge { bytes, budget });
        }
        let mut kept: Vec<(String, u64)> = Vec::new();
        let mut candidates: Vec<(&String, u64, u64)> = Vec::new();
        for (n, e) in &self.entries {
            if n == name || in_use.contains(&n.as_str()) {
                kept.push((n.clone(), e.bytes));
            } else {
                candidates.push((n, e.used, e.bytes));
            }
        }
        if kept.iter().map(|(_, b)| b).sum::<u64>() + bytes > budget {
            kept.sort();
            return Err(NoRoom::InUse { bytes, budget, in_use: kept });
        }
        candidates.sort_by_key(|&(_, used, _)| used);
        let mut total = self.loaded_bytes();
        let mut evict = Vec::new();
        for (n, _, b) in candidates {
            if total + bytes <= budget {
                break;
            }
            total -= b;
            evict.push(n.clone());
        }
        Ok(evict
            .into_iter()
            .map(|n| {
                let e = self.entries.remove(&n).expect("listed above");
                (n, e.model, e.bytes)
            })
            .collect())
    }

    /// Adds a loaded model of `bytes` (room made by `make_room`), used now.
    pub fn insert(&mut self, name: &str, model: M, bytes: u64) {
        self.sizes.insert(name.to_string(), bytes);
        self.entries.insert(name.to_string(), Entry { model, bytes, used: 0 });
        self.touch(name);
    }

    /// Removes a model; whether it was loaded.
    pub fn remove(&mut self, name: &str) -> bool {
        self.entries.remove(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(evicted: &[(String, (), u64)]) -> Vec<&str> {
        evicted.iter().map(|(n, _, _)| n.as_str()).collect()
    }

    #[test]
    fn unlimited_never_evicts() {
        let mut c = Cache::new(None);
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            assert!(c.make_room(n, 1 << 40, &[]).unwrap().is_empty());
            c.insert(n, (), 1 << (30 + i));
        }
        assert_eq!(c.loaded_bytes(), (1 << 30) + (1 << 31) + (1 << 32));
    }

    #[test]
    fn evicts_least_recently_used_until_it_fits() {
        let mut c = Cache::new(Some(100));
        c.insert("a", (), 40);
        c.insert("b", (), 30);
        c.insert("c", (), 20);
        c.touch("a");
        // 90 held; 50 more needs 40 freed: b (least recent, 30) then c (20).
        let evicted = c.make_room("d", 50, &[]).unwrap();
        assert_eq!(names(&evicted), ["b", "c"]);
        assert_eq!(evicted.iter().map(|e| e.2).collect::<Vec<_>>(), [30, 20]);
        assert!(c.contains("a") && !c.contains("b") && !c.contains("c"));
        c.insert("d", (), 50);
        assert_eq!(c.loaded_bytes(), 90);
        // What fits evicts nothing.
        assert!(c.make_room("e", 10, &[]).unwrap().is_empty());
    }

    #[test]
    fn never_evicts_a_model_in_use_and_refuses_without_evicting() {
        let mut c = Cache::new(Some(100));
        c.insert("a", (), 60);
        c.insert("b", (), 30);
        c.touch("b");
        // a is least recent but in use: b goes instead... and still 60 + 50 > 100.
        let refused = c.make_room("d", 50, &["a"]).unwrap_err();
        assert_eq!(refused, NoRoom::InUse { bytes: 50, budget: 100, in_use: vec![("a".into(), 60)] });
        assert!(c.contains("a") && c.contains("b"), "a refusal unloads nothing");
        assert_eq!(names(&c.make_room("d", 40, &["a"]).unwrap()), ["b"]);
        let status = refused.status("d");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("\"a\""), "{}", status.message());
    }

    #[test]
    fn a_model_larger_than_the_budget_is_refused_and_remembered() {
        let mut c: Cache<()> = Cache::new(Some(100));
        assert_eq!(c.make_room("big", 101, &[]).unwrap_err(), NoRoom::TooLarge { bytes: 101, budget: 100 });
        assert_eq!(c.known_size("big"), Some(101));
        let message = NoRoom::TooLarge { bytes: 3 << 20, budget: 1 << 20 }.status("big").message().to_string();
        assert!(message.contains("3.0 MiB") && message.contains("1.0 MiB"), "{message}");
    }
}
