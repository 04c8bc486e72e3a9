//! On/off switches of the GPU backend read from the environment (profiling and `aimc bench`
//! knobs). A switch is on at `1` and off where unset or `0`; any other value is an error naming
//! the variable, so that `=0`, `=true` or a typo never silently means the opposite.
use super::{CudaError, CudaResult};

/// Whether switch `var` is on.
pub(crate) fn switch(var: &str) -> CudaResult<bool> {
    switch_from(var, std::env::var(var).ok().as_deref())
}

/// [`switch`] for the variable's value (`None`: unset).
fn switch_from(var: &str, value: Option<&str>) -> CudaResult<bool> {
    match value.map(str::trim) {
        None | Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(CudaError::Unsupported(format!(
            "{var}={other:?}: want 1 (on) or 0 (off, as unset)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_is_one_zero_or_unset() {
        assert!(!switch_from("AIMC_X", None).unwrap());
        assert!(!switch_from("AIMC_X", Some("0")).unwrap());
        assert!(switch_from("AIMC_X", Some(" 1")).unwrap());
        for bad in ["", "yes", "true", "2"] {
            let err = switch_from("AIMC_X", Some(bad)).unwrap_err().to_string();
            assert!(
                err.starts_with("AIMC_X=") && err.contains("want 1"),
                "{err}"
            );
        }
    }
}
