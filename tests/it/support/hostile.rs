//! A hostile SmartLead on raw sockets: it reads the key the proxy sends and hides it in
//! its answer, in the shape the request path names (`/api/v1/hostile/<shape>`).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A key with characters that must be encoded in a query, long enough that pieces of it
/// can be looked for.
pub const HOSTILE_KEY: &str = "Hk9/Zq+Lm=Pr-Tx_Vw.Yb3Nc7Q";

/// Every shape, with the status the client should see.
pub const SHAPES: &[(&str, u16)] = &[
    ("json-u-escaped", 400),
    ("envelope-u-escaped", 422),
    ("envelope-slash-escaped", 400),
    ("envelope-raw", 409),
    ("json-object-key", 400),
    ("lower-percent", 401),
    ("partly-encoded", 403),
    ("double-encoded", 404),
    ("html-entities", 404),
    ("hex", 400),
    ("upper-case", 400),
    ("gzip-cut", 400),
    ("headers-success", 200),
    ("location-201", 201),
    ("headers-error", 401),
    ("redirect", 302),
    ("retry-after-huge", 503),
    ("retry-after-negative", 503),
    ("retry-after-1990", 503),
    ("retry-after-key", 503),
];

/// Serves hostile answers until the test ends; returns its base URL.
pub async fn hostile_upstream() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer_one(stream));
        }
    });
    format!("http://{addr}/api/v1")
}

async fn answer_one(mut stream: tokio::net::TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let target = head.split(' ').nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let key = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "api_key")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let shape = path.rsplit('/').next().unwrap_or("");
    let _ = stream.write_all(&reply(shape, &key)).await;
    let _ = stream.shutdown().await;
}

fn each(key: &str, f: impl Fn(usize, u8) -> String) -> String {
    key.bytes().enumerate().map(|(i, b)| f(i, b)).collect()
}

fn response(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn text(status: &str, content_type: &str, body: String) -> Vec<u8> {
    response(
        status,
        &[("Content-Type", content_type.to_owned())],
        body.as_bytes(),
    )
}

fn reply(shape: &str, key: &str) -> Vec<u8> {
    let u_escaped = each(key, |_, b| format!("\\u{b:04x}"));
    let slash_escaped = key.replace('/', "\\/");
    let json = "application/json";
    match shape {
        "json-u-escaped" => text(
            "400 Bad Request",
            json,
            format!(r#"{{"message":"invalid api_key {u_escaped}"}}"#),
        ),
        "envelope-u-escaped" => text(
            "422 Unprocessable Entity",
            json,
            format!(
                r#"{{"error":{{"code":"VALIDATION_ERROR","message":"key {u_escaped}","details":{{"api_key":"{u_escaped}"}}}}}}"#
            ),
        ),
        "envelope-slash-escaped" => text(
            "400 Bad Request",
            json,
            format!(
                r#"{{"error":{{"code":"BAD_REQUEST","message":"bad","details":{{"url":"https:\/\/x\/?api_key={slash_escaped}"}}}}}}"#
            ),
        ),
        "envelope-raw" => text(
            "409 Conflict",
            json,
            format!(
                r#"{{"error":{{"code":"CONFLICT","message":"dup","details":{{"seen":"{key}"}}}}}}"#
            ),
        ),
        "json-object-key" => text(
            "400 Bad Request",
            json,
            format!(r#"{{"message":"bad","errors":{{"{u_escaped}":"unknown"}}}}"#),
        ),
        "lower-percent" => text(
            "401 Unauthorized",
            "text/plain",
            format!("bad key: {}", each(key, |_, b| format!("%{b:02x}"))),
        ),
        "partly-encoded" => text(
            "403 Forbidden",
            "text/plain",
            format!(
                "no access for {}",
                each(key, |i, b| if i % 2 == 0 {
                    format!("%{b:02X}")
                } else {
                    (b as char).to_string()
                })
            ),
        ),
        "double-encoded" => text(
            "404 Not Found",
            "text/plain",
            format!("no such key {}", each(key, |_, b| format!("%25{b:02X}"))),
        ),
        "html-entities" => text(
            "404 Not Found",
            "text/html",
            format!(
                "<html><title>missing {}</title></html>",
                each(key, |i, b| if i % 2 == 0 {
                    format!("&#{b};")
                } else {
                    format!("&#x{b:x};")
                })
            ),
        ),
        "hex" => text(
            "400 Bad Request",
            "text/plain",
            format!("key hex {}", each(key, |_, b| format!("{b:02x}"))),
        ),
        "upper-case" => text(
            "400 Bad Request",
            "text/plain",
            format!("KEY {}", key.to_uppercase()),
        ),
        "gzip-cut" => {
            // Decoded, the key straddles the proxy's 1 MiB cap on error bodies: 20 of its
            // characters come before the cut.
            use std::io::Write;
            let mut plain = vec![b' '; 1024 * 1024 - 20];
            plain.extend_from_slice(key.as_bytes());
            plain.extend_from_slice(b" tail");
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&plain).unwrap();
            let body = gz.finish().unwrap();
            response(
                "400 Bad Request",
                &[
                    ("Content-Type", "text/plain".into()),
                    ("Content-Encoding", "gzip".into()),
                ],
                &body,
            )
        }
        "headers-success" => response(
            "200 OK",
            &[
                ("Content-Type", json.into()),
                ("Set-Cookie", format!("sid={key}; Path=/")),
                ("X-Echo", each(key, |_, b| format!("%{b:02x}"))),
                ("WWW-Authenticate", format!("Bearer realm=\"{key}\"")),
                ("Retry-After", key.to_owned()),
                ("Link", format!("<https://x/?api_key={key}>; rel=next")),
            ],
            br#"{"ok":true}"#,
        ),
        "location-201" => response(
            "201 Created",
            &[
                ("Content-Type", json.into()),
                (
                    "Location",
                    format!(
                        "https://server/x/1?api_key={}",
                        each(key, |_, b| format!("%{b:02X}"))
                    ),
                ),
            ],
            br#"{"id":1}"#,
        ),
        "headers-error" => response(
            "401 Unauthorized",
            &[
                ("Content-Type", "text/plain".into()),
                ("WWW-Authenticate", format!("Bearer error=\"{key}\"")),
                ("X-Debug", u_escaped.clone()),
            ],
            b"no",
        ),
        "redirect" => response(
            "302 Found",
            &[("Location", format!("https://elsewhere/?api_key={key}"))],
            b"",
        ),
        "retry-after-huge" => retry_after("1000000000000"),
        "retry-after-negative" => retry_after("-5"),
        "retry-after-1990" => retry_after("Mon, 01 Jan 1990 00:00:00 GMT"),
        "retry-after-key" => retry_after(key),
        _ => text("404 Not Found", "text/plain", "no such shape".into()),
    }
}

fn retry_after(value: &str) -> Vec<u8> {
    response(
        "503 Service Unavailable",
        &[
            ("Content-Type", "text/plain".into()),
            ("Retry-After", value.to_owned()),
        ],
        b"busy",
    )
}
