/* The data loader's per-sample hot loops in C (optional: see setup.py).

   all_finite / pread_finite: the feature loader's finite check in one pass. A float is
   non-finite (inf or NaN) when all its exponent bits are set; NumPy can only test that in two
   integer max passes (one per sign) over a sample's 0.9 MB, the loops here read it once and
   the compiler vectorizes them (AVX2 where the CPU has it). pread_finite also does the read
   from the shard, piece by piece, each piece checked while it is still in cache.

   ustar_header: a plain ustar tar header -> (name, size), as shards._ustar_fields does in
   Python (3x faster); anything unusual -> None, and tarfile parses that header instead.

   Built by `pip install` when a C compiler is there; without it the Python fallbacks run,
   which give the same answers (tests/data/test_native.py). Figures: benchmarks/RESULTS.md. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)  /* ifunc: glibc only */
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* 1 when no element of width 2 / 4 has all bits of `mask` (the exponent) set. memcpy loads:
   the buffer need not be aligned (an in-memory .npy member's data may not be). */
VECTOR_CLONES static int no_full_exponent16(const unsigned char *p, Py_ssize_t n, uint16_t mask) {
    uint16_t hit = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t v;
        memcpy(&v, p + 2 * i, 2);
        hit |= (uint16_t)((v & mask) == mask);
    }
    return !hit;
}

VECTOR_CLONES static int no_full_exponent32(const unsigned char *p, Py_ssize_t n, uint32_t mask) {
    uint32_t hit = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t v;
        memcpy(&v, p + 4 * i, 4);
        hit |= (uint32_t)((v & mask) == mask);
    }
    return !hit;
}

static int no_full_exponent(const unsigned char *p, Py_ssize_t nbytes, int width, unsigned long mask) {
    return width == 2 ? no_full_exponent16(p, nbytes / 2, (uint16_t)mask)
                      : no_full_exponent32(p, nbytes / 4, (uint32_t)mask);
}

static int bad_width(Py_buffer *view, int width) {
    if ((width == 2 || width == 4) && view->len % width == 0)
        return 0;
    PyErr_Format(PyExc_ValueError, "%zd bytes are not whole %d-byte values", view->len, width);
    PyBuffer_Release(view);
    return 1;
}

static PyObject *all_finite(PyObject *self, PyObject *args) {
    Py_buffer view;
    int width, ok;
    unsigned long mask;
    if (!PyArg_ParseTuple(args, "y*ik", &view, &width, &mask) || bad_width(&view, width))
        return NULL;
    Py_BEGIN_ALLOW_THREADS  /* only reads the buffer, which `view` keeps alive */
    ok = no_full_exponent(view.buf, view.len, width, mask);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

#define PIECE (256 * 1024)  /* read and checked while in L2 */

static PyObject *pread_finite(PyObject *self, PyObject *args) {
    int fd, width, ok = 1, err = 0;
    long long offset;
    unsigned long mask;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "iLw*ik", &fd, &offset, &view, &width, &mask) || bad_width(&view, width))
        return NULL;
    unsigned char *buf = view.buf;
    Py_ssize_t done = 0, checked = 0;
    while (done < view.len) {
        ssize_t got;
        Py_BEGIN_ALLOW_THREADS
        got = pread(fd, buf + done, view.len - done < PIECE ? view.len - done : PIECE, offset + done);
        err = errno;
        Py_END_ALLOW_THREADS
        if (got < 0) {
            if (err == EINTR && PyErr_CheckSignals() == 0)  /* as os.pread does (PEP 475) */
                continue;
            PyBuffer_Release(&view);
            if (err != EINTR) {
                errno = err;
                PyErr_SetFromErrno(PyExc_OSError);
            }
            return NULL;
        }
        if (got == 0)  /* end of file: the caller sees the short count */
            break;
        done += got;
        Py_ssize_t whole = done - done % width;  /* a read may end inside a value */
        ok &= no_full_exponent(buf + checked, whole - checked, width, mask);
        checked = whole;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("nO", done, ok ? Py_True : Py_False);
}

/* A tar number field as plain octal: optional leading spaces, octal digits, then only NULs or
   spaces; -1 for anything else (base-256, signs, garbage: tarfile decides). */
static long long octal_field(const unsigned char *f, int n) {
    int i = 0;
    while (i < n && f[i] == ' ')
        i++;
    long long v = 0;
    int digits = 0;
    for (; i < n && f[i] >= '0' && f[i] <= '7'; i++, digits++) {
        if (digits >= 21)  /* beyond any size a header can hold */
            return -1;
        v = v * 8 + (f[i] - '0');
    }
    for (; i < n; i++)
        if (f[i] != 0 && f[i] != ' ')
            return -1;
    return v;
}

static Py_ssize_t field_len(const unsigned char *f, Py_ssize_t n) {
    const unsigned char *nul = memchr(f, 0, n);
    return nul ? nul - f : n;
}

static PyObject *ustar_header(PyObject *self, PyObject *arg) {
    char *p;
    Py_ssize_t len;
    if (PyBytes_AsStringAndSize(arg, &p, &len) < 0)
        return NULL;
    const unsigned char *h = (const unsigned char *)p;
    int posix = len == 512 && memcmp(h + 257, "ustar\0" "00", 8) == 0;
    if (len != 512 || (h[156] != '0' && h[156] != 0) || (!posix && memcmp(h + 257, "ustar  \0", 8) != 0))
        Py_RETURN_NONE;
    long sum = 256;  /* the checksum field counted as eight spaces */
    for (int i = 0; i < 512; i++)
        sum += (i >= 148 && i < 156) ? 0 : h[i];
    long long size = octal_field(h + 124, 12);
    if (octal_field(h + 148, 8) != sum || size < 0)
        Py_RETURN_NONE;
    Py_ssize_t nlen = field_len(h, 100), plen = posix ? field_len(h + 345, 155) : 0;
    if (nlen == 0 || h[nlen - 1] == '/')
        Py_RETURN_NONE;
    PyObject *name = PyBytes_FromStringAndSize(NULL, plen ? plen + 1 + nlen : nlen);
    if (name == NULL)
        return NULL;
    char *out = PyBytes_AS_STRING(name);
    if (plen) {
        memcpy(out, h + 345, plen);
        out[plen] = '/';
        out += plen + 1;
    }
    memcpy(out, h, nlen);
    return Py_BuildValue("NL", name, size);
}

static PyMethodDef methods[] = {
    {"ustar_header", ustar_header, METH_O,
     "ustar_header(header: bytes) -> (name: bytes, size) of a plain ustar regular-file header "
     "with a valid checksum and plain octal numbers, else None."},
    {"all_finite", all_finite, METH_VARARGS,
     "all_finite(buffer, width, exponent_mask) -> bool: no native-order `width`-byte value "
     "(2 or 4) of the C-contiguous buffer has every bit of `exponent_mask` set."},
    {"pread_finite", pread_finite, METH_VARARGS,
     "pread_finite(fd, offset, buffer, width, exponent_mask) -> (bytes read, all finite): fills "
     "the writable buffer from the file at `offset` (fewer bytes at its end) and checks what it "
     "read as all_finite does."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
