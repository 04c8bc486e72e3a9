//! Property tests over mutated inputs: checkpoints (config.json fields, safetensors headers and
//! bytes, weight values), tile presets and command-line values. For every mutated input, none of
//! the four bad outcomes may happen: a panic, an abort, a hang, or a non-finite result returned
//! as a success. The mutator is seeded (splitmix64), so a failing case is reproduced by its seed.
//!
//! `cargo test --release --test fuzz_inputs` runs a bounded number of cases (seconds). The long
//! campaign is the same code with more cases:
//! `AIMC_FUZZ_CASES=100000 cargo test --release --test fuzz_inputs -- --ignored --nocapture`.
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aimc::model::{ForwardOptions, Model};
// splitmix64: a tiny seeded generator, enough for mutation choices.
use aimc::rng::SplitMix64 as Rng;
use aimc::tile::{drift_study, DriftStudyConfig, TilePreset};
use serde_json::{json, Value};

/// Values that found bugs before, or sit on a boundary: zero, one, powers of two near the integer
/// limits, huge and tiny floats, negatives, wrong types.
fn interesting(rng: &mut Rng) -> Value {
    let pick = [
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(-1),
        json!(-2.0),
        json!(0.5),
        json!(17),
        json!(255),
        json!(1u64 << 31),
        json!(1u64 << 32),
        json!((1u64 << 53) + 1),
        json!(1u64 << 62),
        json!(1u64 << 63),
        json!(u64::MAX),
        json!(1e12),
        json!(1e300),
        json!(-1e300),
        json!(1e-300),
        json!(3e38),
        json!(1e-38),
        json!(1e-30),
        json!(1e30),
        json!(null),
        json!(true),
        json!("x"),
        json!("NaN"),
        json!([]),
        json!({}),
        json!([0, 1]),
        json!({"kind": "none"}),
    ];
    pick[rng.below(pick.len())].clone()
}

/// Dotted paths (as key lists) of every value inside `v`, skipping subtrees named in `skip`.
fn paths(v: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>, skip: &[&str]) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if skip.contains(&k.as_str()) {
                    continue;
                }
                prefix.push(k.clone());
                out.push(prefix.clone());
                paths(x, prefix, out, skip);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate().take(4) {
                prefix.push(format!("#{i}"));
                out.push(prefix.clone());
                paths(x, prefix, out, skip);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut cur = v;
    for k in path {
        cur = match k.strip_prefix('#') {
            Some(i) => cur.get_mut(i.parse::<usize>().ok()?)?,
            None => cur.get_mut(k.as_str())?,
        };
    }
    Some(cur)
}

/// One structural mutation of a JSON document: replace a value, delete a key, add an unknown
/// key, or scale a number.
fn mutate_json(doc: &mut Value, rng: &mut Rng, skip: &[&str]) {
    let mut all = Vec::new();
    paths(doc, &mut Vec::new(), &mut all, skip);
    if all.is_empty() {
        return;
    }
    let path = all[rng.below(all.len())].clone();
    match rng.below(6) {
        0 | 1 => {
            if let Some(v) = at(doc, &path) {
                *v = interesting(rng);
            }
        }
        2 => {
            let (last, parent) = path.split_last().unwrap();
            if let Some(Value::Object(m)) = at(doc, parent) {
                m.remove(last);
            }
        }
        3 => {
            let parent = &path[..path.len() - 1];
            if let Some(Value::Object(m)) = at(doc, parent) {
                m.insert("unexpected_field".into(), interesting(rng));
            }
        }
        _ => {
            if let Some(v) = at(doc, &path) {
                if let Some(x) = v.as_f64() {
                    let factor = [0.0, -1.0, 1e-9, 1e9, 1e30, 2.0][rng.below(6)];
                    *v = json!(x * factor);
                }
            }
        }
    }
}

/// A checkpoint fixture: config bytes and safetensors bytes.
struct Fixture {
    name: &'static str,
    config: Value,
    weights: Vec<u8>,
}

const FAMILIES: [&str; 8] = [
    "olmoe",
    "olmoe_clipqkv",
    "olmoe_fused",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v2_qlora",
];

