//! Hub messages of the JSON hub protocol (`HubProtocol.md`, "Message Types" and "JSON
//! Encoding").
//!
//! One enum, each variant parsed from and encoded to one record. Clients may write the
//! properties in any order (the JS client writes `type` last), so a record is decoded to a
//! JSON object first and then dispatched on `type`; a serde internally tagged enum cannot
//! do that with a numeric tag. Unknown `type`s are skipped, as the spec asks of receivers,
//! so a newer client's extra messages do not break the connection.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::framing::frame;

/// One hub message.
#[derive(Debug, Clone, PartialEq)]
pub enum HubMessage {
    /// Type 1: call a method. No `invocation_id` means no reply is wanted.
    Invocation {
        /// Present for a blocking call, which gets exactly one Completion.
        invocation_id: Option<String>,
        /// The method's name.
        target: String,
        /// The method's arguments.
        arguments: Vec<Value>,
        /// Ids of client-to-server streams passed as arguments.
        stream_ids: Vec<String>,
    },
    /// Type 2: one item of a stream.
    StreamItem {
        /// The stream's id.
        invocation_id: String,
        /// The item.
        item: Value,
    },
    /// Type 3: the end of an invocation or stream.
    Completion {
        /// The invocation's id.
        invocation_id: String,
        /// What it ended with.
        outcome: Outcome,
    },
    /// Type 4: call a method that streams its results.
    StreamInvocation {
        /// The stream's id.
        invocation_id: String,
        /// The method's name.
        target: String,
        /// The method's arguments.
        arguments: Vec<Value>,
        /// Ids of client-to-server streams passed as arguments.
        stream_ids: Vec<String>,
    },
    /// Type 5: stop a stream.
    CancelInvocation {
        /// The stream's id.
        invocation_id: String,
    },
    /// Type 6: keep-alive.
    Ping,
    /// Type 7: the sender is closing the connection.
    Close {
        /// Why, when it is an error.
        error: Option<String>,
        /// Whether the client may reconnect automatically.
        allow_reconnect: bool,
    },
    /// Type 8: stateful reconnect acknowledgement.
    Ack {
        /// The highest sequence number received.
        sequence_id: u64,
    },
    /// Type 9: stateful reconnect sequence start.
    Sequence {
        /// The first sequence number that follows.
        sequence_id: u64,
    },
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A void method, or a stream, finished.
    Void,
    /// The method returned this value.
    Result(Value),
    /// The method failed.
    Error(String),
}

/// A record that is not a valid hub message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Not JSON, or not a JSON object.
    #[error("message is not a JSON object: {0}")]
    NotAnObject(String),
    /// `type` is missing or not an integer.
    #[error("message has no integer 'type' property")]
    MissingType,
    /// A required property is missing.
    #[error("missing required property '{0}'")]
    Missing(&'static str),
    /// A property has the wrong JSON type.
    #[error("expected '{property}' to be {expected}")]
    WrongType {
        /// The property.
        property: &'static str,
        /// What it should be.
        expected: &'static str,
    },
}

impl HubMessage {
    /// Parses one record (without its separator). `Ok(None)` is a message of a type this
    /// server does not know, which the caller skips.
    pub fn parse(record: &str) -> Result<Option<Self>, MessageError> {
        let value: Value = serde_json::from_str(record)
            .map_err(|error| MessageError::NotAnObject(error.to_string()))?;
        let Value::Object(mut object) = value else {
            return Err(MessageError::NotAnObject("not an object".into()));
        };
        let kind = object
            .get("type")
            .and_then(Value::as_u64)
            .ok_or(MessageError::MissingType)?;
        let mut fields = Fields(&mut object);
        let message = match kind {
            1 => Self::Invocation {
                invocation_id: fields.optional_string("invocationId")?,
                target: fields.string("target")?,
                arguments: fields.array("arguments")?,
                stream_ids: fields.string_array("streamIds")?,
            },
            2 => Self::StreamItem {
                invocation_id: fields.string("invocationId")?,
                item: fields.take("item").unwrap_or(Value::Null),
            },
            3 => {
                let invocation_id = fields.string("invocationId")?;
                let outcome = match (fields.optional_string("error")?, fields.take("result")) {
                    (Some(error), _) => Outcome::Error(error),
                    (None, Some(result)) => Outcome::Result(result),
                    (None, None) => Outcome::Void,
                };
                Self::Completion {
                    invocation_id,
                    outcome,
                }
            }
            4 => Self::StreamInvocation {
                invocation_id: fields.string("invocationId")?,
                target: fields.string("target")?,
                arguments: fields.array("arguments")?,
                stream_ids: fields.string_array("streamIds")?,
            },
            5 => Self::CancelInvocation {
                invocation_id: fields.string("invocationId")?,
            },
            6 => Self::Ping,
            7 => Self::Close {
                error: fields.optional_string("error")?,
                allow_reconnect: fields.take("allowReconnect").and_then(|v| v.as_bool())
                    == Some(true),
            },
            8 => Self::Ack {
                sequence_id: fields.number("sequenceId")?,
            },
            9 => Self::Sequence {
                sequence_id: fields.number("sequenceId")?,
            },
            _ => return Ok(None),
        };
        Ok(Some(message))
    }

