//! Property tests of every parser in the protocol module: whatever the bytes, parsing ends
//! without a panic; whatever the message, encoding then parsing gives it back, in both hub
//! protocols; and however a stream of records is cut into transport messages, the same
//! messages come out.
//!
//! The number of cases is proptest's default (256), which `PROPTEST_CASES` overrides.

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

use super::framing::{self, RecordBuffer};
use super::handshake::{self, HandshakeRequest};
use super::hub_protocol::{HubProtocol, MessageReader};
use super::message::{HubMessage, Outcome};
use super::msgpack;
use super::negotiate::{self, TransportKind};
use super::token::{ClusterKey, ConnectionId, InstanceId, TokenClaims};
use super::varint;

/// Any JSON value a hub could send or receive, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter_map("finite", Number::from_f64)
            .prop_map(Value::Number),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec((any::<String>(), inner), 0..4)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Any hub message.
fn hub_message() -> impl Strategy<Value = HubMessage> {
    let id = any::<String>;
    let args = || vec(json_value(), 0..4);
    let ids = || vec(any::<String>(), 0..3);
    let outcome = prop_oneof![
        Just(Outcome::Void),
        json_value().prop_map(Outcome::Result),
        any::<String>().prop_map(Outcome::Error),
    ];
    prop_oneof![
        (proptest::option::of(id()), id(), args(), ids()).prop_map(
            |(invocation_id, target, arguments, stream_ids)| HubMessage::Invocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
            }
        ),
        (id(), json_value()).prop_map(|(invocation_id, item)| HubMessage::StreamItem {
            invocation_id,
            item
        }),
        (id(), outcome).prop_map(|(invocation_id, outcome)| HubMessage::Completion {
            invocation_id,
            outcome
        }),
        (id(), id(), args(), ids()).prop_map(|(invocation_id, target, arguments, stream_ids)| {
            HubMessage::StreamInvocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
            }
        }),
        id().prop_map(|invocation_id| HubMessage::CancelInvocation { invocation_id }),
        Just(HubMessage::Ping),
        (proptest::option::of(id()), any::<bool>()).prop_map(|(error, allow_reconnect)| {
            HubMessage::Close {
                error,
                allow_reconnect,
            }
        }),
        any::<u64>().prop_map(|sequence_id| HubMessage::Ack { sequence_id }),
        any::<u64>().prop_map(|sequence_id| HubMessage::Sequence { sequence_id }),
    ]
}

fn protocol() -> impl Strategy<Value = HubProtocol> {
    prop_oneof![Just(HubProtocol::Json), Just(HubProtocol::MessagePack)]
}

/// Any MessagePack value, extension types included, to reach deeper than random bytes do.
fn msgpack_value() -> impl Strategy<Value = rmpv::Value> {
    use rmpv::Value as Mp;
    let leaf = prop_oneof![
        Just(Mp::Nil),
        any::<bool>().prop_map(Mp::Boolean),
        any::<i64>().prop_map(Mp::from),
        any::<u64>().prop_map(Mp::from),
        any::<f32>().prop_map(Mp::F32),
        any::<f64>().prop_map(Mp::F64),
        any::<String>().prop_map(Mp::from),
        vec(any::<u8>(), 0..16).prop_map(Mp::Binary),
        (any::<i8>(), vec(any::<u8>(), 0..16)).prop_map(|(kind, data)| Mp::Ext(kind, data)),
        prop_oneof![Just(4usize), Just(8), Just(12)]
            .prop_flat_map(|len| vec(any::<u8>(), len))
            .prop_map(|data| Mp::Ext(-1, data)),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Mp::Array),
            vec((inner.clone(), inner), 0..4).prop_map(Mp::Map),
        ]
    })
}

/// Reads everything a reader will yield from `chunks`, stopping at the first error.
fn read_all(protocol: HubProtocol, chunks: &[&[u8]], max: usize) -> Vec<HubMessage> {
    let mut reader = MessageReader::new(protocol, max);
    let mut messages = Vec::new();
    for chunk in chunks {
        reader.extend(chunk);
        while let Ok(Some(message)) = reader.next_message() {
            messages.push(message);
        }
    }
    messages
}

/// Cuts `bytes` at the given fractions of its length.
fn cut<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| if bytes.is_empty() { 0 } else { c % bytes.len() })
        .collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

