//! The cost model: measured counts times a price table, per component, scaled to 10⁹ events.
//!
//! Nothing here is estimated from the design: every count comes from a measured run (CPU-seconds and
//! peak memory of each process, requests by type, broker messages, hand-offs). The price table is TOML
//! (`prices.toml` is built in; `--prices FILE` replaces it) and names its source.

use serde::{Deserialize, Serialize};

/// The built-in price table.
pub const DEFAULT_PRICES: &str = include_str!("prices.toml");

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    pub source: String,
    pub compute: ComputePrices,
    pub s3: S3Prices,
    pub broker: BrokerPrices,
    pub orchestration: OrchestrationPrices,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ComputePrices {
    pub vcpu_hour: f64,
    pub gb_hour: f64,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Prices {
    pub put_per_1000: f64,
    pub get_per_1000: f64,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerPrices {
    pub per_million_requests: f64,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OrchestrationPrices {
    pub per_1000_transitions: f64,
}

impl Prices {
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.message().replace('\n', " "))
    }

    pub fn builtin() -> Self {
        Self::parse(DEFAULT_PRICES).expect("the built-in price table parses")
    }
}

/// What one mode's run used, summed over its processes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub events: u64,
    pub cpu_seconds: f64,
    /// Σ over processes of peak memory × wall time, in GB-seconds (what memory-billed compute charges).
    pub gb_seconds: f64,
    /// S3-class write requests (PUT, LIST, multipart create/part/complete).
    pub s3_writes: u64,
    /// S3-class read requests (GET, HEAD).
    pub s3_reads: u64,
    /// Broker requests: publishes plus consumed messages (each consume is a receive and an ack).
    pub broker_requests: u64,
    /// Objects handed from one stage to the next through the store (orchestration transitions).
    pub handoffs: u64,
}

/// Dollars per 10⁹ events, by component.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    pub compute: f64,
    pub s3_requests: f64,
    pub broker: f64,
    pub orchestration: f64,
    pub total: f64,
}

/// Prices `usage` and scales it to 10⁹ events.
pub fn cost_per_billion(usage: &Usage, p: &Prices) -> Cost {
    if usage.events == 0 {
        return Cost::default();
    }
    let scale = 1e9 / usage.events as f64;
    let compute = (usage.cpu_seconds / 3600.0 * p.compute.vcpu_hour
        + usage.gb_seconds / 3600.0 * p.compute.gb_hour)
        * scale;
    let s3_requests = (usage.s3_writes as f64 / 1000.0 * p.s3.put_per_1000
        + usage.s3_reads as f64 / 1000.0 * p.s3.get_per_1000)
        * scale;
    let broker = usage.broker_requests as f64 / 1e6 * p.broker.per_million_requests * scale;
    let orchestration =
        usage.handoffs as f64 / 1000.0 * p.orchestration.per_1000_transitions * scale;
    Cost {
        compute,
        s3_requests,
        broker,
        orchestration,
        total: compute + s3_requests + broker + orchestration,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prices() -> Prices {
        Prices {
            source: "test".into(),
            compute: ComputePrices {
                vcpu_hour: 3.6,
                gb_hour: 36.0,
            },
            s3: S3Prices {
                put_per_1000: 5.0,
                get_per_1000: 0.4,
            },
            broker: BrokerPrices {
                per_million_requests: 2.0,
            },
            orchestration: OrchestrationPrices {
                per_1000_transitions: 25.0,
            },
        }
    }

    #[test]
    fn every_component_is_count_times_price_scaled_to_a_billion_events() {
        let usage = Usage {
            events: 1_000_000,        // scale x1000
            cpu_seconds: 10.0,        // 10/3600 h x 3.6 = 0.01
            gb_seconds: 1.0,          // 1/3600 h x 36 = 0.01
            s3_writes: 2_000,         // 2 x 5 = 10
            s3_reads: 1_000,          // 1 x 0.4 = 0.4
            broker_requests: 500_000, // 0.5 x 2 = 1
            handoffs: 40,             // 0.04 x 25 = 1
        };
        let c = cost_per_billion(&usage, &prices());
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9 * b.max(1.0);
        assert!(close(c.compute, 20.0), "{c:?}");
        assert!(close(c.s3_requests, 10_400.0), "{c:?}");
        assert!(close(c.broker, 1_000.0), "{c:?}");
        assert!(close(c.orchestration, 1_000.0), "{c:?}");
        assert!(close(c.total, 20.0 + 10_400.0 + 1_000.0 + 1_000.0), "{c:?}");
    }

    #[test]
    fn no_events_costs_nothing_rather_than_dividing_by_zero() {
        assert_eq!(
            cost_per_billion(&Usage::default(), &prices()),
            Cost::default()
        );
    }

    #[test]
    fn the_builtin_table_parses_and_unknown_keys_are_refused() {
        let p = Prices::builtin();
        assert!(p.source.contains("AWS"));
        assert!(p.s3.put_per_1000 > p.s3.get_per_1000);
        let bad = DEFAULT_PRICES.replace("gb_hour", "gb_hours");
        assert!(Prices::parse(&bad).unwrap_err().contains("gb_hours"));
    }
}
