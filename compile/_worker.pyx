# cython: language_level=3
"""A native model thread: model calls run off the caller's thread (and core) on a
pthread that never takes the GIL, and completions are signalled on an eventfd."""
cimport numpy as cnp
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc

from ._library cimport Job, NativeLibrary, NativeMapTable, make_job, run_job

cnp.import_array()

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

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clock, timespec* ts)
    int CLOCK_MONOTONIC


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void* buf, size_t count)
    ssize_t write(int fd, const void* buf, size_t count)
    int close(int fd)


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
            job.seconds = _now()
            job.rc = run_job(&job)
            job.seconds = _now() - job.seconds
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
               NativeMapTable maps=None, int kind=0, double param=0.0, object map_index=0) -> int:
        """Queue lib's predict of X (C-contiguous float64/float32 [n, num_feature]) into out
        (float64 [n]).  With ``maps``, out is [3, n]: margins, then corrected (``kind`` and
        ``param`` as calibrate_rows takes them) and mapped scores, through map ``map_index`` (an
        int) or one map per row (an int64 vector).  Every array passed must stay alive until the
        call completes."""
        cdef Job job = make_job(lib, X, out, margin, maps, kind, param, map_index)
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
        """(id, rc, seconds) of every call finished since the last look (rc as NativeLibrary.failure
        takes it; seconds: the call's own time on the thread, not its wait in the queue)."""
        cdef uint64_t count
        read(self._efd, &count, sizeof(count))  # reset the eventfd; EAGAIN if nothing was written
        cdef list out = []
        cdef Py_ssize_t i
        pthread_mutex_lock(&self._lock)  # with the GIL held, as in submit
        for i in range(self._done_count):
            out.append((self._done[i].id, self._done[i].rc, self._done[i].seconds))
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
