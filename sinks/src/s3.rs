//! The S3 sink (aws-sdk-s3): any S3-compatible endpoint, or AWS itself.
//!
//! - **Files** (file completion messages, see [`crate::completion`]) are streamed from the
//!   spool to the key `key` names: one PutObject below `part_size`, a multipart upload
//!   (parts of `part_size`, at least 5 MiB, read one at a time) above it, so a file is never
//!   whole in memory. A failed upload is aborted and retried by the worker; the spool file
//!   stays until it succeeded.
//! - **Records** are batched (the sink's `batch`: max events, max bytes, max age) and
//!   written as JSON-lines objects, one per (agent, stream, outbox incarnation) in a batch,
//!   at the key `records_key` renders from the first record of the object. A batch is
//!   retried as it is, and after a crash it starts again at the same record, so a retry
//!   overwrites the same keys instead of duplicating data.
//!
//! Checksums: `RequestChecksumCalculation::WhenRequired` by default, because the SDK's
//! default streaming checksum framing is refused or corrupted by several S3-compatible
//! servers.

use std::path::{Path, PathBuf};

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::completion::{completed_file, CompletedFile};
use crate::template::PathTemplate;
use fleetbus_config::Problems;
use fleetbus_protocol::Message;

use crate::config::{SinkPlace, SinkType};
use crate::{json_line, Batch, BatchConfig, BoxFuture, Item, Sink, SinkError};

/// Smallest multipart part S3 accepts (except the last).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

/// When the SDK computes request checksums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Checksums {
    /// Only where the operation requires one (works with every S3-compatible server).
    #[default]
    WhenRequired,
    /// Wherever the operation supports one (the SDK's default; AWS only, in practice).
    WhenSupported,
}

/// `type = "s3"`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3SinkConfig {
    /// The bucket (must exist).
    pub bucket: String,
    /// Endpoint URL of an S3-compatible server (`http://127.0.0.1:9000`); unset for AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region (signing region for S3-compatible servers).
    #[serde(default = "default_region")]
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most self-hosted servers.
    /// Default: on when `endpoint` is set.
    #[serde(default)]
    pub path_style: Option<bool>,
    /// Access key id; unset: `AWS_ACCESS_KEY_ID` from the environment.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret access key; unset: `AWS_SECRET_ACCESS_KEY` from the environment.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Session token; unset: `AWS_SESSION_TOKEN` from the environment, if any.
    #[serde(default)]
    pub session_token: Option<String>,
    /// Key template of completed files (see [`PathTemplate`]: `{agent}`, `{file.name}`,
    /// `{file.sha256}`, `{file.meta.KEY}`, strftime fields...).
    #[serde(default = "default_key")]
    pub key: String,
    /// Key template of record objects, rendered from an object's first record
    /// (`{agent}`, `{stream}`, `{epoch}`, `{seq}`, strftime fields of its timestamp).
    #[serde(default = "default_records_key")]
    pub records_key: String,
    /// Multipart part size in bytes (at least 5 MiB); files below it go in one request.
    #[serde(default = "default_part_size")]
    pub part_size: u64,
    /// Request checksums: `when_required` (default) or `when_supported`.
    #[serde(default)]
    pub checksums: Checksums,
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_key() -> String {
    "files/{agent}/%Y/%m/%d/{file.name}-{file.sha256}".into()
}

fn default_records_key() -> String {
    "records/{agent}/{stream}/%Y/%m/%d/{epoch}-{seq}.jsonl".into()
}

fn default_part_size() -> u64 {
    8 * 1024 * 1024
}

fn default_batch() -> BatchConfig {
    BatchConfig {
        max_events: 10_000,
        max_bytes: Some(8 * 1024 * 1024),
        max_age: std::time::Duration::from_secs(5),
        ..BatchConfig::default()
    }
}

impl SinkType for S3SinkConfig {
    /// Records: `max_events`, `max_bytes`, `max_age` per object.
    fn default_batch(&self) -> BatchConfig {
        default_batch()
    }

