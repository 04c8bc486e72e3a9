//! Every kernel file compiles with NVRTC, for every configuration the launchers use, without a
//! GPU: NVRTC needs no driver. When `ptxas` is on `PATH` (or named by `$AIMC_PTXAS`) the PTX is
//! also assembled for sm_90, which checks the inline `mma`/`ldmatrix`/`cp.async` assembly and
//! reports registers and spills.
//!
//! Ignored by default (CI machines have no CUDA); run with `--include-ignored`, where it fails
//! with the reason when libnvrtc cannot be loaded. To run it on a machine without a GPU:
//! `pip download nvidia-cuda-nvrtc==13.0.* nvidia-cuda-nvcc==13.0.*`, unzip both, then
//! `LD_LIBRARY_PATH=<dir>/nvidia/cu13/lib PATH=<dir>/nvidia/cu13/bin:$PATH cargo test --release
//! --test kernels_compile -- --include-ignored --nocapture`.
#![cfg(feature = "cuda")]

use aimc::backend::cuda::compile::{
    compile, KernelFile, KernelPart, FINETUNE_CU, MODEL_CU, MOE_CU, PROGRAM_CU, RNG_CU,
};
use aimc::backend::cuda::gemm::{moe_gemm_variants, moe_gemm_wgmma_variants, GEMM_PARAMS_BYTES};

/// Compute capabilities the kernels must build for: Ampere (mma.sync, cp.async, ldmatrix) and
/// Hopper (the H100 the benchmarks run on).
const ARCHS: [(i32, i32); 2] = [(8, 0), (9, 0)];

/// Size of the first (struct) parameter of `entry` in `ptx`: `.param .align 8 .b8 NAME_param_0[N]`.
fn param_bytes(ptx: &str, entry: &str) -> Option<usize> {
    let key = format!("{entry}_param_0[");
    let at = ptx.find(&key)? + key.len();
    ptx[at..].split(']').next()?.parse().ok()
}

/// Fails the (explicitly requested) test with the reason when NVRTC cannot be loaded.
fn require_nvrtc() {
    // SAFETY: only probes whether the shared library can be loaded.
    let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    assert!(
        present,
        "kernels_compile needs CUDA: libnvrtc was not found on the loader path"
    );
}

fn ptxas() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("AIMC_PTXAS") {
        return Some(p.into());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("ptxas"))
            .find(|p| p.is_file())
    })
}

/// This thread's scratch folder for ptxas (tests run in parallel threads of one process).
fn scratch_dir() -> std::path::PathBuf {
    let thread = format!("{:?}", std::thread::current().id());
    let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
    std::env::temp_dir().join(format!("aimc-ptxas-{}-{thread}", std::process::id()))
}

/// Assemble `ptx` for sm_{cc} into `scratch_dir()/k.cubin`; returns ptxas's `-v` report.
/// Panics with the log on failure.
fn assemble(ptxas: &std::path::Path, ptx: &str, cc: (i32, i32), what: &str) -> String {
    let dir = scratch_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("k.ptx");
    std::fs::write(&src, ptx).unwrap();
    let out = std::process::Command::new(ptxas)
        .arg(format!(
            "-arch=sm_{}{}{}",
            cc.0,
            cc.1,
            if cc == (9, 0) { "a" } else { "" }
        ))
        .arg("-v")
        .arg("-o")
        .arg(dir.join("k.cubin"))
        .arg(&src)
        .output()
        .expect("running ptxas");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "ptxas failed for {what}:\n{log}");
    log
}

fn check(kernel: &KernelFile, defines: &[(&str, i64)], ptxas: Option<&std::path::Path>) {
    check_on(&ARCHS, kernel, defines, ptxas);
}

