//! A request's future in a block the worker's earlier requests freed.
//!
//! Each request's future (~3.8 KiB) lives on the heap while the request runs. From the
//! allocator (mimalloc), a block of that size takes its generic path: ~400 instructions to
//! allocate at 256 connections, where its free lists of that size run dry. The worker keeps
//! the blocks its requests freed, up to [`KEPT_BYTES`], and hands out the most recently
//! freed first. (Not for warmth: at 256 connections a block freed a hundred requests
//! earlier misses the cache as often as the allocator's.) A thread's blocks go back to the
//! allocator when it exits.
//!
//! Blocks are kept per layout: an HTTP/1.1 request's handler and an HTTP/2 stream's whole
//! future differ in size, and a worker serving both would otherwise find the other kind on
//! top of one stack and go to the allocator for every request.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::pin::Pin;
use std::ptr::NonNull;

/// What a thread keeps: a block for each request of a busy worker (about 270 at the
/// request future's size). Requests end and begin in runs of a hundred and more at 256
/// connections (one event loop turn answers many, the next reads many new heads): with 16
/// kept, 84 % of requests still went to the allocator. Bounded, so a burst of 10,000
/// clients leaves no more than this behind.
const KEPT_BYTES: usize = 1 << 20;

/// Layouts kept apart at most: the kinds of future that use blocks, with room to spare.
const KINDS: usize = 4;

/// One layout's freed blocks, the most recent last.
struct Kind {
    layout: Layout,
    blocks: Vec<NonNull<u8>>,
}

/// The thread's freed blocks by layout, and their bytes.
struct Spare {
    kinds: Vec<Kind>,
    bytes: usize,
}

impl Drop for Spare {
    fn drop(&mut self) {
        for kind in self.kinds.drain(..) {
            for block in kind.blocks {
                // SAFETY: every block was allocated by the global allocator with its layout.
                unsafe { alloc::dealloc(block.as_ptr(), kind.layout) };
            }
        }
    }
}

thread_local! {
    static SPARE: RefCell<Spare> = const {
        RefCell::new(Spare {
            kinds: Vec::new(),
            bytes: 0,
        })
    };
}

/// A block of `layout`: the thread's most recently freed one of that layout, if it kept one.
fn take(layout: Layout) -> NonNull<u8> {
    let kept = SPARE
        .try_with(|s| {
            let mut s = s.borrow_mut();
            let block = s.kinds.iter_mut().find(|k| k.layout == layout)?.blocks.pop()?;
            s.bytes -= layout.size();
            Some(block)
        })
        .ok()
        .flatten();
    kept.unwrap_or_else(|| {
        // SAFETY: the layout is not zero-sized (`Slot::take` refuses those).
        let block = unsafe { alloc::alloc(layout) };
        NonNull::new(block).unwrap_or_else(|| alloc::handle_alloc_error(layout))
    })
}

/// Gives a block back: kept for the next request, or freed when the thread keeps enough
/// (or is exiting).
fn give(block: NonNull<u8>, layout: Layout) {
    let kept = SPARE.try_with(|s| {
        let s = &mut *s.borrow_mut();
        if s.bytes + layout.size() > KEPT_BYTES {
            return false;
        }
        let kind = match s.kinds.iter().position(|k| k.layout == layout) {
            Some(at) => &mut s.kinds[at],
            None if s.kinds.len() < KINDS => {
                s.kinds.push(Kind {
                    layout,
                    blocks: Vec::new(),
                });
                let last = s.kinds.len() - 1;
                &mut s.kinds[last]
            }
            None => return false,
        };
        kind.blocks.push(block);
        s.bytes += layout.size();
        true
    });
    if kept != Ok(true) {
        // SAFETY: allocated by the global allocator with this layout (`take`).
        unsafe { alloc::dealloc(block.as_ptr(), layout) };
    }
}

/// An owned `F` in a block from the thread's spares (as `Box<F>`; pinned, a future).
pub(crate) struct Recycled<F> {
    value: NonNull<F>,
    _owns: PhantomData<F>,
}

// SAFETY: `Recycled` owns its `F` as a `Box` would; the block itself is plain memory any
// thread may give back.
unsafe impl<F: Send> Send for Recycled<F> {}
// SAFETY: as above; `&Recycled<F>` gives only `&F`.
unsafe impl<F: Sync> Sync for Recycled<F> {}

impl<F> Recycled<F> {
    /// Builds the value where it will live: the block first, then `make`'s result written
    /// into it (`Box::pin(make())` would build the ~4 KiB future on the stack and copy all
    /// of it, most of it states that do not exist yet: ~400 instructions a request).
    #[inline(always)]
    pub(crate) fn pin_in_place(make: impl FnOnce() -> F) -> Pin<Recycled<F>> {
        Slot::take().pin(make())
    }
}

/// A block taken for an `F` that is not built yet. Taken before the value's parts are
/// gathered, the block's look-up is not a call between their moves and the write: across
/// an opaque call the compiler keeps each part in a copy of its own on the stack.
pub(crate) struct Slot<F> {
    block: NonNull<F>,
    _for: PhantomData<F>,
}

impl<F> Slot<F> {
    /// A block for an `F`: the thread's most recently freed one of its layout, if kept.
    pub(crate) fn take() -> Slot<F> {
        const { assert!(size_of::<F>() > 0, "a zero-sized value needs no block") };
        Slot {
            block: take(Layout::new::<F>()).cast::<F>(),
            _for: PhantomData,
        }
    }

