//! Element-wise reduction kernels over raw buffers. Every rank's contribution is combined in rank
//! order (rank 0 first), so a reduction computed by any rank equals the same reference sum; f16
//! and bf16 accumulate in f32 and round once at the end.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::{DType, ReduceOp};

/// Elements per block: the accumulator lives on the stack and every source stays in L1.
const BLOCK: usize = 1024;

trait Elem: Copy + 'static {
    type Acc: Copy + Default;
    fn load(src: &[Self], acc: &mut [Self::Acc]);
    fn combine(src: &[Self], acc: &mut [Self::Acc], op: ReduceOp);
    fn finish(acc: &mut [Self::Acc], op: ReduceOp, world: usize);
    fn store(acc: &[Self::Acc], dst: &mut [Self]);
}

macro_rules! native {
    ($t:ty, $max:expr, $div:expr) => {
        impl Elem for $t {
            type Acc = $t;
            fn load(src: &[Self], acc: &mut [Self]) {
                acc.copy_from_slice(src);
            }
            fn combine(src: &[Self], acc: &mut [Self], op: ReduceOp) {
                match op {
                    ReduceOp::Sum | ReduceOp::Avg => {
                        acc.iter_mut().zip(src).for_each(|(a, s)| *a += *s)
                    }
                    ReduceOp::Max => acc.iter_mut().zip(src).for_each(|(a, s)| *a = $max(*a, *s)),
                }
            }
            fn finish(acc: &mut [Self], op: ReduceOp, world: usize) {
                if op == ReduceOp::Avg {
                    let n = world as $t;
                    acc.iter_mut().for_each(|a| *a = $div(*a, n));
                }
            }
            fn store(acc: &[Self], dst: &mut [Self]) {
                dst.copy_from_slice(acc);
            }
        }
    };
}

native!(f32, f32::max, |a: f32, n: f32| a / n);
native!(f64, f64::max, |a: f64, n: f64| a / n);
native!(i64, std::cmp::max, |a: i64, n: i64| a / n);

macro_rules! half_like {
    ($t:ty) => {
        impl Elem for $t {
            type Acc = f32;
            fn load(src: &[Self], acc: &mut [f32]) {
                src.convert_to_f32_slice(acc);
            }
            fn combine(src: &[Self], acc: &mut [f32], op: ReduceOp) {
                let mut tmp = [0f32; BLOCK];
                let tmp = &mut tmp[..src.len()];
                src.convert_to_f32_slice(tmp);
                <f32 as Elem>::combine(tmp, acc, op);
            }
            fn finish(acc: &mut [f32], op: ReduceOp, world: usize) {
                <f32 as Elem>::finish(acc, op, world);
            }
            fn store(acc: &[f32], dst: &mut [Self]) {
                dst.convert_from_f32_slice(acc);
            }
        }
    };
}

half_like!(f16);
half_like!(bf16);

/// # Safety
/// Every pointer covers `count` elements of `T`; destinations may alias sources only element for
/// element (the same offset), never partially.
unsafe fn run<T: Elem>(
    op: ReduceOp,
    world: usize,
    srcs: &[*const u8],
    dsts: &[*mut u8],
    count: usize,
) {
    let mut acc = [T::Acc::default(); BLOCK];
    let mut done = 0;
    while done < count {
        let n = BLOCK.min(count - done);
        let acc = &mut acc[..n];
        let src = |i: usize| std::slice::from_raw_parts((srcs[i] as *const T).add(done), n);
        T::load(src(0), acc);
        for i in 1..srcs.len() {
            T::combine(src(i), acc, op);
        }
        T::finish(acc, op, world);
        for d in dsts {
            T::store(
                acc,
                std::slice::from_raw_parts_mut((*d as *mut T).add(done), n),
            );
        }
        done += n;
    }
}

/// Reduces `srcs` (in rank order) element-wise into every buffer of `dsts`.
///
/// # Safety
/// Every pointer is valid for `count` elements of `dtype`, aligned for it; a destination may be
/// one of the sources (in place) but must not overlap any other buffer partially.
pub(crate) unsafe fn reduce(
    dtype: DType,
    op: ReduceOp,
    world: usize,
    srcs: &[*const u8],
    dsts: &[*mut u8],
    count: usize,
) {
    debug_assert!(!srcs.is_empty());
    match dtype {
        DType::F32 => run::<f32>(op, world, srcs, dsts, count),
        DType::F64 => run::<f64>(op, world, srcs, dsts, count),
        DType::I64 => run::<i64>(op, world, srcs, dsts, count),
        DType::F16 => run::<f16>(op, world, srcs, dsts, count),
        DType::BF16 => run::<bf16>(op, world, srcs, dsts, count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_in_rank_order_and_averages() {
        let a: Vec<f32> = (0..3000).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..3000).map(|i| 1.0 - i as f32).collect();
        let mut out = a.clone();
        unsafe {
            reduce(
                DType::F32,
                ReduceOp::Avg,
                2,
                &[a.as_ptr().cast(), b.as_ptr().cast()],
                &[out.as_mut_ptr().cast()],
                a.len(),
            );
        }
        for i in 0..a.len() {
            assert_eq!(out[i], (a[i] + b[i]) / 2.0);
        }
    }

    #[test]
    fn half_types_accumulate_in_f32() {
        // 2048 + 1 + 1 in f16 pairwise stays 2048; accumulated in f32 it rounds to 2050.
        let a = vec![f16::from_f32(2048.0); 5];
        let b = vec![f16::from_f32(1.0); 5];
        let c = vec![f16::from_f32(1.0); 5];
        let mut out = vec![f16::ZERO; 5];
        unsafe {
            reduce(
                DType::F16,
                ReduceOp::Sum,
                3,
                &[a.as_ptr().cast(), b.as_ptr().cast(), c.as_ptr().cast()],
                &[out.as_mut_ptr().cast()],
                5,
            );
        }
        assert!(out.iter().all(|x| x.to_f32() == 2050.0), "{out:?}");
        let m = [bf16::from_f32(-3.0), bf16::from_f32(7.0)];
        let n = [bf16::from_f32(5.0), bf16::from_f32(-1.0)];
        let mut o = [bf16::ZERO; 2];
        unsafe {
            reduce(
                DType::BF16,
                ReduceOp::Max,
                2,
                &[m.as_ptr().cast(), n.as_ptr().cast()],
                &[o.as_mut_ptr().cast()],
                2,
            )
        };
        assert_eq!(o.map(|x| x.to_f32()), [5.0, 7.0]);
    }
}
