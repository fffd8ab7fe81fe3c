//! How many registrations the hub processes at once: at most
//! [`MAX_CONCURRENT_REGISTRATIONS`]; a request beyond them waits its turn for up to
//! [`MAX_REGISTRATION_WAIT`] and is then answered 429 with `retry-after`, so a fleet
//! powering on together is served as fast as the store writes, and a flood larger
//! than that is spread out instead of queued without end.

use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use super::ProvisioningError;

/// Registrations processed at once.
pub const MAX_CONCURRENT_REGISTRATIONS: usize = 64;
/// How long a registration waits for a slot before it is answered 429.
pub const MAX_REGISTRATION_WAIT: Duration = Duration::from_secs(2);

/// The registration slots.
#[derive(Debug)]
pub struct Admission {
    slots: Semaphore,
    wait: Duration,
}

impl Default for Admission {
    fn default() -> Self {
        Self::new(MAX_CONCURRENT_REGISTRATIONS, MAX_REGISTRATION_WAIT)
    }
}

impl Admission {
    /// `slots` at once, each request waiting at most `wait` for one.
    pub fn new(slots: usize, wait: Duration) -> Self {
        Self {
            slots: Semaphore::new(slots),
            wait,
        }
    }

    /// A slot, held until the permit is dropped; [`ProvisioningError::Throttled`]
    /// when none frees up within the wait.
    pub async fn admit(&self) -> Result<SemaphorePermit<'_>, ProvisioningError> {
        match tokio::time::timeout(self.wait, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            // Timed out, or (never: the semaphore is not closed) closed.
            _ => Err(ProvisioningError::Throttled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_hub_makes_requests_wait_then_answers_throttled() {
        let admission = Admission::new(2, Duration::from_secs(2));
        let first = admission.admit().await.unwrap();
        let _second = admission.admit().await.unwrap();
        // A third waits; a slot freed within the wait admits it.
        let started = tokio::time::Instant::now();
        let third = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            drop(first);
        };
        let (admitted, ()) = tokio::join!(admission.admit(), third);
        let _third = admitted.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        // With every slot held past the wait, the answer is 429.
        let started = tokio::time::Instant::now();
        let err = admission.admit().await.unwrap_err();
        assert!(matches!(err, ProvisioningError::Throttled));
        assert_eq!(err.status(), 429);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }
}
