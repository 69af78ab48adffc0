//! Fetching plugin blobs over MQTT in chunks.
//!
//! The agent asks for a blob by digest; the control plane answers with one message per
//! chunk. A chunk is a binary frame, not JSON, so blobs travel without base64 overhead:
//!
//! ```text
//! "DRC1" | header length (u32, big endian) | header (JSON, ChunkHeader) | data
//! ```

use serde::{Deserialize, Serialize};

/// The default chunk size: small enough for brokers with small message limits.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// The smallest chunk size the control plane serves.
pub const MIN_CHUNK_SIZE: u32 = 1024;
/// The largest chunk size the control plane serves.
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024;

const MAGIC: &[u8; 4] = b"DRC1";
const MAX_HEADER: usize = 4096;

/// An agent's request for chunks of a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    /// Echoed in every chunk, so answers to an old request can be told apart.
    pub request_id: String,
    /// The blob's SHA-256, hex.
    pub sha256: String,
    /// The chunk size the agent wants.
    pub chunk_size: u32,
    /// Which chunks; `None` for all of them.
    #[serde(default)]
    pub indices: Option<Vec<u32>>,
}

/// Describes one chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    /// The request this answers.
    pub request_id: String,
    /// The blob's SHA-256, hex.
    pub sha256: String,
    /// This chunk's index.
    pub index: u32,
    /// How many chunks the blob has.
    pub count: u32,
    /// The blob's full length.
    pub total_len: u64,
    /// The chunk size used.
    pub chunk_size: u32,
    /// Set when the blob cannot be served; the frame then carries no data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    /// Not a chunk frame.
    #[error("not a chunk frame")]
    BadMagic,
    /// Shorter than its header says.
    #[error("chunk frame truncated")]
    Truncated,
    /// The header is not valid.
    #[error("bad chunk header: {0}")]
    BadHeader(String),
}

/// Encodes one chunk frame.
pub fn encode(header: &ChunkHeader, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).expect("chunk headers serialise");
    let mut out = Vec::with_capacity(8 + h.len() + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(h.len() as u32).to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// Decodes one chunk frame into its header and data.
pub fn decode(frame: &[u8]) -> Result<(ChunkHeader, &[u8]), ChunkError> {
    if frame.len() < 8 || &frame[..4] != MAGIC {
        return Err(ChunkError::BadMagic);
    }
    let len = u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]) as usize;
    if len > MAX_HEADER {
        return Err(ChunkError::BadHeader(format!("header of {len} bytes")));
    }
    let end = 8usize.checked_add(len).ok_or(ChunkError::Truncated)?;
    if frame.len() < end {
        return Err(ChunkError::Truncated);
    }
    let header: ChunkHeader =
        serde_json::from_slice(&frame[8..end]).map_err(|e| ChunkError::BadHeader(e.to_string()))?;
    if header.count == 0 && header.error.is_none() {
        return Err(ChunkError::BadHeader("zero chunks".into()));
    }
    if header.error.is_none() && header.index >= header.count {
        return Err(ChunkError::BadHeader(format!(
            "index {} of {}",
            header.index, header.count
        )));
    }
    Ok((header, &frame[end..]))
}

/// How many chunks a blob of `len` bytes has at `chunk_size`.
pub fn chunk_count(len: u64, chunk_size: u32) -> u32 {
    len.div_ceil(chunk_size.max(1) as u64).max(1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let h = ChunkHeader {
            request_id: "r".into(),
            sha256: "00".into(),
            index: 1,
            count: 3,
            total_len: 10,
            chunk_size: 4,
            error: None,
        };
        let f = encode(&h, b"abcd");
        let (h2, d) = decode(&f).unwrap();
        assert_eq!(h2, h);
        assert_eq!(d, b"abcd");
        assert_eq!(decode(b"nope"), Err(ChunkError::BadMagic));
        assert_eq!(decode(&f[..10]), Err(ChunkError::Truncated));
        let mut bad = f.clone();
        bad[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&bad).is_err());
        assert_eq!(chunk_count(0, 4), 1);
        assert_eq!(chunk_count(8, 4), 2);
        assert_eq!(chunk_count(9, 4), 3);
    }
}
