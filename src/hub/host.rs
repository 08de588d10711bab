//! The hub host: one per hub and instance. It owns dispatch — an invocation becomes a
//! Completion, a stream or an error there, with ASP.NET's texts — the hub's local
//! clients, and the draining of the hub's bus. Sessions only move messages between
//! their transport and the host, so dispatch is tested here without a connection.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use serde_json::Value;

use super::{Hub, HubContext, Method};
use crate::bus::peers::Peers;
use crate::bus::{Bus, Envelope, Event, Events, GroupCommand, InstanceHandler};
use crate::clients::{Clients, LocalClients};
use crate::outbox::Outbox;
use crate::protocol::hub_protocol::{EncodedMessage, HubProtocol};
use crate::protocol::message::{HubMessage, Outcome};
use crate::protocol::negotiate::TransportKind;
use crate::protocol::token::{ConnectionId, InstanceId};

/// The identity of one connection, as the hub sees it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Its id.
    pub connection_id: ConnectionId,
    /// Its user.
    pub user: Option<String>,
    /// Its transport.
    pub transport: TransportKind,
}

/// What an invocation became.
pub enum Invoked {
    /// Nothing runs: send this at once (an error Completion), or nothing at all for an
    /// invocation without id, which is never answered (HubProtocol.md, "Invocations").
    Done(Option<HubMessage>),
    /// A unary method runs: the future resolves to its Completion (`None` for an
    /// invocation without id).
    Unary(BoxFuture<'static, Option<HubMessage>>),
    /// A streaming method runs: its StreamItems, then its Completion, which has no result
    /// (HubProtocol.md, "Streaming"). The client may cancel it by `invocation_id`.
    Stream {
        /// The id the client cancels the stream with.
        invocation_id: String,
        /// The messages to send.
        messages: BoxStream<'static, HubMessage>,
    },
}

/// A hub together with what its methods need at run time.
pub struct HubHost {
    hub: Hub,
    local: Arc<LocalClients>,
    bus: Arc<dyn Bus>,
    instance: InstanceId,
    detailed_errors: bool,
}

fn completion(invocation_id: String, outcome: Outcome) -> HubMessage {
    HubMessage::Completion {
        invocation_id,
        outcome,
    }
}

impl HubHost {
    /// Hosts `hub` on this instance, reaching other instances over `bus`.
    pub fn new(hub: Hub, bus: Arc<dyn Bus>, instance: InstanceId) -> Self {
        Self {
            hub,
            local: Arc::new(LocalClients::default()),
            bus,
            instance,
            detailed_errors: false,
        }
    }

    /// Sends callers the detail of errors (ASP.NET's `EnableDetailedErrors`), not only
    /// ASP.NET's generic texts.
    pub fn with_detailed_errors(mut self, detailed: bool) -> Self {
        self.detailed_errors = detailed;
        self
    }

    /// Whether callers get the detail of errors.
    pub fn detailed_errors(&self) -> bool {
        self.detailed_errors
    }

    /// The hub's bus, for health.
    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    /// The context for hub code running on behalf of `caller`.
    pub fn context(&self, caller: &Caller) -> HubContext {
        HubContext {
            connection_id: caller.connection_id.clone(),
            user: caller.user.clone(),
            transport: caller.transport,
            instance: self.instance.clone(),
            clients: Clients::new(
                self.local.clone(),
                self.bus.clone(),
                caller.connection_id.clone(),
            ),
        }
    }

