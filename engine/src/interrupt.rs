//! Stopping a job inside a step. A job carries an [`Interrupt`] (a flag its owner can
//! raise: Cancel, a client that left, a deadline, shutdown); while the engine runs the job,
//! the interrupt is the calling thread's current one ([`with`]), and the long computations
//! ([`check`]: between UNet blocks, between exact-attribution chunks, between VAE decoder
//! blocks) stop at the next check with [`Interrupted`]. Like tch's grad mode it is per
//! thread: a job runs on one engine thread.
use std::cell::RefCell;
use std::sync::Arc;

/// A stop request the engine polls. The default never fires.
#[derive(Clone, Default)]
pub struct Interrupt(Option<Arc<dyn Fn() -> bool + Send + Sync>>);

impl Interrupt {
    /// Fires when `raised` returns true (it is called at every check: keep it cheap).
    pub fn new(raised: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(raised)))
    }

    /// Fires when any of `interrupts` does (several jobs stepping in one UNet call).
    pub fn any(interrupts: Vec<Interrupt>) -> Self {
        let mut set: Vec<Interrupt> = interrupts.into_iter().filter(|i| i.0.is_some()).collect();
        match set.len() {
            0 => Self::default(),
            1 => set.pop().expect("one interrupt"),
            _ => Self::new(move || set.iter().any(Interrupt::raised)),
        }
    }

    pub fn raised(&self) -> bool {
        self.0.as_ref().is_some_and(|f| f())
    }
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Interrupt(set)" } else { "Interrupt(never)" })
    }
}

/// The computation stopped because its job's interrupt fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

thread_local! {
    static CURRENT: RefCell<Interrupt> = RefCell::new(Interrupt::default());
}

/// Runs `f` with `interrupt` as this thread's current interrupt (the previous one is back
/// afterwards, also when `f` panics).
pub fn with<R>(interrupt: &Interrupt, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Interrupt>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(previous) = self.0.take() {
                CURRENT.with(|c| *c.borrow_mut() = previous);
            }
        }
    }
    let previous = CURRENT.with(|c| std::mem::replace(&mut *c.borrow_mut(), interrupt.clone()));
    let _restore = Restore(Some(previous));
    f()
}

/// Err when this thread's current interrupt has fired.
pub fn check() -> Result<(), Interrupted> {
    if CURRENT.with(|c| c.borrow().raised()) {
        Err(Interrupted)
    } else {
        Ok(())
    }
}

/// Whether `e` (anywhere in its chain) is an interruption.
pub fn is_interrupted(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Interrupted>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn the_current_interrupt_is_scoped_to_with() {
        let flag = Arc::new(AtomicBool::new(false));
        let interrupt = Interrupt::new({
            let flag = flag.clone();
            move || flag.load(Ordering::Relaxed)
        });
        assert_eq!(check(), Ok(()));
        with(&interrupt, || {
            assert_eq!(check(), Ok(()));
            flag.store(true, Ordering::Relaxed);
            assert_eq!(check(), Err(Interrupted));
            // Nested scopes restore the outer one.
            with(&Interrupt::default(), || assert_eq!(check(), Ok(())));
            assert_eq!(check(), Err(Interrupted));
        });
        assert_eq!(check(), Ok(()));
        let e = anyhow::Error::new(Interrupted).context("in a step");
        assert!(is_interrupted(&e));
    }
}