fn fixtures() -> Vec<Fixture> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity");
    FAMILIES
        .iter()
        .map(|name| Fixture {
            name,
            config: serde_json::from_slice(
                &std::fs::read(root.join(name).join("config.json")).unwrap(),
            )
            .unwrap(),
            weights: std::fs::read(root.join(name).join("model.safetensors")).unwrap(),
        })
        .collect()
}

/// Splits safetensors bytes into (header JSON, data).
fn split_safetensors(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// What happened to one input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Rejected with an error (the wanted outcome for a bad input).
    CleanError,
    /// Accepted, and every result it gave was finite.
    FiniteSuccess,
    /// Accepted, gave a non-finite forward, and the input held a poisoned (huge) weight: the
    /// command-line result check turns this into an error (tested by the subprocess sample).
    NonFiniteFromPoisonedWeight,
    /// A panic (bad).
    Panic,
    /// Accepted although a result was non-finite, with no poisoned weight to explain it (bad).
    NonFiniteSuccess,
    /// A process killed by a signal (SIGABRT of a failed allocation, …) (bad).
    Abort,
    /// A run over its time limit (bad).
    Hang,
}

impl Outcome {
    fn bad(self) -> bool {
        matches!(
            self,
            Outcome::Panic | Outcome::NonFiniteSuccess | Outcome::Abort | Outcome::Hang
        )
    }
}

/// One mutated checkpoint: loads it from memory and, when it loads, runs a forward pass.
fn checkpoint_case(fx: &Fixture, seed: u64) -> (Outcome, String) {
    let mut rng = Rng(seed);
    let mut config = fx.config.clone();
    let (mut header, mut data) = split_safetensors(&fx.weights);
    let mut poisoned = false;
    let mut raw: Option<Vec<u8>> = None;
    let target = rng.below(10);
    if target < 5 {
        for _ in 0..1 + rng.below(3) {
            mutate_json(&mut config, &mut rng, &[]);
        }
    } else if target < 7 {
        mutate_json(&mut header, &mut rng, &[]);
    } else if target < 9 {
        // A weight of f32 data set to a huge, infinite or NaN value.
        let values = [3e38f32, -3e38, 1e30, f32::INFINITY, f32::NAN, 65504.0];
        let v = values[rng.below(values.len())];
        poisoned = v.abs() > 1e4 || !v.is_finite();
        let mut names: Vec<_> = header
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, t)| t.get("dtype").and_then(Value::as_str) == Some("F32"))
            .map(|(_, t)| {
                let o = &t["data_offsets"];
                (
                    o[0].as_u64().unwrap() as usize,
                    o[1].as_u64().unwrap() as usize,
                )
            })
            .collect();
        names.sort();
        if !names.is_empty() {
            let (s, e) = names[rng.below(names.len())];
            if e >= s + 4 {
                let i = s + 4 * rng.below((e - s) / 4);
                data[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    } else {
        // Raw bytes: flip, truncate, or a huge header length.
        let mut bytes = join_safetensors(&header, &data);
        // Flips stay in the length and header: a flipped data byte is a poisoned weight.
        let header_end = bytes.len() - data.len();
        match rng.below(3) {
            0 => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(header_end);
                    bytes[i] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let n = rng.below(bytes.len());
                bytes.truncate(n);
            }
            _ => bytes[..8].copy_from_slice(&(rng.next_u64() >> rng.below(64)).to_le_bytes()),
        }
        raw = Some(bytes);
    }
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let weight_bytes = raw.unwrap_or_else(|| join_safetensors(&header, &data));
    let files: [(&str, &[u8]); 2] = [
        ("config.json", &config_bytes),
        ("model.safetensors", &weight_bytes),
    ];
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<bool, String> {
        let model = Model::load_from_memory(&files).map_err(|e| format!("{e:#}"))?;
        let v = model.config.vocab_size as u32;
        let tokens: Vec<u32> = (0..6u32).map(|i| (i * 7 + 1) % v).collect();
        let out = model
            .forward(&tokens, &ForwardOptions::default())
            .map_err(|e| format!("{e:#}"))?;
        Ok(out.logits.iter().all(|x| x.is_finite()))
    }));
    let detail = format!(
        "{} seed {seed}: {}",
        fx.name,
        String::from_utf8_lossy(&config_bytes)
    );
    match result {
        Err(_) => (Outcome::Panic, detail),
        Ok(Err(_)) => (Outcome::CleanError, detail),
        Ok(Ok(true)) => (Outcome::FiniteSuccess, detail),
        Ok(Ok(false)) if poisoned => (Outcome::NonFiniteFromPoisonedWeight, detail),
        Ok(Ok(false)) => (Outcome::NonFiniteSuccess, detail),
    }
}

