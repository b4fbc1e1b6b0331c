//! Each kernel of `kernels/score.cu` with its parameter list, written once: a typed launch
//! function per kernel, which is the only way the host code launches it, and the parameters'
//! widths ([`KERNEL_PARAMS`]), which a test holds to the `.param` list of the PTX that NVRTC
//! makes (`the_launchers_match_the_kernels_prototypes`), so an argument added, dropped or
//! widened on one side fails there instead of on a GPU.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::score::THREADS;
use super::{Gpu, GpuError};

/// A launch's grid, `(x, y)`, of [`THREADS`]-thread blocks.
fn launch_config(grid: (usize, usize)) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid.0 as u32, grid.1 as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Declares each kernel's launch function and its parameter widths. A parameter is `input T`
/// (a `const T *`), `output T` (a `T *`) or `value T` (an `int` or `double` by value).
macro_rules! kernels {
    ($($(#[$doc:meta])* fn $name:ident($($arg:ident: $kind:ident $ty:ty),* $(,)?);)*) => {
        $(
            $(#[$doc])*
            #[allow(clippy::too_many_arguments)]
            pub(super) fn $name(gpu: &Gpu, grid: (usize, usize), $($arg: kernels!(@type $kind $ty)),*) -> Result<(), GpuError> {
                let kernel = gpu.score_kernel(stringify!($name))?;
                let mut launch = gpu.stream().launch_builder(&kernel);
                $(kernels!(@push launch $kind $arg);)*
                // SAFETY: the arguments are the kernel's parameters, in order and width
                // (`KERNEL_PARAMS`, checked against the PTX); each kernel bounds its own accesses
                // by the sizes passed with the buffers.
                unsafe { launch.launch(launch_config(grid))? };
                Ok(())
            }
        )*
        /// Each kernel's parameter widths in bytes, in order, as its launch function passes them.
        pub const KERNEL_PARAMS: &[(&str, &[usize])] =
            &[$((stringify!($name), &[$(kernels!(@width $kind $ty)),*])),*];
    };
    (@type input $ty:ty) => { &CudaView<'_, $ty> };
    (@type output $ty:ty) => { &mut CudaViewMut<'_, $ty> };
    (@type value $ty:ty) => { $ty };
    (@push $launch:ident input $arg:ident) => { $launch.arg($arg) };
    (@push $launch:ident output $arg:ident) => { $launch.arg($arg) };
    (@push $launch:ident value $arg:ident) => { $launch.arg(&$arg) };
    (@width input $ty:ty) => { 8 };
    (@width output $ty:ty) => { 8 };
    (@width value $ty:ty) => { std::mem::size_of::<$ty>() };
}

kernels! {
    /// c = a · bᵀ in f32, FMA chains from zero (64 × 64 tiles; grid: column tiles, row tiles).
    fn cosines_f32(a: input f32, b: input f32, c: output f32, rows: value i32, cols: value i32, dim: value i32);
    /// Partial column statistics over the fixed parts a row block meets.
    fn column_stats_partial(
        s: input f32, row0: value i32, rows: value i32, cols: value i32, rows_per_part: value i32,
        first_part: value i32, scale: value f64, inv_tau: value f64, part_max: output f64, part_sum: output f64,
    );
    /// The parts merged into each column's (max, 1/sum).
    fn column_stats_merge(
        part_max: input f64, part_sum: input f64, parts: value i32, cols: value i32, col_max: output f64,
        col_inv_sum: output f64,
    );
    /// Each row's statistics (the symmetric form's V2T prior); one block per row.
    fn row_stats(
        s: input f32, cols: value i32, row0: value i32, scale: value f64, inv_tau: value f64, row_max: output f64,
        row_inv_sum: output f64,
    );
    /// Each matched row's own cosine.
    fn gather_own(s: input f32, rows: value i32, cols: value i32, row0: value i32, group: input i32, own_cosine: output f32);
    /// Each video's best own caption under V2T.
    fn v2t_own(
        own_cosine: input f32, group_start: input i32, group_end: input i32, cols: value i32, mode: value i32,
        scale: value f64, inv_tau: value f64, col_max: input f64, col_inv_sum: input f64, row_max: input f64,
        row_inv_sum: input f64, own_v2t: output f64,
    );
    /// The T2V pass over a row block: ranks and top-k; one block per row.
    fn t2v_apply(
        s: input f32, cols: value i32, row0: value i32, group: input i32, own_cosine: input f32, mode: value i32,
        scale: value f64, inv_tau: value f64, col_max: input f64, col_inv_sum: input f64, k: value i32,
        top_value: output f64, top_column: output i32, rank: output u32,
    );
    /// The V2T count over a row block (grid: column blocks, chunks of whole caption groups).
    fn v2t_count(
        s: input f32, cols: value i32, row0: value i32, group: input i32, chunk_start: input i32, mode: value i32,
        scale: value f64, inv_tau: value f64, col_max: input f64, col_inv_sum: input f64, row_max: input f64,
        row_inv_sum: input f64, own_v2t: input f64, beaten: output u32,
    );
    /// Revised values of a row block, T2V (direction 0) or V2T (1), for `--dense`.
    fn revise_rows(
        s: input f32, rows: value i32, cols: value i32, row0: value i32, direction: value i32, mode: value i32,
        scale: value f64, inv_tau: value f64, col_max: input f64, col_inv_sum: input f64, row_max: input f64,
        row_inv_sum: input f64, out: output f64,
    );
    /// The fused path's pass one (grid: column tiles, parts of the rows).
    fn fused_column_stats(
        t: input u16, v: input u16, rows: value i32, cols: value i32, dim: value i32, rows_per_part: value i32,
        group: input i32, mode: value i32, scale: value f64, inv_tau: value f64, part_max: output f64,
        part_sum: output f64, own_cosine: output f32,
    );
    /// The fused path's row statistics; one block per row block.
    fn fused_row_stats(
        t: input u16, v: input u16, cols: value i32, dim: value i32, block_start: input i32, scale: value f64,
        inv_tau: value f64, row_max: output f64, row_inv_sum: output f64,
    );
    /// The fused path's pass two; one block per row block.
    fn fused_apply(
        t: input u16, v: input u16, cols: value i32, dim: value i32, block_start: input i32, group: input i32,
        own_cosine: input f32, mode: value i32, scale: value f64, inv_tau: value f64, col_max: input f64,
        col_inv_sum: input f64, row_max: input f64, row_inv_sum: input f64, own_v2t: input f64, k: value i32,
        top_value: output f64, top_column: output i32, rank: output u32, beaten: output u32,
    );
}
