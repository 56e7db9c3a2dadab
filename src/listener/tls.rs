//! TLS: the server certificate (PEM chain and key, loaded and checked before any socket is
//! opened, reloaded on SIGHUP or when its files change) with ALPN `h2` and `http/1.1`, and the
//! client settings for `https://` upstreams.
//!
//! Both sides use rustls with the ring provider: TLS 1.3 and 1.2 only (rustls implements
//! nothing older), its default cipher suites, no renegotiation, no compression.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::crypto::ring::default_provider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::config::{FileStamp, WatchedFiles};
use crate::observe::metrics::Metrics;

/// Protocols offered by ALPN, most preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
/// A certificate this close to its expiry is warned about at load and reload.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// A loaded certificate and key, ready to serve, with the leaf's expiry.
#[derive(Clone)]
pub struct Certificate {
    pub config: Arc<ServerConfig>,
    /// The leaf certificate's notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only the expiry: the server config holds the private key.
        f.debug_struct("Certificate")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Which of the two files a loading problem is about, and what is wrong with it.
#[derive(Debug)]
pub struct FileProblem {
    pub file: Which,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Cert,
    Key,
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let which = match self.file {
            Which::Cert => "tls_cert",
            Which::Key => "tls_key",
        };
        write!(f, "{which}: {}", self.message)
    }
}

impl Certificate {
    /// Reads the PEM chain (leaf first) and the private key (PKCS#8, PKCS#1 or SEC1), checks
    /// that they belong together, and builds the server config.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, FileProblem> {
        let problem = |file, message: String| FileProblem { file, message };
        let cert_pem = std::fs::read(cert)
            .map_err(|e| problem(Which::Cert, format!("cannot read {}: {e}", cert.display())))?;
        let key_pem = std::fs::read(key)
            .map_err(|e| problem(Which::Key, format!("cannot read {}: {e}", key.display())))?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| problem(Which::Cert, format!("{} is not PEM: {e}", cert.display())))?;
        let Some(leaf) = chain.first() else {
            return Err(problem(
                Which::Cert,
                format!(
                    "{} holds no CERTIFICATE block; give the PEM chain, leaf first",
                    cert.display()
                ),
            ));
        };
        let not_after = not_after(leaf).map_err(|e| {
            problem(
                Which::Cert,
                format!(
                    "{}: the first certificate cannot be read: {e}",
                    cert.display()
                ),
            )
        })?;
        // The PEM error names only the block type it wanted, never key material.
        let private_key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            problem(
                Which::Key,
                format!(
                    "{} holds no usable private key ({e}); give a PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY",
                    key.display()
                ),
            )
        })?;
        let mut config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, private_key))
            .map_err(|e| {
                problem(
                    Which::Key,
                    format!(
                        "{} does not fit {} ({e}); give the key the certificate was issued for",
                        key.display(),
                        cert.display()
                    ),
                )
            })?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            config: Arc::new(config),
            not_after,
        })
    }

    /// "expires in 23 days", "expired 2 days ago": for `keygate check` and the logs.
    pub fn expiry(&self) -> String {
        describe_expiry(self.not_after, unix_now())
    }

    fn expires_soon(&self) -> bool {
        self.not_after - unix_now() < EXPIRY_WARNING.as_secs() as i64
    }
}

