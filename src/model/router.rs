//! Routers: router logits `[tokens, experts]` → explicit `(token, expert, weight)` assignments.
//!
//! Downstream code (MoE dispatch, analog mapping, tier-switch counting) only sees the list, never a
//! fixed k, so variable-k routers (ReLU, adaptive-k) plug in unchanged (docs/model.md §5).
use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

/// One routing decision: token `token` (row of the layer input) uses expert `expert` with weight
/// `weight` multiplying that expert's output.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// Row of the layer input (position within the sequence in recorded routing).
    pub token: u32,
    /// Routed expert index within the layer.
    pub expert: u32,
    /// Multiplier of the expert's output.
    pub weight: f32,
}

/// DeepSeek-V2 `group_limited_greedy`: only experts of the `topk_group` best groups (a group's
/// score is its best expert probability) are eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLimit {
    /// Number of equal expert groups (`n_group`).
    pub n_group: usize,
    /// Groups kept per token (`topk_group`).
    pub topk_group: usize,
}

/// A checkpoint's own routing rule (docs/model.md §5), as its transformers implementation computes it:
/// softmax over all experts → (group-limited) top-k → optional renormalisation → × scaling.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RouterRule {
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Divide the k kept probabilities by their sum (Mixtral; `norm_topk_prob`).
    pub renormalize: bool,
    /// DeepSeek `routed_scaling_factor` (1 elsewhere).
    pub scaling: f32,
    /// DeepSeek-V2 `group_limited_greedy`; `None` = plain top-k.
    pub group_limit: Option<GroupLimit>,
}

/// Routing rule used at inference; every variant's weights are multiplied by the checkpoint's
/// `routed_scaling_factor` (1 except DeepSeek), which belongs to the expert-output scale the
/// network was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub enum RouterKind {
    /// The checkpoint's rule ([`RouterRule`]).
    #[default]
    CheckpointDefault,
    /// softmax over all experts → top-k → optional renormalisation.
    SoftmaxTopK { k: usize, renormalize: bool },
    /// σ-MoE (Csordás et al. 2023): independent sigmoid per expert → top-k, no normalisation.
    SigmoidTopK { k: usize },
    /// ReMoE (Wang et al. 2024, arXiv 2412.14711): weight = ReLU(logit); every expert with a
    /// positive weight is used, so k varies per token.
    Relu,
    /// AdapMoE-style adaptive k (Zhong et al. 2024, arXiv 2408.10284): the checkpoint's rule, then
    /// every expert after the first whose weight (before renormalisation) is below `threshold` is
    /// dropped; the remaining weights are renormalised when the checkpoint renormalises.
    AdaptiveK { threshold: f32 },
}

impl RouterKind {
    /// Whether every token gets the same number of experts (all but ReLU and adaptive-k).
    pub fn fixed_k(&self) -> bool {
        !matches!(self, RouterKind::Relu | RouterKind::AdaptiveK { .. })
    }

    /// Routes every token (row of `logits`), returning assignments in token order.
    pub fn route(&self, logits: ArrayView2<'_, f32>, rule: &RouterRule) -> Vec<Assignment> {
        let experts = logits.ncols();
        let mut out = Vec::with_capacity(logits.nrows() * rule.top_k);
        let mut scores = vec![0f32; experts];
        let mut chosen: Vec<(usize, f32)> = Vec::with_capacity(experts);
        for (t, row) in logits.outer_iter().enumerate() {
            chosen.clear();
            match *self {
                RouterKind::CheckpointDefault => {
                    softmax_into(row.iter().copied(), &mut scores);
                    top_k(&scores, rule.top_k, rule.group_limit, &mut chosen);
                    if rule.renormalize {
                        renormalize(&mut chosen);
                    }
                }
                RouterKind::SoftmaxTopK {
                    k,
                    renormalize: renorm,
                } => {
                    softmax_into(row.iter().copied(), &mut scores);
                    top_k(&scores, k.min(experts), None, &mut chosen);
                    if renorm {
                        renormalize(&mut chosen);
                    }
                }
                RouterKind::SigmoidTopK { k } => {
                    for (s, &l) in scores.iter_mut().zip(row) {
                        *s = 1.0 / (1.0 + (-l).exp());
                    }
                    top_k(&scores, k.min(experts), None, &mut chosen);
                }
                RouterKind::Relu => {
                    chosen.extend(
                        row.iter()
                            .enumerate()
                            .filter(|(_, &l)| l > 0.0)
                            .map(|(e, &l)| (e, l)),
                    );
                }
                RouterKind::AdaptiveK { threshold } => {
                    softmax_into(row.iter().copied(), &mut scores);
                    top_k(&scores, rule.top_k, rule.group_limit, &mut chosen);
                    // `top_k` sorts by descending weight: keep the first, drop weak followers.
                    let mut i = 0;
                    chosen.retain(|&(_, w)| {
                        i += 1;
                        i == 1 || w >= threshold
                    });
                    if rule.renormalize {
                        renormalize(&mut chosen);
                    }
                }
            }
            out.extend(chosen.iter().map(|&(e, w)| Assignment {
                token: t as u32,
                expert: e as u32,
                weight: w * rule.scaling,
            }));
        }
        out
    }
}

