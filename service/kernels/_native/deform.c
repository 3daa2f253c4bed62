/* 3x3 deformable convolution (stride 1, padding 1, dilation 1, one offset group, no mask) on
 * the CPU, for the window head of DeRefNet (service/deform.py is its Python face).
 *
 * Why it exists: ONNX Runtime's CPU DeformConv kernel computes the bilinear weights of every
 * sample once per input channel; in the head it took 61 % of the time. Here each sample's four
 * corner weights are computed once and applied to all channels at once (features transposed
 * to channel-last, so a corner is one contiguous vector), and the 3x3 x C_in columns of a few
 * pixels at a time are multiplied by the weights with vector accumulators held in registers.
 *
 * Sampling follows torchvision.ops.deform_conv2d (and the ONNX DeformConv operator): tap k of
 * output pixel (i, j) reads the input at (i + k/3 - 1 + dy_k, j + k%3 - 1 + dx_k), with offset
 * channel 2k holding dy_k and 2k+1 holding dx_k; a point with row or column <= -1 or >= the
 * size reads 0, and each of its four bilinear corners outside the map reads 0. NaN offsets
 * read 0.
 */
#include "native.h"
#include <math.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#define PB 4  /* output pixels per register block: 4 x 2 x 16 accumulators */

/* Columns of output pixel p: col[k * cin + c] = bilinear sample of channel c for tap k. The
 * four corners are summed in registers and stored once (a corner outside the map gets weight
 * 0 and reads the zero row hw of xt), so no column value makes a round trip through memory. */
INLINE void sample_columns(const float *restrict xt, const float *restrict off, int h, int w,
                           int cin, int p, float *restrict col) {
    const int hw = h * w, i = p / w, j = p % w;
    for (int k = 0; k < 9; k++) {
        float *restrict ck = col + k * cin;
        const float py = (float)(i + k / 3 - 1) + off[(2 * k) * hw + p];
        const float px = (float)(j + k % 3 - 1) + off[(2 * k + 1) * hw + p];
        if (!(py > -1.0f && py < (float)h && px > -1.0f && px < (float)w)) {
            for (int c = 0; c < cin; c++) ck[c] = 0.0f;
            continue;
        }
        const float fy = floorf(py), fx = floorf(px);
        const int y0 = (int)fy, x0 = (int)fx;
        const float ly = py - fy, lx = px - fx;
        const int ok_y0 = y0 >= 0, ok_y1 = y0 + 1 < h, ok_x0 = x0 >= 0, ok_x1 = x0 + 1 < w;
        const float w00 = ok_y0 && ok_x0 ? (1 - ly) * (1 - lx) : 0.0f;
        const float w01 = ok_y0 && ok_x1 ? (1 - ly) * lx : 0.0f;
        const float w10 = ok_y1 && ok_x0 ? ly * (1 - lx) : 0.0f;
        const float w11 = ok_y1 && ok_x1 ? ly * lx : 0.0f;
        /* xt row hw is zeros: an outside corner reads it (0 * a NaN pixel would be NaN). */
        const float *restrict s00 = xt + (ok_y0 && ok_x0 ? y0 * w + x0 : hw) * cin;
        const float *restrict s01 = xt + (ok_y0 && ok_x1 ? y0 * w + x0 + 1 : hw) * cin;
        const float *restrict s10 = xt + (ok_y1 && ok_x0 ? (y0 + 1) * w + x0 : hw) * cin;
        const float *restrict s11 = xt + (ok_y1 && ok_x1 ? (y0 + 1) * w + x0 + 1 : hw) * cin;
        for (int c = 0; c < cin; c++)
            ck[c] = w00 * s00[c] + w01 * s01[c] + w10 * s10[c] + w11 * s11[c];
    }
}

/* out[o, p0 + pb] = bias[o] + sum_r col[pb][r] wt[r, o] for PB pixels, 32 outputs at a time. */
INLINE void gemm_block32(const float *restrict col, int kdim, const float *restrict wt, int cout,
                         const float *restrict bias, float *restrict out, int hw, int p0, int np) {
    for (int ob = 0; ob < cout; ob += 32) {
        v16 acc[PB][2];
        for (int pb = 0; pb < PB; pb++) acc[pb][0] = acc[pb][1] = (v16){0};
        for (int r = 0; r < kdim; r++) {
            const v16 w0 = *(const v16 *)(wt + r * cout + ob);
            const v16 w1 = *(const v16 *)(wt + r * cout + ob + 16);
            for (int pb = 0; pb < PB; pb++) {
                const float v = col[pb * kdim + r];
                acc[pb][0] += v * w0;
                acc[pb][1] += v * w1;
            }
        }
        for (int pb = 0; pb < np; pb++)
            for (int o = 0; o < 32; o++)
                out[(ob + o) * hw + p0 + pb] = acc[pb][o / 16][o % 16] + bias[ob + o];
    }
}

INLINE void gemm_block_any(const float *restrict col, int kdim, const float *restrict wt, int cout,
                           const float *restrict bias, float *restrict out, int hw, int p0, int np) {
    for (int pb = 0; pb < np; pb++)
        for (int o = 0; o < cout; o++) {
            float s = bias[o];
            for (int r = 0; r < kdim; r++) s += col[pb * kdim + r] * wt[r * cout + o];
            out[o * hw + p0 + pb] = s;
        }
}

