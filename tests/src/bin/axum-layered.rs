//! An axum `Router` wrapped in a tower-http layer, served by the pool: a tower middleware
//! works unchanged (`tests/axum.rs`).

use axum::http::{HeaderName, HeaderValue};
use axum::routing::get;
use axum::Router;
use tower_http::set_header::SetResponseHeaderLayer;

fn main() {
    let app = Router::new()
        .route("/hello", get(|| async { "Hello from a layer\n" }))
        .layer(SetResponseHeaderLayer::overriding(
            HeaderName::from_static("x-layer"),
            HeaderValue::from_static("tower-http"),
        ));
    supervisor::serve(move || Ok::<_, std::convert::Infallible>(app))
}
