# cython: language_level=3
"""The native call path: one dlopen'd model library, one call per batch,
GIL released.  Everything that can be checked is checked before the call,
so the C side never sees a wrong shape or dtype."""
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t

import numpy as np

cnp.import_array()

cdef extern from "<dlfcn.h>" nogil:
    void* dlopen(const char* filename, int flags)
    void* dlsym(void* handle, const char* symbol)
    int dlclose(void* handle)
    char* dlerror()
    int RTLD_NOW
    int RTLD_LOCAL

ctypedef int32_t (*predict_f64_t)(const double*, int64_t, int64_t, int32_t, double*) noexcept nogil
ctypedef int32_t (*predict_f32_t)(const float*, int64_t, int64_t, int32_t, double*) noexcept nogil
ctypedef int32_t (*int_getter_t)() noexcept nogil

ABI_VERSION = 1


class NativeLoadError(RuntimeError):
    """The file is not a loadable MUSE model library."""


cdef void* _symbol(void* handle, bytes name, str path) except NULL:
    cdef void* sym = dlsym(handle, name)
    if sym == NULL:
        raise NativeLoadError(f"{path}: not a MUSE model library (missing symbol {name.decode()})")
    return sym


cdef class NativeLibrary:
    """A loaded model library.  Thread-safe: calls share no mutable state."""
    cdef void* _handle
    cdef predict_f64_t _f64
    cdef predict_f32_t _f32
    cdef readonly int num_feature
    cdef readonly str path

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
        """Score a 2-D float32/float64 matrix (NaN = missing); returns float64 [n]."""
        cdef cnp.ndarray arr
        if cnp.PyArray_Check(X):
            arr = <cnp.ndarray>X
        else:
            arr = np.asarray(X)
        if cnp.PyArray_NDIM(arr) != 2:
            raise ValueError(f"features must be a 2-D matrix [rows, {self.num_feature}], got {cnp.PyArray_NDIM(arr)}-D shape {np.shape(arr)}")
        cdef int typenum = cnp.PyArray_TYPE(arr)
        if typenum != cnp.NPY_FLOAT64 and typenum != cnp.NPY_FLOAT32:
            if arr.dtype.kind not in "fiub":
                raise TypeError(f"features must be numeric (float32 or float64), got dtype {arr.dtype}")
            arr = arr.astype(np.float64)
            typenum = cnp.NPY_FLOAT64
        if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
            arr = np.ascontiguousarray(arr)
        cdef int64_t nrow = cnp.PyArray_DIM(arr, 0)
        cdef int64_t ncol = cnp.PyArray_DIM(arr, 1)
        if ncol != self.num_feature:
            raise ValueError(f"features have {ncol} columns; the model expects {self.num_feature}")
        cdef cnp.npy_intp dims[1]
        dims[0] = nrow
        cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, dims, cnp.NPY_FLOAT64, 0)
        cdef double* out_p = <double*>cnp.PyArray_DATA(out)
        cdef void* x_p = cnp.PyArray_DATA(arr)
        cdef int32_t m = 1 if margin else 0
        cdef int32_t rc
        if typenum == cnp.NPY_FLOAT64:
            with nogil:
                rc = self._f64(<const double*>x_p, nrow, ncol, m, out_p)
        else:
            with nogil:
                rc = self._f32(<const float*>x_p, nrow, ncol, m, out_p)
        if rc == -2:
            raise MemoryError(f"{self.path}: no memory for a block of {nrow} rows")
        if rc != 0:
            raise RuntimeError(f"{self.path}: native predict failed with code {rc}")
        return out
