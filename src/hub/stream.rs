//! Client-to-server streams (HubProtocol.md, "Streaming", upload direction): a hub method
//! takes a [`ClientStream<T>`] anywhere among its arguments, and the client passes a
//! stream there (`connection.send("UploadLines", subject)` with a `signalR.Subject`).
//!
//! On the wire the stream is not in `arguments`: the invocation lists its ids in
//! `streamIds`, then the client sends `StreamItem`s with `invocationId` set to a stream id,
//! and ends each stream with a `Completion` for that id (with `error` if it failed). As in
//! ASP.NET's `DefaultHubDispatcher`, the method's stream parameters take the stream ids in
//! order, and its other parameters take `arguments` in order. [`bind`] does that binding
//! with a small serde deserializer, so a method's argument tuple may mix plain values and
//! streams: `(room, lines): (String, ClientStream<String>)`.
//!
//! Each stream has a bounded buffer (`STREAM_BUFFER_CAPACITY`, ASP.NET's
//! `StreamBufferCapacity`, 10 by default). When it is full, the connection stops reading
//! until the method takes an item: backpressure, never unbounded memory.

use std::cell::RefCell;
use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use serde::de::{self, DeserializeOwned, DeserializeSeed, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use tokio::sync::mpsc;

/// The name `ClientStream` deserializes as, so that the argument binder recognises it.
const MARKER: &str = "$stickless::ClientStream";

/// What a client stream can end with other than its items.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The client completed the stream with an error.
    #[error("the client ended the stream with an error: {0}")]
    Client(String),
    /// An item is not of the stream's type.
    #[error("a stream item could not be read: {0}")]
    Item(String),
    /// The connection ended before the client completed the stream.
    #[error("the connection ended before the client completed the stream")]
    Interrupted,
}

/// What the session feeds into a stream.
#[derive(Debug)]
#[doc(hidden)]
pub enum Fed {
    /// One item.
    Item(Value),
    /// The client's Completion: `None` for a clean end.
    End(Option<String>),
}

/// The session's end of one client stream.
pub(crate) type StreamFeed = mpsc::Sender<Fed>;

/// The method's end of one client stream, before it is bound to a [`ClientStream`].
#[doc(hidden)]
pub type Feed = mpsc::Receiver<Fed>;

/// A stream the client sends to a hub method, item by item; a `Stream` of `Result<T,
/// StreamError>` that ends when the client completes it. Take it as a method argument:
///
/// ```
/// use futures_util::StreamExt;
/// use stickless::{ClientStream, Hub, HubContext, HubError};
///
/// let hub = Hub::builder("upload")
///     .method("CountLines", |_ctx: HubContext, (mut lines,): (ClientStream<String>,)| async move {
///         let mut count = 0;
///         while let Some(line) = lines.next().await {
///             line.map_err(|e| HubError::new(e.to_string()))?;
///             count += 1;
///         }
///         Ok::<_, HubError>(count)
///     })
///     .build()?;
/// # Ok::<(), stickless::BuildError>(())
/// ```
///
/// An error ends the stream: after an `Err` item it yields `None`.
pub struct ClientStream<T> {
    feed: Feed,
    done: bool,
    _items: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for ClientStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientStream")
            .field("done", &self.done)
            .finish()
    }
}

/// Opens a client stream with room for `capacity` items: the session's feed and the
/// receiving half the binder hands to the method.
pub(crate) fn open(capacity: usize) -> (StreamFeed, Feed) {
    mpsc::channel(capacity.max(1))
}

impl<T: DeserializeOwned> Stream for ClientStream<T> {
    type Item = Result<T, StreamError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let next = match self.feed.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(next) => next,
        };
        let item = match next {
            Some(Fed::Item(value)) => {
                serde_json::from_value(value).map_err(|e| StreamError::Item(e.to_string()))
            }
            Some(Fed::End(None)) => {
                self.done = true;
                return Poll::Ready(None);
            }
            Some(Fed::End(Some(error))) => Err(StreamError::Client(error)),
            // The session dropped the feed without a Completion: the connection ended.
            None => Err(StreamError::Interrupted),
        };
        self.done = item.is_err();
        Poll::Ready(Some(item))
    }
}

