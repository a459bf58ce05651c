//! Bearer-key authentication and run visibility.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::error::ApiError;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Label of the key (never the key): runs are owned by it. `None` without auth.
    pub owner: Option<String>,
    /// May see and act on every run.
    pub admin: bool,
}

impl Principal {
    /// Whether this caller may see a resource owned by `owner`.
    pub fn can_see(&self, owner: Option<&str>) -> bool {
        self.admin || self.owner.as_deref() == owner
    }
}

/// The configured keys.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    keys: Vec<(Vec<u8>, bool)>,
}

impl Keys {
    /// Ordinary and admin keys.
    pub fn new(api_keys: &[String], admin_keys: &[String]) -> Self {
        let keys = api_keys
            .iter()
            .map(|k| (k.as_bytes().to_vec(), false))
            .chain(admin_keys.iter().map(|k| (k.as_bytes().to_vec(), true)))
            .collect();
        Self { keys }
    }

    /// Whether auth is on.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks a presented key against every configured key in constant time per key (no early
    /// exit on the first match either).
    fn check(&self, presented: &[u8]) -> Option<Principal> {
        let mut found: Option<Principal> = None;
        for (key, admin) in &self.keys {
            if ct_eq(key, presented) && found.is_none() {
                found = Some(Principal {
                    owner: Some(label(key)),
                    admin: *admin,
                });
            }
        }
        found
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// A stable, non-reversible label of a key: the owner stored with its runs and sessions.
///
/// It must never change for a given key (stored runs would become invisible to their own key),
/// so it is built with [`crate::hash::stable_hash`] (SipHash-1-3, fixed key, written out in
/// this crate), not with `std`'s `DefaultHasher`, whose algorithm may change between Rust
/// releases. It equals the label earlier builds derived with `DefaultHasher`.
fn label(key: &[u8]) -> String {
    format!("key_{:016x}", crate::hash::stable_hash(key))
}

/// The credentials of an `Authorization: Bearer <key>` header. The scheme is matched
/// case-insensitively (RFC 9110 §11.1); spaces around the key are ignored.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|k| !k.is_empty())
}

/// Without keys the server binds loopback only, for this machine's clients; a browser on this
/// machine may still be made to call it by a page of another site. Such a request is refused
/// (403): one whose `Host` is a name of another site (DNS rebinding: a name the page's site
/// controls, pointed at 127.0.0.1), or whose `Origin` is not a loopback one (a cross-site
/// form or fetch). A `Host` that is a loopback address, `localhost` (or `*.localhost`), or a
/// name without a dot (no site can point it at this machine) is this machine's.
fn from_this_machine(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let refuse = |what: &str, value: &str| {
        Err(ApiError::Forbidden(format!(
            "{what}: {:?} is not this machine: a server without API keys answers local clients only (set server.api_keys to serve others)",
            crate::error::prefix(value, 100)
        )))
    };
    if let Some(host) = headers.get(header::HOST) {
        let host = host.to_str().unwrap_or("?");
        if !local_host(host) {
            return refuse("Host", host);
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("?");
        let host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        // A local origin is an address or `localhost`: a dotless name is not enough here, as
        // the page it names is then not this server's.
        if !host.is_some_and(|h| local_host(h) && (h.contains(['.', '[']) || is_localhost(h))) {
            return refuse("Origin", origin);
        }
    }
    Ok(())
}

/// `localhost` or a name under it, port aside.
fn is_localhost(host: &str) -> bool {
    let name = strip_port(host).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// `host` without its `:port`.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(ip, _)| ip);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Whether a `Host` value (port aside) names this machine: a loopback address, `localhost`
/// or a name under it, or a name without a dot.
fn local_host(host: &str) -> bool {
    let name = strip_port(host);
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => is_localhost(name) || (!name.is_empty() && !name.contains('.')),
    }
}

/// Middleware: resolves the caller, answers 401 for a missing or unknown key.
pub(crate) async fn authenticate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let principal = if state.keys.enabled() {
        let mut given = req.headers().get_all(header::AUTHORIZATION).iter();
        let first = given.next();
        if given.next().is_some() {
            // Which credentials count is not for the server to guess (a proxy may add some).
            return ApiError::BadRequest("Authorization: given more than once".into())
                .into_response();
        }
        let presented = first.and_then(|v| v.to_str().ok()).and_then(bearer);
        match presented.and_then(|p| state.keys.check(p.as_bytes())) {
            Some(p) => p,
            None => return ApiError::Unauthorized.into_response(),
        }
    } else {
        if let Err(e) = from_this_machine(req.headers()) {
            return e.into_response();
        }
        Principal {
            owner: None,
            admin: true,
        }
    };
    req.extensions_mut().insert(principal);
    next.run(req).await
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or(ApiError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_origins_of_this_machine() {
        for host in [
            "127.0.0.1:8080",
            "127.9.9.9",
            "[::1]:8080",
            "localhost",
            "LocalHost:80",
            "app.localhost:3000",
            "x",
            "devbox:8080",
        ] {
            assert!(local_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "10.0.0.1:8080",
            "[2001:db8::1]:80",
            "localhost.evil.example",
            "",
        ] {
            assert!(!local_host(host), "{host}");
        }
        let check = |origin: &str| {
            let mut h = axum::http::HeaderMap::new();
            h.insert(header::ORIGIN, origin.parse().unwrap());
            from_this_machine(&h).is_ok()
        };
        assert!(check("http://127.0.0.1:8080"));
        assert!(check("http://localhost:3000"));
        assert!(check("https://[::1]"));
        assert!(!check("http://evil.example"));
        assert!(!check("null"));
        assert!(
            !check("http://devbox:8080"),
            "a dotless name is no local origin"
        );
    }

    #[test]
    fn keys() {
        let keys = Keys::new(&["a".repeat(16)], &["b".repeat(16)]);
        assert_eq!(
            keys.check(b"aaaaaaaaaaaaaaaa").map(|p| p.admin),
            Some(false)
        );
        assert_eq!(keys.check(b"bbbbbbbbbbbbbbbb").map(|p| p.admin), Some(true));
        assert_eq!(keys.check(b"aaaaaaaaaaaaaaa"), None);
        assert_eq!(keys.check(b""), None);
        assert_ne!(label(b"x"), label(b"y"));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(!ct_eq(b"", b"\0"));
        // Labels are fixed forever (stored with runs); see `hash.rs`.
        assert_eq!(label(b"k1-0123456789abcdef"), "key_4206ee9b65e0f36d");
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER   abc  "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer   "), None);
        assert_eq!(bearer("Bearerabc"), None);
    }
}