fn not_after(leaf: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    Ok(parsed.validity().not_after.timestamp())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn describe_expiry(not_after: i64, now: i64) -> String {
    const DAY: i64 = 24 * 3600;
    let left = not_after - now;
    match left {
        l if l >= 2 * DAY => format!("expires in {} days", l / DAY),
        l if l >= 0 => format!("expires in {} hours", l / 3600),
        l if l > -2 * DAY => format!("EXPIRED {} hours ago", -l / 3600),
        l => format!("EXPIRED {} days ago", -l / DAY),
    }
}

/// The certificate in force on the TLS listener, swapped whole by a reload: a handshake uses
/// the one it started with, and connections already open are untouched.
pub struct ServerTls {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<Certificate>,
    /// The two files, watched for changes; see [`ServerTls::files_changed`].
    watched: WatchedFiles,
    failed_handshakes: FailedHandshakes,
    metrics: Arc<Metrics>,
}

impl ServerTls {
    pub fn new(settings: &crate::config::Tls, metrics: Arc<Metrics>) -> Self {
        let tls = Self {
            cert_path: settings.cert.clone(),
            key_path: settings.key.clone(),
            current: ArcSwap::from_pointee(settings.certificate.clone()),
            watched: WatchedFiles::new(
                [&settings.cert, &settings.key]
                    .map(|path| (path.clone(), FileStamp::of(path)))
                    .to_vec(),
            ),
            failed_handshakes: FailedHandshakes::default(),
            metrics,
        };
        tls.announce(&settings.certificate, "serving TLS");
        tls
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load().config.clone())
    }

    /// Re-reads the certificate and key. A file that cannot be used keeps the certificate in
    /// force and says why.
    pub fn reload(&self) {
        self.files_changed();
        match Certificate::load(&self.cert_path, &self.key_path) {
            Ok(certificate) => {
                self.announce(&certificate, "TLS certificate reloaded");
                self.current.store(Arc::new(certificate));
                self.metrics.reloaded(true);
            }
            Err(why) => {
                warn!(reason = %why, "TLS certificate reload failed; the previous certificate stays in force");
                self.metrics.reloaded(false);
            }
        }
    }

    fn announce(&self, certificate: &Certificate, message: &str) {
        self.metrics.certificate_expires(certificate.not_after);
        let expiry = certificate.expiry();
        let cert = self.cert_path.display();
        if certificate.expires_soon() {
            warn!(%cert, %expiry, "{message}; the certificate needs renewing");
        } else {
            info!(%cert, %expiry, "{message}");
        }
    }

    /// Whether the certificate or key file changed since the last look.
    pub fn files_changed(&self) -> bool {
        self.watched.changed()
    }

    /// Counts a failed handshake: logged at debug one by one, summed up in one warning per
    /// report interval, and counted in the metrics.
    pub fn handshake_failed(&self, timed_out: bool) {
        self.failed_handshakes.record(timed_out);
        self.metrics.tls_handshake_failed(timed_out);
    }

    pub fn report_failed_handshakes(&self) {
        self.failed_handshakes.report();
    }
}

/// Failed handshakes (scanners, clients that distrust the certificate, old TLS versions) are
/// logged at debug one by one and summarised in one warning per report interval, so a flood
/// of them cannot flood the log.
#[derive(Default)]
struct FailedHandshakes {
    timed_out: AtomicU64,
    refused: AtomicU64,
}

impl FailedHandshakes {
    fn record(&self, timed_out: bool) {
        let counter = if timed_out {
            &self.timed_out
        } else {
            &self.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn report(&self) {
        let timed_out = self.timed_out.swap(0, Ordering::Relaxed);
        let refused = self.refused.swap(0, Ordering::Relaxed);
        if timed_out + refused > 0 {
            warn!(
                timed_out,
                refused, "TLS handshakes failed since the last report (details at debug level)"
            );
        }
    }
}

/// Client settings for an `https://` upstream: the certificates in `ca_file` as the only
/// roots when it is set (a private CA), the webpki roots (Mozilla's list, built in, so a
/// distroless image needs no CA bundle) otherwise.
pub fn upstream_client(ca_file: Option<&Path>) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "{} holds no CERTIFICATE block; give the CA certificate(s) in PEM",
                    path.display()
                ));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: a certificate is not usable: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(client_trusting(roots))
}

/// Client settings trusting exactly `roots`, with the same provider and versions as the
/// listener.
pub fn client_trusting(roots: RootCertStore) -> ClientConfig {
    ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_described_in_days_then_hours() {
        let day = 24 * 3600;
        assert_eq!(describe_expiry(23 * day + 5, 0), "expires in 23 days");
        assert_eq!(describe_expiry(day + 7200, 0), "expires in 26 hours");
        assert_eq!(describe_expiry(-3600, 0), "EXPIRED 1 hours ago");
        assert_eq!(describe_expiry(-5 * day, 0), "EXPIRED 5 days ago");
    }
}
