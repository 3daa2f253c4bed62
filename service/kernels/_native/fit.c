/* The physics fit's least-squares solve (service/science/refine.py, _solve_lm) in C.
 *
 * Why it exists: a window's fit is a few hundred residuals and at most 30 parameters, so numpy
 * spends most of each Levenberg-Marquardt iteration on call overhead, not arithmetic. This file
 * is the same algorithm on the same model (refine._Problem: residuals, analytic Jacobian,
 * saturation, stuck pixels, clutter whitening, priors, box bounds); refine.py keeps the numpy
 * version as the reference the tests compare with.
 *
 * Parameters theta = (x_1..K, y_1..K, a_1..K, vx, vy, [s], [b0, b1, b2]); a target's column
 * position in frame f is x + vx t_f (rows alike), and its share of pixel i along an axis is
 * 0.5 (erf((i + 0.5 - p) / (s sqrt 2)) - erf((i - 0.5 - p) / (s sqrt 2))), as
 * service.science.physics.pixel_fractions. With the frames free (refine._FrameProblem) theta
 * goes on with every other frame's offset (ox, then oy, of the F-1 frames but the middle one)
 * and its gains (F-1, K) row-major: the position gains ox_f, the brightness a_k g_fk.
 *
 * kmeans clusters the network's peaks into a fit's starts (refine._cluster), and edge_fit places a
 * background edge (plane plus a blurred step, service.science.background.
 * fit_edge) from a window's far pixels, grid search and Levenberg-Marquardt, for the same reason.
 */
#include "native.h"
#include <math.h>
#include <stdlib.h>

#define MAXP 64 /* parameters: up to 19 targets with velocity, PSF sigma and plane (refine.NATIVE_MAX_PARAMS) */

/* one Gaussian of the PSF, per axis ([0] the columns, [1] the rows): the fractions (nf, k, nc |
 * nr) of every target in every frame, their derivatives in position (d) and in sigma (s) */
typedef struct {
    double *f[2], *d[2], *s[2];
} Gauss;

typedef struct {
    int k, nf, nr, nc, r0, c0, n_psf, n_bg, nbs, p, n, npix, nwhite, nprior, nres;
    /* the frame terms: on or off, the middle frame (which has none), where they start in theta */
    int ff, mid, ioff, igain;
    double scale, sigma;
    /* the PSF's halo (refine.FitConfig.psf_halo): its share of the flux and its sigma over the
     * core's; share 0: a Gaussian core alone */
    double halo, width;
    const double *times, *obs, *sat, *stuck, *bgb, *white, *pcols, *pmean, *pw;
    /* work: the core's and the halo's fractions, the model */
    Gauss g[2];
    double *model, *raw, *jraw, *mean;
} Prob;

INLINE double sigma_of(const Prob *q, const double *th) { return q->n_psf ? th[3 * q->k + 2] : q->sigma; }

/* frame t's place among the frames with terms, -1 for the middle frame or without them */
INLINE int other(const Prob *q, int t) { return q->ff && t != q->mid ? (t < q->mid ? t : t - 1) : -1; }

/* frame t's offset along one axis (0 columns, 1 rows) */
INLINE double offset(const Prob *q, const double *th, int which, int t) {
    const int o = other(q, t);
    return o < 0 ? 0.0 : th[q->ioff + which * (q->nf - 1) + o];
}

/* target j's brightness gain in frame t */
INLINE double gain(const Prob *q, const double *th, int t, int j) {
    const int o = other(q, t);
    return o < 0 ? 1.0 : th[q->igain + o * q->k + j];
}

/* fractions of every target in every frame along one axis, for the Gaussian g of sigma s */
static void fractions(const Prob *q, const double *th, int which, double s, const Gauss *g) {
    const int k = q->k, len = which ? q->nr : q->nc, o = which ? q->r0 : q->c0;
    const double inv = 1.0 / (s * sqrt(2.0));
    for (int t = 0; t < q->nf; t++)
        for (int j = 0; j < k; j++) {
            const double p = th[which * k + j] + th[3 * k + which] * q->times[t] + offset(q, th, which, t);
            double *fr = g->f[which] + ((size_t)t * k + j) * len;
            double c_lo = erf(((o - 0.5) - p) * inv);
            for (int i = 0; i < len; i++) {
                const double c_hi = erf(((o + i + 0.5) - p) * inv);
                fr[i] = 0.5 * (c_hi - c_lo);
                c_lo = c_hi;
            }
        }
}

/* the fractions' derivatives in position (d) and in sigma (s), as fractions() */
static void derivatives(const Prob *q, const double *th, int which, double s, const Gauss *g) {
    const int k = q->k, len = which ? q->nr : q->nc, o = which ? q->r0 : q->c0;
    const double dens = 1.0 / (s * sqrt(2.0 * M_PI));
    for (int t = 0; t < q->nf; t++)
        for (int j = 0; j < k; j++) {
            const double p = th[which * k + j] + th[3 * k + which] * q->times[t] + offset(q, th, which, t);
            double *dr = g->d[which] + ((size_t)t * k + j) * len, *sr = g->s[which] + ((size_t)t * k + j) * len;
            double u = (o - 0.5) - p;
            double g_lo = exp(-0.5 * (u / s) * (u / s)) * dens, h_lo = -(u / s) * g_lo;
            for (int i = 0; i < len; i++) {
                u = (o + i + 0.5) - p;
                const double e = exp(-0.5 * (u / s) * (u / s)) * dens;
                const double h = -(u / s) * e;
                dr[i] = -(e - g_lo);
                sr[i] = h - h_lo;
                g_lo = e;
                h_lo = h;
            }
        }
}

