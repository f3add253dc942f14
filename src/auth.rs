//! Bearer-token access control for `/api/v1/*` when `server.access_tokens` is set.

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, header};
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::error::ApiError;

/// Lets a request through only with `Authorization: Bearer <one of the tokens>` (when
/// `server.access_tokens` is set); the header is the proxy's, so it is removed before
/// forwarding. Returns the 401 answer when the request is refused.
pub fn refusal(state: &AppState, headers: &mut HeaderMap) -> Option<Response> {
    let tokens = &state.settings().server.access_tokens;
    if tokens.is_empty() {
        return None;
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    // Compare against every token, without stopping at the first match.
    let allowed = presented.is_some_and(|p| {
        tokens.iter().fold(false, |found, t| {
            found | bool::from(p.as_bytes().ct_eq(t.expose_secret().as_bytes()))
        })
    });
    if !allowed {
        let mut resp = ApiError::new(
            http::StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "missing or wrong access token: send Authorization: Bearer <token> (server.access_tokens)",
        )
        .detail("request_id", crate::proxy::request_id(headers))
        .into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"smartlead-proxy\""),
        );
        return Some(resp);
    }
    headers.remove(header::AUTHORIZATION);
    None
}

/// The token from `Bearer <token>` (scheme case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_bearer() {
        assert_eq!(super::bearer("Bearer abc"), Some("abc"));
        assert_eq!(super::bearer("bearer  abc "), Some("abc"));
        assert_eq!(super::bearer("Basic abc"), None);
        assert_eq!(super::bearer("Bearer"), None);
        assert_eq!(super::bearer("Bearer "), None);
    }
}
