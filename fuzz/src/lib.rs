//! Shared pieces of the fuzz targets: fixed keys, the checks run on anything that
//! decodes, and the seed inputs (written by `cargo run --example gen-seeds`).
//!
//! The keys are derived from fixed seeds so the checked-in seed corpus carries real,
//! valid signatures: a fuzz target that verifies a seed reaches the "signature good,
//! now parse the payload" path, not only the refusals.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use drover_protocol::agent::{Hello, Presence};
use drover_protocol::chunk::{self, ChunkHeader, FetchRequest};
use drover_protocol::job::{
    Captured, Failure, FailureKind, JobEnvelope, JobResult, Limits, Parameter, ResultAck,
    ResultStatus, Timings,
};
use drover_protocol::keys::{PublicKey, SigningKey};
use drover_protocol::keyset::KeySet;
use drover_protocol::manifest::{self, Capabilities, Manifest, NetAddr, World};
use drover_protocol::secret::{self, AgentSecretKey};
use drover_protocol::signed::Signed;
use drover_protocol::topics;

/// An Ed25519 key from a 32-byte seed, as a PKCS#8 v1 document (RFC 8410).
pub fn signing_key(seed: [u8; 32]) -> SigningKey {
    let mut der = hex::decode("302e020100300506032b657004220420").expect("hex");
    der.extend_from_slice(&seed);
    SigningKey::from_pkcs8(&der).expect("fixed fuzz key")
}

const CONTROL: [u8; 32] = [0x11; 32];
const PUBLISHER_A: [u8; 32] = [0x22; 32];
const PUBLISHER_B: [u8; 32] = [0x23; 32];
const ROOT_A: [u8; 32] = [0x33; 32];
const ROOT_B: [u8; 32] = [0x34; 32];
const AGENT: [u8; 32] = [0x44; 32];
const OTHER_AGENT: [u8; 32] = [0x45; 32];

/// The public keys the targets trust, and the agent's X25519 key.
pub struct Keys {
    /// Signs job envelopes.
    pub control: PublicKey,
    /// Sign plugin manifests.
    pub publishers: [PublicKey; 2],
    /// Sign key sets.
    pub roots: [PublicKey; 2],
    /// The agent secrets are sealed to.
    pub agent: AgentSecretKey,
}

/// Computed once per process: deriving a key is far slower than one fuzz iteration.
pub static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
    control: signing_key(CONTROL).public(),
    publishers: [
        signing_key(PUBLISHER_A).public(),
        signing_key(PUBLISHER_B).public(),
    ],
    roots: [signing_key(ROOT_A).public(), signing_key(ROOT_B).public()],
    agent: AgentSecretKey::from_bytes(AGENT),
});

/// What the agent does with a manifest it has parsed, plus round-trip properties.
pub fn check_manifest(m: &Manifest) {
    let _ = m.validate();
    let _ = m.capabilities.describe();
    let _ = m.capabilities.is_empty();
    let _ = manifest::is_valid_plugin_name(&m.name);
    for p in m.capabilities.exec.iter().chain(&m.capabilities.read_paths) {
        let _ = manifest::is_clean_absolute(p);
    }
    for n in &m.capabilities.parameters {
        let _ = manifest::is_valid_parameter_name(n);
    }
    for a in &m.capabilities.network {
        check_net_addr(a);
    }
    let json = serde_json::to_string(m).expect("a parsed manifest serialises");
    let back: Manifest = serde_json::from_str(&json).expect("a re-encoded manifest parses");
    assert_eq!(&back, m, "manifest changed in a JSON round trip");
}

/// `NetAddr`'s `Display` is its canonical form: it must parse back to the same address.
pub fn check_net_addr(s: &str) {
    if let Ok(a) = s.parse::<NetAddr>() {
        assert_ne!(a.port, 0, "{s:?} parsed with port 0");
        let canon = a.to_string();
        let back = canon
            .parse::<NetAddr>()
            .unwrap_or_else(|e| panic!("{s:?} -> {canon:?} does not parse: {e}"));
        assert_eq!(back, a, "{s:?} -> {canon:?} parses differently");
    }
}

/// What the agent does with an envelope: check the plugin's signature and manifest, and
/// open its secret parameters.
pub fn check_envelope(env: &JobEnvelope) {
    let k = &*KEYS;
    let _ = env.plugin.verify(&k.publishers);
    let _ = env.plugin.verify_threshold(&k.publishers, 2);
    if let Ok(m) = env.plugin.unverified() {
        check_manifest(&m);
    }
    for (name, p) in &env.parameters {
        if let Parameter::Secret { sealed } = p {
            let _ = k
                .agent
                .open(sealed, &secret::parameter_aad(&env.job_id, name));
        }
    }
    let _ = topics::is_valid_agent_id(&env.agent_id);
}

