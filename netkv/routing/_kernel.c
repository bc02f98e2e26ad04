/* The fused ``netkv`` decision's arithmetic in one C pass (netkv.routing._kernel).
 *
 * ``FusedNetkv._decide`` (netkv/routing/fused.py) evaluates the core's formula with about
 * thirty numpy calls on arrays of |D| values; at |D| = 64 each call's dispatch costs more
 * than its arithmetic. :c:func:`decide` does the same IEEE-754 double operations on the same
 * operands in the same order (no fused multiply-add: built with -ffp-contract=off), element
 * by element, and takes the same tie-break draws from the caller's generator in the same
 * order (numpy's own algorithm for Generator.integers over the generator's
 * next_uint32, checked against numpy once at import, else through Python), so its
 * decisions are the Python path's bit for bit
 * (tests/unit/test_fused_netkv.py runs every comparison with and without it). It is pure:
 * no I/O, no state; it reads the caller's arrays and writes four of them.
 *
 * Built when a C compiler is present (hatch_build.py); without it, or with
 * NETKV_NO_EXTENSIONS=1, fused.py uses its numpy path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* numpy's maximum and minimum: a NaN operand gives NaN; otherwise the larger (smaller). */
static inline double np_max(double a, double b) { return (isnan(a) || a >= b) ? a : b; }
static inline double np_min(double a, double b) { return (isnan(a) || a <= b) ? a : b; }

enum { F64 = 'd', I64 = 'q' };

/* A C-contiguous buffer of ``count`` 8-byte items of ``kind`` (count < 0: any multiple). */
static int
take(PyObject *obj, Py_buffer *view, int kind, Py_ssize_t count, int writable,
     const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        return -1;
    }
    const char *f = view->format == NULL ? "B" : view->format;
    if (*f == '<' || *f == '=' || *f == '@') {
        f++;
    }
    int ok = view->itemsize == 8 && f[0] != '\0' && f[1] == '\0'
             && (kind == F64 ? f[0] == 'd' : (f[0] == 'q' || f[0] == 'l'));
    if (ok && count >= 0) {
        ok = view->len == count * 8;
    }
    if (!ok) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s: expected %zd %s values", name, count,
                     kind == F64 ? "float64" : "int64");
        return -1;
    }
    return 0;
}

/* numpy's bit generator interface (numpy/random/bitgen.h, behind the "BitGenerator"
 * capsule of every numpy.random.BitGenerator) */
typedef struct {
    void *state;
    uint64_t (*next_uint64)(void *state);
    uint32_t (*next_uint32)(void *state);
    double (*next_double)(void *state);
    uint64_t (*next_raw)(void *state);
} bitgen_t;

/* Generator.integers(k) for 2 <= k <= 2**31, as numpy draws it: the closed range [0, k - 1]
 * fits 32 bits, so one Lemire rejection over next_uint32 (numpy's
 * random_bounded_uint64_fill, use_masked false). Holding no lock: the caller owns the
 * generator on one thread. */
static Py_ssize_t
lemire32(bitgen_t *bitgen, Py_ssize_t k)
{
    const uint32_t rng_excl = (uint32_t)k;  /* (k - 1) + 1 */
    uint64_t m = (uint64_t)bitgen->next_uint32(bitgen->state) * rng_excl;
    uint32_t leftover = (uint32_t)(m & 0xFFFFFFFFUL);
    if (leftover < rng_excl) {
        const uint32_t threshold = (UINT32_MAX - (uint32_t)(k - 1)) % rng_excl;
        while (leftover < threshold) {
            m = (uint64_t)bitgen->next_uint32(bitgen->state) * rng_excl;
            leftover = (uint32_t)(m & 0xFFFFFFFFUL);
        }
    }
    return (Py_ssize_t)(m >> 32);
}

/* The bit generator behind ``capsule`` (None: not given, draws go through Python). */
static int
bitgen_of(PyObject *capsule, bitgen_t **out)
{
    *out = NULL;
    if (capsule == Py_None) {
        return 0;
    }
    *out = PyCapsule_GetPointer(capsule, "BitGenerator");
    return *out == NULL ? -1 : 0;
}

/* One draw in [0, k) from the caller's generator: in C where ``bitgen`` is given and k is
 * in lemire32's range, else ``integers(k)`` (k = 0 raises there, as the Python path's draw
 * from an empty set does). */
