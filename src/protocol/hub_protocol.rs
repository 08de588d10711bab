//! The hub protocols behind one facade, so that sessions and the backplane never branch on
//! JSON versus MessagePack (`HubProtocol.md`, "Overview": one protocol per connection,
//! chosen by the handshake).
//!
//! - [`HubProtocol`]: name, versions, transfer format; encode a message to a framed
//!   record; parse records.
//! - [`MessageReader`]: one connection's inbound bytes → messages, across transport
//!   messages, in the connection's protocol.
//! - [`EncodedMessage`]: one outgoing message, encoded at most once per protocol however
//!   many recipients it has.

use std::sync::OnceLock;

use bytes::{Buf, Bytes, BytesMut};

use super::framing::{self, FrameError, RecordBuffer};
use super::message::{HubMessage, MessageError};
use super::msgpack::{self, MsgPackError};
use super::varint::{self, BinaryFrameError};

/// How a transport must carry a protocol's records (`TransportProtocols.md`, "Transfer
/// Formats"): text frames and UTF-8 bodies, or binary frames and octet bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferFormat {
    /// UTF-8 text: WebSocket text frames; usable on every transport.
    Text,
    /// Bytes: WebSocket binary frames, `application/octet-stream` long-polling bodies;
    /// not possible on Server-Sent Events.
    Binary,
}

impl TransferFormat {
    /// The name used in negotiate responses and ASP.NET's error texts.
    pub fn name(self) -> &'static str {
        match self {
            Self::Text => "Text",
            Self::Binary => "Binary",
        }
    }
}

impl std::fmt::Display for TransferFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A hub protocol this server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HubProtocol {
    /// `json`: UTF-8 JSON records ended by 0x1E.
    Json,
    /// `messagepack`: MessagePack arrays prefixed by their VarInt length.
    MessagePack,
}

/// Why inbound bytes could not be turned into a message. Every variant but an incomplete
/// frame means the peer broke the protocol and the connection should close with an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// JSON record framing.
    #[error(transparent)]
    TextFrame(#[from] FrameError),
    /// MessagePack record framing.
    #[error(transparent)]
    BinaryFrame(#[from] BinaryFrameError),
    /// A JSON record that is not a hub message.
    #[error(transparent)]
    Json(#[from] MessageError),
    /// A MessagePack record that is not a hub message.
    #[error(transparent)]
    MessagePack(#[from] MsgPackError),
}

impl ProtocolError {
    /// Whether more input could complete the record (only [`HubProtocol::parse`] returns
    /// this as an error; readers wait instead).
    pub fn is_incomplete(&self) -> bool {
        matches!(
            self,
            Self::TextFrame(FrameError::Incomplete)
                | Self::BinaryFrame(BinaryFrameError::Incomplete)
        )
    }
}

impl HubProtocol {
    /// Both protocols, JSON first.
    pub const ALL: [HubProtocol; 2] = [HubProtocol::Json, HubProtocol::MessagePack];

    /// The highest version of either protocol: 2, the one with Ack and Sequence
    /// (ASP.NET's `JsonHubProtocol` and `MessagePackHubProtocol` are both version 2).
    pub const MAX_VERSION: u32 = 2;

    /// The name used in the handshake.
    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::MessagePack => "messagepack",
        }
    }

    /// The protocol a handshake names. ASP.NET's resolver ignores case, so `"JSON"` and
    /// `"MessagePack"` are these protocols too.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|protocol| protocol.name().eq_ignore_ascii_case(name))
    }

    /// Whether a handshake may ask for `version`. ASP.NET accepts every version up to its
    /// own (`IsVersionSupported` is `version <= Version`), 0 included: signalrcore sends 0.
    pub fn is_version_supported(self, version: u32) -> bool {
        version <= Self::MAX_VERSION
    }

    /// How transports must carry this protocol's records.
    pub fn transfer_format(self) -> TransferFormat {
        match self {
            Self::Json => TransferFormat::Text,
            Self::MessagePack => TransferFormat::Binary,
        }
    }

    /// Encodes a message as one framed record of this protocol.
    pub fn encode(self, message: &HubMessage) -> Bytes {
        match self {
            Self::Json => message.encode(),
            Self::MessagePack => msgpack::encode(message),
        }
    }

    /// The framed Ping record, sent often enough to be worth not encoding each time.
    pub fn ping_record(self) -> Bytes {
        match self {
            Self::Json => super::message::ping_record(),
            Self::MessagePack => msgpack::ping_record(),
        }
    }

    /// Takes the first record from the start of `buf`: the message (`None` for a type this
    /// server does not know, which is skipped) and the bytes the record used. `max` bounds
    /// a record's size, also before it is complete.
    pub fn next_record(
        self,
        buf: &[u8],
        max: usize,
    ) -> Result<(Option<HubMessage>, usize), ProtocolError> {
        match self {
            Self::Json => {
                let (text, used) = framing::next_record(buf, max)?;
                Ok((HubMessage::parse(text)?, used))
            }
            Self::MessagePack => {
                let (body, used) = varint::next_record(buf, max)?;
                Ok((msgpack::parse(body)?, used))
            }
        }
    }

    /// Parses a payload that holds only whole records (one WebSocket message, one POST
    /// body) into its messages, skipping unknown types. A record cut short is an error
    /// ([`ProtocolError::is_incomplete`]); use a [`MessageReader`] where records may
    /// continue in the next payload.
    pub fn parse(self, mut bytes: &[u8], max: usize) -> Result<Vec<HubMessage>, ProtocolError> {
        let mut messages = Vec::new();
        while !bytes.is_empty() {
            let (message, used) = self.next_record(bytes, max)?;
            messages.extend(message);
            bytes = &bytes[used..];
        }
        Ok(messages)
    }
}

