//! The S3 store (aws-sdk-s3): any S3-compatible endpoint, the standard AWS credential chain.
//!
//! A sealed file is uploaded from the local spool with one PUT, or as a multipart upload in
//! [`PART_SIZE`] parts when larger than [`MULTIPART_THRESHOLD`] (one part in memory at a time). Small
//! objects can be created conditionally (`If-None-Match: *`: the Delta log's commits rely on it).
//! Every attempt is counted by type ([`S3Metrics`]). Transient failures (timeouts, connection errors,
//! 5xx, throttling) are retried by the SDK with exponential backoff and jitter for up to the configured
//! time (the policy and the counting: [`super::s3_requests`]), while the sink — and through the edges,
//! capture — waits; multipart uploads that fail are aborted, and dangling ones under the prefix are
//! aborted at startup.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use tokio::io::AsyncReadExt;

use super::s3_requests::{self, error_chain, is_tls, status_is_transient};
use super::{LocalDir, StoreError};
use crate::metrics::{LogMetrics, S3Metrics};
use crate::retry::Backoff;

/// Files above this size go up as multipart uploads.
pub const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// Size of each part (S3's minimum is 5 MiB).
pub const PART_SIZE: usize = 8 << 20;

/// Why talking to S3 failed, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("bucket `{bucket}` does not exist at {endpoint}")]
    NoSuchBucket { bucket: String, endpoint: String },
    #[error(
        "{endpoint} does not answer like an S3 store (HTTP {status} without an S3 error code): check \
         --s3-endpoint"
    )]
    NotS3 { endpoint: String, status: u16 },
    #[error(
        "no AWS credentials found for {endpoint}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
         or AWS_PROFILE (~/.aws/credentials), or use a web identity, ECS task or instance role{detail}"
    )]
    NoCredentials { endpoint: String, detail: String },
    #[error(
        "TLS with {endpoint} failed: {reason} (is it a plain-HTTP endpoint? then use http://)"
    )]
    Tls { endpoint: String, reason: String },
    #[error(
        "the S3 store at {endpoint} ignores conditional writes (If-None-Match: *): two writers could \
         overwrite each other's Delta commits there, so tcplake does not write tables to it (with one \
         writer per output guaranteed, set sink.s3_single_writer = true)"
    )]
    NoConditionalWrites { endpoint: String },
    #[error(
        "the multipart upload of `{key}` was aborted by someone else while tcplake wrote it (another \
         process cleaning up uploads under the same prefix, or a bucket lifecycle rule)"
    )]
    UploadAborted { key: String },
    #[error(
        "access to bucket `{bucket}` at {endpoint} was denied (HTTP {status}): check the credentials \
         (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the instance/web identity role)"
    )]
    Denied {
        bucket: String,
        endpoint: String,
        status: u16,
    },
    #[error("S3 {op} `{key}` failed{retried}: {message}")]
    Request {
        op: &'static str,
        key: String,
        retried: String,
        message: String,
    },
    #[error("reading `{path}` for upload: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the store says about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the store's prefix.
    pub key: String,
    pub size: u64,
    pub last_modified: Option<std::time::SystemTime>,
    pub etag: Option<String>,
}

/// Where and how to reach the bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct S3Settings {
    pub bucket: String,
    /// Key prefix, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// Custom endpoint for S3-compatible stores (`http://127.0.0.1:9100`); AWS when `None`.
    pub endpoint: Option<String>,
    /// Region; from the AWS configuration chain when `None`, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible stores need.
    pub path_style: bool,
    /// Local directory where files are written before upload.
    pub spool: PathBuf,
    /// How long a transient failure is retried before the run fails.
    pub max_retry: Duration,
    /// Files larger than this go up as multipart uploads (default [`MULTIPART_THRESHOLD`]).
    pub multipart_threshold: u64,
    /// The user vouches for a single writer per output: a store that ignores conditional writes is
    /// then only warned about, not refused.
    pub single_writer: bool,
}