/// Opening client streams for an invocation failed; the invocation is refused with this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UploadError {
    /// More streams would be open on the connection than `MAX_CLIENT_STREAMS`.
    #[error(
        "the connection may have at most {0} client streams open at once (MAX_CLIENT_STREAMS)"
    )]
    TooMany(usize),
    /// A stream id that is already open.
    #[error("stream ID '{0}' is already in use")]
    InUse(String),
}

/// What became of a fed item or end.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Feeding {
    /// Taken (or dropped for a stream the method no longer reads, or an unknown id).
    Done,
    /// The stream's buffer is full: stop reading until [`Uploads::flush`] resolves.
    Blocked,
}

/// One connection's open client streams, by stream id: the session's side.
#[derive(Debug)]
pub(crate) struct Uploads {
    open: std::collections::HashMap<String, StreamFeed>,
    capacity: usize,
    limit: usize,
    blocked: Option<(StreamFeed, Fed)>,
}

impl Uploads {
    /// No streams yet; each will buffer `capacity` items, and at most `limit` are open.
    pub(crate) fn new(capacity: usize, limit: usize) -> Self {
        Self {
            open: std::collections::HashMap::new(),
            capacity,
            limit,
            blocked: None,
        }
    }

    /// Opens the streams of an invocation's `streamIds`, in order, or none of them.
    pub(crate) fn open(&mut self, ids: &[String]) -> Result<Vec<Feed>, UploadError> {
        self.open.retain(|_, feed| !feed.is_closed());
        if self.open.len() + ids.len() > self.limit {
            return Err(UploadError::TooMany(self.limit));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(id) = ids
            .iter()
            .find(|id| self.open.contains_key(*id) || !seen.insert(*id))
        {
            return Err(UploadError::InUse(id.clone()));
        }
        Ok(ids
            .iter()
            .map(|id| {
                let (feed, stream) = open(self.capacity);
                self.open.insert(id.clone(), feed);
                stream
            })
            .collect())
    }

    /// Whether `id` is an open client stream (its Completion ends it, rather than answer
    /// a client-result invocation).
    pub(crate) fn is_open(&self, id: &str) -> bool {
        self.open.contains_key(id)
    }

    /// Feeds a StreamItem or the stream's end. Items for unknown ids are ignored, as
    /// ASP.NET does; a stream whose method stopped reading is forgotten.
    pub(crate) fn feed(&mut self, id: &str, fed: Fed) -> Feeding {
        let end = matches!(fed, Fed::End(_));
        let Some(feed) = (if end {
            self.open.remove(id)
        } else {
            self.open.get(id).cloned()
        }) else {
            log::debug!("ignoring a stream message for unknown stream id {id}");
            return Feeding::Done;
        };
        match feed.try_send(fed) {
            Ok(()) => Feeding::Done,
            Err(mpsc::error::TrySendError::Full(fed)) => {
                self.blocked = Some((feed, fed));
                Feeding::Blocked
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.open.remove(id);
                Feeding::Done
            }
        }
    }

    /// Whether an item waits for room in its stream's buffer.
    pub(crate) fn is_blocked(&self) -> bool {
        self.blocked.is_some()
    }

    /// Resolves once the waiting item is in its buffer (or its method stopped reading).
    /// Cancel-safe: dropped early, the item still waits.
    pub(crate) async fn flush(&mut self) {
        let Some((feed, _)) = &self.blocked else {
            return;
        };
        let permit = feed.clone().reserve_owned().await;
        if let (Some((_, fed)), Ok(permit)) = (self.blocked.take(), permit) {
            permit.send(fed);
        }
    }
}

thread_local! {
    /// The stream the binder is handing to the `ClientStream` being deserialized. Binding
    /// is synchronous, so a value put here is taken by the very next deserialization.
    static HANDED: RefCell<Option<Feed>> = const { RefCell::new(None) };
}

impl<'de, T> Deserialize<'de> for ClientStream<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Marker<T>(PhantomData<T>);
        impl<'de, T> Visitor<'de> for Marker<T> {
            type Value = ClientStream<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a stream from the client (in streamIds)")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                let feed = HANDED
                    .with(|slot| slot.borrow_mut().take())
                    .ok_or_else(|| {
                        E::custom("a stream argument was not sent as a stream (streamIds)")
                    })?;
                Ok(ClientStream {
                    feed,
                    done: false,
                    _items: PhantomData,
                })
            }
        }
        deserializer.deserialize_newtype_struct(MARKER, Marker(PhantomData))
    }
}

