//! `tokenizer.json` through the `tokenizers` crate (pure-Rust `fancy-regex` backend).
use anyhow::{anyhow, bail, Result};

/// A HuggingFace tokenizer checked against the model's vocabulary.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer(vocab {})", self.vocab_size())
    }
}

impl Tokenizer {
    /// Parses `tokenizer.json` bytes; every id it can produce must be below `vocab_size` (the
    /// embedding rows of `config.json`), else the model would index out of its embedding table.
    pub fn from_bytes(bytes: &[u8], location: &str, vocab_size: usize) -> Result<Self> {
        // The tokenizers crate is third-party code over untrusted bytes: a panic inside it is
        // turned into an error naming the file.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|_| anyhow!("{location}: cannot parse tokenizer (the parser failed)"))?;
        let inner = parsed.map_err(|e| anyhow!("{location}: cannot parse tokenizer ({e})"))?;
        let max_id = inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1);
        if max_id > vocab_size {
            bail!(
                "{location}: tokenizer has token ids up to {} but config.json field `vocab_size` is {vocab_size}",
                max_id - 1
            );
        }
        Ok(Self { inner })
    }

    /// Number of tokens the tokenizer knows (including added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // As in parsing: a panic of the third-party tokenizer on odd rules is an error.
        let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.inner.encode(text, false)
        }))
        .map_err(|_| anyhow!("tokenizing: the tokenizer failed on this text"))?;
        Ok(encoded
            .map_err(|e| anyhow!("tokenizing: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.inner.decode(ids, false)
        }))
        .map_err(|_| anyhow!("detokenizing: the tokenizer failed on these ids"))?
        .map_err(|e| anyhow!("detokenizing: {e}"))
    }
}
