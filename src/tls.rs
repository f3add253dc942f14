//! TLS client settings for the upstream: the built-in web roots, plus extra PEM roots
//! from a file (a TLS-inspecting corporate proxy's CA, a private CA in tests).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// The certificates in a PEM file; an error names the file and says what is wrong.
pub fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = crate::shown::path(path);
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {shown}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{shown} is not a PEM file of certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{shown} holds no PEM certificate"));
    }
    Ok(certs)
}

/// A client configuration trusting the web's roots and those in `ca_file`.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        for cert in read_roots(path)? {
            roots.add(cert).map_err(|e| {
                format!(
                    "{}: a certificate is not usable as a root: {e}",
                    crate::shown::path(path)
                )
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Whether an error chain says the peer's certificate was not trusted.
pub fn untrusted_certificate(chain: &str) -> bool {
    chain.contains("invalid peer certificate")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_file_is_named() {
        let e = read_roots(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let dir = std::env::temp_dir().join(format!("tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = read_roots(&empty).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        assert!(client_config(Some(&empty)).is_err());
        assert!(client_config(None).is_ok());
    }
}