    /// Writes `value` into the block and pins it there.
    #[inline(always)]
    pub(crate) fn pin(self, value: F) -> Pin<Recycled<F>> {
        let value_at = std::mem::ManuallyDrop::new(self).block;
        // SAFETY: the block is sized and aligned for `F`, and not shared.
        unsafe { value_at.as_ptr().write(value) };
        let recycled = Recycled {
            value: value_at,
            _owns: PhantomData,
        };
        // SAFETY: the value never moves out of its block: it is dropped in place.
        unsafe { Pin::new_unchecked(recycled) }
    }
}

impl<F> Drop for Slot<F> {
    fn drop(&mut self) {
        // Never written: only the block goes back.
        give(self.block.cast(), Layout::new::<F>());
    }
}

impl<F> std::ops::Deref for Recycled<F> {
    type Target = F;

    fn deref(&self) -> &F {
        // SAFETY: written in `pin_in_place`, alive until `drop`.
        unsafe { self.value.as_ref() }
    }
}

impl<F> std::ops::DerefMut for Recycled<F> {
    fn deref_mut(&mut self) -> &mut F {
        // SAFETY: as `deref`; `Pin<Recycled<F>>` hands out `&mut F` only for an `Unpin` F.
        unsafe { self.value.as_mut() }
    }
}

impl<F> Drop for Recycled<F> {
    fn drop(&mut self) {
        // SAFETY: the value was written in `pin_in_place` and is dropped only here.
        unsafe { self.value.as_ptr().drop_in_place() };
        give(self.value.cast(), Layout::new::<F>());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    struct Counted(Rc<std::cell::Cell<usize>>, [u64; 64]);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    fn kept() -> usize {
        SPARE.with(|s| s.borrow().kinds.iter().map(|k| k.blocks.len()).sum())
    }

    #[test]
    fn the_last_freed_block_is_the_next_one_used() {
        let drops = Rc::new(std::cell::Cell::new(0));
        let first = Recycled::pin_in_place(|| Counted(drops.clone(), [1; 64]));
        let at = std::ptr::from_ref::<Counted>(&first) as usize;
        drop(first);
        assert_eq!(drops.get(), 1, "the value is dropped once, with its holder");
        assert_eq!(kept(), 1, "its block is kept");
        let second = Recycled::pin_in_place(|| Counted(drops.clone(), [2; 64]));
        assert_eq!(
            std::ptr::from_ref::<Counted>(&second) as usize,
            at,
            "the warm block is reused"
        );
        assert_eq!(kept(), 0);
        assert_eq!(second.1[63], 2);
        drop(second);
        assert_eq!(drops.get(), 2);
    }

    #[test]
    fn a_thread_keeps_a_bounded_number_of_blocks() {
        let drops = Rc::new(std::cell::Cell::new(0));
        let fits = KEPT_BYTES / size_of::<Counted>();
        let live: Vec<_> = (0..fits + 5)
            .map(|_| Recycled::pin_in_place(|| Counted(drops.clone(), [0; 64])))
            .collect();
        drop(live);
        assert_eq!(drops.get(), fits + 5);
        assert_eq!(kept(), fits, "the rest went back to the allocator");
        assert!(SPARE.with(|s| s.borrow().bytes) <= KEPT_BYTES);
    }

    #[test]
    fn blocks_of_another_layout_are_not_handed_out() {
        let small = Recycled::pin_in_place(|| 7u8);
        drop(small);
        let big = Recycled::pin_in_place(|| [9u64; 32]);
        assert_eq!(big[31], 9);
        assert_eq!(kept(), 1, "the small block stays kept for its own size");
    }

    #[test]
    fn each_layout_gets_its_own_last_freed_block() {
        let small = Recycled::pin_in_place(|| [1u64; 8]);
        let big = Recycled::pin_in_place(|| [2u64; 32]);
        let small_at = std::ptr::from_ref::<[u64; 8]>(&small) as usize;
        let big_at = std::ptr::from_ref::<[u64; 32]>(&big) as usize;
        // The big block is freed last: a small request must still find the small one.
        drop(small);
        drop(big);
        let small = Recycled::pin_in_place(|| [3u64; 8]);
        assert_eq!(std::ptr::from_ref::<[u64; 8]>(&small) as usize, small_at);
        let big = Recycled::pin_in_place(|| [4u64; 32]);
        assert_eq!(std::ptr::from_ref::<[u64; 32]>(&big) as usize, big_at);
        assert_eq!(kept(), 0);
    }

    #[test]
    fn a_slot_never_written_gives_its_block_back() {
        let slot = Slot::<[u64; 16]>::take();
        let at = slot.block.as_ptr() as usize;
        drop(slot);
        assert_eq!(kept(), 1, "the unused block is kept");
        let value = Slot::take().pin([3u64; 16]);
        assert_eq!(std::ptr::from_ref::<[u64; 16]>(&value) as usize, at, "and used next");
        assert_eq!(value[15], 3);
    }

    #[tokio::test]
    async fn a_recycled_future_runs_to_its_output() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiting = Recycled::pin_in_place(|| async move { rx.await.unwrap_or(0) + 1 });
        tx.send(41).unwrap_or_default();
        assert_eq!(waiting.await, 42);
    }
}
