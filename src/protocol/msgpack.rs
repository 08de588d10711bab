//! Hub messages of the MessagePack hub protocol (`HubProtocol.md`, "MessagePack (MsgPack)
//! encoding"; npm `@microsoft/signalr-protocol-msgpack` `MessagePackHubProtocol.ts`).
//!
//! Each message is one MessagePack array whose first item is the message type; records are
//! framed by [`super::varint`]. The values inside (arguments, items, results) are converted
//! to and from the [`serde_json::Value`] the JSON protocol uses, so hub code never knows
//! which protocol a client speaks:
//!
//! | MessagePack | `serde_json::Value` | why |
//! |---|---|---|
//! | nil, bool, str, array | null, bool, string, array | the same thing |
//! | int (any width) | integer number, exactly | `u64`/`i64` hold every MessagePack int |
//! | float 32/64 | number (`f64`), even when integral; NaN and ±∞ become `null` | JSON has no NaN; `JSON.stringify` also writes `null`. The JS client writes integers beyond 2^53 as float 64 |
//! | map | object; integer keys become their decimal text | JSON keys are strings |
//! | bin | string, standard base64 with padding | how ASP.NET's JSON protocol writes `byte[]` |
//! | timestamp (ext −1) | ISO-8601 UTC string, `2024-01-02T03:04:05.678Z` (more digits only if needed) | what `JSON.stringify(date)` gives, so a JS `Date` reads the same in both protocols |
//! | other ext types | error | no representation the hub could use |
//!
//! Going out, numbers that are integers are written as the smallest MessagePack int that
//! holds them and other numbers as float 64; strings stay strings (a base64 or date string
//! is not guessed back into bin or a timestamp).
//!
//! Headers are accepted (a string → string map, checked) and dropped, as the JSON path
//! drops them; outgoing messages carry an empty map (`0x80`). Unknown message types are
//! skipped, as the spec asks of receivers.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use rmpv::{Integer, Value as Mp};
use serde_json::{Map, Number, Value};

use super::message::{HubMessage, Outcome};
use super::varint;

/// Deepest nesting of arrays and maps accepted in a message. `rmpv` counts a level twice
/// (the value and its contents), so this is about 100 levels: the JSON parser's own limit is
/// 128, and both keep a hostile message from exhausting the stack.
const MAX_DEPTH: usize = 200;

/// The MessagePack extension type of timestamps (MessagePack spec, "Timestamp extension type").
const TIMESTAMP_EXT: i8 = -1;

/// Completion result kinds (`HubProtocol.md`, "Completion Message Encoding").
const ERROR_RESULT: u64 = 1;
const VOID_RESULT: u64 = 2;
const NON_VOID_RESULT: u64 = 3;

/// A record that is not a valid MessagePack hub message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgPackError {
    /// Not one well-formed MessagePack value (or nested too deeply).
    #[error("message is not valid MessagePack: {0}")]
    Decode(String),
    /// Bytes left in the record after its value.
    #[error("message has {0} unexpected bytes after its end")]
    Trailing(usize),
    /// The value is not a non-empty array.
    #[error("message is not a non-empty MessagePack array")]
    NotAnArray,
    /// The first item is not an integer.
    #[error("message has no integer message type")]
    MissingType,
    /// Fewer items than the message type needs (ASP.NET's wording).
    #[error("Invalid payload for {0} message.")]
    TooShort(&'static str),
    /// An item has the wrong MessagePack type.
    #[error("expected '{property}' to be {expected}")]
    WrongType {
        /// The item.
        property: &'static str,
        /// What it should be.
        expected: &'static str,
    },
    /// A Completion's result kind is not 1, 2 or 3 (ASP.NET's wording).
    #[error("Invalid invocation result kind.")]
    BadResultKind,
    /// A map key that cannot be a JSON object key.
    #[error("map keys must be strings or integers")]
    BadMapKey,
    /// An extension type with no JSON representation.
    #[error("MessagePack extension type {0} is not supported")]
    UnsupportedExtension(i8),
    /// A timestamp extension of the wrong size or with nanoseconds over 999 999 999.
    #[error("invalid MessagePack timestamp")]
    BadTimestamp,
}

