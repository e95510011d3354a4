//! Calls the Greeter through a channel balanced over every registered instance, printing which
//! instance answered each call.
//!
//! `cargo run -p signpost-examples --bin greeter-client -- --count 10`

use std::time::Duration;

use clap::Parser;
use signpost_client::Client;
use signpost_examples::pb::SayHelloRequest;
use signpost_examples::pb::greeter_service_client::GreeterServiceClient;

#[derive(Debug, Parser)]
struct Args {
    /// The registry.
    #[arg(
        long,
        env = "SIGNPOST_REGISTRY",
        default_value = "http://127.0.0.1:7070"
    )]
    registry: String,
    /// Calls to make; 0 for no end.
    #[arg(long, default_value_t = 10)]
    count: u64,
    /// Pause between calls, in milliseconds.
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::builder()
        .registry(args.registry)
        .security_from_env()?
        .build()?;
    let greeters = client.channel("greeter");
    greeters.wait_for_ready(Duration::from_secs(10)).await?;
    let mut greeter = GreeterServiceClient::new(greeters.channel());
    let mut n = 0;
    while args.count == 0 || n < args.count {
        n += 1;
        match greeter
            .say_hello(SayHelloRequest {
                name: format!("call {n}"),
            })
            .await
        {
            Ok(answer) => println!("call {n}: answered by {}", answer.into_inner().instance_id),
            Err(status) => println!("call {n}: failed: {}", status.message()),
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    Ok(())
}
