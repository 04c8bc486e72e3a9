//! On/off switches of the GPU backend read from the environment (profiling and `aimc bench`
//! knobs, and `AIMC_ANALOG_WGMMA`). A switch is on at `1`, off at `0` and at its default where
//! unset; any other value is an error naming the variable, so that `=true`, `=off` or a typo
//! never silently means the opposite.
use super::{CudaError, CudaResult};

/// Whether switch `var`, off where unset, is on.
pub(crate) fn switch(var: &str) -> CudaResult<bool> {
    switch_or(var, false)
}

/// Whether switch `var` is on; unset, it is `default`.
pub(crate) fn switch_or(var: &str, default: bool) -> CudaResult<bool> {
    switch_from(var, std::env::var(var).ok().as_deref(), default)
}

/// [`switch_or`] for the variable's value (`None`: unset).
fn switch_from(var: &str, value: Option<&str>, default: bool) -> CudaResult<bool> {
    match value.map(str::trim) {
        None => Ok(default),
        Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(CudaError::Unsupported(format!(
            "{var}={other:?}: want 1 (on) or 0 (off; unset: {})",
            if default { "on" } else { "off" }
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_is_one_zero_or_its_default() {
        for default in [false, true] {
            assert_eq!(switch_from("AIMC_X", None, default).unwrap(), default);
            assert!(!switch_from("AIMC_X", Some(" 0 "), default).unwrap());
            assert!(switch_from("AIMC_X", Some(" 1"), default).unwrap());
            for bad in ["", "yes", "true", "off", "2"] {
                let err = switch_from("AIMC_X", Some(bad), default)
                    .unwrap_err()
                    .to_string();
                let unset = if default { "unset: on" } else { "unset: off" };
                assert!(
                    err.starts_with(&format!("AIMC_X={bad:?}"))
                        && err.contains("want 1")
                        && err.contains(unset),
                    "{err}"
                );
            }
        }
    }
}
