//! Results are checked, not trusted: before a number is printed, plotted or written, every
//! perplexity, KL divergence, agreement and drift statistic must be finite. A non-finite one is an
//! error naming the stage that produced it and the likely input cause, never a printed `NaN`.
use anyhow::{bail, Result};

use super::eval_analog::SweepPoint;
use crate::eval::analog::AnalogEvalReport;
use crate::eval::PerplexityReport;
use crate::tile::DriftStudy;

/// What usually makes a forward pass non-finite once the loader's range checks have passed.
const FORWARD_CAUSE: &str = "likely cause: a checkpoint weight so large that activations \
     overflow f32 (check the largest |w| of the checkpoint), or a preset whose analog noise \
     or ranges swamp the signal";

fn finite(stage: &str, what: &str, v: f64, cause: &str) -> Result<()> {
    if !v.is_finite() {
        bail!("{stage}: {what} is {v}, not a finite number; {cause}");
    }
    Ok(())
}

/// The digital perplexity of `aimc eval --digital`.
pub fn check_perplexity(r: &PerplexityReport) -> Result<()> {
    finite("digital evaluation", "the mean NLL", r.nll, FORWARD_CAUSE)?;
    finite(
        "digital evaluation",
        "the perplexity",
        r.perplexity,
        FORWARD_CAUSE,
    )
}

/// Every point of an analog accuracy sweep (`label` names the run).
pub fn check_analog(r: &AnalogEvalReport, label: &str) -> Result<()> {
    let stage = format!("analog evaluation of {label}");
    finite(
        &stage,
        "the digital reference perplexity",
        r.digital_perplexity,
        FORWARD_CAUSE,
    )?;
    for p in &r.points {
        let at = format!("t = {} s, seed {}", p.t_seconds, p.seed);
        finite(
            &stage,
            &format!("the perplexity at {at}"),
            p.perplexity,
            FORWARD_CAUSE,
        )?;
        finite(
            &stage,
            &format!("the KL divergence at {at}"),
            p.kl,
            FORWARD_CAUSE,
        )?;
        finite(
            &stage,
            &format!("the top-1 agreement at {at}"),
            p.agreement,
            FORWARD_CAUSE,
        )?;
    }
    Ok(())
}

/// The heterogeneous digital-fraction sweep.
pub fn check_sweep(points: &[SweepPoint], digital_perplexity: f64) -> Result<()> {
    let stage = "heterogeneous sweep";
    finite(
        stage,
        "the digital perplexity",
        digital_perplexity,
        FORWARD_CAUSE,
    )?;
    for p in points {
        for (what, v) in [
            ("max-neuron-norm perplexity", p.norm_perplexity_mean),
            ("random-selection perplexity", p.random_perplexity_mean),
        ] {
            finite(
                stage,
                &format!("the {what} at digital fraction {}", p.digital_fraction),
                v,
                FORWARD_CAUSE,
            )?;
        }
    }
    Ok(())
}

/// Every statistic of a drift study.
pub fn check_drift(s: &DriftStudy) -> Result<()> {
    let stage = format!("drift study of preset `{}`", s.preset);
    let cause = "likely cause: a preset constant (device, ω, bounds, noise) outside the range \
                 where f32 arithmetic stays finite";
    for p in &s.points {
        let at = format!("t = {} s", p.t_seconds);
        for (what, v) in [
            ("mean conductance", p.g_mean_us),
            ("conductance std", p.g_std_us),
            ("MVM error with drift compensation", p.mvm_rel_err_gdc),
            ("MVM error without drift compensation", p.mvm_rel_err_no_gdc),
        ] {
            finite(&stage, &format!("the {what} at {at}"), v, cause)?;
        }
    }
    for level in &s.fan.levels {
        for (&m, &sd) in level.g_mean_us.iter().zip(&level.g_std_us) {
            finite(
                &stage,
                &format!("the drift fan of g_T = {} µS", level.g_target_us),
                m + sd,
                cause,
            )?;
        }
    }
    Ok(())
}
