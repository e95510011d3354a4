//! Certificates made in the test: a CA, a server certificate for localhost and 127.0.0.1, and
//! client certificates, all PEM.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::must;

/// A CA and what it signed.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl Pki {
    /// A fresh CA with a server and a client certificate; each call makes a different CA.
    pub fn new(name: &str) -> Pki {
        let ca_key = must(KeyPair::generate(), "CA key");
        let mut ca = must(CertificateParams::new(Vec::<String>::new()), "CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = must(ca.self_signed(&ca_key), "CA certificate");
        let issuer = Issuer::new(ca, &ca_key);

        let server_key = must(KeyPair::generate(), "server key");
        let mut server = must(
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]),
            "server params",
        );
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = must(server.signed_by(&server_key, &issuer), "server certificate");

        let client_key = must(KeyPair::generate(), "client key");
        let mut client = must(
            CertificateParams::new(vec!["client.signpost.test".to_owned()]),
            "client params",
        );
        client.distinguished_name.push(DnType::CommonName, "client");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = must(client.signed_by(&client_key, &issuer), "client certificate");

        Pki {
            ca_pem: ca_cert.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        }
    }

    /// The server's TLS settings; with `mutual`, clients must present a certificate of this CA.
    pub fn server_tls(&self, mutual: bool) -> signpost_server::Tls {
        signpost_server::Tls {
            cert_pem: self.server_cert_pem.clone().into_bytes(),
            key_pem: self.server_key_pem.clone().into_bytes(),
            client_ca_pem: mutual.then(|| self.ca_pem.clone().into_bytes()),
        }
    }

    /// Writes every PEM into `dir` (ca.pem, server.pem, server.key, client.pem, client.key).
    pub fn write(&self, dir: &std::path::Path) {
        for (name, pem) in [
            ("ca.pem", &self.ca_pem),
            ("server.pem", &self.server_cert_pem),
            ("server.key", &self.server_key_pem),
            ("client.pem", &self.client_cert_pem),
            ("client.key", &self.client_key_pem),
        ] {
            must(std::fs::write(dir.join(name), pem), "write a PEM file");
        }
    }
}