/// An S3 bucket (and prefix) as the object store.
#[derive(Clone, Debug)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    endpoint: String,
    spool: LocalDir,
    max_retry: Duration,
    multipart_threshold: u64,
    metrics: Arc<S3Metrics>,
    /// Where the Delta log's share of the requests is counted too.
    log_requests: Arc<LogMetrics>,
}

/// Status code of a failed request, when the server answered.
fn status<E>(e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// Worth trying again (the judgement the SDK's retries used, [`s3_requests::Transient`]): the server
/// did not answer, or said it is overloaded or broken.
fn transient<E: ProvideErrorMetadata + std::error::Error + 'static>(
    e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    match e {
        // A TLS handshake that failed fails the same way next time.
        SdkError::DispatchFailure(_) if tls_problem(e).is_some() => false,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(s) => {
            status(e).and_then(status_is_transient).unwrap_or(false)
                || matches!(
                    s.err().code(),
                    Some("SlowDown" | "RequestTimeout" | "InternalError")
                )
        }
        _ => false,
    }
}

/// The TLS failure behind a request error, if that is what it is.
fn tls_problem<E: std::error::Error + 'static>(
    e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Option<String> {
    let chain = error_chain(e);
    is_tls(&chain).then_some(chain)
}

/// How long the startup check of the bucket retries an unreachable store.
const STARTUP_RETRY_FOR: Duration = Duration::from_secs(30);
/// How long the credential chain may look before "no credentials" is the answer.
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(15);
/// A multipart upload older than this under the prefix is a dead run's, whoever started it: no live
/// upload of tcplake's takes a day.
const DANGLING_UPLOAD_AGE: Duration = Duration::from_secs(86_400);

impl S3Store {
    /// Builds the client, checks credentials and the bucket, and aborts multipart uploads a crashed run
    /// left behind.
    pub async fn connect(s: &S3Settings, metrics: Arc<S3Metrics>) -> Result<Self, StoreError> {
        let spool = LocalDir::open(&s.spool)?;
        let store = Self::client(s, spool, metrics)
            .await?
            .with_budget(s.max_retry);
        store.check_conditional_writes(s.single_writer).await?;
        store.abort_journalled_uploads().await?;
        store.abort_dangling_uploads().await?;
        Ok(store)
    }

    /// Connects to read only (a replay's source): nothing is aborted or cleaned up in the bucket.
    pub async fn connect_read_only(
        s: &S3Settings,
        metrics: Arc<S3Metrics>,
    ) -> Result<Self, StoreError> {
        let spool = LocalDir::open(&s.spool)?;
        Ok(Self::client(s, spool, metrics)
            .await?
            .with_budget(s.max_retry))
    }

    /// Sets how long one request may take, retries included.
    fn with_budget(mut self, budget: Duration) -> Self {
        let conf = self.client.config();
        let timeouts = s3_requests::with_budget(conf.timeout_config(), budget);
        self.client = Client::from_conf(
            conf.to_builder()
                .retry_config(s3_requests::retry_config(budget))
                .timeout_config(timeouts)
                .build(),
        );
        self.max_retry = budget;
        self
    }