/// The seed inputs: `(target, file name, bytes)`. Tiny, valid examples of each format.
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let control = signing_key(CONTROL);
    let (pub_a, pub_b) = (signing_key(PUBLISHER_A), signing_key(PUBLISHER_B));
    let (root_a, root_b) = (signing_key(ROOT_A), signing_key(ROOT_B));
    let agent = AgentSecretKey::from_bytes(AGENT);
    let other_agent = AgentSecretKey::from_bytes(OTHER_AGENT);
    let mut out = Vec::new();

    let m = Manifest {
        name: "inventory".into(),
        version: 3,
        sha256: "ab".repeat(32),
        length: 1234,
        world: World::Task,
        capabilities: Capabilities {
            host_facts: true,
            read_paths: vec!["/var/lib/dpkg".into()],
            exec: vec!["/usr/bin/uptime".into()],
            network: vec!["db.example:5432".into(), "[::1]:443".into()],
            parameters: vec!["token".into()],
        },
        issued_at: 1_700_000_000,
        expires_at: 1_800_000_000,
    };
    let mut signed_m = Signed::sign(&m, &pub_a);
    signed_m.add_signature(&pub_b);
    out.push(("manifest", "signed-2-of-2.json", json(&signed_m)));
    out.push(("manifest", "bare.json", json(&m)));

    let job_id = "job-1";
    let mut parameters = BTreeMap::new();
    parameters.insert(
        "region".to_string(),
        Parameter::Plain {
            value: "eu-1".into(),
        },
    );
    parameters.insert(
        "token".to_string(),
        Parameter::Secret {
            sealed: secret::seal(
                &agent.public(),
                &secret::parameter_aad(job_id, "token"),
                b"hunter2",
            ),
        },
    );
    let env = JobEnvelope {
        job_id: job_id.into(),
        agent_id: "web-1".into(),
        attempt: 1,
        plugin: Signed::sign(&m, &pub_a),
        input: serde_json::json!({"paths": ["/etc"], "deep": true, "n": 1.5}),
        parameters,
        limits: Limits::default(),
        not_before_ms: 1_700_000_000_000,
        expires_at_ms: 1_700_000_060_000,
        resent: false,
    };
    out.push((
        "envelope",
        "signed.json",
        json(&Signed::sign(&env, &control)),
    ));

    let header = ChunkHeader {
        request_id: "r1".into(),
        sha256: "ab".repeat(32),
        index: 1,
        count: 3,
        total_len: 10,
        chunk_size: 4,
        error: None,
    };
    out.push(("chunk", "frame.bin", chunk::encode(&header, b"abcd")));
    let refusal = ChunkHeader {
        index: 0,
        count: 0,
        error: Some("unknown blob".into()),
        ..header
    };
    out.push(("chunk", "error-frame.bin", chunk::encode(&refusal, b"")));
    let fetch = FetchRequest {
        request_id: "r1".into(),
        sha256: "ab".repeat(32),
        chunk_size: chunk::DEFAULT_CHUNK_SIZE,
        indices: Some(vec![0, 2]),
    };
    out.push(("chunk", "fetch.json", json(&fetch)));

    let result = JobResult {
        job_id: job_id.into(),
        agent_id: "web-1".into(),
        attempt: 1,
        plugin: "inventory".into(),
        plugin_version: 3,
        status: ResultStatus::Failed,
        failure: Some(Failure {
            kind: FailureKind::Timeout,
            message: "deadline passed".into(),
            retryable: true,
            plugin_error: None,
        }),
        output: Some(serde_json::json!({"ok": false})),
        stdout: Captured {
            text: "hi\n".into(),
            total_bytes: 3,
            truncated: false,
        },
        stderr: Captured::default(),
        started_at_ms: 1_700_000_000_000,
        duration_ms: 12,
        timings: Timings::default(),
    };
    out.push(("result", "result.json", json(&result)));
    let hello = Hello {
        agent_id: "web-1".into(),
        hostname: "web-1.example".into(),
        os: "linux".into(),
        os_version: "Debian GNU/Linux 12".into(),
        arch: "x86_64".into(),
        agent_version: "0.1.0".into(),
        tags: BTreeMap::from([("role".to_string(), "web".to_string())]),
        started_at_ms: 1_700_000_000_000,
        keyset_version: 2,
        sent_at_ms: 1_700_000_000_100,
    };
    out.push(("result", "hello.json", json(&hello)));
    out.push(("result", "presence.json", json(&Presence::Online)));
    let ack = ResultAck {
        agent_id: "web-1".into(),
        job_id: job_id.into(),
        attempt: 1,
        result_sha256: drover_protocol::manifest::sha256_hex(&json(&result)),
    };
    out.push(("result", "ack.json", json(&Signed::sign(&ack, &control))));

    out.push((
        "topics",
        "up.txt",
        topics::up("web-1", topics::Up::Result).into_bytes(),
    ));
    out.push((
        "topics",
        "down.txt",
        topics::down("web-1", topics::Down::Chunk).into_bytes(),
    ));

    // Sealed to another agent: however the fuzzer mutates it, the target's key can't open it.
    let sealed = secret::seal(&other_agent.public(), b"drover:parameter:job-1:token", b"x");
    let mut box_json = vec![0u8];
    box_json.extend(json(&sealed));
    out.push(("secret", "json-box.bin", box_json));
    // Raw mode: tag 1, 32-byte ephemeral key, 12-byte nonce, AAD length and AAD, ciphertext.
    let mut raw = vec![1u8];
    raw.extend_from_slice(&other_agent.public());
    raw.extend_from_slice(&[7u8; 12]);
    raw.push(4);
    raw.extend_from_slice(b"aad!");
    raw.extend_from_slice(&[0x5a; 20]);
    out.push(("secret", "raw-box.bin", raw));

    let ks = KeySet {
        version: 2,
        roots: vec![root_a.public(), root_b.public()],
        root_threshold: 2,
        publishers: vec![pub_a.public(), pub_b.public()],
        publisher_threshold: 1,
        control_plane: vec![control.public()],
        issued_at: 1_700_000_000,
    };
    let mut signed_ks = Signed::sign(&ks, &root_a);
    signed_ks.add_signature(&root_b);
    out.push(("keyset", "signed-2-of-2.json", json(&signed_ks)));
    out.push(("keyset", "bare.json", json(&ks)));

    out
}

/// Compact JSON of a seed value.
fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("seed serialises")
}
