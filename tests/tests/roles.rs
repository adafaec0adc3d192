//! The Authorizer and Filter roles of FastCGI, spoken by the project's client (nginx and Apache
//! only ever ask for the Responder role; lighttpd and others use the rest).

use e2e::{fcgi_request_as, App, TempDir};
use fcgi::{Params, Role};

#[test]
fn authorizer_allows_with_variables_and_denies() {
    let dir = TempDir::new("authorizer");
    let app = App::start(&dir, &["--workers", "1"]);
    let allowed = Params::from_pairs([
        ("REQUEST_URI", "/private"),
        ("HTTP_AUTHORIZATION", "Bearer letmein"),
    ]);
    let r = fcgi_request_as(&app.unix(), Role::Authorizer, &allowed, b"", None).expect("response");
    assert_eq!(r.status(), 200);
    assert_eq!(r.header("Variable-AUTH-USER").as_deref(), Some("example"));

    let denied = Params::from_pairs([
        ("REQUEST_URI", "/private"),
        ("HTTP_AUTHORIZATION", "Bearer guess"),
    ]);
    let r = fcgi_request_as(&app.unix(), Role::Authorizer, &denied, b"", None).expect("response");
    assert_eq!(r.status(), 403);
}

#[test]
fn filter_transforms_the_data_stream() {
    let dir = TempDir::new("filter");
    let app = App::start(&dir, &["--workers", "1"]);
    let params = Params::from_pairs([("REQUEST_URI", "/file.txt"), ("FCGI_DATA_LENGTH", "15")]);
    let r = fcgi_request_as(
        &app.unix(),
        Role::Filter,
        &params,
        b"",
        Some(b"filter this, ok"),
    )
    .expect("response");
    assert_eq!(r.status(), 200);
    assert_eq!(r.body(), b"FILTER THIS, OK");
}
