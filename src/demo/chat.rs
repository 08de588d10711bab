//! The chat demo's hub: the one module a template user edits to build their own app.
//!
//! Its contract (methods, events, payloads) is documented in `docs/chat-hub.md`; the
//! chat page in `static/` and the interop tests are written against it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::json;

use crate::hub::{Hub, HubBuilder, HubContext, HubError};
use crate::protocol::token::ConnectionId;

/// Longest display name, in characters.
pub(crate) const MAX_NAME: usize = 32;
/// Longest room name, in characters.
const MAX_ROOM: usize = 64;
/// Most items `Counter` streams.
const MAX_COUNT: u32 = 1000;
/// Longest delay between `Counter` items, in milliseconds.
const MAX_DELAY_MS: u64 = 10_000;

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

/// The chat hub.
pub fn hub() -> HubBuilder {
    let names = Arc::new(Names::default());
    let n = || names.clone();
    Hub::builder("chat")
        .on_connected({
            let names = n();
            move |ctx: HubContext| {
                let names = names.clone();
                async move {
                    let event = presence(&ctx, "joined", names.get(&ctx), None);
                    if let Err(error) = ctx.clients().others().send("Presence", (event,)).await {
                        log::warn!("presence not sent: {error}");
                    }
                }
            }
        })
        .on_disconnected({
            let names = n();
            move |ctx: HubContext| {
                let names = names.clone();
                async move {
                    let event = presence(&ctx, "left", names.forget(&ctx), None);
                    if let Err(error) = ctx.clients().others().send("Presence", (event,)).await {
                        log::warn!("presence not sent: {error}");
                    }
                }
            }
        })
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
        .method("SetName", {
            let names = n();
            move |ctx: HubContext, (name,): (String,)| {
                let names = names.clone();
                async move {
                    let name = clean(&name, "name", MAX_NAME)?;
                    names.set(&ctx, name.clone());
                    let event = presence(&ctx, "renamed", name.clone(), None);
                    ctx.clients().others().send("Presence", (event,)).await?;
                    Ok(name)
                }
            }
        })
        .method("SendMessage", {
            let names = n();
            move |ctx: HubContext, (text,): (String,)| {
                let names = names.clone();
                async move {
                    let msg = message(&ctx, &names, text);
                    ctx.clients().all().send("ReceiveMessage", (msg,)).await?;
                    Ok(())
                }
            }
        })
        .method("JoinRoom", {
            let names = n();
            move |ctx: HubContext, (room,): (String,)| {
                let names = names.clone();
                async move {
                    let room = clean(&room, "room name", MAX_ROOM)?;
                    ctx.groups().add(ctx.connection_id.as_str(), &room).await;
                    let event = presence(&ctx, "joinedRoom", names.get(&ctx), Some(room.clone()));
                    ctx.clients()
                        .group(&room)
                        .send("Presence", (event,))
                        .await?;
                    Ok(room)
                }
            }
        })
        .method("LeaveRoom", {
            let names = n();
            move |ctx: HubContext, (room,): (String,)| {
                let names = names.clone();
                async move {
                    let room = clean(&room, "room name", MAX_ROOM)?;
                    ctx.groups().remove(ctx.connection_id.as_str(), &room).await;
                    let event = presence(&ctx, "leftRoom", names.get(&ctx), Some(room.clone()));
                    ctx.clients()
                        .group(&room)
                        .send("Presence", (event,))
                        .await?;
                    Ok(room)
                }
            }
        })
        .method("SendToRoom", {
            let names = n();
            move |ctx: HubContext, (room, text): (String, String)| {
                let names = names.clone();
                async move {
                    let room = clean(&room, "room name", MAX_ROOM)?;
                    let mut msg = message(&ctx, &names, text);
                    msg.room = Some(room.clone());
                    ctx.clients()
                        .group(&room)
                        .send("ReceiveMessage", (msg,))
                        .await?;
                    Ok(())
                }
            }
        })
        .method("SendTo", {
            let names = n();
            move |ctx: HubContext, (connection_id, text): (String, String)| {
                let names = names.clone();
                async move {
                    let mut msg = message(&ctx, &names, text);
                    msg.to = Some(connection_id.clone());
                    ctx.clients()
                        .client(&connection_id)
                        .send("ReceiveMessage", (msg,))
                        .await?;
                    Ok(())
                }
            }
        })
        .method("SendToUser", {
            let names = n();
            move |ctx: HubContext, (user, text): (String, String)| {
                let names = names.clone();
                async move {
                    let mut msg = message(&ctx, &names, text);
                    msg.to_user = Some(user.clone());
                    ctx.clients()
                        .user(&user)
                        .send("ReceiveMessage", (msg,))
                        .await?;
                    Ok(())
                }
            }
        })
        .stream(
            "Counter",
            |_ctx: HubContext, (count, delay_ms): (u32, u64)| {
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
            },
        )
}
