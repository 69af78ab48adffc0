//! A chunk frame as it arrives on `down/chunk`, and a fetch request as the server reads
//! it from `up/fetch`.
#![no_main]

use drover_protocol::chunk::{self, FetchRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match chunk::decode(data) {
        Ok((header, body)) => {
            assert!(header.error.is_some() || header.index < header.count);
            let _ = chunk::chunk_count(header.total_len, header.chunk_size);
            let frame = chunk::encode(&header, body);
            let (h2, b2) = chunk::decode(&frame).expect("a re-encoded frame decodes");
            assert_eq!(h2, header);
            assert_eq!(b2, body);
        }
        Err(e) => drop(e.to_string()),
    }
    if let Ok(req) = serde_json::from_slice::<FetchRequest>(data) {
        let _ = chunk::chunk_count(u64::MAX, req.chunk_size);
        let json = serde_json::to_vec(&req).expect("a parsed request serialises");
        let back: FetchRequest = serde_json::from_slice(&json).expect("re-encoded request parses");
        assert_eq!(back, req);
    }
});
