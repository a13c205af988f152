//! Fan-out: one stream to two edges (events go both to the aggregator and to the event-log sink).

use super::{EdgeError, Tx};

/// Sends every item to both `a` and `b`, in that order. The slower side back-pressures the sender.
pub struct Tee<A, B> {
    a: A,
    b: B,
}

impl<A, B> Tee<A, B> {
    pub fn new(a: A, b: B) -> Self {
        Tee { a, b }
    }
}

impl<T, A, B> Tx<T> for Tee<A, B>
where
    T: Clone + Send,
    A: Tx<T>,
    B: Tx<T>,
{
    async fn send(&mut self, item: T) -> Result<(), EdgeError> {
        self.a.send(item.clone()).await?;
        self.b.send(item).await
    }

    async fn close(&mut self, end_of_stream: bool) -> Result<(), EdgeError> {
        self.a.close(end_of_stream).await?;
        self.b.close(end_of_stream).await
    }
}
