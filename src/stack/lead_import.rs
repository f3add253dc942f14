//! Lead imports (`POST /campaigns/{id}/leads`) are checked before any quota is spent
//! (a 400 in SmartLead's own terms, nothing sent), leads without personalisation fields
//! are reported in `x-lead-warnings`, and with `leads.auto_batch` an import over
//! `leads.max_per_request` goes out in batches whose answers are merged into one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::response::IntoResponse;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, request::Parts};
use serde_json::Value;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::{Failure, Reply};
use crate::body::{READ_CAP, read_capped};
use crate::config::{LeadsSettings, UpstreamSettings};
use crate::error::{BatchStop, ProxyError};
use crate::key::Secrets;
use crate::leads::{self, Batch, Merged, Plan};
use crate::served::Served;
use crate::upstream::API_PREFIX;

/// How many batches an auto-batched lead import was sent in.
pub const BATCHES_HEADER: &str = "x-lead-batches";
/// What a lead import that was sent anyway lacks: `3 leads without first_name`.
pub const LEAD_WARNINGS_HEADER: &str = "x-lead-warnings";

#[derive(Debug)]
struct State {
    leads: LeadsSettings,
    secrets: Secrets,
    /// How long a batch's answer may take to read.
    read_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct LeadImportLayer {
    state: Arc<State>,
}

impl LeadImportLayer {
    pub fn new(leads: &LeadsSettings, upstream: &UpstreamSettings, secrets: &Secrets) -> Self {
        Self {
            state: Arc::new(State {
                leads: leads.clone(),
                secrets: secrets.clone(),
                read_timeout: upstream.timeout,
            }),
        }
    }
}

impl<S> Layer<S> for LeadImportLayer {
    type Service = LeadImport<S>;

