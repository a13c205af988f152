//! The object stores delta-rs commits through. For S3 outputs, [`S3Objects`]: `object_store`'s trait
//! over tcplake's own S3 client (aws-sdk-s3), so the Delta log's requests go through the same credential
//! chain, retries and request counting as the data files. Commits are conditional PUTs
//! (`If-None-Match: *`), which is what makes two writers on one table safe; a store that ignores them
//! is caught when the output is opened (`storage::s3`'s conditional-write probe). Local outputs use
//! `object_store`'s own file system store. Either way [`Counted`] counts the log's requests, so a local
//! run says what its tables would cost on S3.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyMode, CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult,
    MultipartUpload, ObjectMeta, ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, RenameOptions,
};

use crate::metrics::LogMetrics;
use crate::storage::s3::{ObjectInfo, S3Store};

const STORE: &str = "tcplake-s3";

/// One table's directory in a bucket, as an `ObjectStore` (paths relative to the table's root).
#[derive(Clone, Debug)]
pub struct S3Objects {
    s3: S3Store,
    /// Key prefix of the table inside the store's prefix (`events`), no trailing `/`.
    base: String,
}

impl S3Objects {
    /// Writes `body` at `location`: only if nothing is there (`create`, a conditional PUT whose refusal
    /// is `AlreadyExists`), or replacing what is.
    async fn write(&self, location: &Path, body: &[u8], create: bool) -> object_store::Result<()> {
        let key = self.key(location);
        if !create {
            return self.s3.replace_bytes(&key, body).await.map_err(generic);
        }
        if !self.s3.put_bytes(&key, body).await.map_err(generic)? {
            return Err(object_store::Error::AlreadyExists {
                path: location.to_string(),
                source: "an object is already there (If-None-Match)".into(),
            });
        }
        Ok(())
    }

    /// Objects under `prefix` after key `offset` (all with `None`), one LIST request a page; S3 skips
    /// what comes before `offset` itself.
    fn list_after(
        &self,
        prefix: Option<&Path>,
        offset: Option<&Path>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let this = self.clone();
        let prefix = prefix.cloned();
        let offset = offset.cloned();
        stream::once(async move {
            let p = match &prefix {
                Some(p) => format!("{}/", this.key(p)),
                None if this.base.is_empty() => String::new(),
                None => format!("{}/", this.base),
            };
            let after = offset.as_ref().map(|o| this.key(o));
            let listed = this
                .s3
                .list_info_after(&p, after.as_deref())
                .await
                .map_err(generic)?;
            Ok::<_, object_store::Error>(
                listed
                    .into_iter()
                    .map(|i| Ok(this.meta(i)))
                    .collect::<Vec<_>>(),
            )
        })
        .map(|r| match r {
            Ok(v) => stream::iter(v).boxed(),
            Err(e) => stream::once(async move { Err(e) }).boxed(),
        })
        .flatten()
        .boxed()
    }

    pub fn new(s3: S3Store, base: &str) -> Self {
        S3Objects {
            s3,
            base: base.trim_matches('/').to_string(),
        }
    }

    fn key(&self, location: &Path) -> String {
        if self.base.is_empty() {
            location.to_string()
        } else if location.as_ref().is_empty() {
            self.base.clone()
        } else {
            format!("{}/{}", self.base, location)
        }
    }

    fn meta(&self, info: ObjectInfo) -> ObjectMeta {
        let rel = if self.base.is_empty() {
            info.key.clone()
        } else {
            info.key
                .strip_prefix(&format!("{}/", self.base))
                .unwrap_or(&info.key)
                .to_string()
        };
        ObjectMeta {
            location: Path::from(rel),
            last_modified: info
                .last_modified
                .map(chrono::DateTime::<chrono::Utc>::from)
                .unwrap_or_default(),
            size: info.size,
            e_tag: info.etag,
            version: None,
        }
    }
}

impl fmt::Display for S3Objects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.s3.url(), self.base)
    }
}

fn generic(e: impl std::error::Error + Send + Sync + 'static) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: Box::new(e),
    }
}

fn not_found(location: &Path) -> object_store::Error {
    object_store::Error::NotFound {
        path: location.to_string(),
        source: "no such object".into(),
    }
}

/// An HTTP range for a `GetRange` (HTTP ranges are inclusive).
fn http_range(r: &GetRange) -> String {
    match r {
        GetRange::Bounded(b) => format!("bytes={}-{}", b.start, b.end.saturating_sub(1)),
        GetRange::Offset(o) => format!("bytes={o}-"),
        GetRange::Suffix(n) => format!("bytes=-{n}"),
    }
}

