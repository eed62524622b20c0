use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REFUSAL: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Thu, 03 Dec 2026 11:51:00 GMT\r\n\r\n";

/// A wrapped end of a pipe, its turn, and the other end to read from.
fn wrapped() -> (
    JsonRefusals<tokio::io::DuplexStream>,
    Arc<Turn>,
    tokio::io::DuplexStream,
) {
    let (ours, theirs) = tokio::io::duplex(4096);
    let turn = Arc::new(Turn::default());
    let limits = ConnectionLimits::default();
    (JsonRefusals::new(ours, turn.clone(), limits), turn, theirs)
}

/// A handler's answer begun on `turn`, its body as hyper holds it.
fn answer_on(turn: &Arc<Turn>) -> Answered<http_body_util::Empty<Bytes>> {
    turn.answering();
    Answered::new(http_body_util::Empty::new(), turn.clone())
}

async fn sent(
    mut io: JsonRefusals<tokio::io::DuplexStream>,
    mut theirs: tokio::io::DuplexStream,
) -> String {
    io.shutdown().await.unwrap();
    drop(io);
    let mut read = Vec::new();
    theirs.read_to_end(&mut read).await.unwrap();
    String::from_utf8(read).unwrap()
}

fn body_of(answer: &str) -> serde_json::Value {
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .expect("a length")
        .parse()
        .unwrap();
    assert_eq!(length, body.len(), "{answer}");
    assert!(
        head.contains("content-type: application/json\r\n"),
        "{head}"
    );
    serde_json::from_str(body).unwrap()
}

#[tokio::test]
async fn a_refusal_before_any_answer_gets_the_json_body() {
    let (mut io, _turn, theirs) = wrapped();
    // As hyper writes it: in two pieces, then a flush.
    io.write_all(&REFUSAL[..20]).await.unwrap();
    io.write_all(&REFUSAL[20..]).await.unwrap();
    io.flush().await.unwrap();
    let answer = sent(io, theirs).await;
    assert!(answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert!(
        answer.contains("date: Thu, 03 Dec 2026 11:51:00 GMT\r\n"),
        "{answer}"
    );
    let body = body_of(&answer);
    assert_eq!(body["error"]["code"], "request_head_too_large");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("100 header fields")
    );
}

#[tokio::test]
async fn each_refusal_hyper_writes_has_its_code() {
    for (status, code) in [
        ("400 Bad Request", "malformed_request"),
        ("414 URI Too Long", "uri_too_long"),
    ] {
        let (mut io, _turn, theirs) = wrapped();
        let head = format!("HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
        io.write_all(head.as_bytes()).await.unwrap();
        let answer = sent(io, theirs).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{answer}"
        );
        assert_eq!(body_of(&answer)["error"]["code"], code);
    }
}

#[tokio::test]
async fn an_answer_and_its_tail_go_out_unchanged() {
    let (mut io, turn, theirs) = wrapped();
    // A handler's own empty 431, and the tail of its answer written after
    // hyper dropped the body: both while the answer is on its way.
    let body = answer_on(&turn);
    io.write_all(&REFUSAL[..30]).await.unwrap();
    drop(body);
    io.write_all(&REFUSAL[30..]).await.unwrap();
    io.flush().await.unwrap();
    // A second answer, whole.
    turn.answering();
    io.write_all(REFUSAL).await.unwrap();
    io.flush().await.unwrap();
    let answer = sent(io, theirs).await;
    assert_eq!(answer.as_bytes(), [REFUSAL, REFUSAL].concat());
}

#[tokio::test]
async fn after_an_answer_is_flushed_a_refusal_is_rewritten() {
    let (mut io, turn, theirs) = wrapped();
    let body = answer_on(&turn);
    io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await
        .unwrap();
    drop(body);
    io.flush().await.unwrap();
    io.write_all(REFUSAL).await.unwrap();
    let answer = sent(io, theirs).await;
    let (first, second) = answer.split_at("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".len());
    assert_eq!(first, "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
    assert_eq!(body_of(second)["error"]["code"], "request_head_too_large");
}

#[tokio::test]
async fn what_is_not_a_refusal_goes_out_as_written() {
    for unknown in [
        &b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n"[..],
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 3\r\n\r\n",
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\ntrailing",
        b"not a head at all",
    ] {
        let (mut io, _turn, theirs) = wrapped();
        io.write_all(unknown).await.unwrap();
        assert_eq!(sent(io, theirs).await.as_bytes(), unknown);
    }
    // Longer than a refusal ever is, without its end.
    let (mut io, _turn, theirs) = wrapped();
    let long = vec![b'x'; MAX_REFUSAL_HEAD + 100];
    io.write_all(&long).await.unwrap();
    io.write_all(b"more").await.unwrap();
    assert_eq!(
        sent(io, theirs).await.as_bytes(),
        [&long[..], b"more"].concat()
    );
}

#[tokio::test]
async fn an_http2_client_is_told_to_use_http1() {
    let (mut io, _turn, mut theirs) = wrapped();
    theirs
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut read = [0u8; 24];
    io.read_exact(&mut read).await.unwrap();
    // What hyper reads is what was sent.
    assert_eq!(&read, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    drop(io);
    let mut answer = Vec::new();
    theirs.read_to_end(&mut answer).await.unwrap();
    // An empty SETTINGS, then GOAWAY: last stream 0, HTTP_1_1_REQUIRED.
    assert_eq!(&answer[..9], &[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let length = usize::from(answer[11]);
    assert_eq!(answer[12], 0x7, "GOAWAY");
    assert_eq!(answer.len(), 18 + length);
    assert_eq!(&answer[18..26], &[0, 0, 0, 0, 0, 0, 0, 0xd]);
    assert_eq!(&answer[26..], b"this port speaks HTTP/1.1");
}

#[tokio::test]
async fn an_http1_request_reads_as_it_came() {
    let (mut io, _turn, mut theirs) = wrapped();
    theirs
        .write_all(b"PRIVATE / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    drop(theirs);
    let mut read = Vec::new();
    io.read_to_end(&mut read).await.unwrap();
    assert_eq!(read, b"PRIVATE / HTTP/1.1\r\n\r\n");
    // Nothing was written back.
    assert!(io.out.is_empty() && !io.done);
}

#[tokio::test]
async fn a_head_begun_and_not_finished_is_told_from_an_idle_connection() {
    let (mut io, turn, mut theirs) = wrapped();
    // Nothing asked yet: a connection closed now never sent a head.
    assert!(turn.head_unfinished());
    theirs.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let mut read = [0u8; 16];
    io.read_exact(&mut read).await.unwrap();
    assert!(turn.head_unfinished(), "begun");
    // The head was whole and answered: idle after it is not unfinished.
    drop(answer_on(&turn));
    io.flush().await.unwrap();
    assert!(!turn.head_unfinished(), "idle after an answer");
    theirs.write_all(b"GET").await.unwrap();
    let mut read = [0u8; 3];
    io.read_exact(&mut read).await.unwrap();
    assert!(turn.head_unfinished(), "the next one begun");
}
