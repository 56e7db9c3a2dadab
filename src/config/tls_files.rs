//! The TLS files the config names, read and checked before any socket is opened: the
//! listener's certificate chain and key (also re-read on reload), and the CA certificates an
//! `https://` upstream is trusted by.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::ring::default_provider;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate this close to its expiry is warned about at load and reload.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// A certificate chain and its private key, read and checked to belong together, with the
/// leaf's expiry. Plain data: the listener builds its TLS settings from it.
#[derive(Clone)]
pub struct Certificate {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// The leaf certificate's notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only the expiry: never the private key.
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
        let certificate = Self {
            chain,
            key: Arc::new(private_key),
            not_after,
        };
        certificate.server_config().map_err(|e| {
            problem(
                Which::Key,
                format!(
                    "{} does not fit {} ({e}); give the key the certificate was issued for",
                    key.display(),
                    cert.display()
                ),
            )
        })?;
        Ok(certificate)
    }

    /// rustls server settings serving this certificate (TLS 1.3 and 1.2, no client
    /// certificates); the listener adds its ALPN protocols.
    pub fn server_config(&self) -> Result<ServerConfig, rustls::Error> {
        ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
    }

    /// "expires in 23 days", "expired 2 days ago": for `keygate check` and the logs.
    pub fn expiry(&self) -> String {
        describe_expiry(self.not_after, unix_now())
    }

    pub fn expires_soon(&self) -> bool {
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

/// The certificates in `path`, the only roots an `https://` upstream is trusted by (a private
/// CA); each is checked to be usable as a trust anchor.
pub(crate) fn ca_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no CERTIFICATE block; give the CA certificate(s) in PEM",
            path.display()
        ));
    }
    let mut roots = RootCertStore::empty();
    for cert in &certs {
        roots
            .add(cert.clone())
            .map_err(|e| format!("{}: a certificate is not usable: {e}", path.display()))?;
    }
    Ok(certs)
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