    /// Turns an Invocation or StreamInvocation from the caller of `context` into what to
    /// run and send. Other messages are not invocations: `Done(None)`.
    pub fn invoke(&self, context: &HubContext, message: HubMessage) -> Invoked {
        let (invocation_id, target, arguments, stream_ids, streaming) = match message {
            HubMessage::Invocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
            } => (invocation_id, target, arguments, stream_ids, false),
            HubMessage::StreamInvocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
            } => (Some(invocation_id), target, arguments, stream_ids, true),
            _ => return Invoked::Done(None),
        };
        let error = |text: String| {
            Invoked::Done(
                invocation_id
                    .clone()
                    .map(|id| completion(id, Outcome::Error(text))),
            )
        };
        if !stream_ids.is_empty() {
            return error(format!(
                "Failed to invoke '{target}': client-to-server streaming is not supported by this server."
            ));
        }
        // The texts are ASP.NET's (`DefaultHubDispatcher`), which clients show as they are.
        let method = match (self.hub.method(&target), streaming) {
            (None, _) => return error(format!("Unknown hub method '{target}'")),
            (Some((name, Method::Stream(_))), false) => {
                return error(format!(
                    "The client attempted to invoke the streaming '{name}' method with a non-streaming invocation."
                ))
            }
            (Some((name, Method::Unary(_))), true) => {
                return error(format!(
                    "The client attempted to invoke the non-streaming '{name}' method with a streaming invocation."
                ))
            }
            (Some((name, method)), _) => (name.to_owned(), method),
        };
        let (name, method) = method;
        let detailed = self.detailed_errors;
        match method {
            Method::Unary(call) => {
                let running = call(context.clone(), arguments);
                let connection_id = context.connection_id.clone();
                Invoked::Unary(
                    async move {
                        let result = running.await;
                        let Some(invocation_id) = invocation_id else {
                            if let Err(error) = result {
                                log::debug!(
                                    "connection {}: {target} failed: {error}",
                                    connection_id.for_log()
                                );
                            }
                            return None;
                        };
                        let outcome = match result {
                            Ok(Value::Null) => Outcome::Void,
                            Ok(value) => Outcome::Result(value),
                            Err(error) => Outcome::Error(error.client_text(&name, detailed)),
                        };
                        Some(completion(invocation_id, outcome))
                    }
                    .boxed(),
                )
            }
            Method::Stream(call) => {
                let invocation_id = invocation_id.unwrap_or_default();
                match call(context.clone(), arguments) {
                    Ok(items) => {
                        let id = invocation_id.clone();
                        let done = completion(invocation_id.clone(), Outcome::Void);
                        let messages = items
                            .map(move |item| HubMessage::StreamItem {
                                invocation_id: id.clone(),
                                item,
                            })
                            .chain(futures_util::stream::once(async { done }))
                            .boxed();
                        Invoked::Stream {
                            invocation_id,
                            messages,
                        }
                    }
                    Err(failure) => Invoked::Done(Some(completion(
                        invocation_id,
                        Outcome::Error(failure.client_text(&name, detailed)),
                    ))),
                }
            }
        }
    }

    /// Makes a connection reachable (here and through the bus), then runs the hub's
    /// connect hook.
    pub async fn connect(&self, caller: &Caller, outbox: Outbox) {
        let topics = self
            .local
            .add(&caller.connection_id, caller.user.as_deref(), outbox);
        self.bus.subscribe(topics).await;
        if let Some(hook) = &self.hub.on_connected {
            hook(self.context(caller)).await;
        }
    }

    /// Runs the hub's disconnect hook, then forgets the connection.
    pub async fn disconnect(&self, caller: &Caller) {
        if let Some(hook) = &self.hub.on_disconnected {
            hook(self.context(caller)).await;
        }
        let topics = self.local.remove(&caller.connection_id);
        self.bus.unsubscribe(topics).await;
    }

    /// Drains the hub's bus: delivers what other instances sent to local recipients,
    /// applies their group commands to local connections, and hands announcements to
    /// peer discovery (`peers`) and frames addressed to this instance to `frames` (both on
    /// the one bus that carries them). Runs until the bus ends.
    pub async fn drain(
        self: Arc<Self>,
        mut events: Events,
        peers: Option<Arc<Peers>>,
        frames: Option<InstanceHandler>,
    ) {
        while let Some(event) = events.next().await {
            match event {
                Event::Received(Envelope::Message { audience, record }) => {
                    // The bus carries JSON records (see `Clients`): the JSON recipients
                    // get these very bytes, the MessagePack ones one re-encoding.
                    match EncodedMessage::from_record(HubProtocol::Json, record) {
                        Ok(message) => {
                            self.local.deliver(&audience, &message);
                        }
                        Err(error) => log::warn!("bus: dropped an unreadable message: {error}"),
                    }
                }
                Event::Received(Envelope::Group(command)) => {
                    let GroupCommand {
                        connection,
                        group,
                        join,
                    } = command;
                    // Every instance hears the command; the one holding the connection
                    // applies it, the others find nothing to change.
                    let _ = (self.local)
                        .change_group(&*self.bus, &connection, &group, join)
                        .await;
                }
                Event::Received(Envelope::Announcement(announcement)) => {
                    if let Some(peers) = &peers {
                        peers.receive(announcement, &*self.bus).await;
                    }
                }
                Event::Received(Envelope::ToInstance { payload, .. }) => {
                    if let Some(frames) = &frames {
                        frames(payload).await;
                    }
                }
                Event::Connected => {
                    if let Some(peers) = &peers {
                        peers.connected(&*self.bus).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::InProcess;
    use crate::hub::HubError;

    fn host() -> HubHost {
        let hub = Hub::builder("test")
            .method("Echo", |_ctx: HubContext, (text,): (String,)| async move {
                Ok::<_, HubError>(text)
            })
            .method("Nothing", |_ctx: HubContext, ()| async move {
                Ok::<_, HubError>(())
            })
            .method("Refuse", |_ctx: HubContext, ()| async move {
                Err::<(), _>(HubError::new("No."))
            })
            .stream("Count", |_ctx: HubContext, (n,): (u32,)| {
                Ok(futures_util::stream::iter(0..n))
            })
            .build()
            .unwrap();
        HubHost::new(hub, Arc::new(InProcess), InstanceId::parse("i").unwrap())
    }

    fn context(host: &HubHost) -> HubContext {
        host.context(&Caller {
            connection_id: ConnectionId::random(),
            user: None,
            transport: TransportKind::WebSockets,
        })
    }

    fn call(target: &str, id: Option<&str>, arguments: Vec<Value>) -> HubMessage {
        HubMessage::Invocation {
            invocation_id: id.map(str::to_owned),
            target: target.into(),
            arguments,
            stream_ids: vec![],
        }
    }

    fn stream(target: &str, arguments: Vec<Value>) -> HubMessage {
        HubMessage::StreamInvocation {
            invocation_id: "s".into(),
            target: target.into(),
            arguments,
            stream_ids: vec![],
        }
    }

    /// Runs an invocation to the end; returns what the client would receive.
    async fn run(message: HubMessage) -> Vec<HubMessage> {
        let host = host();
        match host.invoke(&context(&host), message) {
            Invoked::Done(reply) => reply.into_iter().collect(),
            Invoked::Unary(running) => running.await.into_iter().collect(),
            Invoked::Stream { messages, .. } => messages.collect().await,
        }
    }

    fn error(id: &str, text: &str) -> Vec<HubMessage> {
        vec![completion(id.into(), Outcome::Error(text.into()))]
    }

    #[tokio::test]
    async fn a_unary_method_completes_with_its_result_and_matches_names_ignoring_case() {
        let reply = run(call("echo", Some("1"), vec![Value::from("hi")])).await;
        assert_eq!(
            reply,
            vec![completion("1".into(), Outcome::Result(Value::from("hi")))]
        );
        let reply = run(call("Nothing", Some("2"), vec![])).await;
        assert_eq!(reply, vec![completion("2".into(), Outcome::Void)]);
    }

    #[tokio::test]
    async fn an_invocation_without_id_is_never_answered() {
        assert_eq!(
            run(call("Echo", None, vec![Value::from("x")])).await,
            vec![]
        );
        assert_eq!(run(call("Nope", None, vec![])).await, vec![]);
        assert_eq!(run(call("Refuse", None, vec![])).await, vec![]);
    }

    #[tokio::test]
    async fn errors_carry_aspnets_texts() {
        assert_eq!(
            run(call("Nope", Some("1"), vec![])).await,
            error("1", "Unknown hub method 'Nope'")
        );
        assert_eq!(
            run(call("count", Some("2"), vec![Value::from(1)])).await,
            error(
                "2",
                "The client attempted to invoke the streaming 'Count' method with a non-streaming invocation."
            )
        );
        assert_eq!(
            run(stream("Echo", vec![Value::from("x")])).await,
            error(
                "s",
                "The client attempted to invoke the non-streaming 'Echo' method with a streaming invocation."
            )
        );
        assert_eq!(
            run(call("Refuse", Some("3"), vec![])).await,
            error(
                "3",
                "An unexpected error occurred invoking 'Refuse' on the server. HubException: No."
            )
        );
    }

    #[tokio::test]
    async fn wrong_arguments_fail_the_invocation_with_a_clear_error() {
        for arguments in [
            vec![],
            vec![Value::from(1)],
            vec![Value::from("a"), Value::from("b")],
        ] {
            let reply = run(call("Echo", Some("1"), arguments)).await;
            let [HubMessage::Completion {
                outcome: Outcome::Error(text),
                ..
            }] = &reply[..]
            else {
                panic!("not an error completion: {reply:?}");
            };
            // The detail is only sent with detailed errors on, as in ASP.NET.
            assert_eq!(
                text,
                "Failed to invoke 'Echo' due to an error on the server."
            );
        }
    }

    #[tokio::test]
    async fn client_to_server_streams_are_refused() {
        let message = HubMessage::Invocation {
            invocation_id: Some("1".into()),
            target: "Echo".into(),
            arguments: vec![],
            stream_ids: vec!["7".into()],
        };
        assert_eq!(
            run(message).await,
            error(
                "1",
                "Failed to invoke 'Echo': client-to-server streaming is not supported by this server."
            )
        );
    }

    #[tokio::test]
    async fn a_stream_sends_its_items_then_a_completion_without_result() {
        let item = |n: u32| HubMessage::StreamItem {
            invocation_id: "s".into(),
            item: Value::from(n),
        };
        assert_eq!(
            run(stream("Count", vec![Value::from(2)])).await,
            vec![item(0), item(1), completion("s".into(), Outcome::Void)]
        );
    }
}
