//! Acknowledgements that travel with the data (Vector's finalizers, in small): an edge that must
//! hear when an item is durable downstream (a broker redelivers what is never acked) hands each
//! delivery out with an [`Ack`]; whoever makes the item's rows durable releases it after the commit
//! that covers them. What releasing means (a JetStream ack, nothing at all) is the edge's business:
//! stages and modes see an opaque token with a position to order by.

use futures_util::future::BoxFuture;

use super::{EdgeError, Tx};

/// The edge's hold on one delivery until it is released.
#[must_use = "an ack that is never released leaves its delivery to be redelivered"]
pub struct Ack {
    position: u64,
    release: Option<Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>>,
}

impl Ack {
    /// An ack whose release runs `release`; `position` orders deliveries on their edge (a stream
    /// sequence).
    pub fn new(
        position: u64,
        release: impl FnOnce() -> BoxFuture<'static, ()> + Send + 'static,
    ) -> Self {
        Ack {
            position,
            release: Some(Box::new(release)),
        }
    }

    /// Where the delivery was on its edge.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The delivery's rows are durable downstream (or it carried none): the edge may forget it.
    pub async fn release(mut self) {
        if let Some(f) = self.release.take() {
            f().await;
        }
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ack")
            .field("position", &self.position)
            .finish()
    }
}

/// An item on its way to the stage that makes it durable, with the acks to release once it is: of the
/// deliveries it came from, or, without an item, of deliveries whose rows were handed over before
/// (a redelivery), to release once those are durable.
#[derive(Debug)]
pub struct Finalized<T> {
    pub item: Option<T>,
    pub acks: Vec<Ack>,
}

impl<T> Finalized<T> {
    pub fn new(item: T, ack: Ack) -> Self {
        Finalized {
            item: Some(item),
            acks: vec![ack],
        }
    }

    /// Acks only: nothing new to write.
    pub fn acks(acks: Vec<Ack>) -> Self {
        Finalized { item: None, acks }
    }
}

/// A sending edge that gives every item an ack made by `make` (an in-process edge's way to hear when
/// the stage after it made an item durable).
pub struct Finalizing<X, F> {
    inner: X,
    make: F,
}

impl<X, F> Finalizing<X, F> {
    pub fn new(inner: X, make: F) -> Self {
        Finalizing { inner, make }
    }
}

impl<T, X, F> Tx<T> for Finalizing<X, F>
where
    T: Send,
    X: Tx<Finalized<T>>,
    F: FnMut(&T) -> Ack + Send,
{
    async fn send(&mut self, item: T) -> Result<(), EdgeError> {
        let ack = (self.make)(&item);
        self.inner.send(Finalized::new(item, ack)).await
    }

    async fn close(&mut self, end_of_stream: bool) -> Result<(), EdgeError> {
        self.inner.close(end_of_stream).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn releasing_runs_the_edges_action_once() {
        let n = Arc::new(AtomicU32::new(0));
        let m = Arc::clone(&n);
        let ack = Ack::new(7, move || {
            async move {
                m.fetch_add(1, Ordering::SeqCst);
            }
            .boxed()
        });
        assert_eq!(ack.position(), 7);
        ack.release().await;
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}