fn check_on(
    archs: &[(i32, i32)],
    kernel: &KernelFile,
    defines: &[(&str, i64)],
    ptxas: Option<&std::path::Path>,
) {
    for &cc in archs {
        let what = format!("{} {defines:?} sm_{}{}", kernel.file, cc.0, cc.1);
        let ptx = compile(kernel, defines, cc).unwrap_or_else(|e| panic!("{what}: {e}"));
        // The host mirrors of the kernel parameter structs have the size NVRTC lays out.
        for entry in ["moe_gemm", "moe_gemm_wgmma", "moe_analog_wgmma"] {
            if let Some(bytes) = param_bytes(&ptx.to_src(), entry) {
                assert_eq!(bytes, GEMM_PARAMS_BYTES, "{what}: .param of {entry}");
            }
        }
        if let Some(p) = ptxas {
            let log = assemble(p, &ptx.to_src(), cc, &what);
            // Spilling the GEMM accumulators to local memory would cost far more than any
            // arithmetic in the epilogue: the launch bounds must hold them in registers.
            let mut function = "";
            for line in log.lines() {
                if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                    function = rest.split('\'').next().unwrap_or("");
                }
                // Other kernels may keep a few words on the stack around a slow-path call
                // (ptxas did for the CUDA-core bound-management fix-up on sm_80: 12 bytes).
                if let Some(head) = line
                    .split(" bytes spill stores")
                    .next()
                    .filter(|_| line.contains("spill"))
                {
                    let stored: u32 = head
                        .rsplit(", ")
                        .next()
                        .and_then(|n| n.trim().parse().ok())
                        .unwrap_or(u32::MAX);
                    // The GEMMs may not spill, except the mma.sync kernel with every side
                    // accumulator and bound management (PCM_READ, IR drop and the flags: five
                    // f32 sets at the 255-register limit), which keeps 8 bytes on the stack.
                    let everything = ["MOE_PCM_READ", "MOE_IR_DROP", "MOE_BM"]
                        .iter()
                        .all(|d| defines.contains(&(*d, 1)));
                    // The mma.sync kernel's analog variants with output normals but no side
                    // accumulator run 2 CTAs per SM at 128 registers; since the table normal
                    // transform (its shared-memory loads) ptxas keeps up to 64 bytes on the
                    // stack there (sm_90; 4 on sm_80 with bound management).
                    let on = |d: &str| defines.contains(&(d, 1));
                    let normals_at_128 = on("MOE_ANALOG")
                        && (on("MOE_OUT_NOISE") || on("MOE_ADDITIVE"))
                        && !on("MOE_PCM_READ")
                        && !on("MOE_IR_DROP");
                    let limit = match function {
                        "moe_gemm" if everything => 8,
                        "moe_gemm" if normals_at_128 => 64,
                        f if f.starts_with("moe_gemm") || f.starts_with("moe_analog") => 0,
                        _ => 64,
                    };
                    assert!(stored <= limit, "{what} {function}: {line}");
                }
            }
            // ptxas serialises wgmma (and says so) when the accumulators are touched between
            // issue and wait, which would forfeit the async tensor-core path.
            // It also says where it injects a wgmma wait because a path reaches accumulator
            // registers with MMAs in flight (a wait in the main loop would serialise it too).
            // Both come as "ptxas info (C7518) Potential Performance Loss: ...", not as
            // warnings: the analog kernel's first build serialised every wgmma that way and no
            // warning said so.
            for line in log.lines().filter(|l| {
                l.contains("warning") || l.contains("is injected") || l.contains("serialized")
            }) {
                println!("{what}: {line}");
                assert!(
                    !line.contains("serialized") && !line.contains("is injected"),
                    "{what}: {line}"
                );
            }
            let mut function = "";
            for line in log.lines() {
                if let Some(rest) = line.split("entry function '").nth(1) {
                    function = rest.split('\'').next().unwrap_or("");
                } else if line.contains("registers") {
                    println!("{what} {function}: {}", line.trim());
                }
            }
        }
    }
}

