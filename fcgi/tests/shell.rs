//! The tokio shell end to end on a unix socket: a tiny server loop built on `io::next_input`,
//! `ServerConnection` and `ResponseWriter`, spoken to by `io::Client`.

use bytes::BytesMut;
use fcgi::io::{next_input, Client, Input};
use fcgi::response::ResponseWriter;
use fcgi::server::{Event, ServerConnection};
use fcgi::{Limits, Params};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

#[tokio::test(flavor = "current_thread")]
async fn client_and_server_over_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("fcgi-shell-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("s.sock");
    let listener = UnixListener::bind(&path).expect("bind");

    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let (mut rd, mut wr) = stream.into_split();
        let mut conn = ServerConnection::new(Limits {
            max_reqs: 5,
            ..Limits::default()
        });
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        loop {
            match next_input(&mut rd, &mut conn, &mut buf)
                .await
                .expect("valid input")
            {
                Input::Event(Event::Stdin { data, .. }) => body.extend_from_slice(&data),
                Input::Event(Event::StdinEnd { id }) => {
                    let mut out = BytesMut::new();
                    let w = ResponseWriter::new(id);
                    w.stdout(b"Status: 201 Created\r\nX-Len: ", &mut out);
                    w.stdout(body.len().to_string().as_bytes(), &mut out);
                    w.stdout(b"\r\n\r\n", &mut out);
                    w.stdout(&body, &mut out);
                    w.finish(&mut out);
                    conn.end_request(id, 0, &mut out);
                    wr.write_all(&out).await.expect("write");
                    body.clear();
                }
                Input::Event(_) => {}
                Input::Output(control) => wr.write_all(&control).await.expect("write"),
                Input::Closed => return,
            }
        }
    });

    let mut client = Client::connect_unix(&path).await.expect("connect");
    let values = client.get_values(&["FCGI_MAX_REQS"]).await.expect("values");
    assert_eq!(values.get_str("FCGI_MAX_REQS"), Some("5"));
    let body = vec![9u8; 300_000];
    for _ in 0..2 {
        let res = client
            .request(&Params::from_pairs([("REQUEST_METHOD", "POST")]), &body)
            .await
            .expect("response");
        assert_eq!(res.status(), 201);
        assert_eq!(res.header("x-len").as_deref(), Some("300000"));
        assert_eq!(res.body(), &body[..]);
    }
    drop(client);
    server.await.expect("server loop ended cleanly");
    let _ = std::fs::remove_dir_all(&dir);
}
