//! What a hub method can be: an async closure taking the [`HubContext`] and the
//! arguments, optionally with a [`State`] in between — the extractor technique of
//! actix-web's `web::Data` and socketioxide's `State<T>`:
//!
//! ```text
//! |ctx: HubContext, (text,): (String,)| async move { … }
//! |ctx: HubContext, State(names): State<Names>, (text,): (String,)| async move { … }
//! ```
//!
//! Each shape implements the handler trait under its own marker type, so one
//! `HubBuilder::method` accepts both. A handler is bound when its hub is built: the
//! state it asks for is looked up then (a missing one is a [`super::BuildError`]), and
//! the bound closure holds it, so nothing is looked up per call.

use std::any::{type_name, Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;

use futures_util::{FutureExt, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::stream::{self, Feed};
use super::{HubContext, HubError, LifecycleFn, Method, StreamFn, UnaryFn};
use crate::clients::SendError;

/// Shared state of a hub's methods, given once with `HubBuilder::state` and handed to
/// every handler that asks for it. Derefs to the state.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use stickless::{Hub, HubContext, HubError, State};
///
/// #[derive(Default)]
/// struct Hits(AtomicU64);
///
/// let hub = Hub::builder("hits")
///     .state(Hits::default())
///     .method("Hit", |_ctx: HubContext, State(hits): State<Hits>, ()| async move {
///         Ok::<_, HubError>(hits.0.fetch_add(1, Ordering::Relaxed) + 1)
///     })
///     .build()?;
/// # Ok::<(), stickless::BuildError>(())
/// ```
pub struct State<S>(pub Arc<S>);

impl<S> Clone for State<S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<S> Deref for State<S> {
    type Target = S;

    fn deref(&self) -> &S {
        &self.0
    }
}

/// The states given to a hub, by type.
#[doc(hidden)]
#[derive(Default)]
pub struct States(HashMap<TypeId, Arc<dyn Any + Send + Sync>>);

impl States {
    pub(super) fn insert<S: Send + Sync + 'static>(&mut self, state: S) {
        self.0.insert(TypeId::of::<S>(), Arc::new(state));
    }

    /// The state of type `S`, or the type's name when the hub has none.
    fn get<S: Send + Sync + 'static>(&self) -> Result<State<S>, &'static str> {
        self.0
            .get(&TypeId::of::<S>())
            .cloned()
            .and_then(|any| any.downcast::<S>().ok())
            .map(State)
            .ok_or(type_name::<S>())
    }
}

/// A handler bound to its state, ready to be called.
#[doc(hidden)]
pub struct Bound<T>(pub(super) T);

/// The result of binding: the bound handler, or the name of the missing state's type.
type Binding<T> = Result<Bound<T>, &'static str>;

/// A unary hub method: `Fn(HubContext, Args)` or `Fn(HubContext, State<S>, Args)`,
/// returning a future of `Result<R, HubError>`. `Args` is a tuple of the argument types
/// (`()`, `(String,)`, `(String, u32)`…); `R` is any serializable value, `()` for none.
pub trait MethodHandler<Marker>: Send + Sync + 'static {
    #[doc(hidden)]
    fn bind(self, target: &str, states: &States) -> Binding<Method>;
}

/// A streaming hub method: `Fn(HubContext, Args)` or `Fn(HubContext, State<S>, Args)`,
/// returning `Result<impl Stream<Item = T>, HubError>`.
pub trait StreamHandler<Marker>: Send + Sync + 'static {
    #[doc(hidden)]
    fn bind(self, target: &str, states: &States) -> Binding<Method>;
}

/// A connect or disconnect hook: `Fn(HubContext)` or `Fn(HubContext, State<S>)`,
/// returning a future of `()`.
pub trait HookHandler<Marker>: Send + Sync + 'static {
    #[doc(hidden)]
    fn bind(self, states: &States) -> Binding<LifecycleFn>;
}

/// Binds an invocation's arguments and client streams to `A` ([`stream::bind`]): zero
/// of both bind to `()`; otherwise a tuple (or a `Vec`) whose [`super::ClientStream`]
/// elements take the streams, so a wrong count is an error, as in ASP.NET.
pub(super) fn bind_arguments<A: DeserializeOwned>(
    target: &str,
    args: Vec<Value>,
    streams: Vec<Feed>,
) -> Result<A, HubError> {
    let (count, stream_count) = (args.len(), streams.len());
    stream::bind(args, streams).map_err(|error| HubError::Arguments {
        target: target.to_owned(),
        detail: format!(
            "Invocation provides {count} argument(s) and {stream_count} stream(s) that do not match the method: {error}"
        ),
    })
}