#[test]
#[ignore = "needs CUDA (nvcc/NVRTC headers)"]
fn every_kernel_configuration_compiles() {
    require_nvrtc();
    // A fresh cache, so the test compiles rather than reading earlier PTX.
    let cache = std::env::temp_dir().join(format!("aimc-kcache-{}", std::process::id()));
    std::env::set_var("AIMC_CACHE_DIR", &cache);
    let ptxas = ptxas();
    if ptxas.is_none() {
        println!("kernels_compile: ptxas not found, checking NVRTC only");
    }
    let p = ptxas.as_deref();
    check(&RNG_CU, &[], p);
    check(&PROGRAM_CU, &[], p);
    check(&FINETUNE_CU, &[], p);
    check(&MODEL_CU, &[], p);
    check(&MODEL_CU, &[("ATT_DV_SLOTS", 2)], p);
    check(&MOE_CU, &[], p);
    let variants = moe_gemm_variants();
    assert!(variants.len() >= 10, "{} variants", variants.len());
    for defines in &variants {
        check(&MOE_CU, defines, p);
    }
    // The wgmma GEMM (digital, sm_90a only): each output mode and tile shape.
    let wgmma = moe_gemm_wgmma_variants();
    for defines in &wgmma {
        check_on(&[(9, 0)], &MOE_CU, defines, p);
    }
    // One PTX cache entry per (file, defines, architecture), and a second compile reads it.
    let entries = std::fs::read_dir(cache.join("kernels")).unwrap().count();
    assert_eq!(entries, (6 + variants.len()) * ARCHS.len() + wgmma.len());
    let again = compile(&MOE_CU, &variants[0], (9, 0)).unwrap();
    let first = std::fs::read_dir(cache.join("kernels"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .any(|text| text == again.to_src());
    assert!(first, "the second compile did not return the cached PTX");
    let _ = std::fs::remove_dir_all(cache);
}

#[test]
#[ignore = "needs CUDA (nvcc/NVRTC headers)"]
fn compile_errors_show_the_nvrtc_log_and_the_file() {
    require_nvrtc();
    let broken = KernelFile {
        file: "broken.cu",
        parts: &[KernelPart {
            file: "broken.cu",
            text: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }\n",
        }],
        exact_fp: false,
    };
    let err = compile(&broken, &[], (9, 0)).unwrap_err().to_string();
    assert!(err.contains("broken.cu"), "{err}");
    assert!(err.contains("undefined_name"), "{err}");
}

/// The instructions of one kernel in `cubin` as (address, text), from `cuobjdump -sass`.
fn sass(
    cuobjdump: &std::path::Path,
    cubin: &std::path::Path,
    function: &str,
) -> Vec<(u64, String)> {
    let out = std::process::Command::new(cuobjdump)
        .args(["-sass", "-fun", function])
        .arg(cubin)
        .output()
        .expect("running cuobjdump");
    assert!(
        out.status.success(),
        "cuobjdump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix("/*")?;
            let (addr, text) = rest.split_once("*/")?;
            let addr = u64::from_str_radix(addr, 16).ok()?;
            Some((addr, text.split(';').next()?.trim().to_string()))
        })
        .collect()
}

/// The target of a branch instruction `text`, if it is one.
fn branch_target(text: &str) -> Option<u64> {
    let at = text.find("BRA ")?;
    let target = text[at + 4..].split_whitespace().next()?;
    u64::from_str_radix(target.trim_start_matches("0x"), 16).ok()
}

/// Static lane instructions per output and crossbar block of the analog mma.sync GEMM (the
/// Lightning set in SwiGLU mode, 512-row crossbars): the K loop's body from its head to the
/// branch past the epilogue, times the steps per crossbar block, plus the epilogue, over the
/// 32 outputs a thread holds. Returns (K loop, epilogue).
fn mma_counts(ins: &[(u64, String)], steps_per_block: usize) -> (f64, f64) {
    let first_mma = ins.iter().position(|(_, t)| t.starts_with("HMMA")).unwrap();
    let last_mma = ins
        .iter()
        .rposition(|(_, t)| t.starts_with("HMMA"))
        .unwrap();
    let skip = (last_mma..ins.len())
        .find(|&i| branch_target(&ins[i].1).is_some())
        .unwrap();
    // The loop's back edge: the first later branch to an address before the MMAs, past the
    // prologue.
    let (back, head) = (skip + 1..ins.len())
        .find_map(|i| {
            let to = branch_target(&ins[i].1)?;
            (to < ins[first_mma].0 && to > ins[0].0 + 0x400).then_some((i, to))
        })
        .unwrap();
    let head = ins.iter().position(|(a, _)| *a == head).unwrap();
    let outputs = 32.0;
    (
        (skip + 1 - head) as f64 * steps_per_block as f64 / outputs,
        (back - skip) as f64 / outputs,
    )
}

