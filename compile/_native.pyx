# cython: language_level=3
"""The native call path: one dlopen'd model library, one call per batch,
GIL released.  Everything that can be checked is checked before the call,
so the C side never sees a wrong shape or dtype."""
cimport numpy as cnp
from cpython.float cimport PyFloat_AS_DOUBLE
from libc.math cimport NAN
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

ctypedef int32_t (*predict_f64_t)(const double*, int64_t, int64_t, int32_t, double*) noexcept nogil
ctypedef int32_t (*predict_f32_t)(const float*, int64_t, int64_t, int32_t, double*) noexcept nogil
ctypedef int32_t (*int_getter_t)() noexcept nogil
# muse.calib.kernels.calibrate_rows_c: (raw, n, kind, param, single, index, offsets, maps, knots,
# nknots, grids, out[2, n]) -> first row whose map index is out of range, or -1
ctypedef int64_t (*calibrate_t)(const double*, int64_t, int64_t, double, int64_t, const int64_t*, const int64_t*,
                                int64_t, const double*, int64_t, const int16_t*, double*) noexcept nogil

ABI_VERSION = 1


class NativeLoadError(RuntimeError):
    """The file is not a loadable MUSE model library."""


cdef void* _symbol(void* handle, bytes name, str path) except NULL:
    cdef void* sym = dlsym(handle, name)
    if sym == NULL:
        raise NativeLoadError(f"{path}: not a MUSE model library (missing symbol {name.decode()})")
    return sym


cdef class Calibrator:
    """A packed map table (``muse.calib.MapTable``'s offsets, knots and grids) with the kernel
    that applies it (``calibrate_rows_c.address``), callable without the GIL: a model call can
    calibrate its own output on whichever thread runs it, with no Numba dispatch.  Holds the
    arrays it points into."""
    cdef calibrate_t fn
    cdef const int64_t* offsets
    cdef readonly int64_t maps
    cdef const double* knots
    cdef int64_t nknots
    cdef const int16_t* grids
    cdef readonly object arrays

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


cdef struct Job:
    int64_t id
    predict_f64_t f64
    predict_f32_t f32
    const void* x
    int64_t nrow
    int64_t ncol
    int32_t margin
    double* out
    int32_t rc
    # calibration of the output, when cal is not NULL: out is [3, nrow] (margins, corrected, mapped)
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


cdef int64_t _NO_INDEX = 0


cdef Job _job(NativeLibrary lib, cnp.ndarray X, cnp.ndarray out, bint margin, Calibrator cal, int kind,
              double param, object map_index) except *:
    """A checked call: everything the C side will touch has the shape and type it expects.
    ``map_index`` (with ``cal``): one map for all rows (an int) or an int64 vector, one per row."""
    cdef int typenum = cnp.PyArray_TYPE(X)
    if cnp.PyArray_NDIM(X) != 2 or cnp.PyArray_DIM(X, 1) != lib.num_feature or not cnp.PyArray_IS_C_CONTIGUOUS(X) \
            or (typenum != cnp.NPY_FLOAT64 and typenum != cnp.NPY_FLOAT32):
        raise ValueError(f"features must be a C-contiguous float32/float64 [rows, {lib.num_feature}] matrix")
    cdef int64_t nrow = cnp.PyArray_DIM(X, 0)
    if cnp.PyArray_TYPE(out) != cnp.NPY_FLOAT64 or not cnp.PyArray_IS_C_CONTIGUOUS(out) or (
            cnp.PyArray_NDIM(out) != 1 or cnp.PyArray_DIM(out, 0) != nrow if cal is None else
            cnp.PyArray_NDIM(out) != 2 or cnp.PyArray_DIM(out, 0) != 3 or cnp.PyArray_DIM(out, 1) != nrow):
        raise ValueError("out must be C-contiguous float64: [rows], or [3, rows] when calibrating")
    cdef Job job
    job.id = 0
    job.f64 = lib._f64 if typenum == cnp.NPY_FLOAT64 else NULL
    job.f32 = lib._f32
    job.x = cnp.PyArray_DATA(X)
    job.nrow = nrow
    job.ncol = cnp.PyArray_DIM(X, 1)
    job.margin = 1 if margin or cal is not None else 0
    job.out = <double*>cnp.PyArray_DATA(out)
    job.rc = 0
    job.cal = NULL
    if cal is None:
        return job
    cdef cnp.ndarray idx
    job.cal = cal.fn
    job.offsets, job.maps, job.knots, job.nknots, job.grids = cal.offsets, cal.maps, cal.knots, cal.nknots, cal.grids
    job.kind, job.param = kind, param
    if isinstance(map_index, int):
        if not 0 <= map_index < cal.maps:
            raise IndexError(f"map index must be in [0, {cal.maps}), got {map_index}")
        job.single, job.index = map_index, &_NO_INDEX
    else:
        idx = <cnp.ndarray?>map_index
        if cnp.PyArray_TYPE(idx) != cnp.NPY_INT64 or idx.ndim != 1 or idx.shape[0] != nrow \
                or not cnp.PyArray_IS_C_CONTIGUOUS(idx):
            raise ValueError(f"map_index: an int or a C-contiguous int64 vector [{nrow}]")
        job.single, job.index = -1, <const int64_t*>cnp.PyArray_DATA(idx)
    return job


