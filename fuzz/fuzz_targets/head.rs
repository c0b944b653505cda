//! Request and response head parsing: never panics, and a complete head's
//! length never exceeds the input.
#![no_main]

use std::mem::MaybeUninit;

use libfuzzer_sys::fuzz_target;
use ringway::h1::{parse_request, parse_response, Limits, Parsed};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_header_bytes: 32 * 1024,
        max_headers: 100,
    };
    let mut h = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 100];
    if let Ok(Parsed::Complete(r)) = parse_request(data, &mut h, &limits) {
        assert!(r.head_len <= data.len());
    }
    let mut h = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 100];
    if let Ok(Parsed::Complete(r)) =
        parse_response(data, &mut h, &limits, data.first() == Some(&b'H'))
    {
        assert!(r.head_len <= data.len());
    }
});
