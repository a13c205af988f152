//! Sharded sinks: which part of an output one sink process writes. Sink `I` of `N` writes the event
//! logs of the nodes whose name hashes to `I` and the flows of the aggregator shards `S` with
//! `S mod N = I`; together the parts write everything, each row once. How many parts there are must
//! agree across the sinks of one output: the first sink records it in the output
//! ([`claim`]), and a sink that says another count is refused.

use crate::aggregate::Fnv;
use crate::storage::{Store, StoreError};

/// One sink's part of the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkPart {
    pub index: u32,
    pub count: u32,
}

/// Where the output records its part count.
pub const PARTS_KEY: &str = "_tcplake/sink-parts.json";

/// Why a sink may not write its part of an output.
#[derive(Debug, thiserror::Error)]
pub enum PartError {
    #[error(
        "{location} is written by {held} sink part(s), and this sink {this}: every sink of one output \
         must run with the same --sink-part count (to change it, stop every sink of the output, then \
         delete {location}/{PARTS_KEY})"
    )]
    Disagrees {
        location: String,
        held: String,
        this: String,
    },
    #[error("recording the sink part count in {location}")]
    Store {
        location: String,
        #[source]
        source: StoreError,
    },
}

impl SinkPart {
    /// The whole output (one sink).
    pub const ALL: SinkPart = SinkPart { index: 0, count: 1 };

    pub fn is_all(&self) -> bool {
        self.count <= 1
    }

    /// Does this part write node `node`'s event log?
    pub fn owns_node(&self, node: &str) -> bool {
        if self.is_all() {
            return true;
        }
        let mut h = Fnv::default();
        h.bytes(node.as_bytes());
        h.0 % u64::from(self.count) == u64::from(self.index)
    }

    /// Does this part write the flows of aggregator shard `shard`?
    pub fn owns_shard(&self, shard: u32) -> bool {
        self.is_all() || shard % self.count == self.index
    }

    /// `-p<I>of<N>` for a sharded sink's consumer names (each part reads on its own), nothing for one
    /// sink (its consumers keep their names across upgrades).
    pub fn suffix(&self) -> String {
        if self.is_all() {
            String::new()
        } else {
            format!("-p{}of{}", self.index, self.count)
        }
    }
}

/// Records this part's count in the output, or checks it against the count recorded there: sinks
/// that disagree would leave some nodes' logs to no sink, or to two. A sink of the whole output
/// records a count of 1.
pub async fn claim(store: &Store, part: SinkPart) -> Result<(), PartError> {
    let location = store.describe();
    let err = |source| PartError::Store {
        location: location.clone(),
        source,
    };
    let said = |b: Vec<u8>| -> String {
        serde_json::from_slice::<serde_json::Value>(&b)
            .ok()
            .and_then(|v| v.get("parts")?.as_u64())
            .map_or_else(
                || String::from_utf8_lossy(&b).into_owned(),
                |n| n.to_string(),
            )
    };
    let held = match store.get(PARTS_KEY).await.map_err(err)? {
        Some(b) => said(b),
        None => {
            let mine = serde_json::json!({ "parts": part.count }).to_string();
            if store
                .put_if_absent(PARTS_KEY, mine.as_bytes())
                .await
                .map_err(err)?
            {
                return Ok(());
            }
            // Another sink recorded it first: read what it said.
            said(store.get(PARTS_KEY).await.map_err(err)?.unwrap_or_default())
        }
    };
    if held == part.count.to_string() {
        return Ok(());
    }
    let this = if part.is_all() {
        "writes the whole output (no --sink-part)".to_string()
    } else {
        format!("is part {}/{}", part.index, part.count)
    };
    Err(PartError::Disagrees {
        location,
        held,
        this,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parts_write_every_node_and_shard_once() {
        for count in 1..=5 {
            let parts: Vec<_> = (0..count).map(|index| SinkPart { index, count }).collect();
            for node in ["node-a", "node-b", "node-c", "ip-10-0-0-1", ""] {
                assert_eq!(parts.iter().filter(|p| p.owns_node(node)).count(), 1);
            }
            for shard in 0..7 {
                assert_eq!(parts.iter().filter(|p| p.owns_shard(shard)).count(), 1);
            }
        }
        assert_eq!(SinkPart::ALL.suffix(), "");
        assert_eq!(SinkPart { index: 1, count: 3 }.suffix(), "-p1of3");
    }
}