/* the fractions, the model and the raw residuals (model - obs, saturation as a bound, stuck
 * pixels 0) at th */
static void evaluate(Prob *q, const double *th) {
    const double s = sigma_of(q, th), h = q->halo, core = 1.0 - h;
    const Gauss *cg = &q->g[0], *hg = &q->g[1];
    for (int which = 0; which < 2; which++) {
        fractions(q, th, which, s, cg);
        if (h > 0.0) fractions(q, th, which, q->width * s, hg);
    }
    const int k = q->k, nr = q->nr, nc = q->nc;
    const double *a = th + 2 * k, *b = th + 3 * k + 2 + q->n_psf;
    for (int t = 0; t < q->nf; t++)
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < nc; c++) {
                const size_t i = ((size_t)t * nr + r) * nc + c;
                double m = 0.0;
                for (int j = 0; j < k; j++) {
                    const size_t bx = ((size_t)t * k + j) * nc + c, by = ((size_t)t * k + j) * nr + r;
                    double u = cg->f[1][by] * cg->f[0][bx];
                    if (h > 0.0) u = core * u + h * hg->f[1][by] * hg->f[0][bx];
                    m += a[j] * gain(q, th, t, j) * u;
                }
                for (int l = 0; l < q->n_bg; l++) m += q->bgb[i * q->nbs + l] * b[l];
                q->model[i] = m;
                double d = m - q->obs[i];
                if (q->sat[i] != 0.0 && d > 0.0) d = 0.0;
                if (q->stuck[i] != 0.0) d = 0.0;
                q->raw[i] = d;
            }
}

/* raw rows x (n, w) -> the data part of the residual rows out (nres - nprior, w): x / scale, or
 * with clutter each frame's deviation from the frame mean / scale and the frame mean whitened by
 * the clutter-plus-noise covariance (white: the inverse of its lower Cholesky factor) */
static void whiten(const Prob *q, const double *x, int w, double *out) {
    const size_t n = (size_t)q->n * w;
    if (!q->white) {
        for (size_t i = 0; i < n; i++) out[i] = x[i] / q->scale;
        return;
    }
    const size_t np = (size_t)q->npix * w;
    double *m = q->mean;
    for (size_t i = 0; i < np; i++) m[i] = 0.0;
    for (int t = 0; t < q->nf; t++)
        for (size_t i = 0; i < np; i++) m[i] += x[t * np + i];
    for (size_t i = 0; i < np; i++) m[i] /= q->nf;
    for (int t = 0; t < q->nf; t++)
        for (size_t i = 0; i < np; i++) out[t * np + i] = (x[t * np + i] - m[i]) / q->scale;
    /* the whitened mean: white (the inverse of the covariance's lower Cholesky factor) is
     * lower triangular */
    double *o = out + n;
    for (int r = 0; r < q->npix; r++) {
        double *restrict row = o + (size_t)r * w;
        for (int c = 0; c < w; c++) row[c] = 0.0;
        const double *wr = q->white + (size_t)r * q->npix;
        for (int i = 0; i <= r; i++) {
            const double v = wr[i];
            if (v == 0.0) continue;
            const double *restrict mi = m + (size_t)i * w;
            for (int c = 0; c < w; c++) row[c] += v * mi[c];
        }
    }
}

static void residuals(Prob *q, const double *th, double *res) {
    evaluate(q, th);
    whiten(q, q->raw, 1, res);
    double *pr = res + q->nres - q->nprior;
    for (int i = 0; i < q->nprior; i++) {
        const int c = (int)q->pcols[i];
        pr[i] = (th[c] - q->pmean[i]) * q->pw[i];
    }
}

/* the Jacobian (nres, p) at th; evaluate(q, th) must have run last (its fractions and model
 * are reused: the solver asks for the Jacobian at the point it last accepted) */
static void jacobian(Prob *q, const double *th, double *jac) {
    const double s = sigma_of(q, th);
    for (int which = 0; which < 2; which++) {
        derivatives(q, th, which, s, &q->g[0]);
        if (q->halo > 0.0) derivatives(q, th, which, q->width * s, &q->g[1]);
    }
    const int k = q->k, nr = q->nr, nc = q->nc, p = q->p, is = 3 * k + 2, ib = 3 * k + 2 + q->n_psf;
    const double *a = th + 2 * k, h = q->halo, core = 1.0 - h;
    const Gauss *cg = &q->g[0], *hg = &q->g[1];
    double *jr = q->jraw;
    for (int t = 0; t < q->nf; t++)
        for (int r = 0; r < nr; r++)
            for (int c = 0; c < nc; c++) {
                const size_t i = ((size_t)t * nr + r) * nc + c;
                double *row = jr + i * p;
                for (int l = 0; l < p; l++) row[l] = 0.0;
                if ((q->sat[i] != 0.0 && q->model[i] >= q->obs[i]) || q->stuck[i] != 0.0) continue;
                double vx = 0.0, vy = 0.0, ds = 0.0;
                const int o = other(q, t);
                for (int j = 0; j < k; j++) {
                    const size_t bx = ((size_t)t * k + j) * nc + c, by = ((size_t)t * k + j) * nr + r;
                    const double fx = cg->f[0][bx], fy = cg->f[1][by];
                    double gx = fy * cg->d[0][bx], gy = cg->d[1][by] * fx, u = fy * fx;
                    double sg = q->n_psf ? cg->s[1][by] * fx + fy * cg->s[0][bx] : 0.0;
                    if (h > 0.0) { /* the halo's sigma is width x the core's: d / d sigma gains width */
                        const double hx = hg->f[0][bx], hy = hg->f[1][by];
                        gx = core * gx + h * hy * hg->d[0][bx];
                        gy = core * gy + h * hg->d[1][by] * hx;
                        u = core * u + h * hy * hx;
                        if (q->n_psf) sg = core * sg + h * q->width * (hg->s[1][by] * hx + hy * hg->s[0][bx]);
                    }
                    const double g = gain(q, th, t, j), ag = a[j] * g;
                    gx *= ag;
                    gy *= ag;
                    row[j] = gx;
                    row[k + j] = gy;
                    row[2 * k + j] = u * g;
                    vx += gx;
                    vy += gy;
                    ds += ag * sg;
                    if (o >= 0) row[q->igain + o * k + j] = u * a[j];
                }
                row[3 * k] = q->times[t] * vx;
                row[3 * k + 1] = q->times[t] * vy;
                if (o >= 0) {
                    row[q->ioff + o] = vx;
                    row[q->ioff + q->nf - 1 + o] = vy;
                }
                if (q->n_psf) row[is] = ds;
                for (int l = 0; l < q->n_bg; l++) row[ib + l] = q->bgb[i * q->nbs + l];
            }
    whiten(q, jr, p, jac);
    double *pj = jac + (size_t)(q->nres - q->nprior) * p;
    for (int i = 0; i < q->nprior * p; i++) pj[i] = 0.0;
    for (int i = 0; i < q->nprior; i++) pj[(size_t)i * p + (int)q->pcols[i]] = q->pw[i];
}

