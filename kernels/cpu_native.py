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
operation rounds as torch's does; `rint` rounds half to even; the fp32 -> bf16 cast is c10's round
half to even; the abs-max compares bit patterns (for non-negative floats the unsigned order is the
numeric order, and a NaN sorts above infinity, so it propagates as `torch.amax` does). NaN inputs
give NaN scales and sums, as the reference; the int8 value of a NaN is unspecified in both.
tests/test_kernels_cpu.py checks every path against the reference on irregular shapes.

Build. The first call in a process compiles `SOURCE` with the C compiler (`$CC`, else `cc`/`gcc`),
`-O3 -march=native -fopenmp`, in about half a second, into a cache folder (`$OVERLAP_CACHE_DIR`,
else `$XDG_CACHE_HOME/overlap`, else `~/.cache/overlap`) under a name hashing the source, the flags
and the CPU's feature flags; later processes load that file (milliseconds). Concurrent first calls
(ranks starting together) each write a private file and rename it into place. Threads: OpenMP over
rows, `torch.get_num_threads()` of them; the process already holds torch's libgomp, so the kernels
share torch's thread pool. ctypes releases the GIL for the call.

Off switch and fallbacks. `OVERLAP_CPU_COMPILE=0` never compiles (the reference runs). With no C
compiler the reference runs, silently; a failed build or load turns the path off for the process with
one warning. Dtypes outside (bf16, fp16, fp32) with one dtype for rows, `extra` and `out` take the
reference.
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

import torch
from torch import Tensor

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#define PARALLEL_MIN (1 << 16) /* elements below which one thread does the call */
/* rows are gathered in a random order, which the hardware prefetcher cannot guess: each row (token)
 * asks for the next one's rows while it computes (halves a DRAM-bound combine's time) */
#define PREFETCH(p) __builtin_prefetch(p)
/* rows (tokens) split evenly over the threads; `bad` counts rows whose index is out of range */
#define OMP_ROWS \
    _Pragma("omp parallel for schedule(static) num_threads(num_threads) if(work >= PARALLEL_MIN) reduction(+:bad)")

/* 16 lanes of fp32 (GCC/Clang vector extensions: one AVX-512 register, two AVX2 ones) */
#define L 16
typedef float vf __attribute__((vector_size(4 * L)));
typedef uint32_t vu __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));
typedef uint16_t vh __attribute__((vector_size(2 * L)));
typedef int8_t vq __attribute__((vector_size(L)));

