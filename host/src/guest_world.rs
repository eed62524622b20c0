//! The two `wasi:http` worlds a guest may export, told apart by its
//! exports when the component is linked:
//!
//! - `wasi:http/proxy@0.2` (`incoming-handler`): the guest gets a request
//!   and a `response-outparam`, and answers through the outparam;
//! - `wasi:http/service@0.3` (`handler`): an async export that returns the
//!   response, whose body the guest then writes to a stream, in tasks that
//!   the instance's event loop ([`Store::run_concurrent`]) runs.
//!
//! Everything else (admission, workers, limits, outgoing calls through the
//! same hooks, failure classes) is the same for both; [`GuestCall::run`]
//! is where they differ. A 0.3 instance serves its requests one at a time
//! here, as a 0.2 one does: the fuel, epoch and memory limits then stay
//! per request.

use crate::response::ResponseBody;
use crate::store::RequestState;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Body;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::oneshot;
use wasmtime::Store;
use wasmtime::component::{InstancePre, Resource};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode as OutparamError, Scheme};
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::p2::types::{HostIncomingRequest, HostResponseOutparam};
use wasmtime_wasi_http::p3::bindings::{Service, ServicePre};

/// Which `wasi:http` a guest serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasiHttpVersion {
    /// `wasi:http/proxy@0.2`.
    P2,
    /// `wasi:http/service@0.3`.
    P3,
}

