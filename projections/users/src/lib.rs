//! `users`: one profile document per user stream (`user-<id>`), in the SDK's
//! per-stream form: `apply(profile, event) -> profile`.

use kiln_sdk::{Event, PerStream, StreamProjection};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
pub enum UserEvent {
    UserRegistered { name: String, email: String },
    UserRenamed { name: String },
    EmailChanged { email: String },
    UserLoggedIn {},
    LoginFailed {},
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub id: String,
    pub name: String,
    pub email: String,
    pub registered_at: u64,
    pub renames: u32,
    pub logins: u64,
    pub failed_logins: u64,
    pub last_login: Option<u64>,
}

pub struct Users;

impl StreamProjection for Users {
    const NAME: &'static str = "users";
    const EVENTS: &'static [&'static str] = &[
        "UserRegistered",
        "UserRenamed",
        "EmailChanged",
        "UserLoggedIn",
        "LoginFailed",
    ];
    const CATEGORIES: &'static [&'static str] = &["user"];
    type Event = UserEvent;
    type State = Profile;

    fn apply(mut p: Profile, e: &Event<'_, UserEvent>) -> Profile {
        match &e.data {
            UserEvent::UserRegistered { name, email } => {
                p.id = e.stream_key().to_string();
                p.name.clone_from(name);
                p.email.clone_from(email);
                p.registered_at = e.timestamp;
            }
            UserEvent::UserRenamed { name } => {
                p.name.clone_from(name);
                p.renames += 1;
            }
            UserEvent::EmailChanged { email } => p.email.clone_from(email),
            UserEvent::UserLoggedIn {} => {
                p.logins += 1;
                p.last_login = Some(e.timestamp);
            }
            UserEvent::LoginFailed {} => p.failed_logins += 1,
        }
        p
    }
}

/// The exported projection.
pub type Projection = PerStream<Users>;

kiln_sdk::export!(PerStream<Users>);

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_sdk::Harness;
    use serde_json::json;

    #[test]
    fn profile_follows_registration_rename_email_and_logins() {
        let mut h = Harness::<Projection>::new();
        h.event(
            "user-1",
            "UserRegistered",
            json!({"name": "Ada", "email": "ada@x.io"}),
        )
        .unwrap()
        .event("user-1", "UserLoggedIn", json!({}))
        .unwrap()
        .event("user-1", "LoginFailed", json!({}))
        .unwrap()
        .event("user-1", "UserRenamed", json!({"name": "Ada L."}))
        .unwrap()
        .event("user-1", "EmailChanged", json!({"email": "ada@l.io"}))
        .unwrap()
        .event("user-1", "UserLoggedIn", json!({}))
        .unwrap();
        let p: Profile = h.doc("user-1").unwrap();
        assert_eq!(
            p,
            Profile {
                id: "1".into(),
                name: "Ada L.".into(),
                email: "ada@l.io".into(),
                registered_at: 1,
                renames: 1,
                logins: 2,
                failed_logins: 1,
                last_login: Some(6),
            }
        );
    }

    #[test]
    fn users_are_independent_and_other_categories_ignored() {
        let mut h = Harness::<Projection>::new();
        h.event(
            "user-1",
            "UserRegistered",
            json!({"name": "A", "email": "a@x"}),
        )
        .unwrap()
        .event(
            "user-2",
            "UserRegistered",
            json!({"name": "B", "email": "b@x"}),
        )
        .unwrap()
        .event("admin-1", "UserLoggedIn", json!({}))
        .unwrap()
        .event("user-2", "SomethingElse", json!({}))
        .unwrap();
        assert_eq!(h.doc::<Profile>("user-2").unwrap().name, "B");
        assert_eq!(h.doc::<Profile>("user-1").unwrap().logins, 0);
        assert_eq!(h.documents().len(), 2);
    }

    #[test]
    fn malformed_event_data_names_the_position() {
        let mut h = Harness::<Projection>::new();
        let err = h
            .event("user-1", "UserRenamed", json!({"nom": "x"}))
            .err()
            .unwrap();
        assert_eq!(err.position, 1);
        assert!(err.message.contains("missing field `name`"), "{err}");
    }
}
