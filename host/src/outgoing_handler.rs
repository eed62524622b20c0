//! `wasi:http/outgoing-handler@0.2`, as wasmtime-wasi-http implements it,
//! with the `request-options` it is handed deleted afterwards.
//!
//! `handle` takes its `request-options` by `own`, so the guest cannot drop
//! them; wasmtime-wasi-http 48 reads them (`table.get`) and never deletes
//! them. Every upstream call then left one entry in the store's resource
//! table. With a fresh instance per request that is harmless; a reused
//! instance carried them from request to request until the worker's
//! leftover bound (256) retired it: an instance of the built-in guest
//! served about 64 product requests, not the 128 that `instance_reuse`
//! asks for (256 requests took four instances), and each worker's check of
//! its leftovers walked them all after every request.
//!
//! The rest is wasmtime-wasi-http's own `handle`, called as it is.

use wasmtime::component::{Linker, Resource};
use wasmtime_wasi_http::p2::bindings::http::outgoing_handler::Host as _;
use wasmtime_wasi_http::p2::bindings::http::types::{
    ErrorCode, FutureIncomingResponse, OutgoingRequest,
};
use wasmtime_wasi_http::{RequestOptions, WasiHttpView};

/// The interface as wasmtime-wasi-http 48's WIT names it (the guest's own
/// 0.2.x import resolves to it by semver). Pinned: should an upgrade move
/// it, this would define a second instance beside wasmtime's and the leak
/// would be back, which `the_built_in_guest_keeps_an_instance_for_its_whole_allowance`
/// (tests/tests/reuse.rs) catches.
const OUTGOING_HANDLER: &str = "wasi:http/outgoing-handler@0.2.12";

/// Adds `wasi:http@0.2` (types and the outgoing handler) to `linker`, as
/// `wasmtime_wasi_http::p2::add_only_http_to_linker_async` does, then puts
/// the handler above in place of its `handle`.
pub(crate) fn add_to_linker<T: WasiHttpView + 'static>(
    linker: &mut Linker<T>,
) -> wasmtime::Result<()> {
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker)?;
    linker.allow_shadowing(true);
    let added = linker.instance(OUTGOING_HANDLER)?.func_wrap(
        "handle",
        |mut store,
         (request, options): (
            Resource<OutgoingRequest>,
            Option<Resource<RequestOptions>>,
        )| {
            let mut http = store.data_mut().http();
            let handed = options
                .as_ref()
                .map(|options| Resource::<RequestOptions>::new_own(options.rep()));
            let answer = http.handle(request, options);
            if let Some(handed) = handed {
                // Only if still there and still options: a later
                // wasmtime-wasi-http that deletes them itself may have
                // reused the slot meanwhile.
                if http.table.get(&handed).is_ok() {
                    let _ = http.table.delete(handed);
                }
            }
            let answer: Result<Resource<FutureIncomingResponse>, ErrorCode> = match answer {
                Ok(future) => Ok(future),
                // An error code for the guest, or a trap, as the bindings
                // would have it.
                Err(error) => Err(error.downcast()?),
            };
            Ok((answer,))
        },
    );
    linker.allow_shadowing(false);
    added
}
