//! OTLP over TLS against a local certificate authority: the collector trusts the CA it
//! is given (and presents a client certificate for mutual TLS), refuses a server it
//! cannot verify, and never writes the credentials it sends into its logs.

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

impl Pki {
    /// A CA, a server certificate for localhost/127.0.0.1 and a client certificate,
    /// written as PEM files into a fresh directory.
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("egress-tls-{}", std::process::id()));
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

    fn server_tls(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.server.0, &self.server.1))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn connect_once() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    drop(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect"));
    port
}

fn records_to(received: &Received, port: u16) -> usize {
    received
        .log_records()
        .filter(|l| int_attr(&l.attributes, "destination.port") == Some(i64::from(port)))
        .count()
}

fn run(pki: &Pki, trust_ca: bool) -> (usize, Vec<String>, Received) {
    require_root();
    let rt = receiver::runtime();
    let received: Shared = Arc::new(Mutex::new(Received::default()));
    let receiver = rt.block_on(receiver::grpc_tls(
        "127.0.0.1:0".parse().expect("addr"),
        Arc::clone(&received),
        pki.server_tls(),
    ));
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
        "--otlp-header",
        &header,
        "--otlp-client-certificate",
        &cert,
        "--otlp-client-key",
        &key,
        "--batch-timeout",
        "200ms",
        "--log-level",
        "debug",
    ];
    if trust_ca {
        args.extend(["--otlp-certificate", &ca]);
    }
    let collector =
        RunningCollector::start_with(Path::new(COLLECTOR), &args, Duration::from_secs(60))
            .expect("collector starts");
    let port = connect_once();
    std::thread::sleep(Duration::from_secs(2));
    let (_, _, stderr) = collector
        .stop(Duration::from_secs(30))
        .expect("collector stops");
    let received = std::mem::take(&mut *received.lock().expect("lock"));
    (records_to(&received, port), stderr, received)
}

#[test]
fn the_given_ca_is_trusted_an_unknown_one_is_not_and_credentials_stay_out_of_logs() {
    let pki = Pki::new();

    let (arrived, stderr, received) = run(&pki, true);
    assert_eq!(arrived, 1, "over mutual TLS:\n{}", stderr.join("\n"));
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

    let (arrived, stderr, _) = run(&pki, false);
    assert_eq!(
        arrived, 0,
        "a server the system roots do not vouch for gets nothing"
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
}