#[async_trait]
impl ObjectStore for S3Objects {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let body: Bytes = payload.into();
        match opts.mode {
            PutMode::Create => self.write(location, &body, true).await?,
            PutMode::Overwrite => self.write(location, &body, false).await?,
            PutMode::Update(_) => {
                return Err(object_store::Error::NotImplemented {
                    operation: "put with PutMode::Update".into(),
                    implementer: STORE.into(),
                })
            }
        }
        Ok(PutResult {
            e_tag: None,
            version: None,
        })
    }

    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        // tcplake uploads its data files itself; the Delta log's objects are small.
        Err(object_store::Error::NotImplemented {
            operation: "put_multipart".into(),
            implementer: STORE.into(),
        })
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let key = self.key(location);
        if options.head {
            let info = self
                .s3
                .head_info(&key)
                .await
                .map_err(generic)?
                .ok_or_else(|| not_found(location))?;
            let meta = self.meta(info);
            let size = meta.size;
            return Ok(GetResult {
                payload: GetResultPayload::Stream(stream::empty().boxed()),
                meta,
                range: 0..size,
                attributes: Default::default(),
            });
        }
        let (bytes, info) = self
            .s3
            .get_range(&key, options.range.as_ref().map(http_range))
            .await
            .map_err(generic)?
            .ok_or_else(|| not_found(location))?;
        let meta = self.meta(info);
        let start = match &options.range {
            Some(GetRange::Bounded(b)) => b.start,
            Some(GetRange::Offset(o)) => *o,
            Some(GetRange::Suffix(n)) => meta.size.saturating_sub(*n),
            None => 0,
        };
        let range: Range<u64> = start..start + bytes.len() as u64;
        let body = Bytes::from(bytes);
        Ok(GetResult {
            payload: GetResultPayload::Stream(stream::once(async move { Ok(body) }).boxed()),
            meta,
            range,
            attributes: Default::default(),
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let this = self.clone();
        locations
            .then(move |loc| {
                let this = this.clone();
                async move {
                    let loc = loc?;
                    this.s3.delete(&this.key(&loc)).await.map_err(generic)?;
                    Ok(loc)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.list_after(prefix, None)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.list_after(prefix, Some(offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let rel = prefix.map(|p| p.to_string()).unwrap_or_default();
        let p = match prefix {
            Some(p) => format!("{}/", self.key(p)),
            None if self.base.is_empty() => String::new(),
            None => format!("{}/", self.base),
        };
        let listed = self.s3.list_info(&p).await.map_err(generic)?;
        let mut objects = Vec::new();
        let mut dirs: Vec<Path> = Vec::new();
        for info in listed {
            let meta = self.meta(info);
            let name = meta.location.to_string();
            let rest = if rel.is_empty() {
                name.as_str()
            } else {
                name.strip_prefix(&format!("{rel}/")).unwrap_or(&name)
            };
            match rest.split_once('/') {
                Some((dir, _)) => {
                    let d = if rel.is_empty() {
                        Path::from(dir)
                    } else {
                        Path::from(format!("{rel}/{dir}"))
                    };
                    if dirs.last() != Some(&d) {
                        dirs.push(d);
                    }
                }
                None => objects.push(meta),
            }
        }
        dirs.dedup();
        Ok(ListResult {
            common_prefixes: dirs,
            objects,
        })
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let bytes = self
            .s3
            .get(&self.key(from))
            .await
            .map_err(generic)?
            .ok_or_else(|| not_found(from))?;
        self.write(to, &bytes, options.mode == CopyMode::Create)
            .await
    }
}

/// An object store that counts the requests made through it (the Delta log's) by type.
#[derive(Debug)]
pub struct Counted {
    inner: Arc<dyn ObjectStore>,
    requests: Arc<LogMetrics>,
}

impl Counted {
    pub fn new(inner: Arc<dyn ObjectStore>, requests: Arc<LogMetrics>) -> Self {
        Counted { inner, requests }
    }
}

impl fmt::Display for Counted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Counted {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.requests.put.add(1);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.requests.put.add(1);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if options.head {
            self.requests.head.add(1);
        } else {
            self.requests.get.add(1);
        }
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        // An upper bound: a store may merge nearby ranges into one request.
        self.requests.get.add(ranges.len() as u64);
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let requests = Arc::clone(&self.requests);
        let counted = locations
            .inspect(move |l| {
                if l.is_ok() {
                    requests.delete.add(1);
                }
            })
            .boxed();
        self.inner.delete_stream(counted)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.requests.list.add(1);
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.requests.list.add(1);
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.requests.list.add(1);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.requests.copy.add(1);
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        // On S3 a rename is a copy and a delete.
        self.requests.copy.add(1);
        self.requests.delete.add(1);
        self.inner.rename_opts(from, to, options).await
    }
}
