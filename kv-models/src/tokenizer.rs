//! Text to token ids and back.

/// Byte-level tokenizer: every byte is a token (vocab 256), so it needs no files.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// Vocabulary size.
    pub const VOCAB: usize = 256;

    /// The UTF-8 bytes of `text`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    /// Text from token ids; ids above 255 and invalid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().map(|&i| u8::try_from(i).unwrap_or(b'?')).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let t = ByteTokenizer;
        let ids = t.encode("héllo, 42");
        assert_eq!(ids.len(), 10);
        assert_eq!(t.decode(&ids), "héllo, 42");
    }
}
