//! A key set as an agent receives it: parse, verify as a first set against the enrolled
//! roots and as a successor of a fixed current set, and validate the payload unverified.
#![no_main]

use drover_protocol::keyset::KeySet;
use drover_protocol::signed::Signed;
use drover_protocol_fuzz::KEYS;
use libfuzzer_sys::fuzz_target;

fn check(ks: &KeySet) {
    let _ = ks.validate().map_err(|e| e.to_string());
    let json = serde_json::to_string(ks).expect("a parsed key set serialises");
    let back: KeySet = serde_json::from_str(&json).expect("a re-encoded key set parses");
    assert_eq!(&back, ks);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = serde_json::from_slice::<Signed<KeySet>>(data) {
        let _ = format!("{signed:?}");
        let _ = signed.verify(&KEYS.roots[..1]).map_err(|e| e.to_string());
        for threshold in [0, 1, 2, 3] {
            if let Ok(ks) = KeySet::verify_initial(&signed, &KEYS.roots, threshold) {
                ks.validate()
                    .expect("verify_initial returns only valid key sets");
            }
        }
        let current = KeySet {
            version: 1,
            roots: KEYS.roots.to_vec(),
            root_threshold: 2,
            publishers: KEYS.publishers.to_vec(),
            publisher_threshold: 1,
            control_plane: vec![KEYS.control],
            issued_at: 0,
        };
        if let Ok(next) = current.verify_successor(&signed) {
            assert!(next.version > current.version);
            next.validate()
                .expect("verify_successor returns only valid key sets");
        }
        if let Ok(ks) = signed.unverified() {
            check(&ks);
        }
    }
    if let Ok(ks) = serde_json::from_slice::<KeySet>(data) {
        check(&ks);
    }
});
