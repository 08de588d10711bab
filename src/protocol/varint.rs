//! Record framing of the MessagePack hub protocol: every record is its length as a VarInt
//! followed by that many bytes (`HubProtocol.md`, "Binary encoding" and "VarInt").
//!
//! The VarInt holds 7 bits per byte, least significant group first, with the high bit set
//! on every byte but the last. Lengths are 32-bit values up to 2 GB (`0x7fffffff`), so a
//! prefix is at most 5 bytes and its fifth byte carries at most 3 bits. As in
//! [`super::framing`], parsing tells "incomplete, read more" apart from "invalid", and the
//! size limit applies to the length a prefix announces, before the body arrives, so that a
//! peer cannot make us buffer without limit.

use bytes::{BufMut, Bytes, BytesMut};

/// Longest length prefix: 5 bytes of 7 bits hold the largest allowed length.
pub const MAX_PREFIX_LEN: usize = 5;

/// Largest length a prefix may announce (the spec's 2 GB bound).
pub const MAX_LENGTH: u32 = 0x7fff_ffff;

/// Why no record could be taken from a buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BinaryFrameError {
    /// The prefix or the body is not all there yet: more input is needed.
    #[error("incomplete record")]
    Incomplete,
    /// The prefix runs past 5 bytes or announces more than 2 GB.
    #[error("messages over 2GB in size are not supported")]
    BadLength,
    /// The announced length is larger than allowed.
    #[error("message of {size} bytes exceeds the maximum message size of {max} bytes")]
    TooLarge {
        /// The length the prefix announced.
        size: usize,
        /// The configured limit.
        max: usize,
    },
}

/// Reads the length prefix at the start of `buf`: the length and the prefix's size.
pub fn read_length(buf: &[u8]) -> Result<(u32, usize), BinaryFrameError> {
    let mut length: u32 = 0;
    for (index, &byte) in buf.iter().take(MAX_PREFIX_LEN).enumerate() {
        let bits = u32::from(byte & 0x7f);
        if index == MAX_PREFIX_LEN - 1 && (byte & 0x80 != 0 || bits > 0x07) {
            // A sixth byte, or bits beyond 31: the spec's maximum is 0xFF 0xFF 0xFF 0xFF 0x07.
            return Err(BinaryFrameError::BadLength);
        }
        length |= bits << (7 * index);
        if byte & 0x80 == 0 {
            return Ok((length, index + 1));
        }
    }
    Err(BinaryFrameError::Incomplete)
}

/// Writes `length` as a VarInt.
pub fn write_length(out: &mut BytesMut, mut length: u32) {
    loop {
        let low = (length & 0x7f) as u8;
        length >>= 7;
        if length == 0 {
            out.put_u8(low);
            return;
        }
        out.put_u8(low | 0x80);
    }
}

/// Finds the first whole record at the start of `buf`.
///
/// Returns the record's body (without its prefix) and the number of bytes it used,
/// prefix included. `max` bounds the announced body length.
pub fn next_record(buf: &[u8], max: usize) -> Result<(&[u8], usize), BinaryFrameError> {
    let (length, prefix) = read_length(buf)?;
    let size = length as usize;
    if size > max {
        return Err(BinaryFrameError::TooLarge { size, max });
    }
    let end = prefix + size;
    match buf.get(prefix..end) {
        Some(body) => Ok((body, end)),
        None => Err(BinaryFrameError::Incomplete),
    }
}

/// Prefixes one encoded record with its length.
///
/// # Panics
/// If `body` is over 2 GB, which no message this server encodes can be.
pub fn frame(body: &[u8]) -> Bytes {
    let length = u32::try_from(body.len())
        .ok()
        .filter(|&length| length <= MAX_LENGTH)
        .expect("a hub message under 2 GB");
    let mut out = BytesMut::with_capacity(body.len() + MAX_PREFIX_LEN);
    write_length(&mut out, length);
    out.extend_from_slice(body);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_examples_decode() {
        assert_eq!(read_length(&[0x35]), Ok((0x35, 1)));
        assert_eq!(read_length(&[0x80, 0x29]), Ok((0x1480, 2)));
        assert_eq!(
            read_length(&[0xff, 0xff, 0xff, 0xff, 0x07]),
            Ok((0x7fff_ffff, 5))
        );
    }

    #[test]
    fn lengths_encode_as_the_spec_shows() {
        for (length, bytes) in [
            (0x35u32, &[0x35u8][..]),
            (0x1480, &[0x80, 0x29]),
            (0x7fff_ffff, &[0xff, 0xff, 0xff, 0xff, 0x07]),
            (0, &[0x00]),
        ] {
            let mut out = BytesMut::new();
            write_length(&mut out, length);
            assert_eq!(&out[..], bytes, "{length:#x}");
        }
    }

    #[test]
    fn the_spec_framing_example_yields_both_records() {
        let input = b"\x0bHello\nWorld\x02\x01\x02";
        let (first, used) = next_record(input, 100).unwrap();
        assert_eq!(first, b"Hello\nWorld");
        let (second, rest) = next_record(&input[used..], 100).unwrap();
        assert_eq!(second, b"\x01\x02");
        assert_eq!(used + rest, input.len());
        assert_eq!(&frame(b"Hello\nWorld")[..], &input[..used]);
    }

    #[test]
    fn a_partial_prefix_or_body_is_incomplete_not_invalid() {
        assert_eq!(next_record(&[], 100), Err(BinaryFrameError::Incomplete));
        assert_eq!(next_record(&[0x80], 100), Err(BinaryFrameError::Incomplete));
        assert_eq!(
            next_record(&[0x03, 1, 2], 100),
            Err(BinaryFrameError::Incomplete)
        );
    }

    #[test]
    fn prefixes_past_five_bytes_or_two_gigabytes_are_invalid() {
        assert_eq!(
            read_length(&[0xff, 0xff, 0xff, 0xff, 0x80]),
            Err(BinaryFrameError::BadLength)
        );
        assert_eq!(
            read_length(&[0xff, 0xff, 0xff, 0xff, 0x08]),
            Err(BinaryFrameError::BadLength)
        );
    }

    #[test]
    fn an_oversized_record_is_rejected_before_its_body_arrives() {
        assert_eq!(
            next_record(&[0x80, 0x01], 100),
            Err(BinaryFrameError::TooLarge {
                size: 128,
                max: 100
            })
        );
    }
}