fn builtin_preset_texts() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tiles");
    TilePreset::builtin_names()
        .into_iter()
        .map(|n| {
            let text = std::fs::read_to_string(dir.join(format!("{n}.json"))).unwrap();
            (n.to_string(), serde_json::from_str(&text).unwrap())
        })
        .collect()
}

/// One mutated preset: parsed and validated, and when accepted, a small drift study on it must
/// give finite statistics. The `cost` section belongs to the energy model and is not mutated here.
fn preset_case(base: &(String, Value), seed: u64) -> (Outcome, String) {
    let mut rng = Rng(seed);
    let mut doc = base.1.clone();
    for _ in 0..1 + rng.below(3) {
        mutate_json(&mut doc, &mut rng, &["cost"]);
    }
    let text = serde_json::to_string(&doc).unwrap();
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<bool, String> {
        let preset = TilePreset::from_json_str(&text, "fuzz.json").map_err(|e| e.to_string())?;
        let config = DriftStudyConfig {
            times_s: vec![0.0, 3600.0, 3.15e7],
            seed,
            n_out: preset.stack.cols.min(16),
            n_in: preset.stack.rows.min(16),
            batch: 4,
            fan_levels: vec![0.5, 1.0],
            fan_devices: 16,
            fan_points: 3,
        };
        let s = drift_study(&preset, &config).map_err(|e| format!("{e:#}"))?;
        let finite = s.points.iter().all(|p| {
            [
                p.g_mean_us,
                p.g_std_us,
                p.mvm_rel_err_gdc,
                p.mvm_rel_err_no_gdc,
            ]
            .iter()
            .all(|v| v.is_finite())
        }) && s
            .fan
            .levels
            .iter()
            .all(|l| l.g_mean_us.iter().chain(&l.g_std_us).all(|v| v.is_finite()));
        Ok(finite)
    }));
    let detail = format!("preset {} seed {seed}: {text}", base.0);
    match result {
        Err(_) => (Outcome::Panic, detail),
        Ok(Err(_)) => (Outcome::CleanError, detail),
        Ok(Ok(true)) => (Outcome::FiniteSuccess, detail),
        Ok(Ok(false)) => (Outcome::NonFiniteSuccess, detail),
    }
}

/// The embedded model's `tokenizer.json` and its vocabulary size.
fn tokenizer_base() -> (Value, usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kjv-moe");
    let config: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    (
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap(),
        config["vocab_size"].as_u64().unwrap() as usize,
    )
}

/// One mutated `tokenizer.json`: parsed against the vocabulary, then a sentence encoded and
/// decoded. Errors are fine; a panic is not, and every id must be inside the vocabulary.
fn tokenizer_case(base: &(Value, usize), seed: u64) -> (Outcome, String) {
    let mut rng = Rng(seed);
    let mut doc = base.0.clone();
    for _ in 0..1 + rng.below(3) {
        mutate_json(&mut doc, &mut rng, &[]);
    }
    let bytes = serde_json::to_vec(&doc).unwrap();
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<bool, String> {
        let t = aimc::model::Tokenizer::from_bytes(&bytes, "tokenizer.json", base.1)
            .map_err(|e| format!("{e:#}"))?;
        let ids = t
            .encode("In the beginning God created the heaven and the earth. 123 ÄÖ \u{1F600}")
            .map_err(|e| format!("{e:#}"))?;
        t.decode(&ids).map_err(|e| format!("{e:#}"))?;
        Ok(ids.iter().all(|&i| (i as usize) < base.1))
    }));
    let detail = format!("tokenizer seed {seed}");
    match result {
        Err(_) => (Outcome::Panic, detail),
        Ok(Err(_)) => (Outcome::CleanError, detail),
        Ok(Ok(true)) => (Outcome::FiniteSuccess, detail),
        Ok(Ok(false)) => (Outcome::NonFiniteSuccess, detail),
    }
}