static int
draw(PyObject *integers, bitgen_t *bitgen, Py_ssize_t k, Py_ssize_t *out)
{
    if (bitgen != NULL && k >= 2 && k <= ((Py_ssize_t)1 << 31)) {
        *out = lemire32(bitgen, k);
        return 0;
    }
    PyObject *arg = PyLong_FromSsize_t(k);
    if (arg == NULL) {
        return -1;
    }
    PyObject *got = PyObject_CallOneArg(integers, arg);
    Py_DECREF(arg);
    if (got == NULL) {
        return -1;
    }
    Py_ssize_t value = PyNumber_AsSsize_t(got, PyExc_OverflowError);
    Py_DECREF(got);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (value < 0 || value >= k) {
        PyErr_SetString(PyExc_ValueError, "tie-break draw out of range");
        return -1;
    }
    *out = value;
    return 0;
}

/* The i-th set element (in index order) of ``flag[0:n]``. */
static Py_ssize_t
nth_set(const unsigned char *flag, Py_ssize_t n, Py_ssize_t i)
{
    for (Py_ssize_t d = 0; d < n; d++) {
        if (flag[d] && i-- == 0) {
            return d;
        }
    }
    return -1;
}

/* TieBreaker.argmin: the first minimum, or a draw among the values within 1e-12 (relative)
 * of it; ``flag`` is scratch of n bytes. A NaN is numpy's argmin (the first NaN), whose
 * limit nothing meets: the empty draw raises, as in Python. */
static int
tie_argmin(const double *v, Py_ssize_t n, PyObject *integers, bitgen_t *bitgen,
           unsigned char *flag, Py_ssize_t *out)
{
    Py_ssize_t first = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (isnan(v[i])) {
            first = i;
            break;
        }
        if (v[i] < v[first]) {
            first = i;
        }
    }
    double best = v[first];
    double mag = fabs(best);
    double limit = best + 1e-12 * ((1.0 > mag) ? 1.0 : mag);
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        flag[i] = v[i] <= limit;
        count += flag[i];
    }
    if (count == 1) {
        *out = first;
        return 0;
    }
    Py_ssize_t k;
    if (draw(integers, bitgen, count, &k) < 0) {
        return -1;
    }
    *out = nth_set(flag, n, k);
    return 0;
}

/* TieBreaker.argmin of np.where(keep, values, inf); ``scratch`` is n bytes. */
static int
masked_argmin(const double *values, const unsigned char *keep, Py_ssize_t n,
              PyObject *integers, bitgen_t *bitgen, unsigned char *scratch, Py_ssize_t *out)
{
    double stack[256];
    double *m = n <= 256 ? stack : PyMem_Malloc((size_t)n * sizeof(double));
    if (m == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        m[i] = keep[i] ? values[i] : INFINITY;
    }
    int rc = tie_argmin(m, n, integers, bitgen, scratch, out);
    if (m != stack) {
        PyMem_Free(m);
    }
    return rc;
}

/* The holders of one run as bits: ``bits[0:words]`` (little-endian 64-bit words). */
static int
run_bits(PyObject *mask, Py_ssize_t n, uint64_t *bits, Py_ssize_t words)
{
    if (!PyLong_Check(mask)) {
        PyErr_SetString(PyExc_TypeError, "runs: holder masks must be int");
        return -1;
    }
    if (n <= 64) {
        uint64_t low = n == 64 ? ~(uint64_t)0 : (((uint64_t)1 << n) - 1);
        bits[0] = PyLong_AsUnsignedLongLongMask(mask) & low;
        return (bits[0] == (uint64_t)-1 && PyErr_Occurred()) ? -1 : 0;
    }
    if (_PyLong_Sign(mask) < 0) {
        PyErr_SetString(PyExc_ValueError, "runs: holder masks must be >= 0");
        return -1;
    }
    /* the bits below n (mask & ((1 << n) - 1)), as Python's & would keep them */
    size_t nbits = _PyLong_NumBits(mask);
    if (nbits == (size_t)-1 && PyErr_Occurred()) {
        return -1;
    }
    size_t have = (nbits + 7) / 8 + 1;
    size_t want = (size_t)words * 8;
    unsigned char stack[512];
    unsigned char *raw = have <= sizeof stack ? stack : PyMem_Malloc(have);
    if (raw == NULL) {
        PyErr_NoMemory();
        return -1;
    }
#if PY_VERSION_HEX >= 0x030D0000
    int rc = _PyLong_AsByteArray((PyLongObject *)mask, raw, have, 1, 0, 1);
#else
    int rc = _PyLong_AsByteArray((PyLongObject *)mask, raw, have, 1, 0);
#endif
    if (rc == 0) {
        memset(bits, 0, want);
        memcpy(bits, raw, have < want ? have : want);
        for (Py_ssize_t w = 0; w < words; w++) {  /* bytes were little-endian */
            unsigned char *b = (unsigned char *)&bits[w];
            uint64_t value = 0;
            for (int j = 7; j >= 0; j--) {
                value = (value << 8) | b[j];
            }
            bits[w] = value;
        }
        if (n % 64) {
            bits[words - 1] &= ((uint64_t)1 << (n % 64)) - 1;
        }
    }
    if (raw != stack) {
        PyMem_Free(raw);
    }
    return rc;
}

