//! How every S3 request is retried and counted: the SDK's own standard retry strategy, configured for
//! a writer that must ride out an outage, plus tcplake's classifier and an attempt-counting interceptor.
//!
//! - **Retried for a time, not a number of attempts**: the operation timeout is the time budget
//!   (`sink.s3_max_retry`), with more attempts allowed than it can hold; backoff is exponential with jitter between
//!   [`FIRST_BACKOFF`] and [`MAX_BACKOFF`]. The SDK's default retry quota (a token bucket shared by the
//!   client, 500 tokens at 14 per retry) would stop retrying a few dozen failures into an outage, while
//!   the sink is waiting on them: tcplake's partition has an unlimited bucket.
//! - **What is transient** ([`Transient`]): no answer (connection, timeout, a response cut off), 408,
//!   429, 5xx; never a TLS failure (the same handshake fails the same way) nor 501/505 (the store does
//!   not support the request). The SDK's own classifiers still retry the throttling and transient
//!   error codes S3 sends (`SlowDown`, `RequestTimeout`, `InternalError`).
//! - **Every attempt counted** ([`CountAttempts`]) by request type with its duration, as S3 bills each
//!   one; retries counted, and the first retry of a request logged once with its cause.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::interceptors::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef, InterceptorContext,
};
use aws_sdk_s3::config::retry::{
    ClassifyRetry, RetryAction, RetryConfig, RetryPartition, TokenBucket,
};
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::retries::RequestAttempts;
use aws_smithy_types::config_bag::{Storable, StoreReplace};

use crate::metrics::{S3Metrics, S3Op};

/// The first backoff; each retry doubles it (with jitter) up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Applies tcplake's retry policy and counting to an S3 client configuration, with `budget` as the
/// time one request may take, retries included (zero: one attempt, no retry).
pub fn configure(
    conf: aws_sdk_s3::config::Builder,
    timeouts: Option<&TimeoutConfig>,
    budget: Duration,
    metrics: Arc<S3Metrics>,
) -> aws_sdk_s3::config::Builder {
    conf.retry_config(retry_config(budget))
        .retry_partition(
            RetryPartition::custom("tcplake")
                .token_bucket(TokenBucket::unlimited())
                .build(),
        )
        .retry_classifier(Transient)
        .interceptor(CountAttempts { metrics })
        .timeout_config(with_budget(timeouts, budget))
}

/// Attempts until the budget (the operation timeout) runs out; none beyond the first without one.
///
/// The attempt limit only has to outlast the budget: one per half second of it, while backoffs
/// average 2.5 s once at the cap. It must stay finite: the SDK's credential cache sums the backoff
/// of every allowed attempt on each load (`u32::MAX` attempts kept a core busy for minutes).
pub fn retry_config(budget: Duration) -> RetryConfig {
    if budget.is_zero() {
        return RetryConfig::standard().with_max_attempts(1);
    }
    let attempts = 10 + budget.as_millis() / 500;
    RetryConfig::standard()
        .with_max_attempts(u32::try_from(attempts).unwrap_or(u32::MAX))
        .with_initial_backoff(FIRST_BACKOFF)
        .with_max_backoff(MAX_BACKOFF)
}

/// The configured timeouts (connect, read...) with the operation timeout set to `budget`.
pub fn with_budget(timeouts: Option<&TimeoutConfig>, budget: Duration) -> TimeoutConfig {
    let mut b = timeouts.map_or_else(TimeoutConfig::builder, TimeoutConfig::to_builder);
    if budget.is_zero() {
        b = b.disable_operation_timeout();
    } else {
        b = b.operation_timeout(budget);
    }
    b.build()
}

/// Words in an error chain that mean the TLS handshake failed.
const TLS_WORDS: [&str; 6] = [
    "tls",
    "ssl",
    "certificate",
    "corrupt message",
    "invalidcontenttype",
    "handshake",
];

/// Whether an error description is a TLS failure.
pub fn is_tls(chain: &str) -> bool {
    let lower = chain.to_ascii_lowercase();
    TLS_WORDS.iter().any(|w| lower.contains(w))
}

/// An error and its causes, each once, on one line (`a: b: c`).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string().replace('\n', " ");
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// Whether an HTTP status is worth asking again for: `Some(true)` retry, `Some(false)` never, `None`
/// no opinion (the error codes decide).
pub fn status_is_transient(status: u16) -> Option<bool> {
    match status {
        // The store does not support the request; asking again will not change that.
        501 | 505 => Some(false),
        408 | 429 | 500 | 502..=504 | 506..=599 => Some(true),
        _ => None,
    }
}