    /// Encodes the message as one framed record.
    pub fn encode(&self) -> Bytes {
        let mut out = Map::new();
        let mut put = |key: &str, value: Value| {
            out.insert(key.to_owned(), value);
        };
        match self {
            Self::Invocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
            } => {
                put("type", 1.into());
                if let Some(id) = invocation_id {
                    put("invocationId", id.clone().into());
                }
                put("target", target.clone().into());
                put("arguments", arguments.clone().into());
                if !stream_ids.is_empty() {
                    put("streamIds", stream_ids.clone().into());
                }
            }
            Self::StreamItem {
                invocation_id,
                item,
            } => {
                put("type", 2.into());
                put("invocationId", invocation_id.clone().into());
                put("item", item.clone());
            }
            Self::Completion {
                invocation_id,
                outcome,
            } => {
                put("type", 3.into());
                put("invocationId", invocation_id.clone().into());
                match outcome {
                    Outcome::Void => {}
                    Outcome::Result(value) => put("result", value.clone()),
                    Outcome::Error(error) => put("error", error.clone().into()),
                }
            }
            Self::StreamInvocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
            } => {
                put("type", 4.into());
                put("invocationId", invocation_id.clone().into());
                put("target", target.clone().into());
                put("arguments", arguments.clone().into());
                if !stream_ids.is_empty() {
                    put("streamIds", stream_ids.clone().into());
                }
            }
            Self::CancelInvocation { invocation_id } => {
                put("type", 5.into());
                put("invocationId", invocation_id.clone().into());
            }
            Self::Ping => put("type", 6.into()),
            Self::Close {
                error,
                allow_reconnect,
            } => {
                put("type", 7.into());
                if let Some(error) = error {
                    put("error", error.clone().into());
                }
                if *allow_reconnect {
                    put("allowReconnect", true.into());
                }
            }
            Self::Ack { sequence_id } => {
                put("type", 8.into());
                put("sequenceId", (*sequence_id).into());
            }
            Self::Sequence { sequence_id } => {
                put("type", 9.into());
                put("sequenceId", (*sequence_id).into());
            }
        }
        frame(&Value::Object(out).to_string())
    }
}