    fn check(&self, p: &mut Problems) {
        p.require(!self.bucket.trim().is_empty(), "bucket", "is empty");
        if let Err(e) = PathTemplate::parse(&self.key) {
            p.add("key", e.to_string());
        }
        if let Err(e) = PathTemplate::parse(&self.records_key) {
            p.add("records_key", e.to_string());
        }
        p.require(
            self.part_size >= MIN_PART_SIZE,
            "part_size",
            format!("must be at least {MIN_PART_SIZE} bytes (5 MiB, S3's smallest part)"),
        );
        p.require(
            self.part_size <= 512 * 1024 * 1024,
            "part_size",
            "must be at most 512 MiB (one part is held in memory)",
        );
        if let Some(e) = &self.endpoint {
            p.require(
                e.starts_with("http://") || e.starts_with("https://"),
                "endpoint",
                format!("`{e}` must start with http:// or https://"),
            );
        }
        p.require(
            self.access_key_id.is_some() == self.secret_access_key.is_some(),
            "access_key_id",
            "access_key_id and secret_access_key go together",
        );
    }

    fn file_destination(&self, msg: &Message) -> Option<String> {
        let key = PathTemplate::parse(&self.key).ok()?;
        Some(format!("s3://{}/{}", self.bucket, key.render(msg)))
    }

    fn build(&self, place: &SinkPlace<'_>) -> Result<Box<dyn Sink>, SinkError> {
        Ok(Box::new(S3Sink::new(self, place.data_dir)?))
    }
}

/// The records that share one object: (agent, stream, outbox incarnation).
type RecordGroup = (Option<String>, Option<String>, u64);

/// Writes files and record batches to one bucket.
pub struct S3Sink {
    client: Client,
    bucket: String,
    key: PathTemplate,
    records_key: PathTemplate,
    part_size: u64,
    data_dir: PathBuf,
}

