//! Sending OTLP requests over gRPC (tonic) or HTTP/protobuf (hyper + rustls), with TLS
//! (system roots or a custom CA, optional client certificate), headers and gzip. Errors
//! are classified as the OTLP specification says: retryable or not, with the delay the
//! server asked for.

use std::{io::Write, str::FromStr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::{client::legacy::Client as HyperClient, rt::TokioExecutor};
use opentelemetry_proto::tonic::collector::{
    logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse},
    metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse},
    trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
};
use prost::Message;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tonic::{
    Code,
    codec::CompressionEncoding,
    metadata::{MetadataKey, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_types::StatusExt;

use crate::config::otlp::{Compression, Protocol, SignalSettings, TlsSettings};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid TLS material: {0}")]
    Tls(String),
    #[error("invalid endpoint {url}: {reason}")]
    Endpoint { url: String, reason: String },
    #[error("invalid header {name:?}")]
    Header { name: String },
}

/// An export request already encoded, as the parts it was written in (a workload's
/// resource, then its log records, ...): sent as they are, one after the other, so a large
/// request is never copied just to put its parts together. Clones share the parts.
#[derive(Debug, Clone, Default)]
pub struct Encoded {
    parts: Vec<Bytes>,
}

impl Encoded {
    pub fn from_parts(parts: Vec<Bytes>) -> Self {
        Self { parts }
    }

    /// Bytes in all the parts.
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.iter().all(Bytes::is_empty)
    }

    /// The request in one piece (copied, unless it is one part already).
    pub fn contiguous(&self) -> Bytes {
        match self.parts.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            parts => {
                let mut all = Vec::with_capacity(self.len());
                for part in parts {
                    all.extend_from_slice(part);
                }
                all.into()
            }
        }
    }
}

impl From<Vec<u8>> for Encoded {
    fn from(bytes: Vec<u8>) -> Self {
        Self {
            parts: vec![bytes.into()],
        }
    }
}

/// An HTTP request body sent as an [`Encoded`] request's parts, one data frame each;
/// its exact length is known, so it goes with a `Content-Length`.
pub struct PartsBody {
    parts: std::vec::IntoIter<Bytes>,
    remaining: u64,
}

impl PartsBody {
    fn new(encoded: Encoded) -> Self {
        Self {
            remaining: encoded.len() as u64,
            parts: encoded.parts.into_iter(),
        }
    }
}

impl hyper::body::Body for PartsBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let part = this.parts.find(|part| !part.is_empty());
        if let Some(part) = &part {
            this.remaining -= part.len() as u64;
        }
        std::task::Poll::Ready(part.map(|part| Ok(hyper::body::Frame::data(part))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.remaining)
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// Try again later (after `retry_after` if the server said).
    Retryable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Retrying would not help: the data is dropped and counted.
    Permanent { reason: String },
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Retryable { reason, .. } | SendError::Permanent { reason } => {
                f.write_str(reason)
            }
        }
    }
}

/// What the server accepted: `rejected` items and its message (OTLP partial success).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accepted {
    pub rejected: u64,
    pub message: String,
}

// One per client, built once: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Inner {
    Grpc {
        channel: Channel,
        gzip: bool,
        headers: tonic::metadata::MetadataMap,
    },
    Http {
        client: HyperClient<
            hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
            PartsBody,
        >,
        url: hyper::Uri,
        gzip: bool,
        headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    },
}

