//! A Greeter that registers itself with Signpost, answers with its own instance id, and
//! deregisters on Ctrl-C before it stops.
//!
//! `cargo run -p signpost-examples --bin greeter-server -- --port 0`

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use signpost_client::{Client, RegistrationBuilder};
use signpost_examples::{Greeter, bind};

#[derive(Debug, Parser)]
struct Args {
    /// The registry.
    #[arg(
        long,
        env = "SIGNPOST_REGISTRY",
        default_value = "http://127.0.0.1:7070"
    )]
    registry: String,
    /// Address to listen on and register.
    #[arg(long, default_value = "127.0.0.1")]
    address: String,
    /// Port to listen on; 0 picks a free one, and that is the port registered.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Lease ttl.
    #[arg(long, default_value_t = 10)]
    ttl_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let (listener, bound) = bind(&args.address, args.port)
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.address, args.port))?;
    let id = format!("greeter-{}", bound.port());
    let client = Client::builder()
        .registry(args.registry.clone())
        .security_from_env()?
        .build()?;
    let registration = client
        .register(
            RegistrationBuilder::new("greeter")
                .id(&id)
                .address(&args.address)
                .port(bound.port())
                .ttl(Duration::from_secs(args.ttl_secs)),
        )
        .await
        .with_context(|| format!("cannot register with {}", args.registry))?;
    println!("{id} serving on {bound}, registered with {}", args.registry);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(Greeter::new(&id).serve(listener, async {
        let _ = stop_rx.await;
    }));
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    // Leave the registry first, so callers stop sending here, then finish in-flight calls.
    let existed = registration.deregister().await?;
    println!("{id} deregistered (existed: {existed}); stopping");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_tx.send(());
    server.await.context("server task")??;
    Ok(())
}
