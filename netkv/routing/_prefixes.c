/* The prefix index's per-request loops in C (netkv.routing._prefixes).
 *
 * PrefixIndex (netkv/routing/prefixes.py) keeps block hash -> holder bit mask in a plain
 * dict, least recently used first. Per request it follows the prompt's blocks through that
 * dict (:c:func:`runs`) and, once a decoder is chosen, re-inserts each block with the
 * decoder's bit, then evicts the least recently used past its bound (:c:func:`add`). These
 * are the Python code's exact steps (the same lookups, deletions and insertions in the same
 * order, so the dict's order and contents are the same), without the interpreter's cost per
 * block. Pure: it touches only the dict given.
 *
 * Built with the decision kernel (hatch_build.py); without it prefixes.py loops in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* runs(holders, hashes) -> [[holders, blocks], ...] or None: see PrefixIndex.runs. */
static PyObject *
runs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "runs(holders: dict, hashes: sequence)");
        return NULL;
    }
    PyObject *holders = args[0];
    PyObject *seq = PySequence_Fast(args[1], "runs: hashes must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = NULL, *alive = NULL, *run = NULL;
    if (count == 0) {
        goto none;
    }
    alive = PyDict_GetItemWithError(holders, items[0]);
    if (alive == NULL) {
        if (PyErr_Occurred()) goto fail;
        goto none;
    }
    Py_INCREF(alive);
    int truth = PyObject_IsTrue(alive);
    if (truth < 0) goto fail;
    if (!truth) goto none;
    out = PyList_New(0);
    if (out == NULL) goto fail;
    Py_ssize_t blocks = 1;
    for (Py_ssize_t i = 1; i <= count; i++) {
        PyObject *next = NULL;
        if (i < count) {
            PyObject *held = PyDict_GetItemWithError(holders, items[i]);
            if (held == NULL && PyErr_Occurred()) goto fail;
            if (held == NULL) {
                next = PyLong_FromLong(0);
            } else {
                next = PyNumber_And(alive, held);
            }
            if (next == NULL) goto fail;
            int same = PyObject_RichCompareBool(next, alive, Py_EQ);
            int live = PyObject_IsTrue(next);
            if (same < 0 || live < 0) {
                Py_DECREF(next);
                goto fail;
            }
            if (live && same) {
                blocks++;
                Py_DECREF(alive);
                alive = next;
                continue;
            }
            if (!live) {
                Py_DECREF(next);
                next = NULL;
            }
        }
        /* the run of ``alive`` ends here */
        PyObject *n = PyLong_FromSsize_t(blocks);
        if (n == NULL) {
            Py_XDECREF(next);
            goto fail;
        }
        run = PyList_New(2);
        if (run == NULL) {
            Py_DECREF(n);
            Py_XDECREF(next);
            goto fail;
        }
        PyList_SET_ITEM(run, 0, alive);  /* steals */
        PyList_SET_ITEM(run, 1, n);
        alive = NULL;
        int rc = PyList_Append(out, run);
        Py_CLEAR(run);
        if (rc < 0) {
            Py_XDECREF(next);
            goto fail;
        }
        if (next == NULL) {
            break;  /* nobody holds the next block (or the prompt ended) */
        }
        alive = next;
        blocks = 1;
    }
    Py_XDECREF(alive);
    Py_DECREF(seq);
    return out;
none:
    Py_XDECREF(alive);
    Py_DECREF(seq);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(alive);
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

/* Delete the first ``count`` keys of ``holders`` in its order (the least recently used). */
static int
evict(PyObject *holders, Py_ssize_t count)
{
    PyObject *oldest = PyList_New(count);
    if (oldest == NULL) {
        return -1;
    }
    Py_ssize_t pos = 0, i = 0;
    PyObject *key, *value;
    while (i < count && PyDict_Next(holders, &pos, &key, &value)) {
        PyList_SET_ITEM(oldest, i++, Py_NewRef(key));
    }
    int rc = 0;
    for (Py_ssize_t j = 0; j < i && rc == 0; j++) {
        rc = PyDict_DelItem(holders, PyList_GET_ITEM(oldest, j));
    }
    Py_DECREF(oldest);
    return rc;
}

/* add(holders, hashes, bit, limit, keep): holders[h] = holders.pop(h, 0) | bit for each h,
 * in order; then, if more than ``limit`` blocks are held, all but the newest ``keep`` go. */
static PyObject *
add(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 5 || !PyDict_Check(args[0]) || !PyLong_Check(args[2])
            || _PyLong_Sign(args[2]) < 0) {
        PyErr_SetString(PyExc_TypeError, "add(holders: dict, hashes: sequence, bit: int >= 0, "
                        "limit: int, keep: int)");
        return NULL;
    }
    PyObject *holders = args[0], *bit = args[2];
    Py_ssize_t limit = PyNumber_AsSsize_t(args[3], PyExc_OverflowError);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t keep = PyNumber_AsSsize_t(args[4], PyExc_OverflowError);
    if (keep == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (keep < 0 || limit < keep) {
        PyErr_SetString(PyExc_ValueError, "add: expected 0 <= keep <= limit");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[1], "add: hashes must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *h = items[i];
        PyObject *held = PyDict_GetItemWithError(holders, h);
        if (held == NULL && PyErr_Occurred()) goto fail;
        PyObject *value;
        if (held != NULL) {
            Py_INCREF(held);
            if (PyDict_DelItem(holders, h) < 0) {  /* pop: re-inserted last below */
                Py_DECREF(held);
                goto fail;
            }
            value = PyNumber_Or(held, bit);
            Py_DECREF(held);
            if (value == NULL) goto fail;
        } else {
            value = Py_NewRef(bit);  /* 0 | bit is bit (an int >= 0) */
        }
        int rc = PyDict_SetItem(holders, h, value);
        Py_DECREF(value);
        if (rc < 0) goto fail;
    }
    Py_DECREF(seq);
    if (PyDict_GET_SIZE(holders) > limit && evict(holders, PyDict_GET_SIZE(holders) - keep) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
fail:
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef methods[] = {
    {"runs", (PyCFunction)(void (*)(void))runs, METH_FASTCALL,
     "PrefixIndex.runs over the holders dict (see netkv/routing/prefixes.py)."},
    {"add", (PyCFunction)(void (*)(void))add, METH_FASTCALL,
     "PrefixIndex.add over the holders dict, evictions included (see "
     "netkv/routing/prefixes.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "netkv.routing._prefixes",
    "The prefix index's per-request loops in C (pure: touches only the dict given).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__prefixes(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "ABI", 2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
