//! Model lifecycle: each model's state (on disk, loading, loaded on which devices, failed
//! and why), the load and unload commands the gRPC handlers give the worker (which owns
//! the models), and the per-model health statuses that follow the states.
use frisket_proto::v1::ModelState;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tonic_health::ServingStatus;

/// The health service name of the model `name` (SERVING while it is loaded).
pub fn health_name(model: &str) -> String {
    format!("frisket.v1.Model/{model}")
}

/// A model's state other than on disk (a model with no entry is on disk).
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    Loading,
    Loaded { devices: Vec<String> },
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

/// A health status change: (service name, status), applied in order by the service.
pub type HealthUpdate = (String, ServingStatus);

/// The models' states, written by the worker, read by ListModels.
#[derive(Default)]
pub struct Lifecycle {
    states: Mutex<HashMap<String, State>>,
    health: Option<mpsc::UnboundedSender<HealthUpdate>>,
}

impl Lifecycle {
    /// States whose changes go out as per-model health statuses on `health`.
    pub fn new(health: mpsc::UnboundedSender<HealthUpdate>) -> Self {
        Self { states: Mutex::default(), health: Some(health) }
    }

    /// Records a model's new state (`None`: on disk) and its health status.
    pub fn set(&self, model: &str, state: Option<State>) {
        let serving = matches!(state, Some(State::Loaded { .. }));
        {
            let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
            match state {
                Some(state) => states.insert(model.to_string(), state),
                None => states.remove(model),
            };
        }
        if let Some(health) = &self.health {
            let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
            let _ = health.send((health_name(model), status));
        }
    }

    pub fn get(&self, model: &str) -> Option<State> {
        self.states.lock().unwrap_or_else(|p| p.into_inner()).get(model).cloned()
    }

    /// The ListModels fields of a model's state: (state, devices, error).
    pub fn report(&self, model: &str) -> (ModelState, Vec<String>, Option<String>) {
        match self.get(model) {
            None => (ModelState::OnDisk, Vec::new(), None),
            Some(State::Loading) => (ModelState::Loading, Vec::new(), None),
            Some(State::Loaded { devices }) => (ModelState::Loaded, devices, None),
            Some(State::Failed(why)) => (ModelState::Failed, Vec::new(), Some(why)),
        }
    }
}
