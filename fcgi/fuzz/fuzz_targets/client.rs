//! Arbitrary bytes into the client side's response decoding and CGI header parsing.
#![no_main]

use bytes::BytesMut;
use fcgi::client::{self, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut response = Response::default();
    while let Ok(Some(event)) = client::decode_event(&mut buf) {
        if response.push(event) {
            break;
        }
    }
    let _ = (response.status(), response.headers(), response.body().len());
});
