//! Host heap in use, counted by the global allocator, so `kv bench` can report the peak memory
//! of a prefill on the CPU backends (their tensors live on this heap); and the heap's settings
//! for tensor work (freed pages kept, the heap on huge pages).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The system allocator with a running count of bytes in use and their high-water mark, which
/// asks for huge pages under the heap once [`tune_heap`] has run.
pub struct CountingAlloc;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The heap's end up to which huge pages were asked for (0: not turned on, see [`tune_heap`]).
static ADVISED_TO: AtomicUsize = AtomicUsize::new(0);
/// The heap's end when [`tune_heap`] ran: nothing below it is advised (it may not be heap).
static HEAP_BASE: AtomicUsize = AtomicUsize::new(0);

/// The transparent huge page size.
const HUGE: usize = 2 << 20;

/// Heap the allocator reserves beyond each request when it grows the heap, so a growth is mostly
/// memory nothing has touched yet when [`advise_huge_pages`] flags it.
const TOP_PAD: i32 = 32 << 20;

/// The C library calls the heap settings use.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    unsafe extern "C" {
        pub fn mallopt(param: i32, value: i32) -> i32;
        pub fn sbrk(increment: isize) -> *mut std::ffi::c_void;
        pub fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
    }
}

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

/// Asks the kernel to back the heap with transparent huge pages (where the system leaves them to
/// `madvise`, as Debian does), each time it has grown, as glibc's `hugetlb` tunable does: a
/// decode step streams every weight and the whole cache, and on 4 KiB pages that is a TLB miss
/// every 4 KiB (decode-bench: 1.03-1.3x the tokens/s at 2k, 1.08-1.5x at 8k, four alternating
/// pairs). The main thread's blocks all come from the heap ([`tune_heap`]), and burn-flex allocates
/// tensors there; the arenas glibc gives other threads (the pool's small per-item buffers) keep
/// small pages.
fn advise_huge_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let done = ADVISED_TO.load(Relaxed);
        if done == 0 {
            return;
        }
        const MADV_HUGEPAGE: i32 = 14;
        // SAFETY: `sbrk(0)` only reads the current end of the heap.
        let end = unsafe { glibc::sbrk(0) } as usize;
        if end > done
            && ADVISED_TO
                .compare_exchange(done, end, Relaxed, Relaxed)
                .is_ok()
        {
            // From the huge page the last growth ended in, which is now whole.
            let start = (done / HUGE * HUGE).max(HEAP_BASE.load(Relaxed));
            // SAFETY: the range is the heap's own mapping; the advice changes how its pages are
            // backed, never their contents, and a failure leaves them as they were.
            unsafe { glibc::madvise(start as *mut std::ffi::c_void, end - start, MADV_HUGEPAGE) };
        }
    }
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated around it,
// and the paging advice leaves the memory's contents alone.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
            advise_huge_pages();
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
            advise_huge_pages();
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
                advise_huge_pages();
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

/// Starts a measurement: the peak restarts from the bytes in use now, which are returned.
pub fn reset_peak() -> usize {
    let now = CURRENT.load(Relaxed);
    PEAK.store(now, Relaxed);
    now
}

/// The most bytes in use since the last [`reset_peak`].
pub fn peak() -> usize {
    PEAK.load(Relaxed)
}

/// Bytes in use now.
pub fn current() -> usize {
    CURRENT.load(Relaxed)
}

/// Tells glibc's allocator to serve every block from its heap and to keep freed memory there, so
/// the large tensors a forward pass allocates and frees layer after layer reuse pages already
/// mapped instead of faulting in fresh zeroed ones (by default a block over 128 KiB-32 MiB is its
/// own `mmap`, unmapped on free: 5% of a 2k prefill in page faults), to grow the heap 32 MiB at a
/// time, and backs the heap with huge pages from here on ([`advise_huge_pages`]). Peak RSS is
/// unchanged (decode-bench at 8k: 249 MiB either way), as the blocks in use at any time are the
/// same. A no-op off glibc. Call it first thing in `main`, before any thread starts.
pub fn tune_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_MAX: i32 = -4;
        // SAFETY: mallopt only changes allocator settings, and `sbrk(0)` only reads the heap's
        // end; this runs before any thread starts.
        unsafe {
            glibc::mallopt(M_MMAP_MAX, 0);
            glibc::mallopt(M_TRIM_THRESHOLD, i32::MAX);
            glibc::mallopt(M_TOP_PAD, TOP_PAD);
            let base = (glibc::sbrk(0) as usize).max(1);
            HEAP_BASE.store(base, Relaxed);
            ADVISED_TO.store(base, Relaxed);
        }
    }
}
