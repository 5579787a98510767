//! Schedulers (in progress)