impl WasiHttpVersion {
    /// The world a component's own exports say it serves: 0.3 when it
    /// exports `wasi:http/handler@0.3`, else 0.2 (linking then checks it
    /// really exports 0.2's `incoming-handler`). Read before the engine is
    /// made, since a 0.3 guest needs more fiber stacks in the pool
    /// ([`STACKS_PER_P3_REQUEST`](crate::limits::STACKS_PER_P3_REQUEST)). Bytes that
    /// do not parse are left for compilation to refuse.
    pub(crate) fn exported_by(component: &[u8]) -> WasiHttpVersion {
        use wasmparser::{Parser, Payload};
        // Nested modules and components have exports of their own: only
        // the outermost ones are the component's.
        let mut depth = 0usize;
        for payload in Parser::new(0).parse_all(component) {
            match payload {
                Ok(Payload::ModuleSection { .. } | Payload::ComponentSection { .. }) => depth += 1,
                Ok(Payload::End(_)) => depth = depth.saturating_sub(1),
                Ok(Payload::ComponentExportSection(exports)) if depth == 0 => {
                    let p3 = exports
                        .into_iter()
                        .flatten()
                        .any(|export| export.name.name.starts_with("wasi:http/handler@0.3"));
                    if p3 {
                        return WasiHttpVersion::P3;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        WasiHttpVersion::P2
    }
}

/// A linked component, ready to be instantiated in a worker's store.
pub(crate) enum GuestPre {
    P2(ProxyPre<RequestState>),
    P3(ServicePre<RequestState>),
}

/// An instance of the guest, kept by its worker between requests.
pub(crate) enum GuestInstance {
    P2(Proxy),
    P3(Service),
}

impl GuestPre {
    /// `pre` linked as `world` (read from its exports by
    /// [`WasiHttpVersion::exported_by`]); the error names what it lacks.
    pub(crate) fn new(
        pre: InstancePre<RequestState>,
        world: WasiHttpVersion,
    ) -> wasmtime::Result<GuestPre> {
        Ok(match world {
            WasiHttpVersion::P2 => GuestPre::P2(ProxyPre::new(pre)?),
            WasiHttpVersion::P3 => GuestPre::P3(ServicePre::new(pre)?),
        })
    }

    pub(crate) fn version(&self) -> WasiHttpVersion {
        match self {
            GuestPre::P2(_) => WasiHttpVersion::P2,
            GuestPre::P3(_) => WasiHttpVersion::P3,
        }
    }

    pub(crate) fn engine(&self) -> &wasmtime::Engine {
        match self {
            GuestPre::P2(pre) => pre.engine(),
            GuestPre::P3(pre) => pre.engine(),
        }
    }

    pub(crate) async fn instantiate(
        &self,
        store: &mut Store<RequestState>,
    ) -> wasmtime::Result<GuestInstance> {
        Ok(match self {
            GuestPre::P2(pre) => GuestInstance::P2(pre.instantiate_async(store).await?),
            GuestPre::P3(pre) => GuestInstance::P3(pre.instantiate_async(store).await?),
        })
    }
}

/// The guest's answer head, or why there is none (the guest's own error
/// code, as text).
pub(crate) type Head = Result<Response<ResponseBody>, String>;

/// Where the guest's answer head arrives.
pub(crate) enum HeadReceiver {
    P2(oneshot::Receiver<Result<Response<ResponseBody>, OutparamError>>),
    P3(oneshot::Receiver<Head>),
}

impl HeadReceiver {
    /// The head, or `Err` if the call ended without one.
    pub(crate) async fn recv(self) -> Result<Head, oneshot::error::RecvError> {
        match self {
            HeadReceiver::P2(receiver) => Ok(receiver.await?.map_err(|code| format!("{code:?}"))),
            HeadReceiver::P3(receiver) => receiver.await,
        }
    }
}

/// One request, handed to the guest in the shape its world takes.
pub(crate) enum GuestCall {
    P2 {
        request: Resource<HostIncomingRequest>,
        outparam: Resource<HostResponseOutparam>,
    },
    P3 {
        request: wasmtime_wasi_http::p3::Request,
        /// Reports the transmission of the request's body.
        request_io: Pin<Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>>,
        head: oneshot::Sender<Head>,
    },
}

impl GuestCall {
    /// Puts `request` in `store`'s table for `version`, with the channel its
    /// answer's head will come back on.
    pub(crate) fn new<B>(
        version: WasiHttpVersion,
        store: &mut Store<RequestState>,
        request: Request<B>,
    ) -> wasmtime::Result<(GuestCall, HeadReceiver)>
    where
        B: Body<Data = Bytes, Error = wasmtime_wasi_http::Error> + Send + 'static,
    {
        let mut http = store.data_mut().http();
        match version {
            WasiHttpVersion::P2 => {
                let (sender, receiver) = oneshot::channel();
                let request = http.new_incoming_request(Scheme::Http, request)?;
                let outparam = http.new_response_outparam(sender)?;
                Ok((
                    GuestCall::P2 { request, outparam },
                    HeadReceiver::P2(receiver),
                ))
            }
            WasiHttpVersion::P3 => {
                let (sender, receiver) = oneshot::channel();
                let (request, request_io) =
                    wasmtime_wasi_http::p3::Request::from_http(http.hooks, request);
                Ok((
                    GuestCall::P3 {
                        request,
                        request_io: Box::pin(request_io),
                        head: sender,
                    },
                    HeadReceiver::P3(receiver),
                ))
            }
        }
    }

    /// Runs the guest's handler on this request in `instance`, to the end
    /// of its answer: for a 0.3 guest, until the host has read or dropped
    /// the body, since only the instance's event loop moves the body's
    /// bytes out of the guest.
    pub(crate) async fn run(
        self,
        instance: &GuestInstance,
        store: &mut Store<RequestState>,
    ) -> wasmtime::Result<()> {
        match (self, instance) {
            (GuestCall::P2 { request, outparam }, GuestInstance::P2(proxy)) => {
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(store, request, outparam)
                    .await
            }
            (
                GuestCall::P3 {
                    request,
                    request_io,
                    head,
                },
                GuestInstance::P3(service),
            ) => {
                store
                    .run_concurrent(async move |accessor| {
                        let response = match service.handle(accessor, request).await? {
                            Ok(response) => response,
                            Err(code) => {
                                let _ = head.send(Err(format!("{code:?}")));
                                return Ok(());
                            }
                        };
                        let response = accessor
                            .with(|mut store| response.into_http(&mut store, request_io))?;
                        let (read, body_done) = oneshot::channel::<()>();
                        let response = response.map(|body| {
                            http_body_util::BodyExt::boxed_unsync(UntilRead {
                                body,
                                read: Some(read),
                            })
                        });
                        if head.send(Ok(response)).is_ok() {
                            // Ends when the body is read to its end, fails
                            // or is dropped (the client went away).
                            let _ = body_done.await;
                        }
                        Ok(())
                    })
                    .await?
            }
            _ => Err(wasmtime::Error::msg(
                "a request prepared for one wasi:http version met an instance of the other",
            )),
        }
    }
}

/// A body that says when it has been read to its end, or dropped: until
/// then its instance's event loop must run.
struct UntilRead {
    body: ResponseBody,
    read: Option<oneshot::Sender<()>>,
}

impl Body for UntilRead {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.read = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_world_is_read_from_the_outermost_exports() {
        assert_eq!(
            WasiHttpVersion::exported_by(crate::GUEST_COMPONENT),
            WasiHttpVersion::P2
        );
        assert_eq!(
            WasiHttpVersion::exported_by(crate::GUEST_P3_COMPONENT),
            WasiHttpVersion::P3
        );
        assert_eq!(
            WasiHttpVersion::exported_by(b"not a component"),
            WasiHttpVersion::P2
        );
    }
}