/// Parses one record body (without its length prefix). `Ok(None)` is a message of a type
/// this server does not know, which the caller skips.
pub fn parse(body: &[u8]) -> Result<Option<HubMessage>, MsgPackError> {
    let mut reader = body;
    let value = rmpv::decode::read_value_with_max_depth(&mut reader, MAX_DEPTH)
        .map_err(|error| MsgPackError::Decode(error.to_string()))?;
    if !reader.is_empty() {
        return Err(MsgPackError::Trailing(reader.len()));
    }
    let Mp::Array(items) = value else {
        return Err(MsgPackError::NotAnArray);
    };
    let kind = items
        .first()
        .ok_or(MsgPackError::NotAnArray)?
        .as_u64()
        .ok_or(MsgPackError::MissingType)?;
    let mut items = Items(items.into_iter().skip(1).collect());
    let message = match kind {
        1 => {
            items.headers("Invocation", 4)?;
            HubMessage::Invocation {
                invocation_id: items.optional_string("invocationId")?,
                target: items.string("target")?,
                arguments: items.array("arguments")?,
                stream_ids: items.string_array("streamIds")?,
            }
        }
        2 => {
            items.headers("StreamItem", 3)?;
            HubMessage::StreamItem {
                invocation_id: items.string("invocationId")?,
                item: items.value()?,
            }
        }
        3 => {
            items.headers("Completion", 3)?;
            let invocation_id = items.string("invocationId")?;
            let outcome = match items.next().and_then(|kind| kind.as_u64()) {
                Some(ERROR_RESULT) => Outcome::Error(
                    items
                        .optional_string("error")?
                        .ok_or(MsgPackError::TooShort("Completion"))?,
                ),
                Some(VOID_RESULT) => Outcome::Void,
                Some(NON_VOID_RESULT) => Outcome::Result(
                    items
                        .next()
                        .map(to_json)
                        .ok_or(MsgPackError::TooShort("Completion"))??,
                ),
                _ => return Err(MsgPackError::BadResultKind),
            };
            HubMessage::Completion {
                invocation_id,
                outcome,
            }
        }
        4 => {
            items.headers("StreamInvocation", 4)?;
            HubMessage::StreamInvocation {
                invocation_id: items.string("invocationId")?,
                target: items.string("target")?,
                arguments: items.array("arguments")?,
                stream_ids: items.string_array("streamIds")?,
            }
        }
        5 => {
            items.headers("CancelInvocation", 2)?;
            HubMessage::CancelInvocation {
                invocation_id: items.string("invocationId")?,
            }
        }
        6 => HubMessage::Ping,
        7 => {
            items.require("Close", 1)?;
            HubMessage::Close {
                error: items.optional_string("error")?,
                // The official client writes `[7, nil]` without the flag.
                allow_reconnect: matches!(items.next(), Some(Mp::Boolean(true))),
            }
        }
        8 => {
            items.require("Ack", 1)?;
            HubMessage::Ack {
                sequence_id: items.number("sequenceId")?,
            }
        }
        9 => {
            items.require("Sequence", 1)?;
            HubMessage::Sequence {
                sequence_id: items.number("sequenceId")?,
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(message))
}

/// Encodes a message as one record body, without its length prefix.
pub fn encode_body(message: &HubMessage) -> Vec<u8> {
    let headers = || Mp::Map(Vec::new());
    let string = |text: &str| Mp::from(text);
    let strings = |items: &[String]| Mp::Array(items.iter().map(|s| string(s)).collect());
    let values = |items: &[Value]| Mp::Array(items.iter().map(from_json).collect());
    let items = match message {
        HubMessage::Invocation {
            invocation_id,
            target,
            arguments,
            stream_ids,
        } => vec![
            Mp::from(1),
            headers(),
            invocation_id.as_deref().map_or(Mp::Nil, string),
            string(target),
            values(arguments),
            strings(stream_ids),
        ],
        HubMessage::StreamItem {
            invocation_id,
            item,
        } => vec![
            Mp::from(2),
            headers(),
            string(invocation_id),
            from_json(item),
        ],
        HubMessage::Completion {
            invocation_id,
            outcome,
        } => {
            let mut items = vec![Mp::from(3), headers(), string(invocation_id)];
            match outcome {
                Outcome::Error(error) => items.extend([Mp::from(ERROR_RESULT), string(error)]),
                Outcome::Void => items.push(Mp::from(VOID_RESULT)),
                Outcome::Result(value) => {
                    items.extend([Mp::from(NON_VOID_RESULT), from_json(value)])
                }
            }
            items
        }
        HubMessage::StreamInvocation {
            invocation_id,
            target,
            arguments,
            stream_ids,
        } => vec![
            Mp::from(4),
            headers(),
            string(invocation_id),
            string(target),
            values(arguments),
            strings(stream_ids),
        ],
        HubMessage::CancelInvocation { invocation_id } => {
            vec![Mp::from(5), headers(), string(invocation_id)]
        }
        // Always exactly 0x91 0x06 (`HubProtocol.md`, "MessagePack Headers Encoding").
        HubMessage::Ping => vec![Mp::from(6)],
        // ASP.NET always writes all three items.
        HubMessage::Close {
            error,
            allow_reconnect,
        } => vec![
            Mp::from(7),
            error.as_deref().map_or(Mp::Nil, string),
            Mp::Boolean(*allow_reconnect),
        ],
        HubMessage::Ack { sequence_id } => vec![Mp::from(8), Mp::from(*sequence_id)],
        HubMessage::Sequence { sequence_id } => vec![Mp::from(9), Mp::from(*sequence_id)],
    };
    let mut body = Vec::new();
    // Writing into a Vec cannot fail.
    rmpv::encode::write_value(&mut body, &Mp::Array(items)).expect("writes to a Vec succeed");
    body
}

/// Encodes a message as one framed record.
pub fn encode(message: &HubMessage) -> Bytes {
    varint::frame(&encode_body(message))
}

/// The framed Ping record: `0x02 0x91 0x06`.
pub fn ping_record() -> Bytes {
    Bytes::from_static(&[0x02, 0x91, 0x06])
}

/// Converts a decoded MessagePack value to the JSON value hub code sees (table above).
pub fn to_json(value: Mp) -> Result<Value, MsgPackError> {
    Ok(match value {
        Mp::Nil => Value::Null,
        Mp::Boolean(b) => Value::Bool(b),
        Mp::Integer(n) => integer(n),
        Mp::F32(f) => float(f64::from(f)),
        Mp::F64(f) => float(f),
        Mp::String(s) => Value::String(s.into_str().ok_or(MsgPackError::WrongType {
            property: "string",
            expected: "UTF-8",
        })?),
        Mp::Binary(bytes) => Value::String(STANDARD.encode(bytes)),
        Mp::Array(items) => Value::Array(items.into_iter().map(to_json).collect::<Result<_, _>>()?),
        Mp::Map(pairs) => {
            let mut object = Map::new();
            for (key, value) in pairs {
                let key = match key {
                    Mp::String(s) => s.into_str().ok_or(MsgPackError::BadMapKey)?,
                    Mp::Integer(n) => n.to_string(),
                    _ => return Err(MsgPackError::BadMapKey),
                };
                object.insert(key, to_json(value)?);
            }
            Value::Object(object)
        }
        Mp::Ext(TIMESTAMP_EXT, data) => Value::String(timestamp(&data)?),
        Mp::Ext(kind, _) => return Err(MsgPackError::UnsupportedExtension(kind)),
    })
}

/// Converts a JSON value to MessagePack (integers exactly, other numbers as float 64).
pub fn from_json(value: &Value) -> Mp {
    match value {
        Value::Null => Mp::Nil,
        Value::Bool(b) => Mp::Boolean(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Mp::from(u),
            (None, Some(i)) => Mp::from(i),
            // serde_json numbers are u64, i64 or finite f64.
            _ => Mp::F64(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => Mp::from(s.as_str()),
        Value::Array(items) => Mp::Array(items.iter().map(from_json).collect()),
        Value::Object(object) => Mp::Map(
            object
                .iter()
                .map(|(key, value)| (Mp::from(key.as_str()), from_json(value)))
                .collect(),
        ),
    }
}

fn integer(n: Integer) -> Value {
    match (n.as_u64(), n.as_i64()) {
        (Some(u), _) => Value::Number(u.into()),
        (None, Some(i)) => Value::Number(i.into()),
        // Every MessagePack integer fits u64 or i64.
        (None, None) => Value::Null,
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// Formats a timestamp extension (MessagePack spec: 32-bit seconds; 30-bit nanoseconds and
/// 34-bit seconds; or 32-bit nanoseconds and signed 64-bit seconds) as ISO-8601 UTC, with
/// milliseconds like `Date.prototype.toISOString` and more digits only when they are not 0.
fn timestamp(data: &[u8]) -> Result<String, MsgPackError> {
    let (seconds, nanos) = match data.len() {
        4 => (i64::from(be_u32(data)), 0),
        8 => {
            let both = u64::from_be_bytes(data.try_into().map_err(|_| MsgPackError::BadTimestamp)?);
            ((both & 0x3_ffff_ffff) as i64, (both >> 34) as u32)
        }
        12 => (
            i64::from_be_bytes(
                data[4..]
                    .try_into()
                    .map_err(|_| MsgPackError::BadTimestamp)?,
            ),
            be_u32(data),
        ),
        _ => return Err(MsgPackError::BadTimestamp),
    };
    if nanos >= 1_000_000_000 {
        return Err(MsgPackError::BadTimestamp);
    }
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let in_day = seconds.rem_euclid(86_400);
    let fraction = format!("{nanos:09}");
    let fraction = fraction.trim_end_matches('0');
    let fraction = &format!("{fraction:0<3}")[..];
    Ok(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{fraction}Z",
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60
    ))
}

fn be_u32(data: &[u8]) -> u32 {
    u32::from_be_bytes([data[0], data[1], data[2], data[3]])
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, public-domain date algorithms).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The items of a message after its type, taken in order.
struct Items(std::collections::VecDeque<Mp>);

impl Items {
    fn next(&mut self) -> Option<Mp> {
        self.0.pop_front()
    }

    /// Checks that at least `needed` items follow the type; items past those the spec
    /// names are ignored, so a newer peer may append some.
    fn require(&self, name: &'static str, needed: usize) -> Result<(), MsgPackError> {
        if self.0.len() < needed {
            return Err(MsgPackError::TooShort(name));
        }
        Ok(())
    }

    /// Checks the length, then takes and checks the headers map (`HubProtocol.md`,
    /// "MessagePack Headers Encoding": string keys and string values). Nil stands for no
    /// headers and nil values are allowed, as ASP.NET's reader reads them as null strings:
    /// pysignalr writes nil headers.
    fn headers(&mut self, name: &'static str, needed: usize) -> Result<(), MsgPackError> {
        self.require(name, needed)?;
        let wrong = MsgPackError::WrongType {
            property: "headers",
            expected: "a map of strings to strings",
        };
        match self.next() {
            Some(Mp::Nil) => Ok(()),
            Some(Mp::Map(pairs))
                if pairs
                    .iter()
                    .all(|(key, value)| key.is_str() && (value.is_str() || value.is_nil())) =>
            {
                Ok(())
            }
            _ => Err(wrong),
        }
    }

    fn value(&mut self) -> Result<Value, MsgPackError> {
        self.next().map_or(Ok(Value::Null), to_json)
    }

    fn optional_string(&mut self, key: &'static str) -> Result<Option<String>, MsgPackError> {
        let wrong = MsgPackError::WrongType {
            property: key,
            expected: "a string",
        };
        match self.next() {
            None | Some(Mp::Nil) => Ok(None),
            Some(Mp::String(s)) => s.into_str().map(Some).ok_or(wrong),
            Some(_) => Err(wrong),
        }
    }

    fn string(&mut self, key: &'static str) -> Result<String, MsgPackError> {
        self.optional_string(key)?.ok_or(MsgPackError::WrongType {
            property: key,
            expected: "a string",
        })
    }

    fn array(&mut self, key: &'static str) -> Result<Vec<Value>, MsgPackError> {
        match self.next() {
            Some(Mp::Array(items)) => items.into_iter().map(to_json).collect(),
            _ => Err(MsgPackError::WrongType {
                property: key,
                expected: "an array",
            }),
        }
    }

    /// Stream ids are optional: the official client leaves them out when it has none.
    fn string_array(&mut self, key: &'static str) -> Result<Vec<String>, MsgPackError> {
        let wrong = MsgPackError::WrongType {
            property: key,
            expected: "an array of strings",
        };
        match self.next() {
            None | Some(Mp::Nil) => Ok(Vec::new()),
            Some(Mp::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Mp::String(s) => s.into_str().ok_or(wrong.clone()),
                    _ => Err(wrong.clone()),
                })
                .collect(),
            Some(_) => Err(wrong),
        }
    }

    fn number(&mut self, key: &'static str) -> Result<u64, MsgPackError> {
        self.next()
            .and_then(|value| value.as_u64())
            .ok_or(MsgPackError::WrongType {
                property: key,
                expected: "a non-negative integer",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parsed(body: &[u8]) -> HubMessage {
        parse(body).unwrap().unwrap()
    }

    // Byte vectors from `HubProtocol.md`, "MessagePack (MsgPack) encoding".

    const INVOCATION: &[u8] = &[
        0x96, 0x01, 0x80, 0xa3, b'x', b'y', b'z', 0xa6, b'm', b'e', b't', b'h', b'o', b'd', 0x91,
        0x2a, 0x90,
    ];
    const NON_BLOCKING: &[u8] = &[
        0x96, 0x01, 0x80, 0xc0, 0xa6, b'm', b'e', b't', b'h', b'o', b'd', 0x91, 0x2a, 0x90,
    ];
    const STREAM_INVOCATION: &[u8] = &[
        0x96, 0x04, 0x80, 0xa3, b'x', b'y', b'z', 0xa6, b'm', b'e', b't', b'h', b'o', b'd', 0x91,
        0x2a, 0x90,
    ];
    const STREAM_ITEM: &[u8] = &[0x94, 0x02, 0x80, 0xa3, b'x', b'y', b'z', 0x2a];
    const ERROR_COMPLETION: &[u8] = &[
        0x95, 0x03, 0x80, 0xa3, b'x', b'y', b'z', 0x01, 0xa5, b'E', b'r', b'r', b'o', b'r',
    ];
    const VOID_COMPLETION: &[u8] = &[0x94, 0x03, 0x80, 0xa3, b'x', b'y', b'z', 0x02];
    const RESULT_COMPLETION: &[u8] = &[0x95, 0x03, 0x80, 0xa3, b'x', b'y', b'z', 0x03, 0x2a];
    const CANCEL: &[u8] = &[0x93, 0x05, 0x80, 0xa3, b'x', b'y', b'z'];
    const PING: &[u8] = &[0x91, 0x06];
    const CLOSE: &[u8] = &[0x92, 0x07, 0xa3, b'x', b'y', b'z'];
    const CLOSE_RECONNECT: &[u8] = &[0x93, 0x07, 0xa3, b'x', b'y', b'z', 0xc3];
    const ACK: &[u8] = &[0x92, 0x08, 0xcc, 0x24];
    const SEQUENCE: &[u8] = &[0x92, 0x09, 0xcc, 0x13];
    const WITH_HEADERS: &[u8] = &[
        0x96, 0x01, 0x82, 0xa1, b'x', 0xa1, b'y', 0xa1, b'z', 0xa1, b'z', 0xa3, b'x', b'y', b'z',
        0xa6, b'm', b'e', b't', b'h', b'o', b'd', 0x91, 0x2a, 0x90,
    ];

    fn invocation(id: Option<&str>) -> HubMessage {
        HubMessage::Invocation {
            invocation_id: id.map(Into::into),
            target: "method".into(),
            arguments: vec![json!(42)],
            stream_ids: vec![],
        }
    }

    fn completion(outcome: Outcome) -> HubMessage {
        HubMessage::Completion {
            invocation_id: "xyz".into(),
            outcome,
        }
    }

    /// The spec's examples that this server writes byte for byte the same way.
    fn symmetric_examples() -> Vec<(&'static [u8], HubMessage)> {
        vec![
            (INVOCATION, invocation(Some("xyz"))),
            (NON_BLOCKING, invocation(None)),
            (
                STREAM_INVOCATION,
                HubMessage::StreamInvocation {
                    invocation_id: "xyz".into(),
                    target: "method".into(),
                    arguments: vec![json!(42)],
                    stream_ids: vec![],
                },
            ),
            (
                STREAM_ITEM,
                HubMessage::StreamItem {
                    invocation_id: "xyz".into(),
                    item: json!(42),
                },
            ),
            (ERROR_COMPLETION, completion(Outcome::Error("Error".into()))),
            (VOID_COMPLETION, completion(Outcome::Void)),
            (RESULT_COMPLETION, completion(Outcome::Result(json!(42)))),
            (
                CANCEL,
                HubMessage::CancelInvocation {
                    invocation_id: "xyz".into(),
                },
            ),
            (PING, HubMessage::Ping),
            (
                CLOSE_RECONNECT,
                HubMessage::Close {
                    error: Some("xyz".into()),
                    allow_reconnect: true,
                },
            ),
        ]
    }

    #[test]
    fn the_spec_examples_parse() {
        for (bytes, message) in symmetric_examples() {
            assert_eq!(parsed(bytes), message, "{bytes:02x?}");
        }
        assert_eq!(
            parsed(CLOSE),
            HubMessage::Close {
                error: Some("xyz".into()),
                allow_reconnect: false
            }
        );
        assert_eq!(parsed(WITH_HEADERS), invocation(Some("xyz")));
        assert_eq!(parsed(ACK), HubMessage::Ack { sequence_id: 36 });
        assert_eq!(parsed(SEQUENCE), HubMessage::Sequence { sequence_id: 19 });
    }

    #[test]
    fn sequence_numbers_are_written_in_their_smallest_form() {
        // The spec's examples use uint 8 ("any unsigned int size is fine"); like ASP.NET's
        // MessagePack writer, the smallest form is used: a positive fixint here.
        assert_eq!(
            encode_body(&HubMessage::Ack { sequence_id: 36 }),
            [0x92, 0x08, 0x24]
        );
        assert_eq!(
            encode_body(&HubMessage::Sequence { sequence_id: 300 }),
            [0x92, 0x09, 0xcd, 0x01, 0x2c]
        );
    }

    #[test]
    fn the_spec_examples_are_encoded_byte_for_byte() {
        for (bytes, message) in symmetric_examples() {
            assert_eq!(encode_body(&message), bytes, "{message:?}");
        }
    }

    /// Decodes a hex string of framed records.
    fn records(hex: &str) -> Vec<HubMessage> {
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        super::super::hub_protocol::HubProtocol::MessagePack
            .parse(&bytes, 1024)
            .unwrap()
    }

    #[test]
    fn records_written_by_the_official_client_parse() {
        // Bytes from `MessagePackHubProtocol.writeMessage` of npm
        // `@microsoft/signalr-protocol-msgpack` 10.0 (with `@msgpack/msgpack`).
        let cases = [
            (
                // invoke("Send", "hi", 42, 1.5, -7, {a: [true, null]}): no stream ids
                "1f950180a130a453656e6495a268692acb3ff8000000000000f981a16192c3c0",
                HubMessage::Invocation {
                    invocation_id: Some("0".into()),
                    target: "Send".into(),
                    arguments: vec![
                        json!("hi"),
                        json!(42),
                        json!(1.5),
                        json!(-7),
                        json!({"a": [true, null]}),
                    ],
                    stream_ids: vec![],
                },
            ),
            (
                // invoke("Upload", subject): one client stream
                "10960180a131a655706c6f61649091a132",
                HubMessage::Invocation {
                    invocation_id: Some("1".into()),
                    target: "Upload".into(),
                    arguments: vec![],
                    stream_ids: vec!["2".into()],
                },
            ),
            (
                // send("D", new Date(Date.UTC(2024, 0, 2, 3, 4, 5, 678)))
                "11950180c0a14491d7ffa1a5d60065937d25",
                HubMessage::Invocation {
                    invocation_id: None,
                    target: "D".into(),
                    arguments: vec![json!("2024-01-02T03:04:05.678Z")],
                    stream_ids: vec![],
                },
            ),
            (
                // send("B", new Uint8Array([1, 2, 3]))
                "0c950180c0a14291c403010203",
                HubMessage::Invocation {
                    invocation_id: None,
                    target: "B".into(),
                    arguments: vec![json!("AQID")],
                    stream_ids: vec![],
                },
            ),
            (
                // send("N", 2 ** 53, -(2 ** 40), 0.1): unsafe integers travel as float 64
                "22950180c0a14e93cb4340000000000000d3ffffff0000000000cb3fb999999999999a",
                HubMessage::Invocation {
                    invocation_id: None,
                    target: "N".into(),
                    arguments: vec![
                        json!(9_007_199_254_740_992.0),
                        json!(-(1i64 << 40)),
                        json!(0.1),
                    ],
                    stream_ids: vec![],
                },
            ),
            (
                "0f950480a133a7436f756e746572910a",
                HubMessage::StreamInvocation {
                    invocation_id: "3".into(),
                    target: "Counter".into(),
                    arguments: vec![json!(10)],
                    stream_ids: vec![],
                },
            ),
            (
                "07940280a132a178",
                HubMessage::StreamItem {
                    invocation_id: "2".into(),
                    item: json!("x"),
                },
            ),
            (
                "0b950380a1350381a26f6b01",
                HubMessage::Completion {
                    invocation_id: "5".into(),
                    outcome: Outcome::Result(json!({"ok": 1})),
                },
            ),
            (
                "26950380a13501bf436c69656e74206469646e27742070726f76696465206120726573756c742e",
                HubMessage::Completion {
                    invocation_id: "5".into(),
                    outcome: Outcome::Error("Client didn't provide a result.".into()),
                },
            ),
            (
                "06940380a13202",
                HubMessage::Completion {
                    invocation_id: "2".into(),
                    outcome: Outcome::Void,
                },
            ),
            (
                "05930580a133",
                HubMessage::CancelInvocation {
                    invocation_id: "3".into(),
                },
            ),
            ("029106", HubMessage::Ping),
            (
                "039207c0",
                HubMessage::Close {
                    error: None,
                    allow_reconnect: false,
                },
            ),
            ("059208cd012c", HubMessage::Ack { sequence_id: 300 }),
            ("03920901", HubMessage::Sequence { sequence_id: 1 }),
        ];
        for (hex, message) in cases {
            assert_eq!(records(hex), vec![message], "{hex}");
        }
    }

    #[test]
    fn ping_is_exactly_0x91_0x06_and_framed_once() {
        assert_eq!(&encode(&HubMessage::Ping)[..], &[0x02, 0x91, 0x06]);
        assert_eq!(ping_record(), encode(&HubMessage::Ping));
    }

    #[test]
    fn close_always_carries_error_or_nil_and_the_flag() {
        let close = HubMessage::Close {
            error: None,
            allow_reconnect: false,
        };
        assert_eq!(encode_body(&close), [0x93, 0x07, 0xc0, 0xc2]);
        // The official client's own Close: `[7, nil]`.
        assert_eq!(parsed(&[0x92, 0x07, 0xc0]), close);
    }

    #[test]
    fn the_official_client_may_leave_out_stream_ids() {
        // `[1, {}, "0", "Send", ["hi"]]`, as MessagePackHubProtocol.ts writes it without streams.
        let body = [
            0x95, 0x01, 0x80, 0xa1, b'0', 0xa4, b'S', b'e', b'n', b'd', 0x91, 0xa2, b'h', b'i',
        ];
        assert_eq!(
            parsed(&body),
            HubMessage::Invocation {
                invocation_id: Some("0".into()),
                target: "Send".into(),
                arguments: vec![json!("hi")],
                stream_ids: vec![],
            }
        );
    }

    #[test]
    fn nil_headers_as_pysignalr_writes_them_are_no_headers() {
        // pysignalr 1.3: `[1, nil, "id", "Send", ["hi"]]`
        let body = [
            0x95, 0x01, 0xc0, 0xa2, b'i', b'd', 0xa4, b'S', b'e', b'n', b'd', 0x91, 0xa2, b'h',
            b'i',
        ];
        assert_eq!(
            parsed(&body),
            HubMessage::Invocation {
                invocation_id: Some("id".into()),
                target: "Send".into(),
                arguments: vec![json!("hi")],
                stream_ids: vec![],
            }
        );
        // A header with a nil value.
        let body = [0x94, 0x02, 0x81, 0xa1, b'k', 0xc0, 0xa1, b'1', 0x2a];
        assert_eq!(
            parsed(&body),
            HubMessage::StreamItem {
                invocation_id: "1".into(),
                item: json!(42),
            }
        );
    }

    #[test]
    fn unknown_types_are_skipped_and_extra_items_ignored() {
        assert_eq!(parse(&[0x91, 0x2a]), Ok(None));
        assert_eq!(
            parse(&[0x93, 0x06, 0x01, 0x02]).unwrap(),
            Some(HubMessage::Ping)
        );
    }

    #[test]
    fn malformed_messages_are_errors() {
        let cases: &[(&[u8], &str)] = &[
            (&[], "not valid MessagePack"),
            (&[0x90], "non-empty"),
            (&[0x2a], "non-empty"),
            (&[0x91, 0xa1, b'x'], "message type"),
            (&[0x93, 0x01, 0x80, 0xc0], "Invalid payload for Invocation"),
            (&[0x95, 0x01, 0x90, 0xc0, 0xa1, b'x', 0x90], "headers"),
            (
                &[0x95, 0x01, 0x81, 0xa1, b'x', 0x01, 0xc0, 0xa1, b'x', 0x90],
                "headers",
            ),
            (&[0x95, 0x01, 0x80, 0xc0, 0x01, 0x90], "target"),
            (&[0x95, 0x01, 0x80, 0xc0, 0xa1, b'x', 0x80], "arguments"),
            (
                &[0x96, 0x01, 0x80, 0xc0, 0xa1, b'x', 0x90, 0x91, 0x01],
                "streamIds",
            ),
            (&[0x94, 0x03, 0x80, 0xa1, b'x', 0x04], "result kind"),
            (&[0x94, 0x03, 0x80, 0xa1, b'x', 0x03], "Completion"),
            (&[0x92, 0x08, 0xff], "sequenceId"),
            (&[0x91, 0x06, 0x00], "unexpected bytes"),
            (&[0x92, 0x02, 0x80], "StreamItem"),
        ];
        for (body, expected) in cases {
            let error = parse(body).unwrap_err().to_string();
            assert!(
                error.contains(expected),
                "{body:02x?} gave {error:?}, expected it to mention {expected:?}"
            );
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let mut body = vec![0x92, 0x02];
        body.extend(std::iter::repeat_n(0x91, 100_000));
        body.push(0xc0);
        assert!(matches!(parse(&body), Err(MsgPackError::Decode(_))));
    }

    #[test]
    fn values_convert_as_documented() {
        let bin = Mp::Binary(vec![1, 2, 3]);
        assert_eq!(to_json(bin), Ok(json!("AQID")));
        let map = Mp::Map(vec![
            (Mp::from(1), Mp::from("one")),
            (Mp::from("b"), Mp::F32(0.5)),
        ]);
        assert_eq!(to_json(map), Ok(json!({"1": "one", "b": 0.5})));
        assert_eq!(to_json(Mp::F64(f64::NAN)), Ok(Value::Null));
        assert_eq!(to_json(Mp::from(u64::MAX)), Ok(json!(u64::MAX)));
        assert_eq!(to_json(Mp::from(i64::MIN)), Ok(json!(i64::MIN)));
        assert_eq!(
            to_json(Mp::Map(vec![(Mp::Nil, Mp::Nil)])),
            Err(MsgPackError::BadMapKey)
        );
        assert_eq!(
            to_json(Mp::Ext(5, vec![])),
            Err(MsgPackError::UnsupportedExtension(5))
        );
        assert_eq!(
            from_json(&json!({"a": [1, -1, 1.5, null, true]})),
            Mp::Map(vec![(
                Mp::from("a"),
                Mp::Array(vec![
                    Mp::from(1),
                    Mp::from(-1),
                    Mp::F64(1.5),
                    Mp::Nil,
                    Mp::Boolean(true)
                ])
            )])
        );
    }

    #[test]
    fn timestamps_read_like_json_stringify_of_a_date() {
        // 2024-01-02T03:04:05.678Z as @msgpack/msgpack writes a Date (timestamp 64).
        let seconds: u64 = 1_704_164_645;
        let nanos: u64 = 678_000_000;
        let data = ((nanos << 34) | seconds).to_be_bytes().to_vec();
        assert_eq!(
            to_json(Mp::Ext(-1, data)),
            Ok(json!("2024-01-02T03:04:05.678Z"))
        );
        // timestamp 32
        assert_eq!(
            to_json(Mp::Ext(-1, 0u32.to_be_bytes().to_vec())),
            Ok(json!("1970-01-01T00:00:00.000Z"))
        );
        // timestamp 96, before 1970, with sub-millisecond precision
        let mut data = 1_000u32.to_be_bytes().to_vec();
        data.extend((-1i64).to_be_bytes());
        assert_eq!(
            to_json(Mp::Ext(-1, data)),
            Ok(json!("1969-12-31T23:59:59.000001Z"))
        );
        // 2000-02-29 (a leap day of a century leap year)
        let data = 951_782_400u32.to_be_bytes().to_vec();
        assert_eq!(
            to_json(Mp::Ext(-1, data)),
            Ok(json!("2000-02-29T00:00:00.000Z"))
        );
        assert_eq!(
            to_json(Mp::Ext(-1, vec![0; 5])),
            Err(MsgPackError::BadTimestamp)
        );
    }
}