impl std::fmt::Display for RouterRule {
    /// Human form, e.g. `softmax top-4, no renormalisation` or
    /// `softmax top-6, renormalised, × 16, best 3 of 8 groups`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "softmax top-{}, {}",
            self.top_k,
            if self.renormalize {
                "renormalised"
            } else {
                "no renormalisation"
            }
        )?;
        if self.scaling != 1.0 {
            write!(f, ", × {}", self.scaling)?;
        }
        if let Some(g) = self.group_limit {
            write!(f, ", best {} of {} groups", g.topk_group, g.n_group)?;
        }
        Ok(())
    }
}

impl std::fmt::Display for RouterKind {
    /// Human form of the rule (the CLI spelling is in [`std::str::FromStr`]).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            RouterKind::CheckpointDefault => write!(f, "the checkpoint's rule"),
            RouterKind::SoftmaxTopK { k, renormalize } => write!(
                f,
                "softmax top-{k}, {}",
                if renormalize {
                    "renormalised"
                } else {
                    "no renormalisation"
                }
            ),
            RouterKind::SigmoidTopK { k } => write!(f, "sigmoid top-{k}"),
            RouterKind::Relu => write!(f, "ReLU (variable k)"),
            RouterKind::AdaptiveK { threshold } => {
                write!(f, "adaptive k (drop followers below weight {threshold})")
            }
        }
    }
}

impl std::str::FromStr for RouterKind {
    type Err = anyhow::Error;

    /// Parses the CLI spelling: `default`, `softmax:K`, `softmax-renorm:K`, `sigmoid:K`, `relu`,
    /// `adaptive:THRESHOLD`.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        // Bounded so that no per-token buffer sized by k can be absurd; the model's own expert
        // count is checked once it is loaded.
        const MAX_K: usize = 1 << 16;
        let k = || -> anyhow::Result<usize> {
            match arg.parse::<usize>() {
                Ok(k) if (1..=MAX_K).contains(&k) => Ok(k),
                _ => anyhow::bail!(
                    "router `{s}`: expected an expert count after `:` (allowed 1..={MAX_K})"
                ),
            }
        };
        let no_arg = |r: RouterKind| -> anyhow::Result<RouterKind> {
            if s.contains(':') {
                anyhow::bail!("router `{s}`: `{name}` takes no argument after `:`");
            }
            Ok(r)
        };
        Ok(match name {
            "default" => no_arg(RouterKind::CheckpointDefault)?,
            "softmax" => RouterKind::SoftmaxTopK { k: k()?, renormalize: false },
            "softmax-renorm" => RouterKind::SoftmaxTopK { k: k()?, renormalize: true },
            "sigmoid" => RouterKind::SigmoidTopK { k: k()? },
            "relu" => no_arg(RouterKind::Relu)?,
            "adaptive" => RouterKind::AdaptiveK {
                // A weight threshold: routing weights lie in [0, 1] (before the checkpoint's
                // scaling), so anything else, NaN and ±inf included, is not a threshold.
                threshold: match arg.parse::<f32>() {
                    Ok(t) if (0.0..=1.0).contains(&t) => t,
                    _ => anyhow::bail!(
                        "router `{s}`: expected a weight threshold after `:` (allowed 0..=1)"
                    ),
                },
            },
            _ => anyhow::bail!(
                "unknown router `{s}` (default, softmax:K, softmax-renorm:K, sigmoid:K, relu, adaptive:T)"
            ),
        })
    }
}

/// Numerically stable softmax of `logits` into `out`.
fn softmax_into(logits: impl Iterator<Item = f32> + Clone, out: &mut [f32]) {
    let max = logits.clone().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for (o, l) in out.iter_mut().zip(logits) {
        *o = (l - max).exp();
        sum += *o;
    }
    out.iter_mut().for_each(|o| *o /= sum);
}

/// The `k` largest scores, descending (ties: lower expert index first), optionally restricted to
/// the best groups (DeepSeek-V2 `group_limited_greedy`: non-eligible scores count as 0).
fn top_k(scores: &[f32], k: usize, groups: Option<GroupLimit>, out: &mut Vec<(usize, f32)>) {
    let mut eligible: Vec<(usize, f32)> = scores.iter().copied().enumerate().collect();
    if let Some(g) = groups {
        let size = scores.len() / g.n_group;
        let mut group_best: Vec<(usize, f32)> = scores
            .chunks(size)
            .map(|c| c.iter().copied().fold(f32::NEG_INFINITY, f32::max))
            .enumerate()
            .collect();
        group_best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let kept: Vec<usize> = group_best.iter().take(g.topk_group).map(|x| x.0).collect();
        for (e, s) in eligible.iter_mut() {
            if !kept.contains(&(*e / size)) {
                *s = 0.0;
            }
        }
    }
    eligible.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out.extend(eligible.into_iter().take(k));
}