/* Cholesky solve of the SPD m x m system h x = b in place (h destroyed); -1 if not SPD */
static int chol_solve(double *h, int m, double *b) {
    for (int j = 0; j < m; j++) {
        double d = h[j * m + j];
        for (int l = 0; l < j; l++) d -= h[j * m + l] * h[j * m + l];
        if (!(d > 0.0)) return -1;
        d = sqrt(d);
        h[j * m + j] = d;
        for (int i = j + 1; i < m; i++) {
            double v = h[i * m + j];
            for (int l = 0; l < j; l++) v -= h[i * m + l] * h[j * m + l];
            h[i * m + j] = v / d;
        }
    }
    for (int i = 0; i < m; i++) {
        double v = b[i];
        for (int l = 0; l < i; l++) v -= h[i * m + l] * b[l];
        b[i] = v / h[i * m + i];
    }
    for (int i = m - 1; i >= 0; i--) {
        double v = b[i];
        for (int l = i + 1; l < m; l++) v -= h[l * m + i] * b[l];
        b[i] = v / h[i * m + i];
    }
    return 0;
}

/* refine._bounded_step: the damped step with parameters it would push past a bound put on it
 * and the rest solved again; -1 when the damped system is singular */
static int bounded_step(const double *hess, const double *grad, const double *damp, const double *th,
                        const double *lo, const double *hi, const int *free_in, int p, double *step) {
    int free[MAXP], idx[MAXP];
    double h[MAXP * MAXP], rhs[MAXP];
    for (int i = 0; i < p; i++) {
        free[i] = free_in[i];
        step[i] = 0.0;
    }
    for (int it = 0; it < p; it++) {
        int m = 0;
        for (int i = 0; i < p; i++)
            if (free[i]) idx[m++] = i;
        if (m == 0) return 0;
        for (int a = 0; a < m; a++) {
            const int i = idx[a];
            double v = -grad[i];
            for (int j = 0; j < p; j++)
                if (!free[j]) v -= hess[i * p + j] * step[j];
            rhs[a] = v;
            for (int b = 0; b < m; b++) h[a * m + b] = hess[i * p + idx[b]];
            h[a * m + a] += damp[i];
        }
        if (chol_solve(h, m, rhs) != 0) return -1;
        int out = 0;
        for (int a = 0; a < m; a++) {
            const int i = idx[a];
            step[i] = rhs[a];
            const double nw = th[i] + rhs[a];
            if (nw < lo[i] || nw > hi[i]) out = 1;
        }
        if (!out) return 0;
        for (int a = 0; a < m; a++) {
            const int i = idx[a];
            const double nw = th[i] + rhs[a];
            if (nw < lo[i] || nw > hi[i]) {
                step[i] = (nw < lo[i] ? lo[i] : hi[i]) - th[i];
                free[i] = 0;
            }
        }
    }
    return 0;
}