/* nbytes[d] = whole, or max(prompt - held_d * block, 0) * kv_bytes_per_token for a decoder
 * holding the first held_d blocks (runs: [[holders, blocks], ...], each a subset of the
 * one before, as PrefixIndex.runs gives them). */
static int
fill_nbytes(PyObject *runs, long long prompt, double kvb, long long block, double *nbytes,
            Py_ssize_t n)
{
    double whole = (double)prompt * kvb;
    for (Py_ssize_t d = 0; d < n; d++) {
        nbytes[d] = whole;
    }
    if (runs == Py_None) {
        return 0;
    }
    if (!PyList_Check(runs)) {
        PyErr_SetString(PyExc_TypeError, "runs: expected a list or None");
        return -1;
    }
    Py_ssize_t words = (n + 63) / 64;
    uint64_t one[1];
    uint64_t *bits = words == 1 ? one : PyMem_Malloc((size_t)words * sizeof(uint64_t));
    if (bits == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    long long held = 0;
    int rc = 0;
    for (Py_ssize_t r = 0; r < PyList_GET_SIZE(runs); r++) {
        PyObject *item = PyList_GET_ITEM(runs, r);
        if (!PyList_Check(item) || PyList_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "runs: expected [holders, blocks] items");
            rc = -1;
            break;
        }
        long long count = PyLong_AsLongLong(PyList_GET_ITEM(item, 1));
        if ((count == -1 && PyErr_Occurred()) || run_bits(PyList_GET_ITEM(item, 0), n, bits,
                                                          words) < 0) {
            rc = -1;
            break;
        }
        held += count;
        long long lack = prompt - held * block;
        double value = (double)(lack > 0 ? lack : 0) * kvb;
        for (Py_ssize_t w = 0; w < words; w++) {
            uint64_t rest = bits[w];
            while (rest) {
                nbytes[w * 64 + __builtin_ctzll(rest)] = value;
                rest &= rest - 1;
            }
        }
    }
    if (bits != one) {
        PyMem_Free(bits);
    }
    return rc;
}

enum {
    A_RUNS, A_PROMPT, A_KVB, A_BLOCK, A_NEED, A_USED_MAX, A_CAPACITY_MIN, A_WAITING, A_USED,
    A_KV_USE, A_CAPACITY, A_DRAIN, A_RESIDENCE, A_LATENCY, A_BANDWIDTH, A_LINKS, A_KEPT,
    A_FLOWS, A_BYTES, A_HANDOVER, A_FIRST, A_TIER, A_TIE_REL, A_TIE_LOAD, A_KV_UNIFORM,
    A_INTEGERS, A_BITGEN, A_NBYTES, A_QUEUE, A_TRANSFER, A_SCORES, N_ARGS
};

/* Buffers in argument order; NULL obj: not given (None). */
typedef struct {
    Py_buffer view;
    int held;
} Held;

static const char *const NAMES[N_ARGS] = {
    "runs", "prompt_tokens", "kv_bytes_per_token", "block_tokens", "need", "used_max",
    "capacity_min", "waiting", "used", "kv_use", "capacity", "drain", "residence_s",
    "latency", "bandwidth", "links", "kept", "flows_ext", "bytes_ext", "handover_s",
    "first_s", "tier", "tie_rel", "tie_load", "kv_uniform", "integers", "bitgen", "nbytes",
    "queue",
    "transfer", "scores",
};

