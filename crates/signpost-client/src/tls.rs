//! TLS from a balanced channel to its instances: the CA that signed their certificates, a
//! client certificate for instances that require one, and the name to check.

use std::sync::Arc;

use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::{Error, Result};

/// How a balanced channel speaks TLS to its instances; set with
/// [`BalancedChannelBuilder::tls`](crate::BalancedChannelBuilder::tls).
#[derive(Clone)]
pub struct InstanceTls {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
}

impl std::fmt::Debug for InstanceTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of logs.
        f.debug_struct("InstanceTls")
            .field("client_certificate", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl InstanceTls {
    /// Trusts the CA (PEM) that signed the instances' certificates. Each instance's
    /// certificate is checked against its registered address (an IP address or a host name),
    /// unless [`domain`](Self::domain) names another.
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> Self {
        InstanceTls {
            ca_pem: ca_pem.into(),
            identity: None,
            domain: None,
        }
    }

    /// Presents this certificate (PEM chain and key) to instances that require mutual TLS.
    pub fn identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Checks every instance's certificate against this name instead of its address.
    pub fn domain(mut self, name: impl Into<String>) -> Self {
        self.domain = Some(name.into());
        self
    }

    /// The connector, with HTTP/2 negotiated by ALPN.
    pub(crate) fn connector(&self) -> Result<Tls> {
        let invalid = |what: &str, e: &dyn std::fmt::Display| {
            Error::InvalidArgument(format!("instance TLS: {what}: {e}"))
        };
        let mut roots = RootCertStore::empty();
        let mut any = false;
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let cert = cert.map_err(|e| invalid("the CA certificate is not valid PEM", &e))?;
            roots
                .add(cert)
                .map_err(|e| invalid("the CA certificate is not usable", &e))?;
            any = true;
        }
        if !any {
            return Err(Error::InvalidArgument(
                "instance TLS: the CA PEM holds no certificate".into(),
            ));
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("no protocol version", &e))?
        .with_root_certificates(roots);
        let mut config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((cert_pem, key_pem)) => {
                let chain = CertificateDer::pem_slice_iter(cert_pem)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| invalid("the client certificate is not valid PEM", &e))?;
                let key = PrivateKeyDer::from_pem_slice(key_pem)
                    .map_err(|e| invalid("the client key is not valid PEM", &e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| invalid("the client certificate and key do not fit", &e))?
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let domain = match &self.domain {
            None => None,
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|e| invalid(&format!("{name:?} is not a name to check"), &e))?,
            ),
        };
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(config)),
            domain,
        })
    }
}

/// A ready TLS connector and the name override.
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) connector: TlsConnector,
    pub(crate) domain: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// The name an instance at `host` must prove.
    pub(crate) fn server_name(
        &self,
        host: &str,
    ) -> std::result::Result<ServerName<'static>, String> {
        match &self.domain {
            Some(name) => Ok(name.clone()),
            None => ServerName::try_from(host.to_owned())
                .map_err(|e| format!("{host:?} cannot be checked against a certificate: {e}")),
        }
    }
}
