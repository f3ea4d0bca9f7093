//! Typed events: a projection's event enum is decoded from the event's type
//! (the variant name) and its JSON data (the variant's content).
//!
//! ```
//! #[derive(serde::Deserialize)]
//! enum UserEvent {
//!     UserRegistered { name: String, email: String },
//!     UserLoggedIn {},
//! }
//! # let _ = (UserEvent::UserLoggedIn {}, UserEvent::UserRegistered { name: String::new(), email: String::new() });
//! ```
//!
//! An event of type `UserRegistered` with data `{"name":"Ada","email":"a@x"}`
//! decodes to `UserEvent::UserRegistered { .. }`; rename variants with
//! `#[serde(rename = "user.registered")]` when types are not Rust identifiers.

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, VariantAccess, Visitor,
};

use crate::abi::{Metadata, RawEvent};

/// An event handed to a projection: the log's envelope around typed data.
#[derive(Debug, Clone)]
pub struct Event<'a, E> {
    /// Stream id, e.g. `user-42`.
    pub stream: &'a str,
    /// The event's type, e.g. `UserRegistered`.
    pub event_type: &'a str,
    /// Global position in the log.
    pub position: u64,
    /// Version within its stream (1-based).
    pub version: u64,
    /// Commit time, milliseconds since the Unix epoch (from the log, so replays
    /// see the same value).
    pub timestamp: u64,
    pub metadata: Metadata<'a>,
    pub data: E,
}

impl<'a, E> Event<'a, E> {
    /// The stream's category: the part of its id before the first `-`.
    pub fn category(&self) -> &'a str {
        self.stream.split('-').next().unwrap_or(self.stream)
    }

    /// The stream id after the first `-` (`42` for `user-42`), or the whole id.
    pub fn stream_key(&self) -> &'a str {
        self.stream.split_once('-').map_or(self.stream, |(_, k)| k)
    }
}

/// Decodes `raw`'s type and data into `E`.
pub fn decode<'a, E: de::DeserializeOwned>(
    raw: &RawEvent<'a>,
) -> Result<Event<'a, E>, serde_json::Error> {
    let data = E::deserialize(EventDeserializer {
        event_type: raw.event_type,
        data: raw.data,
    })?;
    Ok(Event {
        stream: raw.stream,
        event_type: raw.event_type,
        position: raw.position,
        version: raw.version,
        timestamp: raw.timestamp,
        metadata: raw.metadata,
        data,
    })
}

/// Presents (type, data) as an externally tagged enum to serde.
struct EventDeserializer<'a> {
    event_type: &'a str,
    data: &'a [u8],
}

impl<'de> Deserializer<'de> for EventDeserializer<'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom(
            "a projection's event type must be an enum whose variants are event types",
        ))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

impl<'de> EnumAccess<'de> for EventDeserializer<'de> {
    type Error = serde_json::Error;
    type Variant = DataDeserializer<'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), Self::Error> {
        let de: de::value::StrDeserializer<'_, serde_json::Error> =
            self.event_type.into_deserializer();
        let variant = seed.deserialize(de)?;
        Ok((variant, DataDeserializer { data: self.data }))
    }
}

struct DataDeserializer<'a> {
    data: &'a [u8],
}

impl DataDeserializer<'_> {
    fn finish<T>(
        de: &mut serde_json::Deserializer<serde_json::de::SliceRead<'_>>,
        v: T,
    ) -> Result<T, serde_json::Error> {
        de.end()?;
        Ok(v)
    }
}

impl<'de> VariantAccess<'de> for DataDeserializer<'de> {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        // A unit variant ignores the event's data, whatever it holds.
        let mut de = serde_json::Deserializer::from_slice(self.data);
        let v = de::IgnoredAny::deserialize(&mut de)?;
        Self::finish(&mut de, v).map(|_| ())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, Self::Error> {
        let mut de = serde_json::Deserializer::from_slice(self.data);
        let v = seed.deserialize(&mut de)?;
        Self::finish(&mut de, v)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        let mut de = serde_json::Deserializer::from_slice(self.data);
        let v = de.deserialize_tuple(len, visitor)?;
        Self::finish(&mut de, v)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        let mut de = serde_json::Deserializer::from_slice(self.data);
        let v = de.deserialize_struct("", fields, visitor)?;
        Self::finish(&mut de, v)
    }
}

use serde::Deserialize as _;

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug, PartialEq)]
    enum Ev {
        Registered {
            name: String,
        },
        Renamed(String),
        #[serde(rename = "user.deleted")]
        Deleted,
    }

    fn raw<'a>(ty: &'a str, data: &'a [u8]) -> RawEvent<'a> {
        RawEvent {
            position: 7,
            version: 2,
            timestamp: 1,
            stream: "user-42",
            event_type: ty,
            data,
            metadata: Metadata::EMPTY,
        }
    }

    #[test]
    fn variant_is_the_type_and_content_is_the_data() {
        let e: Event<Ev> = decode(&raw("Registered", br#"{"name":"Ada"}"#)).unwrap();
        assert_eq!(e.data, Ev::Registered { name: "Ada".into() });
        assert_eq!(
            (e.position, e.version, e.category(), e.stream_key()),
            (7, 2, "user", "42")
        );
        let e: Event<Ev> = decode(&raw("Renamed", br#""Bea""#)).unwrap();
        assert_eq!(e.data, Ev::Renamed("Bea".into()));
        let e: Event<Ev> = decode(&raw("user.deleted", br#"{"any":1}"#)).unwrap();
        assert_eq!(e.data, Ev::Deleted);
    }

    #[test]
    fn unknown_types_and_bad_data_are_errors() {
        let err = decode::<Ev>(&raw("Exploded", b"{}")).unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `Exploded`"),
            "{err}"
        );
        let err = decode::<Ev>(&raw("Registered", br#"{"nom":"x"}"#)).unwrap_err();
        assert!(err.to_string().contains("missing field `name`"), "{err}");
    }
}