/// Binds an invocation's `arguments` and client streams to `A`, a tuple whose
/// [`ClientStream`] elements take the streams in order and whose other elements take the
/// arguments in order. Zero of both binds to `()`. Every argument and every stream must
/// be used, as in ASP.NET (a wrong count is an error).
pub(crate) fn bind<A: DeserializeOwned>(
    arguments: Vec<Value>,
    streams: Vec<Feed>,
) -> Result<A, String> {
    let mut source = Arguments {
        arguments: arguments.into_iter(),
        streams: streams.into_iter(),
    };
    let bound = A::deserialize(&mut source).map_err(|e| e.to_string())?;
    let (left, unread) = (source.arguments.len(), source.streams.len());
    if unread > 0 {
        return Err(format!(
            "the client sent {unread} stream(s) more than the method takes"
        ));
    }
    if left > 0 {
        return Err(format!(
            "the client sent {left} argument(s) more than the method takes"
        ));
    }
    Ok(bound)
}

/// The invocation's values and streams, as a serde sequence.
struct Arguments {
    arguments: std::vec::IntoIter<Value>,
    streams: std::vec::IntoIter<Feed>,
}

/// The serde error of binding.
#[derive(Debug)]
struct BindError(String);

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BindError {}

impl de::Error for BindError {
    fn custom<M: fmt::Display>(message: M) -> Self {
        Self(message.to_string())
    }
}

impl<'de> Deserializer<'de> for &mut Arguments {
    type Error = BindError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, BindError> {
        visitor.visit_seq(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, BindError> {
        // `()` takes no argument; anything sent is then one too many (checked by `bind`).
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de> de::SeqAccess<'de> for Arguments {
    type Error = BindError;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, BindError> {
        if self.arguments.len() == 0 && self.streams.len() == 0 {
            return Ok(None);
        }
        seed.deserialize(Element(self)).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.arguments.len() + self.streams.len())
    }
}

/// One element of the sequence: the next stream for a `ClientStream`, else the next value.
struct Element<'a>(&'a mut Arguments);

impl Element<'_> {
    fn value(self) -> Result<Value, BindError> {
        self.0
            .arguments
            .next()
            .ok_or_else(|| BindError("the client sent too few arguments".into()))
    }
}

