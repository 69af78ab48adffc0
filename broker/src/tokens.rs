//! Random tokens the server mints: passwords, activation codes, the operator token.

use ring::rand::{SecureRandom as _, SystemRandom};

/// A new random password.
pub fn new_password() -> String {
    random_token(32)
}

/// `bytes` random bytes as lowercase hex: safe in URLs, files and shells, and never
/// starting with `-`, so it can follow a flag on a command line (`--code TOKEN`) without
/// being taken for another flag, as base64url can be one time in 64.
pub fn random_token(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut b)
        .expect("system random source failed");
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_hex_and_can_follow_a_flag() {
        for _ in 0..1000 {
            let t = random_token(24);
            assert_eq!(t.len(), 48);
            assert!(
                t.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                "{t}"
            );
        }
        assert_ne!(random_token(24), random_token(24));
    }
}
