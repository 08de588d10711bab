//! The chat demo's hub: the example a template user copies to build their own.
//!
//! A method is one async function: it takes the caller's [`HubContext`], optionally the
//! hub's [`State`] (here [`Chat`]: presence and history), and its arguments as a tuple;
//! it returns a value for the caller or a [`HubError`] whose text the caller sees.
//!
//! A connection is not "online" until it calls `Join(name)` (or `SetName`), so everybody
//! hears one "Bob joined" instead of a guest joining and then being renamed. Joins,
//! leaves and renames go out coalesced, one `Presence` batch per second (see
//! [`crate::presence`]), so a storm of connects does not cost a message per pair.
//!
//! Its contract (methods, events, payloads) is documented in `docs/chat-hub.md`; the
//! chat page in `static/` and the interop tests are written against it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};

use crate::presence::{History, Member, Presence, Store};
use crate::{ClientStream, Hub, HubBuilder, HubContext, HubError, Settings, State};

/// Longest display name, in characters.
pub(crate) const MAX_NAME: usize = 32;
/// Longest room name, in characters.
const MAX_ROOM: usize = 64;
/// Longest chat message, in characters.
const MAX_TEXT: usize = 4000;
/// Most items `Counter` streams.
const MAX_COUNT: u32 = 1000;
/// Longest delay between `Counter` items, in milliseconds.
const MAX_DELAY_MS: u64 = 10_000;
/// Most lines one `UploadLines` stream may carry.
const MAX_UPLOAD_LINES: usize = 1000;
/// Most members `Join` lists (it says how many there are in all).
const MAX_LISTED: usize = 200;
/// The conversation everybody is in (history key).
const LOBBY: &str = "lobby";

/// The chat hub's state: who is online and what was said.
pub struct Chat {
    presence: Presence,
    history: History,
}

/// A chat message as clients receive it in `ReceiveMessage`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ChatMessage<'a> {
    /// Unique per message, so a client can drop one it already shows (history on
    /// reconnect).
    id: String,
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

/// A room event (`joinedRoom`, `leftRoom`) as the room's members receive it in
/// `Presence`; sent at once, unbatched: rooms are small.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RoomEvent<'a> {
    kind: &'static str,
    connection_id: &'a str,
    name: String,
    instance: &'a str,
    room: String,
    at: u64,
}

/// Someone is typing, as clients receive it in `Typing`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Typing<'a> {
    connection_id: &'a str,
    name: String,
    room: Option<String>,
}

impl Chat {
    /// The caller's display name: the one it joined with, else its user id, else a
    /// guest name.
    fn name(&self, ctx: &HubContext) -> String {
        self.presence
            .name_of(ctx.connection_id.as_str())
            .or_else(|| ctx.user.clone())
            .unwrap_or_else(|| {
                let short: String = ctx.connection_id.as_str().chars().take(4).collect();
                format!("guest-{short}")
            })
    }

    /// A message from the caller, stored in `conversation`'s history when given.
    async fn message(
        &self,
        ctx: &HubContext,
        text: String,
        conversation: Option<&str>,
        fill: impl FnOnce(&mut Value),
    ) -> Result<Value, HubError> {
        let text = check_text(text)?;
        let message = ChatMessage {
            id: format!("{:016x}", rand::random::<u64>()),
            connection_id: ctx.connection_id.as_str(),
            name: self.name(ctx),
            text,
            instance: ctx.instance.as_str(),
            transport: ctx.transport.name(),
            room: None,
            to: None,
            to_user: None,
            sent_at: now_ms(),
        };
        let mut message =
            serde_json::to_value(message).map_err(|e| HubError::new(e.to_string()))?;
        fill(&mut message);
        if let Some(conversation) = conversation {
            if let Err(error) = self.history.push(conversation, &message).await {
                log::warn!("chat: message not kept in history: {error}");
            }
        }
        Ok(message)
    }