    fn layer(&self, inner: S) -> LeadImport<S> {
        LeadImport {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct LeadImport<S> {
    inner: S,
    state: Arc<State>,
}

type Batching = Pin<Box<dyn Future<Output = Result<Reply, Failure>> + Send>>;

impl<S> Service<Request<Bytes>> for LeadImport<S>
where
    S: Service<Request<Bytes>, Response = Reply, Error = Failure> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Reply;
    type Error = Failure;
    type Future = LeadImportFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let api_path = req.uri().path().strip_prefix(API_PREFIX).unwrap_or("");
        if !leads::is_import(req.method(), api_path) {
            return LeadImportFuture::Sent {
                call: self.inner.call(req),
                warnings: None,
            };
        }
        let (plan, warnings) = match leads::plan(&self.state.leads, req.body()) {
            Ok(planned) => planned,
            Err(refusal) => {
                let failure = Failure::early(ProxyError::InvalidLeads(Box::new(refusal)));
                return LeadImportFuture::Refused {
                    failure: Some(Box::new(failure)),
                };
            }
        };
        if let Some(w) = &warnings {
            tracing::warn!(
                request_id = super::request_id::of(req.headers()),
                path = api_path,
                warnings = %w.header(),
                leads = %w.positions(),
                "lead import: leads without personalisation fields (sent anyway)"
            );
        }
        let warnings = warnings.and_then(|w| HeaderValue::from_str(&w.header()).ok());
        match plan {
            Plan::Forward => LeadImportFuture::Sent {
                call: self.inner.call(req),
                warnings,
            },
            // Rare, and N exchanges long: one box for the whole import.
            Plan::Batches(batches) => {
                let (parts, _) = req.into_parts();
                let import = in_batches(self.inner.clone(), parts, batches, self.state.clone());
                LeadImportFuture::Batching {
                    import: Box::pin(import),
                    warnings,
                }
            }
        }
    }
}

/// The batches in order, each through the quota and retries, then one merged answer;
/// the first failure stops the import and says what was sent.
async fn in_batches<S>(
    mut inner: S,
    parts: Parts,
    batches: Vec<Batch>,
    state: Arc<State>,
) -> Result<Reply, Failure>
where
    S: Service<Request<Bytes>, Response = Reply, Error = Failure>,
{
    let total: usize = batches.iter().map(|b| b.count).sum();
    let mut merged = Merged::default();
    let mut served = Served {
        upstream: true,
        ..Served::default()
    };
    for (n, batch) in batches.iter().enumerate() {
        let req = like(&parts, batch.body.clone());
        let outcome = match inner.ready().await {
            Ok(ready) => ready.call(req).await,
            Err(failure) => Err(failure),
        };
        match outcome {
            Ok(reply) => {
                served.add(reply.served.clone());
                let status = reply.response.status();
                let answer = read_answer(reply, &state).await;
                merged.add(batch, status, answer);
            }
            Err(failure) => {
                served.add(failure.served);
                let sent = merged.leads();
                let stop = BatchStop {
                    batch: n + 1,
                    batches: batches.len(),
                    leads: leads::range(batch.first, batch.count),
                    imported: (sent > 0).then(|| leads::range(0, sent)),
                    not_imported: leads::range(batch.first, total - batch.first),
                    completed: merged.into_answer(),
                    cause: failure.error,
                };
                return Err(Failure::new(
                    ProxyError::BatchStopped(Box::new(stop)),
                    served,
                ));
            }
        }
    }
    let mut resp = axum::Json(merged.into_answer()).into_response();
    resp.headers_mut()
        .insert(BATCHES_HEADER, HeaderValue::from(batches.len()));
    Ok(Reply::new(resp, served))
}

/// A batch's answer as a value for the merged answer, which is the proxy's own body:
/// secrets never go in it.
async fn read_answer(reply: Reply, state: &State) -> Value {
    let deadline = Instant::now() + state.read_timeout;
    let (body, cut) = read_capped(reply.response.into_body(), READ_CAP, deadline).await;
    let secrets = &state.secrets;
    let body = if cut {
        secrets.scrub_cut(&body)
    } else {
        secrets.scrub_bytes(&body)
    };
    let mut answer = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    secrets.scrub_json(&mut answer);
    answer
}

/// A request like the one `parts` describe (for the same account), with another body.
fn like(parts: &Parts, body: Bytes) -> Request<Bytes> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    if let Some(call) = parts.extensions.get::<crate::accounts::Call>() {
        req.extensions_mut().insert(call.clone());
    }
    req
}

pin_project_lite::pin_project! {
    #[project = Projected]
    pub enum LeadImportFuture<F> {
        Sent {
            #[pin]
            call: F,
            warnings: Option<HeaderValue>,
        },
        Batching {
            import: Batching,
            warnings: Option<HeaderValue>,
        },
        // Boxed: rare, and inline it would add its size to every request's future.
        Refused { failure: Option<Box<Failure>> },
    }
}

impl<F> Future for LeadImportFuture<F>
where
    F: Future<Output = Result<Reply, Failure>>,
{
    type Output = Result<Reply, Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (answered, warnings) = match self.project() {
            Projected::Sent { call, warnings } => (ready!(call.poll(cx)), warnings),
            Projected::Batching { import, warnings } => {
                (ready!(import.as_mut().poll(cx)), warnings)
            }
            Projected::Refused { failure } => {
                return Poll::Ready(Err(*failure.take().expect("polled after completion")));
            }
        };
        Poll::Ready(with_warnings(answered, warnings.take()))
    }
}

