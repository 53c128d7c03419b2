# cython: language_level=3
"""Decoded JSON rows to the matrix a model call takes."""
cimport numpy as cnp
from cpython.float cimport PyFloat_AS_DOUBLE
from libc.math cimport NAN

cnp.import_array()


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


# -- JSON feature arrays parsed without the GIL ---------------------------------------------------

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.math cimport HUGE_VAL
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp

cdef extern from "<locale.h>" nogil:
    ctypedef void* locale_t
    locale_t newlocale(int mask, const char* locale, locale_t base)
    int LC_ALL_MASK

cdef extern from "<stdlib.h>" nogil:
    double strtod_l(const char* s, char** end, locale_t loc)

# strtod reads numbers by the C locale's rules whatever the process's locale says
cdef locale_t C_LOCALE = newlocale(LC_ALL_MASK, "C", NULL)


cdef inline Py_ssize_t _blanks(const char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (s[i] == b' ' or s[i] == b'\n' or s[i] == b'\r' or s[i] == b'\t'):
        i += 1
    return i


cdef double[23] _POW10 = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
]


cdef enum:
    MAX_NUMBER_CHARS = 1000  # longer numbers go to the whole decode, whose reading of them decides


cdef Py_ssize_t _number(const char* s, Py_ssize_t i, Py_ssize_t n, double* out) noexcept nogil:
    """Reads the JSON number at s[i] into out; returns the index after it, or -1 when it is out of
    float range or longer than MAX_NUMBER_CHARS.  Most numbers clients send (at most 15 digits,
    a power of ten within 1e22) are m * 10^e or m / 10^-e of two exact doubles, which one IEEE
    operation rounds correctly (Clinger's fast path); the rest go to strtod, at ~4x the cost.
    "-0" is the integer 0 to msgspec (and to the whole decode), so +0.0; "-0.0" stays -0.0."""
    cdef Py_ssize_t start = i, stop = i, digits = 0, fraction = 0, e = 0
    cdef unsigned long long m = 0
    cdef bint negative = s[i] == b'-', integer = True, exponent_negative = False
    cdef double v
    cdef char* end
    # the token: JSON's number grammar, which msgspec checked, uses only these characters
    while stop < n and (b'0' <= s[stop] <= b'9' or s[stop] == b'-' or s[stop] == b'+'
                        or s[stop] == b'.' or s[stop] == b'e' or s[stop] == b'E'):
        stop += 1
    if stop - start > MAX_NUMBER_CHARS:
        return -1
    if negative:
        i += 1
    while i < stop and b'0' <= s[i] <= b'9' and digits < 19:
        m = m * 10 + <unsigned long long>(s[i] - c'0')
        digits += 1
        i += 1
    if i < stop and s[i] == b'.':
        integer = False
        i += 1
        while i < stop and b'0' <= s[i] <= b'9' and digits < 19:
            m = m * 10 + <unsigned long long>(s[i] - c'0')
            digits += 1
            fraction += 1
            i += 1
    if i < stop and (s[i] == b'e' or s[i] == b'E'):
        integer = False
        i += 1
        if i < stop and (s[i] == b'+' or s[i] == b'-'):
            exponent_negative = s[i] == b'-'
            i += 1
        while i < stop and e < 100000:
            e = e * 10 + (s[i] - c'0')
            i += 1
    if exponent_negative:
        e = -e
    e -= fraction
    if i < stop or m >= (1ULL << 53) or e < -22 or e > 22:
        # more digits than the fast path holds, or a power of ten beyond exact doubles
        v = strtod_l(s + start, &end, C_LOCALE)
        if end != s + stop or v == HUGE_VAL or v == -HUGE_VAL:
            return -1  # JSON has no infinity: out of range, which msgspec refuses and the full decode names
    else:
        v = <double>m * _POW10[e] if e >= 0 else <double>m / _POW10[-e]
        if negative:
            v = -v
    if v == 0.0 and integer:
        v = 0.0
    out[0] = v
    return stop


cdef Py_ssize_t _row(const char* s, Py_ssize_t n, double* out, Py_ssize_t width) noexcept nogil:
    """When s[:n] is an array of numbers or nulls (``width`` of them, unless width < 0), their
    count, the values written to out (unless out is NULL); else -1.  s is valid JSON (msgspec
    checked it as a Raw value): a token starting with '-' or a digit is a JSON number, followed
    by a delimiter inside s."""
    cdef Py_ssize_t i = _blanks(s, 0, n), j = 0, k
    cdef double v
    if i >= n or s[i] != b'[':
        return -1
    i = _blanks(s, i + 1, n)
    if i < n and s[i] == b']':
        return 0 if width <= 0 and _blanks(s, i + 1, n) == n else -1
    while True:
        if j == width or i >= n:
            return -1
        if s[i] == b'n':
            if i + 4 > n or memcmp(s + i, b"null", 4) != 0:
                return -1
            v = NAN
            i += 4
        elif s[i] == b'-' or b'0' <= s[i] <= b'9':
            k = _number(s, i, n, &v)
            if k < 0:
                return -1
            i = k
        else:
            return -1  # a string, boolean, array or object: the full decode names it
        if out != NULL:
            out[j] = v
        j += 1
        i = _blanks(s, i, n)
        if i >= n:
            return -1
        if s[i] == b',':
            i = _blanks(s, i + 1, n)
        elif s[i] == b']':
            return j if (width < 0 or j == width) and _blanks(s, i + 1, n) == n else -1
        else:
            return -1


def raw_rows_matrix(list raws, Py_ssize_t width=-1):
    """A float64 [len(raws), width] matrix from JSON texts, each an array of ``width`` numbers
    or nulls (null -> NaN; width < 0: as many as the first has), parsed with the GIL released;
    None when any is not (an object of named features, a wrong length, a string, a number out of
    range), for the caller's full decode to handle or to name.  ``raws``: msgspec.Raw values
    decoded from a bytes body (valid JSON, in storage that ends with a NUL, where strtod stops
    at the latest)."""
    cdef Py_ssize_t n = len(raws), i, got = 0
    cdef cnp.npy_intp dims[2]
    cdef cnp.ndarray out = None
    cdef double* p = NULL
    cdef Py_buffer* views = <Py_buffer*>malloc(max(n, 1) * sizeof(Py_buffer))
    cdef int failed = 0
    if views == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            PyObject_GetBuffer(raws[i], &views[i], PyBUF_SIMPLE)
            got += 1
        if width < 0 and n:
            with nogil:
                width = _row(<const char*>views[0].buf, views[0].len, NULL, -1)
            if width < 0:
                return None
        dims[0] = n
        dims[1] = max(width, 0)
        out = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT64, 0)
        p = <double*>cnp.PyArray_DATA(out)
        with nogil:
            for i in range(n):
                if _row(<const char*>views[i].buf, views[i].len, p + i * width, width) < 0:
                    failed = 1
                    break
    finally:
        for i in range(got):
            PyBuffer_Release(&views[i])
        free(views)
    return None if failed else out
