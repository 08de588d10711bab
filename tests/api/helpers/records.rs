//! The JSON hub protocol's records, as tests see them (signalr-protocol.md, "Framing").

use serde_json::Value;

/// The hub's path.
pub const HUB: &str = "/chat";
/// The JSON protocol's record separator.
pub const RS: char = '\u{1e}';
/// The handshake every client sends.
pub const HANDSHAKE: &str = "{\"protocol\":\"json\",\"version\":1}\u{1e}";

/// Splits a body of JSON records at the record separator and parses each one.
pub fn parse_records(body: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(body).expect("records are UTF-8");
    assert!(
        text.is_empty() || text.ends_with(RS),
        "a batch must hold only whole records: {text:?}"
    );
    text.split(RS)
        .filter(|record| !record.is_empty())
        .map(|record| {
            serde_json::from_str(record)
                .unwrap_or_else(|e| panic!("record {record:?} is not JSON: {e}"))
        })
        .collect()
}

/// A record: the JSON text followed by the separator.
pub fn frame(message: &Value) -> String {
    format!("{message}{RS}")
}

/// Whether `record` is a hub message of type `kind`.
pub fn is_type(record: &Value, kind: u64) -> bool {
    record["type"].as_u64() == Some(kind)
}

/// Whether `record` is an Invocation of `target` (any case) from the server.
pub fn is_call(record: &Value, target: &str) -> bool {
    is_type(record, 1)
        && record["target"]
            .as_str()
            .is_some_and(|t| t.eq_ignore_ascii_case(target))
}

/// Whether `record` is the Completion of invocation `id`.
pub fn is_completion(record: &Value, id: &str) -> bool {
    is_type(record, 3) && record["invocationId"] == id
}

/// Whether `record` is the empty handshake reply `{}`.
pub fn is_handshake_reply(record: &Value) -> bool {
    record.as_object().is_some_and(|o| o.is_empty())
}

/// The `error` of a Close record.
pub fn close_error(record: &Value) -> String {
    assert!(is_type(record, 7), "not a Close message: {record}");
    record["error"]
        .as_str()
        .unwrap_or_else(|| panic!("a Close message without error: {record}"))
        .to_owned()
}