/* decide(...) -> (chosen, queue_s, transfer_s, transfer_bytes, tier) of the chosen decoder
 * (queue_s +0.0 where no deficit was computed), or None when the inputs need the Python path
 * (a path link outside the booked-link arrays). See fused.py for each argument. */
static PyObject *
decide(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != N_ARGS) {
        PyErr_Format(PyExc_TypeError, "decide() takes %d arguments (%zd given)", N_ARGS,
                     nargs);
        return NULL;
    }
    Held h[N_ARGS];
    for (int a = 0; a < N_ARGS; a++) {
        h[a].held = 0;  /* (the views are filled as they are taken) */
    }
    PyObject *result = NULL;
    unsigned char stack_flags[2 * 256];
    unsigned char *flag = stack_flags;

    long long prompt = PyLong_AsLongLong(args[A_PROMPT]);
    long long block = PyLong_AsLongLong(args[A_BLOCK]);
    double kvb = PyFloat_AsDouble(args[A_KVB]);
    double need = PyFloat_AsDouble(args[A_NEED]);
    double used_max = PyFloat_AsDouble(args[A_USED_MAX]);
    double capacity_min = PyFloat_AsDouble(args[A_CAPACITY_MIN]);
    double residence = PyFloat_AsDouble(args[A_RESIDENCE]);
    double handover = PyFloat_AsDouble(args[A_HANDOVER]);
    double first_s = PyFloat_AsDouble(args[A_FIRST]);
    double tie_rel = PyFloat_AsDouble(args[A_TIE_REL]);
    int tie_load = PyObject_IsTrue(args[A_TIE_LOAD]);
    int kv_uniform = PyObject_IsTrue(args[A_KV_UNIFORM]);
    bitgen_t *bitgen;
    if (PyErr_Occurred() || bitgen_of(args[A_BITGEN], &bitgen) < 0) {
        return NULL;
    }
    /* the outputs fix n */
    if (take(args[A_NBYTES], &h[A_NBYTES].view, F64, -1, 1, NAMES[A_NBYTES]) < 0) {
        return NULL;
    }
    h[A_NBYTES].held = 1;
    Py_ssize_t n = h[A_NBYTES].view.len / 8;
    static const int f64_n[] = {A_KV_USE, A_CAPACITY, A_LATENCY, A_BANDWIDTH};
    static const int out_n[] = {A_QUEUE, A_TRANSFER, A_SCORES};
    for (size_t i = 0; i < sizeof f64_n / sizeof *f64_n; i++) {
        int a = f64_n[i];
        if (take(args[a], &h[a].view, F64, n, 0, NAMES[a]) < 0) goto done;
        h[a].held = 1;
    }
    for (size_t i = 0; i < sizeof out_n / sizeof *out_n; i++) {
        int a = out_n[i];
        if (take(args[a], &h[a].view, F64, n, 1, NAMES[a]) < 0) goto done;
        h[a].held = 1;
    }
    if (take(args[A_WAITING], &h[A_WAITING].view, I64, n, 0, NAMES[A_WAITING]) < 0) goto done;
    h[A_WAITING].held = 1;
    if (take(args[A_TIER], &h[A_TIER].view, I64, n, 0, NAMES[A_TIER]) < 0) goto done;
    h[A_TIER].held = 1;
    static const int optional_n[] = {A_USED, A_DRAIN};
    for (size_t i = 0; i < sizeof optional_n / sizeof *optional_n; i++) {
        int a = optional_n[i];
        if (args[a] == Py_None) continue;
        if (take(args[a], &h[a].view, F64, n, 0, NAMES[a]) < 0) goto done;
        h[a].held = 1;
    }
    Py_ssize_t rows = 0, n_links = 0;
    if (args[A_LINKS] != Py_None) {
        if (take(args[A_LINKS], &h[A_LINKS].view, I64, -1, 0, NAMES[A_LINKS]) < 0) goto done;
        h[A_LINKS].held = 1;
        rows = h[A_LINKS].view.len / 8 / n;
        if (rows == 0 || rows * n * 8 != h[A_LINKS].view.len) {
            PyErr_SetString(PyExc_TypeError, "links: expected rows of n values");
            goto done;
        }
        if (take(args[A_KEPT], &h[A_KEPT].view, F64, rows * n, 0, NAMES[A_KEPT]) < 0)
            goto done;
        h[A_KEPT].held = 1;
        if (take(args[A_FLOWS], &h[A_FLOWS].view, F64, -1, 0, NAMES[A_FLOWS]) < 0) goto done;
        h[A_FLOWS].held = 1;
        n_links = h[A_FLOWS].view.len / 8;
        if (take(args[A_BYTES], &h[A_BYTES].view, F64, n_links, 0, NAMES[A_BYTES]) < 0)
            goto done;
        h[A_BYTES].held = 1;
    }
    if (n > 256 && (flag = PyMem_Malloc((size_t)(2 * n))) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    unsigned char *other = flag + n;

    double *nbytes = h[A_NBYTES].view.buf, *queue = h[A_QUEUE].view.buf;
    double *transfer = h[A_TRANSFER].view.buf, *scores = h[A_SCORES].view.buf;
    const double *kv_use = h[A_KV_USE].view.buf, *capacity = h[A_CAPACITY].view.buf;
    const double *latency = h[A_LATENCY].view.buf, *bandwidth = h[A_BANDWIDTH].view.buf;
    const double *used = h[A_USED].held ? h[A_USED].view.buf : NULL;
    const double *drain = h[A_DRAIN].held ? h[A_DRAIN].view.buf : NULL;
    const int64_t *waiting = h[A_WAITING].view.buf, *tier = h[A_TIER].view.buf;

    /* -- decode side: the bytes each decoder lacks, its queue for KV memory -------------- */
    if (fill_nbytes(args[A_RUNS], prompt, kvb, block, nbytes, n) < 0) goto done;
    int64_t waiting_max = waiting[0];
    for (Py_ssize_t i = 1; i < n; i++) {
        if (waiting[i] > waiting_max) waiting_max = waiting[i];
    }
    /* the deficit is +0.0 everywhere when even its largest terms stay under the smallest
     * capacity (the same bound, in the same operations, as fused.py) */
    int queued = !(((double)waiting_max * need + need + used_max) * (1.0 + 1e-9)
                   < capacity_min);
    if (queued) {
        int any = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            double u = used ? used[i] : kv_use[i] * capacity[i];
            double q = (double)waiting[i] * need;
            q = q + need;
            q = q + u;
            q = q - capacity[i];
            q = np_max(q, 0.0);
            queue[i] = q;
            any |= q != 0.0;
        }
        if (any) {  /* deficit / (max(used, block) / residence) */
            for (Py_ssize_t i = 0; i < n; i++) {
                double rate;
                if (drain) {
                    rate = drain[i];
                } else {
                    double u = used ? used[i] : kv_use[i] * capacity[i];
                    rate = np_max(u, (double)block) / residence;
                }
                queue[i] = queue[i] / rate;
            }
        }
    }
    /* -- transfer: the oracle's row plus the booked transfers' delay on the worst link -- */
    for (Py_ssize_t i = 0; i < n; i++) {
        transfer[i] = latency[i] + nbytes[i] / bandwidth[i];
    }
    if (rows) {
        const int64_t *links = h[A_LINKS].view.buf;
        const double *kept = h[A_KEPT].view.buf;
        const double *flows_ext = h[A_FLOWS].view.buf, *bytes_ext = h[A_BYTES].view.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            double extra = 0.0;
            for (Py_ssize_t r = 0; r < rows; r++) {
                Py_ssize_t at = r * n + i;
                int64_t link = links[at];
                /* checked here, before any draw: take(mode="wrap") would wrap it, and the
                 * outputs written so far are scratch the Python path writes again */
                if ((uint64_t)link >= (uint64_t)n_links) {
                    result = Py_NewRef(Py_None);
                    goto done;
                }
                double flows = flows_ext[link] * nbytes[i];
                double competing = np_min(bytes_ext[link], flows) / kept[at];
                extra = r == 0 ? competing : np_max(extra, competing);
            }
            transfer[i] = transfer[i] + extra;
        }
    }
    if (handover > 0) {
        for (Py_ssize_t i = 0; i < n; i++) {
            transfer[i] = transfer[i] + (nbytes[i] > 0 ? handover : 0.0);
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        scores[i] = queued ? (queue[i] + transfer[i]) + first_s : transfer[i] + first_s;
    }
    /* -- the choice ------------------------------------------------------------------- */
    Py_ssize_t chosen;
    if (tie_argmin(scores, n, args[A_INTEGERS], bitgen, flag, &chosen) < 0) goto done;
    if (tie_rel > 0 && tie_load) {  /* near_ties, then prefer_less_loaded */
        double slack = tie_rel * transfer[chosen];
        if (!(slack <= 0)) {
            double limit = scores[chosen] + slack;
            int64_t top = tier[chosen];
            Py_ssize_t count = 0;
            for (Py_ssize_t i = 0; i < n; i++) {
                flag[i] = (scores[i] <= limit) & (tier[i] <= top);
                count += flag[i];
            }
            if (count != 1) {
                if (kv_uniform) {
                    Py_ssize_t k;
                    if (draw(args[A_INTEGERS], bitgen, count, &k) < 0) goto done;
                    chosen = nth_set(flag, n, k);
                } else if (masked_argmin(kv_use, flag, n, args[A_INTEGERS], bitgen, other,
                                         &chosen) < 0) {
                    goto done;
                }
            }
        }
    } else if (tie_rel > 0) {  /* prefer_lower_tier */
        Py_ssize_t best = chosen;
        double slack = tie_rel * transfer[best];
        if (!(slack <= 0)) {
            double limit = scores[best] + slack;
            Py_ssize_t count = 0;
            int64_t low = INT64_MAX;
            for (Py_ssize_t i = 0; i < n; i++) {
                flag[i] = scores[i] <= limit;
                count += flag[i];
                if (flag[i] && tier[i] < low) low = tier[i];
            }
            if (count == 0) {  /* tier[near].min() of nothing, as numpy says it */
                PyErr_SetString(PyExc_ValueError, "zero-size array to reduction operation "
                                "minimum which has no identity");
                goto done;
            }
            if (count != 1 && tier[best] != low) {
                for (Py_ssize_t i = 0; i < n; i++) {
                    flag[i] = flag[i] && tier[i] == low;
                }
                if (masked_argmin(scores, flag, n, args[A_INTEGERS], bitgen, other,
                                  &chosen) < 0) {
                    goto done;
                }
            }
        }
    }
    result = Py_BuildValue("(ndddL)", chosen, queued ? queue[chosen] : 0.0, transfer[chosen],
                           nbytes[chosen], (long long)tier[chosen]);
done:
    for (int a = 0; a < N_ARGS; a++) {
        if (h[a].held) PyBuffer_Release(&h[a].view);
    }
    if (flag != stack_flags) PyMem_Free(flag);
    return result;
}