impl std::fmt::Display for HubProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Accumulates one connection's inbound bytes and yields whole messages of its protocol.
///
/// A transport message may carry several records, and a record may arrive split over
/// several transport messages; both are handled here.
#[derive(Debug)]
pub struct MessageReader {
    protocol: HubProtocol,
    buf: BytesMut,
    max_record: usize,
}

impl MessageReader {
    /// A reader that rejects records larger than `max_record` bytes.
    pub fn new(protocol: HubProtocol, max_record: usize) -> Self {
        Self {
            protocol,
            buf: BytesMut::new(),
            max_record,
        }
    }

    /// The reader for what follows the handshake: the bytes that came after the handshake
    /// record in the same transport message are the start of the hub messages
    /// (`HubProtocol.md`, "Overview": messages may follow the handshake immediately).
    pub fn after_handshake(protocol: HubProtocol, records: RecordBuffer) -> Self {
        let max_record = records.max_record();
        let mut reader = Self::new(protocol, max_record);
        reader.extend(&records.into_pending());
        reader
    }

    /// The protocol being read.
    pub fn protocol(&self) -> HubProtocol {
        self.protocol
    }

    /// Adds bytes from the transport.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next message, `Ok(None)` when more input is needed. Messages of unknown
    /// types are skipped, as the spec asks of receivers.
    pub fn next_message(&mut self) -> Result<Option<HubMessage>, ProtocolError> {
        loop {
            match self.protocol.next_record(&self.buf, self.max_record) {
                Ok((message, used)) => {
                    self.buf.advance(used);
                    if message.is_some() {
                        return Ok(message);
                    }
                }
                Err(error) if error.is_incomplete() => return Ok(None),
                Err(error) => return Err(error),
            }
        }
    }

    /// Bytes received that do not yet form a whole record.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// One outgoing message and its framed record in each protocol, each made on first use.
///
/// Share it (in an `Arc`) between all recipients of a broadcast: each protocol's record is
/// encoded once, however many connections of that protocol receive it, and not at all if
/// none does.
#[derive(Debug)]
pub struct EncodedMessage {
    message: HubMessage,
    json: OnceLock<Bytes>,
    messagepack: OnceLock<Bytes>,
}

impl EncodedMessage {
    /// Wraps a message; nothing is encoded yet.
    pub fn new(message: HubMessage) -> Self {
        Self {
            message,
            json: OnceLock::new(),
            messagepack: OnceLock::new(),
        }
    }

    /// Wraps one framed record of `protocol` (as carried by the backplane), keeping its
    /// bytes for that protocol. Fails unless `record` is exactly one known message.
    pub fn from_record(protocol: HubProtocol, record: Bytes) -> Result<Self, ProtocolError> {
        let (message, used) = protocol.next_record(&record, record.len())?;
        if used != record.len() {
            return Err(match protocol {
                HubProtocol::Json => {
                    MessageError::NotAnObject("more than one record".into()).into()
                }
                HubProtocol::MessagePack => MsgPackError::Trailing(record.len() - used).into(),
            });
        }
        let message = message.ok_or(MessageError::MissingType)?;
        let encoded = Self::new(message);
        // The cell is new, so this cannot fail.
        let _ = encoded.cell(protocol).set(record);
        Ok(encoded)
    }

    /// The message.
    pub fn message(&self) -> &HubMessage {
        &self.message
    }

    /// The framed record for a connection speaking `protocol`.
    pub fn record(&self, protocol: HubProtocol) -> Bytes {
        self.cell(protocol)
            .get_or_init(|| protocol.encode(&self.message))
            .clone()
    }

