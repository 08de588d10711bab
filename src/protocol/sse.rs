//! Server-Sent Events framing of outgoing records (`TransportProtocols.md`, "Server-Sent
//! Events"; ASP.NET `ServerSentEventsMessageFormatter.cs`).
//!
//! Each batch of whole records becomes one unnamed event: the payload is split at `\n`,
//! a trailing `\r` is dropped from each line, each line is written as `data: <line>\r\n`,
//! and an empty line ends the event. No `event:`, `id:` or `retry:` fields are sent.

use bytes::{Bytes, BytesMut};

/// The comment line written and flushed as soon as the stream opens: some browsers fire
/// EventSource's `open` only after the first bytes, and the client's start waits for it.
pub const PREAMBLE: &[u8] = b":\r\n";

/// Formats one batch of whole records as one SSE event.
pub fn event(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 16);
    for line in payload.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_becomes_one_data_line_and_a_blank_line() {
        assert_eq!(
            &event(b"{\"type\":6}\x1e")[..],
            b"data: {\"type\":6}\x1e\r\n\r\n"
        );
    }

    #[test]
    fn each_payload_line_gets_its_own_data_field() {
        assert_eq!(
            &event(b"a\r\nb\nc")[..],
            b"data: a\r\ndata: b\r\ndata: c\r\n\r\n"
        );
    }
}