/// Aborts the whole test process when one case runs longer than `limit` (a hang): the abort
/// names the case, and the test fails.
struct Watchdog {
    started_ms: Arc<AtomicU64>,
    label: Arc<Mutex<String>>,
}

impl Watchdog {
    /// `started_ms` holds the running case's start in ms since `epoch`, plus one (0: idle).
    fn new(limit: Duration, epoch: Instant) -> Self {
        let started_ms = Arc::new(AtomicU64::new(0));
        let label = Arc::new(Mutex::new(String::new()));
        let (s, l) = (started_ms.clone(), label.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let start = s.load(Ordering::Relaxed);
            let now = epoch.elapsed().as_millis() as u64;
            if start != 0 && now.saturating_sub(start) > limit.as_millis() as u64 {
                eprintln!("HANG: case ran over {limit:?}: {}", l.lock().unwrap());
                std::process::abort();
            }
        });
        Self { started_ms, label }
    }
}

/// Runs `n` checkpoint and `n` preset cases and `n_tokenizer` tokenizer cases from `seed0`;
/// returns the outcome counts and the first bad cases.
fn campaign(
    n: u64,
    n_tokenizer: u64,
    seed0: u64,
) -> (BTreeMap<(&'static str, Outcome), u64>, Vec<String>) {
    let fixtures = fixtures();
    let presets = builtin_preset_texts();
    let tokenizer = tokenizer_base();
    let epoch = Instant::now();
    let dog = Watchdog::new(Duration::from_secs(60), epoch);
    let mut counts = BTreeMap::new();
    let mut bad = Vec::new();
    // Panics are counted, not printed once per case.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for i in 0..n.max(n_tokenizer) {
        let seed = seed0.wrapping_add(i);
        for kind in ["checkpoint", "preset", "tokenizer"] {
            if (kind == "tokenizer" && i >= n_tokenizer) || (kind != "tokenizer" && i >= n) {
                continue;
            }
            *dog.label.lock().unwrap() = format!("{kind} seed {seed}");
            dog.started_ms
                .store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
            let (outcome, detail) = match kind {
                "checkpoint" => {
                    checkpoint_case(&fixtures[(seed % fixtures.len() as u64) as usize], seed)
                }
                "preset" => preset_case(&presets[(seed % presets.len() as u64) as usize], seed),
                _ => tokenizer_case(&tokenizer, seed),
            };
            *counts.entry((kind, outcome)).or_insert(0) += 1;
            if outcome.bad() && bad.len() < 20 {
                bad.push(format!("{outcome:?}: {detail}"));
            }
        }
    }
    dog.started_ms.store(0, Ordering::Relaxed);
    std::panic::set_hook(hook);
    (counts, bad)
}

