//! How the operator uses memory allocators.
//!
//! Rust allocations go to jemalloc, set here as the global allocator of everything that
//! links this crate (the operator, its tests and benchmarks), with two arenas and a
//! background thread that gives freed pages back to the system a second after they
//! are freed. Measured at 10,000 workspaces (bench/scale), the process ended a burst of
//! reconciles with 91 MB resident under glibc's malloc and 72 MB under jemalloc, for
//! the same live heap: glibc left free memory between long-lived small allocations
//! (the per-workspace state) that `malloc_trim` cannot give back, and jemalloc's
//! size-class slabs keep those apart from the short-lived ones. The cold converge was
//! faster too (15 s against 19 s).
//!
//! C code (SQLite, bundled by sqlx) still allocates with glibc's malloc: it gets two
//! arenas (glibc would make up to eight per core), and `malloc_trim` after bursts.

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read once at its start (`_RJEM_MALLOC_CONF` in the environment
/// still wins): two arenas (the work is spread over the runtime's two worker threads;
/// more arenas cost memory, not speed, at this load); freed pages are purged after a
/// second (`dirty_decay_ms`) by a background thread, so an idle operator returns what a
/// burst used without having to allocate to trigger it; `muzzy_decay_ms:0` returns
/// them outright instead of keeping them lazily freed.
#[cfg(not(target_env = "msvc"))]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static JEMALLOC_CONF: ConfString =
    ConfString(c"narenas:2,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string pointer jemalloc reads at start (`const char *malloc_conf`).
#[repr(transparent)]
pub struct ConfString(*const std::ffi::c_char);

// SAFETY: it points at a static, immutable C string literal.
unsafe impl Sync for ConfString {}

/// glibc malloc arenas (for the C code). Two: SQLite's connections each run on a thread
/// of their own, and more arenas cost RSS, not speed, at this load.
const ARENAS: i32 = 2;

/// Call once at start, before any thread is spawned. `MALLOC_ARENA_MAX` in the
/// environment still wins.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes a tunable; called before other threads exist.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENAS) };
    }
}

/// Gives the memory a burst freed back to the system, on a blocking thread. Called
/// after a burst of reconciles and after a full resync. jemalloc's background thread
/// does this for Rust allocations by itself; this is for glibc's (SQLite's).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::task::spawn_blocking(|| {
            // SAFETY: malloc_trim has no preconditions; it only returns free pages.
            unsafe { libc::malloc_trim(0) };
        });
    }
}

/// Bytes the Rust code has allocated and not freed (jemalloc's `stats.allocated`, as of
/// now), or None where jemalloc is not the allocator.
pub fn allocated_bytes() -> Option<usize> {
    #[cfg(not(target_env = "msvc"))]
    {
        // Statistics are a snapshot taken when the epoch advances (writing any u64 to it).
        // SAFETY: "epoch" is a u64 option, "stats.allocated" a size_t statistic.
        unsafe {
            mallctl_write(c"epoch", 1u64)?;
            mallctl_read::<usize>(c"stats.allocated")
        }
    }
    #[cfg(target_env = "msvc")]
    None
}

/// Reads one of jemalloc's values by name (`mallctl(3)`); None if jemalloc refuses.
///
/// # Safety
/// `T` must be the type jemalloc documents for `name`.
#[cfg(not(target_env = "msvc"))]
unsafe fn mallctl_read<T: Copy + Default>(name: &std::ffi::CStr) -> Option<T> {
    let mut value = T::default();
    let mut len = std::mem::size_of::<T>();
    // SAFETY: value and len describe a T-sized buffer, as the caller vouches the value is.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(name.as_ptr(), (&raw mut value).cast(), &mut len, std::ptr::null_mut(), 0)
    };
    (rc == 0 && len == std::mem::size_of::<T>()).then_some(value)
}

/// Writes one of jemalloc's values by name (`mallctl(3)`); None if jemalloc refuses.
///
/// # Safety
/// `T` must be the type jemalloc documents for `name`.
#[cfg(not(target_env = "msvc"))]
unsafe fn mallctl_write<T: Copy>(name: &std::ffi::CStr, mut value: T) -> Option<()> {
    // SAFETY: the new value is a T, as the caller vouches the option is.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            (&raw mut value).cast(),
            std::mem::size_of::<T>(),
        )
    };
    (rc == 0).then_some(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn jemalloc_runs_with_the_settings_given_here() {
        use super::mallctl_read;
        if std::env::var_os("_RJEM_MALLOC_CONF").is_some() {
            return; // the environment overrides them on purpose
        }
        let before = super::allocated_bytes().expect("jemalloc stats");
        let block = vec![1u8; 1 << 20];
        let during = super::allocated_bytes().expect("jemalloc stats");
        assert!(during >= before + (1 << 20), "a 1 MiB block counts: {before} -> {during}");
        drop(block);
        // SAFETY: each reads a value as the type jemalloc documents for it.
        let running: bool = unsafe { mallctl_read(c"background_thread") }.unwrap();
        assert!(running, "the purging thread runs");
        let arenas: u32 = unsafe { mallctl_read(c"opt.narenas") }.unwrap();
        let decay: isize = unsafe { mallctl_read(c"opt.dirty_decay_ms") }.unwrap();
        let muzzy: isize = unsafe { mallctl_read(c"opt.muzzy_decay_ms") }.unwrap();
        assert_eq!((arenas, decay, muzzy), (2, 1000, 0));
    }
}
