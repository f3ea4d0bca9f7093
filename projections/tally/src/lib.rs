//! `tally`: counts every event it is given into one document, `all`, and
//! each stream's own into `stream/<stream id>`. Its `all` gathers
//! every stream, yet it declares `per_stream`: the broken promise the host's
//! check (`views::owners`) is tested with. The SDK's per-stream form cannot
//! express it (it keys each document by its stream); a general projection
//! has to write `PER_STREAM = true` out, as here. Not an example to follow:
//! `scripts/build-projections` leaves it out, as it does `chaos`.

use kiln_sdk::{Event, Projection, Result, View};
use serde::{Deserialize, Serialize};

/// What it counts: `Tick`, and the `users` example's event types (the
/// lifecycle model test runs it under the name `users`, over their log).
/// Struct variants with no fields take any object as data.
#[derive(Debug, Deserialize)]
pub enum TallyEvent {
    Tick {},
    UserRegistered {},
    UserRenamed {},
    EmailChanged {},
    UserLoggedIn {},
    LoginFailed {},
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Count {
    pub events: u64,
    /// The position of the last event counted: an order-dependent field, so
    /// a document built from interleavings other than the log's shows it.
    pub last_position: u64,
}

pub struct Tally;

impl Projection for Tally {
    const NAME: &'static str = "tally";
    /// Wrong on purpose: `all` depends on every stream's events.
    const PER_STREAM: bool = true;
    type Event = TallyEvent;

    fn handle(e: &Event<'_, TallyEvent>, view: &mut View<'_>) -> Result<()> {
        let count = |c: &mut Count| {
            c.events += 1;
            c.last_position = e.position;
        };
        view.update("all", count)?;
        view.update(&format!("stream/{}", e.stream), count)
    }
}

kiln_sdk::export!(Tally);