    async fn history(&self, conversation: &str) -> Vec<Value> {
        self.history
            .recent(conversation)
            .await
            .unwrap_or_else(|error| {
                log::warn!("chat: history of {conversation} not read: {error}");
                Vec::new()
            })
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

fn check_text(text: String) -> Result<String, HubError> {
    if text.chars().count() > MAX_TEXT {
        return Err(HubError::new(format!(
            "A message must be at most {MAX_TEXT} characters."
        )));
    }
    Ok(text)
}

fn room_key(room: &str) -> String {
    format!("room:{room}")
}

/// The chat hub, its presence and history in Redis when `settings` name one.
pub fn hub(settings: &Settings) -> HubBuilder {
    let store = Store::of(settings);
    Hub::builder("chat")
        .state(Chat {
            presence: Presence::new("chat", store),
            history: History::new("chat", store),
        })
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
        .method("Join", join)
        .method("SetName", set_name)
        .method("Online", online)
        .method("History", history)
        .method("Typing", typing)
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

/// A connection ended: if it had joined, everybody hears it left (in the next batch).
async fn left(ctx: HubContext, State(chat): State<Chat>) {
    chat.presence.leave(ctx.connection_id.as_str()).await;
}

/// Joins (or renames) the caller as `name`.
async fn enter(ctx: &HubContext, chat: &Chat, name: &str) -> Result<String, HubError> {
    let name = clean(name, "name", MAX_NAME)?;
    let member = Member {
        connection_id: ctx.connection_id.as_str().to_owned(),
        name: name.clone(),
        instance: ctx.instance.as_str().to_owned(),
        since: now_ms(),
    };
    chat.presence.join(ctx.clients(), member).await;
    Ok(name)
}

/// `Join(name)`: the caller comes online as `name`; returns who is online (the first
/// [`MAX_LISTED`], and how many in all) and the lobby's recent messages. Calling it again renames.
async fn join(
    ctx: HubContext,
    State(chat): State<Chat>,
    (name,): (String,),
) -> Result<Value, HubError> {
    let name = enter(&ctx, &chat, &name).await?;
    let mut online = chat.presence.members().await;
    let count = online.len();
    online.truncate(MAX_LISTED);
    Ok(json!({
        "name": name,
        "connectionId": ctx.connection_id.as_str(),
        "instance": ctx.instance.as_str(),
        "transport": ctx.transport.name(),
        "online": online,
        "onlineCount": count,
        "history": chat.history(LOBBY).await,
    }))
}

/// `SetName(name)`: renames the caller (everybody hears the old and the new name), or
/// joins it under that name if it had not joined.
async fn set_name(
    ctx: HubContext,
    State(chat): State<Chat>,
    (name,): (String,),
) -> Result<String, HubError> {
    let name = clean(&name, "name", MAX_NAME)?;
    if chat.presence.name_of(ctx.connection_id.as_str()).is_some() {
        chat.presence
            .rename(ctx.connection_id.as_str(), &name)
            .await;
        Ok(name)
    } else {
        enter(&ctx, &chat, &name).await
    }
}

/// `Online()`: everybody online, cluster-wide.
async fn online(
    _ctx: HubContext,
    State(chat): State<Chat>,
    (): (),
) -> Result<Vec<Member>, HubError> {
    Ok(chat.presence.members().await)
}

/// `History(room)`: the recent messages of a room, or of the lobby for `null`.
async fn history(
    _ctx: HubContext,
    State(chat): State<Chat>,
    (room,): (Option<String>,),
) -> Result<Vec<Value>, HubError> {
    Ok(match room {
        Some(room) => {
            chat.history(&room_key(&clean(&room, "room name", MAX_ROOM)?))
                .await
        }
        None => chat.history(LOBBY).await,
    })
}

/// `Typing(room)`: tells the others (of the room, or everybody for `null`) that the
/// caller is typing. Pages send it at most every few seconds while keys are pressed.
async fn typing(
    ctx: HubContext,
    State(chat): State<Chat>,
    (room,): (Option<String>,),
) -> Result<(), HubError> {
    let event = Typing {
        connection_id: ctx.connection_id.as_str(),
        name: chat.name(&ctx),
        room: room.clone(),
    };
    match room {
        Some(room) => {
            let room = clean(&room, "room name", MAX_ROOM)?;
            ctx.clients()
                .others_in_group(&room)
                .send("Typing", (event,))
                .await?
        }
        None => ctx.clients().others().send("Typing", (event,)).await?,
    }
    Ok(())
}

/// `SendMessage(text)`: a chat message to everybody, kept in the lobby's history.
async fn send_message(
    ctx: HubContext,
    State(chat): State<Chat>,
    (text,): (String,),
) -> Result<(), HubError> {
    let msg = chat.message(&ctx, text, Some(LOBBY), |_| {}).await?;
    ctx.clients().all().send("ReceiveMessage", (msg,)).await?;
    Ok(())
}

/// Tells a room's members that someone came or went; at once, since rooms are small.
async fn room_event(
    ctx: &HubContext,
    chat: &Chat,
    kind: &'static str,
    room: &str,
) -> Result<(), HubError> {
    let event = RoomEvent {
        kind,
        connection_id: ctx.connection_id.as_str(),
        name: chat.name(ctx),
        instance: ctx.instance.as_str(),
        room: room.to_owned(),
        at: now_ms(),
    };
    ctx.clients().group(room).send("Presence", (event,)).await?;
    Ok(())
}

/// `JoinRoom(room)`: the caller joins the room's group; its members hear of it.
async fn join_room(
    ctx: HubContext,
    State(chat): State<Chat>,
    (room,): (String,),
) -> Result<String, HubError> {
    let room = clean(&room, "room name", MAX_ROOM)?;
    ctx.groups().add(ctx.connection_id.as_str(), &room).await;
    room_event(&ctx, &chat, "joinedRoom", &room).await?;
    Ok(room)
}

/// `LeaveRoom(room)`: the caller leaves the room; the members left hear of it.
async fn leave_room(
    ctx: HubContext,
    State(chat): State<Chat>,
    (room,): (String,),
) -> Result<String, HubError> {
    let room = clean(&room, "room name", MAX_ROOM)?;
    ctx.groups().remove(ctx.connection_id.as_str(), &room).await;
    room_event(&ctx, &chat, "leftRoom", &room).await?;
    Ok(room)
}

/// `SendToRoom(room, text)`: a chat message to the room's members, on every instance,
/// kept in the room's history.
async fn send_to_room(
    ctx: HubContext,
    State(chat): State<Chat>,
    (room, text): (String, String),
) -> Result<(), HubError> {
    let room = clean(&room, "room name", MAX_ROOM)?;
    let key = room_key(&room);
    let msg = chat
        .message(&ctx, text, Some(&key), |m| {
            m["room"] = Value::from(room.clone())
        })
        .await?;
    ctx.clients()
        .group(&room)
        .send("ReceiveMessage", (msg,))
        .await?;
    Ok(())
}

/// `SendTo(connectionId, text)`: a private message to one connection, wherever it is;
/// returns the message, so the sender can show what it sent.
async fn send_to(
    ctx: HubContext,
    State(chat): State<Chat>,
    (to, text): (String, String),
) -> Result<Value, HubError> {
    let msg = chat
        .message(&ctx, text, None, |m| m["to"] = Value::from(to.clone()))
        .await?;
    ctx.clients()
        .client(&to)
        .send("ReceiveMessage", (&msg,))
        .await?;
    Ok(msg)
}

/// `SendToUser(user, text)`: a private message to every connection of a user; returns
/// the message, as `SendTo` does.
async fn send_to_user(
    ctx: HubContext,
    State(chat): State<Chat>,
    (user, text): (String, String),
) -> Result<Value, HubError> {
    let msg = chat
        .message(&ctx, text, None, |m| {
            m["toUser"] = Value::from(user.clone())
        })
        .await?;
    ctx.clients()
        .user(&user)
        .send("ReceiveMessage", (&msg,))
        .await?;
    Ok(msg)
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
/// line becomes a chat message to everybody (kept in the lobby's history) as it arrives;
/// returns how many there were.
async fn upload_lines(
    ctx: HubContext,
    State(chat): State<Chat>,
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
        let msg = chat.message(&ctx, line, Some(LOBBY), |_| {}).await?;
        ctx.clients().all().send("ReceiveMessage", (msg,)).await?;
    }
    Ok(count)
}

/// `AskClient(connectionId, question)`: asks another connection, wherever it is, for an
/// answer (its `Ask(fromName, question)` handler's return value) and returns it.
async fn ask_client(
    ctx: HubContext,
    State(chat): State<Chat>,
    (to, question): (String, String),
) -> Result<String, HubError> {
    let from = chat.name(&ctx);
    // Why there is no answer (gone, timed out, refused) is shown to the asker.
    ctx.clients()
        .client(&to)
        .invoke("Ask", (from, question))
        .await
        .map_err(|error| HubError::new(error.to_string()))
}