    fn cell(&self, protocol: HubProtocol) -> &OnceLock<Bytes> {
        match protocol {
            HubProtocol::Json => &self.json,
            HubProtocol::MessagePack => &self.messagepack,
        }
    }
}

impl From<HubMessage> for EncodedMessage {
    fn from(message: HubMessage) -> Self {
        Self::new(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn send(text: &str) -> HubMessage {
        HubMessage::Invocation {
            invocation_id: None,
            target: "Send".into(),
            arguments: vec![json!(text)],
            stream_ids: vec![],
        }
    }

    #[test]
    fn names_are_matched_ignoring_case() {
        assert_eq!(HubProtocol::from_name("JSON"), Some(HubProtocol::Json));
        assert_eq!(
            HubProtocol::from_name("MessagePack"),
            Some(HubProtocol::MessagePack)
        );
        assert_eq!(HubProtocol::from_name("msgpack"), None);
        assert_eq!(HubProtocol::MessagePack.to_string(), "messagepack");
    }

    #[test]
    fn versions_zero_to_two_are_supported() {
        for protocol in HubProtocol::ALL {
            assert!((0..=2).all(|v| protocol.is_version_supported(v)));
            assert!(!protocol.is_version_supported(3));
        }
    }

    #[test]
    fn each_protocol_has_its_transfer_format_and_ping() {
        assert_eq!(HubProtocol::Json.transfer_format(), TransferFormat::Text);
        assert_eq!(
            HubProtocol::MessagePack.transfer_format(),
            TransferFormat::Binary
        );
        for protocol in HubProtocol::ALL {
            assert_eq!(protocol.ping_record(), protocol.encode(&HubMessage::Ping));
        }
    }

    #[test]
    fn a_payload_of_whole_records_parses_and_unknown_types_are_skipped() {
        let json = b"{\"type\":6}\x1e{\"type\":99}\x1e{\"type\":7}\x1e";
        assert_eq!(
            HubProtocol::Json.parse(json, 100).unwrap(),
            vec![
                HubMessage::Ping,
                HubMessage::Close {
                    error: None,
                    allow_reconnect: false
                }
            ]
        );
        let binary = [0x02, 0x91, 0x06, 0x02, 0x91, 0x63, 0x02, 0x91, 0x06];
        assert_eq!(
            HubProtocol::MessagePack.parse(&binary, 100).unwrap(),
            vec![HubMessage::Ping, HubMessage::Ping]
        );
        let cut = HubProtocol::MessagePack
            .parse(&[0x02, 0x91], 100)
            .unwrap_err();
        assert!(cut.is_incomplete());
    }

    #[test]
    fn the_reader_continues_records_across_transport_messages() {
        let record = HubProtocol::MessagePack.encode(&send("hello"));
        let mut reader = MessageReader::new(HubProtocol::MessagePack, 100);
        reader.extend(&record[..3]);
        assert_eq!(reader.next_message(), Ok(None));
        reader.extend(&record[3..]);
        reader.extend(&[0x02, 0x91]);
        assert_eq!(reader.next_message(), Ok(Some(send("hello"))));
        assert_eq!(reader.next_message(), Ok(None));
        assert_eq!(reader.pending(), 2);
        reader.extend(&[0x06]);
        assert_eq!(reader.next_message(), Ok(Some(HubMessage::Ping)));
    }

    #[test]
    fn the_reader_takes_over_the_bytes_after_the_handshake() {
        let mut records = RecordBuffer::new(64);
        records.extend(b"{\"protocol\":\"messagepack\",\"version\":1}\x1e\x02\x91\x06");
        assert!(records.next_record().unwrap().is_some());
        let mut reader = MessageReader::after_handshake(HubProtocol::MessagePack, records);
        assert_eq!(reader.next_message(), Ok(Some(HubMessage::Ping)));
    }

    #[test]
    fn the_reader_reports_oversized_and_invalid_records() {
        let mut reader = MessageReader::new(HubProtocol::MessagePack, 4);
        reader.extend(&[0x05]);
        assert_eq!(
            reader.next_message(),
            Err(BinaryFrameError::TooLarge { size: 5, max: 4 }.into())
        );
        let mut reader = MessageReader::new(HubProtocol::Json, 100);
        reader.extend(b"[]\x1e");
        assert!(matches!(
            reader.next_message(),
            Err(ProtocolError::Json(MessageError::NotAnObject(_)))
        ));
    }

    #[test]
    fn an_encoded_message_encodes_each_protocol_once_and_converts_between_them() {
        let encoded = EncodedMessage::new(send("hi"));
        let json = encoded.record(HubProtocol::Json);
        assert_eq!(
            &json[..],
            b"{\"arguments\":[\"hi\"],\"target\":\"Send\",\"type\":1}\x1e"
        );
        // The same bytes (same allocation) the second time.
        assert_eq!(encoded.record(HubProtocol::Json).as_ptr(), json.as_ptr());

        let relayed = EncodedMessage::from_record(HubProtocol::Json, json.clone()).unwrap();
        assert_eq!(relayed.record(HubProtocol::Json).as_ptr(), json.as_ptr());
        assert_eq!(
            relayed.record(HubProtocol::MessagePack),
            HubProtocol::MessagePack.encode(&send("hi"))
        );
        assert!(EncodedMessage::from_record(HubProtocol::Json, Bytes::from_static(b"{}")).is_err());
        assert!(EncodedMessage::from_record(
            HubProtocol::MessagePack,
            Bytes::from_static(&[0x02, 0x91, 0x06, 0x00])
        )
        .is_err());
    }
}
