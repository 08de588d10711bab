//! The second demo hub, at `/notifications`: topics that clients subscribe to, and
//! notifications published to a topic's subscribers on every instance.
//!
//! It is the "second hub" a template user adds: one file, plus one line in
//! [`super::app`]. It has its own connections, groups and bus channels: a chat room and
//! a topic of the same name never see each other's messages.
//!
//! | method | arguments | returns | effect |
//! |---|---|---|---|
//! | `Subscribe` | `topic` | the topic | the caller receives the topic's notifications |
//! | `Unsubscribe` | `topic` | the topic | it stops receiving them |
//! | `Publish` | `topic, text` | how many notifications this instance has published | every subscriber receives `Notification` `{topic, text, from, instance}` |
//!
//! A server-side notification greets every connection: `Welcome` `{connectionId,
//! instance}`, sent by the connect hook.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::{Hub, HubBuilder, HubContext, HubError, State};

/// Longest topic name, in characters.
const MAX_TOPIC: usize = 64;

/// A notification as subscribers receive it in `Notification`.
#[derive(Debug, Serialize)]
struct Notification<'a> {
    topic: &'a str,
    text: String,
    /// The publisher's connection id.
    from: &'a str,
    /// The instance the publisher is connected to.
    instance: &'a str,
}

/// Notifications published through this instance.
#[derive(Debug, Default)]
struct Published(AtomicU64);

/// The notifications hub.
pub fn hub() -> HubBuilder {
    Hub::builder("notifications")
        .state(Published::default())
        .on_connected(|ctx: HubContext| async move {
            let welcome = serde_json::json!({
                "connectionId": ctx.connection_id.as_str(),
                "instance": ctx.instance.as_str(),
            });
            if let Err(error) = ctx.clients().caller().send("Welcome", (welcome,)).await {
                log::warn!("welcome not sent: {error}");
            }
        })
        .method(
            "Subscribe",
            |ctx: HubContext, (topic,): (String,)| async move {
                let topic = topic_name(topic)?;
                ctx.groups().add(ctx.connection_id.as_str(), &topic).await;
                Ok(topic)
            },
        )
        .method(
            "Unsubscribe",
            |ctx: HubContext, (topic,): (String,)| async move {
                let topic = topic_name(topic)?;
                ctx.groups()
                    .remove(ctx.connection_id.as_str(), &topic)
                    .await;
                Ok(topic)
            },
        )
        .method("Publish", publish)
}

/// `Publish(topic, text)`: tells every subscriber of `topic`, on every instance.
async fn publish(
    ctx: HubContext,
    State(published): State<Published>,
    (topic, text): (String, String),
) -> Result<u64, HubError> {
    let topic = topic_name(topic)?;
    let notification = Notification {
        topic: &topic,
        text,
        from: ctx.connection_id.as_str(),
        instance: ctx.instance.as_str(),
    };
    let group = ctx.clients().group(&topic);
    group.send("Notification", (notification,)).await?;
    Ok(published.0.fetch_add(1, Ordering::Relaxed) + 1)
}

/// A topic name: trimmed, 1 to [`MAX_TOPIC`] characters.
fn topic_name(topic: String) -> Result<String, HubError> {
    let topic = topic.trim();
    if topic.is_empty() || topic.chars().count() > MAX_TOPIC {
        return Err(HubError::new(format!(
            "A topic has 1 to {MAX_TOPIC} characters."
        )));
    }
    Ok(topic.to_owned())
}