pub struct Client {
    inner: Inner,
    timeout: Duration,
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| TransportError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn rustls_config(tls: &TlsSettings) -> Result<rustls::ClientConfig, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            let pem = read("CA certificate", path)?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert =
                    cert.map_err(|e| TransportError::Tls(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| TransportError::Tls(format!("{}: {e}", path.display())))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match (&tls.client_certificate, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let certs: Result<Vec<_>, _> =
                CertificateDer::pem_slice_iter(&read("client certificate", cert)?).collect();
            let certs =
                certs.map_err(|e| TransportError::Tls(format!("{}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_slice(&read("client key", key)?)
                .map_err(|e| TransportError::Tls(format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TransportError::Tls(e.to_string()))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

impl Client {
    /// Builds the client; nothing is connected until the first request.
    pub fn new(settings: &SignalSettings) -> Result<Self, TransportError> {
        // Both tonic and hyper-rustls use rustls; make ring the process's provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let gzip = settings.compression == Compression::Gzip;
        let bad_endpoint = |reason: String| TransportError::Endpoint {
            url: settings.url.clone(),
            reason,
        };
        let inner = match settings.protocol {
            Protocol::Grpc => {
                let mut endpoint = Endpoint::from_shared(settings.url.clone())
                    .map_err(|e| bad_endpoint(e.to_string()))?
                    .connect_timeout(settings.timeout)
                    .timeout(settings.timeout);
                if settings.url.starts_with("https://") {
                    let mut tls = ClientTlsConfig::new();
                    tls = match &settings.tls.ca_file {
                        Some(path) => {
                            tls.ca_certificate(Certificate::from_pem(read("CA certificate", path)?))
                        }
                        None => tls.with_native_roots(),
                    };
                    if let (Some(cert), Some(key)) =
                        (&settings.tls.client_certificate, &settings.tls.client_key)
                    {
                        tls = tls.identity(Identity::from_pem(
                            read("client certificate", cert)?,
                            read("client key", key)?,
                        ));
                    }
                    endpoint = endpoint
                        .tls_config(tls)
                        .map_err(|e| TransportError::Tls(e.to_string()))?;
                }
                let mut headers = tonic::metadata::MetadataMap::new();
                for (name, value) in &settings.headers {
                    let key = MetadataKey::from_str(&name.to_lowercase())
                        .map_err(|_| TransportError::Header { name: name.clone() })?;
                    let value = MetadataValue::try_from(value.as_str())
                        .map_err(|_| TransportError::Header { name: name.clone() })?;
                    headers.insert(key, value);
                }
                Inner::Grpc {
                    channel: endpoint.connect_lazy(),
                    gzip,
                    headers,
                }
            }
            Protocol::HttpProtobuf => {
                let url: hyper::Uri = settings
                    .url
                    .parse()
                    .map_err(|e: hyper::http::uri::InvalidUri| bad_endpoint(e.to_string()))?;
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(rustls_config(&settings.tls)?)
                    .https_or_http()
                    .enable_http1()
                    .build();
                let client = HyperClient::builder(TokioExecutor::new()).build(connector);
                let mut headers = Vec::new();
                for (name, value) in &settings.headers {
                    let header_name = hyper::header::HeaderName::from_str(name)
                        .map_err(|_| TransportError::Header { name: name.clone() })?;
                    let header_value = hyper::header::HeaderValue::from_str(value)
                        .map_err(|_| TransportError::Header { name: name.clone() })?;
                    headers.push((header_name, header_value));
                }
                Inner::Http {
                    client,
                    url,
                    gzip,
                    headers,
                }
            }
        };
        Ok(Self {
            inner,
            timeout: settings.timeout,
        })
    }

    /// An `ExportLogsServiceRequest` already encoded: the workload records' hot path.
    pub async fn export_encoded_logs(&self, encoded: Encoded) -> Result<Accepted, SendError> {
        let response: ExportLogsServiceResponse = self
            .export_encoded(
                "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
                encoded,
            )
            .await?;
        Ok(response
            .partial_success
            .map_or_else(Accepted::default, |p| Accepted {
                rejected: p.rejected_log_records.max(0) as u64,
                message: p.error_message,
            }))
    }

    pub async fn export_logs(
        &self,
        request: &ExportLogsServiceRequest,
    ) -> Result<Accepted, SendError> {
        self.export_encoded_logs(request.encode_to_vec().into())
            .await
    }

    pub async fn export_metrics(
        &self,
        request: &ExportMetricsServiceRequest,
    ) -> Result<Accepted, SendError> {
        let response: ExportMetricsServiceResponse = self
            .export_encoded(
                "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
                request.encode_to_vec().into(),
            )
            .await?;
        Ok(response
            .partial_success
            .map_or_else(Accepted::default, |p| Accepted {
                rejected: p.rejected_data_points.max(0) as u64,
                message: p.error_message,
            }))
    }

    /// Only the collector's own spans travel this way.
    pub async fn export_traces(
        &self,
        request: &ExportTraceServiceRequest,
    ) -> Result<Accepted, SendError> {
        let response: ExportTraceServiceResponse = self
            .export_encoded(
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                request.encode_to_vec().into(),
            )
            .await?;
        Ok(response
            .partial_success
            .map_or_else(Accepted::default, |p| Accepted {
                rejected: p.rejected_spans.max(0) as u64,
                message: p.error_message,
            }))
    }

    /// Sends an encoded export request: as the unary gRPC call `grpc_path`, or as an
    /// HTTP POST to this client's URL. An undecodable HTTP response body counts as an
    /// empty (fully accepted) one, as the specification allows.
    async fn export_encoded<R: Message + Default + Send + 'static>(
        &self,
        grpc_path: &'static str,
        encoded: Encoded,
    ) -> Result<R, SendError> {
        match &self.inner {
            Inner::Grpc {
                channel,
                gzip,
                headers,
            } => {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                if *gzip {
                    grpc = grpc
                        .send_compressed(CompressionEncoding::Gzip)
                        .accept_compressed(CompressionEncoding::Gzip);
                }
                grpc.ready().await.map_err(|e| SendError::Retryable {
                    reason: crate::one_line(&e),
                    retry_after: None,
                })?;
                let mut request = tonic::Request::new(encoded);
                *request.metadata_mut() = headers.clone();
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(grpc_path);
                Ok(grpc
                    .unary(request, path, PreEncoded::<R>::default())
                    .await
                    .map_err(classify_status)?
                    .into_inner())
            }
            Inner::Http { .. } => {
                let body = self.post(encoded).await?;
                Ok(R::decode(body).unwrap_or_default())
            }
        }
    }

    /// POSTs a protobuf body; returns the response body of a 2xx. The body goes out as
    /// the parts it was encoded in (each attempt, a retry too, shares them: nothing is
    /// joined or copied), or gzipped part after part.
    async fn post(&self, body: Encoded) -> Result<Bytes, SendError> {
        let Inner::Http {
            client,
            url,
            gzip,
            headers,
        } = &self.inner
        else {
            return Err(SendError::Permanent {
                reason: "not an HTTP client".into(),
            });
        };
        let mut builder = hyper::Request::post(url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/x-protobuf");
        let body = if *gzip {
            builder = builder.header(hyper::header::CONTENT_ENCODING, "gzip");
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            (body.parts.iter())
                .try_for_each(|part| encoder.write_all(part))
                .and_then(|()| encoder.finish())
                .map_err(|e| SendError::Permanent {
                    reason: format!("gzip: {e}"),
                })?
                .into()
        } else {
            body
        };
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        let request = builder
            .body(PartsBody::new(body))
            .map_err(|e| SendError::Permanent {
                reason: e.to_string(),
            })?;
        let response = tokio::time::timeout(self.timeout, client.request(request))
            .await
            .map_err(|_| SendError::Retryable {
                reason: format!("no response within {:?}", self.timeout),
                retry_after: None,
            })?
            .map_err(|e| SendError::Retryable {
                reason: crate::one_line(&e),
                retry_after: None,
            })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = tokio::time::timeout(self.timeout, response.into_body().collect())
            .await
            .map_err(|_| SendError::Retryable {
                reason: "response body timed out".into(),
                retry_after: None,
            })?
            .map_err(|e| SendError::Retryable {
                reason: e.to_string(),
                retry_after: None,
            })?
            .to_bytes();
        match status.as_u16() {
            200..=299 => Ok(body),
            429 | 502 | 503 | 504 => Err(SendError::Retryable {
                reason: format!("HTTP {status}"),
                retry_after,
            }),
            _ => Err(SendError::Permanent {
                reason: format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ),
            }),
        }
    }
}

/// The OTLP specification's retryable gRPC codes; RESOURCE_EXHAUSTED only when the
/// server says when to come back (RetryInfo).
pub fn classify_status(status: tonic::Status) -> SendError {
    let reason = format!("gRPC {:?}: {}", status.code(), status.message());
    let retry_after = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay);
    match status.code() {
        Code::Unavailable
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::DataLoss => SendError::Retryable {
            reason,
            retry_after,
        },
        Code::ResourceExhausted if retry_after.is_some() => SendError::Retryable {
            reason,
            retry_after,
        },
        _ => SendError::Permanent { reason },
    }
}

/// A gRPC codec whose request is protobuf already encoded, and whose response is `R`.
struct PreEncoded<R>(std::marker::PhantomData<R>);

impl<R> Default for PreEncoded<R> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

struct BytesEncoder;

impl tonic::codec::Encoder for BytesEncoder {
    type Item = Encoded;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Encoded,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        for part in &item.parts {
            bytes::BufMut::put_slice(dst, part);
        }
        Ok(())
    }
}

struct MessageDecoder<R>(std::marker::PhantomData<R>);

impl<R: Message + Default> tonic::codec::Decoder for MessageDecoder<R> {
    type Item = R;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<R>, tonic::Status> {
        R::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("undecodable response: {e}")))
    }
}

impl<R: Message + Default + Send + 'static> tonic::codec::Codec for PreEncoded<R> {
    type Encode = Encoded;
    type Decode = R;
    type Encoder = BytesEncoder;
    type Decoder = MessageDecoder<R>;

    fn encoder(&mut self) -> Self::Encoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder(std::marker::PhantomData)
    }
}

/// Shared handle, so the log and metric loops can use one client each.
pub type SharedClient = Arc<Client>;

#[cfg(test)]
mod tests {
    use hyper::body::Body as _;

    use super::*;

    #[tokio::test]
    async fn a_parts_body_is_the_request_part_after_part_with_its_exact_length() {
        let encoded = Encoded::from_parts(vec![
            Bytes::from_static(b"head"),
            Bytes::new(),
            Bytes::from_static(b"records"),
        ]);
        let body = PartsBody::new(encoded.clone());
        assert_eq!(body.size_hint().exact(), Some(11));
        assert!(!body.is_end_stream());
        let mut frames = Vec::new();
        let mut body = std::pin::pin!(body);
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("infallible");
            frames.push(frame.into_data().expect("a data frame"));
        }
        assert_eq!(frames, [&b"head"[..], &b"records"[..]], "one frame a part");
        assert!(body.is_end_stream());
        assert_eq!(frames.concat(), encoded.contiguous());
    }
}
