//! The TLS listener: the server certificate with ALPN `h2` and `http/1.1`, swapped whole when
//! a reload (SIGHUP, or a change of its files) reads a usable new one, and the accounting of
//! failed handshakes.
//!
//! rustls with the ring provider: TLS 1.3 and 1.2 only (rustls implements nothing older),
//! its default cipher suites, no renegotiation, no compression.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::config::tls_files::Certificate;
use crate::config::{FileStamp, WatchedFiles};
use crate::observe::metrics::Metrics;

/// Protocols offered by ALPN, most preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The certificate in force on the TLS listener, swapped whole by a reload: a handshake uses
/// the one it started with, and connections already open are untouched.
pub(crate) struct ServerTls {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<ServerConfig>,
    /// The two files, watched for changes; see [`ServerTls::files_changed`].
    watched: WatchedFiles,
    failed_handshakes: FailedHandshakes,
    metrics: Arc<Metrics>,
}

impl ServerTls {
    /// The listener's TLS settings; fails only if rustls refuses what the config already
    /// checked.
    pub(crate) fn new(
        settings: &crate::config::Tls,
        metrics: Arc<Metrics>,
    ) -> Result<Self, rustls::Error> {
        let tls = Self {
            cert_path: settings.cert.clone(),
            key_path: settings.key.clone(),
            current: ArcSwap::from_pointee(serving(&settings.certificate)?),
            watched: WatchedFiles::new(
                [&settings.cert, &settings.key]
                    .map(|path| (path.clone(), FileStamp::of(path)))
                    .to_vec(),
            ),
            failed_handshakes: FailedHandshakes::default(),
            metrics,
        };
        tls.announce(&settings.certificate, "serving TLS");
        Ok(tls)
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// Re-reads the certificate and key. A file that cannot be used keeps the certificate in
    /// force and says why.
    pub(crate) fn reload(&self) {
        self.files_changed();
        let loaded = Certificate::load(&self.cert_path, &self.key_path)
            .map_err(|problem| problem.to_string())
            .and_then(|certificate| {
                let config = serving(&certificate).map_err(|e| e.to_string())?;
                Ok((certificate, config))
            });
        match loaded {
            Ok((certificate, config)) => {
                self.announce(&certificate, "TLS certificate reloaded");
                self.current.store(Arc::new(config));
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
    pub(crate) fn files_changed(&self) -> bool {
        self.watched.changed()
    }

    /// Counts a failed handshake: logged at debug one by one, summed up in one warning per
    /// report interval, and counted in the metrics.
    pub(crate) fn handshake_failed(&self, timed_out: bool) {
        self.failed_handshakes.record(timed_out);
        self.metrics.tls_handshake_failed(timed_out);
    }

    pub(crate) fn report_failed_handshakes(&self) {
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

/// The server settings for `certificate`, with keygate's ALPN protocols.
fn serving(certificate: &Certificate) -> Result<ServerConfig, rustls::Error> {
    let mut config = certificate.server_config()?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