/* One map: x (cin, h, w), off (18, h, w) -> out (cout, h, w). wt is (9 * cin, cout) with
 * wt[(k * cin + c) * cout + o] = weight[o, c, k / 3, k % 3]. xt ((h*w + 1) * cin) and col
 * (PB*9*cin) are scratch. Indices within a map are int: run() bounds a map's size. */
INLINE void deform_map(const float *restrict x, const float *restrict off,
                       const float *restrict wt, const float *restrict bias, float *restrict out,
                       const int cin, const int cout, int h, int w, float *restrict xt,
                       float *restrict col) {
    const int hw = h * w, kdim = 9 * cin;
    for (int c = 0; c < cin; c++)
        for (int p = 0; p < hw; p++) xt[p * cin + c] = x[c * hw + p];
    for (int c = 0; c < cin; c++) xt[hw * cin + c] = 0.0f;
    for (int p0 = 0; p0 < hw; p0 += PB) {
        const int np = hw - p0 < PB ? hw - p0 : PB;
        for (int pb = 0; pb < PB; pb++) {
            if (pb >= np) memset(col + pb * kdim, 0, sizeof(float) * kdim);
            else sample_columns(xt, off, h, w, cin, p0 + pb, col + pb * kdim);
        }
        if (cout % 32 == 0) gemm_block32(col, kdim, wt, cout, bias, out, hw, p0, np);
        else gemm_block_any(col, kdim, wt, cout, bias, out, hw, p0, np);
    }
}

/* n maps; DeRefNet's 32 -> 32 channels get their own copy with literal sizes, which lets the
 * compiler unroll a corner and a weight row into whole vectors (about 1.3x faster). */
TARGETS static void deform_maps(const float *x, const float *off, const float *wt,
                                const float *bias, float *out, int n, int cin, int cout, int h,
                                int w, float *xt, float *col) {
    const int64_t hw = (int64_t)h * w;
    if (cin == 32 && cout == 32)
        for (int b = 0; b < n; b++)
            deform_map(x + (int64_t)b * 32 * hw, off + (int64_t)b * 18 * hw, wt, bias,
                       out + (int64_t)b * 32 * hw, 32, 32, h, w, xt, col);
    else
        for (int b = 0; b < n; b++)
            deform_map(x + (int64_t)b * cin * hw, off + (int64_t)b * 18 * hw, wt, bias,
                       out + (int64_t)b * cout * hw, cin, cout, h, w, xt, col);
}

/* run(x, offset, wt, bias, out, n, cin, cout, h, w): float32 C-contiguous buffers. */
static PyObject *run(PyObject *self, PyObject *args) {
    PyObject *ox, *ooff, *owt, *obias, *oout;
    int n, cin, cout, h, w;
    if (!PyArg_ParseTuple(args, "OOOOOiiiii", &ox, &ooff, &owt, &obias, &oout, &n, &cin, &cout,
                          &h, &w))
        return NULL;
    /* Indices within one map are int: keep a map's largest array (9*cin columns or 18 offset
     * channels or cout outputs, per pixel, plus the zero row) well inside INT_MAX. */
    const Py_ssize_t hw = (Py_ssize_t)h * w;
    const Py_ssize_t widest = 9 * (Py_ssize_t)(cin > cout ? cin : cout) + 18;
    if (n < 0 || cin < 1 || cout < 1 || h < 1 || w < 1 || cin > 4096 || cout > 4096 ||
        (hw + 1) * widest > INT_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "deform: bad dimensions");
        return NULL;
    }
    Py_buffer bx, boff, bwt, bbias, bout;
    if (get_buffer(ox, &bx, (Py_ssize_t)n * cin * hw, "f", 0, "x") < 0) return NULL;
    if (get_buffer(ooff, &boff, (Py_ssize_t)n * 18 * hw, "f", 0, "offset") < 0) goto fail_x;
    if (get_buffer(owt, &bwt, (Py_ssize_t)9 * cin * cout, "f", 0, "weight") < 0) goto fail_off;
    if (get_buffer(obias, &bbias, cout, "f", 0, "bias") < 0) goto fail_wt;
    if (get_buffer(oout, &bout, (Py_ssize_t)n * cout * hw, "f", 1, "out") < 0) goto fail_bias;
    float *xt = malloc(sizeof(float) * (hw + 1) * cin);
    float *col = malloc(sizeof(float) * PB * 9 * cin);
    if (!xt || !col) {
        free(xt);
        free(col);
        PyErr_NoMemory();
        goto fail_out;
    }
    Py_BEGIN_ALLOW_THREADS
    deform_maps(bx.buf, boff.buf, bwt.buf, bbias.buf, bout.buf, n, cin, cout, h, w, xt, col);
    Py_END_ALLOW_THREADS
    free(xt);
    free(col);
    PyBuffer_Release(&bout);
    PyBuffer_Release(&bbias);
    PyBuffer_Release(&bwt);
    PyBuffer_Release(&boff);
    PyBuffer_Release(&bx);
    Py_RETURN_NONE;
fail_out:
    PyBuffer_Release(&bout);
fail_bias:
    PyBuffer_Release(&bbias);
fail_wt:
    PyBuffer_Release(&bwt);
fail_off:
    PyBuffer_Release(&boff);
fail_x:
    PyBuffer_Release(&bx);
    return NULL;
}

static PyMethodDef methods[] = {
    {"run", run, METH_VARARGS, "run(x, offset, wt, bias, out, n, cin, cout, h, w): see deform.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_deform", NULL, -1, methods};

PyMODINIT_FUNC PyInit__deform(void) { return PyModule_Create(&module); }
