# cython: language_level=3
"""A loaded model library and the call into it: one dlopen'd library, one call per
batch, GIL released.  Everything that can be checked is checked before the call,
so the C side never sees a wrong shape or dtype.  ``NativeMapTable`` lets the same
call correct and map its output (muse.calib's kernel, compiled as a C function)."""
cimport numpy as cnp
from libc.stdint cimport int16_t, int32_t, int64_t

import numpy as np

cnp.import_array()

cdef extern from "<dlfcn.h>" nogil:
    void* dlopen(const char* filename, int flags)
    void* dlsym(void* handle, const char* symbol)
    int dlclose(void* handle)
    char* dlerror()
    int RTLD_NOW
    int RTLD_LOCAL

ABI_VERSION = 1


class NativeLoadError(RuntimeError):
    """The file is not a loadable MUSE model library."""


cdef void* _symbol(void* handle, bytes name, str path) except NULL:
    cdef void* sym = dlsym(handle, name)
    if sym == NULL:
        raise NativeLoadError(f"{path}: not a MUSE model library (missing symbol {name.decode()})")
    return sym


cdef class NativeMapTable:
    """A packed map table (``muse.calib.MapTable``'s offsets, knots and grids) with the kernel
    that applies it (``calibrate_rows_c.address``), callable without the GIL: a model call can
    calibrate its own output on whichever thread runs it, with no Numba dispatch.  Holds the
    arrays it points into."""

    def __init__(self, size_t kernel, cnp.ndarray offsets, cnp.ndarray knots, cnp.ndarray grids,
                 Py_ssize_t grid_stride):
        if kernel == 0:
            raise ValueError("kernel: a null function address")
        if cnp.PyArray_TYPE(offsets) != cnp.NPY_INT64 or offsets.ndim != 1 or offsets.shape[0] < 1 \
                or not cnp.PyArray_IS_C_CONTIGUOUS(offsets):
            raise ValueError("offsets: a C-contiguous int64 vector [maps + 1]")
        maps = offsets.shape[0] - 1
        if cnp.PyArray_TYPE(knots) != cnp.NPY_FLOAT64 or knots.ndim != 2 or knots.shape[0] != 3 \
                or knots.shape[1] != offsets[maps] or not cnp.PyArray_IS_C_CONTIGUOUS(knots):
            raise ValueError(f"knots: a C-contiguous float64 [3, {offsets[maps]}] matrix")
        if cnp.PyArray_TYPE(grids) != cnp.NPY_INT16 or grids.ndim != 1 or grids.shape[0] != maps * grid_stride \
                or not cnp.PyArray_IS_C_CONTIGUOUS(grids):
            raise ValueError(f"grids: a C-contiguous int16 vector [{maps} * {grid_stride}]")
        self.fn = <calibrate_t>kernel
        self.offsets = <const int64_t*>cnp.PyArray_DATA(offsets)
        self.maps = maps
        self.knots = <const double*>cnp.PyArray_DATA(knots)
        self.nknots = knots.shape[1]
        self.grids = <const int16_t*>cnp.PyArray_DATA(grids)
        self.arrays = (offsets, knots, grids)


cdef int64_t _NO_INDEX = 0


cdef Job make_job(NativeLibrary lib, cnp.ndarray X, cnp.ndarray out, bint margin, NativeMapTable maps, int kind,
                  double param, object map_index) except *:
    """A checked call: everything the C side will touch has the shape and type it expects.
    ``map_index`` (with ``maps``): one map for all rows (an int) or an int64 vector, one per row."""
    cdef int typenum = cnp.PyArray_TYPE(X)
    if cnp.PyArray_NDIM(X) != 2 or cnp.PyArray_DIM(X, 1) != lib.num_feature or not cnp.PyArray_IS_C_CONTIGUOUS(X) \
            or (typenum != cnp.NPY_FLOAT64 and typenum != cnp.NPY_FLOAT32):
        raise ValueError(f"features must be a C-contiguous float32/float64 [rows, {lib.num_feature}] matrix")
    cdef int64_t nrow = cnp.PyArray_DIM(X, 0)
    if cnp.PyArray_TYPE(out) != cnp.NPY_FLOAT64 or not cnp.PyArray_IS_C_CONTIGUOUS(out) or (
            cnp.PyArray_NDIM(out) != 1 or cnp.PyArray_DIM(out, 0) != nrow if maps is None else
            cnp.PyArray_NDIM(out) != 2 or cnp.PyArray_DIM(out, 0) != 3 or cnp.PyArray_DIM(out, 1) != nrow):
        raise ValueError("out must be C-contiguous float64: [rows], or [3, rows] when calibrating")
    cdef Job job
    job.id = 0
    job.f64 = lib._f64 if typenum == cnp.NPY_FLOAT64 else NULL
    job.f32 = lib._f32
    job.x = cnp.PyArray_DATA(X)
    job.nrow = nrow
    job.ncol = cnp.PyArray_DIM(X, 1)
    job.margin = 1 if margin or maps is not None else 0
    job.out = <double*>cnp.PyArray_DATA(out)
    job.rc = 0
    job.cal = NULL
    if maps is None:
        return job
    cdef cnp.ndarray idx
    job.cal = maps.fn
    job.offsets, job.maps, job.knots, job.nknots, job.grids = (
        maps.offsets, maps.maps, maps.knots, maps.nknots, maps.grids)
    job.kind, job.param = kind, param
    if isinstance(map_index, int):
        if not 0 <= map_index < maps.maps:
            raise IndexError(f"map index must be in [0, {maps.maps}), got {map_index}")
        job.single, job.index = map_index, &_NO_INDEX
    else:
        idx = <cnp.ndarray?>map_index
        if cnp.PyArray_TYPE(idx) != cnp.NPY_INT64 or idx.ndim != 1 or idx.shape[0] != nrow \
                or not cnp.PyArray_IS_C_CONTIGUOUS(idx):
            raise ValueError(f"map_index: an int or a C-contiguous int64 vector [{nrow}]")
        job.single, job.index = -1, <const int64_t*>cnp.PyArray_DATA(idx)
    return job


