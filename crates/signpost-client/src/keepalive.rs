//! One KeepAlive stream per client, shared by all its registrations: each lease is refreshed at
//! its own interval, and a lease the registry reports expired is handed back to its owner.
//!
//! The task is one loop over an explicit [`State`]. Each turn waits for either a command from a
//! registration or what the state itself waits on, so adding or removing a lease, and every
//! handle going away, are handled the same way whether the stream is up, being opened, or
//! waiting out a backoff.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use signpost_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::connections::Connections;
use signpost_backoff::Backoff;

/// Requests waiting to go out on the stream. A fresh stream sends one for every lease at once;
/// past this many, the rest wait for room rather than being dropped.
const QUEUED_REQUESTS: usize = 256;

enum Command {
    Add {
        lease: u64,
        every: Duration,
        expired: oneshot::Sender<()>,
    },
    Remove {
        lease: u64,
    },
}

/// A handle on the shared stream. The stream's task ends when every handle is gone.
#[derive(Debug, Clone)]
pub(crate) struct KeepAlives {
    tx: mpsc::UnboundedSender<Command>,
}

struct Entry {
    every: Duration,
    due: Instant,
    expired: oneshot::Sender<()>,
}

impl KeepAlives {
    pub(crate) fn start(conn: Arc<Connections>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(conn, rx));
        KeepAlives { tx }
    }

    /// Refreshes `lease` every `every` until removed; `expired` fires if the registry says the
    /// lease is gone.
    pub(crate) fn add(&self, lease: u64, every: Duration, expired: oneshot::Sender<()>) {
        let _ = self.tx.send(Command::Add {
            lease,
            every,
            expired,
        });
    }

    pub(crate) fn remove(&self, lease: u64) {
        let _ = self.tx.send(Command::Remove { lease });
    }
}

type Opening =
    Pin<Box<dyn Future<Output = Result<Streaming<pb::KeepAliveResponse>, Status>> + Send>>;

/// Where the shared stream stands.
enum State {
    /// No lease to refresh, so no stream.
    Idle,
    /// The last stream broke or could not be opened; the next opens at `retry_at`.
    Disconnected { retry_at: Instant },
    /// A stream is being opened on registry `index`; `requests` feeds it once it is up.
    Connecting {
        index: usize,
        opening: Opening,
        requests: mpsc::Sender<pb::KeepAliveRequest>,
    },
    /// The stream is up: refreshes go out on `requests`, answers come in on `answers` (boxed,
    /// so that the states without a stream stay small).
    Connected {
        requests: mpsc::Sender<pb::KeepAliveRequest>,
        answers: Box<Streaming<pb::KeepAliveResponse>>,
    },
}

/// What ended a turn's wait.
enum Event {
    /// From a registration; `None` once every handle is gone.
    Command(Option<Command>),
    /// The backoff is over (disconnected), or a refresh is due and the stream has room for it
    /// (connected).
    Due,
    /// The stream being opened is up, or could not be opened.
    Opened(Result<Streaming<pb::KeepAliveResponse>, Status>),
    /// The registry answered on the stream.
    Answer(pb::KeepAliveResponse),
    /// The stream ended or failed.
    Broke(String),
}

