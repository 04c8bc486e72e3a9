//! The quality gates of the table normal transform (docs/model.md §6): exact moments and tail
//! probabilities of the table over all 2³² words, the same gates on 2²⁷ Philox draws, exact
//! values of single words against an independent f64 inverse, and the word → segment layout.
use aimc::rng::normal::{segment_words, NormalTable, SEGMENTS};
use aimc::rng::{normal_from_word, Purpose, Stream};
use rayon::prelude::*;

/// P(|Z| > t) of the exact standard normal for t = 1, 2, 3, 4, 4.5 (erfc(t/√2), 16 digits).
const TAILS: [(f64, f64); 5] = [
    (1.0, 0.317_310_507_862_914_15),
    (2.0, 0.045_500_263_896_358_42),
    (3.0, 0.002_699_796_063_260_186_6),
    (4.0, 6.334_248_366_623_996e-5),
    (4.5, 6.795_346_249_460_121e-6),
];

/// Relative tail tolerance of §6: 2 % up to t = 4, 10 % at 4.5.
fn tail_tolerance(t: f64) -> f64 {
    if t > 4.0 {
        0.10
    } else {
        0.02
    }
}

/// Σ_{i<n} i^k for k = 0..=4 (Faulhaber), in f64.
fn power_sums(n: f64) -> [f64; 5] {
    let m = n - 1.0;
    [
        n,
        m * n / 2.0,
        m * n * (2.0 * m + 1.0) / 6.0,
        (m * n / 2.0).powi(2),
        m * n * (2.0 * m + 1.0) * (3.0 * m * m + 3.0 * m - 1.0) / 30.0,
    ]
}

/// E z^k (k = 2, 4) and P(|z| > t) over all 2³² words, from the table and the segment layout
/// (each segment: `words` words per sign, frac = i/levels evenly).
fn exact_statistics(t: &NormalTable) -> (f64, f64, Vec<f64>) {
    let (mut m2, mut m4) = (0.0, 0.0);
    let mut tails = vec![0.0; TAILS.len()];
    for i in 0..t.a.len() {
        let s = segment_words(i / SEGMENTS, i % SEGMENTS);
        if s.words == 0 {
            continue;
        }
        let (a, b) = (f64::from(t.a[i]), f64::from(t.b[i]));
        let l = s.levels as f64;
        let ps = power_sums(l);
        let ef: Vec<f64> = (0..5).map(|k| ps[k] / l.powi(k as i32) / l).collect();
        // E (a + b f)^k by the binomial expansion.
        let binom = [
            [1.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, 2.0, 1.0, 0.0, 0.0],
            [1.0, 4.0, 6.0, 4.0, 1.0],
        ];
        let moment = |k: usize, row: usize| -> f64 {
            (0..=k)
                .map(|j| binom[row][j] * a.powi((k - j) as i32) * b.powi(j as i32) * ef[j])
                .sum()
        };
        let w = s.words as f64;
        m2 += w * moment(2, 1);
        m4 += w * moment(4, 2);
        for (slot, (thr, _)) in tails.iter_mut().zip(TAILS) {
            // Levels i with a + b·i/l > thr: i > x for b > 0, i < x for b < 0.
            let x = (thr - a) / b * l;
            let above = if b == 0.0 {
                if a > thr {
                    l
                } else {
                    0.0
                }
            } else if b > 0.0 {
                l - (x.floor() + 1.0).clamp(0.0, l)
            } else {
                x.ceil().clamp(0.0, l)
            };
            *slot += w * above / l;
        }
    }
    let words = 2f64.powi(31);
    (
        m2 / words,
        m4 / words,
        tails.into_iter().map(|c| c / words).collect(),
    )
}

#[test]
fn table_meets_the_quality_gates_exactly_over_all_words() {
    let t = NormalTable::get();
    let (m2, m4, tails) = exact_statistics(t);
    println!(
        "exact over 2^32 words: E z² − 1 = {:.2e}, E z⁴ − 3 = {:.2e}",
        m2 - 1.0,
        m4 - 3.0
    );
    for ((thr, want), got) in TAILS.iter().zip(&tails) {
        println!(
            "P(|z| > {thr}) = {got:.6e} (exact normal {want:.6e}, {:+.3} %)",
            100.0 * (got / want - 1.0)
        );
    }
    assert!((m2 - 1.0).abs() < 1e-6, "E z² = {m2} (residual folded in)");
    assert!((m4 - 3.0).abs() < 5e-3, "E z⁴ = {m4}");
    for ((thr, want), got) in TAILS.iter().zip(&tails) {
        let rel = (got / want - 1.0).abs();
        assert!(
            rel < tail_tolerance(*thr),
            "P(|z| > {thr}) = {got:e} vs {want:e}"
        );
    }
    // The largest |z|: octave 30's one entry (frac 0), which the words m = 0 and 1 take.
    let max = t.a.iter().fold(0.0f32, |m, &a| m.max(a));
    println!("largest |z| {max}");
    assert_eq!(max, t.a[30 * SEGMENTS]);
    assert!(max >= 5.5, "largest |z| {max}");
}

