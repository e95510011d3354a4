//! A Greeter that registers itself with Signpost, answers with its own instance id, and on
//! SIGTERM or SIGINT (Ctrl-C) deregisters before it stops.
//!
//! `cargo run -p signpost-examples --bin greeter-server -- --port 0`

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use signpost_client::{Client, RegistrationBuilder, shutdown_signal};
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
    /// How long to keep serving after deregistering, before new calls are refused. Callers hear
    /// of the removal through their watches within milliseconds; this covers the calls they
    /// had already sent this way.
    #[arg(long, default_value_t = 200)]
    drain_ms: u64,
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
    // Listening for signals from the start: one that arrived while registering would otherwise
    // end the process with its instance still in the registry.
    let mut signal = tokio::spawn(shutdown_signal());
    let (listener, bound) = bind(&args.address, args.port)
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.address, args.port))?;
    let id = format!("greeter-{}", bound.port());
    let client = Client::builder()
        .registry(args.registry.clone())
        .security_from_env()?
        .build()?;
    let registering = client.register(
        RegistrationBuilder::new("greeter")
            .id(&id)
            .address(&args.address)
            .port(bound.port())
            .ttl(Duration::from_secs(args.ttl_secs)),
    );
    // Registering waits out an unreachable registry; a signal meanwhile is a stop all the same.
    let registration = tokio::select! {
        registration = registering => {
            registration.with_context(|| format!("cannot register with {}", args.registry))?
        }
        received = &mut signal => {
            let received = received.context("waiting for a signal")?.context("cannot listen for signals")?;
            println!("{id} stopped on {received} before it was registered");
            return Ok(());
        }
    };
    println!("{id} serving on {bound}, registered with {}", args.registry);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(Greeter::new(&id).serve(listener, async {
        let _ = stop_rx.await;
    }));
    let received = (&mut signal)
        .await
        .context("waiting for a signal")?
        .context("cannot listen for signals")?;
    // Leave the registry first, so callers stop sending here, then finish in-flight calls.
    let existed = registration.deregister().await?;
    println!("{id} deregistered (existed: {existed}) on {received}; stopping");
    tokio::time::sleep(Duration::from_millis(args.drain_ms)).await;
    let _ = stop_tx.send(());
    // The signal handlers stay installed, so a second signal would do nothing by itself: it
    // ends the wait for slow in-flight calls instead.
    tokio::select! {
        result = server => result.context("server task")??,
        again = shutdown_signal() => {
            let again = again.context("cannot listen for signals")?;
            anyhow::bail!("{again} while finishing in-flight calls; stopping at once");
        }
    }
    Ok(())
}