async fn run(conn: Arc<Connections>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut backoff = conn.new_backoff();
    let mut leases: HashMap<u64, Entry> = HashMap::new();
    let mut state = State::Idle;
    loop {
        let event = tokio::select! {
            command = commands.recv() => Event::Command(command),
            event = wait(&mut state, &leases) => event,
        };
        state = match (state, event) {
            (_, Event::Command(None)) => return,
            (state, Event::Command(Some(command))) => match apply(&mut leases, command) {
                // Every registration has left: no stream to keep.
                Applied::LastRemoved => State::Idle,
                Applied::Other => state,
            },
            (State::Disconnected { .. }, Event::Due) if leases.is_empty() => State::Idle,
            (State::Disconnected { .. }, Event::Due) => connect(&conn),
            (State::Connected { requests, answers }, Event::Due) => {
                refresh(&mut leases, &requests);
                State::Connected { requests, answers }
            }
            (State::Connecting { requests, .. }, Event::Opened(Ok(answers))) => {
                // The gap may have eaten into the ttls: refresh everything at once.
                let now = Instant::now();
                for entry in leases.values_mut() {
                    entry.due = now;
                }
                State::Connected {
                    requests,
                    answers: Box::new(answers),
                }
            }
            (State::Connecting { index, .. }, Event::Opened(Err(status))) => {
                let error = conn.error(index, status);
                if error.is_transient() {
                    conn.failed(index);
                }
                disconnected(&mut backoff, &error.to_string())
            }
            (state @ State::Connected { .. }, Event::Answer(answer)) => {
                backoff.reset();
                if answer.expired
                    && let Some(entry) = leases.remove(&answer.lease_id)
                {
                    tracing::warn!(lease = answer.lease_id, "registry says the lease expired");
                    let _ = entry.expired.send(());
                }
                state
            }
            (State::Connected { .. }, Event::Broke(reason)) => disconnected(&mut backoff, &reason),
            // Each state's wait yields only its own events; nothing else can arrive.
            (state, _) => state,
        };
        // A stream as soon as there is something to refresh. One whose last lease expired stays
        // open: its registration is about to register again and add a new lease.
        if matches!(state, State::Idle) && !leases.is_empty() {
            state = connect(&conn);
        }
    }
}

/// What `state` waits on this turn, besides the commands every state takes.
async fn wait(state: &mut State, leases: &HashMap<u64, Entry>) -> Event {
    match state {
        State::Idle => std::future::pending().await,
        State::Disconnected { retry_at } => {
            tokio::time::sleep_until(*retry_at).await;
            Event::Due
        }
        State::Connecting { opening, .. } => Event::Opened(opening.await),
        State::Connected { requests, answers } => {
            let due = leases.values().map(|e| e.due).min();
            tokio::select! {
                answer = answers.message() => match answer {
                    Ok(Some(answer)) => Event::Answer(answer),
                    Ok(None) => Event::Broke("the registry ended the stream".into()),
                    Err(status) => Event::Broke(status.message().to_owned()),
                },
                room = async {
                    match due {
                        Some(due) => tokio::time::sleep_until(due).await,
                        None => std::future::pending().await,
                    }
                    // Waiting for room here, not retrying at once, keeps a slow stream from
                    // turning this loop into a spin.
                    requests.reserve().await.map(drop)
                } => match room {
                    Ok(()) => Event::Due,
                    Err(_) => Event::Broke("the stream stopped taking requests".into()),
                },
            }
        }
    }
}

enum Applied {
    LastRemoved,
    Other,
}

fn apply(leases: &mut HashMap<u64, Entry>, command: Command) -> Applied {
    match command {
        Command::Add {
            lease,
            every,
            expired,
        } => {
            leases.insert(
                lease,
                Entry {
                    every,
                    due: Instant::now() + every,
                    expired,
                },
            );
        }
        Command::Remove { lease } => {
            if leases.remove(&lease).is_some() && leases.is_empty() {
                return Applied::LastRemoved;
            }
        }
    }
    Applied::Other
}

/// Starts opening a stream on the registry in use.
fn connect(conn: &Connections) -> State {
    let (requests, outbound) = mpsc::channel(QUEUED_REQUESTS);
    let (index, mut client) = conn.current();
    let opening: Opening = Box::pin(async move {
        client
            .keep_alive(ReceiverStream::new(outbound))
            .await
            .map(tonic::Response::into_inner)
    });
    State::Connecting {
        index,
        opening,
        requests,
    }
}

fn disconnected(backoff: &mut Backoff, reason: &str) -> State {
    let delay = backoff.next_delay();
    tracing::warn!(reason, ?delay, "keep-alive stream down; reconnecting");
    State::Disconnected {
        retry_at: Instant::now() + delay,
    }
}

/// Sends a refresh for every lease that is due, as far as the stream has room; the rest stay due
/// and go out on the next turn.
fn refresh(leases: &mut HashMap<u64, Entry>, requests: &mpsc::Sender<pb::KeepAliveRequest>) {
    let now = Instant::now();
    for (lease, entry) in leases.iter_mut().filter(|(_, e)| e.due <= now) {
        if requests
            .try_send(pb::KeepAliveRequest { lease_id: *lease })
            .is_err()
        {
            break;
        }
        entry.due = now + entry.every;
    }
}
