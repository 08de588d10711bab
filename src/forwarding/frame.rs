//! The frames of a request relayed over the bus, and their binary encoding (pure: no
//! actix, tokio or redis).
//!
//! A relay is a conversation between the instance that received a client's request (the
//! *receiver*) and the instance that holds its connection (the *owner*), named by a random
//! [`CorrelationId`]. The receiver sends [`Frame::Open`]; the owner answers at once with
//! [`Frame::Accepted`] or [`Frame::Miss`], then [`Frame::Head`], any number of
//! [`Frame::Data`] and [`Frame::End`]. Either side may end it early ([`Frame::Cancel`]
//! from the receiver, `End` from the owner). A relayed WebSocket carries
//! [`Frame::WsText`], [`Frame::WsBinary`] and [`Frame::WsClose`] both ways after its
//! `Head` (status 101).
//!
//! Encoding: one byte of kind, 16 bytes of correlation id, then the kind's fields, each
//! string or byte field prefixed by its length (u32, big endian). Decoding checks every
//! length against what is there and rejects trailing bytes, so a malformed frame is an
//! error, never a panic. One bus message carries a batch: packets, each prefixed by its
//! length ([`encode_batch`]), so frames already waiting travel together.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest body chunk in one [`Frame::Data`]: a long event stream or poll batch travels
/// as several frames, so no single bus message grows with it.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Names one relay; random, so it cannot be guessed to inject frames into another relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CorrelationId([u8; 16]);

impl CorrelationId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl std::fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A request to relay to the owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The instance to send the answer to (an instance id, checked by the caller).
    pub reply_to: String,
    /// The HTTP method.
    pub method: String,
    /// Path and query, e.g. `/chat?id=…`.
    pub path: String,
    /// The request headers worth forwarding.
    pub headers: Vec<(String, Bytes)>,
    /// The request body (already within the body limit).
    pub body: Bytes,
    /// A WebSocket upgrade: frames follow both ways after a 101 `Head`.
    pub websocket: bool,
}

/// One frame of a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Receiver → owner: serve this request.
    Open(Open),
    /// Owner → receiver: the connection is here and the request is being served.
    Accepted,
    /// Owner → receiver: no such connection here (the client gets 404).
    Miss,
    /// Owner → receiver: the response's status and headers.
    Head {
        /// The status code.
        status: u16,
        /// The headers worth relaying.
        headers: Vec<(String, Bytes)>,
    },
    /// Owner → receiver: a piece of the response body.
    Data(Bytes),
    /// Owner → receiver: the response (or the WebSocket) is over.
    End,
    /// Receiver → owner: the client went away; stop serving.
    Cancel,
    /// Either way: a WebSocket text message.
    WsText(Bytes),
    /// Either way: a WebSocket binary message.
    WsBinary(Bytes),
    /// Either way: a WebSocket close, with its code and reason.
    WsClose {
        /// The close code (1000 normal, …); 0 when the close carried none.
        code: u16,
        /// The reason text.
        reason: String,
    },
}

/// A frame and the relay it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// The relay.
    pub id: CorrelationId,
    /// The frame.
    pub frame: Frame,
}

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// It ends before its fields do.
    #[error("relay frame is truncated")]
    Truncated,
    /// An unknown kind byte.
    #[error("unknown relay frame kind {0}")]
    Kind(u8),
    /// A text field is not UTF-8.
    #[error("relay frame has a text field that is not UTF-8")]
    Utf8,
    /// Bytes after the last field.
    #[error("relay frame has trailing bytes")]
    Trailing,
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(bytes.len() as u32);
    out.put_slice(bytes);
}

fn put_headers(out: &mut BytesMut, headers: &[(String, Bytes)]) {
    out.put_u32(headers.len() as u32);
    for (name, value) in headers {
        put_bytes(out, name.as_bytes());
        put_bytes(out, value);
    }
}

struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize) -> Result<(), FrameError> {
        if self.0.remaining() < n {
            Err(FrameError::Truncated)
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn bytes(&mut self) -> Result<Bytes, FrameError> {
        let len = self.u32()? as usize;
        self.need(len)?;
        Ok(self.0.split_to(len))
    }
    fn string(&mut self) -> Result<String, FrameError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| FrameError::Utf8)
    }
    fn headers(&mut self) -> Result<Vec<(String, Bytes)>, FrameError> {
        let count = self.u32()? as usize;
        // Every header takes at least 8 bytes: a count beyond that is a lie.
        self.need(count.saturating_mul(8))?;
        (0..count)
            .map(|_| Ok((self.string()?, self.bytes()?)))
            .collect()
    }
}