fn unary<A, R, Fut>(
    target: &str,
    call: impl Fn(HubContext, A) -> Fut + Send + Sync + 'static,
) -> Method
where
    A: DeserializeOwned + Send + 'static,
    R: Serialize + 'static,
    Fut: Future<Output = Result<R, HubError>> + Send + 'static,
{
    let target = target.to_owned();
    // A method returning `()` is void: its Completion has no `result`. Any other return
    // type has one, `null` included (an `Option` that is `None`), as in ASP.NET.
    let void = TypeId::of::<R>() == TypeId::of::<()>();
    let call: UnaryFn =
        Arc::new(
            move |ctx, args, streams| match bind_arguments::<A>(&target, args, streams) {
                Ok(args) => call(ctx, args)
                    .map(move |result| {
                        result.and_then(|value| {
                            let value = serde_json::to_value(value)
                                .map_err(|e| HubError::Send(SendError::Arguments(e)))?;
                            Ok((!void).then_some(value))
                        })
                    })
                    .boxed(),
                Err(error) => futures_util::future::ready(Err(error)).boxed(),
            },
        );
    Method::Unary(call)
}

fn streaming<A, T, St>(
    target: &str,
    call: impl Fn(HubContext, A) -> Result<St, HubError> + Send + Sync + 'static,
) -> Method
where
    A: DeserializeOwned + Send + 'static,
    T: Serialize + 'static,
    St: Stream<Item = T> + Send + 'static,
{
    let target = target.to_owned();
    let call: StreamFn = Arc::new(move |ctx, args, streams| {
        let args = bind_arguments::<A>(&target, args, streams)?;
        let items = call(ctx, args)?;
        Ok(items
            .map(|item| serde_json::to_value(item).unwrap_or(Value::Null))
            .boxed())
    });
    Method::Stream(call)
}

fn hook<Fut>(call: impl Fn(HubContext) -> Fut + Send + Sync + 'static) -> LifecycleFn
where
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |ctx| call(ctx).boxed())
}

impl<F, Fut, A, R> MethodHandler<(HubContext, A)> for F
where
    F: Fn(HubContext, A) -> Fut + Send + Sync + 'static,
    A: DeserializeOwned + Send + 'static,
    R: Serialize + 'static,
    Fut: Future<Output = Result<R, HubError>> + Send + 'static,
{
    fn bind(self, target: &str, _: &States) -> Binding<Method> {
        Ok(Bound(unary(target, self)))
    }
}

impl<F, Fut, S, A, R> MethodHandler<(HubContext, State<S>, A)> for F
where
    F: Fn(HubContext, State<S>, A) -> Fut + Send + Sync + 'static,
    S: Send + Sync + 'static,
    A: DeserializeOwned + Send + 'static,
    R: Serialize + 'static,
    Fut: Future<Output = Result<R, HubError>> + Send + 'static,
{
    fn bind(self, target: &str, states: &States) -> Binding<Method> {
        let state = states.get::<S>()?;
        Ok(Bound(unary(target, move |ctx, args| {
            self(ctx, state.clone(), args)
        })))
    }
}

impl<F, A, T, St> StreamHandler<(HubContext, A)> for F
where
    F: Fn(HubContext, A) -> Result<St, HubError> + Send + Sync + 'static,
    A: DeserializeOwned + Send + 'static,
    T: Serialize + 'static,
    St: Stream<Item = T> + Send + 'static,
{
    fn bind(self, target: &str, _: &States) -> Binding<Method> {
        Ok(Bound(streaming(target, self)))
    }
}

impl<F, S, A, T, St> StreamHandler<(HubContext, State<S>, A)> for F
where
    F: Fn(HubContext, State<S>, A) -> Result<St, HubError> + Send + Sync + 'static,
    S: Send + Sync + 'static,
    A: DeserializeOwned + Send + 'static,
    T: Serialize + 'static,
    St: Stream<Item = T> + Send + 'static,
{
    fn bind(self, target: &str, states: &States) -> Binding<Method> {
        let state = states.get::<S>()?;
        Ok(Bound(streaming(target, move |ctx, args| {
            self(ctx, state.clone(), args)
        })))
    }
}

impl<F, Fut> HookHandler<(HubContext,)> for F
where
    F: Fn(HubContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn bind(self, _: &States) -> Binding<LifecycleFn> {
        Ok(Bound(hook(self)))
    }
}

impl<F, Fut, S> HookHandler<(HubContext, State<S>)> for F
where
    F: Fn(HubContext, State<S>) -> Fut + Send + Sync + 'static,
    S: Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fn bind(self, states: &States) -> Binding<LifecycleFn> {
        let state = states.get::<S>()?;
        Ok(Bound(hook(move |ctx| self(ctx, state.clone()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_bind_to_tuples_and_unit() {
        let one: (String,) = bind_arguments("m", vec![Value::from("x")], vec![]).unwrap();
        assert_eq!(one.0, "x");
        let () = bind_arguments("m", vec![], vec![]).unwrap();
        let error = bind_arguments::<(String,)>("Send", vec![], vec![])
            .unwrap_err()
            .to_string();
        assert!(error.contains("Failed to invoke 'Send'"), "{error}");
        assert!(bind_arguments::<(String,)>("m", vec![Value::from(1)], vec![]).is_err());
        let two = vec![Value::from("a"), Value::from("b")];
        assert!(bind_arguments::<(String,)>("m", two, vec![]).is_err());
        let list: Vec<u32> =
            bind_arguments("m", vec![Value::from(1), Value::from(2)], vec![]).unwrap();
        assert_eq!(list, [1, 2]);
    }
}
