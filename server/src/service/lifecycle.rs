//! Model lifecycle: each model's state (on disk, loading, loaded on which devices, failed
//! and why), the load and unload commands the gRPC handlers give the worker (which owns
//! the models), and the per-model health statuses that follow the states.
use frisket_proto::v1::ModelState;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tonic_health::ServingStatus;

/// The health service name of the model `name` (SERVING while it is loaded).
pub fn health_name(model: &str) -> String {
    format!("frisket.v1.Model/{model}")
}

/// A model's state on one device other than on disk (no entry: on disk there).
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    Loading,
    Loaded,
    Failed(String),
}

/// What the worker answers a load: where the model is and how long loading and warming
/// took (0 when it was loaded already).
#[derive(Debug)]
pub struct Loaded {
    pub devices: Vec<String>,
    pub seconds: f64,
}

/// A request to the worker; it answers on `reply` between steps.
pub enum Command {
    /// Load (and warm) a model unless it is loaded.
    Load { model: String, reply: oneshot::Sender<Result<Loaded, Status>> },
    /// Free a model: FAILED_PRECONDITION while a running job uses it; the answer says
    /// whether it was loaded.
    Unload { model: String, reply: oneshot::Sender<Result<bool, Status>> },
}

/// UnloadModel's refusal while `users` running jobs use `model`.
pub fn in_use(model: &str, users: usize) -> Status {
    Status::failed_precondition(format!("model {model:?} is in use by {users} running job(s); unload it once they end"))
}

/// A health status change: (service name, status), applied in order by the service.
pub type HealthUpdate = (String, ServingStatus);

/// The models' states per device (worker name), written by the workers, read by
/// ListModels.
#[derive(Default)]
pub struct Lifecycle {
    states: Mutex<HashMap<String, BTreeMap<String, State>>>,
    health: Option<mpsc::UnboundedSender<HealthUpdate>>,
}

impl Lifecycle {
    /// States whose changes go out as per-model health statuses on `health`.
    pub fn new(health: mpsc::UnboundedSender<HealthUpdate>) -> Self {
        Self { states: Mutex::default(), health: Some(health) }
    }

    /// Records a model's new state on `device` (`None`: on disk there) and its health
    /// status: SERVING while it is loaded on any device.
    pub fn set(&self, model: &str, device: &str, state: Option<State>) {
        let serving = {
            let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
            let per_device = states.entry(model.to_string()).or_default();
            match state {
                Some(state) => per_device.insert(device.to_string(), state),
                None => per_device.remove(device),
            };
            let serving = per_device.values().any(|s| *s == State::Loaded);
            if per_device.is_empty() {
                states.remove(model);
            }
            serving
        };
        if let Some(health) = &self.health {
            let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
            let _ = health.send((health_name(model), status));
        }
    }

    /// The model's state on each device where it is not on disk.
    pub fn get(&self, model: &str) -> BTreeMap<String, State> {
        self.states.lock().unwrap_or_else(|p| p.into_inner()).get(model).cloned().unwrap_or_default()
    }

    /// The devices the model is loaded on.
    pub fn devices(&self, model: &str) -> Vec<String> {
        loaded_on(&self.get(model))
    }

    /// The ListModels fields of a model's state: (state, devices, error). Loaded (with
    /// the devices it is loaded on) when loaded anywhere; else loading when loading
    /// anywhere; else failed (with why) when a load failed; else on disk.
    pub fn report(&self, model: &str) -> (ModelState, Vec<String>, Option<String>) {
        let states = self.get(model);
        let devices = loaded_on(&states);
        if !devices.is_empty() {
            return (ModelState::Loaded, devices, None);
        }
        if states.values().any(|s| *s == State::Loading) {
            return (ModelState::Loading, Vec::new(), None);
        }
        match states.into_values().find_map(|s| match s {
            State::Failed(why) => Some(why),
            _ => None,
        }) {
            Some(why) => (ModelState::Failed, Vec::new(), Some(why)),
            None => (ModelState::OnDisk, Vec::new(), None),
        }
    }
}

/// The devices of `states` where the model is loaded.
fn loaded_on(states: &BTreeMap<String, State>) -> Vec<String> {
    states.iter().filter(|(_, s)| **s == State::Loaded).map(|(d, _)| d.clone()).collect()
}
