//! Record framing of the JSON hub protocol: every record is UTF-8 text followed by the
//! record separator 0x1E (`HubProtocol.md`, "JSON Encoding").
//!
//! A transport message may carry several records, and a record may arrive split over
//! several transport messages, so parsing distinguishes "incomplete, read more"
//! ([`FrameError::Incomplete`]) from "invalid" (everything else).

use bytes::{Buf, Bytes, BytesMut};

/// The byte that ends every JSON hub protocol record.
pub const RECORD_SEPARATOR: u8 = 0x1e;

/// Why no record could be taken from a buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// No record separator yet: more input is needed.
    #[error("incomplete record")]
    Incomplete,
    /// A record (or the unterminated start of one) is larger than allowed.
    #[error("message of {size} bytes exceeds the maximum message size of {max} bytes")]
    TooLarge {
        /// Bytes seen so far.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The record's bytes are not UTF-8.
    #[error("message is not valid UTF-8")]
    NotUtf8,
}

/// Finds the first whole record at the start of `buf`.
///
/// Returns the record's text (without the separator) and the number of bytes it used,
/// separator included. `max` bounds the record's size, also while it is still incomplete,
/// so that a peer cannot make us buffer without limit.
pub fn next_record(buf: &[u8], max: usize) -> Result<(&str, usize), FrameError> {
    match buf.iter().position(|&b| b == RECORD_SEPARATOR) {
        Some(end) if end > max => Err(FrameError::TooLarge { size: end, max }),
        Some(end) => std::str::from_utf8(&buf[..end])
            .map(|text| (text, end + 1))
            .map_err(|_| FrameError::NotUtf8),
        None if buf.len() > max => Err(FrameError::TooLarge {
            size: buf.len(),
            max,
        }),
        None => Err(FrameError::Incomplete),
    }
}

/// Appends the record separator to one encoded record.
pub fn frame(json: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(json.len() + 1);
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(&[RECORD_SEPARATOR]);
    out.freeze()
}

/// Accumulates the bytes of one connection's inbound stream and yields whole records.
#[derive(Debug)]
pub struct RecordBuffer {
    buf: BytesMut,
    max_record: usize,
}

impl RecordBuffer {
    /// A buffer that rejects records larger than `max_record` bytes.
    pub fn new(max_record: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_record,
        }
    }

    /// Adds bytes from the transport.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next whole record, `Ok(None)` when more input is needed.
    pub fn next_record(&mut self) -> Result<Option<String>, FrameError> {
        match next_record(&self.buf, self.max_record) {
            Ok((text, used)) => {
                let text = text.to_owned();
                self.buf.advance(used);
                Ok(Some(text))
            }
            Err(FrameError::Incomplete) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Bytes received that do not yet form a whole record.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The largest record accepted.
    pub fn max_record(&self) -> usize {
        self.max_record
    }

    /// The bytes not taken yet, for a reader of another framing: after the handshake a
    /// MessagePack connection's records follow in the same stream.
    pub fn into_pending(self) -> Bytes {
        self.buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_without_separator_is_incomplete_not_invalid() {
        assert_eq!(
            next_record(b"{\"type\":6}", 100),
            Err(FrameError::Incomplete)
        );
    }

    #[test]
    fn several_records_in_one_buffer_come_out_one_by_one() {
        let mut buf = RecordBuffer::new(100);
        buf.extend(b"{\"type\":6}\x1e{\"type\":7}\x1e{\"ty");
        assert_eq!(buf.next_record().unwrap().as_deref(), Some("{\"type\":6}"));
        assert_eq!(buf.next_record().unwrap().as_deref(), Some("{\"type\":7}"));
        assert_eq!(buf.next_record().unwrap(), None);
        assert_eq!(buf.pending(), 4);
        buf.extend(b"pe\":6}\x1e");
        assert_eq!(buf.next_record().unwrap().as_deref(), Some("{\"type\":6}"));
        assert_eq!(buf.pending(), 0);
    }

    #[test]
    fn a_record_split_byte_by_byte_is_reassembled() {
        let mut buf = RecordBuffer::new(100);
        let input = "{\"a\":\"é\"}\x1e".as_bytes();
        for (i, byte) in input.iter().enumerate() {
            assert_eq!(buf.next_record().unwrap(), None, "early record at byte {i}");
            buf.extend(&[*byte]);
        }
        assert_eq!(buf.next_record().unwrap().as_deref(), Some("{\"a\":\"é\"}"));
    }

    #[test]
    fn an_oversized_record_is_rejected_before_its_separator_arrives() {
        let mut buf = RecordBuffer::new(8);
        buf.extend(b"0123456789");
        assert_eq!(
            buf.next_record(),
            Err(FrameError::TooLarge { size: 10, max: 8 })
        );
        assert_eq!(
            next_record(b"0123456789\x1e", 8),
            Err(FrameError::TooLarge { size: 10, max: 8 })
        );
    }

    #[test]
    fn invalid_utf8_is_invalid() {
        assert_eq!(next_record(b"\xff\xfe\x1e", 100), Err(FrameError::NotUtf8));
    }

    #[test]
    fn frame_appends_the_separator() {
        assert_eq!(&frame("{}")[..], b"{}\x1e");
    }
}