proptest! {
    // Round trips.

    #[test]
    fn every_message_round_trips_in_both_protocols(message in hub_message(), protocol in protocol()) {
        let record = protocol.encode(&message);
        let (parsed, used) = protocol.next_record(&record, record.len()).unwrap();
        prop_assert_eq!(used, record.len());
        prop_assert_eq!(parsed, Some(message));
    }

    #[test]
    fn messages_convert_between_protocols_without_loss(message in hub_message()) {
        let json = HubProtocol::Json.encode(&message);
        let from_json = HubProtocol::Json.parse(&json, json.len()).unwrap();
        let binary = HubProtocol::MessagePack.encode(&from_json[0]);
        prop_assert_eq!(HubProtocol::MessagePack.parse(&binary, binary.len()).unwrap(), vec![message]);
    }

    #[test]
    fn json_values_survive_messagepack(value in json_value()) {
        prop_assert_eq!(msgpack::to_json(msgpack::from_json(&value)).unwrap(), value);
    }

    #[test]
    fn varint_lengths_round_trip(length in 0..=varint::MAX_LENGTH) {
        let mut out = BytesMut::new();
        varint::write_length(&mut out, length);
        prop_assert!(out.len() <= varint::MAX_PREFIX_LEN);
        prop_assert_eq!(varint::read_length(&out), Ok((length, out.len())));
    }

    #[test]
    fn handshakes_of_either_protocol_in_any_case_are_agreed(
        protocol in protocol(),
        upper in vec(any::<bool>(), 11),
        version in 0u32..=2,
    ) {
        let name: String = protocol
            .name()
            .chars()
            .zip(upper.iter().cycle())
            .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c })
            .collect();
        let record = serde_json::json!({"protocol": name, "version": version}).to_string();
        let agreed = handshake::accept(&record, &HubProtocol::ALL, TransportKind::WebSockets).unwrap();
        prop_assert_eq!(agreed.protocol, protocol);
        prop_assert_eq!(agreed.version, version);
    }

    #[test]
    fn minted_tokens_verify_for_any_instance(owner in "[A-Za-z0-9_-]{1,64}", issued in any::<u64>()) {
        let key = ClusterKey::from_secret(b"secret");
        let claims = TokenClaims {
            owner: InstanceId::parse(&owner).unwrap(),
            connection_id: ConnectionId::random(),
            issued_at: issued,
        };
        prop_assert_eq!(key.verify(key.mint(&claims).as_str()), Ok(claims));
    }

    // Split anywhere.

    #[test]
    fn records_cut_anywhere_give_the_same_messages(
        messages in vec(hub_message(), 1..5),
        protocol in protocol(),
        cuts in vec(any::<usize>(), 0..8),
    ) {
        let stream: Vec<u8> = messages.iter().flat_map(|m| protocol.encode(m).to_vec()).collect();
        let chunks = cut(&stream, &cuts);
        prop_assert_eq!(read_all(protocol, &chunks, stream.len()), messages);
    }

    #[test]
    fn json_records_cut_anywhere_give_the_same_records(
        records in vec("[^\u{1e}]{0,20}", 1..5),
        cuts in vec(any::<usize>(), 0..8),
    ) {
        let stream: Vec<u8> = records.iter().flat_map(|r| framing::frame(r).to_vec()).collect();
        let mut buffer = RecordBuffer::new(stream.len());
        let mut out = Vec::new();
        for chunk in cut(&stream, &cuts) {
            buffer.extend(chunk);
            while let Some(record) = buffer.next_record().unwrap() {
                out.push(record);
            }
        }
        prop_assert_eq!(out, records);
    }

    // Arbitrary input never panics, and readers always finish.

    #[test]
    fn arbitrary_bytes_never_panic_a_reader(
        bytes in vec(any::<u8>(), 0..256),
        protocol in protocol(),
        cuts in vec(any::<usize>(), 0..4),
        max in 0usize..300,
    ) {
        read_all(protocol, &cut(&bytes, &cuts), max);
        let _ = protocol.parse(&bytes, max);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_record_parsers(bytes in vec(any::<u8>(), 0..256)) {
        let _ = msgpack::parse(&bytes);
        let _ = varint::next_record(&bytes, 1024);
        let _ = framing::next_record(&bytes, 1024);
        let text = String::from_utf8_lossy(&bytes);
        let _ = HubMessage::parse(&text);
        let _ = HandshakeRequest::parse(&text);
        for transport in TransportKind::ALL {
            let _ = handshake::accept(&text, &HubProtocol::ALL, transport);
        }
        let _ = negotiate::negotiate_version(Some(&text));
        let key = ClusterKey::from_secret(b"secret");
        let _ = key.verify(&text);
        let _ = key.verify_probe_marker(&text, 0, 60);
    }

    #[test]
    fn arbitrary_messagepack_arrays_never_panic_the_message_parser(
        kind in 0u8..12,
        items in vec(msgpack_value(), 0..7),
    ) {
        let mut all = vec![rmpv::Value::from(kind)];
        all.extend(items);
        let mut body = Vec::new();
        rmpv::encode::write_value(&mut body, &rmpv::Value::Array(all)).unwrap();
        let _ = msgpack::parse(&body);
    }

    #[test]
    fn arbitrary_json_objects_never_panic_the_message_parser(
        kind in 0u8..12,
        fields in vec((prop_oneof![
            Just("invocationId"), Just("target"), Just("arguments"), Just("streamIds"),
            Just("item"), Just("result"), Just("error"), Just("allowReconnect"),
            Just("sequenceId"), Just("headers"),
        ], json_value()), 0..6),
    ) {
        let mut object: Map<String, Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        object.insert("type".into(), kind.into());
        let _ = HubMessage::parse(&Value::Object(object).to_string());
    }

    #[test]
    fn negotiate_versions_above_one_are_lowered_to_one(raw in any::<u32>()) {
        prop_assert_eq!(negotiate::negotiate_version(Some(&raw.to_string())), Ok(raw.min(1)));
    }
}

proptest! {
    #[test]
    fn connections_of_every_negotiate_version_verify_to_their_id(
        owner in "[A-Za-z0-9_-]{1,64}",
        version in 0u32..3,
    ) {
        let key = ClusterKey::from_secret(b"secret");
        let claims = TokenClaims {
            owner: InstanceId::parse(&owner).unwrap(),
            connection_id: ConnectionId::random(),
            issued_at: 7,
        };
        let (id, token) = key.mint_connection(&claims, version);
        prop_assert_eq!(key.verify(token.as_str()).unwrap().connection_id, id.clone());
        prop_assert_eq!(id.as_str() == token.as_str(), version == 0);
    }

    #[test]
    fn arbitrary_negotiate_versions_never_panic(raw in any::<String>()) {
        let _ = negotiate::parse_negotiate_version(Some(&raw));
    }
}
