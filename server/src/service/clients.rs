//! Per-client job limits: how many jobs one client may have queued or running at once.
//!
//! A client is its connection today ([`ClientKey::Connection`]); per-token limits add a
//! key, not a mechanism. tonic's own per-connection concurrency limit holds its permit
//! only until the response headers, which a streaming Generate sends at once, so it
//! cannot bound the jobs a connection holds; this does.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Who a job counts against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// One HTTP/2 connection, by its remote address (each connection has its own port).
    Connection(SocketAddr),
}

/// The jobs each client holds, against a limit.
pub struct JobSlots {
    limit: usize,
    held: Mutex<HashMap<ClientKey, usize>>,
}

/// One job's place in its client's count; released on drop.
pub struct JobSlot {
    slots: Arc<JobSlots>,
    key: ClientKey,
}

impl JobSlots {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, held: Mutex::new(HashMap::new()) })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A slot for one more job of `key`; Err(limit) when it already holds `limit`.
    pub fn acquire(self: &Arc<Self>, key: ClientKey) -> Result<JobSlot, usize> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(key.clone()).or_insert(0);
        if *n >= self.limit {
            return Err(self.limit);
        }
        *n += 1;
        Ok(JobSlot { slots: self.clone(), key })
    }

    /// Jobs `key` holds now.
    pub fn held(&self, key: &ClientKey) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).get(key).copied().unwrap_or(0)
    }
}

impl Drop for JobSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_holds_at_most_the_limit_and_slots_come_back() {
        let slots = JobSlots::new(2);
        let a = ClientKey::Connection("127.0.0.1:1000".parse().unwrap());
        let b = ClientKey::Connection("127.0.0.1:1001".parse().unwrap());
        let first = slots.acquire(a.clone()).unwrap();
        let _second = slots.acquire(a.clone()).unwrap();
        assert_eq!(slots.acquire(a.clone()).err(), Some(2));
        let _other = slots.acquire(b.clone()).unwrap();
        drop(first);
        assert_eq!(slots.held(&a), 1);
        let _third = slots.acquire(a.clone()).unwrap();
        assert_eq!(slots.held(&a), 2);
        drop(_other);
        assert_eq!(slots.held(&b), 0);
        assert!(slots.held.lock().unwrap().get(&b).is_none(), "an idle client leaves no entry");
    }
}
