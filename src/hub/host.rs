//! The hub host: one per hub and instance. It owns dispatch — an invocation becomes a
//! Completion, a stream or an error there, with ASP.NET's texts — the hub's local
//! clients, the client results its methods wait for, and the draining of the hub's bus.
//! Sessions only move messages between their transport and the host, so dispatch is
//! tested here without a connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};

use super::stream::Feed;
use super::{Hub, HubContext, Method, RequestHead};
use crate::bus::peers::Peers;
use crate::bus::{
    Audience, Bus, ClientReply, Envelope, Event, Events, GroupCommand, InstanceHandler, MessageId,
};
use crate::clients::{
    Answered, ClientResults, Clients, InvokeError, LocalClients, DEFAULT_CLIENT_RESULT_TIMEOUT,
};
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
    /// The request that started its transport.
    pub request: Arc<RequestHead>,
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
    results: Arc<ClientResults>,
    instance: InstanceId,
    detailed_errors: bool,
    fences: Fences,
}

/// How long [`HubHost::fence`] waits for its markers to come back (the broker is down, or
/// far behind): then the session moves without the guarantee, as it did without a fence.
const FENCE_TIMEOUT: Duration = Duration::from_millis(500);

/// The fences this host waits for: id → markers still out, and whom to tell.
#[derive(Default)]
struct Fences {
    next: std::sync::atomic::AtomicU64,
    waiting: std::sync::Mutex<std::collections::HashMap<u64, (usize, oneshot::Sender<()>)>>,
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
            results: Arc::new(ClientResults::new(
                instance.clone(),
                DEFAULT_CLIENT_RESULT_TIMEOUT,
            )),
            instance,
            detailed_errors: false,
            fences: Fences::default(),
        }
    }

    /// Makes methods wait at most `timeout` for a client's result (`CLIENT_RESULT_TIMEOUT`).
    pub fn with_client_result_timeout(mut self, timeout: Duration) -> Self {
        self.results = Arc::new(ClientResults::new(self.instance.clone(), timeout));
        self
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

    /// The hub it hosts.
    pub fn hub(&self) -> &Hub {
        &self.hub
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
            request: caller.request.clone(),
            clients: Clients::new(
                self.local.clone(),
                self.bus.clone(),
                self.results.clone(),
                caller.connection_id.clone(),
            ),
        }
    }

    /// Turns an Invocation or StreamInvocation from the caller of `context` into what to
    /// run and send. Other messages are not invocations: `Done(None)`. `streams` are the
    /// client streams the session opened for the invocation's `streamIds`, in order; a
    /// method that does not take them drops them, which ends their feeding.
    pub fn invoke(&self, context: &HubContext, message: HubMessage, streams: Vec<Feed>) -> Invoked {
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
        // The session opened one stream per id; the ids themselves are its business.
        debug_assert_eq!(stream_ids.len(), streams.len());
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
                let running = call(context.clone(), arguments, streams);
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
                            Ok(None) => Outcome::Void,
                            Ok(Some(value)) => Outcome::Result(value),
                            Err(error) => Outcome::Error(error.client_text(&name, detailed)),
                        };
                        Some(completion(invocation_id, outcome))
                    }
                    .boxed(),
                )
            }
            Method::Stream(call) => {
                let invocation_id = invocation_id.unwrap_or_default();
                match call(context.clone(), arguments, streams) {
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
        self.attach(caller, outbox).await;
        if let Some(hook) = &self.hub.on_connected {
            hook(self.context(caller)).await;
        }
    }

    /// Registers a connection that is moving here from another instance, without the
    /// connect hook (it connected there): messages for it reach it from now on.
    pub async fn attach(&self, caller: &Caller, outbox: Outbox) {
        let topics = self
            .local
            .add(&caller.connection_id, caller.user.as_deref(), outbox);
        self.bus.subscribe(topics).await;
    }

    /// Puts a connection that is moving here into exactly `groups` here: joins those it
    /// is not in yet, leaves the others (groups it left on its old instance meanwhile).
    pub async fn set_groups(&self, id: &ConnectionId, groups: &[String]) {
        for group in self.local.groups_of(id) {
            if !groups.contains(&group) {
                let _ = self.local.change_group(&*self.bus, id, &group, false).await;
            }
        }
        for group in groups {
            let _ = self.local.change_group(&*self.bus, id, group, true).await;
        }
    }

    /// The groups a local connection is in.
    pub fn groups_of(&self, id: &ConnectionId) -> Vec<String> {
        self.local.groups_of(id)
    }

    /// Waits until every message published before this call to any audience `connection`
    /// is in here (everyone, the connection itself, its user, each of its groups) was
    /// delivered here: a marker sent on each of those topics comes back through the bus
    /// after them, and the bus's events are delivered in order ([`HubHost::drain`]).
    /// A stateful session that moves away calls this before it stops receiving here: the
    /// instance it moves to started receiving for it (its groups included,
    /// [`HubHost::groups_of`]) before it asked, so a message published before that is in
    /// the buffer that moves, and one published after reaches the new instance (the two
    /// overlap, see `Outbox::complete_move`). The other instance may have had it from the
    /// broker before this one, by any margin, so without the fence a message could miss
    /// both. After [`FENCE_TIMEOUT`] it returns anyway (logged).
    pub async fn fence(&self, connection: &ConnectionId) {
        if !self.bus.is_shared() {
            return; // One instance: nothing travels between instances.
        }
        let mut audiences = vec![
            Audience::All { except: vec![] },
            Audience::Connection(connection.clone()),
        ];
        audiences.extend(self.local.user_of(connection).map(Audience::User));
        audiences.extend(self.local.groups_of(connection).into_iter().map(|name| {
            Audience::Group {
                name,
                except: vec![],
            }
        }));
        let id = self
            .fences
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (done, came_back) = oneshot::channel();
        self.fences
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (audiences.len(), done));
        for audience in audiences {
            self.bus.publish(Envelope::Fence { audience, id }).await;
        }
        if !matches!(
            tokio::time::timeout(FENCE_TIMEOUT, came_back).await,
            Ok(Ok(()))
        ) {
            self.fences
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            log::debug!("fence for {}: not back in time", connection.for_log());
        }
    }

    /// Resolves once what this instance published so far is with the broker (bounded):
    /// an instance about to pull a session flushes first, so that the messages it
    /// delivered here before it began receiving for the session are delivered by the
    /// session's old instance before that one's fence ([`HubHost::fence`]).
    pub async fn flush(&self) {
        self.bus.flush().await;
    }

    /// One marker of fence `id` came back.
    fn fenced(&self, id: u64) {
        let mut waiting = self
            .fences
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((left, _)) = waiting.get_mut(&id) {
            *left -= 1;
            if *left == 0 {
                if let Some((_, done)) = waiting.remove(&id) {
                    let _ = done.send(());
                }
            }
        }
    }

    /// Forgets a connection without the disconnect hook (it moved to another instance);
    /// returns the groups it was in. Once this returns, no delivery reaches its outbox.
    pub async fn detach(&self, id: &ConnectionId) -> Vec<String> {
        let groups = self.local.groups_of(id);
        let topics = self.local.remove(id);
        self.bus.unsubscribe(topics).await;
        groups
    }

    /// Runs the hub's disconnect hook, then forgets the connection; the results it still
    /// owed fail, here and on the instances that asked.
    pub async fn disconnect(&self, caller: &Caller) {
        if let Some(hook) = &self.hub.on_disconnected {
            hook(self.context(caller)).await;
        }
        let topics = self.local.remove(&caller.connection_id);
        self.bus.unsubscribe(topics).await;
        for reply in self.results.disconnected(&caller.connection_id) {
            self.bus.publish(Envelope::Reply(reply)).await;
        }
    }

    /// A Completion from a client that is not the end of one of its streams: the answer
    /// to a client-result invocation, for a method here or on the instance that asked.
    /// Completions nobody waits for are ignored, as ASP.NET does.
    pub fn client_completed(
        &self,
        connection: &ConnectionId,
        invocation_id: &str,
        outcome: Outcome,
    ) {
        match self.results.complete(connection, invocation_id, outcome) {
            Answered::Relay(reply) => {
                let bus = self.bus.clone();
                tokio::spawn(async move { bus.publish(Envelope::Reply(reply)).await });
            }
            Answered::Delivered => {}
            Answered::Unknown => log::debug!(
                "connection {connection}: ignoring a Completion for unknown invocation {invocation_id}"
            ),
        }
    }

    /// Asks a client held here for a result on behalf of a method on another instance,
    /// whose answer is relayed back there.
    async fn asked_from_elsewhere(&self, asked: crate::bus::ClientInvocation) {
        let crate::bus::ClientInvocation {
            connection,
            invocation_id,
            reply_to,
            target,
            arguments,
        } = asked;
        if !self.local.contains(&connection) {
            return; // Only the instance holding the connection answers.
        }
        self.results
            .relay(&connection, &invocation_id, reply_to.clone());
        let message = EncodedMessage::new(HubMessage::Invocation {
            invocation_id: Some(invocation_id.clone()),
            target,
            arguments,
            stream_ids: Vec::new(),
        });
        if self.local.deliver(
            &Audience::Connection(connection.clone()),
            &message,
            Some(MessageId::random()),
        ) == 0
        {
            let gone = InvokeError::Disconnected(connection.clone()).to_string();
            if let Answered::Relay(reply) =
                self.results
                    .complete(&connection, &invocation_id, Outcome::Error(gone))
            {
                self.bus.publish(Envelope::Reply(reply)).await;
            }
        }
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
                Event::Received(Envelope::Message {
                    audience,
                    record,
                    id,
                }) => {
                    // The bus carries JSON records (see `Clients`): the JSON recipients
                    // get these very bytes, the MessagePack ones one re-encoding.
                    match EncodedMessage::from_record(HubProtocol::Json, record) {
                        Ok(message) => {
                            self.local.deliver(&audience, &message, id);
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
                Event::Received(Envelope::Invoke(asked)) => {
                    self.asked_from_elsewhere(asked).await;
                }
                Event::Received(Envelope::Reply(reply)) => self.answered(reply),
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
                // Everything before it was delivered above, in order.
                Event::Fenced(id) => self.fenced(id),
                // A bus hands a fence back as `Fenced`, never as an envelope.
                Event::Received(Envelope::Fence { .. }) => {}
            }
        }
    }
}