impl S3Sink {
    /// Builds the client. Completed files are read from the spool under `data_dir`.
    pub fn new(config: &S3SinkConfig, data_dir: &Path) -> Result<S3Sink, SinkError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let access = config
            .access_key_id
            .clone()
            .or_else(|| env("AWS_ACCESS_KEY_ID"));
        let secret = config
            .secret_access_key
            .clone()
            .or_else(|| env("AWS_SECRET_ACCESS_KEY"));
        let token = config
            .session_token
            .clone()
            .or_else(|| env("AWS_SESSION_TOKEN"));
        let (Some(access), Some(secret)) = (access, secret) else {
            return Err(SinkError::Config(
                "no S3 credentials: set access_key_id and secret_access_key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
            ));
        };
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .credentials_provider(Credentials::new(access, secret, token, None, "fleetbus"))
            .force_path_style(config.path_style.unwrap_or(config.endpoint.is_some()))
            .request_checksum_calculation(match config.checksums {
                Checksums::WhenRequired => RequestChecksumCalculation::WhenRequired,
                Checksums::WhenSupported => RequestChecksumCalculation::WhenSupported,
            })
            .response_checksum_validation(match config.checksums {
                Checksums::WhenRequired => ResponseChecksumValidation::WhenRequired,
                Checksums::WhenSupported => ResponseChecksumValidation::WhenSupported,
            });
        if let Some(e) = &config.endpoint {
            builder = builder.endpoint_url(e.clone());
        }
        let template =
            |t: &str| PathTemplate::parse(t).map_err(|e| SinkError::Config(e.to_string()));
        Ok(S3Sink {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            key: template(&config.key)?,
            records_key: template(&config.records_key)?,
            part_size: config.part_size,
            data_dir: data_dir.to_path_buf(),
        })
    }

    fn s3_error(&self, op: &str, key: &str, e: impl std::error::Error) -> SinkError {
        SinkError::Remote(format!(
            "s3 {op} s3://{}/{key}: {}",
            self.bucket,
            aws_sdk_s3::error::DisplayErrorContext(e)
        ))
    }

    async fn put_file(&self, file: &CompletedFile, key: &str) -> Result<(), SinkError> {
        let size = file.completed.file.size;
        let content_type = file
            .completed
            .file
            .content_type
            .clone()
            .unwrap_or_else(|| "application/octet-stream".into());
        if size < self.part_size {
            let body = ByteStream::read_from()
                .path(&file.path)
                .build()
                .await
                .map_err(|e| SinkError::Remote(format!("{}: {e}", file.path.display())))?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_type(content_type)
                .content_length(size as i64)
                .body(body)
                .send()
                .await
                .map_err(|e| self.s3_error("PutObject", key, e))?;
        } else {
            self.multipart(file, key, content_type).await?;
        }
        tracing::info!(key = %key, bytes = size, "file stored in S3");
        Ok(())
    }

    async fn multipart(
        &self,
        file: &CompletedFile,
        key: &str,
        content_type: String,
    ) -> Result<(), SinkError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .send()
            .await
            .map_err(|e| self.s3_error("CreateMultipartUpload", key, e))?;
        let Some(upload_id) = created.upload_id() else {
            return Err(SinkError::Remote(format!(
                "s3 CreateMultipartUpload s3://{}/{key}: no upload id in the answer",
                self.bucket
            )));
        };
        let result = self.upload_parts(file, key, upload_id).await;
        match result {
            Ok(parts) => {
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(|e| self.s3_error("CompleteMultipartUpload", key, e))?;
                Ok(())
            }
            Err(e) => {
                // best effort: the retry starts a new upload
                let _ = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .send()
                    .await;
                Err(e)
            }
        }
    }

    /// Uploads the file part by part, one part in memory at a time.
    async fn upload_parts(
        &self,
        file: &CompletedFile,
        key: &str,
        upload_id: &str,
    ) -> Result<Vec<CompletedPart>, SinkError> {
        let path = &file.path;
        let mut f = tokio::fs::File::open(path)
            .await
            .map_err(|e| SinkError::io(path, crate::COMPLETED_FILE_OP, e))?;
        let mut parts = Vec::new();
        let mut number = 1i32;
        loop {
            let mut buf = Vec::with_capacity(self.part_size as usize);
            (&mut f)
                .take(self.part_size)
                .read_to_end(&mut buf)
                .await
                .map_err(|e| SinkError::io(path, "read completed file", e))?;
            if buf.is_empty() {
                break;
            }
            let last = (buf.len() as u64) < self.part_size;
            let answer = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(buf.len() as i64)
                .body(ByteStream::from(buf))
                .send()
                .await
                .map_err(|e| self.s3_error("UploadPart", key, e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(answer.e_tag().map(str::to_string))
                    .build(),
            );
            number += 1;
            if last {
                break;
            }
        }
        Ok(parts)
    }

    /// Groups record items into objects: (key, JSON lines), one per (agent, stream, epoch)
    /// in first-seen order, keyed by the first record of each.
    fn record_objects(&self, items: &[&Item]) -> Result<Vec<(String, Vec<u8>)>, SinkError> {
        let mut objects: Vec<(RecordGroup, String, Vec<u8>)> = Vec::new();
        for item in items {
            let m = item.message()?;
            let group = (
                m.agent().map(str::to_string),
                m.stream().map(str::to_string),
                m.epoch(),
            );
            let i = match objects.iter().position(|o| o.0 == group) {
                Some(i) => i,
                None => {
                    objects.push((group, self.records_key.render(m), Vec::new()));
                    objects.len() - 1
                }
            };
            json_line(item, &mut objects[i].2)?;
        }
        Ok(objects.into_iter().map(|(_, k, body)| (k, body)).collect())
    }
}

impl Sink for S3Sink {
    fn writes_json(&self) -> bool {
        true
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut records = Vec::new();
            for item in &batch.items {
                if item.dead_letter().is_none() {
                    let message = item.message()?;
                    if let Some(file) = completed_file(&self.data_dir, message) {
                        let file = file?;
                        let key = self.key.render(message);
                        self.put_file(&file, &key).await?;
                        continue;
                    }
                }
                records.push(item);
            }
            for (key, body) in self.record_objects(&records)? {
                let len = body.len();
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .content_type("application/x-ndjson")
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .map_err(|e| self.s3_error("PutObject", &key, e))?;
                tracing::debug!(%key, bytes = len, "record object stored in S3");
            }
            Ok(())
        })
    }
}
