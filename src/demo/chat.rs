//! The chat demo's hub: the example a template user copies to build their own.
//!
//! A method is one closure: it takes the caller's [`HubContext`], optionally the hub's
//! [`State`] (here the display names), and its arguments as a tuple; it returns a value
//! for the caller or a [`HubError`] whose text the caller sees.
//!
//! Its contract (methods, events, payloads) is documented in `docs/chat-hub.md`; the
//! chat page in `static/` and the interop tests are written against it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde_json::json;

use crate::{ClientStream, ConnectionId, Hub, HubBuilder, HubContext, HubError, State};

/// Longest display name, in characters.
pub(crate) const MAX_NAME: usize = 32;
/// Longest room name, in characters.
const MAX_ROOM: usize = 64;
/// Most items `Counter` streams.
const MAX_COUNT: u32 = 1000;
/// Longest delay between `Counter` items, in milliseconds.
const MAX_DELAY_MS: u64 = 10_000;
/// Most lines one `UploadLines` stream may carry.
const MAX_UPLOAD_LINES: usize = 1000;

/// A chat message as clients receive it in `ReceiveMessage`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ChatMessage<'a> {
    connection_id: &'a str,
    name: String,
    text: String,
    instance: &'a str,
    transport: &'static str,
    room: Option<String>,
    to: Option<String>,
    to_user: Option<String>,
    sent_at: u64,
}

/// A presence event as clients receive it in `Presence`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Presence<'a> {
    kind: &'static str,
    connection_id: &'a str,
    name: String,
    instance: &'a str,
    room: Option<String>,
}

/// Display names of this instance's connections.
#[derive(Default)]
struct Names(Mutex<HashMap<ConnectionId, String>>);

impl Names {
    fn get(&self, ctx: &HubContext) -> String {
        let names = self.0.lock().unwrap_or_else(|e| e.into_inner());
        names
            .get(&ctx.connection_id)
            .cloned()
            .unwrap_or_else(|| default_name(ctx))
    }

    fn set(&self, ctx: &HubContext, name: String) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ctx.connection_id.clone(), name);
    }

    fn forget(&self, ctx: &HubContext) -> String {
        let removed = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ctx.connection_id);
        removed.unwrap_or_else(|| default_name(ctx))
    }
}

fn default_name(ctx: &HubContext) -> String {
    match &ctx.user {
        Some(user) => user.clone(),
        None => format!(
            "guest-{}",
            ctx.connection_id
                .as_str()
                .chars()
                .take(4)
                .collect::<String>()
        ),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Trims and checks a name-like argument.
fn clean(value: &str, what: &str, max: usize) -> Result<String, HubError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(HubError::new(format!("The {what} must not be empty.")));
    }
    if value.chars().count() > max {
        return Err(HubError::new(format!(
            "The {what} must be at most {max} characters."
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(HubError::new(format!(
            "The {what} must not contain control characters."
        )));
    }
    Ok(value.to_owned())
}

fn message<'a>(ctx: &'a HubContext, names: &Names, text: String) -> ChatMessage<'a> {
    ChatMessage {
        connection_id: ctx.connection_id.as_str(),
        name: names.get(ctx),
        text,
        instance: ctx.instance.as_str(),
        transport: ctx.transport.name(),
        room: None,
        to: None,
        to_user: None,
        sent_at: now_ms(),
    }
}

fn presence<'a>(
    ctx: &'a HubContext,
    kind: &'static str,
    name: String,
    room: Option<String>,
) -> Presence<'a> {
    Presence {
        kind,
        connection_id: ctx.connection_id.as_str(),
        name,
        instance: ctx.instance.as_str(),
        room,
    }
}

/// The chat hub: its methods, each an async function (or a closure) below.
pub fn hub() -> HubBuilder {
    Hub::builder("chat")
        .state(Names::default())
        .on_connected(joined)
        .on_disconnected(left)
        .method(
            "Send",
            |ctx: HubContext, (message,): (String,)| async move {
                ctx.clients().all().send("Send", (message,)).await?;
                Ok(())
            },
        )
        .method("WhoAmI", |ctx: HubContext, ()| async move {
            Ok(json!({
                "instance": ctx.instance.as_str(),
                "connectionId": ctx.connection_id.as_str(),
                "transport": ctx.transport.name(),
            }))
        })
        .method("SetName", set_name)
        .method("SendMessage", send_message)
        .method("JoinRoom", join_room)
        .method("LeaveRoom", leave_room)
        .method("SendToRoom", send_to_room)
        .method("SendTo", send_to)
        .method("SendToUser", send_to_user)
        .stream("Counter", counter)
        .method("UploadLines", upload_lines)
        .method("AskClient", ask_client)
}

/// A connection started: everybody else hears it joined.
async fn joined(ctx: HubContext, State(names): State<Names>) {
    tell_others(&ctx, presence(&ctx, "joined", names.get(&ctx), None)).await;
}

/// A connection ended: everybody else hears it left.
async fn left(ctx: HubContext, State(names): State<Names>) {
    tell_others(&ctx, presence(&ctx, "left", names.forget(&ctx), None)).await;
}

/// `SetName(name)`: renames the caller; everybody else hears of it.
async fn set_name(
    ctx: HubContext,
    State(names): State<Names>,
    (name,): (String,),
) -> Result<String, HubError> {
    let name = clean(&name, "name", MAX_NAME)?;
    names.set(&ctx, name.clone());
    let event = presence(&ctx, "renamed", name.clone(), None);
    ctx.clients().others().send("Presence", (event,)).await?;
    Ok(name)
}

