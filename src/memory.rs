//! Talking to glibc's allocator, which otherwise keeps what the daemon frees.
//!
//! glibc gives each thread that allocates an arena of its own, up to 8 per core, and
//! keeps freed memory there. After an ingest of 100k x 128-d vectors the daemon held
//! about 70 MB of free memory in arenas (malloc_stats). Two arenas halve that at no
//! measured cost in ingest rate ([`limit_arenas`]), and giving the free memory back once
//! writes go quiet returned another 20-30 MB in a prototype ([`trim`]). Elsewhere (musl,
//! other systems) both do nothing.

/// Limits glibc to two malloc arenas, unless `MALLOC_ARENA_MAX` says otherwise. Call it
/// before any thread starts.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_ARENA_MAX: i32 = -8;
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: mallopt only changes allocator settings; no other thread runs yet.
            unsafe {
                mallopt(M_ARENA_MAX, 2);
            }
        }
    }
}

/// Returns free heap memory to the system (glibc's malloc_trim). Takes milliseconds on a
/// large heap: call it from a blocking thread, when writes have gone quiet.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim is thread-safe; it takes the arenas' locks itself.
        unsafe {
            malloc_trim(0);
        }
    }
}
