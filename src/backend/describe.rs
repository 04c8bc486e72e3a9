//! What a backend reports about a run: where each part ran ([`Description`]) and where the time
//! went ([`Phases`]). Both are values the backend returns and that are rendered here only, so a
//! report says what happened and nothing else (a CPU run names no GPU phase).

use serde::{Deserialize, Serialize};

/// Where the parts of an analog evaluation ran.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Description {
    /// The processor of the analog forwards: `cpu`, or `cuda (<GPU name>)`.
    pub device: String,
    /// The GPU's share, when one ran anything.
    pub gpu: Option<GpuPlacement>,
}

/// What ran on the GPU of a CUDA run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuPlacement {
    /// MoE layers whose routed experts ran on the GPU.
    pub expert_layers: Vec<usize>,
    /// MoE layers whose routed experts stayed on the CPU, with the reason.
    pub cpu_layers: Vec<(usize, String)>,
    /// `Some` when the GPU programmed and drifted the crossbars itself (else the CPU did and
    /// the drifted operands were uploaded per point), with where the programmed state lived.
    pub programming: Option<ProgrammedState>,
    /// `Some(sequences per pass)` when the whole forward (attention, norms, LM head and the
    /// metrics) ran on the GPU; else only the routed experts did.
    pub whole_forward: Option<usize>,
    /// Whether the digital reference ran on the GPU, in the arithmetic of the analog forwards.
    pub digital_reference: bool,
}

/// Where a GPU that programs the crossbars keeps their programmed state between drift points.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProgrammedState {
    /// Kept on the device.
    #[default]
    Resident,
    /// Programmed again at each drift point.
    RecomputedPerPoint,
    /// Programmed again at each point, with the digital weights streamed from the host.
    Streamed,
}

impl std::fmt::Display for Description {
    /// `cpu`, or `cuda (<GPU>): routed experts of MoE layers [..] on the GPU; layer L on the CPU
    /// (why); programming and drift on the GPU; whole forward on the GPU, N sequences per pass;
    /// digital reference on the GPU`, naming only what happened.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.device)?;
        let Some(g) = &self.gpu else {
            return Ok(());
        };
        write!(
            f,
            ": routed experts of MoE layers {:?} on the GPU",
            g.expert_layers
        )?;
        for (l, why) in &g.cpu_layers {
            write!(f, "; layer {l} on the CPU ({why})")?;
        }
        if let Some(state) = g.programming {
            f.write_str("; programming and drift on the GPU")?;
            f.write_str(match state {
                ProgrammedState::Resident => "",
                ProgrammedState::RecomputedPerPoint => " (programmed state recomputed per point)",
                ProgrammedState::Streamed => {
                    " (programmed state recomputed per point, digital weights streamed from the host)"
                }
            })?;
        }
        if let Some(n) = g.whole_forward {
            write!(f, "; whole forward on the GPU, {n} sequences per pass")?;
        }
        if g.digital_reference {
            f.write_str("; digital reference on the GPU")?;
        }
        Ok(())
    }
}

/// Wall seconds of the phases of an analog sweep, as the backend spent them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Phases {
    /// Programming the crossbars (once per seed; on the GPU also laying them out).
    pub program_s: f64,
    /// Drift and global drift compensation (once per point).
    pub drift_s: f64,
    /// Building and uploading device operands; `None` on a backend that uploads nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_s: Option<f64>,
    /// Forward passes and their scores.
    pub forward_s: f64,
    /// Per-stage device times, when the backend was asked to profile them.
    #[serde(skip)]
    pub stages: Vec<Stage>,
}

/// Wall time of one profiled stage of a backend.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    /// What the stage belongs to (`programming/drift`, `forward`).
    pub group: &'static str,
    pub name: &'static str,
    /// Device seconds, and the host's share spent enqueueing.
    pub seconds: f64,
    pub host_seconds: f64,
}

impl std::fmt::Display for Phases {
    /// `program 3.27 s, drift + GDC 6.04 s[, GPU upload 0.20 s], forwards 23.95 s`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "program {:.2} s, drift + GDC {:.2} s, ",
            self.program_s, self.drift_s
        )?;
        if let Some(u) = self.upload_s {
            write!(f, "GPU upload {u:.2} s, ")?;
        }
        write!(f, "forwards {:.2} s", self.forward_s)
    }
}

impl Phases {
    /// Runs `f`, adding its wall seconds to the phase `pick` chooses.
    pub fn time<T>(&mut self, pick: fn(&mut Self) -> &mut f64, f: impl FnOnce() -> T) -> T {
        let clock = std::time::Instant::now();
        let out = f();
        *pick(self) += clock.elapsed().as_secs_f64();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_run_names_no_gpu_part() {
        let d = Description {
            device: "cpu".into(),
            gpu: None,
        };
        assert_eq!(d.to_string(), "cpu");
        let p = Phases {
            program_s: 1.0,
            drift_s: 2.0,
            forward_s: 3.0,
            ..Default::default()
        };
        assert_eq!(
            p.to_string(),
            "program 1.00 s, drift + GDC 2.00 s, forwards 3.00 s"
        );
        assert!(!serde_json::to_string(&p).unwrap().contains("upload"));
    }

    #[test]
    fn a_gpu_run_lists_its_parts_in_order() {
        let d = Description {
            device: "cuda (GPU)".into(),
            gpu: Some(GpuPlacement {
                expert_layers: vec![0, 2],
                cpu_layers: vec![(1, "some of its routed experts are digital".into())],
                programming: Some(ProgrammedState::RecomputedPerPoint),
                whole_forward: Some(8),
                digital_reference: true,
            }),
        };
        assert_eq!(
            d.to_string(),
            "cuda (GPU): routed experts of MoE layers [0, 2] on the GPU; layer 1 on the CPU \
             (some of its routed experts are digital); programming and drift on the GPU \
             (programmed state recomputed per point); whole forward on the GPU, 8 sequences per \
             pass; digital reference on the GPU"
        );
    }
}
