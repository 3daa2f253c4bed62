/* What both native extensions (deform.c, conv.c) share: the CPU-dispatch and inlining macros,
 * the 16-float vector type and the checked buffer access of their Python entry points. */
#ifndef CSIST_NATIVE_H
#define CSIST_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TARGETS
#endif
#define INLINE static inline __attribute__((always_inline))

typedef float v16 __attribute__((vector_size(64), aligned(4))); /* unaligned loads allowed */

/* A C-contiguous buffer of exactly n_items items of struct format ``format`` ("f": float32,
 * "H": uint16, the bfloat16 weights); else -1 with a TypeError / ValueError naming ``name``. */
static inline int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t n_items, const char *format,
                             int writable, const char *name) {
    const char *kind = strcmp(format, "f") == 0 ? "float32" : strcmp(format, "H") == 0 ? "uint16" : format;
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0) return -1;
    if (view->format == NULL || strcmp(view->format, format) != 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected %s values, got format %s", name, kind,
                     view->format ? view->format : "bytes");
        PyBuffer_Release(view);
        return -1;
    }
    if (view->len != n_items * view->itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd %s values, got %zd bytes", name, n_items, kind,
                     view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

#endif