fn report(counts: &BTreeMap<(&'static str, Outcome), u64>) -> String {
    let mut s = String::from("| inputs | outcome | cases |\n|---|---|---|\n");
    for ((kind, outcome), n) in counts {
        s += &format!("| {kind} | {outcome:?} | {n} |\n");
    }
    s
}

#[test]
fn mutated_checkpoints_and_presets_never_panic_or_succeed_with_non_finite_results() {
    let (counts, bad) = campaign(600, 40, 0x5EED_0025);
    eprintln!("{}", report(&counts));
    assert!(bad.is_empty(), "bad outcomes:\n{}", bad.join("\n"));
    // The mutator must reach both sides: inputs that load and inputs that are refused.
    for kind in ["checkpoint", "preset"] {
        assert!(
            counts
                .get(&(kind, Outcome::CleanError))
                .copied()
                .unwrap_or(0)
                > 50
        );
        assert!(
            counts
                .get(&(kind, Outcome::FiniteSuccess))
                .copied()
                .unwrap_or(0)
                > 20
        );
    }
}

/// Fast valid command lines, each with the flags a mutation may replace.
const CLI_BASES: &[(&[&str], &[&str])] = &[
    (
        &["drift", "--times", "0,1h", "--batch", "16"],
        &["--times", "--batch", "--seed", "--preset"],
    ),
    (
        &["eval", "--digital", "--tokens", "64"],
        &["--tokens", "--seq-len", "--router"],
    ),
    (
        &["eval", "--tokens", "32", "--seeds", "1", "--times", "0"],
        &[
            "--tokens",
            "--seq-len",
            "--router",
            "--seeds",
            "--times",
            "--compare-strategies",
            "--sweep-digital",
            "--sweep-time",
            "--digital-fraction",
            "--random-digital",
            "--preset",
            "--strategy",
        ],
    ),
    (
        &["map", "--calib-tokens", "32"],
        &[
            "--calib-tokens",
            "--digital-fraction",
            "--random-digital",
            "--preset",
            "--strategy",
        ],
    ),
    (
        &[
            "report",
            "--tokens",
            "32",
            "--seeds",
            "1",
            "--times",
            "0",
            "--sweep-digital",
            "0",
            "--sweep-seeds",
            "1",
            "--sweep-tokens",
            "32",
        ],
        &[
            "--tokens",
            "--seeds",
            "--times",
            "--sweep-digital",
            "--sweep-time",
            "--sweep-seeds",
            "--sweep-tokens",
            "--batch",
            "--digital-fraction",
        ],
    ),
];

/// Odd command-line values: integer limits, non-finite and malformed numbers, empty lists,
/// router specs beyond the model, special files.
const CLI_VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "-1",
    "-0",
    "18446744073709551615",
    "18446744073709551616",
    "4294967296",
    "1000000000",
    "1e9",
    "NaN",
    "inf",
    "-inf",
    "1e400",
    "3e38",
    "0.5",
    "1.5",
    "",
    ",",
    "0,,",
    "1,2,3",
    "x",
    "1mo",
    "1y,0",
    "softmax:17",
    "softmax:0",
    "sigmoid:999",
    "relu:3",
    "adaptive:NaN",
    "adaptive:inf",
    "adaptive:0.1",
    "default:1",
    "ideal:packed",
    "bogus",
    "/dev/null",
    "/dev/zero",
    "..",
    "packed",
    "heterogeneous",
];

/// One mutated command line: a fast valid base with one flag set to an odd value. It must end
/// with status 0 (finite output), 1 or 2 (a clean error) within the time limit, without a
/// panic or a signal.
fn cli_case(seed: u64, dir: &Path) -> (Outcome, String) {
    let mut rng = Rng(seed);
    let (base, flags) = CLI_BASES[rng.below(CLI_BASES.len())];
    let flag = flags[rng.below(flags.len())];
    let value = CLI_VALUES[rng.below(CLI_VALUES.len())];
    let mut args: Vec<&str> = base.to_vec();
    match args.iter().position(|a| *a == flag) {
        Some(i) => args[i + 1] = value,
        None => args.extend([flag, value]),
    }
    let detail = format!("seed {seed}: aimc {}", args.join(" "));
    let Some((code, out, err)) = try_run_aimc(&args, dir, Duration::from_secs(300)) else {
        return (Outcome::Hang, detail);
    };
    let outcome = match code {
        _ if err.contains("panicked") => Outcome::Panic,
        None => Outcome::Abort,
        Some(0) if prints_non_finite(&out) => Outcome::NonFiniteSuccess,
        Some(0) => Outcome::FiniteSuccess,
        Some(1) | Some(2) => Outcome::CleanError,
        Some(101) => Outcome::Panic,
        Some(_) => Outcome::Abort,
    };
    (outcome, format!("{detail}\nstderr: {err}"))
}

