use super::*;

fn failed(status: u16, ct: Option<&str>, body: &str) -> ProxyError {
    let mut headers = HeaderMap::new();
    if let Some(ct) = ct {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
    }
    ProxyError::Upstream(Box::new(Failed {
        status: StatusCode::from_u16(status).unwrap(),
        headers,
        body: Bytes::copy_from_slice(body.as_bytes()),
        cut: false,
    }))
}

fn served(attempts: u32) -> Served {
    Served {
        attempts,
        ..Served::default()
    }
}

async fn body_of(error: &ProxyError, served: &Served, secrets: &Secrets) -> (u16, Bytes) {
    let resp = answer(error, served, "rid", secrets);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    let status = resp.status().as_u16();
    (
        status,
        axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap(),
    )
}

async fn wrap_value(status: u16, ct: Option<&str>, body: &str) -> Value {
    let (got, out) = body_of(&failed(status, ct, body), &served(1), &Secrets::default()).await;
    assert_eq!(got, status);
    serde_json::from_slice(&out).unwrap()
}

#[tokio::test]
async fn a_conforming_envelope_passes_through_untouched() {
    let body = r#"{"error":{"code":"VALIDATION_ERROR","message":"bad","details":{"field":"x"}},"extra":1}"#;
    let (_, out) = body_of(&failed(422, None, body), &served(1), &Secrets::default()).await;
    assert_eq!(out, body.as_bytes());
}

