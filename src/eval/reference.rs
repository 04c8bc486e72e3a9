//! Evaluation against another model (`aimc eval --reference DIR`): a fine-tuned checkpoint is
//! judged by how close its analog outputs stay to the *original* model's digital outputs, the
//! model its user had, rather than to its own digital outputs; beside that, what the change cost
//! digitally (the two digital perplexities on the same tokens).
//!
//! Both models must read the same tokens the same way and have the same architecture, or the
//! comparison means nothing: [`check_compatible`] says which field differs, naming both models.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::model::Model;

/// The model whose digital outputs the analog ones are measured against.
#[derive(Clone, Copy)]
pub struct ReferenceModel<'m> {
    /// The original model.
    pub model: &'m Model,
    /// Its name as a person reads it (the directory given with `--reference`).
    pub name: &'m str,
}

impl std::fmt::Debug for ReferenceModel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReferenceModel({})", self.name)
    }
}

/// The digital side of an evaluation against a reference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceSummary {
    /// The original model's name (`--reference`).
    pub model: String,
    /// What the analog metrics are measured against, in words: "the original model's digital
    /// outputs (NAME)".
    pub measured_against: String,
    /// The original model's digital perplexity on the evaluation tokens.
    pub reference_digital_perplexity: f64,
    /// The evaluated model's own digital perplexity on the same tokens.
    pub model_digital_perplexity: f64,
    /// `100 · (model / reference − 1)`: the digital cost of the change, in percent.
    pub digital_perplexity_change_percent: f64,
}

impl ReferenceSummary {
    /// The summary of digital perplexities `reference` (of the model named `name`) and `own`.
    pub fn new(name: &str, reference: f64, own: f64) -> Self {
        Self {
            model: name.to_string(),
            measured_against: format!("the original model's digital outputs ({name})"),
            reference_digital_perplexity: reference,
            model_digital_perplexity: own,
            digital_perplexity_change_percent: 100.0 * (own / reference - 1.0),
        }
    }

    /// One line for tables: what the metrics are measured against and the digital cost.
    pub fn describe(&self) -> String {
        format!(
            "Measured against {}. Digital perplexity: {:.3} original, {:.3} this model ({:+.2}%).",
            self.measured_against,
            self.reference_digital_perplexity,
            self.model_digital_perplexity,
            self.digital_perplexity_change_percent
        )
    }
}

/// Checks that `model` (named `name`) and `reference` (named `reference_name`) have the same
/// architecture (every `config.json` field the simulator reads) and read `text` into the same
/// tokens; an error names the first difference and both models.
pub fn check_compatible(
    model: &Model,
    name: &str,
    reference: &Model,
    reference_name: &str,
    text: &str,
) -> Result<()> {
    if model.config != reference.config {
        let a = serde_json::to_value(&model.config)?;
        let b = serde_json::to_value(&reference.config)?;
        let field = a
            .as_object()
            .zip(b.as_object())
            .and_then(|(a, b)| a.iter().find(|(k, v)| b.get(*k) != Some(*v)))
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| "?".into());
        bail!(
            "--model {name} and --reference {reference_name} have different architectures \
             (config.json: `{field}` is {} in {name}, {} in {reference_name}); a reference must be \
             the model the evaluated one was made from",
            a.get(&field).map_or("absent".into(), |v| v.to_string()),
            b.get(&field).map_or("absent".into(), |v| v.to_string()),
        );
    }
    let (ta, tb) = (model.tokenizer()?, reference.tokenizer()?);
    if ta.vocab_size() != tb.vocab_size() || ta.encode(text)? != tb.encode(text)? {
        bail!(
            "--model {name} and --reference {reference_name} have different tokenizers \
             (vocabularies of {} and {} tokens, or a different tokenization of the evaluation \
             text); both must read the same tokens",
            ta.vocab_size(),
            tb.vocab_size()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digital_change_is_relative_to_the_reference() {
        let s = ReferenceSummary::new("orig", 20.0, 20.5);
        assert!((s.digital_perplexity_change_percent - 2.5).abs() < 1e-12);
        assert!(s.describe().contains("(orig)") && s.describe().contains("+2.50%"));
    }
}