impl HubHost {
    /// A client's answer relayed from the instance holding it.
    fn answered(&self, reply: ClientReply) {
        self.results.answer(reply);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::bus::InProcess;
    use crate::hub::stream::{Fed, Feeding, Uploads};
    use crate::hub::{ClientStream, HubError};

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
            .method(
                "Sum",
                |_ctx: HubContext, (base, mut items): (u32, ClientStream<u32>)| async move {
                    let mut sum = base;
                    while let Some(item) = items.next().await {
                        sum += item?;
                    }
                    Ok::<_, HubError>(sum)
                },
            )
            .method("Ask", |ctx: HubContext, (id,): (String,)| async move {
                Ok::<u32, HubError>(ctx.clients().client(&id).invoke("Question", (1,)).await?)
            })
            .build()
            .unwrap();
        HubHost::new(hub, Arc::new(InProcess), InstanceId::parse("i").unwrap())
            .with_client_result_timeout(Duration::from_secs(60))
    }

    fn context(host: &HubHost) -> HubContext {
        host.context(&Caller {
            connection_id: ConnectionId::random(),
            user: None,
            transport: TransportKind::WebSockets,
            request: Default::default(),
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
        match host.invoke(&context(&host), message, vec![]) {
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

    /// Invokes `target` with `arguments` and one client stream, `s1`, as the session does.
    fn upload(host: &HubHost, target: &str, arguments: Vec<Value>) -> (Uploads, Invoked) {
        let mut uploads = Uploads::new(2, 4);
        let feeds = uploads.open(&["s1".into()]).unwrap();
        let message = HubMessage::Invocation {
            invocation_id: Some("1".into()),
            target: target.into(),
            arguments,
            stream_ids: vec!["s1".into()],
        };
        let running = host.invoke(&context(host), message, feeds);
        (uploads, running)
    }

    /// The error text of a Completion.
    fn error_text(reply: Option<HubMessage>) -> String {
        match reply {
            Some(HubMessage::Completion {
                outcome: Outcome::Error(text),
                ..
            }) => text,
            other => panic!("not an error completion: {other:?}"),
        }
    }

    /// Feeds stream `s1` as the session does, waiting for room when its buffer is full.
    async fn feed(uploads: &mut Uploads, fed: Vec<Fed>) {
        for fed in fed {
            if uploads.feed("s1", fed) == Feeding::Blocked {
                uploads.flush().await;
            }
        }
    }

    async fn unary(invoked: Invoked) -> Option<HubMessage> {
        match invoked {
            Invoked::Unary(running) => running.await,
            Invoked::Done(reply) => reply,
            Invoked::Stream { .. } => panic!("not unary"),
        }
    }

    #[tokio::test]
    async fn a_client_stream_feeds_its_method_until_the_client_completes_it() {
        let host = host();
        let (mut uploads, running) = upload(&host, "Sum", vec![Value::from(100)]);
        // More items than the buffer holds: the feeder waits for room.
        let mut fed: Vec<Fed> = (1..=5).map(|n| Fed::Item(Value::from(n))).collect();
        fed.push(Fed::End(None));
        let ((), reply) = tokio::join!(feed(&mut uploads, fed), unary(running));
        assert_eq!(
            reply,
            Some(completion("1".into(), Outcome::Result(Value::from(115))))
        );
    }

    #[tokio::test]
    async fn a_client_stream_error_fails_the_method_with_the_clients_text() {
        let host = host().with_detailed_errors(true);
        let (mut uploads, running) = upload(&host, "Sum", vec![Value::from(0)]);
        feed(&mut uploads, vec![Fed::End(Some("oops".into()))]).await;
        let text = error_text(unary(running).await);
        assert_eq!(
            text,
            "An unexpected error occurred invoking 'Sum' on the server. Exception: oops"
        );
    }

    #[tokio::test]
    async fn streams_a_method_does_not_take_fail_the_invocation() {
        let host = host().with_detailed_errors(true);
        let (mut uploads, running) = upload(&host, "Echo", vec![Value::from("x")]);
        let text = error_text(unary(running).await);
        assert!(text.contains("1 stream(s)"), "{text}");
        // The method dropped the stream: its items are no longer taken.
        assert_eq!(uploads.feed("s1", Fed::Item(Value::from(1))), Feeding::Done);
        assert!(!uploads.is_open("s1"));
    }

    /// Connects a client to `host`; returns its id and what it receives.
    async fn connected(host: &HubHost) -> (Caller, crate::queue::Receiver<bytes::Bytes>) {
        let caller = Caller {
            connection_id: ConnectionId::random(),
            user: None,
            transport: TransportKind::WebSockets,
            request: Default::default(),
        };
        let (outbox, rx) = crate::outbox::tests::outbox(8);
        host.connect(&caller, outbox).await;
        (caller, rx)
    }

    /// The invocation id of the next client-result Invocation the client receives.
    async fn asked(rx: &mut crate::queue::Receiver<bytes::Bytes>) -> String {
        let record = rx.recv().await.expect("an invocation");
        let text = std::str::from_utf8(&record[..record.len() - 1]).unwrap();
        match HubMessage::parse(text).unwrap() {
            Some(HubMessage::Invocation {
                invocation_id: Some(id),
                target,
                ..
            }) if target == "Question" => id,
            other => panic!("not a client-result invocation: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_method_gets_a_clients_result_or_its_error() {
        let host = host();
        let (target, mut rx) = connected(&host).await;
        let ask = || {
            host.invoke(
                &context(&host),
                call(
                    "Ask",
                    Some("1"),
                    vec![Value::from(target.connection_id.to_string())],
                ),
                vec![],
            )
        };
        let answering = async {
            let id = asked(&mut rx).await;
            // Another connection cannot answer for it.
            host.client_completed(
                &ConnectionId::random(),
                &id,
                Outcome::Result(Value::from(9)),
            );
            host.client_completed(&target.connection_id, &id, Outcome::Result(Value::from(42)));
        };
        let ((), reply) = tokio::join!(answering, unary(ask()));
        assert_eq!(
            reply,
            Some(completion("1".into(), Outcome::Result(Value::from(42))))
        );
        let refusing = async {
            let id = asked(&mut rx).await;
            let text = "Client didn't provide a result.".to_owned();
            host.client_completed(&target.connection_id, &id, Outcome::Error(text));
        };
        let ((), reply) = tokio::join!(refusing, unary(ask()));
        // A client's error reaches the caller as ASP.NET words a HubException, even
        // without detailed errors.
        assert_eq!(
            error_text(reply),
            "An unexpected error occurred invoking 'Ask' on the server. HubException: Client didn't provide a result."
        );
        assert!(host.results.is_empty());
    }

    #[tokio::test]
    async fn a_client_that_leaves_or_never_was_fails_the_call_clearly() {
        let host = host().with_detailed_errors(true);
        let (target, mut rx) = connected(&host).await;
        let id = target.connection_id.to_string();
        let leaving = async {
            asked(&mut rx).await;
            host.disconnect(&target).await;
        };
        let ask = host.invoke(
            &context(&host),
            call("Ask", Some("1"), vec![Value::from(id.clone())]),
            vec![],
        );
        let ((), reply) = tokio::join!(leaving, unary(ask));
        let text = error_text(reply);
        assert!(
            text.ends_with(&format!("InvokeError: Connection '{id}' disconnected.")),
            "{text}"
        );
        let reply = unary(host.invoke(
            &context(&host),
            call("Ask", Some("2"), vec![Value::from(id.clone())]),
            vec![],
        ))
        .await;
        let text = error_text(reply);
        assert!(
            text.ends_with(&format!("InvokeError: Connection '{id}' does not exist.")),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_client_that_never_answers_times_out() {
        let host = host()
            .with_detailed_errors(true)
            .with_client_result_timeout(Duration::from_millis(50));
        let (target, _rx) = connected(&host).await;
        let id = target.connection_id.to_string();
        let reply = unary(host.invoke(
            &context(&host),
            call("Ask", Some("1"), vec![Value::from(id.clone())]),
            vec![],
        ))
        .await;
        let text = error_text(reply);
        assert!(text.contains("did not answer 'Question'"), "{text}");
        assert!(host.results.is_empty(), "the timed-out call is forgotten");
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
