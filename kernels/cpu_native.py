"""The fast CPU paths of `overlap.kernels`: int8 row quantisation and the weighted combine, in C.

Owns the compiled twins of `quant.quantize_rows` / `quant.quantize_packed` and
`combine.weighted_combine` for CPU tensors, nothing else: no validation (the public functions and the
ops validate), no choice of device (`quant` and `combine` ask `available()` first).

Why C. The torch reference makes one pass over memory per operation (gather, widen, abs, amax,
multiply, round, clamp, cast), each through a freshly allocated fp32 tensor of the whole call, so it
ran at 0-10 % of `copy_`. The functions below make one pass per row: the row is read into L1, its
abs-max found, then it is scaled, rounded and stored (quantize); each token's K rows are summed into
fp32 accumulators held in registers, 32 columns at a time, and cast once (combine).

Bit-equality. Each function computes the reference's expression in its order, in fp32:

    quantize: xf = float(row) [* smooth]; amax = max |xf|; d = 127 / amax (a true division);
              q = int8(clamp(rint(xf * d), -128, 127)); scale = 1 / d; a zero row: d = 1, scale 0.
    combine:  acc = 0 + w[0] * float(row_0); acc += w[k] * float(row_k) for k ascending; then
              acc += float(shared row) for each; then acc += float(extra); then one cast.

It is compiled with `-ffp-contract=off` (no fused multiply-add) and without fast-math, so every
operation rounds as torch's does. The int8 rounding is half to even by the `v + 1.5 * 2^23`
identity, exact because |xf * d| <= 127.00002 (no clamp needed); a row so small that 127 / amax
overflows takes a clamped path and saturates as the reference does. The fp32 -> bf16 cast is c10's
round half to even. The abs-max compares bit patterns (for non-negative floats the unsigned order is the
numeric order, and a NaN sorts above infinity, so it propagates as `torch.amax` does). NaN inputs
give NaN scales and sums, as the reference; the int8 value of a NaN is unspecified in both.
tests/test_kernels_cpu.py checks every path against the reference on irregular shapes.

Build. The first call on a machine compiles `SOURCE` with the C compiler (`$CC`, else `cc`/`gcc`),
`-O3 -march=native -fopenmp`, in about half a second, into a cache folder (`$OVERLAP_CACHE_DIR`,
else `$XDG_CACHE_HOME/overlap`, else `~/.cache/overlap`) under a name hashing the source, the flags
and the CPU's feature flags; later processes load that file (milliseconds). Concurrent first calls
(ranks starting together) each write a private file and rename it into place. Threads: OpenMP over
rows, `torch.get_num_threads()` of them; the process already holds torch's libgomp, so the kernels
share torch's thread pool. ctypes releases the GIL for the call.

Off switch and fallbacks. `OVERLAP_CPU_COMPILE=0` never compiles (the reference runs). With no C
compiler the reference runs, silently; a compiler without OpenMP builds a one-thread library; a
failed build or load turns the path off for the process with one warning. Dtypes other than bf16,
fp16 and fp32, or mixed dtypes among rows, `extra` and `out`, take the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#define PARALLEL_MIN (1 << 16) /* elements below which one thread does the call */
/* rows (tokens) split evenly over the threads; `bad` counts rows whose index is out of range */
#define OMP_ROWS \
    _Pragma("omp parallel for schedule(static) num_threads(num_threads) if(work >= PARALLEL_MIN) reduction(+:bad)")
/* Both kernels gather rows in an order the hardware prefetcher cannot guess. When the source is
 * larger than the caches hold (these sizes, measured on a 2-core AMD EPYC), each row or token asks
 * for the next one's rows while it is computed (quantize: the whole next row at once; combine: one
 * line of each next row per 32 columns): 10-50 % faster from memory, up to 30 % slower from cache,
 * hence the thresholds. */
#define PREFETCH(p) __builtin_prefetch(p)
#define PREFETCH_MIN_BYTES (2 << 20)
#define COMBINE_PREFETCH_MIN_BYTES (8 << 20)

/* 16 lanes of 32 bits (GCC/Clang vector extensions: one AVX-512 register, two AVX2 ones) */
#define L 16
typedef float vf __attribute__((vector_size(4 * L)));
typedef uint32_t vu __attribute__((vector_size(4 * L)));
typedef uint16_t vh __attribute__((vector_size(2 * L)));
typedef int16_t vw __attribute__((vector_size(4 * L))); /* 2 * L int16 */
typedef int8_t vq __attribute__((vector_size(2 * L)));  /* 2 * L int8 */

static inline vf as_vf(vu u) { vf f; memcpy(&f, &u, sizeof f); return f; }
static inline vu as_vu(vf f) { vu u; memcpy(&u, &f, sizeof u); return u; }
static inline float as_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t as_u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* Scalar and L-lane loads widen to fp32 exactly; stores round half to even (bf16 as c10::BFloat16,
 * NaN -> 0x7FC0; fp16 by the compiler's conversion, which rounds half to even). */
static inline float load1_bf16(const uint16_t *p) { return as_f((uint32_t)*p << 16); }
static inline void store1_bf16(uint16_t *p, float f) {
    uint32_t u = as_u(f);
    *p = (uint16_t)(f != f ? 0x7FC0u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline float load1_f16(const _Float16 *p) { return (float)*p; }
static inline void store1_f16(_Float16 *p, float f) { *p = (_Float16)f; }
static inline vf load_f16(const _Float16 *p) {
    vf v;
    for (int i = 0; i < L; ++i) v[i] = (float)p[i];
    return v;
}
static inline void store_f16(_Float16 *p, vf v) {
    for (int i = 0; i < L; ++i) p[i] = (_Float16)v[i];
}
static inline float load1_f32(const float *p) { return *p; }
static inline void store1_f32(float *p, float f) { *p = f; }
static inline vf load_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store_f32(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* bf16 in pairs: 2 * L values read as L 32-bit words. A word's even value widens to fp32 as
 * `word << 16`, its odd value as `word & 0xFFFF0000`, so widening and narrowing need no shuffle. */
static inline vu load_pairs(const uint16_t *p) { vu w; memcpy(&w, p, sizeof w); return w; }
static inline vf even(vu w) { return as_vf(w << 16); }
static inline vf odd(vu w) { return as_vf(w & 0xFFFF0000u); }
static inline vu round_bf16(vf f) { /* the bf16 bits of f in the high half, as store1_bf16 */
    vu u = as_vu(f), nan = (vu)(f != f);
    return ((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u & ~nan) | (0x7FC00000u & nan);
}
static inline void store_pairs(uint16_t *p, vf e, vf o) {
    vu w = round_bf16(o) | (round_bf16(e) >> 16);
    memcpy(p, &w, sizeof w);
}

/* round half to even for |v| < 2^22: v + 1.5 * 2^23 has a spacing of 1, so the addition rounds v
 * to an integer, ties to even, and that integer is the sum's bit pattern minus 1.5 * 2^23's.
 * Here |v| <= 127.00002 (|x| <= amax, d <= 127 / amax * (1 + 2^-24)) while d is finite, so no clamp
 * is needed; a NaN or infinite input gives an unspecified int8 (the reference's is unspecified too). */
#define MAGIC 12582912.0f
#define MAGIC_BITS 0x4B400000u
static inline int8_t quant1(float v) { return (int8_t)(int32_t)(as_u(v + MAGIC) - MAGIC_BITS); }
/* A row whose amax is below 127 / FLT_MAX has d = inf and x * d = ±inf: the reference's clamp then
 * gives 127 or -128 (and 0 * inf = NaN an unspecified value); such rows take this slow path. */
static inline int8_t quant_clamped(float v) {
    v = v != v ? 0.0f : v < -128.0f ? -128.0f : v > 127.0f ? 127.0f : v;
    return (int8_t)(int32_t)rintf(v);
}
static inline vu quant_pairs(vf v) { return as_vu(v + MAGIC) - MAGIC_BITS; }

/* amax bits of a row: max |x| compared as unsigned bit patterns (for non-negative floats the
 * unsigned order is the numeric order, and a NaN sorts above infinity, so it propagates as
 * torch.amax does); plain loops, which the compiler turns into vector max reductions */
static inline uint32_t amax_bf16(const uint16_t *src, int64_t h) {
    uint16_t m = 0;
    for (int64_t j = 0; j < h; ++j) {
        uint16_t b = src[j] & 0x7FFFu;
        m = b > m ? b : m;
    }
    return (uint32_t)m << 16;
}
static inline uint32_t amax_f16(const _Float16 *src, int64_t h) {
    uint32_t m = 0;
    for (int64_t j = 0; j < h; ++j) {
        uint32_t b = as_u((float)src[j]) & 0x7FFFFFFFu;
        m = b > m ? b : m;
    }
    return m;
}
static inline uint32_t amax_f32(const float *src, int64_t h) {
    uint32_t m = 0;
    for (int64_t j = 0; j < h; ++j) {
        uint32_t b = as_u(src[j]) & 0x7FFFFFFFu;
        m = b > m ? b : m;
    }
    return m;
}
/* q = round(x * d) without smoothing: bf16 two values per word, 2 * L at a time */
static inline void scale_bf16(const uint16_t *src, int8_t *dst, int64_t h, float d) {
    int64_t j = 0;
    for (; j + 2 * L <= h; j += 2 * L) {
        vu w = load_pairs(src + j);
        vu e = quant_pairs(even(w) * d), o = quant_pairs(odd(w) * d);
        vu pairs = (o << 16) | (e & 0xFFFFu); /* the int16 values in order */
        vw p;
        memcpy(&p, &pairs, sizeof p);
        vq q = __builtin_convertvector(p, vq);
        memcpy(dst + j, &q, sizeof q);
    }
    for (; j < h; ++j) dst[j] = quant1(load1_bf16(src + j) * d);
}
static inline void scale_f16(const _Float16 *src, int8_t *dst, int64_t h, float d) {
    for (int64_t j = 0; j < h; ++j) dst[j] = quant1((float)src[j] * d);
}
static inline void scale_f32(const float *src, int8_t *dst, int64_t h, float d) {
    for (int64_t j = 0; j < h; ++j) dst[j] = quant1(src[j] * d);
}

/* x: rows of stride x_stride (elements); index: n rows of x or NULL (row i); smooth: NULL or rows of
 * stride smooth_stride, smooth_rows: the row of it for each output row (NULL: row i); q: n rows of
 * stride q_stride; scale_out: row i's fp32 scale goes to byte i * scale_stride (unaligned is fine).
 * Per row: its abs-max, then d, then the row again (from L1) scaled and rounded. */
#define DEF_QUANTIZE(NAME, T)                                                                        \
    int64_t quantize_##NAME(const T *x, int64_t x_rows, int64_t x_stride, const int64_t *index,      \
                            int64_t n, int64_t h, const float *smooth, int64_t smooth_rows_total,    \
                            int64_t smooth_stride, const int64_t *smooth_rows, int8_t *q,            \
                            int64_t q_stride, char *scale_out, int64_t scale_stride, int num_threads) { \
        int64_t bad = 0, work = n * h;                                                               \
        int prefetch = x_rows * x_stride * (int64_t)sizeof(T) > PREFETCH_MIN_BYTES;                  \
        OMP_ROWS                                                                                     \
        for (int64_t i = 0; i < n; ++i) {                                                            \
            int64_t r = index ? index[i] : i, s = smooth_rows ? smooth_rows[i] : i;                  \
            if (r < 0 || r >= x_rows || (smooth && (s < 0 || s >= smooth_rows_total))) {             \
                ++bad; /* out of range: the caller raises IndexError */                              \
                continue;                                                                            \
            }                                                                                        \
            if (prefetch && i + 1 < n) {                                                             \
                int64_t next = index ? index[i + 1] : i + 1;                                         \
                if (next >= 0 && next < x_rows)                                                      \
                    for (int64_t j = 0; j < h; j += 64 / sizeof(T)) PREFETCH(x + next * x_stride + j); \
            }                                                                                        \
            const T *src = x + r * x_stride;                                                         \
            int8_t *dst = q + i * q_stride;                                                          \
            uint32_t m = 0;                                                                          \
            const float *sm = smooth ? smooth + s * smooth_stride : 0;                               \
            if (sm)                                                                                  \
                for (int64_t j = 0; j < h; ++j) {                                                    \
                    uint32_t b = as_u(load1_##NAME(src + j) * sm[j]) & 0x7FFFFFFFu;                  \
                    m = b > m ? b : m;                                                               \
                }                                                                                    \
            else                                                                                     \
                m = amax_##NAME(src, h);                                                             \
            float amax = as_f(m);                                                                    \
            float d = amax == 0.0f ? 1.0f : 127.0f / amax;                                           \
            float scale = amax == 0.0f ? 0.0f : 1.0f / d;                                            \
            if (d > 3.4028234663852886e38f) /* d = inf */                                            \
                for (int64_t j = 0; j < h; ++j)                                                      \
                    dst[j] = quant_clamped((sm ? load1_##NAME(src + j) * sm[j] : load1_##NAME(src + j)) * d); \
            else if (sm)                                                                             \
                for (int64_t j = 0; j < h; ++j) dst[j] = quant1((load1_##NAME(src + j) * sm[j]) * d); \
            else                                                                                     \
                scale_##NAME(src, dst, h, d);                                                        \
            memcpy(scale_out + i * scale_stride, &scale, 4);                                         \
        }                                                                                            \
        return bad;                                                                                  \
    }

DEF_QUANTIZE(bf16, uint16_t)
DEF_QUANTIZE(f16, _Float16)
DEF_QUANTIZE(f32, float)

/* The vector part of one token's combine, from column 0; returns where the scalar tail starts.
 * acc starts at +0 (the reference's zeroed accumulator: 0 + (-0) is +0), then adds w[k] * row_k for
 * k < top_k, then each further row, then extra, in that order; the accumulators stay in registers. */
static inline int64_t combine_block_bf16(const uint16_t *rows, int64_t row_stride, const int64_t *idx,
                                         int64_t num_terms, int64_t top_k, const float *wt,
                                         const uint16_t *e, uint16_t *dst, int64_t h, const int64_t *next) {
    int64_t j = 0;
    for (; j + 2 * L <= h; j += 2 * L) {
        if (next) for (int64_t k = 0; k < num_terms; ++k) PREFETCH(rows + next[k] * row_stride + j);
        vf ae = {0}, ao = {0};
        for (int64_t k = 0; k < num_terms; ++k) {
            vu w = load_pairs(rows + idx[k] * row_stride + j);
            if (k < top_k) {
                ae = ae + wt[k] * even(w);
                ao = ao + wt[k] * odd(w);
            } else {
                ae = ae + even(w);
                ao = ao + odd(w);
            }
        }
        if (e) {
            vu w = load_pairs(e + j);
            ae = ae + even(w);
            ao = ao + odd(w);
        }
        store_pairs(dst + j, ae, ao);
    }
    return j;
}
#define DEF_COMBINE_BLOCK(NAME, T)                                                                   \
    static inline int64_t combine_block_##NAME(const T *rows, int64_t row_stride, const int64_t *idx, \
                                               int64_t num_terms, int64_t top_k, const float *wt,    \
                                               const T *e, T *dst, int64_t h, const int64_t *next) { \
        int64_t j = 0;                                                                               \
        for (; j + L <= h; j += L) {                                                                 \
            vf a = {0};                                                                              \
            for (int64_t k = 0; k < num_terms; ++k) {                                                \
                vf v = load_##NAME(rows + idx[k] * row_stride + j);                                  \
                a = k < top_k ? a + wt[k] * v : a + v;                                               \
            }                                                                                        \
            if (e) a = a + load_##NAME(e + j);                                                       \
            store_##NAME(dst + j, a);                                                                \
        }                                                                                            \
        return j;                                                                                    \
    }
DEF_COMBINE_BLOCK(f16, _Float16)
DEF_COMBINE_BLOCK(f32, float)

/* rows: stride row_stride; index: (n, num_terms) contiguous, the first top_k weighted by w (n, top_k)
 * contiguous, the rest weight 1; extra: NULL or stride extra_stride; out: stride out_stride. */
#define DEF_COMBINE(NAME, T)                                                                         \
    int64_t combine_##NAME(const T *rows, int64_t num_rows, int64_t row_stride, const int64_t *index, \
                           int64_t num_terms, int64_t top_k, const float *w, const T *extra,         \
                           int64_t extra_stride, T *out, int64_t out_stride, int64_t n, int64_t h,   \
                           int num_threads) {                                                        \
        int64_t bad = 0, work = n * h * (num_terms + 1);                                             \
        int prefetch = num_rows * row_stride * (int64_t)sizeof(T) > COMBINE_PREFETCH_MIN_BYTES;      \
        OMP_ROWS                                                                                     \
        for (int64_t t = 0; t < n; ++t) {                                                            \
            const int64_t *idx = index + t * num_terms;                                              \
            const float *wt = w + t * top_k;                                                         \
            const T *e = extra ? extra + t * extra_stride : 0;                                       \
            T *dst = out + t * out_stride;                                                           \
            int64_t k_bad = 0;                                                                       \
            for (int64_t k = 0; k < num_terms; ++k) k_bad += idx[k] < 0 || idx[k] >= num_rows;       \
            if (k_bad) {                                                                             \
                ++bad; /* out of range: the caller raises IndexError */                              \
                continue;                                                                            \
            }                                                                                        \
            const int64_t *next = prefetch && t + 1 < n ? idx + num_terms : 0;                       \
            int64_t j = combine_block_##NAME(rows, row_stride, idx, num_terms, top_k, wt, e, dst, h, next); \
            for (; j < h; ++j) {                                                                     \
                float a = 0.0f;                                                                      \
                for (int64_t k = 0; k < num_terms; ++k) {                                            \
                    float v = load1_##NAME(rows + idx[k] * row_stride + j);                          \
                    a = k < top_k ? a + wt[k] * v : a + v;                                           \
                }                                                                                    \
                if (e) a = a + load1_##NAME(e + j);                                                  \
                store1_##NAME(dst + j, a);                                                           \
            }                                                                                        \
        }                                                                                            \
        return bad;                                                                                  \
    }

DEF_COMBINE(bf16, uint16_t)
DEF_COMBINE(f16, _Float16)
DEF_COMBINE(f32, float)
"""

FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
_SUFFIX = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}

_enabled = os.environ.get("OVERLAP_CPU_COMPILE", "1") != "0"
_library: ctypes.CDLL | None = None
_lock = threading.Lock()
_quantize_fns: dict[torch.dtype, Any] = {}  # input dtype -> the C function (ctypes), once loaded
_combine_fns: dict[torch.dtype, Any] = {}


def _cpu_key() -> str:
    """The CPU's feature flags (Linux), so that a cache shared between machines never loads code
    built for other instructions."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return sys.platform


def _cache_dir() -> Path:
    base = os.environ.get("OVERLAP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "overlap"
    )
    return Path(base)


def _build(compiler: str, flags: tuple[str, ...]) -> Path:
    key = hashlib.sha256("\0".join([SOURCE, compiler, *flags, _cpu_key()]).encode()).hexdigest()[:20]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"overlap-{os.getuid()}"):
        path = folder / f"cpu_native-{key}.so"
        if path.exists():
            return path
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            break
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        source = Path(tmp) / "cpu_native.c"
        source.write_text(SOURCE)
        built = Path(tmp) / "cpu_native.so"
        run = subprocess.run(
            [compiler, *flags, str(source), "-o", str(built)], capture_output=True, text=True, timeout=300
        )
        if run.returncode != 0:
            raise RuntimeError(f"{compiler} failed (rc {run.returncode}): {run.stderr.strip()[-2000:]}")
        os.replace(built, path)  # atomic: a concurrent process sees the whole file or none
    return path


def _load() -> ctypes.CDLL | None:
    global _library, _enabled
    with _lock:
        if _library is not None or not _enabled:
            return _library
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            _enabled = False  # no compiler: the reference runs, as it always could
            return None
        try:
            try:
                path = _build(compiler, FLAGS)
            except RuntimeError:  # a compiler without OpenMP (Apple clang): one thread per call
                path = _build(compiler, tuple(f for f in FLAGS if f != "-fopenmp"))
            library = ctypes.CDLL(str(path))
            p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            for dtype, name in _SUFFIX.items():
                quantize_fn, combine_fn = getattr(library, f"quantize_{name}"), getattr(library, f"combine_{name}")
                quantize_fn.argtypes = [p, i64, i64, p, i64, i64, p, i64, i64, p, p, i64, p, i64, i32]
                combine_fn.argtypes = [p, i64, i64, p, i64, i64, p, p, i64, p, i64, i64, i64, i32]
                quantize_fn.restype = combine_fn.restype = i64
                _quantize_fns[dtype], _combine_fns[dtype] = quantize_fn, combine_fn
        except Exception as exc:  # noqa: BLE001 - any build or load failure: the reference from now on
            _enabled = False
            _quantize_fns.clear()
            _combine_fns.clear()
            warnings.warn(
                f"overlap.kernels: the compiled CPU kernels are unavailable ({type(exc).__name__}: {exc}); "
                "using the torch reference (set OVERLAP_CPU_COMPILE=0 to skip the attempt)",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        _library = library
        return library


def available() -> bool:
    """Whether the compiled kernels run in this process (builds or loads them on the first call)."""
    return _enabled and (_library is not None or _load() is not None)


def _rows_ok(t: Tensor) -> bool:
    """A CPU matrix whose rows are contiguous (any row stride, as a column slice of a staging buffer)."""
    return t.device.type == "cpu" and t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1)


def _int64(index: Tensor) -> Tensor:
    return index if index.dtype == torch.int64 and index.is_contiguous() else index.to(torch.int64).contiguous()


def quantize(
    x: Tensor,
    index: Tensor | None,
    smooth: Tensor | None,
    smooth_rows: Tensor | None,
    q: Tensor,
    scale: Tensor,
    *,
    scale_offset: int = 0,
    scale_stride: int = 4,
) -> bool:
    """Quantise rows of `x` into `q` and `scale`, as `quant.quantize_rows` does; False: not handled.

    Args:
        x: `(R, H)` bf16/fp16/fp32, rows contiguous.
        index: `(N,)` int64 row of `x` for each output row, or `None` (row i; then `R == N`).
        smooth: optional `(M, H)` fp32 smoothing factors, rows contiguous.
        smooth_rows: `(N,)` int64 row of `smooth` for each output row, or `None` (row i).
        q: `(N, >= H)` int8, rows contiguous: the values go to the first H columns of each row.
        scale: where the fp32 scales go: row i's at byte `scale_offset + i * scale_stride` of
            `scale`'s data (a dense `(N,)` fp32 tensor by default; the staging rows `q` themselves
            for dispatch's packed layout).
        scale_offset: byte of row 0's scale.
        scale_stride: bytes from one row's scale to the next.

    Returns:
        True when `q` and `scale` were written; False when this path does not take the call (the
        caller runs the reference).
    """
    fn = _quantize_fns.get(x.dtype) if _library is not None else (_load() and _quantize_fns.get(x.dtype))
    if not fn or q.dtype != torch.int8 or not (_rows_ok(x) and _rows_ok(q)):
        return False
    if smooth is not None and (smooth.dtype != torch.float32 or not _rows_ok(smooth)):
        return False
    num_rows, hidden = q.shape[0], x.shape[1]
    scale_bytes = scale.numel() * scale.element_size()
    if q.shape[1] < hidden or (num_rows and scale_offset + (num_rows - 1) * scale_stride + 4 > scale_bytes):
        raise ValueError(f"quantize: q {tuple(q.shape)} or scale ({scale_bytes} bytes) too small for {num_rows} rows")
    if index is None and x.shape[0] != num_rows:
        raise ValueError(f"x must have one row per output row without an index, got {x.shape[0]} for {num_rows}")
    index = None if index is None else _int64(index)
    smooth_rows = None if smooth_rows is None else _int64(smooth_rows)
    bad = fn(
        x.data_ptr(),
        x.shape[0],
        x.stride(0),
        None if index is None else index.data_ptr(),
        num_rows,
        hidden,
        None if smooth is None else smooth.data_ptr(),
        0 if smooth is None else smooth.shape[0],
        0 if smooth is None else smooth.stride(0),
        None if smooth_rows is None else smooth_rows.data_ptr(),
        q.data_ptr(),
        q.stride(0),
        scale.data_ptr() + scale_offset,
        scale_stride,
        torch.get_num_threads(),
    )
    if bad:
        raise IndexError(f"quantize: {bad} of {num_rows} rows index past x ({x.shape[0]} rows) or the smoothing rows")
    return True


def combine(rows: Tensor, index: Tensor, top_k: int, weights: Tensor, extra: Tensor | None, out: Tensor) -> bool:
    """`combine.weighted_combine` into `out`; False: not handled (the caller runs the reference).

    Args:
        rows: `(N, H)` expert outputs, rows contiguous.
        index: `(n, K + S)` rows of `rows` per token: the K weighted ones, then the S shared ones.
        top_k: K.
        weights: `(n, K)` fp32.
        extra: optional `(n, H)`, added last with weight 1.
        out: `(n, H)`, rows contiguous; written.
    """
    fn = _combine_fns.get(out.dtype) if _library is not None else (_load() and _combine_fns.get(out.dtype))
    if not fn or rows.dtype != out.dtype or weights.dtype != torch.float32 or not (_rows_ok(rows) and _rows_ok(out)):
        return False
    if extra is not None and (extra.dtype != out.dtype or not _rows_ok(extra)):
        return False
    num_tokens, hidden = out.shape
    index = _int64(index)
    weights = weights.contiguous()
    bad = fn(
        rows.data_ptr(),
        rows.shape[0],
        rows.stride(0),
        index.data_ptr(),
        index.shape[1],
        top_k,
        weights.data_ptr(),
        None if extra is None else extra.data_ptr(),
        0 if extra is None else extra.stride(0),
        out.data_ptr(),
        out.stride(0),
        num_tokens,
        hidden,
        torch.get_num_threads(),
    )
    if bad:
        raise IndexError(f"combine: {bad} of {num_tokens} tokens index past rows ({rows.shape[0]} rows)")
    return True