/// The long campaign (run by hand; see the file's doc comment).
#[test]
#[ignore = "long campaign: AIMC_FUZZ_CASES=100000 to run"]
fn campaign_from_env() {
    let n: u64 = std::env::var("AIMC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let seed0: u64 = std::env::var("AIMC_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let n_tokenizer: u64 = std::env::var("AIMC_FUZZ_TOKENIZER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n / 10);
    let cli_runs: u64 = std::env::var("AIMC_FUZZ_CLI")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let clock = Instant::now();
    let (mut counts, mut bad) = campaign(n, n_tokenizer, seed0);
    println!(
        "{} mutated checkpoints and presets and {n_tokenizer} tokenizers from seed {seed0} in {:.0} s",
        2 * n,
        clock.elapsed().as_secs_f64()
    );
    let clock = Instant::now();
    let dir = tempfile::TempDir::new().unwrap();
    for i in 0..cli_runs {
        let (outcome, detail) = cli_case(seed0.wrapping_add(i), dir.path());
        *counts.entry(("command line", outcome)).or_insert(0) += 1;
        if outcome.bad() {
            bad.push(format!("{outcome:?}: {detail}"));
        }
    }
    println!(
        "{cli_runs} mutated command lines in {:.0} s\n{}",
        clock.elapsed().as_secs_f64(),
        report(&counts)
    );
    assert!(bad.is_empty(), "bad outcomes:\n{}", bad.join("\n"));
}

/// Runs the built binary with `args` (cwd `dir`), killing it after `limit` (a hang: panics).
/// Returns the exit code (`None` when killed by a signal), stdout and stderr.
fn run_aimc(args: &[&str], dir: &Path, limit: Duration) -> (Option<i32>, String, String) {
    try_run_aimc(args, dir, limit)
        .unwrap_or_else(|| panic!("HANG: aimc {args:?} ran over {limit:?}"))
}

/// As [`run_aimc`], `None` when the run went over `limit` (and was killed).
fn try_run_aimc(
    args: &[&str],
    dir: &Path,
    limit: Duration,
) -> Option<(Option<i32>, String, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_aimc"))
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return Some((
                status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A non-finite number printed as a result (`NaN`, `inf`, as a table cell or a JSON value).
fn prints_non_finite(stdout: &str) -> bool {
    stdout
        .split(|c: char| c.is_whitespace() || c == ',' || c == ':' || c == '|')
        .any(|w| {
            matches!(
                w.trim_matches('"').to_ascii_lowercase().as_str(),
                "nan" | "inf" | "-inf" | "inf%" | "nan%"
            )
        })
}

/// The command-line values of the fuzz run, and one seeded odd value per flag: each run
/// exits with a clean error (status 1 or clap's 2) or succeeds with finite output; never a
/// panic (101), an abort (signal), a hang.
#[test]
fn odd_command_line_values_fail_cleanly_and_fast() {
    let dir = tempfile::TempDir::new().unwrap();
    let d = dir.path();
    let huge = "18446744073709551615";
    let cases: Vec<Vec<&str>> = vec![
        vec!["drift", "--batch", "0"],
        vec!["drift", "--batch", huge],
        vec!["drift", "--batch", "1000000000"],
        vec!["drift", "--batch", "4294967296"],
        vec!["drift", "--times", ","],
        vec!["drift", "--times", ""],
        vec!["drift", "--times", "1e400"],
        vec!["drift", "--times", "-1"],
        vec!["drift", "--times", "NaN"],
        vec!["drift", "--preset", "/dev/null"],
        vec!["drift", "--preset", "/dev/zero"],
        vec!["eval", "--digital", "--text", "/dev/zero"],
        vec!["map", "--calib", "/dev/zero"],
        vec!["drift", "--preset", "no-such"],
        vec!["eval", "--seeds", huge],
        vec!["eval", "--seeds", "0"],
        vec!["eval", "--times", ""],
        vec!["eval", "--router", "softmax:17"],
        vec!["eval", "--router", "sigmoid:999"],
        vec!["eval", "--router", "adaptive:NaN"],
        vec!["eval", "--router", "adaptive:inf"],
        vec!["eval", "--router", "relu:3"],
        vec!["eval", "--router", "softmax:0"],
        vec!["eval", "--digital", "--router", "softmax:17"],
        vec!["eval", "--digital", "--seq-len", "0"],
        vec!["eval", "--digital", "--seq-len", "1"],
        vec!["eval", "--digital", "--tokens", "1"],
        vec!["eval", "--compare-strategies", "bogus"],
        vec!["eval", "--compare-strategies", "ideal:bogus"],
        vec!["eval", "--sweep-digital", "2"],
        vec!["eval", "--sweep-digital", "NaN"],
        vec!["eval", "--sweep-time", "forever"],
        vec!["eval", "--digital-fraction", "inf"],
        vec!["map", "--digital-fraction", "-0.5"],
        vec!["map", "--calib-tokens", "0"],
        vec!["map", "--preset", "no-such"],
        vec!["report", "--seeds", "0"],
        vec!["report", "--sweep-seeds", huge],
        vec!["report", "--batch", "0"],
        vec!["report", "--sweep-digital", "1.5"],
        vec!["report", "--times", ","],
        vec!["bench", "--batch", huge],
        vec!["bench", "--repeats", "0"],
        vec!["bench", "--moe-shape", "1,1,1,2,3"],
        vec!["info", "--model", "/nonexistent"],
        vec!["info", "--model", "/dev"],
    ];
    for args in &cases {
        let start = Instant::now();
        let (code, out, err) = run_aimc(args, d, Duration::from_secs(60));
        assert!(
            matches!(code, Some(1) | Some(2)),
            "aimc {args:?}: want a clean error, got status {code:?}\nstdout: {out}\nstderr: {err}"
        );
        assert!(!err.contains("panicked"), "aimc {args:?} panicked: {err}");
        // A bad value is refused before any long work.
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "aimc {args:?} took {:?} to fail",
            start.elapsed()
        );
    }
}

/// Closed stdout ends the program quietly: no panic message, status 0.
#[test]
fn closed_stdout_ends_quietly() {
    let dir = tempfile::TempDir::new().unwrap();
    let out_dir = dir.path().join("drift");
    let out_dir = out_dir.to_str().unwrap();
    for args in [&["info"][..], &["drift", "--out", out_dir][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_aimc"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Close the reading end before the command prints (it loads a model or runs a study
        // first), as `| head -0` would: its first print meets a closed pipe.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "aimc {args:?}: {err}");
        assert!(
            matches!(out.status.code(), Some(0)),
            "aimc {args:?}: status {:?}, stderr {err}",
            out.status
        );
    }
}

/// A checkpoint directory holding the embedded model's files, for subprocess runs.
fn embedded_copy(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/kjv-moe");
    let dst = dir.join("model");
    std::fs::create_dir_all(&dst).unwrap();
    for f in [
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "tokenizer.json",
    ] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dst
}

/// A weight that overflows the forward pass, in a checkpoint that passes every load check, makes
/// `aimc eval --digital` fail naming the stage, rather than print a NaN perplexity.
#[test]
fn a_weight_that_overflows_the_forward_is_an_error_not_a_nan_perplexity() {
    let dir = tempfile::TempDir::new().unwrap();
    let model = embedded_copy(dir.path());
    // Poison the final norm's weight with a huge finite value: logits overflow to ±inf.
    let shard = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    .into_iter()
    .find(|f| {
        let b = std::fs::read(model.join(f)).unwrap();
        split_safetensors(&b).0.get("model.norm.weight").is_some()
    })
    .unwrap();
    let bytes = std::fs::read(model.join(shard)).unwrap();
    let (header, mut data) = split_safetensors(&bytes);
    let t = &header["model.norm.weight"];
    let start = t["data_offsets"][0].as_u64().unwrap() as usize;
    let dtype = t["dtype"].as_str().unwrap();
    let huge: Vec<u8> = match dtype {
        "BF16" => half::bf16::from_f32(3e38).to_le_bytes().to_vec(),
        "F16" => half::f16::from_f32(65504.0).to_le_bytes().to_vec(),
        _ => 3e38f32.to_le_bytes().to_vec(),
    };
    let end = t["data_offsets"][1].as_u64().unwrap() as usize;
    for i in (start..end).step_by(huge.len()) {
        data[i..i + huge.len()].copy_from_slice(&huge);
    }
    std::fs::write(model.join(shard), join_safetensors(&header, &data)).unwrap();
    let m = model.to_str().unwrap();
    let (code, out, err) = run_aimc(
        &["eval", "--digital", "--model", m, "--tokens", "64"],
        dir.path(),
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(1), "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("digital evaluation") && err.contains("not a finite"),
        "{err}"
    );
    assert!(!prints_non_finite(&out), "{out}");
}
