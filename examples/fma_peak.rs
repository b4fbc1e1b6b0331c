//! The machine's f32 multiply-add peak, measured: the figure `benchmarks/RESULTS.md` states each
//! side's share of.
//!
//! `cargo run --release --example fma_peak -- [THREADS] [SECONDS]` runs, on each of THREADS
//! threads (default: one per core), chains of fused multiply-adds that never wait on memory and
//! never on each other: 16 independent accumulators, more than the FMA units' latency × count
//! (Zen 3: 4 cycles × 2 units; Sapphire Rapids: 4 × 2 at 512 bits), so every unit issues one
//! FMA a cycle. The vectors are the widest the CPU has, chosen at run time (AVX-512F: 16 lanes,
//! else AVX2 + FMA: 8 lanes), as the BLAS kernels choose theirs. An FMA counts two FLOPs. It
//! prints GFLOP/s for the whole machine and per thread, the best of three timed spells after a
//! warm-up (the clock settles under load), so it is what the cores deliver while busy, turbo
//! and all, not a datasheet figure. Where the CPU has AVX-512 BF16 it also measures the bf16
//! products' instruction, `vdpbf16ps`, the same way: the peak of `--dtype bf16` there.

use std::time::Instant;

/// Independent accumulators per thread: enough to cover latency × units on the CPUs above.
const CHAINS: usize = 16;
/// FMAs per chain between two reads of the clock.
const STEPS: u64 = 1 << 22;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |t| t.parse().expect("THREADS must be a whole number"),
    );
    let seconds: f64 = args.get(2).map_or(2.0, |s| s.parse().expect("SECONDS must be a number"));
    let (lanes, name) = widest_fma();
    println!("vectors: {name} ({lanes} f32 lanes), {CHAINS} chains a thread, {threads} threads");
    let _ = spell(threads, lanes, 0.5, chains); // warm-up: let the clock settle under load
    let best = (0..3).map(|_| spell(threads, lanes, seconds / 3.0, chains)).fold(0.0, f64::max);
    println!("peak_gflops={best:.1} per_thread_gflops={:.1} threads={threads} lanes={lanes}", best / threads as f64);
    if vtr_index::matmul::bf16::cpu_has_avx512_bf16() {
        // `vdpbf16ps`: per 32-bit lane, two bf16 products added onto an f32, four FLOPs; the
        // same chains of the bf16 products' instruction.
        let best = (0..3).map(|_| spell(threads, 32, seconds / 3.0, bf16_chains)).fold(0.0, f64::max);
        println!("bf16_peak_gflops={best:.1} per_thread_gflops={:.1} (vdpbf16ps, 512 bits)", best / threads as f64);
    }
}

/// `bf16_chains`' FLOPs per chain step match `chains`' at 32 "lanes": 16 lanes × 2 products.
fn bf16_chains(_lanes: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: called only where the CPU has AVX-512 BF16.
    unsafe {
        x86::chains_bf16()
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

/// GFLOP/s of all threads together over about `seconds`.
fn spell(threads: usize, lanes: usize, seconds: f64, chains: fn(usize) -> f32) -> f64 {
    let started = Instant::now();
    let flops: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(move || {
                    let mut steps = 0u64;
                    let mut sink = 0f32;
                    while started.elapsed().as_secs_f64() < seconds {
                        sink += chains(lanes);
                        steps += STEPS;
                    }
                    std::hint::black_box(sink);
                    steps * (CHAINS * lanes * 2) as u64
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("a worker panicked")).sum()
    });
    flops as f64 / started.elapsed().as_secs_f64() / 1e9
}

fn widest_fma() -> (usize, &'static str) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return (16, "AVX-512F");
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return (8, "AVX2 + FMA");
        }
    }
    (1, "scalar f32::mul_add")
}

/// `STEPS` multiply-adds on each of `CHAINS` accumulators of `lanes` lanes; returns a value that
/// depends on all of them, so none is optimised away. `a` below 1 and `b` small keep every
/// accumulator near `b / (1 - a)`, never overflowing or becoming subnormal.
fn chains(lanes: usize) -> f32 {
    let (a, b) = (std::hint::black_box(0.999_9f32), std::hint::black_box(1e-4f32));
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: each is called only where `widest_fma` found its features.
        match lanes {
            16 => return unsafe { x86::chains_avx512(a, b) },
            8 => return unsafe { x86::chains_avx2(a, b) },
            _ => {}
        }
    }
    let mut acc = [0f32; CHAINS];
    for _ in 0..STEPS {
        for v in &mut acc {
            *v = v.mul_add(a, b);
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CHAINS, STEPS};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn chains_avx2(a: f32, b: f32) -> f32 {
        let (a, b) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for _ in 0..STEPS {
            for v in &mut acc {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut lanes = [0f32; 8];
        let sum = acc.iter().fold(_mm256_setzero_ps(), |s, &v| _mm256_add_ps(s, v));
        // SAFETY: `lanes` holds 8 f32s.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        lanes.iter().sum()
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn chains_avx512(a: f32, b: f32) -> f32 {
        let (a, b) = (_mm512_set1_ps(a), _mm512_set1_ps(b));
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..STEPS {
            for v in &mut acc {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, &v| _mm512_add_ps(s, v)))
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn chains_bf16() -> f32 {
        // Pairs of tiny bf16 values (2⁻²⁰ each): the accumulators grow by 2⁻³⁹ a step.
        let tiny: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(0x3580_3580)) };
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..STEPS {
            for v in &mut acc {
                *v = _mm512_dpbf16_ps(*v, tiny, tiny);
            }
        }
        _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, &v| _mm512_add_ps(s, v)))
    }
}
