//! The chunked decoder: never panics; consumed bytes and payload ranges stay
//! within the input, and feeding the input in two parts gives the same payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringway::h1::ChunkedDecoder;

fn decode(parts: &[&[u8]]) -> Option<(Vec<u8>, bool)> {
    let mut d = ChunkedDecoder::new(1 << 20);
    let mut payload = Vec::new();
    let mut done = false;
    for part in parts {
        let mut rest: &[u8] = part;
        while !rest.is_empty() && !done {
            let mut got = Vec::new();
            let p = d.decode(rest, &mut |r| got.push(r)).ok()?;
            assert!(p.consumed <= rest.len());
            for r in got {
                assert!(r.end <= rest.len());
                payload.extend_from_slice(&rest[r]);
            }
            done = p.done;
            if p.consumed == 0 {
                break;
            }
            rest = &rest[p.consumed..];
        }
    }
    Some((payload, done))
}

fuzz_target!(|data: &[u8]| {
    let whole = decode(&[data]);
    if data.len() > 1 {
        let mid = data[0] as usize % data.len();
        let split = decode(&[&data[..mid], &data[mid..]]);
        if let (Some(a), Some(b)) = (&whole, &split) {
            if a.1 && b.1 {
                assert_eq!(a.0, b.0);
            }
        }
    }
});
