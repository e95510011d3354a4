//! `signpost xds-bootstrap`: the bootstrap file a gRPC client's xDS support reads to use the
//! registry as its control plane (`GRPC_XDS_BOOTSTRAP=file`, then `xds:///service` targets).

use std::path::{Path, PathBuf};

use anyhow::Context;
use signpost_server::xds::{Bootstrap, BootstrapTls};

#[derive(Debug, clap::Args)]
pub struct XdsBootstrapArgs {
    /// The registry the clients will reach, as they reach it (its port serves xDS).
    #[arg(
        long,
        env = "SIGNPOST_REGISTRY",
        default_value = "http://127.0.0.1:7070"
    )]
    registry: String,
    /// The namespace that plain targets (`xds:///greeter`) are looked up in; other namespaces
    /// are named in the target: `xds:///greeter.payments.svc`.
    #[arg(short = 'n', long, env = "SIGNPOST_NAMESPACE")]
    namespace: Option<String>,
    /// The client's node id, as the registry's logs name it.
    #[arg(long, default_value = "signpost-xds-client")]
    node_id: String,
    /// The client's zone (its node locality).
    #[arg(long, env = "SIGNPOST_ZONE")]
    zone: Option<String>,
    /// Reach the registry over TLS and trust this CA (PEM) for its certificate.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// The client certificate (PEM) for a registry that requires mutual TLS; needs --client-key.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The key of --client-cert (PEM).
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
}

/// Files named in a bootstrap are opened by the client, from wherever it runs: absolute paths.
fn absolute(path: &Path, flag: &str) -> anyhow::Result<String> {
    let path = std::fs::canonicalize(path)
        .with_context(|| format!("{flag} {}: cannot be read", path.display()))?;
    Ok(path.display().to_string())
}

pub fn bootstrap(args: XdsBootstrapArgs) -> anyhow::Result<()> {
    let uri: http::Uri = args
        .registry
        .parse()
        .with_context(|| format!("--registry {:?} is not a URL", args.registry))?;
    let tls_scheme = uri.scheme_str() == Some("https");
    let Some(authority) = uri.authority() else {
        anyhow::bail!("--registry {:?} names no host", args.registry);
    };
    let port = authority
        .port_u16()
        .unwrap_or(if tls_scheme { 443 } else { 80 });
    if tls_scheme && args.ca_cert.is_none() {
        anyhow::bail!("--registry is https: give --ca-cert, the CA that signed its certificate");
    }
    if args.client_cert.is_some() && args.ca_cert.is_none() {
        anyhow::bail!("--client-cert needs --ca-cert: mutual TLS is over TLS");
    }
    let tls = match &args.ca_cert {
        None => None,
        Some(ca) => Some(BootstrapTls {
            ca_certificate_file: absolute(ca, "--ca-cert")?,
            certificate_file: args
                .client_cert
                .as_deref()
                .map(|p| absolute(p, "--client-cert"))
                .transpose()?,
            private_key_file: args
                .client_key
                .as_deref()
                .map(|p| absolute(p, "--client-key"))
                .transpose()?,
        }),
    };
    let bootstrap = Bootstrap {
        server_uri: format!("{}:{port}", authority.host()),
        node_id: args.node_id,
        namespace: args.namespace,
        zone: args.zone,
        tls,
    };
    println!("{}", bootstrap.to_json());
    Ok(())
}
