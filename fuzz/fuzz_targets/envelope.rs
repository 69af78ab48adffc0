//! A job envelope as it arrives on `down/job`: parse, verify against the control-plane
//! key, read the payload unverified, and do what the agent does with what it finds.
#![no_main]

use drover_protocol::job::JobEnvelope;
use drover_protocol::signed::Signed;
use drover_protocol_fuzz::{KEYS, check_envelope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(signed) = serde_json::from_slice::<Signed<JobEnvelope>>(data) else {
        return;
    };
    let _ = format!("{signed:?}");
    match signed.verify(&[KEYS.control]) {
        Ok(env) => check_envelope(&env),
        Err(e) => drop(e.to_string()),
    }
    if let Ok(env) = signed.unverified() {
        check_envelope(&env);
    }
    let again = serde_json::to_vec(&signed).expect("a parsed envelope serialises");
    let back: Signed<JobEnvelope> =
        serde_json::from_slice(&again).expect("a re-encoded envelope parses");
    assert_eq!(back.payload, signed.payload);
    assert_eq!(back.signatures, signed.signatures);
});
