//! A plugin manifest: signed (as inside an envelope) and bare (the payload itself, which
//! the fuzzer reaches far more easily than through a JSON string inside JSON).
#![no_main]

use drover_protocol::manifest::Manifest;
use drover_protocol::signed::Signed;
use drover_protocol_fuzz::{KEYS, check_manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = serde_json::from_slice::<Signed<Manifest>>(data) {
        let _ = format!("{signed:?}");
        if let Err(e) = signed.verify(&KEYS.publishers[..1]) {
            drop(e.to_string());
        }
        if let Ok(m) = signed.verify_threshold(&KEYS.publishers, 2) {
            check_manifest(&m);
        }
        if let Ok(m) = signed.unverified() {
            check_manifest(&m);
        }
    }
    if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
        check_manifest(&m);
    }
});