fn renormalize(chosen: &mut [(usize, f32)]) {
    let sum: f32 = chosen.iter().map(|c| c.1).sum();
    if sum > 0.0 {
        chosen.iter_mut().for_each(|c| c.1 /= sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn rule(top_k: usize, renormalize: bool) -> RouterRule {
        RouterRule {
            top_k,
            renormalize,
            scaling: 1.0,
            group_limit: None,
        }
    }

    #[test]
    fn softmax_top2_matches_hand_computation() {
        let logits = array![[0.0f32, 1.0, 2.0, 3.0]];
        let z: f32 = [0.0f32, 1.0, 2.0, 3.0].iter().map(|l| l.exp()).sum();
        let a = RouterKind::CheckpointDefault.route(logits.view(), &rule(2, false));
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].expert, a[1].expert), (3, 2));
        assert!((a[0].weight - 3f32.exp() / z).abs() < 1e-6);
        let a = RouterKind::CheckpointDefault.route(logits.view(), &rule(2, true));
        assert!((a[0].weight + a[1].weight - 1.0).abs() < 1e-6);
        assert!((a[0].weight / a[1].weight - 1f32.exp()).abs() < 1e-5);
    }

    #[test]
    fn relu_routing_uses_a_variable_number_of_experts() {
        let logits = array![[-1.0f32, 0.5, 2.0], [-1.0, -2.0, -3.0]];
        let a = RouterKind::Relu.route(logits.view(), &rule(2, false));
        assert_eq!(
            a,
            vec![
                Assignment {
                    token: 0,
                    expert: 1,
                    weight: 0.5
                },
                Assignment {
                    token: 0,
                    expert: 2,
                    weight: 2.0
                },
            ]
        );
    }

    #[test]
    fn adaptive_k_drops_weak_second_expert_only() {
        // probabilities ≈ [0.665, 0.245, 0.090]: second expert kept at τ=0.2, dropped at τ=0.3.
        let logits = array![[2.0f32, 1.0, 0.0]];
        let kept = RouterKind::AdaptiveK { threshold: 0.2 }.route(logits.view(), &rule(2, false));
        assert_eq!(kept.len(), 2);
        let dropped = RouterKind::AdaptiveK { threshold: 0.3 }.route(logits.view(), &rule(2, true));
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].expert, 0);
        assert!((dropped[0].weight - 1.0).abs() < 1e-6);
    }

    #[test]
    fn group_limit_and_scaling_follow_deepseek_v2() {
        // Groups {0,1} and {2,3}; the best expert (3) lies in group 1, so with one group kept the
        // second choice is expert 2 even though expert 0 scores higher.
        let logits = array![[1.9f32, 0.0, 1.0, 3.0]];
        let r = RouterRule {
            top_k: 2,
            renormalize: false,
            scaling: 2.5,
            group_limit: Some(GroupLimit {
                n_group: 2,
                topk_group: 1,
            }),
        };
        let a = RouterKind::CheckpointDefault.route(logits.view(), &r);
        assert_eq!((a[0].expert, a[1].expert), (3, 2));
        let z: f32 = [1.9f32, 0.0, 1.0, 3.0].iter().map(|l| l.exp()).sum();
        assert!((a[1].weight - 2.5 * 1f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn router_names_parse() {
        assert_eq!("relu".parse::<RouterKind>().unwrap(), RouterKind::Relu);
        assert_eq!(
            "softmax-renorm:3".parse::<RouterKind>().unwrap(),
            RouterKind::SoftmaxTopK {
                k: 3,
                renormalize: true
            }
        );
        assert_eq!(
            "adaptive:0.25".parse::<RouterKind>().unwrap(),
            RouterKind::AdaptiveK { threshold: 0.25 }
        );
        assert!("softmax:0".parse::<RouterKind>().is_err());
        assert!("top9".parse::<RouterKind>().is_err());
    }

    #[test]
    fn routers_print_human_names() {
        assert_eq!(
            rule(4, false).to_string(),
            "softmax top-4, no renormalisation"
        );
        let deepseek = RouterRule {
            top_k: 6,
            renormalize: true,
            scaling: 16.0,
            group_limit: Some(GroupLimit {
                n_group: 8,
                topk_group: 3,
            }),
        };
        assert_eq!(
            deepseek.to_string(),
            "softmax top-6, renormalised, × 16, best 3 of 8 groups"
        );
        assert_eq!(
            "softmax-renorm:2"
                .parse::<RouterKind>()
                .unwrap()
                .to_string(),
            "softmax top-2, renormalised"
        );
        assert_eq!(RouterKind::Relu.to_string(), "ReLU (variable k)");
    }

    #[test]
    fn sigmoid_top_k_weights_are_independent_sigmoids() {
        let logits = array![[0.0f32, 10.0, -10.0]];
        let a = RouterKind::SigmoidTopK { k: 2 }.route(logits.view(), &rule(2, true));
        assert_eq!((a[0].expert, a[1].expert), (1, 0));
        assert!((a[1].weight - 0.5).abs() < 1e-6);
    }
}