/// The analog epilogue's instruction budget, from the SASS ptxas makes for sm_90a: a
/// regression guard on the per-output work that bounds the analog layer's speed (it issues,
/// not its MMAs, limit it), and the source of the counts in `docs/gpu.md`. Needs NVRTC, ptxas
/// and cuobjdump (with nvdisasm) on PATH; prints the counts.
#[test]
#[ignore = "needs CUDA (NVRTC, ptxas, cuobjdump)"]
fn analog_epilogue_instruction_budget() {
    use aimc::backend::cuda::gemm::{analog_wgmma_defines, analog_wgmma_tile_of, gemm_defines};
    use aimc::backend::cuda::gemm::{GemmOutput, GemmTile, GemmVariant, WgmmaTile};
    require_nvrtc();
    let ptxas = ptxas().expect("ptxas on PATH");
    let cuobjdump = ptxas.with_file_name("cuobjdump");
    assert!(cuobjdump.is_file(), "cuobjdump beside ptxas");
    let lightning = GemmVariant::lightning(GemmOutput::SwiGlu);
    let dir = scratch_dir();
    let cubin = dir.join("k.cubin");
    let build = |defines: &[(&str, i64)], function: &str, label: &str| {
        let ptx = compile(&MOE_CU, defines, (9, 0)).unwrap();
        assemble(&ptxas, &ptx.to_src(), (9, 0), function);
        let ins = sass(&cuobjdump, &cubin, function);
        // AIMC_SASS_DIR=dir keeps the listing for reading (dir/<function>-<label>.sass).
        if let Some(out) = std::env::var_os("AIMC_SASS_DIR") {
            let text: String = ins.iter().map(|(a, t)| format!("{a:06x} {t}\n")).collect();
            std::fs::write(
                std::path::Path::new(&out).join(format!("{function}-{label}.sass")),
                text,
            )
            .unwrap();
        }
        ins
    };
    // mma.sync, on the tile 512-row crossbars get (64 columns of K per stage, 8 stages per
    // block) and on the 32-column one that other crossbars get.
    let mma = |tile: GemmTile| {
        let ins = build(
            &gemm_defines(&lightning, tile),
            "moe_gemm",
            &format!("k{}", tile.k_step),
        );
        let (k_loop, epilogue) = mma_counts(&ins, 512 / tile.k_step);
        println!(
            "mma.sync, {} columns of K per stage: K loop {k_loop:.1} + epilogue {epilogue:.1} = {:.1} lane instructions per output and crossbar block",
            tile.k_step,
            k_loop + epilogue
        );
        (k_loop, epilogue)
    };
    let (k_loop, epilogue) = mma(GemmTile::for_k_block(&lightning, 512));
    let (short_loop, short_epilogue) = mma(GemmTile::for_variant(&lightning));
    // wgmma: one crossbar block of 512 rows, per output of this thread (cols / 2 of them): 8
    // steps of the block loop (loads, barrier, wgmma issue and wait), from its head to the back
    // edge after the wgmma wait, and cols / 16 passes of the periphery's fragment-pair loop
    // nested in it (the 128-column tile's steps take one pair each, the 64-column tile's one
    // every other step).
    let wgmma = |tile: WgmmaTile| {
        let cols = tile.cols;
        let ins = build(
            &analog_wgmma_defines(&lightning, tile, 512, 0),
            "moe_analog_wgmma",
            &tile.describe(),
        );
        // The step's wait (wait_group 1 with `pipe` 1, else 0) is the first one followed by
        // the loop's back edge.
        let wait = format!(
            "WARPGROUP.DEPBAR.LE gsb0, 0x{}",
            usize::from(tile.pipe == 1)
        );
        let (back, head) = (0..ins.len())
            .filter(|&i| ins[i].1.starts_with(&wait))
            .find_map(|w| {
                (w..(w + 8).min(ins.len())).find_map(|i| {
                    branch_target(&ins[i].1)
                        .filter(|&to| to < ins[w].0)
                        .map(|to| (i, to))
                })
            })
            .unwrap();
        let head = ins.iter().position(|(a, _)| *a == head).unwrap();
        // The pair loop: the backward branch inside the step loop that stays inside it (none
        // where each step takes exactly one pair: the loop body is then the step's). The pair
        // loop's set-up counts on every step, also those that take no pair: an upper bound.
        // The longest such loop: barrier waits spin in loops of two or three instructions.
        let inner = (head..back)
            .filter_map(|i| {
                let to = branch_target(&ins[i].1)?;
                (to > ins[head].0 && to < ins[i].0)
                    .then(|| i + 1 - ins.iter().position(|(a, _)| *a == to).unwrap())
            })
            .max()
            .unwrap_or(0);
        let outer = back + 1 - head - inner;
        // With TMA stages (pipe 2) one thread issues the copies: the block that the other
        // threads branch around (a forward branch within the step over the TMA instructions)
        // runs in one warp of the CTA's 8, so it counts 1/8 per thread.
        let leader = (head..back)
            .find_map(|i| {
                let to = branch_target(&ins[i].1).filter(|&to| to > ins[i].0)?;
                let end = ins.iter().position(|(a, _)| *a == to)?;
                (end <= back
                    && ins[i + 1..end]
                        .iter()
                        .any(|(_, op)| op.starts_with("UTMALDG")))
                .then_some(end - i - 1)
            })
            .unwrap_or(0);
        let step = outer as f64 - leader as f64 * 7.0 / 8.0;
        let passes = if inner == 0 { 0 } else { cols / 16 };
        let per_output = (8.0 * step + (passes * inner) as f64) / (cols / 2) as f64;
        println!(
            "wgmma, {cols} columns, pipe {}: step {step:.1} + fragment pair {inner} = \
             {per_output:.1} lane instructions per output and crossbar block",
            tile.pipe
        );
        per_output
    };
    // The 64-column tile on cp.async stages (the default) and on TMA stages.
    let wgmma_narrow = wgmma(analog_wgmma_tile_of(64, 512).unwrap());
    let wgmma_tma = wgmma(WgmmaTile::new(64, 3, 2));
    let wgmma = wgmma(analog_wgmma_tile_of(128, 512).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
    // The budget: ptxas 13.5 gives 30.2 + 48.0 at 64 columns per stage, 45.0 + 48.1 at 32
    // (ptxas 13.0: 30.0 + 49.1, 44.5 + 49.1). Before the straight-line rows and the single ADC
    // clamp they were 33.8 + 52.9 and 47.0 + 52.6; before the epilogue diet 47.5 + 65.3. The
    // wgmma kernel, counted per block as above (ptxas 13.5): 57.5 on the 128-column tile and
    // 77.1 on the 64-column one (steps of 460 and 121 instructions, fragment pairs of 375),
    // where recomputing each copy's destination and each wgmma's descriptors per step gave
    // 62.0 and 88.0 (steps of 496 and 165).
    assert!(
        short_loop + short_epilogue < 98.0,
        "mma.sync, 32 columns per stage: {:.1}",
        short_loop + short_epilogue
    );
    assert!(
        k_loop + epilogue < 84.0,
        "mma.sync, 64 columns per stage: {:.1}",
        k_loop + epilogue
    );
    assert!(
        epilogue.max(short_epilogue) < 53.0,
        "mma.sync epilogue: {epilogue:.1}"
    );
    assert!(wgmma < 60.0, "wgmma: {wgmma:.1}");
    assert!(wgmma_narrow < 80.0, "wgmma, 64 columns: {wgmma_narrow:.1}");
    assert!(
        wgmma_tma < 70.0,
        "wgmma, 64 columns, TMA stages: {wgmma_tma:.1}"
    );
}