/* integers(capsule, k) -> int: the draw decide() makes, alone (fused.py checks it against
 * Generator.integers before it lets decide() draw in C). */
static PyObject *
integers(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    bitgen_t *bitgen;
    Py_ssize_t k;
    if (nargs != 2 || args[0] == Py_None) {
        PyErr_SetString(PyExc_TypeError, "integers(capsule, k)");
        return NULL;
    }
    if (bitgen_of(args[0], &bitgen) < 0) {
        return NULL;
    }
    k = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (k == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (k < 2 || k > ((Py_ssize_t)1 << 31)) {
        PyErr_SetString(PyExc_ValueError, "k must be in [2, 2**31]");
        return NULL;
    }
    return PyLong_FromSsize_t(lemire32(bitgen, k));
}

static PyMethodDef methods[] = {
    {"decide", (PyCFunction)(void (*)(void))decide, METH_FASTCALL,
     "The fused netkv decision's arithmetic (see netkv/routing/fused.py)."},
    {"integers", (PyCFunction)(void (*)(void))integers, METH_FASTCALL,
     "Generator.integers(k) for 2 <= k <= 2**31, drawn in C from a BitGenerator capsule."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "netkv.routing._kernel",
    "The fused netkv decision's arithmetic in C (pure: no I/O, no state).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__kernel(void)
{
    PyObject *m = PyModule_Create(&module);
    /* fused.py uses a build whose ABI it knows (a stale build from older sources is
     * ignored): raise it whenever decide()'s arguments or results change */
    if (m != NULL && PyModule_AddIntConstant(m, "ABI", 3) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