impl Packet {
    /// The frame's bytes on the bus.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(32);
        let kind = match &self.frame {
            Frame::Open(_) => 1,
            Frame::Accepted => 2,
            Frame::Miss => 3,
            Frame::Head { .. } => 4,
            Frame::Data(_) => 5,
            Frame::End => 6,
            Frame::Cancel => 7,
            Frame::WsText(_) => 8,
            Frame::WsBinary(_) => 9,
            Frame::WsClose { .. } => 10,
        };
        out.put_u8(kind);
        out.put_slice(&self.id.0);
        match &self.frame {
            Frame::Open(open) => {
                put_bytes(&mut out, open.reply_to.as_bytes());
                put_bytes(&mut out, open.method.as_bytes());
                put_bytes(&mut out, open.path.as_bytes());
                put_headers(&mut out, &open.headers);
                put_bytes(&mut out, &open.body);
                out.put_u8(u8::from(open.websocket));
            }
            Frame::Head { status, headers } => {
                out.put_u16(*status);
                put_headers(&mut out, headers);
            }
            Frame::Data(bytes) | Frame::WsText(bytes) | Frame::WsBinary(bytes) => {
                put_bytes(&mut out, bytes)
            }
            Frame::WsClose { code, reason } => {
                out.put_u16(*code);
                put_bytes(&mut out, reason.as_bytes());
            }
            Frame::Accepted | Frame::Miss | Frame::End | Frame::Cancel => {}
        }
        out.freeze()
    }

    /// Reads a frame from the bus.
    pub fn decode(bytes: Bytes) -> Result<Self, FrameError> {
        let mut r = Reader(bytes);
        let kind = r.u8()?;
        r.need(16)?;
        let mut id = [0u8; 16];
        r.0.copy_to_slice(&mut id);
        let frame = match kind {
            1 => Frame::Open(Open {
                reply_to: r.string()?,
                method: r.string()?,
                path: r.string()?,
                headers: r.headers()?,
                body: r.bytes()?,
                websocket: r.u8()? != 0,
            }),
            2 => Frame::Accepted,
            3 => Frame::Miss,
            4 => Frame::Head {
                status: r.u16()?,
                headers: r.headers()?,
            },
            5 => Frame::Data(r.bytes()?),
            6 => Frame::End,
            7 => Frame::Cancel,
            8 => Frame::WsText(r.bytes()?),
            9 => Frame::WsBinary(r.bytes()?),
            10 => Frame::WsClose {
                code: r.u16()?,
                reason: r.string()?,
            },
            other => return Err(FrameError::Kind(other)),
        };
        if r.0.has_remaining() {
            return Err(FrameError::Trailing);
        }
        Ok(Self {
            id: CorrelationId(id),
            frame,
        })
    }
}

/// The bytes of several packets in one bus message, in order.
pub fn encode_batch(packets: &[Packet]) -> Bytes {
    let mut out = BytesMut::new();
    for packet in packets {
        put_bytes(&mut out, &packet.encode());
    }
    out.freeze()
}

/// The packets of one bus message, in order.
pub fn decode_batch(bytes: Bytes) -> Result<Vec<Packet>, FrameError> {
    let mut r = Reader(bytes);
    let mut packets = Vec::new();
    while r.0.has_remaining() {
        packets.push(Packet::decode(r.bytes()?)?);
    }
    Ok(packets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_frame() -> Vec<Frame> {
        vec![
            Frame::Open(Open {
                reply_to: "node-1".into(),
                method: "POST".into(),
                path: "/chat?id=abc".into(),
                headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
                body: Bytes::from_static(b"{\"type\":6}\x1e"),
                websocket: false,
            }),
            Frame::Accepted,
            Frame::Miss,
            Frame::Head {
                status: 200,
                headers: vec![("x".into(), Bytes::from_static(b"\xff\x00"))],
            },
            Frame::Data(Bytes::from_static(b"data: {}\r\n\r\n")),
            Frame::End,
            Frame::Cancel,
            Frame::WsText(Bytes::from_static(b"{}\x1e")),
            Frame::WsBinary(Bytes::from_static(&[0, 1, 2])),
            Frame::WsClose {
                code: 1000,
                reason: "bye".into(),
            },
        ]
    }

    #[test]
    fn every_frame_survives_encoding() {
        for frame in every_frame() {
            let packet = Packet {
                id: CorrelationId::random(),
                frame,
            };
            assert_eq!(Packet::decode(packet.encode()), Ok(packet));
        }
    }

    #[test]
    fn a_batch_keeps_its_packets_and_their_order() {
        let id = CorrelationId::random();
        let packets: Vec<Packet> = every_frame()
            .into_iter()
            .map(|frame| Packet { id, frame })
            .collect();
        let bytes = encode_batch(&packets);
        assert_eq!(decode_batch(bytes.clone()), Ok(packets));
        assert!(decode_batch(bytes.slice(..bytes.len() - 1)).is_err());
        assert_eq!(decode_batch(Bytes::new()), Ok(vec![]));
    }

    #[test]
    fn truncated_and_padded_frames_are_errors_not_panics() {
        for frame in every_frame() {
            let bytes = Packet {
                id: CorrelationId::random(),
                frame,
            }
            .encode();
            for cut in 0..bytes.len() {
                assert!(Packet::decode(bytes.slice(..cut)).is_err(), "cut at {cut}");
            }
            let mut padded = bytes.to_vec();
            padded.push(0);
            assert_eq!(
                Packet::decode(Bytes::from(padded)),
                Err(FrameError::Trailing)
            );
        }
        let mut lying = vec![4u8];
        lying.extend([0; 16]);
        lying.extend(200u16.to_be_bytes());
        lying.extend(u32::MAX.to_be_bytes());
        assert_eq!(
            Packet::decode(Bytes::from(lying)),
            Err(FrameError::Truncated)
        );
        assert_eq!(
            Packet::decode(Bytes::from(vec![99u8; 17])),
            Err(FrameError::Kind(99))
        );
    }
}
