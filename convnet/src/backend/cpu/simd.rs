//! Plain Rust loops compiled for the CPU they run on.
//!
//! The library is built for the baseline x86-64 target (SSE2), so that one binary runs
//! everywhere; its element-wise loops (batch norm, activations, optimizer steps) would then
//! move 4 floats per instruction on machines that can move 16. `vectorized_fn!` defines a
//! function whose body is compiled twice, once with AVX-512 code generation, and picks the
//! copy at run time. Results are identical either way: the same IEEE operations in the same
//! order (Rust never contracts `a * b + c` into a fused multiply-add on its own).

/// True when the CPU has the AVX-512 subsets that `vectorized_fn!` compiles for.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("fma")
}

/// False off x86-64: the plain copy always runs.
#[cfg(not(target_arch = "x86_64"))]
#[inline]
pub fn has_avx512() -> bool {
    false
}

/// Defines `fn name(args) -> ret { body }` whose body also exists compiled for AVX-512,
/// taken when [`has_avx512`] holds. The body should be a self-contained loop over slices;
/// helpers it calls should be `#[inline(always)]` so they are compiled into both copies.
macro_rules! vectorized_fn {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::backend::cpu::simd::has_avx512() {
                // SAFETY: the CPU has every feature `wide` is compiled for.
                return unsafe { wide($($arg),*) };
            }
            body($($arg),*)
        }
    };
}
pub(crate) use vectorized_fn;

#[cfg(test)]
mod tests {
    vectorized_fn! {
        fn affine(x: &[f32], out: &mut [f32]) {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * 1.7 + 0.3;
            }
        }
    }

    #[test]
    fn gives_the_same_bits_as_the_plain_loop() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut fast = vec![0f32; x.len()];
        affine(&x, &mut fast);
        let plain: Vec<f32> = x.iter().map(|&v| v * 1.7 + 0.3).collect();
        assert_eq!(fast, plain);
    }
}
