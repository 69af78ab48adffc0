//! What agents send the server: results (`up/result`), hello (`up/hello`) and presence
//! (`up/status`); and the server's signed result acknowledgement (`down/ack`).
#![no_main]

use drover_protocol::agent::{Hello, Presence};
use drover_protocol::job::{JobResult, ResultAck};
use drover_protocol::signed::Signed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<JobResult>(data) {
        let _ = r.status.as_str();
        if let Some(f) = &r.failure {
            let _ = f.kind.is_refusal();
        }
        let json = serde_json::to_vec(&r).expect("a parsed result serialises");
        serde_json::from_slice::<JobResult>(&json).expect("a re-encoded result parses");
    }
    if let Ok(h) = serde_json::from_slice::<Hello>(data) {
        let json = serde_json::to_vec(&h).expect("a parsed hello serialises");
        let back: Hello = serde_json::from_slice(&json).expect("a re-encoded hello parses");
        assert_eq!(back, h);
    }
    if let Ok(p) = serde_json::from_slice::<Presence>(data) {
        let json = serde_json::to_vec(&p).expect("presence serialises");
        assert_eq!(serde_json::from_slice::<Presence>(&json).ok(), Some(p));
    }
    if let Ok(s) = serde_json::from_slice::<Signed<ResultAck>>(data)
        && let Ok(a) = s.unverified()
    {
        let json = serde_json::to_vec(&a).expect("an ack serialises");
        assert_eq!(serde_json::from_slice::<ResultAck>(&json).ok(), Some(a));
    }
});
