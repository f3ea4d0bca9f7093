//! `chaos`: a deliberately faulty projection, built to wasm like the others so
//! the runtime's refusal tests run real Rust code. Each event type misbehaves in
//! one way; `Note` is the only well-behaved one.

use kiln_sdk::{Error, Event, Projection, Result, View};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub enum ChaosEvent {
    /// Writes `{"text": ..}` at `note/<stream>`.
    Note { text: String },
    /// Panics with `message`.
    Panic { message: String },
    /// Returns an error with `message`.
    Fail { message: String },
    /// Never returns.
    Spin {},
    /// Allocates `mib` MiB and keeps it.
    Hog { mib: u64 },
}

pub struct Chaos;

impl Projection for Chaos {
    const NAME: &'static str = "chaos";
    type Event = ChaosEvent;

    fn handle(e: &Event<'_, ChaosEvent>, view: &mut View<'_>) -> Result<()> {
        match &e.data {
            ChaosEvent::Note { text } => view.put(
                &format!("note/{}", e.stream),
                &serde_json::json!({ "text": text }),
            ),
            ChaosEvent::Panic { message } => panic!("{message}"),
            ChaosEvent::Fail { message } => Err(Error::msg(message)),
            ChaosEvent::Spin {} => {
                let mut n = 0u64;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            ChaosEvent::Hog { mib } => {
                let mut hoard = Vec::new();
                for _ in 0..*mib {
                    hoard.push(std::hint::black_box(vec![1u8; 1 << 20]));
                }
                view.put("hog", &hoard.len())
            }
        }
    }
}

kiln_sdk::export!(Chaos);

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_sdk::Harness;

    #[test]
    fn notes_are_written_and_failures_reported() {
        let mut h = Harness::<Chaos>::new();
        h.event("s-1", "Note", serde_json::json!({"text": "hi"}))
            .unwrap();
        assert_eq!(h.json("note/s-1").unwrap()["text"], "hi");
        let err = h
            .event("s-1", "Fail", serde_json::json!({"message": "nope"}))
            .err()
            .unwrap();
        assert_eq!((err.position, err.message.as_str()), (2, "nope"));
    }
}
