//! What every request passes before a handler sees it, and what every response carries:
//! the bound on requests in progress (503 at once past it, never a queue), the methods (GET and
//! HEAD: the service only reads), the `Host` check against DNS rebinding, the refusal of other
//! sites' pages (`Sec-Fetch-Site`: an `<img>` or `<video>` on any site could otherwise load
//! thumbnails and videos from a loopback service, or make it embed and decode), the access token
//! of a service bound beyond loopback, the bound on the URI, and the security headers (a content
//! security policy that allows nothing but this origin's own files, `nosniff`, no referrer, no
//! framing, resources for this origin only; no CORS header, so other origins' pages cannot read
//! the answers). A refusal closes its connection.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::App;
use super::api::ApiError;

/// The longest URI accepted (path and query): an id of `MAX_ID_BYTES` all escaped fits.
pub const MAX_URI_BYTES: usize = 16 * 1024;
/// The cookie a browser keeps the access token in, once it has opened the page's `?token=` link.
pub const TOKEN_COOKIE: &str = "vtr_index_token";

/// The answer to a connection past [`super::MAX_CONNECTIONS`], written before it is closed,
/// with the headers every answer carries.
pub const BUSY_RESPONSE: &str = concat!(
    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n",
    "content-security-policy: default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; ",
    "media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n",
    "x-content-type-options: nosniff\r\nreferrer-policy: no-referrer\r\nx-frame-options: DENY\r\n",
    "cross-origin-resource-policy: same-origin\r\n",
    "retry-after: 1\r\nconnection: close\r\ncontent-length: 70\r\n\r\n",
    "{\"error\":{\"code\":\"busy\",\"message\":\"too many connections; try again\"}}\n"
);

const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Who may use the service.
#[derive(Debug, Clone)]
pub struct Access {
    /// Required with every request when the service is bound beyond loopback.
    pub token: Option<String>,
    /// Host names accepted besides loopback's (`--allow-host`).
    pub allowed_hosts: Vec<String>,
}

impl Access {
    /// Whether a request's `Host` value names this service: a loopback name on any port (an
    /// `ssh -L` tunnel sends `localhost:9000`), an IP address (which no DNS answer can rebind),
    /// or a name given with `--allow-host`. Any other name may be one an attacker's DNS has
    /// pointed at this machine, to serve its page from the service's origin.
    pub fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        if name.is_empty() {
            return false;
        }
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        if name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok() {
            return true;
        }
        self.allowed_hosts.iter().any(|allowed| allowed.trim_end_matches('.').eq_ignore_ascii_case(name))
    }

    /// Whether the request carries the token, if one is required: as `Authorization: Bearer`
    /// (API clients) or as the cookie the page's link sets (browsers, whose images and videos
    /// cannot send headers).
    fn authorised(&self, request: &Request) -> bool {
        let Some(token) = &self.token else { return true };
        let bearer = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let cookies = request.headers().get_all(header::COOKIE).into_iter().filter_map(|v| v.to_str().ok());
        let from_cookie = cookies
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().strip_prefix(TOKEN_COOKIE)?.strip_prefix('='))
            .any(|given| same_secret(given, token));
        from_cookie || bearer.is_some_and(|given| same_secret(given, token))
    }
}

/// The host part of a `Host` value: `name`, `name:port`, `[v6]:port`.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(v6, _)| &host[..v6.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// Compares a secret in time that does not depend on where the first difference is.
fn same_secret(given: &str, secret: &str) -> bool {
    let (a, b) = (given.as_bytes(), secret.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new access token: 128 bits from the kernel's random source, as hex.
pub fn new_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The middleware: every check above, then the handler, then the headers.
pub async fn guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let mut response = match check(&app, &request) {
        Err(refusal) => {
            // A client refused once is not kept connected to try again at leisure.
            let mut response = refusal.into_response();
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
        Ok(Some(redirect)) => redirect,
        Ok(None) => match Arc::clone(&app.requests).try_acquire_owned() {
            Ok(permit) => {
                let response = next.run(request).await;
                drop(permit);
                response
            }
            Err(_) => ApiError::busy("too many requests in progress; try again").into_response(),
        },
    };
    let headers = response.headers_mut();
    headers.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// Refuses what must not reach a handler; answers the page's token link with the cookie.
fn check(app: &App, request: &Request) -> Result<Option<Response>, ApiError> {
    if request.uri().to_string().len() > MAX_URI_BYTES {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("a URI over {MAX_URI_BYTES} bytes"),
        ));
    }
    let host = request.headers().get(header::HOST).and_then(|v| v.to_str().ok());
    match host {
        None => return Err(ApiError::bad_request("no Host header")),
        Some(host) if !app.access.host_allowed(host) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "host_not_allowed",
                "this service does not answer to that host name; start it with --allow-host NAME to allow it",
            ));
        }
        Some(_) => {}
    }
    // Browsers say where a request comes from; a page of another site may only link here.
    let site = request.headers().get("sec-fetch-site").and_then(|v| v.to_str().ok()).unwrap_or("none");
    let navigation = request.headers().get("sec-fetch-mode").is_some_and(|v| v == "navigate");
    if matches!(site, "cross-site" | "same-site") && !(navigation && request.uri().path() == "/") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_site",
            "a page of another site may link to this service, not use it",
        ));
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "the service only reads: GET and HEAD",
        ));
    }
    if let Some(token) = &app.access.token
        && request.uri().path() == "/"
        && let Some(given) = request.uri().query().and_then(|q| q.strip_prefix("token="))
        && same_secret(given, token)
    {
        // The printed link: keep the token in a cookie only this origin's requests carry, and
        // take it out of the address bar.
        // Lax: a link to the service from mail or a chat still carries it; the service only
        // reads, so nothing a link asks for changes anything.
        let cookie = format!("{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Lax; Path=/");
        let mut response = StatusCode::SEE_OTHER.into_response();
        response.headers_mut().insert(header::LOCATION, HeaderValue::from_static("./"));
        response.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("hex"));
        return Ok(Some(response));
    }
    if !app.access.authorised(request) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "an access token is required: open the link `serve` printed, or send Authorization: Bearer TOKEN",
        ));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(allowed: &[&str]) -> Access {
        Access { token: None, allowed_hosts: allowed.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn loopback_names_on_any_port_pass_and_other_names_only_when_allowed() {
        let a = access(&["search.lab.example"]);
        for ok in
            ["localhost", "localhost:9000", "LOCALHOST:1", "127.0.0.1:8080", "127.1.2.3", "[::1]:80", "a.localhost"]
        {
            assert!(a.host_allowed(ok), "{ok}");
        }
        assert!(a.host_allowed("search.lab.example:8080"));
        assert!(a.host_allowed("10.0.0.1:8080"), "an address cannot be rebound");
        for refused in ["evil.example", "evil.example:8080", "localhost.evil.example", "", ":80", "."] {
            assert!(!a.host_allowed(refused), "{refused}");
        }
    }

    #[test]
    fn the_busy_answer_declares_its_length() {
        let (head, body) = BUSY_RESPONSE.split_once("\r\n\r\n").unwrap();
        assert!(head.split("\r\n").any(|line| line == format!("content-length: {}", body.len())), "{head}");
        assert!(head.contains("content-security-policy: default-src 'none';") && head.contains("nosniff"));
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
    }
}
