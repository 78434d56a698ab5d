//! OTLP over TLS against a local certificate authority, over gRPC and HTTP/protobuf: the
//! collector trusts the CA it is given (and presents a client certificate for mutual
//! TLS), refuses a server it cannot verify, is refused by a mutual-TLS server when it has
//! no client certificate, and never writes the credentials it sends into its logs.

mod support;

use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use egress_testkit::collector::RunningCollector;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use support::{
    host::require_root,
    receiver::{self, Received, Shared, int_attr},
};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

const COLLECTOR: &str = env!("CARGO_BIN_EXE_egress-collector");
const SECRET: &str = "Bearer s3cret-token-do-not-log";

struct Pki {
    dir: PathBuf,
    ca_pem: String,
    server: (String, String),
}

/// How the collector is set up against the receiver.
struct Setup {
    /// `grpc` or `http/protobuf`.
    protocol: &'static str,
    /// `--otlp-certificate` with the CA.
    trust_ca: bool,
    /// `--otlp-client-certificate` and `--otlp-client-key`.
    client_certificate: bool,
}

impl Pki {
    /// A CA, a server certificate for localhost/127.0.0.1 and a client certificate,
    /// written as PEM files into a fresh directory.
    fn new() -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("egress-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params
                .subject_alt_names
                .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
            let cert = params.signed_by(&key, &ca, &ca_key).expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        let server = leaf(vec!["localhost".into()]);
        let client = leaf(vec!["egress-collector".into()]);
        let ca_pem = ca.pem();
        for (name, text) in [
            ("ca.pem", &ca_pem),
            ("client.pem", &client.0),
            ("client-key.pem", &client.1),
        ] {
            std::fs::write(dir.join(name), text).expect("write");
        }
        Self {
            dir,
            ca_pem,
            server,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The gRPC server's TLS: a client certificate signed by the CA is required.
    fn server_tls(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.server.0, &self.server.1))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// The same for the HTTP server (rustls): a client certificate is required.
    fn server_rustls(&self) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).expect("CA"))
            .expect("root");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .build()
        .expect("client verifier");
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(self.server.0.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(self.server.1.as_bytes()).expect("key"),
            )
            .expect("server config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One connection to a listener of its own; the listener is returned, so that while the
/// caller holds it no other test of this process is given its port (records are
/// counted by it).
fn connect_once() -> (u16, TcpListener) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    drop(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect"));
    (port, listener)
}

fn records_to(received: &Received, port: u16) -> usize {
    received
        .log_records()
        .filter(|l| int_attr(&l.attributes, "destination.port") == Some(i64::from(port)))
        .count()
}

fn run(pki: &Pki, setup: Setup) -> (usize, Vec<String>, Received) {
    require_root();
    let rt = receiver::runtime();
    let received: Shared = Arc::new(Mutex::new(Received::default()));
    let addr = "127.0.0.1:0".parse().expect("addr");
    let receiver = match setup.protocol {
        "grpc" => rt.block_on(receiver::grpc_tls(
            addr,
            Arc::clone(&received),
            pki.server_tls(),
        )),
        _ => rt.block_on(receiver::https(
            addr,
            Arc::clone(&received),
            pki.server_rustls(),
        )),
    };
    let endpoint = format!("https://localhost:{}", receiver.addr.port());
    let header = format!("authorization={SECRET}");
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client-key.pem"),
    );
    let mut args = vec![
        "--otlp-endpoint",
        &endpoint,
        "--otlp-protocol",
        setup.protocol,
        "--otlp-header",
        &header,
        "--batch-timeout",
        "200ms",
        "--log-level",
        "debug",
    ];
    if setup.client_certificate {
        args.extend([
            "--otlp-client-certificate",
            &cert,
            "--otlp-client-key",
            &key,
        ]);
    }
    if setup.trust_ca {
        args.extend(["--otlp-certificate", &ca]);
    }
    let collector =
        RunningCollector::start_with(Path::new(COLLECTOR), &args, Duration::from_secs(60))
            .expect("collector starts");
    let (port, _listener) = connect_once();
    std::thread::sleep(Duration::from_secs(2));
    let (_, _, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    let received = std::mem::take(&mut *received.lock().expect("lock"));
    (records_to(&received, port), stderr, received)
}

fn the_given_ca_is_trusted_an_unknown_one_is_not_a_missing_client_certificate_is_refused(
    protocol: &'static str,
) {
    let pki = Pki::new();

    let (arrived, stderr, received) = run(
        &pki,
        Setup {
            protocol,
            trust_ca: true,
            client_certificate: true,
        },
    );
    assert_eq!(
        arrived,
        1,
        "{protocol} over mutual TLS:\n{}",
        stderr.join("\n")
    );
    assert!(
        received
            .headers
            .iter()
            .any(|(k, v)| k == "authorization" && v == SECRET),
        "the header reaches the endpoint"
    );
    assert!(
        stderr.iter().all(|l| !l.contains("s3cret")),
        "credentials never appear in the logs"
    );

    let (arrived, stderr, _) = run(
        &pki,
        Setup {
            protocol,
            trust_ca: false,
            client_certificate: true,
        },
    );
    assert_eq!(
        arrived, 0,
        "{protocol}: a server the system roots do not vouch for gets nothing"
    );
    let log = stderr.join("\n");
    assert!(
        log.contains("OTLP export failed") || log.contains("could not be exported"),
        "the failure is logged:\n{log}"
    );
    assert!(
        !log.contains("s3cret"),
        "credentials never appear in the logs"
    );

    let (arrived, stderr, received) = run(
        &pki,
        Setup {
            protocol,
            trust_ca: true,
            client_certificate: false,
        },
    );
    let log = stderr.join("\n");
    assert_eq!(
        arrived, 0,
        "{protocol}: mutual TLS refuses a collector without a client certificate:\n{log}"
    );
    assert!(
        received.logs.is_empty() && received.headers.is_empty(),
        "{protocol}: no request got through"
    );
    assert!(
        log.contains("OTLP export failed") || log.contains("could not be exported"),
        "the refusal is logged:\n{log}"
    );
    assert!(
        !log.contains("s3cret"),
        "credentials never appear in the logs"
    );
}

#[test]
fn grpc_over_tls_and_mutual_tls() {
    the_given_ca_is_trusted_an_unknown_one_is_not_a_missing_client_certificate_is_refused("grpc");
}

#[test]
fn http_protobuf_over_tls_and_mutual_tls() {
    the_given_ca_is_trusted_an_unknown_one_is_not_a_missing_client_certificate_is_refused(
        "http/protobuf",
    );
}