#[tokio::test]
async fn wraps_message_shapes() {
    let v = wrap_value(
        404,
        Some("application/json"),
        r#"{"message":"Campaign not found"}"#,
    )
    .await;
    assert_eq!(v["error"]["code"], "NOT_FOUND");
    assert_eq!(v["error"]["message"], "Campaign not found");
    assert_eq!(v["error"]["details"]["upstream_status"], 404);
    assert_eq!(v["error"]["details"]["request_id"], "rid");
    assert!(
        v["error"]["details"]["hint"]
            .as_str()
            .unwrap()
            .contains("list campaigns")
    );

    let v = wrap_value(401, None, r#"{"error":"Invalid API key"}"#).await;
    assert_eq!(v["error"]["code"], "UNAUTHORIZED");
    assert_eq!(v["error"]["message"], "Invalid API key");

    let v = wrap_value(
        422,
        None,
        r#"{"error":{"message":"bad email","details":{"field":"email"}}}"#,
    )
    .await;
    assert_eq!(v["error"]["code"], "VALIDATION_ERROR");
    assert_eq!(v["error"]["details"]["upstream_details"]["field"], "email");
    assert!(
        v["error"]["details"]["hint"]
            .as_str()
            .unwrap()
            .contains("fix email")
    );
}

#[tokio::test]
async fn wraps_html_text_and_empty() {
    let v = wrap_value(
        502,
        Some("text/html"),
        "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
    )
    .await;
    assert_eq!(v["error"]["code"], "UPSTREAM_ERROR");
    assert_eq!(v["error"]["message"], "502 Bad Gateway");
    let v = wrap_value(500, Some("text/plain"), "  Internal\n error  ").await;
    assert_eq!(v["error"]["message"], "Internal error");
    let v = wrap_value(503, None, "").await;
    assert_eq!(
        v["error"]["message"],
        "SmartLead answered 503 Service Unavailable"
    );
    let v = wrap_value(409, None, &"x".repeat(5000)).await;
    assert!(v["error"]["message"].as_str().unwrap().chars().count() <= MAX_MESSAGE_CHARS + 1);
}

#[tokio::test]
async fn hints_follow_smartleads_status_table_and_the_proxys_own_cases() {
    let limited = |why| {
        ProxyError::RateLimited(Box::new(RateLimited {
            why,
            retry_after: Duration::from_secs(3),
            window: in_force("60/60s", 60, 60),
            policy: vec![in_force("60/60s", 60, 60)],
            account: "default".into(),
            client: None,
        }))
    };
    let cases: Vec<(ProxyError, u32, &str)> = vec![
        (
            failed(401, None, "x"),
            1,
            "SMARTLEAD_API_KEY where the proxy runs",
        ),
        (ProxyError::Unauthorized, 0, "Authorization: Bearer"),
        (failed(403, None, "x"), 1, "no access to this resource"),
        (failed(404, None, "x"), 1, "list campaigns"),
        (ProxyError::NotFound, 0, "base URL"),
        (failed(409, None, "x"), 1, "safe to ignore"),
        (failed(422, None, "x"), 1, "fix the request"),
        (failed(429, None, "x"), 4, "smaller than limit.windows"),
        (
            failed(500, None, "x"),
            4,
            "after 4 attempts (retried 3 times)",
        ),
        (failed(503, None, "x"), 1, "after 1 attempt (not retried)"),
        (
            ProxyError::UpstreamUnreachable("refused".into()),
            2,
            "could not be reached after 2",
        ),
        (
            ProxyError::UpstreamTimeout(Duration::from_secs(1)),
            1,
            "upstream.timeout",
        ),
        (ProxyError::ShuttingDown, 0, "/readyz"),
        (ProxyError::Internal, 0, "bug"),
        (
            ProxyError::PayloadTooLarge { limit: 10 },
            0,
            "server.max_body_bytes",
        ),
        (
            ProxyError::BodyStalled {
                after: Duration::from_secs(1),
            },
            0,
            "server.client_timeout",
        ),
        (ProxyError::OutOfBodyMemory, 0, "server.max_buffered_bytes"),
        (
            ProxyError::BodyTooSlow {
                within: Duration::from_secs(60),
            },
            0,
            "server.body_timeout",
        ),
        (
            ProxyError::TooManyConnections { max: 10 },
            0,
            "server.max_connections",
        ),
        (
            ProxyError::MethodNotAllowed(Method::CONNECT),
            0,
            "never tunnels",
        ),
        (limited(Limited::QueueFull), 0, "limit.max_queue"),
        (limited(Limited::PastDeadline), 0, "limit.max_wait"),
        (
            limited(Limited::ClientQueueFull),
            0,
            "limit.max_queue_per_client",
        ),
        (limited(Limited::ClientCap), 0, "limit.per_client"),
        (
            limited(Limited::PausedPastDeadline),
            0,
            "limit.follow_upstream",
        ),
    ];
    for (error, attempts, wanted) in cases {
        let (_, out) = body_of(&error, &served(attempts), &Secrets::default()).await;
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert!(is_envelope(&v), "{v}");
        let hint = v["error"]["details"]["hint"].as_str().unwrap();
        assert!(hint.contains(wanted), "{error:?}: {hint}");
    }
    let (_, out) = body_of(
        &limited(Limited::QueueFull),
        &served(0),
        &Secrets::default(),
    )
    .await;
    assert!(String::from_utf8_lossy(&out).contains("after 3s"));
    // A field SmartLead named, in a list of errors.
    let v = wrap_value(
        400,
        None,
        r#"{"message":"bad","errors":[{"field":"email","msg":"bad"}]}"#,
    )
    .await;
    assert!(
        v["error"]["details"]["hint"]
            .as_str()
            .unwrap()
            .contains("fix email")
    );
}

fn in_force(label: &str, limit: usize, secs: u64) -> InForce {
    InForce {
        label: label.into(),
        limit,
        period: Duration::from_secs(secs),
    }
}

#[tokio::test]
async fn a_rate_limit_answer_says_which_window_and_when() {
    let error = ProxyError::RateLimited(Box::new(RateLimited {
        why: Limited::PastDeadline,
        retry_after: Duration::from_millis(2500),
        window: in_force("1000/1h", 1000, 3600),
        policy: vec![
            in_force("10/1s", 10, 1),
            in_force("60/60s", 12, 60),
            in_force("1000/1h", 1000, 3600),
        ],
        account: "acme".into(),
        client: None,
    }));
    let resp = answer(&error, &served(0), "rid", &Secrets::default());
    assert_eq!(resp.status(), 429);
    let h = resp.headers().clone();
    assert_eq!(h["retry-after"], "3");
    assert_eq!(h["ratelimit-limit"], "1000");
    assert_eq!(h["ratelimit-remaining"], "0");
    assert_eq!(h["ratelimit-reset"], "3");
    assert_eq!(h["ratelimit-policy"], "10;w=1, 12;w=60, 1000;w=3600");
    let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["details"]["window"], "1000/1h");
    assert_eq!(v["error"]["details"]["account"], "acme");
}