impl<'de> Deserializer<'de> for Element<'_> {
    type Error = BindError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, BindError> {
        self.value()?
            .deserialize_any(visitor)
            .map_err(|e| BindError(e.to_string()))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, BindError> {
        if name != MARKER {
            return self
                .value()?
                .deserialize_newtype_struct(name, visitor)
                .map_err(|e| BindError(e.to_string()));
        }
        let feed =
            self.0.streams.next().ok_or_else(|| {
                BindError("the method takes a stream the client did not send".into())
            })?;
        HANDED.with(|slot| *slot.borrow_mut() = Some(feed));
        let bound = visitor.visit_unit();
        HANDED.with(|slot| slot.borrow_mut().take());
        bound
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, BindError> {
        self.value()?
            .deserialize_option(visitor)
            .map_err(|e| BindError(e.to_string()))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use futures_util::{FutureExt, StreamExt};

    use super::*;

    fn streams(n: usize) -> (Vec<StreamFeed>, Vec<Feed>) {
        (0..n).map(|_| open(4)).unzip()
    }

    #[tokio::test]
    async fn streams_and_values_bind_by_position_like_aspnet() {
        let (feeds, receivers) = streams(2);
        let (a, mut first, n, mut second): (String, ClientStream<u32>, u8, ClientStream<String>) =
            bind(vec![Value::from("room"), Value::from(7)], receivers).unwrap();
        assert_eq!((a.as_str(), n), ("room", 7));
        feeds[0].send(Fed::Item(Value::from(1))).await.unwrap();
        feeds[0].send(Fed::End(None)).await.unwrap();
        feeds[1].send(Fed::Item(Value::from("x"))).await.unwrap();
        feeds[1].send(Fed::End(Some("boom".into()))).await.unwrap();
        assert_eq!(first.next().await, Some(Ok(1)));
        assert_eq!(first.next().await, None);
        assert_eq!(second.next().await, Some(Ok("x".into())));
        assert_eq!(
            second.next().await,
            Some(Err(StreamError::Client("boom".into())))
        );
        assert_eq!(second.next().await, None);
    }

    #[test]
    fn counts_must_match() {
        let unit: Result<(), _> = bind(vec![], vec![]);
        assert!(unit.is_ok());
        let error = bind::<()>(vec![], streams(1).1).unwrap_err();
        assert!(error.contains("1 stream(s) more"), "{error}");
        assert!(bind::<(ClientStream<u32>,)>(vec![], vec![]).is_err());
        assert!(bind::<(u32, ClientStream<u32>)>(vec![Value::from(1)], vec![]).is_err());
        let error = bind::<(ClientStream<u32>,)>(vec![Value::from(1)], streams(1).1).unwrap_err();
        assert!(error.contains("1 argument(s) more"), "{error}");
        let error = bind::<(u32, ClientStream<u32>)>(vec![], streams(1).1).unwrap_err();
        assert!(error.contains("too few"), "{error}");
        assert!(bind::<(String,)>(vec![Value::from(1)], vec![]).is_err());
    }

    #[tokio::test]
    async fn a_full_buffer_blocks_until_the_method_reads_and_limits_hold() {
        let mut uploads = Uploads::new(1, 2);
        let streams = uploads.open(&["a".into()]).unwrap();
        assert_eq!(
            uploads.open(&["a".into()]).err(),
            Some(UploadError::InUse("a".into()))
        );
        assert_eq!(
            uploads.open(&["b".into(), "c".into()]).err(),
            Some(UploadError::TooMany(2))
        );
        assert_eq!(uploads.feed("a", Fed::Item(Value::from(1))), Feeding::Done);
        assert_eq!(
            uploads.feed("a", Fed::Item(Value::from(2))),
            Feeding::Blocked
        );
        assert!(uploads.is_blocked());
        let (mut numbers,): (ClientStream<u32>,) = bind(vec![], streams).unwrap();
        let ((), first) = tokio::join!(uploads.flush(), numbers.next());
        assert_eq!(first, Some(Ok(1)));
        assert!(!uploads.is_blocked());
        assert_eq!(
            uploads.feed("nope", Fed::Item(Value::from(3))),
            Feeding::Done
        );
        assert_eq!(uploads.feed("a", Fed::End(None)), Feeding::Blocked);
        assert!(uploads.flush().now_or_never().is_none(), "no room yet");
        assert!(uploads.is_blocked(), "a cancelled flush keeps the item");
        let ((), second) = tokio::join!(uploads.flush(), numbers.next());
        assert_eq!(second, Some(Ok(2)));
        assert_eq!(numbers.next().await, None);
        assert!(!uploads.is_open("a"));
        drop(numbers);
        assert!(uploads.open(&["b".into(), "c".into()]).is_ok());
    }

    #[tokio::test]
    async fn bad_items_and_dropped_feeds_end_the_stream_with_an_error() {
        let (feeds, receivers) = streams(1);
        let (mut numbers,): (ClientStream<u32>,) = bind(vec![], receivers).unwrap();
        feeds[0].send(Fed::Item(Value::from("x"))).await.unwrap();
        assert!(matches!(
            numbers.next().await,
            Some(Err(StreamError::Item(_)))
        ));
        assert_eq!(numbers.next().await, None);
        let (feeds, receivers) = streams(1);
        let (mut numbers,): (ClientStream<u32>,) = bind(vec![], receivers).unwrap();
        drop(feeds);
        assert_eq!(numbers.next().await, Some(Err(StreamError::Interrupted)));
    }
}