static double dot(const double *a, const double *b, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* hess = J^T J and grad = J^T r of the rows jac (nres, p) and r (nres). Four rows at a time, so
 * that each element of hess is loaded and stored once per four rows; each sum still runs over
 * the rows in order. */
static void normal_equations(const double *jac, const double *res, int nres, int p, double *hess, double *grad) {
    for (int i = 0; i < p; i++) {
        grad[i] = 0.0;
        for (int j = 0; j <= i; j++) hess[i * p + j] = 0.0;
    }
    int r = 0;
    for (; r + 4 <= nres; r += 4) {
        const double *r0 = jac + (size_t)r * p, *r1 = r0 + p, *r2 = r1 + p, *r3 = r2 + p;
        for (int i = 0; i < p; i++) {
            const double v0 = r0[i], v1 = r1[i], v2 = r2[i], v3 = r3[i];
            if (v0 == 0.0 && v1 == 0.0 && v2 == 0.0 && v3 == 0.0) continue;
            double g = grad[i];
            g += v0 * res[r];
            g += v1 * res[r + 1];
            g += v2 * res[r + 2];
            g += v3 * res[r + 3];
            grad[i] = g;
            double *restrict hi = hess + (size_t)i * p;
            for (int j = 0; j <= i; j++) {
                double h = hi[j];
                h += v0 * r0[j];
                h += v1 * r1[j];
                h += v2 * r2[j];
                h += v3 * r3[j];
                hi[j] = h;
            }
        }
    }
    for (; r < nres; r++) {
        const double *row = jac + (size_t)r * p;
        for (int i = 0; i < p; i++) {
            const double v = row[i];
            if (v == 0.0) continue;
            grad[i] += v * res[r];
            for (int j = 0; j <= i; j++) hess[i * p + j] += v * row[j];
        }
    }
    for (int i = 0; i < p; i++)
        for (int j = 0; j < i; j++) hess[j * p + i] = hess[i * p + j];
}

/* refine._solve_lm: theta in place; returns the residual evaluations, and the data part of the
 * final cost (the chi2 without the priors) in data_cost */
static int solve(Prob *q, double *th, const double *lo, const double *hi, const double *xs, int max_nfev,
                 double tol, double *res, double *res_new, double *jac, double *data_cost) {
    const int p = q->p, nres = q->nres;
    double hess[MAXP * MAXP], grad[MAXP], diag[MAXP], damp[MAXP], step[MAXP], nw[MAXP], hs[MAXP];
    int free[MAXP];
    residuals(q, th, res);
    double cost = dot(res, res, nres), cost_new = cost;
    int nfev = 1;
    double lam = 1e-3, nu = 2.0;
    while (nfev < max_nfev) {
        jacobian(q, th, jac); /* the last residuals() ran at th */
        normal_equations(jac, res, nres, p, hess, grad);
        int any_free = 0;
        double hmax = 0.0;
        for (int i = 0; i < p; i++) {
            free[i] = !((th[i] <= lo[i] && grad[i] > 0) || (th[i] >= hi[i] && grad[i] < 0));
            any_free |= free[i];
            if (hess[i * p + i] > hmax) hmax = hess[i * p + i];
        }
        if (!any_free) break;
        const double floor = 1e-12 * (hmax > 1e-300 ? hmax : 1e-300);
        for (int i = 0; i < p; i++) diag[i] = hess[i * p + i] > floor ? hess[i * p + i] : floor;
        int improved = 0;
        while (nfev < max_nfev) {
            for (int i = 0; i < p; i++) damp[i] = diag[i] * lam;
            if (bounded_step(hess, grad, damp, th, lo, hi, free, p, step) != 0) {
                lam *= nu;
                nu *= 2.0;
                if (lam > 1e12) break;
                continue;
            }
            for (int i = 0; i < p; i++) {
                const double v = th[i] + step[i];
                nw[i] = v < lo[i] ? lo[i] : (v > hi[i] ? hi[i] : v);
            }
            residuals(q, nw, res_new);
            nfev++;
            cost_new = dot(res_new, res_new, nres);
            for (int i = 0; i < p; i++) hs[i] = 2.0 * grad[i] + dot(hess + (size_t)i * p, step, p);
            const double predicted = -dot(step, hs, p);
            if (cost_new < cost) {
                const double rho = predicted > 0 ? (cost - cost_new) / predicted : 1.0;
                const double f = 1.0 - (2.0 * rho - 1.0) * (2.0 * rho - 1.0) * (2.0 * rho - 1.0);
                lam *= f > 1.0 / 3.0 ? f : 1.0 / 3.0;
                nu = 2.0;
                improved = 1;
                break;
            }
            lam *= nu;
            nu *= 2.0;
            if (lam > 1e12) break;
        }
        if (!improved) break;
        int small_step = 1;
        for (int i = 0; i < p; i++)
            if (!(fabs(nw[i] - th[i]) <= tol * xs[i])) small_step = 0;
        const int small_gain = cost - cost_new <= tol * cost;
        for (int i = 0; i < p; i++) th[i] = nw[i];
        double *tmp = res;
        res = res_new;
        res_new = tmp;
        cost = cost_new;
        if (small_step || small_gain) break;
    }
    *data_cost = dot(res, res, nres - q->nprior);
    return nfev;
}

/* a Gaussian's arrays from the work buffer w, fxn values each along the columns and fyn along
 * the rows; returns what follows them */
static double *carve(double *w, size_t fxn, size_t fyn, Gauss *g) {
    for (int which = 0; which < 2; which++) {
        const size_t len = which ? fyn : fxn;
        g->f[which] = w, w += len;
        g->d[which] = w, w += len;
        g->s[which] = w, w += len;
    }
    return w;
}

/* lm(theta, lower, upper, x_scale, times, obs, sat, stuck, bg_basis, white, prior_cols,
 *    prior_mean, prior_w, k, n_rows, n_cols, r0, c0, n_psf, n_bg, max_nfev, scale, sigma, tol
 *    [, halo, width])
 * -> (residual evaluations, data chi2 at the solution). float64 C-contiguous buffers; theta is
 * updated in place; white is the inverse of the clutter-plus-noise covariance's lower Cholesky
 * factor, (n_rows * n_cols)^2 values, or empty (no clutter); sat and stuck are 0/1 per fitted
 * pixel; bg_basis has 3 columns (the plane), or 4 where n_bg is 4 (the plane and an edge); halo
 * (0 by default) is the share of the flux in the PSF's halo, a Gaussian width x the core's sigma;
 * frames_free (0 by default) appends the frame terms to theta (see the top of this file). */
static PyObject *lm(PyObject *self, PyObject *args) {
    PyObject *o[13];
    int k, nr, nc, r0, c0, n_psf, n_bg, max_nfev, ff = 0;
    double scale, sigma, tol, halo = 0.0, width = 1.0;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOiiiiiiiiddd|ddi", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                          &o[7], &o[8], &o[9], &o[10], &o[11], &o[12], &k, &nr, &nc, &r0, &c0, &n_psf, &n_bg,
                          &max_nfev, &scale, &sigma, &tol, &halo, &width, &ff))
        return NULL;
    if (!(halo >= 0.0 && halo < 1.0) || !(width > 0.0)) {
        PyErr_SetString(PyExc_ValueError, "lm: halo must be in [0, 1) and width > 0");
        return NULL;
    }
    Py_buffer b[13];
    int got = 0;
    /* times first: its length gives the frames */
    if (PyObject_GetBuffer(o[4], &b[4], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return NULL;
    const Py_ssize_t nf = b[4].len / (Py_ssize_t)sizeof(double);
    PyBuffer_Release(&b[4]);
    const Py_ssize_t base = 3 * (Py_ssize_t)k + 2 + n_psf + n_bg, p = base + (ff ? (nf - 1) * (2 + (Py_ssize_t)k) : 0);
    if (k < 1 || nr < 1 || nc < 1 || p > MAXP || (n_psf != 0 && n_psf != 1) || (n_bg != 0 && n_bg != 3 && n_bg != 4) ||
        !(scale > 0.0) || !(sigma > 0.0) || max_nfev < 1 || (ff != 0 && ff != 1) || (ff && nf < 2)) {
        PyErr_SetString(PyExc_ValueError, "lm: bad dimensions or settings");
        return NULL;
    }
    const Py_ssize_t npix = (Py_ssize_t)nr * nc, n = nf * npix;
    Py_ssize_t nwhite = 0;
    {
        Py_buffer w;
        if (PyObject_GetBuffer(o[9], &w, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return NULL;
        nwhite = w.len / (Py_ssize_t)sizeof(double);
        PyBuffer_Release(&w);
    }
    Py_ssize_t nprior = 0;
    {
        Py_buffer w;
        if (PyObject_GetBuffer(o[10], &w, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return NULL;
        nprior = w.len / (Py_ssize_t)sizeof(double);
        PyBuffer_Release(&w);
    }
    if (nwhite != 0 && nwhite != npix * npix) {
        PyErr_SetString(PyExc_ValueError, "lm: white must be (n_rows * n_cols)^2 values or empty");
        return NULL;
    }
    const int nbs = n_bg == 4 ? 4 : 3; /* bg_basis columns: the plane, and an edge where n_bg is 4 */
    const Py_ssize_t sizes[13] = {p, p, p, p, nf, n, n, n, n * nbs, nwhite, nprior, nprior, nprior};
    const char *names[13] = {"theta", "lower", "upper", "x_scale", "times", "obs", "sat", "stuck",
                             "bg_basis", "white", "prior_cols", "prior_mean", "prior_w"};
    for (got = 0; got < 13; got++)
        if (get_buffer(o[got], &b[got], sizes[got], "d", got == 0, names[got]) < 0) goto done;
    for (Py_ssize_t i = 0; i < nprior; i++) {
        const double c = ((double *)b[10].buf)[i];
        if (!(c >= 0 && c < p)) {
            PyErr_SetString(PyExc_ValueError, "lm: prior column out of range");
            goto done;
        }
    }
    Prob q = {.k = k, .nf = (int)nf, .nr = nr, .nc = nc, .r0 = r0, .c0 = c0, .n_psf = n_psf, .n_bg = n_bg, .nbs = nbs,
              .p = (int)p, .n = (int)n, .npix = (int)npix, .nwhite = (int)nwhite, .nprior = (int)nprior,
              .scale = scale, .sigma = sigma, .halo = halo, .width = width, .ff = ff, .mid = (int)nf / 2,
              .ioff = (int)base, .igain = (int)(base + 2 * (nf - 1))};
    q.nres = (int)(n + (nwhite ? npix : 0) + nprior);
    q.times = b[4].buf;
    q.obs = b[5].buf;
    q.sat = b[6].buf;
    q.stuck = b[7].buf;
    q.bgb = b[8].buf;
    q.white = nwhite ? b[9].buf : NULL;
    q.pcols = b[10].buf;
    q.pmean = b[11].buf;
    q.pw = b[12].buf;
    const size_t fxn = (size_t)nf * k * nc, fyn = (size_t)nf * k * nr;
    const size_t halos = halo > 0.0 ? 3 * fxn + 3 * fyn : 0;
    const size_t total = 3 * fxn + 3 * fyn + halos + 2 * (size_t)n + (size_t)n * p + (size_t)npix * p +
                         2 * (size_t)q.nres + (size_t)q.nres * p;
    double *work = malloc(sizeof(double) * total);
    if (!work) {
        PyErr_NoMemory();
        goto done;
    }
    double *w = carve(work, fxn, fyn, &q.g[0]);
    if (halos) w = carve(w, fxn, fyn, &q.g[1]);
    q.model = w, w += n;
    q.raw = w, w += n;
    q.jraw = w, w += (size_t)n * p;
    q.mean = w, w += (size_t)npix * p;
    double *res = w, *res_new = w + q.nres, *jac = w + 2 * (size_t)q.nres;
    int nfev;
    double data_cost = 0.0;
    Py_BEGIN_ALLOW_THREADS
    nfev = solve(&q, b[0].buf, b[1].buf, b[2].buf, b[3].buf, max_nfev, tol, res, res_new, jac, &data_cost);
    Py_END_ALLOW_THREADS
    free(work);
    for (int i = 0; i < 13; i++) PyBuffer_Release(&b[i]);
    return Py_BuildValue("id", nfev, data_cost);
done:
    for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
    return NULL;
}

/* ---- a background edge (service/science/background.py, _edge_refine: the same algorithm) ---- */

/* residuals c0 + c1 x + c2 y + C Phi(u) - z, u = (x cos a + y sin a - d) / exp(log b); their
 * squares summed; with jac, the Jacobian rows (m, 7) over (a, d, log b, c0, c1, c2, C) */
static double edge_eval(const double *p, const double *z, const double *x, const double *y, int m, double *r,
                        double *jac) {
    const double c = cos(p[0]), s = sin(p[0]), b = exp(p[2]);
    double cost = 0.0;
    for (int i = 0; i < m; i++) {
        const double u = (x[i] * c + y[i] * s - p[1]) / b;
        const double step = 0.5 * erfc(-u / sqrt(2.0));
        r[i] = p[3] + p[4] * x[i] + p[5] * y[i] + p[6] * step - z[i];
        cost += r[i] * r[i];
        if (jac) {
            const double g = p[6] * exp(-0.5 * u * u) / (sqrt(2.0 * M_PI) * b);
            double *row = jac + (size_t)i * 7;
            row[0] = g * (y[i] * c - x[i] * s);
            row[1] = -g;
            row[2] = -g * u * b;
            row[3] = 1.0;
            row[4] = x[i];
            row[5] = y[i];
            row[6] = step;
        }
    }
    return cost;
}

/* Levenberg-Marquardt on all seven terms from p (updated in place); r, r_new (m) and jac (7m)
 * are work space; returns the sum of squares at the solution */
static double edge_solve(double *p, const double *z, const double *x, const double *y, int m, int iterations,
                         double tol, double lb_lo, double lb_hi, double *r, double *r_new, double *jac) {
    double cost = edge_eval(p, z, x, y, m, r, NULL);
    double damp = 1e-3, gram[49], grad[7], h[49], step[7], next[7];
    for (int it = 0; it < iterations; it++) {
        edge_eval(p, z, x, y, m, r, jac);
        for (int a = 0; a < 7; a++) {
            grad[a] = 0.0;
            for (int c = 0; c < 7; c++) gram[a * 7 + c] = 0.0;
        }
        for (int i = 0; i < m; i++) {
            const double *row = jac + (size_t)i * 7;
            for (int a = 0; a < 7; a++) {
                grad[a] += row[a] * r[i];
                for (int c = 0; c <= a; c++) gram[a * 7 + c] += row[a] * row[c];
            }
        }
        for (int a = 0; a < 7; a++)
            for (int c = a + 1; c < 7; c++) gram[a * 7 + c] = gram[c * 7 + a];
        int accepted = 0;
        double c_new = cost;
        while (damp < 1e6) {
            for (int a = 0; a < 49; a++) h[a] = gram[a];
            for (int a = 0; a < 7; a++) {
                h[a * 8] += damp * (gram[a * 8] + 1e-12);
                step[a] = -grad[a];
            }
            if (chol_solve(h, 7, step) == 0) {
                for (int a = 0; a < 7; a++) next[a] = p[a] + step[a];
                next[2] = fmin(fmax(next[2], lb_lo), lb_hi);
                c_new = edge_eval(next, z, x, y, m, r_new, NULL);
                if (c_new <= cost) {
                    accepted = 1;
                    break;
                }
            }
            damp *= 10.0;
        }
        if (!accepted) break;
        const int done =
            cost - c_new <= tol * cost || fmax(fabs(step[0]), fmax(fabs(step[1]), fabs(step[2]))) < 1e-4;
        for (int a = 0; a < 7; a++) p[a] = next[a];
        cost = c_new;
        damp = fmax(damp * 0.1, 1e-6);
        if (done) break;
    }
    return cost;
}

/* the grid search of fit_edge: the (angle, offset, blur) whose ramp, the plane projected out
 * (q: orthonormal plane columns, (m, 3)), explains most of zr (z less its plane); 0 if none */
static int edge_grid(const double *zr, const double *x, const double *y, const double *q, int m,
                     const double *angles, int na, const double *blurs, int nb, double step_px, double *s,
                     double *col, double *best) {
    double lo = INFINITY, hi = -INFINITY, top = 0.0;
    for (int a = 0; a < na; a++)
        for (int i = 0; i < m; i++) {
            const double v = x[i] * cos(angles[a]) + y[i] * sin(angles[a]);
            s[(size_t)a * m + i] = v;
            lo = fmin(lo, v);
            hi = fmax(hi, v);
        }
    const double first = ceil(lo / step_px) * step_px;
    const int no = (int)floor((hi + 1e-9 - first) / step_px) + 1;
    int found = 0;
    for (int a = 0; a < na; a++)
        for (int o = 0; o < no; o++)
            for (int bl = 0; bl < nb; bl++) {
                const double off = first + o * step_px, slope = 1.0 / (sqrt(2.0 * M_PI) * blurs[bl]);
                double qc[3] = {0.0, 0.0, 0.0};
                for (int i = 0; i < m; i++) {
                    const double v = fmin(fmax((s[(size_t)a * m + i] - off) * slope + 0.5, 0.0), 1.0);
                    col[i] = v;
                    for (int l = 0; l < 3; l++) qc[l] += q[(size_t)i * 3 + l] * v;
                }
                double norm = 0.0, dot_zr = 0.0;
                for (int i = 0; i < m; i++) {
                    const double v = col[i] - q[(size_t)i * 3] * qc[0] - q[(size_t)i * 3 + 1] * qc[1] -
                                     q[(size_t)i * 3 + 2] * qc[2];
                    norm += v * v;
                    dot_zr += zr[i] * v;
                }
                const double gain = norm > 1e-9 * m ? dot_zr * dot_zr / norm : 0.0;
                if (gain > top) {
                    top = gain;
                    best[0] = angles[a];
                    best[1] = off;
                    best[2] = log(blurs[bl]);
                    found = 1;
                }
            }
    return found;
}

/* edge_fit(out, z, x, y, q, angles, blurs, step, iterations, tol, log_blur_lo, log_blur_hi) ->
 * whether an edge was found; out (9,) = (angle, offset, log blur, c0, c1, c2, contrast, sum of
 * squares, the contrast's variance per unit noise variance). background.fit_edge's grid search
 * and refinement (its numpy twin, _fit_edge_numpy, is the same algorithm). */
static PyObject *edge_fit(PyObject *self, PyObject *args) {
    PyObject *o[7];
    int iterations;
    double step_px, tol, lb_lo, lb_hi;
    if (!PyArg_ParseTuple(args, "OOOOOOOdiddd", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &step_px,
                          &iterations, &tol, &lb_lo, &lb_hi))
        return NULL;
    Py_buffer b[7];
    Py_ssize_t m = 0, na = 0, nb = 0;
    {
        Py_ssize_t *len[3] = {&m, &na, &nb};
        const int which[3] = {1, 5, 6};
        for (int j = 0; j < 3; j++) {
            if (PyObject_GetBuffer(o[which[j]], &b[0], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return NULL;
            *len[j] = b[0].len / (Py_ssize_t)sizeof(double);
            PyBuffer_Release(&b[0]);
        }
    }
    if (m < 4 || na < 1 || nb < 1 || !(step_px > 0.0) || iterations < 0) {
        PyErr_SetString(PyExc_ValueError, "edge_fit: bad dimensions or settings");
        return NULL;
    }
    const Py_ssize_t sizes[7] = {9, m, m, m, 3 * m, na, nb};
    const char *names[7] = {"out", "z", "x", "y", "q", "angles", "blurs"};
    int got;
    for (got = 0; got < 7; got++)
        if (get_buffer(o[got], &b[got], sizes[got], "d", got == 0, names[got]) < 0) goto fail;
    for (Py_ssize_t j = 0; j < nb; j++)
        if (!(((double *)b[6].buf)[j] > 0.0)) {
            PyErr_SetString(PyExc_ValueError, "edge_fit: blurs must be > 0");
            goto fail;
        }
    double *work = malloc(sizeof(double) * (size_t)m * (11 + (size_t)na));
    if (!work) {
        PyErr_NoMemory();
        goto fail;
    }
    double *out = b[0].buf, *r = work, *r_new = work + m, *jac = work + 2 * m, *zr = work + 9 * m,
           *col = work + 10 * m, *s = work + 11 * m;
    const double *z = b[1].buf, *x = b[2].buf, *y = b[3].buf, *q = b[4].buf;
    int found = 0;
    Py_BEGIN_ALLOW_THREADS
    /* z less its plane */
    double qz[3] = {0.0, 0.0, 0.0};
    for (Py_ssize_t i = 0; i < m; i++)
        for (int l = 0; l < 3; l++) qz[l] += q[i * 3 + l] * z[i];
    for (Py_ssize_t i = 0; i < m; i++) zr[i] = z[i] - q[i * 3] * qz[0] - q[i * 3 + 1] * qz[1] - q[i * 3 + 2] * qz[2];
    double p[7];
    if (edge_grid(zr, x, y, q, (int)m, b[5].buf, (int)na, b[6].buf, (int)nb, step_px, s, col, p)) {
        /* the linear terms (plane, contrast) at the grid's geometry: 4 x 4 normal equations */
        const double c = cos(p[0]), sn = sin(p[0]), bl = exp(p[2]);
        double g[16] = {0.0}, rhs[4] = {0.0};
        for (Py_ssize_t i = 0; i < m; i++) {
            const double v[4] = {1.0, x[i], y[i], 0.5 * erfc(-((x[i] * c + y[i] * sn - p[1]) / bl) / sqrt(2.0))};
            for (int a = 0; a < 4; a++) {
                rhs[a] += v[a] * z[i];
                for (int d = 0; d < 4; d++) g[a * 4 + d] += v[a] * v[d];
            }
        }
        if (chol_solve(g, 4, rhs) == 0) {
            for (int a = 0; a < 4; a++) p[3 + a] = rhs[a];
            const double cost = edge_solve(p, z, x, y, (int)m, iterations, tol, lb_lo, lb_hi, r, r_new, jac);
            /* the contrast's variance per unit noise variance: [(J^T J)^-1]_66 at the solution */
            double gram[49] = {0.0}, e6[7] = {0, 0, 0, 0, 0, 0, 1.0};
            edge_eval(p, z, x, y, (int)m, r, jac);
            for (Py_ssize_t i = 0; i < m; i++)
                for (int a = 0; a < 7; a++)
                    for (int d = 0; d < 7; d++) gram[a * 7 + d] += jac[i * 7 + a] * jac[i * 7 + d];
            const double var = chol_solve(gram, 7, e6) == 0 ? e6[6] : INFINITY;
            for (int a = 0; a < 7; a++) out[a] = p[a];
            out[7] = cost;
            out[8] = var;
            found = 1;
        }
    }
    Py_END_ALLOW_THREADS
    free(work);
    for (int i = 0; i < 7; i++) PyBuffer_Release(&b[i]);
    return PyBool_FromLong(found);
fail:
    for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
    return NULL;
}

/* ---- the starts' clustering (service/science/refine.py, _cluster: the same algorithm) ---- */

/* kmeans(centres, xy, weight, k, iterations): centres (k, 2) of a weighted k-means of the n
 * points xy (n, 2), n > k, weights floored at 1e-12; deterministic start (the heaviest point,
 * then each time the point with the largest weight x squared distance to the centres so far) */
static PyObject *kmeans(PyObject *self, PyObject *args) {
    PyObject *o[3];
    int k, iterations;
    if (!PyArg_ParseTuple(args, "OOOii", &o[0], &o[1], &o[2], &k, &iterations)) return NULL;
    Py_buffer b[3];
    if (PyObject_GetBuffer(o[2], &b[2], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return NULL;
    const Py_ssize_t n = b[2].len / (Py_ssize_t)sizeof(double);
    PyBuffer_Release(&b[2]);
    if (k < 1 || n <= k || iterations < 0) {
        PyErr_SetString(PyExc_ValueError, "kmeans: need 1 <= k < n points");
        return NULL;
    }
    const Py_ssize_t sizes[3] = {2 * (Py_ssize_t)k, 2 * n, n};
    const char *names[3] = {"centres", "xy", "weight"};
    int got;
    for (got = 0; got < 3; got++)
        if (get_buffer(o[got], &b[got], sizes[got], "d", got == 0, names[got]) < 0) goto fail;
    double *work = malloc(sizeof(double) * (size_t)n * 2 + sizeof(double) * (size_t)k * 5);
    if (!work) {
        PyErr_NoMemory();
        goto fail;
    }
    double *c = b[0].buf, *w = work, *d2 = work + n, *sum = work + 2 * n, *nw = work + 2 * n + 3 * (size_t)k;
    const double *xy = b[1].buf, *weight = b[2].buf;
    for (Py_ssize_t i = 0; i < n; i++) w[i] = fmax(weight[i], 1e-12);
    Py_ssize_t first = 0;
    for (Py_ssize_t i = 1; i < n; i++)
        if (w[i] > w[first]) first = i;
    c[0] = xy[2 * first], c[1] = xy[2 * first + 1];
    for (Py_ssize_t i = 0; i < n; i++) {
        const double dx = xy[2 * i] - c[0], dy = xy[2 * i + 1] - c[1];
        d2[i] = dx * dx + dy * dy;
    }
    for (int j = 1; j < k; j++) {
        Py_ssize_t nxt = 0;
        for (Py_ssize_t i = 1; i < n; i++)
            if (w[i] * d2[i] > w[nxt] * d2[nxt]) nxt = i;
        c[2 * j] = xy[2 * nxt], c[2 * j + 1] = xy[2 * nxt + 1];
        for (Py_ssize_t i = 0; i < n; i++) {
            const double dx = xy[2 * i] - c[2 * j], dy = xy[2 * i + 1] - c[2 * j + 1];
            d2[i] = fmin(d2[i], dx * dx + dy * dy);
        }
    }
    for (int it = 0; it < iterations; it++) {
        for (int j = 0; j < 3 * k; j++) sum[j] = 0.0;
        for (Py_ssize_t i = 0; i < n; i++) {
            int label = 0;
            double best = INFINITY;
            for (int j = 0; j < k; j++) {
                const double dx = xy[2 * i] - c[2 * j], dy = xy[2 * i + 1] - c[2 * j + 1];
                const double e = dx * dx + dy * dy;
                if (e < best) best = e, label = j;
            }
            sum[3 * label] += w[i];
            sum[3 * label + 1] += w[i] * xy[2 * i];
            sum[3 * label + 2] += w[i] * xy[2 * i + 1];
        }
        int moved = 0;
        for (int j = 0; j < k; j++)
            for (int l = 0; l < 2; l++) {
                const double v = sum[3 * j] > 0 ? sum[3 * j + 1 + l] / sum[3 * j] : c[2 * j + l];
                nw[2 * j + l] = v;
                if (!(fabs(v - c[2 * j + l]) <= 1e-8 + 1e-5 * fabs(c[2 * j + l]))) moved = 1;
            }
        if (!moved) break;
        for (int j = 0; j < 2 * k; j++) c[j] = nw[j];
    }
    free(work);
    for (int i = 0; i < 3; i++) PyBuffer_Release(&b[i]);
    Py_RETURN_NONE;
fail:
    for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
    return NULL;
}

static PyMethodDef methods[] = {
    {"lm", lm, METH_VARARGS, "lm(theta, lower, upper, x_scale, times, obs, sat, stuck, ...): see fit.c"},
    {"edge_fit", edge_fit, METH_VARARGS, "edge_fit(out, z, x, y, q, angles, blurs, step, ...): see fit.c"},
    {"kmeans", kmeans, METH_VARARGS, "kmeans(centres, xy, weight, k, iterations): see fit.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fit", NULL, -1, methods};

/* HALO marks a build whose lm takes the PSF's halo, FRAMES one whose lm takes the frame terms
 * (refine.py falls back to numpy for them without it) */
PyMODINIT_FUNC PyInit__fit(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "HALO", 1) != 0 || PyModule_AddIntConstant(m, "FRAMES", 1) != 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
