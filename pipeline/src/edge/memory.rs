//! The in-process edge: a bounded channel. Full means the sender waits (back-pressure), never a drop.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{EdgeError, Rx, Tx};
use crate::metrics::Gauge;

/// Sending half of a memory edge.
pub struct MemoryTx<T> {
    name: &'static str,
    inner: mpsc::Sender<T>,
    depth: Arc<Gauge>,
}

/// Receiving half of a memory edge.
pub struct MemoryRx<T> {
    inner: mpsc::Receiver<T>,
    depth: Arc<Gauge>,
}

/// A bounded in-memory edge holding at most `capacity` items (batches). `depth` tracks items queued.
pub fn channel<T>(
    name: &'static str,
    capacity: usize,
    depth: Arc<Gauge>,
) -> (MemoryTx<T>, MemoryRx<T>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (
        MemoryTx {
            name,
            inner: tx,
            depth: Arc::clone(&depth),
        },
        MemoryRx { inner: rx, depth },
    )
}

impl<T: Send> Tx<T> for MemoryTx<T> {
    async fn send(&mut self, item: T) -> Result<(), EdgeError> {
        self.inner
            .send(item)
            .await
            .map_err(|_| EdgeError::Closed(self.name))?;
        self.depth.add(1);
        Ok(())
    }
}

impl<T: Send> Rx<T> for MemoryRx<T> {
    async fn recv(&mut self) -> Result<Option<T>, EdgeError> {
        let item = self.inner.recv().await;
        if item.is_some() {
            self.depth.sub(1);
        }
        Ok(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn full_channel_blocks_instead_of_dropping() {
        let depth = Arc::new(Gauge::default());
        let (mut tx, mut rx) = channel::<u32>("test", 2, Arc::clone(&depth));
        tx.send(1).await.unwrap();
        tx.send(2).await.unwrap();
        // The third send must wait until the receiver makes room.
        let blocked = tokio::time::timeout(Duration::from_millis(50), tx.send(3)).await;
        assert!(
            blocked.is_err(),
            "send on a full edge returned instead of waiting"
        );
        assert_eq!(depth.get(), 2);
        assert_eq!(rx.recv().await.unwrap(), Some(1));
        tx.send(3).await.unwrap();
        drop(tx);
        assert_eq!(rx.recv().await.unwrap(), Some(2));
        assert_eq!(rx.recv().await.unwrap(), Some(3));
        assert_eq!(rx.recv().await.unwrap(), None);
        assert_eq!(depth.get(), 0);
    }

    #[tokio::test]
    async fn send_to_a_gone_receiver_is_an_error() {
        let (mut tx, rx) = channel::<u32>("flows", 1, Arc::default());
        drop(rx);
        let err = tx.send(1).await.unwrap_err();
        assert!(err.to_string().contains("flows edge is closed"));
    }
}
