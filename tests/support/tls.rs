//! TLS for the tests: certificates made on the spot (a CA and leaves it signs), a client
//! that reports what the handshake negotiated, and an https origin that records what it got.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::process::TempDir;
use super::{read_reply, Reply, TestConfig, TlsFiles, DEADLINE};

/// A certificate authority made for one test.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, in PEM, and the certificate's DER to compare with what a
/// client was shown.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Ca {
    /// A CA with a name of its own, so that two CAs in one test are told apart.
    pub fn new() -> Self {
        static MADE: AtomicUsize = AtomicUsize::new(0);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let name = format!("keygate test CA {}", MADE.fetch_add(1, Ordering::Relaxed));
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf for `localhost` and 127.0.0.1, valid for `days` from now.
    pub fn issue(&self, days: u64) -> Leaf {
        self.issue_for(&["localhost", "127.0.0.1"], days)
    }

    /// A leaf for `names`, valid for `days` from now.
    pub fn issue_for(&self, names: &[&str], days: u64) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        params.not_before = epoch + (now - Duration::from_secs(3600));
        params.not_after = epoch + (now + Duration::from_secs(days * 24 * 3600));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

impl Leaf {
    /// Writes `cert.pem` and `key.pem` into `dir` and returns their paths.
    pub fn install(&self, dir: &TempDir) -> TlsFiles {
        TlsFiles {
            cert: dir.write("cert.pem", &self.cert_pem),
            key: dir.write("key.pem", &self.key_pem),
        }
    }
}

/// A keygate terminating TLS with a certificate from `ca` (files in `dir`), run with `config`.
pub async fn start_tls_proxy(ca: &Ca, dir: &TempDir, config: TestConfig) -> super::Proxy {
    let files = ca.issue(30).install(dir);
    super::start_proxy_with(&config.tls(files).text()).await
}

/// The base config with an `https://{host}:{port}{prefix}` upstream trusting `ca_file`.
pub fn https_upstream_config(port: u16, host: &str, prefix: &str, ca_file: &Path) -> TestConfig {
    let placeholder: SocketAddr = "127.0.0.1:9".parse().unwrap();
    TestConfig::new(placeholder)
        .upstream_url(format!("https://{host}:{port}{prefix}"))
        .ca_file(ca_file)
}

fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile_certs(ca_pem) {
        roots.add(cert).unwrap();
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn rustls_pemfile_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// What one TLS exchange showed: the protocol ALPN chose, the certificate the server
/// presented, and the reply.
pub struct TlsReply {
    pub alpn: Option<Vec<u8>>,
    pub server_cert: Vec<u8>,
    pub reply: Reply,
}

/// A TLS connection to `addr` trusting only `ca_pem`, offering `alpn`, for `localhost`.
pub async fn connect(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = TlsConnector::from(client_config(ca_pem, alpn));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(DEADLINE, connector.connect(name, tcp))
        .await
        .expect("handshake within the deadline")
}

/// Sends `req` over a new TLS connection: HTTP/2 when ALPN chose h2, HTTP/1.1 otherwise.
pub async fn send_tls(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[&[u8]],
    mut req: Request<Full<Bytes>>,
) -> TlsReply {
    let stream = connect(addr, ca_pem, alpn).await.expect("TLS handshake");
    let (_, session) = stream.get_ref();
    let negotiated = session.alpn_protocol().map(<[u8]>::to_vec);
    let server_cert = session.peer_certificates().unwrap()[0].to_vec();
    let io = TokioIo::new(stream);
    let response = if negotiated.as_deref() == Some(b"h2") {
        *req.uri_mut() = format!("https://localhost{}", req.uri()).parse().unwrap();
        req.headers_mut().remove("host");
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    };
    TlsReply {
        alpn: negotiated,
        server_cert,
        reply: read_reply(response).await,
    }
}

/// What the https origin saw of one request.
#[derive(Clone)]
pub struct SeenOverTls {
    pub sni: Option<String>,
    pub headers: HeaderMap,
}

/// An HTTP/1.1 origin over TLS with `leaf`'s certificate, answering 200 `secure` and recording
/// the SNI and headers of every request.
pub async fn start_tls_upstream(leaf: &Leaf) -> (SocketAddr, Arc<Mutex<Vec<SeenOverTls>>>) {
    let certs = rustls_pemfile_certs(&leaf.cert_pem);
    let key = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap()
    };
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, record) = (acceptor.clone(), record.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = stream.get_ref().1.server_name().map(str::to_owned);
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = SeenOverTls {
                        sni: sni.clone(),
                        headers: req.headers().clone(),
                    };
                    record.lock().unwrap().push(seen);
                    async move {
                        let mut ok = Response::new(Full::new(Bytes::from_static(b"secure")));
                        *ok.status_mut() = StatusCode::OK;
                        Ok::<_, Infallible>(ok)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}
