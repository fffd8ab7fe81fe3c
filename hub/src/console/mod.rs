//! The web console (DESIGN section 10): static HTML, one ES module and a style sheet,
//! embedded in the binary and served at `/console/` on the HTTP and HTTPS listeners
//! with a strict Content-Security-Policy, ETags (304 on `If-None-Match`) and the right
//! MIME types. No build step, no CDN: the page talks to the REST API and the telemetry
//! WebSocket with the credential the user pastes in, and those routes keep their
//! authorisation; nothing here reads hub state.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

/// Where the console is served.
pub const PREFIX: &str = "/console";

/// The console's policy: its own files only (scripts, styles, connections back to the
/// hub, including WebSockets); no inline script or style, no frames, no plugins.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// An embedded file.
#[derive(Debug)]
struct Asset {
    name: &'static str,
    mime: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        mime: "text/html; charset=utf-8",
        body: include_bytes!("static/index.html"),
    },
    Asset {
        name: "app.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("static/app.js"),
    },
    Asset {
        name: "sas.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("static/sas.js"),
    },
    Asset {
        name: "style.css",
        mime: "text/css; charset=utf-8",
        body: include_bytes!("static/style.css"),
    },
];

/// Each asset's ETag (a quoted SHA-256 prefix of its bytes), computed once.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|asset| {
                let digest = Sha256::digest(asset.body);
                let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
                format!("\"{hex}\"")
            })
            .collect()
    })
}

/// The console's routes, to merge into a listener's router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(PREFIX, get(|| async { Redirect::permanent("/console/") }))
        .route("/console/", get(|headers: HeaderMap| async move { serve("index.html", &headers) }))
        .route(
            "/console/{file}",
            get(|Path(file): Path<String>, headers: HeaderMap| async move { serve(&file, &headers) }),
        )
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|asset| asset.name == name) else {
        return crate::http::error::azure_error(
            StatusCode::NOT_FOUND,
            404000,
            "no such console file",
        );
    };
    let asset = &ASSETS[index];
    let etag = &etags()[index];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.mime)], asset.body).into_response()
    };
    let out = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(etag) {
        out.insert(header::ETAG, value);
    }
    // Revalidated on every load (cheap with the ETag), so an upgraded hub serves its
    // own console at once.
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    out.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_in_the_console_is_local_and_embedded() {
        for asset in ASSETS {
            let text = std::str::from_utf8(asset.body).expect("UTF-8 asset");
            // The SVG namespace is a name, not an address anything fetches.
            let text = &text.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "{} names a remote address",
                asset.name
            );
            for quote in ["src=\"", "href=\"", "from './", "import('./"] {
                for (at, _) in text.match_indices(quote) {
                    let rest = &text[at + quote.len()..];
                    let target: String = rest
                        .chars()
                        .take_while(|c| !matches!(c, '"' | '\'' | '#' | '?'))
                        .collect();
                    let file = target
                        .trim_start_matches("./")
                        .trim_start_matches("/console/");
                    if file.is_empty() {
                        continue;
                    }
                    assert!(
                        ASSETS.iter().any(|a| a.name == file),
                        "{} refers to {target}, which is not embedded",
                        asset.name
                    );
                }
            }
        }
    }

    #[test]
    fn a_matching_etag_is_not_modified_and_unknown_files_are_404() {
        let first = serve("app.js", &HeaderMap::new());
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(
            first.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_NONE_MATCH, first.headers()[header::ETAG].clone());
        assert_eq!(serve("app.js", &headers).status(), StatusCode::NOT_MODIFIED);
        assert_eq!(
            serve("../Cargo.toml", &HeaderMap::new()).status(),
            StatusCode::NOT_FOUND
        );
        assert!(
            first.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("script-src 'self'")
        );
    }
}