#[tokio::test]
async fn secrets_never_come_back_in_any_shape() {
    let secrets = crate::key::ApiKey::new("Sk-9f/8e+7d=6c5b4a").secrets();
    let key_gone = |out: &[u8]| {
        let text = String::from_utf8_lossy(out).to_ascii_lowercase();
        !text.contains("sk-9f") && !text.contains("536b2d") && !text.contains("\\u0053")
    };
    for (ct, body, cut) in [
        (None, r#"{"message":"bad \u0053k-9f\/8e+7d=6c5b4a"}"#, false),
        (
            None,
            r#"{"error":{"code":"X","message":"\u0053K-9F\/8E+7D=6C5B4A"}}"#,
            false,
        ),
        (
            None,
            r#"{"error":{"code":"X","message":"m","details":{"u":"Sk%2d9F%2f8e%2B7d=6c5b4a"}}}"#,
            false,
        ),
        (
            Some("text/html"),
            "<title>&#83;k-9f&#x2F;8e+7d=6c5b4a</title>",
            false,
        ),
        (
            Some("text/plain"),
            "   536B2D39662F38652B37643D366335623461",
            false,
        ),
        (Some("text/plain"), "                     Sk-9f/8e+7d", true),
    ] {
        let mut error = failed(400, ct, body);
        if let ProxyError::Upstream(f) = &mut error {
            f.cut = cut;
        }
        let (_, out) = body_of(&error, &served(1), &secrets).await;
        assert!(
            key_gone(&out),
            "{body} -> {}",
            String::from_utf8_lossy(&out)
        );
        let v: Value = serde_json::from_slice(&out).expect("still JSON");
        assert!(is_envelope(&v));
    }
    // A clean conforming envelope still passes through byte for byte.
    let clean = r#"{"error":{"code":"X","message":"m"}}"#;
    let (_, out) = body_of(&failed(400, None, clean), &served(1), &secrets).await;
    assert_eq!(out, clean.as_bytes());
}

#[tokio::test]
async fn a_stopped_import_says_what_went_through_and_keeps_smartleads_error() {
    let stop = BatchStop {
        batch: 2,
        batches: 3,
        leads: "lead_list[400..800]".into(),
        imported: Some("lead_list[0..400]".into()),
        not_imported: "lead_list[400..1000]".into(),
        completed: json!({"upload_count": 400}),
        cause: failed(500, Some("application/json"), r#"{"message":"down"}"#),
    };
    let (status, out) = body_of(
        &ProxyError::BatchStopped(Box::new(stop)),
        &served(5),
        &Secrets::default(),
    )
    .await;
    assert_eq!(status, 500);
    let v: Value = serde_json::from_slice(&out).unwrap();
    let d = &v["error"]["details"];
    assert_eq!(v["error"]["code"], "UPSTREAM_ERROR");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("lead import stopped at batch 2 of 3 (lead_list[400..800]): down.")
    );
    assert_eq!(d["failed_batch"], 2);
    assert_eq!(d["imported"], "lead_list[0..400]");
    assert_eq!(d["not_imported"], "lead_list[400..1000]");
    assert_eq!(d["completed"]["upload_count"], 400);
    assert_eq!(d["upstream_status"], 500);
    assert_eq!(d["upstream_error"]["message"], "down");
    assert_eq!(d["attempts"], 5);
}

proptest::proptest! {
    /// Any bytes with any content type and status come out as a valid envelope
    /// (or pass through because they already are one).
    #[test]
    fn any_upstream_body_becomes_an_envelope(
        status in 300u16..600,
        ct in proptest::option::of("[a-z/+;= -]{0,30}"),
        body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000),
    ) {
        let mut headers = HeaderMap::new();
        if let Some(ct) = ct.as_deref().and_then(|c| HeaderValue::from_str(c).ok()) {
            headers.insert(header::CONTENT_TYPE, ct);
        }
        let failed = Failed { status: StatusCode::from_u16(status).unwrap(), headers, body: Bytes::from(body), cut: false };
        let (_, _, out) = wrap(&failed, &served(1), "rid", &Secrets::default());
        let v: Value = serde_json::from_slice(&out).expect("always JSON");
        proptest::prop_assert!(is_envelope(&v));
    }
}