/// tcplake's judgement of a failed attempt (see the module docs).
#[derive(Debug)]
pub struct Transient;

impl ClassifyRetry for Transient {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let Some(Err(err)) = ctx.output_or_error() else {
            return RetryAction::NoActionIndicated;
        };
        if let Some(c) = err.as_connector_error() {
            if is_tls(&error_chain(c)) {
                return RetryAction::RetryForbidden;
            }
        }
        if let Some(status) = ctx.response().map(|r| r.status().as_u16()) {
            match status_is_transient(status) {
                Some(true) => return RetryAction::server_error(),
                Some(false) => return RetryAction::RetryForbidden,
                None => {}
            }
        }
        if err.is_timeout_error() || err.is_connector_error() || err.is_response_error() {
            return RetryAction::transient_error();
        }
        RetryAction::NoActionIndicated
    }

    fn name(&self) -> &'static str {
        "tcplake transient S3 failures"
    }
}

/// When the current attempt started.
#[derive(Debug, Clone)]
struct AttemptStarted(Instant);

impl Storable for AttemptStarted {
    type Storer = StoreReplace<Self>;
}

/// Why the last attempt failed, for the retry warning.
#[derive(Debug, Clone)]
struct LastFailure(String);

impl Storable for LastFailure {
    type Storer = StoreReplace<Self>;
}

/// Counts each attempt by request type, with its duration; counts and logs retries.
#[derive(Debug)]
pub struct CountAttempts {
    metrics: Arc<S3Metrics>,
}

/// The S3 API operation of this request (`PutObject`), as the SDK names it.
fn operation(cfg: &ConfigBag) -> &str {
    cfg.load::<Metadata>().map_or("", |m| m.name())
}

impl Intercept for CountAttempts {
    fn name(&self) -> &'static str {
        "tcplake S3 request counting"
    }

    fn read_before_attempt(
        &self,
        _ctx: &BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.metrics.count(S3Op::of_operation(operation(cfg)));
        let attempt = cfg.load::<RequestAttempts>().map_or(1, |a| a.attempts());
        if attempt > 1 {
            self.metrics.retries.add(1);
            if attempt == 2 {
                let why = cfg.load::<LastFailure>().map_or("", |f| f.0.as_str());
                tracing::warn!(
                    op = operation(cfg),
                    error = why,
                    "S3 request failed; retrying with backoff"
                );
            }
        }
        cfg.interceptor_state()
            .store_put(AttemptStarted(Instant::now()));
        Ok(())
    }

    fn read_after_attempt(
        &self,
        ctx: &FinalizerInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(started) = cfg.load::<AttemptStarted>() {
            let op = S3Op::of_operation(operation(cfg));
            self.metrics.observe(op, started.0.elapsed());
        }
        if let Some(Err(e)) = ctx.output_or_error() {
            let status = ctx
                .response()
                .map(|r| format!("HTTP {}: ", r.status().as_u16()))
                .unwrap_or_default();
            let why = format!("{status}{}", error_chain(e));
            cfg.interceptor_state().store_put(LastFailure(why));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_tls_failures_are_judged_as_before() {
        for s in [408, 429, 500, 502, 503, 504, 506, 599] {
            assert_eq!(status_is_transient(s), Some(true), "{s}");
        }
        for s in [501, 505] {
            assert_eq!(status_is_transient(s), Some(false), "{s}");
        }
        for s in [200, 400, 403, 404, 412] {
            assert_eq!(status_is_transient(s), None, "{s}");
        }
        assert!(is_tls(
            "dispatch failure: io error: invalid peer certificate"
        ));
        assert!(is_tls(
            "received corrupt message of type InvalidContentType"
        ));
        assert!(!is_tls("dispatch failure: io error: connection refused"));
    }

    #[test]
    fn the_attempt_limit_outlasts_the_budget_and_stays_small() {
        assert_eq!(retry_config(Duration::ZERO).max_attempts(), 1);
        let r = retry_config(Duration::from_secs(600));
        assert_eq!(r.max_attempts(), 1_210);
        // Backoffs average 2.5 s at the cap: the allowed attempts would take five times the budget.
        assert!(f64::from(r.max_attempts()) * 2.5 >= 5.0 * 600.0);
        assert_eq!(
            retry_config(Duration::from_secs(86_400)).max_attempts(),
            172_810
        );
    }

    #[test]
    fn an_unlimited_budget_is_never_a_zero_timeout() {
        let t = with_budget(None, Duration::ZERO);
        assert_eq!(t.operation_timeout(), None);
        let t = with_budget(None, Duration::from_secs(90));
        assert_eq!(t.operation_timeout(), Some(Duration::from_secs(90)));
    }
}
