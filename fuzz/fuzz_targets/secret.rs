//! Opening a sealed secret built from fuzz input. Nothing the fuzzer makes opens with the
//! agent's key (that would take a Poly1305 forgery), so every box must be refused — with
//! an error, never a panic.
//!
//! Input: tag byte 0 then a `SealedBox` as JSON (fields as sent); or tag byte 1 then raw
//! bytes — 32-byte ephemeral key, 12-byte nonce, one length byte and that much AAD, the
//! rest ciphertext — encoded as the wire wants, so every input reaches the key agreement
//! and the AEAD.
#![no_main]

use base64::Engine as _;
use drover_protocol::secret::{self, SealedBox};
use drover_protocol_fuzz::KEYS;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&tag, rest)) = data.split_first() else {
        return;
    };
    let (sealed, aad) = match tag {
        0 => {
            let Ok(b) = serde_json::from_slice::<SealedBox>(rest) else {
                return;
            };
            (b, secret::parameter_aad("job-1", "token"))
        }
        1 => {
            if rest.len() < 45 {
                return;
            }
            let (eph, rest) = rest.split_at(32);
            let (nonce, rest) = rest.split_at(12);
            let (&aad_len, rest) = rest.split_first().expect("length checked");
            let aad_len = (aad_len as usize).min(rest.len());
            let (aad, ciphertext) = rest.split_at(aad_len);
            let b64 = base64::engine::general_purpose::STANDARD;
            let b = SealedBox {
                ephemeral: hex::encode(eph),
                nonce: b64.encode(nonce),
                ciphertext: b64.encode(ciphertext),
            };
            (b, aad.to_vec())
        }
        _ => return,
    };
    match KEYS.agent.open(&sealed, &aad) {
        Ok(plain) => panic!("a fuzzed box opened: {} bytes", plain.len()),
        Err(e) => drop(e.to_string()),
    }
});