static inline vf as_vf(vu u) { vf f; memcpy(&f, &u, sizeof f); return f; }
static inline vu as_vu(vf f) { vu u; memcpy(&u, &f, sizeof u); return u; }
static inline float as_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t as_u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* Loads widen to fp32 exactly; stores round half to even (bf16: as c10::BFloat16, NaN -> 0x7FC0). */
static inline float load1_bf16(const uint16_t *p) { return as_f((uint32_t)*p << 16); }
static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return as_vf(__builtin_convertvector(h, vu) << 16);
}
static inline void store1_bf16(uint16_t *p, float f) {
    uint32_t u = as_u(f);
    *p = (uint16_t)(f != f ? 0x7FC0u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static inline void store_bf16(uint16_t *p, vf f) {
    vu u = as_vu(f), nan = (vu)(f != f);
    vu r = ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16 & ~nan) | (0x7FC0u & nan);
    vh h = __builtin_convertvector(r, vh);
    memcpy(p, &h, sizeof h);
}
static inline float load1_f16(const _Float16 *p) { return (float)*p; }
static inline vf load_f16(const _Float16 *p) {
    float f[L];
    for (int i = 0; i < L; ++i) f[i] = (float)p[i];
    vf v;
    memcpy(&v, f, sizeof v);
    return v;
}
static inline void store1_f16(_Float16 *p, float f) { *p = (_Float16)f; }
static inline void store_f16(_Float16 *p, vf v) {
    for (int i = 0; i < L; ++i) p[i] = (_Float16)v[i];
}
static inline float load1_f32(const float *p) { return *p; }
static inline vf load_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store1_f32(float *p, float f) { *p = f; }
static inline void store_f32(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* rint rounds half to even (the default rounding mode); the clamp acts only on NaN (|v| <= 127.00002
 * otherwise), done on the integer because the float compare-and-select vectorises poorly */
static inline int32_t quant1(float v) {
    int32_t i = (int32_t)rintf(v);
    return i < -128 ? -128 : i > 127 ? 127 : i;
}
/* x: rows of stride x_stride (elements); index: n rows of x or NULL (row i); smooth: NULL or rows of
 * stride smooth_stride, smooth_rows: the row of it for each output row (NULL: row i); q: n rows of
 * stride q_stride; scale_out: row i's fp32 scale goes to byte i * scale_stride (unaligned is fine).
 * Per row: the abs-max on the bit patterns of |xf| (for non-negative floats the unsigned order is
 * the numeric order, and a NaN sorts above infinity), then d, then the row again (from L1). */
#define DEF_QUANTIZE(NAME, T)                                                                            \
    int64_t quantize_##NAME(const T *x, int64_t x_rows, int64_t x_stride, const int64_t *index,          \
                            int64_t n, int64_t h, const float *smooth, int64_t smooth_rows_total,        \
                            int64_t smooth_stride, const int64_t *smooth_rows, int8_t *q,                \
                            int64_t q_stride, char *scale_out, int64_t scale_stride, int num_threads) {  \
        int64_t bad = 0, work = n * h;                                                                   \
        OMP_ROWS                                                                                         \
        for (int64_t i = 0; i < n; ++i) {                                                                \
            int64_t r = index ? index[i] : i, s = smooth_rows ? smooth_rows[i] : i;                      \
            if (r < 0 || r >= x_rows || (smooth && (s < 0 || s >= smooth_rows_total))) {                 \
                ++bad; /* out of range: the caller raises IndexError */                                  \
                continue;                                                                                \
            }                                                                                            \
            const T *src = x + r * x_stride;                                                             \
            const float *sm = smooth ? smooth + s * smooth_stride : 0;                                   \
            int8_t *dst = q + i * q_stride;                                                              \
            if (i + 1 < n) { /* the next row, while this one is computed */                              \
                int64_t rn = index ? index[i + 1] : i + 1;                                               \
                if (rn >= 0 && rn < x_rows)                                                              \
                    for (int64_t j = 0; j < h; j += 64 / sizeof(T)) PREFETCH(x + rn * x_stride + j);     \
            }                                                                                            \
            uint32_t m = 0; /* plain loops: the compiler vectorises the max reduction */                 \
            if (sm)                                                                                      \
                for (int64_t j = 0; j < h; ++j) {                                                        \
                    uint32_t b = as_u(load1_##NAME(src + j) * sm[j]) & 0x7FFFFFFFu;                      \
                    m = b > m ? b : m;                                                                   \
                }                                                                                        \
            else                                                                                         \
                for (int64_t j = 0; j < h; ++j) {                                                        \
                    uint32_t b = as_u(load1_##NAME(src + j)) & 0x7FFFFFFFu;                              \
                    m = b > m ? b : m;                                                                   \
                }                                                                                        \
            float amax = as_f(m);                                                                        \
            float d = amax == 0.0f ? 1.0f : 127.0f / amax;                                               \
            float scale = amax == 0.0f ? 0.0f : 1.0f / d;                                                \
            if (sm) /* vectorised; the int8 are packed into full-width stores */                         \
                for (int64_t j = 0; j < h; ++j) dst[j] = (int8_t)quant1((load1_##NAME(src + j) * sm[j]) * d); \
            else                                                                                         \
                for (int64_t j = 0; j < h; ++j) dst[j] = (int8_t)quant1(load1_##NAME(src + j) * d);      \
            memcpy(scale_out + i * scale_stride, &scale, 4);                                             \
        }                                                                                                \
        return bad;                                                                                      \
    }

DEF_QUANTIZE(bf16, uint16_t)
DEF_QUANTIZE(f16, _Float16)
DEF_QUANTIZE(f32, float)

/* rows: stride row_stride; index: (n, num_terms) contiguous, the first top_k weighted by w (n, top_k)
 * contiguous, the rest weight 1; extra: NULL or stride extra_stride; out: stride out_stride.
 * Per token, 2 * L columns at a time: the two accumulators stay in registers over all terms. */
#define DEF_COMBINE(NAME, T)                                                                             \
    int64_t combine_##NAME(const T *rows, int64_t num_rows, int64_t row_stride, const int64_t *index,    \
                           int64_t num_terms, int64_t top_k, const float *w, const T *extra,             \
                           int64_t extra_stride, T *out, int64_t out_stride, int64_t n, int64_t h,       \
                           int num_threads) {                                                            \
        int64_t bad = 0, work = n * h * (num_terms + 1), hv = h / (2 * L) * (2 * L);                     \
        OMP_ROWS                                                                                         \
        for (int64_t t = 0; t < n; ++t) {                                                                \
            const int64_t *idx = index + t * num_terms;                                                  \
            const float *wt = w + t * top_k;                                                             \
            const T *e = extra ? extra + t * extra_stride : 0;                                           \
            T *dst = out + t * out_stride;                                                               \
            int64_t k_bad = 0;                                                                           \
            for (int64_t k = 0; k < num_terms; ++k) k_bad += idx[k] < 0 || idx[k] >= num_rows;           \
            if (k_bad) {                                                                                 \
                ++bad; /* out of range: the caller raises IndexError */                                  \
                continue;                                                                                \
            }                                                                                            \
            const int64_t *next = t + 1 < n ? idx + num_terms : idx;                                     \
            for (int64_t j = 0; j < hv; j += 2 * L) {                                                    \
                for (int64_t k = 0; k < num_terms; ++k) PREFETCH(rows + next[k] * row_stride + j);       \
                vf a0 = {0}, a1 = {0}; /* acc = 0 + w0 * row0: +0, never -0, as the reference */         \
                for (int64_t k = 0; k < num_terms; ++k) {                                                \
                    const T *src = rows + idx[k] * row_stride + j;                                       \
                    if (k < top_k) {                                                                     \
                        a0 = a0 + wt[k] * load_##NAME(src);                                              \
                        a1 = a1 + wt[k] * load_##NAME(src + L);                                          \
                    } else {                                                                             \
                        a0 = a0 + load_##NAME(src);                                                      \
                        a1 = a1 + load_##NAME(src + L);                                                  \
                    }                                                                                    \
                }                                                                                        \
                if (e) {                                                                                 \
                    a0 = a0 + load_##NAME(e + j);                                                        \
                    a1 = a1 + load_##NAME(e + j + L);                                                    \
                }                                                                                        \
                store_##NAME(dst + j, a0);                                                               \
                store_##NAME(dst + j + L, a1);                                                           \
            }                                                                                            \
            for (int64_t j = hv; j < h; ++j) {                                                           \
                float a = 0.0f;                                                                          \
                for (int64_t k = 0; k < num_terms; ++k) {                                                \
                    float v = load1_##NAME(rows + idx[k] * row_stride + j);                              \
                    a = k < top_k ? a + wt[k] * v : a + v;                                               \
                }                                                                                        \
                if (e) a = a + load1_##NAME(e + j);                                                      \
                store1_##NAME(dst + j, a);                                                               \
            }                                                                                            \
        }                                                                                                \
        return bad;                                                                                      \
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


def _build(compiler: str) -> Path:
    key = hashlib.sha256("\0".join([SOURCE, compiler, *FLAGS, _cpu_key()]).encode()).hexdigest()[:20]
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
            [compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True, timeout=300
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
            library = ctypes.CDLL(str(_build(compiler)))
            p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            for name in _SUFFIX.values():
                quantize_fn, combine_fn = getattr(library, f"quantize_{name}"), getattr(library, f"combine_{name}")
                quantize_fn.argtypes = [p, i64, i64, p, i64, i64, p, i64, i64, p, p, i64, p, i64, i32]
                combine_fn.argtypes = [p, i64, i64, p, i64, i64, p, p, i64, p, i64, i64, i64, i32]
                quantize_fn.restype = combine_fn.restype = i64
        except Exception as exc:  # noqa: BLE001 - any build or load failure: the reference from now on
            _enabled = False
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


def quantize(
    x: Tensor,
    index: Tensor | None,
    smooth: Tensor | None,
    smooth_rows: Tensor | None,
    q: Tensor,
    scale: Tensor,
    *,
    scale_byte_stride: int | None = None,
) -> bool:
    """Quantise rows of `x` into `q` and `scale`, as `quant.quantize_rows` does; False: not handled.

    Args:
        x: `(R, H)` bf16/fp16/fp32, rows contiguous.
        index: `(N,)` int64 row of `x` for each output row, or `None` (row i; then `R == N`).
        smooth: optional `(M, H)` fp32 smoothing factors, rows contiguous.
        smooth_rows: `(N,)` int64 row of `smooth` for each output row, or `None` (row i).
        q: `(N, H)` int8, rows contiguous; written.
        scale: where the fp32 scales go: an `(N,)` fp32 tensor, or (with `scale_byte_stride`) any
            tensor whose first byte is row 0's scale, row i's at `i * scale_byte_stride` bytes.
        scale_byte_stride: bytes between two scales (a staging row), or `None` for a dense `(N,)`.

    Returns:
        True when `q` and `scale` were written; False when this path does not take the call (the
        caller runs the reference).
    """
    suffix = _SUFFIX.get(x.dtype)
    if suffix is None or not (_rows_ok(x) and _rows_ok(q)) or q.dtype != torch.int8:
        return False
    if smooth is not None and (smooth.dtype != torch.float32 or not _rows_ok(smooth)):
        return False
    if scale_byte_stride is None and not (scale.dtype == torch.float32 and scale.dim() == 1):
        return False
    library = _load() if _enabled else None
    if library is None:
        return False
    num_rows, hidden = q.shape
    index = None if index is None else index.to(torch.int64).contiguous()
    smooth_rows = None if smooth_rows is None else smooth_rows.to(torch.int64).contiguous()
    if index is None and x.shape[0] != num_rows:
        raise ValueError(f"x must have one row per output row without an index, got {x.shape[0]} for {num_rows}")
    bad = getattr(library, f"quantize_{suffix}")(
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
        scale.data_ptr(),
        scale.stride(0) * 4 if scale_byte_stride is None else scale_byte_stride,
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
    suffix = _SUFFIX.get(out.dtype)
    if suffix is None or rows.dtype != out.dtype or not (_rows_ok(rows) and _rows_ok(out)):
        return False
    if weights.dtype != torch.float32 or (extra is not None and (extra.dtype != out.dtype or not _rows_ok(extra))):
        return False
    library = _load() if _enabled else None
    if library is None:
        return False
    num_tokens, hidden = out.shape
    index = index.to(torch.int64).contiguous()
    weights = weights.contiguous()
    bad = getattr(library, f"combine_{suffix}")(
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
