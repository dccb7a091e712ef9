//! A session's outbound queue: bounded, one sender (the session's hub handle), one receiver (the
//! session's writer).
//!
//! The same contract as a bounded `tokio::sync::mpsc` channel (`try_send` refusing when full or
//! closed, `recv`, `try_recv`), with a different cost at rest: a `tokio` channel allocates its
//! first block of 32 slots and its cache-padded state when it is made, about 1.5 KB for every
//! session whether or not anything is ever sent, and most sessions are idle most of the time.
//! This queue is a `VecDeque` behind a mutex that allocates only while it holds frames (and
//! gives the room back once drained past a few), and a `Notify` for the writer.
//!
//! Every session has one; a frame is queued by the hub (one lock, one wake-up) and taken by the
//! writer, so the lock is never contended for long. Every Socket.IO connection has a second
//! one, its inbox of client events (`dialect::socketio`), for the same reason.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Notify;
pub use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

/// Slots a drained queue keeps; above this, it gives its buffer back.
const KEEP: usize = 8;

struct Shared<T> {
    queue: Mutex<VecDeque<T>>,
    bound: usize,
    wake: Notify,
    sender_gone: AtomicBool,
    receiver_gone: AtomicBool,
}

/// The queueing end.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// The writer's end.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// A queue of at most `bound` (at least 1) items.
pub fn channel<T>(bound: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(VecDeque::new()),
        bound: bound.max(1),
        wake: Notify::new(),
        sender_gone: AtomicBool::new(false),
        receiver_gone: AtomicBool::new(false),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

impl<T> Sender<T> {
    /// Queues `item` without waiting; gives it back when the queue is full or the receiver gone.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        if self.shared.receiver_gone.load(Ordering::Acquire) {
            return Err(TrySendError::Closed(item));
        }
        let mut q = self.shared.queue.lock();
        if q.len() >= self.shared.bound {
            return Err(TrySendError::Full(item));
        }
        q.push_back(item);
        drop(q);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// The most items the queue holds.
    pub fn max_capacity(&self) -> usize {
        self.shared.bound
    }

    /// Items that may still be queued now.
    pub fn capacity(&self) -> usize {
        self.shared
            .bound
            .saturating_sub(self.shared.queue.lock().len())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.shared.sender_gone.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

impl<T> Receiver<T> {
    /// The next item, waiting for one; `None` once the sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            match self.try_recv() {
                Ok(item) => return Some(item),
                Err(TryRecvError::Disconnected) => return None,
                // `notify_one` keeps a permit when nobody waits: an item queued between the
                // check above and this wait is not missed.
                Err(TryRecvError::Empty) => self.shared.wake.notified().await,
            }
        }
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut q = self.shared.queue.lock();
        if let Some(item) = q.pop_front() {
            if q.is_empty() && q.capacity() > KEEP {
                *q = VecDeque::new();
            }
            return Ok(item);
        }
        drop(q);
        if self.shared.sender_gone.load(Ordering::Acquire) {
            // An item queued just before the sender went is still taken first.
            return self
                .shared
                .queue
                .lock()
                .pop_front()
                .ok_or(TryRecvError::Disconnected);
        }
        Err(TryRecvError::Empty)
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.shared.receiver_gone.store(true, Ordering::Release);
        // What was queued and never taken goes now, not with the last sender.
        let left = std::mem::take(&mut *self.shared.queue.lock());
        drop(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn items_arrive_in_order_up_to_the_bound_and_the_end_is_seen() {
        let (tx, mut rx) = channel::<u32>(3);
        assert_eq!(tx.max_capacity(), 3);
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        for i in 0..3 {
            assert!(tx.try_send(i).is_ok());
        }
        assert_eq!(tx.capacity(), 0);
        assert!(matches!(tx.try_send(9), Err(TrySendError::Full(9))));
        assert_eq!(rx.recv().await, Some(0));
        assert_eq!(tx.capacity(), 1);
        drop(tx);
        // Queued before the sender went: still delivered, then the end.
        assert_eq!(rx.recv().await, Some(1));
        assert!(matches!(rx.try_recv(), Ok(2)));
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Disconnected)));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_and_a_gone_one_refuses() {
        let (tx, mut rx) = channel::<u32>(4);
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await;
            (first, rx)
        });
        tokio::task::yield_now().await;
        assert!(tx.try_send(7).is_ok());
        let (first, rx) = waiting.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(first, Some(7));
        assert!(tx.try_send(8).is_ok());
        drop(rx);
        assert!(matches!(tx.try_send(9), Err(TrySendError::Closed(9))));
    }

    #[tokio::test]
    async fn a_drained_queue_gives_its_buffer_back() {
        let (tx, mut rx) = channel::<u64>(1000);
        for i in 0..100 {
            assert!(tx.try_send(i).is_ok());
        }
        for i in 0..100 {
            assert_eq!(rx.recv().await, Some(i));
        }
        assert_eq!(rx.shared.queue.lock().capacity(), 0);
    }
}