    async fn client(
        s: &S3Settings,
        spool: LocalDir,
        metrics: Arc<S3Metrics>,
    ) -> Result<Self, S3Error> {
        let endpoint = s.endpoint.clone().unwrap_or_else(|| "AWS S3".into());
        // The standard chain, with a quick instance-metadata probe: off EC2 it times out instead of
        // answering, and a missing credential should be one error line within seconds, not half a
        // minute of retries.
        let imds = aws_config::imds::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .read_timeout(Duration::from_millis(500))
            .max_attempts(1)
            .build();
        let chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
            .imds_client(imds)
            .build()
            .await;
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).credentials_provider(chain);
        if let Some(r) = &s.region {
            loader = loader.region(Region::new(r.clone()));
        }
        let shared = loader.load().await;
        Self::check_credentials(&shared, &endpoint).await?;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared).force_path_style(s.path_style);
        if shared.region().is_none() {
            conf = conf.region(Region::new("us-east-1"));
        }
        if let Some(ep) = &s.endpoint {
            conf = conf.endpoint_url(ep);
        }
        // At startup an unreachable store is more likely a wrong endpoint than an outage: fail within
        // a minute; once running, ride outages out for the configured time (`with_budget`).
        let budget = s.max_retry.min(STARTUP_RETRY_FOR);
        let conf =
            s3_requests::configure(conf, shared.timeout_config(), budget, Arc::clone(&metrics));
        let store = S3Store {
            client: Client::from_conf(conf.build()),
            bucket: s.bucket.clone(),
            prefix: s.prefix.clone(),
            endpoint,
            spool,
            max_retry: budget,
            multipart_threshold: s.multipart_threshold,
            metrics,
            log_requests: Arc::default(),
        };
        store.check_bucket().await?;
        Ok(store)
    }

    /// Resolves the credentials once, so their absence is one clear error; registers the secret parts
    /// so no log line (the SDK's own debug output included) shows them.
    async fn check_credentials(
        shared: &aws_config::SdkConfig,
        endpoint: &str,
    ) -> Result<(), S3Error> {
        use aws_credential_types::provider::ProvideCredentials;
        let missing = |detail: String| S3Error::NoCredentials {
            endpoint: endpoint.to_string(),
            detail,
        };
        let provider = shared
            .credentials_provider()
            .ok_or_else(|| missing(String::new()))?;
        let creds = tokio::time::timeout(CREDENTIALS_TIMEOUT, provider.provide_credentials())
            .await
            .map_err(|_| {
                missing(format!(
                    " (looking for them took over {} s)",
                    CREDENTIALS_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| {
                let reason = error_chain(&e);
                // "no providers in chain provided credentials" is the chain's way of saying none.
                if reason.contains("no providers") || reason.contains("not loaded") {
                    missing(String::new())
                } else {
                    missing(format!(" ({reason})"))
                }
            })?;
        crate::secrets::register(creds.secret_access_key());
        if let Some(t) = creds.session_token() {
            crate::secrets::register(t);
        }
        Ok(())
    }

    pub fn spool(&self) -> &LocalDir {
        &self.spool
    }

    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    /// The same bucket, seen from its root (keys are whole object keys, not under the prefix).
    /// Counts the Delta log's requests (also counted with every other request) in `m`.
    pub fn counting_log_requests(self, m: Arc<LogMetrics>) -> S3Store {
        S3Store {
            log_requests: m,
            ..self
        }
    }

    pub fn log_requests(&self) -> Arc<LogMetrics> {
        Arc::clone(&self.log_requests)
    }

    pub fn at_bucket_root(&self) -> S3Store {
        S3Store {
            prefix: String::new(),
            ..self.clone()
        }
    }

    fn object_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn failed<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
        &self,
        op: &'static str,
        key: &str,
        e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> S3Error {
        if let Some(reason) = tls_problem(e) {
            return S3Error::Tls {
                endpoint: self.endpoint.clone(),
                reason,
            };
        }
        let code = match e {
            SdkError::ServiceError(s) => s.err().code(),
            _ => None,
        };
        if code == Some("NoSuchUpload") {
            return S3Error::UploadAborted {
                key: key.to_string(),
            };
        }
        let auth_code = code.is_none_or(|c| {
            matches!(
                c,
                "AccessDenied"
                    | "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "ExpiredToken"
                    | "InvalidToken"
                    | "TokenRefreshRequired"
                    | "AllAccessDisabled"
            )
        });
        if matches!(status(e), Some(401 | 403)) && auth_code {
            return S3Error::Denied {
                bucket: self.bucket.clone(),
                endpoint: self.endpoint.clone(),
                status: status(e).unwrap_or(403),
            };
        }
        S3Error::Request {
            op,
            key: key.to_string(),
            retried: if transient(e) {
                format!(" after retrying for {} s", self.max_retry.as_secs())
            } else {
                String::new()
            },
            message: describe(e),
        }
    }

    async fn check_bucket(&self) -> Result<(), S3Error> {
        let r = self.client.head_bucket().bucket(&self.bucket).send().await;
        match r {
            Ok(_) => Ok(()),
            // A HEAD answer has no body to tell S3's 404 from a web server's: ask with a LIST.
            Err(e) if status(&e) == Some(404) => self.check_not_s3().await,
            Err(e) => Err(self.failed("HEAD bucket", &self.bucket, &e)),
        }
    }

    /// Delta commits are conditional PUTs (`If-None-Match: *`): they keep two writers from overwriting
    /// each other's versions. A probe object is created twice; the second must be refused.
    async fn check_conditional_writes(&self, single_writer: bool) -> Result<(), S3Error> {
        let key = format!("_tcplake/probes/conditional-{}", super::new_id());
        let first = self.put_bytes(&key, b"1").await?;
        let second = self.put_bytes(&key, b"2").await?;
        self.delete(&key).await?;
        conditional_verdict(first, second, single_writer, &self.endpoint)
    }

    /// After a 404 on the bucket: a missing bucket (S3 says `NoSuchBucket`), or no S3 store at all.
    async fn check_not_s3(&self) -> Result<(), S3Error> {
        let r = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .max_keys(1)
            .send()
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(s)) if s.err().code() == Some("NoSuchBucket") => {
                Err(S3Error::NoSuchBucket {
                    bucket: self.bucket.clone(),
                    endpoint: self.endpoint.clone(),
                })
            }
            Err(e @ SdkError::ServiceError(_)) if e.code().is_none() => Err(S3Error::NotS3 {
                endpoint: self.endpoint.clone(),
                status: status(&e).unwrap_or(404),
            }),
            Err(e) => Err(self.failed("LIST", &self.bucket, &e)),
        }
    }

    /// Multipart uploads under our prefix left by a dead run. Another live process may be uploading
    /// under the same prefix (several nodes write one bucket), so only uploads older than
    /// [`DANGLING_UPLOAD_AGE`] are aborted here; this process's own crashed uploads are found through
    /// the journal ([`Self::abort_journalled_uploads`]).
    async fn abort_dangling_uploads(&self) -> Result<(), S3Error> {
        let prefix = self.object_key("");
        let listed = match self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .send()
            .await
        {
            Ok(l) => l,
            Err(e) if status(&e) == Some(501) => {
                tracing::debug!(
                    "this S3 store cannot list multipart uploads: only those journalled in the spool \
                     directory are aborted at startup"
                );
                return Ok(());
            }
            Err(e) => return Err(self.failed("list multipart uploads under", &prefix, &e)),
        };
        let now = std::time::SystemTime::now();
        for u in listed.uploads() {
            let (Some(key), Some(id)) = (u.key(), u.upload_id()) else {
                continue;
            };
            let initiated = u
                .initiated()
                .and_then(|t| std::time::SystemTime::try_from(*t).ok());
            let old_enough = initiated
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= DANGLING_UPLOAD_AGE);
            if !old_enough {
                continue;
            }
            tracing::info!(key, "aborting a multipart upload left by an earlier run");
            self.abort_upload(key, id).await?;
        }
        Ok(())
    }

    /// Uploads a sealed file as `key` (under the prefix). `false`: an object was already there (kept;
    /// the commit log decides whether that is our own earlier attempt).
    pub async fn put_file(&self, path: &Path, key: &str) -> Result<bool, S3Error> {
        self.upload_file(path, key, true).await
    }

    /// Uploads a sealed file as `key`; with `if_absent`, only if nothing is there (`false` then),
    /// otherwise replacing whatever is.
    pub async fn upload_file(
        &self,
        path: &Path,
        key: &str,
        if_absent: bool,
    ) -> Result<bool, S3Error> {
        let key = self.object_key(key);
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|source| S3Error::Read {
                path: path.into(),
                source,
            })?
            .len();
        if size > self.multipart_threshold {
            return self.put_multipart(path, &key, size, if_absent).await;
        }
        let (client, bucket, object) = (&self.client, &self.bucket, &key);
        let r = async move {
            // Streamed from the file: memory stays bounded whatever the file size.
            let body = ByteStream::from_path(path).await.map_err(|e| {
                SdkError::construction_failure(std::io::Error::other(e.to_string()))
            })?;
            let put = client.put_object().bucket(bucket).key(object);
            let put = if if_absent {
                put.if_none_match("*")
            } else {
                put
            };
            put.body(body).send().await
        }
        .await;
        match r {
            Ok(_) => {
                self.metrics.bytes_uploaded.add(size);
                Ok(true)
            }
            Err(e) if status(&e) == Some(412) => {
                tracing::debug!(key, "object already there; kept");
                Ok(false)
            }
            Err(e) => Err(self.failed("PUT", &key, &e)),
        }
    }

    /// Creates a small object from memory unless one exists (`false` then).
    pub async fn put_bytes(&self, key: &str, body: &[u8]) -> Result<bool, S3Error> {
        self.put_small(key, body, true).await
    }

    /// Writes a small object from memory, replacing any (a PUT is atomic per object).
    pub async fn replace_bytes(&self, key: &str, body: &[u8]) -> Result<(), S3Error> {
        self.put_small(key, body, false).await.map(|_| ())
    }

    async fn put_small(&self, key: &str, body: &[u8], if_absent: bool) -> Result<bool, S3Error> {
        let key = self.object_key(key);
        let body = bytes::Bytes::copy_from_slice(body);
        let r = {
            let put = self.client.put_object().bucket(&self.bucket).key(&key);
            let put = if if_absent {
                put.if_none_match("*")
            } else {
                put
            };
            put.body(ByteStream::from(body.clone())).send()
        }
        .await;
        match r {
            Ok(_) => {
                self.metrics.bytes_uploaded.add(body.len() as u64);
                Ok(true)
            }
            Err(e) if status(&e) == Some(412) => Ok(false),
            Err(e) => Err(self.failed("PUT", &key, &e)),
        }
    }

    /// Bytes `range` of an object (`bytes=a-b` as HTTP ranges say it: inclusive), with what S3 says
    /// about the object; `None` if there is none.
    pub async fn get_range(
        &self,
        key: &str,
        range: Option<String>,
    ) -> Result<Option<(Vec<u8>, ObjectInfo)>, S3Error> {
        let full = self.object_key(key);
        let started = Instant::now();
        let mut backoff = Backoff::new(s3_requests::FIRST_BACKOFF, s3_requests::MAX_BACKOFF);
        loop {
            let r = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(&full)
                .set_range(range.clone())
                .send()
                .await;
            let out = match r {
                Ok(out) => out,
                Err(e) if status(&e) == Some(404) => return Ok(None),
                Err(e) if status(&e) == Some(416) => {
                    let info = self.head_info(key).await?.unwrap_or(ObjectInfo {
                        key: key.to_string(),
                        size: 0,
                        last_modified: None,
                        etag: None,
                    });
                    return Ok(Some((Vec::new(), info)));
                }
                Err(e) => return Err(self.failed("GET", &full, &e)),
            };
            let total = out
                .content_range()
                .and_then(|cr| cr.rsplit_once('/'))
                .and_then(|(_, t)| t.parse::<u64>().ok())
                .or_else(|| out.content_length().map(|l| l.max(0) as u64))
                .unwrap_or(0);
            let info = ObjectInfo {
                key: key.to_string(),
                size: total,
                last_modified: out
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                etag: out.e_tag().map(str::to_string),
            };
            match out.body.collect().await {
                Ok(body) => {
                    let bytes = body.into_bytes().to_vec();
                    self.metrics.bytes_downloaded.add(bytes.len() as u64);
                    return Ok(Some((bytes, info)));
                }
                // The answer broke off mid-body (a dropped connection, a store serving an object
                // while it is replaced): the request as a whole is tried again, like any transient
                // failure.
                Err(e) if started.elapsed() < self.max_retry => {
                    self.metrics.retries.add(1);
                    if backoff.is_first() {
                        tracing::warn!(op = "get", key = %full, error = %e, "S3 response body broke off; retrying with backoff");
                    }
                    backoff.wait().await;
                }
                Err(e) => {
                    return Err(S3Error::Request {
                        op: "GET",
                        key: full.clone(),
                        retried: format!(" after retrying for {} s", self.max_retry.as_secs()),
                        message: e.to_string(),
                    })
                }
            }
        }
    }

    /// What S3 says about an object (size, time, etag), or `None` if there is none.
    pub async fn head_info(&self, key: &str) -> Result<Option<ObjectInfo>, S3Error> {
        let full = self.object_key(key);
        let r = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await;
        match r {
            Ok(out) => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: out.content_length().unwrap_or(0).max(0) as u64,
                last_modified: out
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                etag: out.e_tag().map(str::to_string),
            })),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.failed("HEAD", &full, &e)),
        }
    }

    /// Every object under `prefix` (recursively, keys relative to the store prefix), sorted by key.
    pub async fn list_info(&self, prefix: &str) -> Result<Vec<ObjectInfo>, S3Error> {
        self.list_info_after(prefix, None).await
    }

    /// Like [`S3Store::list_info`], only the keys after `start_after` (S3 skips the rest itself: a
    /// Delta log read lists its new versions, not the whole history).
    pub async fn list_info_after(
        &self,
        prefix: &str,
        start_after: Option<&str>,
    ) -> Result<Vec<ObjectInfo>, S3Error> {
        let full = self.object_key(prefix);
        let strip = self.object_key("");
        let after = start_after.map(|k| self.object_key(k));
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full)
                .set_start_after(after.clone())
                .set_continuation_token(token.clone())
                .send()
                .await
                .map_err(|e| self.failed("LIST", &full, &e))?;
            for o in page.contents() {
                if let Some(k) = o.key() {
                    let rel = if strip.is_empty() {
                        k
                    } else {
                        k.strip_prefix(strip.as_str()).unwrap_or(k)
                    };
                    out.push(ObjectInfo {
                        key: rel.trim_start_matches('/').to_string(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        last_modified: o
                            .last_modified()
                            .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                        etag: o.e_tag().map(str::to_string),
                    });
                }
            }
            token = page.next_continuation_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// The whole object, or `None` if there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
        Ok(self.get_range(key, None).await?.map(|(bytes, _)| bytes))
    }

    /// The object's size, or `None` if there is none.
    pub async fn head(&self, key: &str) -> Result<Option<u64>, S3Error> {
        Ok(self.head_info(key).await?.map(|i| i.size))
    }

    /// Keys under `prefix` (relative to the store prefix), sorted; every page is one LIST request.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, S3Error> {
        Ok(self
            .list_info(prefix)
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    /// Removes an object (absent is fine: S3 answers 204 either way).
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        let key = self.object_key(key);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| self.failed("DELETE", &key, &e))?;
        Ok(())
    }

    async fn put_multipart(
        &self,
        path: &Path,
        key: &str,
        size: u64,
        if_absent: bool,
    ) -> Result<bool, S3Error> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.failed("create multipart upload", key, &e))?;
        let id = created.upload_id().unwrap_or_default().to_string();
        // Journalled locally so a run that dies mid-upload has it aborted by the next one, even on
        // stores that cannot list multipart uploads.
        let journal = self.journal_upload(key, &id)?;
        let result = match self.upload_parts(path, key, &id, size, if_absent).await {
            Ok(created) => Ok(created),
            Err(e) => {
                // Never leave a half upload behind: it costs storage and confuses the next run.
                let _ = self.abort_upload(key, &id).await;
                Err(e)
            }
        };
        let _ = std::fs::remove_file(&journal);
        result
    }

    fn journal_dir(&self) -> PathBuf {
        self.spool.root().join(".uploads")
    }

    fn journal_upload(&self, key: &str, id: &str) -> Result<PathBuf, S3Error> {
        let dir = self.journal_dir();
        let name: String = id.bytes().map(|b| format!("{b:02x}")).collect();
        let path = dir.join(name);
        let body = serde_json::json!({
            "key": key,
            "upload_id": id,
            "pid": std::process::id(),
            "started": process_start(std::process::id()),
        })
        .to_string();
        // Written aside and renamed: an entry is complete or absent, whenever the process dies.
        let tmp = dir.join(format!(".tmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&tmp, body))
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| S3Error::Read {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    }

    async fn abort_upload(&self, key: &str, id: &str) -> Result<(), S3Error> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // Completed or already aborted: nothing is left over.
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.failed("abort multipart upload", key, &e)),
        }
    }

    /// Aborts the uploads journalled by a run that died before completing or aborting them.
    async fn abort_journalled_uploads(&self) -> Result<(), S3Error> {
        let Ok(entries) = std::fs::read_dir(self.journal_dir()) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(body) = std::fs::read(&path) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
                tracing::warn!(path = %path.display(), "unreadable upload journal entry; removed");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let (Some(key), Some(id)) = (v["key"].as_str(), v["upload_id"].as_str()) else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            // A live process's upload (another run sharing this spool directory) is not ours to abort.
            if let Some(pid) = v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()) {
                let alive = process_start(pid).is_some_and(|t| Some(t) == v["started"].as_u64());
                if alive {
                    continue;
                }
            }
            tracing::info!(key, "aborting a multipart upload a crashed run left behind");
            self.abort_upload(key, id).await?;
            let _ = std::fs::remove_file(&path);
        }
        Ok(())
    }

    async fn upload_parts(
        &self,
        path: &Path,
        key: &str,
        id: &str,
        size: u64,
        if_absent: bool,
    ) -> Result<bool, S3Error> {
        let read_err = |source| S3Error::Read {
            path: path.into(),
            source,
        };
        let mut file = tokio::fs::File::open(path).await.map_err(read_err)?;
        let mut parts = Vec::new();
        let mut sent = 0u64;
        let mut number = 1;
        while sent < size {
            let len = PART_SIZE.min((size - sent) as usize);
            let mut buf = vec![0u8; len];
            file.read_exact(&mut buf).await.map_err(read_err)?;
            let body = bytes::Bytes::from(buf);
            let part = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(id)
                .part_number(number)
                .body(ByteStream::from(body.clone()))
                .send()
                .await
                .map_err(|e| self.failed("upload part of", key, &e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_string))
                    .build(),
            );
            self.metrics.bytes_uploaded.add(len as u64);
            sent += len as u64;
            number += 1;
        }
        let done = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        let r = {
            let complete = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(id)
                .multipart_upload(done.clone());
            if if_absent {
                complete.if_none_match("*").send()
            } else {
                complete.send()
            }
        }
        .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if status(&e) == Some(412) => Ok(false),
            Err(e) => Err(self.failed("complete multipart upload", key, &e)),
        }
    }
}