cdef int32_t run_job(Job* job) noexcept nogil:
    """Predict, then calibrate: rc 0, < 0 the model's failure, > 0 row rc - 1 had no such map."""
    cdef int32_t rc
    cdef int64_t bad
    if job.f64 != NULL:
        rc = job.f64(<const double*>job.x, job.nrow, job.ncol, job.margin, job.out)
    else:
        rc = job.f32(<const float*>job.x, job.nrow, job.ncol, job.margin, job.out)
    if rc != 0 or job.cal == NULL:
        return rc
    bad = job.cal(job.out, job.nrow, job.kind, job.param, job.single, job.index, job.offsets, job.maps,
                  job.knots, job.nknots, job.grids, job.out + job.nrow)
    return 0 if bad < 0 else <int32_t>(bad + 1)


cdef class NativeLibrary:
    """A loaded model library.  Thread-safe: calls share no mutable state."""

    def __cinit__(self, str path):
        self._handle = NULL
        self.path = path
        cdef bytes bpath = path.encode()
        self._handle = dlopen(bpath, RTLD_NOW | RTLD_LOCAL)
        if self._handle == NULL:
            err = dlerror()
            detail = err.decode(errors="replace") if err != NULL else "unknown error"
            raise NativeLoadError(f"{path}: cannot load shared library: {detail}")
        cdef int_getter_t abi = <int_getter_t>_symbol(self._handle, b"muse_abi_version", path)
        if abi() != ABI_VERSION:
            raise NativeLoadError(f"{path}: library ABI {abi()} != {ABI_VERSION}; recompile the model")
        cdef int_getter_t nfeat = <int_getter_t>_symbol(self._handle, b"muse_num_feature", path)
        self.num_feature = nfeat()
        self._f64 = <predict_f64_t>_symbol(self._handle, b"muse_predict_f64", path)
        self._f32 = <predict_f32_t>_symbol(self._handle, b"muse_predict_f32", path)

    def __dealloc__(self):
        if self._handle != NULL:
            dlclose(self._handle)
            self._handle = NULL

    def predict(self, X, bint margin=False):
        """Score a 2-D float32/float64 matrix (NaN = missing); returns float64 [n].  Converts
        what it can (other numeric dtypes, non-contiguous arrays, nested lists); ``run`` does not."""
        cdef cnp.ndarray arr
        if cnp.PyArray_Check(X):
            arr = <cnp.ndarray>X
        else:
            arr = np.asarray(X)
        if cnp.PyArray_NDIM(arr) != 2:
            raise ValueError(f"features must be a 2-D matrix [rows, {self.num_feature}], "
                             f"got {cnp.PyArray_NDIM(arr)}-D shape {np.shape(arr)}")
        cdef int typenum = cnp.PyArray_TYPE(arr)
        if typenum != cnp.NPY_FLOAT64 and typenum != cnp.NPY_FLOAT32:
            if arr.dtype.kind not in "fiub":
                raise TypeError(f"features must be numeric (float32 or float64), got dtype {arr.dtype}")
            arr = arr.astype(np.float64)
        if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
            arr = np.ascontiguousarray(arr)
        cdef int64_t ncol = cnp.PyArray_DIM(arr, 1)
        if ncol != self.num_feature:
            raise ValueError(f"features have {ncol} columns; the model expects {self.num_feature}")
        cdef cnp.npy_intp dims[1]
        dims[0] = cnp.PyArray_DIM(arr, 0)
        cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, dims, cnp.NPY_FLOAT64, 0)
        self.run(arr, out, margin)
        return out

    def run(self, cnp.ndarray X, cnp.ndarray out, bint margin=False, NativeMapTable maps=None, int kind=0,
            double param=0.0, object map_index=0) -> None:
        """Predict X into out on this thread, GIL released: as ``predict`` but into a given
        array, and with ``maps`` also corrected and mapped (see ``NativeWorker.submit``)."""
        cdef Job job = make_job(self, X, out, margin, maps, kind, param, map_index)
        with nogil:
            job.rc = run_job(&job)
        error = self.failure(job.rc, job.nrow)
        if error is not None:
            raise error

    def failure(self, int rc, int64_t nrow):
        """The exception a call's return code stands for, or None for success."""
        if rc == 0:
            return None
        if rc > 0:
            return IndexError(f"row {rc - 1}: map index out of range")
        if rc == -2:
            return MemoryError(f"{self.path}: no memory for a block of {nrow} rows")
        return RuntimeError(f"{self.path}: native predict failed with code {rc}")