/// The warnings go on the import's answer, whatever it is.
// Passed through as it came (the stack's own `Result<Reply, Failure>`).
#[allow(clippy::result_large_err)]
fn with_warnings(
    mut answered: Result<Reply, Failure>,
    warnings: Option<HeaderValue>,
) -> Result<Reply, Failure> {
    if let Some(w) = warnings {
        let headers: &mut HeaderMap = match &mut answered {
            Ok(reply) => reply.response.headers_mut(),
            Err(failure) => failure.headers_mut(),
        };
        headers.insert(LEAD_WARNINGS_HEADER, w);
    }
    answered
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::{Method, Response, StatusCode};
    use serde_json::json;
    use std::sync::Mutex;

    /// Answers every import with how many leads it carried, and records the bodies.
    #[derive(Clone, Default)]
    struct Upstream {
        seen: Arc<Mutex<Vec<usize>>>,
        fail_batch: Option<usize>,
    }

    impl Service<Request<Bytes>> for Upstream {
        type Response = Reply;
        type Error = Failure;
        type Future = std::future::Ready<Result<Reply, Failure>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<Bytes>) -> Self::Future {
            let v: Value = serde_json::from_slice(req.body()).unwrap();
            let count = v["lead_list"].as_array().unwrap().len();
            let mut seen = self.seen.lock().unwrap();
            seen.push(count);
            let served = Served {
                attempts: 1,
                upstream: true,
                ..Served::default()
            };
            if self.fail_batch == Some(seen.len()) {
                let failed = crate::error::Failed {
                    status: StatusCode::BAD_GATEWAY,
                    headers: HeaderMap::new(),
                    body: Bytes::from_static(b"down"),
                    cut: false,
                };
                let error = ProxyError::Upstream(Box::new(failed));
                return std::future::ready(Err(Failure::new(error, served)));
            }
            let body = json!({"ok": true, "upload_count": count}).to_string();
            let resp = Response::new(Body::from(body));
            std::future::ready(Ok(Reply::new(resp, served)))
        }
    }

    fn import(leads: usize, first_name: bool) -> Request<Bytes> {
        let list: Vec<Value> = (0..leads)
            .map(|i| {
                let mut lead = json!({"email": format!("p{i}@example.com")});
                if first_name {
                    lead["first_name"] = json!("P");
                }
                lead
            })
            .collect();
        let body = json!({"lead_list": list}).to_string();
        Request::builder()
            .method(Method::POST)
            .uri("/api/v1/campaigns/7/leads")
            .body(Bytes::from(body))
            .unwrap()
    }

    fn layer(auto_batch: bool) -> LeadImportLayer {
        let leads = LeadsSettings {
            max_per_request: 3,
            auto_batch,
            warn_missing: vec!["first_name".into()],
            ..LeadsSettings::default()
        };
        LeadImportLayer::new(&leads, &UpstreamSettings::default(), &Secrets::default())
    }

    #[tokio::test]
    async fn other_requests_pass_untouched() {
        let upstream = Upstream::default();
        let req = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/campaigns/create")
            .body(Bytes::from_static(
                b"{\"lead_list\":[{\"email\":\"p1@example.com\"}]}",
            ))
            .unwrap();
        let reply = layer(false)
            .layer(upstream.clone())
            .oneshot(req)
            .await
            .unwrap();
        assert!(reply.response.headers().get(LEAD_WARNINGS_HEADER).is_none());
        assert_eq!(*upstream.seen.lock().unwrap(), vec![1]);
    }

    #[tokio::test]
    async fn a_bad_import_is_refused_before_anything_is_sent() {
        let upstream = Upstream::default();
        let err = layer(false)
            .layer(upstream.clone())
            .oneshot(import(4, true))
            .await
            .unwrap_err();
        match err.error {
            ProxyError::InvalidLeads(r) => assert_eq!(r.constraint, "max_items"),
            other => panic!("{other:?}"),
        }
        assert!(upstream.seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_import_goes_out_with_its_warnings() {
        let reply = layer(false)
            .layer(Upstream::default())
            .oneshot(import(2, false))
            .await
            .unwrap();
        assert_eq!(
            reply.response.headers()[LEAD_WARNINGS_HEADER],
            "2 leads without first_name"
        );
    }

    #[tokio::test]
    async fn a_big_import_goes_out_in_batches_and_comes_back_as_one_answer() {
        let upstream = Upstream::default();
        let reply = layer(true)
            .layer(upstream.clone())
            .oneshot(import(7, true))
            .await
            .unwrap();
        assert_eq!(*upstream.seen.lock().unwrap(), vec![3, 3, 1]);
        assert_eq!(reply.response.headers()[BATCHES_HEADER], "3");
        assert_eq!(reply.served.attempts, 3);
        let body = axum::body::to_bytes(reply.response.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["upload_count"], 7);
        assert_eq!(v["ok"], true);
        assert_eq!(v["batches"].as_array().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_failing_batch_stops_the_import_and_says_what_went_through() {
        let upstream = Upstream {
            fail_batch: Some(2),
            ..Upstream::default()
        };
        let err = layer(true)
            .layer(upstream.clone())
            .oneshot(import(7, false))
            .await
            .unwrap_err();
        assert_eq!(
            *upstream.seen.lock().unwrap(),
            vec![3, 3],
            "stopped at the failure"
        );
        assert_eq!(err.served.attempts, 2);
        assert_eq!(
            err.headers.as_ref().unwrap()[LEAD_WARNINGS_HEADER],
            "7 leads without first_name"
        );
        match err.error {
            ProxyError::BatchStopped(stop) => {
                assert_eq!(stop.batch, 2);
                assert_eq!(stop.imported.as_deref(), Some("lead_list[0..3]"));
                assert_eq!(stop.not_imported, "lead_list[3..7]");
                assert_eq!(stop.completed["upload_count"], 3);
            }
            other => panic!("{other:?}"),
        }
    }
}