/// `SendMessage(text)`: a chat message to everybody.
async fn send_message(
    ctx: HubContext,
    State(names): State<Names>,
    (text,): (String,),
) -> Result<(), HubError> {
    let msg = message(&ctx, &names, text);
    ctx.clients().all().send("ReceiveMessage", (msg,)).await?;
    Ok(())
}

/// `JoinRoom(room)`: the caller joins the room's group; its members hear of it.
async fn join_room(
    ctx: HubContext,
    State(names): State<Names>,
    (room,): (String,),
) -> Result<String, HubError> {
    let room = clean(&room, "room name", MAX_ROOM)?;
    ctx.groups().add(ctx.connection_id.as_str(), &room).await;
    let event = presence(&ctx, "joinedRoom", names.get(&ctx), Some(room.clone()));
    ctx.clients()
        .group(&room)
        .send("Presence", (event,))
        .await?;
    Ok(room)
}

/// `LeaveRoom(room)`: the caller leaves the room; the members left hear of it.
async fn leave_room(
    ctx: HubContext,
    State(names): State<Names>,
    (room,): (String,),
) -> Result<String, HubError> {
    let room = clean(&room, "room name", MAX_ROOM)?;
    ctx.groups().remove(ctx.connection_id.as_str(), &room).await;
    let event = presence(&ctx, "leftRoom", names.get(&ctx), Some(room.clone()));
    ctx.clients()
        .group(&room)
        .send("Presence", (event,))
        .await?;
    Ok(room)
}

/// `SendToRoom(room, text)`: a chat message to the room's members, on every instance.
async fn send_to_room(
    ctx: HubContext,
    State(names): State<Names>,
    (room, text): (String, String),
) -> Result<(), HubError> {
    let room = clean(&room, "room name", MAX_ROOM)?;
    let msg = ChatMessage {
        room: Some(room.clone()),
        ..message(&ctx, &names, text)
    };
    ctx.clients()
        .group(&room)
        .send("ReceiveMessage", (msg,))
        .await?;
    Ok(())
}

/// `SendTo(connectionId, text)`: a chat message to one connection, wherever it is.
async fn send_to(
    ctx: HubContext,
    State(names): State<Names>,
    (to, text): (String, String),
) -> Result<(), HubError> {
    let msg = ChatMessage {
        to: Some(to.clone()),
        ..message(&ctx, &names, text)
    };
    ctx.clients()
        .client(&to)
        .send("ReceiveMessage", (msg,))
        .await?;
    Ok(())
}

/// `SendToUser(user, text)`: a chat message to every connection of a user.
async fn send_to_user(
    ctx: HubContext,
    State(names): State<Names>,
    (user, text): (String, String),
) -> Result<(), HubError> {
    let msg = ChatMessage {
        to_user: Some(user.clone()),
        ..message(&ctx, &names, text)
    };
    ctx.clients()
        .user(&user)
        .send("ReceiveMessage", (msg,))
        .await?;
    Ok(())
}

/// `Counter(count, delayMs)`, a stream: `0 … count-1`, one every `delayMs`.
fn counter(
    _ctx: HubContext,
    (count, delay_ms): (u32, u64),
) -> Result<impl Stream<Item = u32>, HubError> {
    if count > MAX_COUNT || delay_ms > MAX_DELAY_MS {
        return Err(HubError::new(format!(
            "Counter takes at most {MAX_COUNT} items and {MAX_DELAY_MS} ms between them."
        )));
    }
    let delay = Duration::from_millis(delay_ms);
    Ok(futures_util::stream::unfold(0u32, move |i| async move {
        if i >= count {
            return None;
        }
        if i > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((i, i + 1))
    }))
}

/// `UploadLines(lines)`, with `lines` a stream from the client (`signalR.Subject`): each
/// line becomes a chat message to everybody as it arrives; returns how many there were.
async fn upload_lines(
    ctx: HubContext,
    State(names): State<Names>,
    (mut lines,): (ClientStream<String>,),
) -> Result<usize, HubError> {
    let mut count = 0;
    while let Some(line) = lines.next().await {
        // The client's own error text is shown to it (the default hides details).
        let line = line.map_err(|error| HubError::new(error.to_string()))?;
        count += 1;
        if count > MAX_UPLOAD_LINES {
            return Err(HubError::new(format!(
                "UploadLines takes at most {MAX_UPLOAD_LINES} lines."
            )));
        }
        let msg = message(&ctx, &names, line);
        ctx.clients().all().send("ReceiveMessage", (msg,)).await?;
    }
    Ok(count)
}

/// `AskClient(connectionId, question)`: asks another connection, wherever it is, for an
/// answer (its `Ask(fromName, question)` handler's return value) and returns it.
async fn ask_client(
    ctx: HubContext,
    State(names): State<Names>,
    (to, question): (String, String),
) -> Result<String, HubError> {
    let from = names.get(&ctx);
    // Why there is no answer (gone, timed out, refused) is shown to the asker.
    ctx.clients()
        .client(&to)
        .invoke("Ask", (from, question))
        .await
        .map_err(|error| HubError::new(error.to_string()))
}

/// Tells everybody else about a connection coming or going; a hook has nobody to report
/// a failure to, so it is logged.
async fn tell_others(ctx: &HubContext, event: Presence<'_>) {
    if let Err(error) = ctx.clients().others().send("Presence", (event,)).await {
        log::warn!("presence not sent: {error}");
    }
}
