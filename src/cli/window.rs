//! An ordered window of calls: at most `window` in flight, answers handed on in the
//! order the calls were made.

use std::collections::VecDeque;

/// Runs calls with at most `window` in flight and hands each answer to `each` in the
/// order the calls were made. `calls` yields each call with a context for its answer;
/// it is pulled lazily, so reading the next inputs overlaps the calls in flight.
pub(super) async fn in_order<C, T, F>(
    mut calls: impl Iterator<Item = Result<(C, F), String>>,
    window: usize,
    mut each: impl FnMut(C, Result<T, crate::grpc::client::Status>) -> Result<(), String>,
) -> Result<(), String>
where
    F: Future<Output = Result<T, crate::grpc::client::Status>> + Send + 'static,
    T: Send + 'static,
{
    let mut pending = VecDeque::new();
    loop {
        while pending.len() < window.max(1) {
            let Some(call) = calls.next() else { break };
            let (context, call) = call?;
            pending.push_back((context, tokio::spawn(call)));
        }
        let Some((context, call)) = pending.pop_front() else {
            return Ok(());
        };
        each(context, call.await.map_err(|e| e.to_string())?)?;
    }
}