cdef int32_t _run(Job* job) noexcept nogil:
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
        """Score a 2-D float32/float64 matrix (NaN = missing); returns float64 [n].  Converts
        what it can (other numeric dtypes, non-contiguous arrays, nested lists); ``run`` does not."""
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
        self.run(arr, out, margin)
        return out

    def run(self, cnp.ndarray X, cnp.ndarray out, bint margin=False, Calibrator calibrator=None, int kind=0,
            double param=0.0, object map_index=0) -> None:
        """Predict X into out on this thread, GIL released: as ``predict`` but into a given
        array, and with ``calibrator`` also corrected and mapped (see ``NativeWorker.submit``)."""
        cdef Job job = _job(self, X, out, margin, calibrator, kind, param, map_index)
        with nogil:
            job.rc = _run(&job)
        self.check(job.rc, job.nrow)

    def check(self, int rc, int64_t nrow) -> None:
        """Raise for a native call's failure code."""
        if rc > 0:
            raise IndexError(f"row {rc - 1}: map index out of range")
        if rc == -2:
            raise MemoryError(f"{self.path}: no memory for a block of {nrow} rows")
        if rc != 0:
            raise RuntimeError(f"{self.path}: native predict failed with code {rc}")


def rows_matrix(list rows, Py_ssize_t width):
    """A float64 [len(rows), width] matrix from lists of numbers (None = missing -> NaN):
    what a decoded JSON request holds.  numpy's own list conversion takes ~3 us for one
    row of 100 features; this, a tenth of that."""
    cdef Py_ssize_t n = len(rows), i, j
    cdef cnp.npy_intp dims[2]
    dims[0] = n
    dims[1] = width
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT64, 0)
    cdef double* p = <double*>cnp.PyArray_DATA(out)
    cdef list row
    cdef object v
    for i in range(n):
        row = <list?>rows[i]
        if len(row) != width:
            raise ValueError(f"row {i} has {len(row)} values, expected {width}")
        for j in range(width):
            v = row[j]
            if type(v) is float:
                p[i * width + j] = PyFloat_AS_DOUBLE(v)
            elif v is None:
                p[i * width + j] = NAN
            else:
                p[i * width + j] = v  # ints, numpy scalars; anything else raises TypeError
    return out


# -- a native model thread ------------------------------------------------------------
cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t*, void*, void* (*)(void*) noexcept nogil, void*)
    int pthread_join(pthread_t, void**)
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_cond_init(pthread_cond_t*, void*)
    int pthread_cond_destroy(pthread_cond_t*)
    int pthread_cond_wait(pthread_cond_t*, pthread_mutex_t*)
    int pthread_cond_signal(pthread_cond_t*)

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void* buf, size_t count)
    ssize_t write(int fd, const void* buf, size_t count)
    int close(int fd)

from libc.stdlib cimport malloc, free
from libc.stdint cimport uint64_t

cdef void* _worker_main(void* arg) noexcept nogil:
    (<NativeWorker>arg)._serve()
    return NULL


