//! Which telemetry publish a PUBACK acknowledges, without I/O. rumqttc assigns packet
//! ids as it writes publishes, in request order, and reports each write; this
//! tracker pairs those reports with the callers waiting for durability, and knows
//! what must be published again when the hub has lost the session.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::Error;

/// A telemetry publish waiting for its PUBACK.
#[derive(Debug)]
pub struct Pending {
    /// The topic (with its property bag).
    pub topic: String,
    /// The body.
    pub payload: Bytes,
    /// Told the outcome.
    pub done: oneshot::Sender<Result<(), Error>>,
    /// Submission order, to republish in order.
    order: u64,
}

/// Pairs QoS 1 publishes with PUBACKs.
#[derive(Debug, Default)]
pub struct PublishTracker {
    unassigned: VecDeque<Pending>,
    assigned: HashMap<u16, Pending>,
    next_order: u64,
}

impl PublishTracker {
    /// A publish was handed to rumqttc.
    pub fn submitted(
        &mut self,
        topic: String,
        payload: Bytes,
        done: oneshot::Sender<Result<(), Error>>,
    ) {
        let order = self.next_order;
        self.next_order += 1;
        self.unassigned.push_back(Pending {
            topic,
            payload,
            done,
            order,
        });
    }

    /// rumqttc wrote a publish with `pkid` (0 for QoS 0). A known pkid is a
    /// retransmission of a publish already paired.
    pub fn written(&mut self, pkid: u16) {
        if pkid == 0 || self.assigned.contains_key(&pkid) {
            return;
        }
        if let Some(pending) = self.unassigned.pop_front() {
            self.assigned.insert(pkid, pending);
        }
    }

    /// The hub acknowledged `pkid`: the message is durable.
    pub fn acknowledged(&mut self, pkid: u16) {
        if let Some(pending) = self.assigned.remove(&pkid) {
            let _ = pending.done.send(Ok(()));
        }
    }

    /// The hub had no session for us: rumqttc dropped what it would have resent, so
    /// every waiting publish must be published again, in the original order.
    pub fn session_lost(&mut self) -> Vec<Pending> {
        let mut all: Vec<Pending> = self.assigned.drain().map(|(_, p)| p).collect();
        all.extend(self.unassigned.drain(..));
        all.sort_by_key(|p| p.order);
        all
    }

    /// Publishes waiting for an acknowledgement.
    pub fn len(&self) -> usize {
        self.assigned.len() + self.unassigned.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fails every waiter (the client is closing).
    pub fn fail_all(&mut self, error: impl Fn() -> Error) {
        for pending in self.session_lost() {
            let _ = pending.done.send(Err(error()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(tracker: &mut PublishTracker, n: u8) -> oneshot::Receiver<Result<(), Error>> {
        let (tx, rx) = oneshot::channel();
        tracker.submitted(format!("t{n}"), Bytes::from(vec![n]), tx);
        rx
    }

    #[test]
    fn acks_resolve_the_publish_written_with_that_pkid() {
        let mut tracker = PublishTracker::default();
        let mut first = submit(&mut tracker, 1);
        let mut second = submit(&mut tracker, 2);
        tracker.written(0); // a QoS 0 twin request in between
        tracker.written(7);
        tracker.written(8);
        tracker.acknowledged(8);
        assert!(matches!(second.try_recv(), Ok(Ok(()))));
        assert!(first.try_recv().is_err(), "not acknowledged yet");
        // A retransmission after a reconnect reuses pkid 7 and changes nothing.
        tracker.written(7);
        tracker.acknowledged(7);
        assert!(matches!(first.try_recv(), Ok(Ok(()))));
        assert!(tracker.is_empty());
    }

    #[test]
    fn a_lost_session_returns_everything_in_order() {
        let mut tracker = PublishTracker::default();
        let _a = submit(&mut tracker, 1);
        let _b = submit(&mut tracker, 2);
        let _c = submit(&mut tracker, 3);
        tracker.written(5);
        tracker.written(4);
        let again = tracker.session_lost();
        let order: Vec<&str> = again.iter().map(|p| p.topic.as_str()).collect();
        assert_eq!(order, ["t1", "t2", "t3"]);
        assert!(tracker.is_empty());
    }
}
