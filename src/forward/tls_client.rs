//! Client TLS settings for an `https://` upstream: the CA certificates of `[upstream]
//! ca_file` as the only roots when set (a private CA), the webpki roots (Mozilla's list,
//! built in, so a distroless image needs no CA bundle) otherwise.

use std::sync::Arc;

use rustls::crypto::ring::default_provider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;

/// Client settings trusting the CA certificates given, or the webpki roots without any.
pub(crate) fn upstream_client(ca: Option<&[CertificateDer<'static>]>) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    match ca {
        // Each was added to a store once already when the config was checked.
        Some(certs) => roots.add_parsable_certificates(certs.iter().cloned()),
        None => {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            (0, 0)
        }
    };
    client_trusting(roots)
}

/// Client settings trusting exactly `roots`, with the same provider and versions as the
/// listener.
pub(crate) fn client_trusting(roots: RootCertStore) -> ClientConfig {
    ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}