/// The segment layout the exact statistics rely on: every word of the deep octaves (m < 2²²)
/// and a stride through the rest lands on its segment's line at frac = its level.
#[test]
fn every_word_lands_on_its_segment_line() {
    let t = NormalTable::get();
    let mut starts: Vec<(u64, usize)> = (0..t.a.len())
        .map(|i| (segment_words(i / SEGMENTS, i % SEGMENTS), i))
        .filter(|(s, _)| s.words > 0)
        .map(|(s, i)| (s.first_m, i))
        .collect();
    starts.sort_unstable();
    let check = |m: u32| {
        let k = starts.partition_point(|&(first, _)| first <= u64::from(m)) - 1;
        let i = starts[k].1;
        let s = segment_words(i / SEGMENTS, i % SEGMENTS);
        let offset = u64::from(m) - s.first_m;
        assert!(offset < s.words.max(1), "word {m:#x} outside its segment");
        let frac = (offset / (s.words / s.levels)) as f32 / s.levels as f32;
        let want = frac.mul_add(t.b[i], t.a[i]);
        for sign in [0, 0x8000_0000] {
            let got = normal_from_word(m | sign);
            let want = if sign == 0 { want } else { -want };
            assert_eq!(got.to_bits(), want.to_bits(), "word {:#x}", m | sign);
        }
    };
    (0..1u32 << 22).for_each(check);
    (0..1u32 << 31).step_by(4099).for_each(check);
}

/// Q(z) = P(Z > z) by Simpson's rule on φ over [z, z + 16] (independent of the library's erfc).
fn tail_by_quadrature(z: f64) -> f64 {
    let n = 40_000;
    let h = 16.0 / n as f64;
    let phi = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let mut s = phi(z) + phi(z + 16.0);
    for k in 1..n {
        s += phi(z + k as f64 * h) * if k % 2 == 1 { 4.0 } else { 2.0 };
    }
    s * h / 3.0
}

/// |z| of word magnitude m exactly: Q(|z|) = u/2, u = (m + ½)·2⁻³¹, by bisection.
fn exact_abs_z(m: u32) -> f64 {
    let q = (f64::from(m) + 0.5) * 2f64.powi(-31) / 2.0;
    let (mut lo, mut hi) = (0.0, 8.0);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if tail_by_quadrature(mid) > q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Single words against the exact inverse: within 3e-4 where a segment holds ≥ 2¹⁶ words
/// (|z| up to 4.6; the fit error plus the 1e-5 second-moment fold), within 0.1 in the five
/// deepest octaves, where one entry serves one or two words.
#[test]
fn single_words_match_the_exact_inverse() {
    let words = [
        0x7FFF_FFFFu32, // u → 1: z ≈ 0
        0x4000_0000,    // u = ½: z = Φ⁻¹(0.75) ≈ 0.674
        0x1234_5678,
        0x0ABC_DEF1,
        0x0100_0000,
        0x0003_FFFF,
        0x0000_1000,
        0x0000_0007,
        0x0000_0001,
        0x0000_0000,
    ];
    for m in words {
        let want = exact_abs_z(m);
        let deep = m < 1 << 4;
        let tol = if m >= 1 << 20 {
            3e-4
        } else if deep {
            0.1
        } else {
            2e-3
        };
        for sign in [0u32, 0x8000_0000] {
            let got = f64::from(normal_from_word(m | sign));
            let want = if sign == 0 { want } else { -want };
            assert!(
                (got - want).abs() < tol,
                "word {:#x}: {got} vs {want}",
                m | sign
            );
        }
    }
}

/// The §6 gates on 2²⁷ normals of one Philox stream: mean within 5 standard errors, E z² and
/// E z⁴ within the gates, tails within the relative gate plus 4 sampling standard errors,
/// max |z| ≥ 5.5 (about 5 draws beyond 5.5 are expected).
#[test]
fn philox_draws_meet_the_quality_gates() {
    const CHUNK: usize = 1 << 16;
    let n = 1usize << 27;
    let s = Stream::new(0x5EED, Purpose::TestData, 11);
    #[derive(Clone, Copy, Default)]
    struct Acc {
        m1: f64,
        m2: f64,
        m4: f64,
        tails: [u64; 5],
        max: f32,
    }
    let acc = (0..n / CHUNK)
        .into_par_iter()
        .map(|c| {
            let mut z = vec![0.0f32; CHUNK];
            s.fill_normal((c * CHUNK) as u64, 0, 0, &mut z);
            let mut a = Acc::default();
            for &v in &z {
                let x = f64::from(v);
                let x2 = x * x;
                a.m1 += x;
                a.m2 += x2;
                a.m4 += x2 * x2;
                for (k, (t, _)) in TAILS.iter().enumerate() {
                    a.tails[k] += u64::from(x.abs() > *t);
                }
                a.max = a.max.max(v.abs());
            }
            a
        })
        .reduce(Acc::default, |mut a, b| {
            a.m1 += b.m1;
            a.m2 += b.m2;
            a.m4 += b.m4;
            for k in 0..5 {
                a.tails[k] += b.tails[k];
            }
            a.max = a.max.max(b.max);
            a
        });
    let nf = n as f64;
    let (mean, m2, m4) = (acc.m1 / nf, acc.m2 / nf, acc.m4 / nf);
    println!(
        "2^27 draws: mean {mean:.2e}, E z² − 1 = {:.2e}, E z⁴ − 3 = {:.2e}, max |z| {}",
        m2 - 1.0,
        m4 - 3.0,
        acc.max
    );
    assert!(mean.abs() < 5.0 / nf.sqrt(), "mean {mean}");
    assert!((m2 - 1.0).abs() <= 5e-4, "E z² {m2}");
    assert!((m4 - 3.0).abs() <= 5e-3, "E z⁴ {m4}");
    for (k, (t, p)) in TAILS.iter().enumerate() {
        let got = acc.tails[k] as f64 / nf;
        let sampling = (p * (1.0 - p) / nf).sqrt() / p;
        let rel = (got / p - 1.0).abs();
        assert!(
            rel < tail_tolerance(*t) + 4.0 * sampling,
            "P(|z| > {t}) = {got:e} vs {p:e}"
        );
    }
    assert!(acc.max >= 5.5, "max |z| {}", acc.max);
}