cdef class NativeWorker:
    """One thread that runs model calls off the caller's thread and core, and never takes the GIL.

    ``submit`` queues a call and returns its id; when calls finish, the worker writes to an
    eventfd (``fileno``) that an event loop watches, and ``completed`` returns their (id, rc).
    The caller keeps the input and output arrays alive until then.  A Python thread pool would
    need the GIL to pick up and hand back each call: on a busy event loop that is a wait of up
    to the interpreter's 5 ms switch interval."""
    cdef pthread_t _thread
    cdef pthread_mutex_t _lock
    cdef pthread_cond_t _wake
    cdef Job* _queue
    cdef Job* _done
    cdef Py_ssize_t _capacity, _queued_head, _queued, _done_count
    cdef int _efd
    cdef bint _stopping, _started, _sleeping
    cdef int64_t _next_id

    def __cinit__(self, Py_ssize_t capacity=1024):
        self._capacity = capacity
        self._queue = <Job*>malloc(capacity * sizeof(Job))
        self._done = <Job*>malloc(capacity * sizeof(Job))
        if self._queue == NULL or self._done == NULL:
            raise MemoryError()
        self._queued_head = self._queued = self._done_count = 0
        self._stopping = self._started = self._sleeping = False
        self._next_id = 0
        pthread_mutex_init(&self._lock, NULL)
        pthread_cond_init(&self._wake, NULL)
        self._efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self._efd < 0:
            raise OSError("eventfd failed")
        if pthread_create(&self._thread, NULL, _worker_main, <void*>self) != 0:
            raise OSError("cannot start the native model thread")
        self._started = True

    cdef void _serve(self) noexcept nogil:
        cdef Job job
        cdef uint64_t one = 1
        cdef bint notify
        while True:
            pthread_mutex_lock(&self._lock)
            while self._queued == 0 and not self._stopping:
                self._sleeping = True
                pthread_cond_wait(&self._wake, &self._lock)
            self._sleeping = False
            if self._queued == 0:  # stopping, and nothing left to run
                pthread_mutex_unlock(&self._lock)
                return
            job = self._queue[self._queued_head]
            self._queued_head = (self._queued_head + 1) % self._capacity
            self._queued -= 1
            pthread_mutex_unlock(&self._lock)
            job.rc = _run(&job)
            pthread_mutex_lock(&self._lock)
            # One eventfd write per batch of completions: if some are already waiting, the
            # loop has been told and will take this one with them.
            notify = self._done_count == 0
            self._done[self._done_count] = job
            self._done_count += 1
            pthread_mutex_unlock(&self._lock)
            if notify:
                write(self._efd, &one, sizeof(one))

    def fileno(self) -> int:
        return self._efd

    def submit(self, NativeLibrary lib, cnp.ndarray X, cnp.ndarray out, bint margin=False,
               Calibrator calibrator=None, int kind=0, double param=0.0, object map_index=0) -> int:
        """Queue lib's predict of X (C-contiguous float64/float32 [n, num_feature]) into out
        (float64 [n]).  With ``calibrator``, out is [3, n]: margins, then corrected (``kind`` and
        ``param`` as calibrate_rows takes them) and mapped scores, through map ``map_index`` (an
        int) or one map per row (an int64 vector).  Every array passed must stay alive until the
        call completes."""
        cdef Job job = _job(lib, X, out, margin, calibrator, kind, param, map_index)
        job.id = self._next_id
        # Locked with the GIL held: the thread holds the lock only to move a job and never takes
        # the GIL, so the wait is short and safe, and the GIL is not handed to another thread.
        pthread_mutex_lock(&self._lock)
        # The done ring must hold every job queued or running, so its capacity bounds both.
        if self._stopping or self._queued + self._done_count >= self._capacity - 1:
            pthread_mutex_unlock(&self._lock)
            raise RuntimeError("native model thread: closed or too many calls in flight")
        self._queue[(self._queued_head + self._queued) % self._capacity] = job
        self._queued += 1
        self._next_id += 1
        # Wake the thread only if it sleeps (a busy one takes the job when it is done), and
        # after unlocking, so that it does not wake into a held mutex: each costs a syscall,
        # and a submit to a sleeping thread took 9 us in the server (measured) doing both.
        cdef bint wake = self._sleeping
        self._sleeping = False
        pthread_mutex_unlock(&self._lock)
        if wake:
            pthread_cond_signal(&self._wake)
        return job.id

    def completed(self) -> list:
        """(id, rc) of every call finished since the last look (rc as NativeLibrary.check takes it)."""
        cdef uint64_t count
        read(self._efd, &count, sizeof(count))  # reset the eventfd; EAGAIN if nothing was written
        cdef list out = []
        cdef Py_ssize_t i
        pthread_mutex_lock(&self._lock)  # with the GIL held, as in submit
        for i in range(self._done_count):
            out.append((self._done[i].id, self._done[i].rc))
        self._done_count = 0
        pthread_mutex_unlock(&self._lock)
        return out

    def close(self) -> None:
        """Finish the calls already queued, then stop the thread."""
        if not self._started:
            return
        with nogil:
            pthread_mutex_lock(&self._lock)
            self._stopping = True
            pthread_cond_signal(&self._wake)
            pthread_mutex_unlock(&self._lock)
            pthread_join(self._thread, NULL)
        self._started = False

    def __dealloc__(self):
        self.close()
        close(self._efd)
        pthread_mutex_destroy(&self._lock)
        pthread_cond_destroy(&self._wake)
        free(self._queue)
        free(self._done)
