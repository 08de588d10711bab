//! Bounded queues between a connection's tasks that hold (almost) no memory while empty.
//!
//! Every connection has two: records on their way to the client ([`crate::outbox`]) and
//! bytes from the client on their way to its session. Most connections are idle most of
//! the time, so what an empty queue costs is what an idle connection costs. tokio's
//! `mpsc` channel allocates a block of 32 slots when it is made and keeps it, plus a
//! cache-padded header (about 1.7 KiB together, whatever the bound); two of them were a
//! fifth of an idle WebSocket's own memory. This queue is a `VecDeque` behind a mutex,
//! which allocates on first use and gives a grown buffer back once drained, and two
//! [`Notify`]s.
//!
//! It offers the part of `mpsc` the connection uses, with the same meaning: `try_send`
//! fails when the queue is full or the receiver is gone, `send` waits for room, `recv`
//! returns `None` once the queue is empty and every sender is gone, `try_recv` never
//! waits. One receiver; any number of senders.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// A drained buffer with room for more than this many items is given back.
const KEEP_CAPACITY: usize = 8;

/// A bounded queue of `capacity` items (at least 1): its sending and receiving ends.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            receiving: true,
        }),
        capacity: capacity.max(1),
        readable: Notify::new(),
        writable: Notify::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    receiving: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    /// Wakes the receiver: an item came, or the last sender left. `notify_one` keeps a
    /// permit when the receiver is not waiting yet, so no wake-up is lost.
    readable: Notify,
    /// Wakes senders waiting for room: an item left a full queue, or the receiver left.
    writable: Notify,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every update is a single push, pop or counter change: a poisoned lock still
        // holds a consistent queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why [`Sender::try_send`] did not queue an item; the item comes back.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrySendError<T> {
    /// The queue holds `capacity` items.
    #[error("the queue is full")]
    Full(T),
    /// The receiver is gone.
    #[error("the queue's receiver is gone")]
    Closed(T),
}

/// Why [`Receiver::try_recv`] returned no item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    /// Nothing queued right now.
    #[error("the queue is empty")]
    Empty,
    /// Nothing queued, and every sender is gone.
    #[error("the queue is empty and every sender is gone")]
    Disconnected,
}

/// The sending end; clone it for more senders.
pub struct Sender<T>(Arc<Shared<T>>);

impl<T> Sender<T> {
    /// Queues `item` without waiting.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let mut state = self.0.lock();
        if !state.receiving {
            return Err(TrySendError::Closed(item));
        }
        if state.items.len() >= self.0.capacity {
            return Err(TrySendError::Full(item));
        }
        state.items.push_back(item);
        drop(state);
        self.0.readable.notify_one();
        Ok(())
    }

    /// Queues `item`, waiting while the queue is full; gives it back if the receiver is
    /// gone.
    pub async fn send(&self, mut item: T) -> Result<(), T> {
        loop {
            // Registered before the attempt, so room made right after it is not missed.
            let room = self.0.writable.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(back)) => return Err(back),
                Err(TrySendError::Full(back)) => {
                    item = back;
                    room.await;
                }
            }
        }
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Self(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.senders -= 1;
        let last = state.senders == 0;
        drop(state);
        if last {
            self.0.readable.notify_one();
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("capacity", &self.0.capacity)
            .finish_non_exhaustive()
    }
}

/// The receiving end.
pub struct Receiver<T>(Arc<Shared<T>>);

impl<T> Receiver<T> {
    /// The next item, waiting for one; `None` once the queue is empty and every sender
    /// is gone.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            match self.try_recv() {
                Ok(item) => return Some(item),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => self.0.readable.notified().await,
            }
        }
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut state = self.0.lock();
        let was_full = state.items.len() >= self.0.capacity;
        let Some(item) = state.items.pop_front() else {
            return Err(if state.senders == 0 {
                TryRecvError::Disconnected
            } else {
                TryRecvError::Empty
            });
        };
        if state.items.is_empty() && state.items.capacity() > KEEP_CAPACITY {
            // A burst is over: give its buffer back rather than keep it while idle.
            state.items = VecDeque::new();
        }
        drop(state);
        if was_full {
            self.0.writable.notify_waiters();
        }
        Ok(item)
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let items = {
            let mut state = self.0.lock();
            state.receiving = false;
            std::mem::take(&mut state.items)
        };
        // Dropped outside the lock: an item's own drop may take time.
        drop(items);
        self.0.writable.notify_waiters();
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("capacity", &self.0.capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_come_out_in_order_and_a_full_queue_refuses() {
        let (tx, mut rx) = channel(2);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(tx.try_send(3), Ok(()));
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(rx.try_recv(), Ok(3));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn the_receiver_sees_the_end_after_the_last_item_and_senders_see_it_gone() {
        let (tx, mut rx) = channel(4);
        let second = tx.clone();
        tx.try_send("a").unwrap();
        drop(tx);
        assert_eq!(rx.try_recv(), Ok("a"));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        drop(second);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));

        let (tx, rx) = channel(4);
        drop(rx);
        assert_eq!(tx.try_send(1), Err(TrySendError::Closed(1)));
    }

    #[test]
    fn a_drained_burst_gives_its_buffer_back() {
        let (tx, mut rx) = channel(1024);
        for i in 0..100 {
            tx.try_send(i).unwrap();
        }
        while rx.try_recv().is_ok() {}
        assert_eq!(rx.0.lock().items.capacity(), 0);
    }

    #[tokio::test]
    async fn recv_waits_for_an_item_and_send_waits_for_room() {
        let (tx, mut rx) = channel(1);
        tx.try_send(1).unwrap();
        let sender = tokio::spawn(async move {
            tx.send(2).await.unwrap();
            tx.send(3).await.unwrap();
        });
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        assert_eq!(
            rx.recv().await,
            None,
            "the sender finished and dropped its end"
        );
        sender.await.unwrap();
    }

    #[tokio::test]
    async fn a_waiting_sender_learns_that_the_receiver_left() {
        let (tx, rx) = channel(1);
        tx.try_send(1).unwrap();
        let sender = tokio::spawn(async move { tx.send(2).await });
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(sender.await.unwrap(), Err(2));
    }
}
