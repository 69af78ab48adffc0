//! Topic names as the broker and server see them: whatever parses must be exactly the
//! topic `topics::up`/`topics::down` would build, for a valid agent id.
#![no_main]

use drover_protocol::topics;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(topic) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((id, kind)) = topics::parse_up(topic) {
        assert!(topics::is_valid_agent_id(id), "{topic:?}");
        assert_eq!(topics::up(id, kind), topic);
        assert!(topic.starts_with(&topics::agent_prefix(id)));
    }
    if let Some((id, kind)) = topics::parse_down(topic) {
        assert!(topics::is_valid_agent_id(id), "{topic:?}");
        assert_eq!(topics::down(id, kind), topic);
        assert!(topic.starts_with(&topics::agent_prefix(id)));
    }
    if topics::is_valid_agent_id(topic) {
        assert!(!topic.contains(['/', '+', '#']), "{topic:?}");
    }
    let _ = topics::Up::parse(topic);
    let _ = topics::Down::parse(topic);
});