/// The framed Ping record, sent often enough to encode once.
pub fn ping_record() -> Bytes {
    frame(r#"{"type":6}"#)
}

/// Takes typed properties out of a decoded message object.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Fields<'_> {
    fn take(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key)
    }

    fn optional_string(&mut self, key: &'static str) -> Result<Option<String>, MessageError> {
        match self.take(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(MessageError::WrongType {
                property: key,
                expected: "a string",
            }),
        }
    }

    fn string(&mut self, key: &'static str) -> Result<String, MessageError> {
        self.optional_string(key)?.ok_or(MessageError::Missing(key))
    }

    fn array(&mut self, key: &'static str) -> Result<Vec<Value>, MessageError> {
        match self.take(key) {
            Some(Value::Array(items)) => Ok(items),
            None => Err(MessageError::Missing(key)),
            Some(_) => Err(MessageError::WrongType {
                property: key,
                expected: "an array",
            }),
        }
    }

    fn string_array(&mut self, key: &'static str) -> Result<Vec<String>, MessageError> {
        let wrong = MessageError::WrongType {
            property: key,
            expected: "an array of strings",
        };
        match self.take(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s),
                    _ => Err(wrong.clone()),
                })
                .collect(),
            Some(_) => Err(wrong),
        }
    }

    fn number(&mut self, key: &'static str) -> Result<u64, MessageError> {
        self.take(key)
            .ok_or(MessageError::Missing(key))?
            .as_u64()
            .ok_or(MessageError::WrongType {
                property: key,
                expected: "a non-negative integer",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_invocation_with_type_last_is_parsed() {
        let record = r#"{"arguments":["hi"],"invocationId":"0","target":"Send","type":1}"#;
        assert_eq!(
            HubMessage::parse(record).unwrap(),
            Some(HubMessage::Invocation {
                invocation_id: Some("0".into()),
                target: "Send".into(),
                arguments: vec![json!("hi")],
                stream_ids: vec![],
            })
        );
    }

    #[test]
    fn a_non_blocking_invocation_has_no_id_and_headers_are_ignored() {
        let record = r#"{"type":1,"headers":{"a":"b"},"target":"Send","arguments":[]}"#;
        let Some(HubMessage::Invocation { invocation_id, .. }) = HubMessage::parse(record).unwrap()
        else {
            panic!("not an invocation");
        };
        assert_eq!(invocation_id, None);
    }

    #[test]
    fn unknown_types_are_skipped_not_errors() {
        assert_eq!(HubMessage::parse(r#"{"type":42}"#).unwrap(), None);
    }

    #[test]
    fn malformed_messages_are_errors() {
        let cases = [
            ("", "not"),
            ("[1]", "not"),
            (r#"{"target":"x"}"#, "type"),
            (r#"{"type":"1"}"#, "type"),
            (r#"{"type":1,"arguments":[]}"#, "target"),
            (r#"{"type":1,"target":"x"}"#, "arguments"),
            (r#"{"type":1,"target":5,"arguments":[]}"#, "target"),
            (r#"{"type":1,"target":"x","arguments":{}}"#, "arguments"),
            (
                r#"{"type":1,"target":"x","arguments":[],"streamIds":[1]}"#,
                "streamIds",
            ),
            (r#"{"type":8}"#, "sequenceId"),
            (r#"{"type":6} trailing"#, "not"),
        ];
        for (record, expected) in cases {
            let error = HubMessage::parse(record).unwrap_err().to_string();
            assert!(
                error.contains(expected),
                "{record:?} gave {error:?}, expected it to mention {expected:?}"
            );
        }
    }

    #[test]
    fn completions_encode_result_error_or_nothing() {
        let encode = |outcome| {
            HubMessage::Completion {
                invocation_id: "7".into(),
                outcome,
            }
            .encode()
        };
        assert_eq!(
            &encode(Outcome::Void)[..],
            b"{\"invocationId\":\"7\",\"type\":3}\x1e"
        );
        assert_eq!(
            &encode(Outcome::Result(json!(null)))[..],
            b"{\"invocationId\":\"7\",\"result\":null,\"type\":3}\x1e"
        );
        assert_eq!(
            &encode(Outcome::Error("no".into()))[..],
            b"{\"error\":\"no\",\"invocationId\":\"7\",\"type\":3}\x1e"
        );
    }

    #[test]
    fn every_message_round_trips() {
        let messages = [
            HubMessage::Invocation {
                invocation_id: None,
                target: "Send".into(),
                arguments: vec![json!("x"), json!({"a": [1]})],
                stream_ids: vec!["2".into()],
            },
            HubMessage::StreamItem {
                invocation_id: "1".into(),
                item: json!(null),
            },
            HubMessage::Completion {
                invocation_id: "1".into(),
                outcome: Outcome::Result(json!([1, 2])),
            },
            HubMessage::StreamInvocation {
                invocation_id: "3".into(),
                target: "Counter".into(),
                arguments: vec![json!(3)],
                stream_ids: vec![],
            },
            HubMessage::CancelInvocation {
                invocation_id: "3".into(),
            },
            HubMessage::Ping,
            HubMessage::Close {
                error: Some("bye".into()),
                allow_reconnect: true,
            },
            HubMessage::Ack { sequence_id: 4 },
            HubMessage::Sequence { sequence_id: 5 },
        ];
        for message in messages {
            let encoded = message.encode();
            let text = std::str::from_utf8(&encoded[..encoded.len() - 1]).unwrap();
            assert_eq!(HubMessage::parse(text).unwrap(), Some(message));
        }
    }

    #[test]
    fn close_omits_what_it_does_not_need() {
        let close = HubMessage::Close {
            error: None,
            allow_reconnect: false,
        };
        assert_eq!(&close.encode()[..], b"{\"type\":7}\x1e");
        assert_eq!(&ping_record()[..], b"{\"type\":6}\x1e");
    }
}