/// What the conditional-write probe means: the first create must succeed and the second be refused.
/// A store that let both through ignores `If-None-Match`: refused, or (a single writer vouched for) a
/// warning.
fn conditional_verdict(
    first: bool,
    second: bool,
    single_writer: bool,
    endpoint: &str,
) -> Result<(), S3Error> {
    if first && !second {
        return Ok(());
    }
    if single_writer {
        tracing::warn!(
            endpoint,
            "this S3 store ignores conditional writes (If-None-Match): a second writer to the same \
             output could overwrite Delta commits; sink.s3_single_writer says there is none"
        );
        return Ok(());
    }
    Err(S3Error::NoConditionalWrites {
        endpoint: endpoint.to_string(),
    })
}

/// When process `pid` started (clock ticks after boot, `/proc/<pid>/stat` field 22): with the pid, it
/// names one process even after the pid is reused. `None` if there is no such process.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// One line: the service's code and message, or the transport failure.
fn describe<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> String {
    match e {
        SdkError::ServiceError(s) => format!(
            "{} (HTTP {}): {}",
            s.err().code().unwrap_or("error"),
            status(e).unwrap_or(0),
            s.err().message().unwrap_or("no message")
        ),
        other => error_chain(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real store that ignores conditional writes (garage) is not built here (25 CPU-minutes);
    /// the probe's verdict is tested on its own, and the probe against s3s-fs, which honours them.
    #[test]
    fn a_store_ignoring_conditional_writes_is_refused_unless_one_writer_is_vouched_for() {
        assert!(conditional_verdict(true, false, false, "e").is_ok());
        let e = conditional_verdict(true, true, false, "http://garage:3900").unwrap_err();
        assert!(matches!(e, S3Error::NoConditionalWrites { .. }), "{e}");
        assert!(e.to_string().contains("sink.s3_single_writer"), "{e}");
        assert!(conditional_verdict(true, true, true, "e").is_ok());
    }
}
