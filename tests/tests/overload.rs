//! Overload from clients as they are in the wild: closed loops that answer
//! each 503 with a new request at once.
//!
//! A test binary of its own, for the same reason as `admission.rs`: the
//! load it makes would be load the tests beside it rightly react to.

use anyhow::Result;
use fanout_tests::{MS, ProductUpstreams, TestHost};

/// One closed-loop client on its own keep-alive connection, sending the
/// next request as soon as an answer comes, as load generators and most
/// retry loops do (Retry-After ignored), until `until`. Returns the count
/// of answers by status.
async fn resending_client(
    addr: std::net::SocketAddr,
    until: tokio::time::Instant,
) -> Result<std::collections::BTreeMap<u16, usize>> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut counts = std::collections::BTreeMap::new();
    let mut i = 0;
    while tokio::time::Instant::now() < until {
        i += 1;
        let request = http::Request::get(format!("/products/{i}"))
            .header("host", "fanout.test")
            .body(Empty::<bytes::Bytes>::new())?;
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        response.into_body().collect().await?;
        *counts.entry(status).or_insert(0) += 1;
    }
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_resend_at_once_do_not_starve_the_answers() -> Result<()> {
    // Four places, upstreams at 20 ms: about 150 answers a second at most.
    // Thirty-two clients that answer every 503 with a new request at once.
    let upstreams = ProductUpstreams::start(MS(20)).await?;
    let fanout = upstreams
        .builder()
        .admission(fanout_host::AdmissionMode::Fixed)
        // Clients ask for the same ids at once: every admitted request must
        // make its own calls for the count below.
        .coalescing(false)
        .limits(fanout_host::Limits {
            max_instances: 4,
            queue_wait: std::time::Duration::ZERO,
            ..Default::default()
        })
        .build()?;
    let host = TestHost::start(fanout).await?;
    let window = MS(1500);
    let until = tokio::time::Instant::now() + window;
    let clients = (0..32).map(|_| resending_client(host.addr, until));
    let mut counts = std::collections::BTreeMap::<u16, usize>::new();
    for client in futures_util::future::join_all(clients).await {
        for (status, n) in client? {
            *counts.entry(status).or_insert(0) += n;
        }
    }
    let ok = counts.get(&200).copied().unwrap_or(0);
    let shed = counts.get(&503).copied().unwrap_or(0);
    assert_eq!(ok + shed, counts.values().sum::<usize>(), "{counts:?}");
    // Each client's 503s come at most once per Retry-After (1 s) after its
    // first: a 1.5 s window allows three per client. Answered at once, the
    // same clients get thousands.
    assert!(shed <= 32 * 3, "{shed} sheds: {counts:?}");
    // The places stay busy: at least 40% of the ~225 answers the window
    // holds (loose: two shared cores).
    assert!(ok >= 90, "only {ok} answers: {counts:?}");
    // Nothing shed reached an upstream.
    assert_eq!(upstreams.pricing.calls().len(), ok);
    let metrics = host.fanout.metrics().encode();
    assert!(
        metrics.contains(&format!("fanout_shed_total {shed}")),
        "{metrics}"
    );
    Ok(())
}
