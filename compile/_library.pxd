# cython: language_level=3
# What the library wrapper shares with the worker: the C types of a model call, the loaded
# library and map table, and how a call is built and run.
cimport numpy as cnp
from libc.stdint cimport int16_t, int32_t, int64_t

ctypedef int32_t (*predict_f64_t)(const double*, int64_t, int64_t, int32_t, double*) noexcept nogil
ctypedef int32_t (*predict_f32_t)(const float*, int64_t, int64_t, int32_t, double*) noexcept nogil
ctypedef int32_t (*int_getter_t)() noexcept nogil
# muse.calib.kernels.calibrate_rows_c: (raw, n, kind, param, single, index, offsets, maps, knots,
# nknots, grids, out[2, n]) -> first row whose map index is out of range, or -1
ctypedef int64_t (*calibrate_t)(const double*, int64_t, int64_t, double, int64_t, const int64_t*, const int64_t*,
                                int64_t, const double*, int64_t, const int16_t*, double*) noexcept nogil


# One model call: predict nrow rows of x into out[0], then (when cal is not NULL) correct and
# map them into out[1] and out[2].
cdef struct Job:
    int64_t id
    double seconds  # the call's own time on the thread (wall clock), set when it has run
    predict_f64_t f64
    predict_f32_t f32
    const void* x
    int64_t nrow
    int64_t ncol
    int32_t margin
    double* out
    int32_t rc
    calibrate_t cal
    const int64_t* offsets
    int64_t maps
    const double* knots
    int64_t nknots
    const int16_t* grids
    int64_t kind
    double param
    int64_t single
    const int64_t* index


cdef class NativeMapTable:
    cdef calibrate_t fn
    cdef const int64_t* offsets
    cdef readonly int64_t maps
    cdef const double* knots
    cdef int64_t nknots
    cdef const int16_t* grids
    cdef readonly object arrays


cdef class NativeLibrary:
    cdef void* _handle
    cdef predict_f64_t _f64
    cdef predict_f32_t _f32
    cdef readonly int num_feature
    cdef readonly str path


cdef Job make_job(NativeLibrary lib, cnp.ndarray X, cnp.ndarray out, bint margin, NativeMapTable maps, int kind,
                  double param, object map_index) except *
cdef int32_t run_job(Job* job) noexcept nogil
