/*
 * _agent_loader_speedups: the two hottest steps of the WSGI loader in C.
 *
 * The loader (agent/loaders/wsgi_loader.py) runs inside every app worker,
 * under the app's own interpreter, and works on the standard library alone.
 * When that interpreter is CPython 3.9 or later it also finds this module
 * next to it and lets it do, per request:
 *
 *   environ_from_vars(buffer, end, base)
 *       the request frame's pairs (docs/protocol.md section 1), which sit
 *       in buffer[4:end], added to a copy of the dict base: each key and
 *       value decoded as latin-1 (PEP 3333). Returns None when a key comes
 *       twice: joining repeated headers is left to the Python code, which
 *       does it rarely. Raises ValueError on a pair that runs past the end
 *       or an empty key.
 *
 *   encode_head(status, headers)
 *       "HTTP/1.1 " status, then "\r\n" name ": " value per header, then
 *       "\r\n\r\n", as latin-1 bytes. Raises ValueError on a line break in
 *       any part (an app must not split its response) or a status that is
 *       not three ASCII digits followed by a space or nothing; TypeError on
 *       a part that is not a str or a header that is not a pair;
 *       UnicodeEncodeError on a character past latin-1.
 *
 * The Python code holds the same rules and runs without this module; the
 * tests hold the two to the same results. It uses the limited API only
 * (one build serves every CPython from 3.9 on) and keeps no state.
 */

#define Py_LIMITED_API 0x03090000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define MALFORMED_PAIR "a pair runs past the end of the vars"
#define LINE_BREAK "a response status or header contains a line break"


static uint32_t
read_u32(const unsigned char *p)
{
    return ((uint32_t) p[0] << 24) | ((uint32_t) p[1] << 16)
           | ((uint32_t) p[2] << 8) | (uint32_t) p[3];
}


/* The bytes of a bytes or bytearray object; NULL with TypeError else. */
static const unsigned char *
bytes_of(PyObject *obj, Py_ssize_t *size)
{
    if (PyByteArray_Check(obj)) {
        *size = PyByteArray_Size(obj);
        return (const unsigned char *) PyByteArray_AsString(obj);
    }

    if (PyBytes_Check(obj)) {
        *size = PyBytes_Size(obj);
        return (const unsigned char *) PyBytes_AsString(obj);
    }

    PyErr_SetString(PyExc_TypeError, "the vars must be in bytes or a bytearray");
    return NULL;
}


/* Adds one pair to env; -1 with an exception set on failure. */
static int
add_pair(PyObject *env, const unsigned char *key, uint32_t key_size,
    const unsigned char *value, uint32_t value_size)
{
    int        rc;
    PyObject  *k, *v;

    k = PyUnicode_DecodeLatin1((const char *) key, key_size, NULL);
    if (k == NULL) {
        return -1;
    }

    v = PyUnicode_DecodeLatin1((const char *) value, value_size, NULL);
    if (v == NULL) {
        Py_DECREF(k);
        return -1;
    }

    rc = PyDict_SetItem(env, k, v);
    Py_DECREF(k);
    Py_DECREF(v);
    return rc;
}


/*
 * Walks the pairs of data[4:end] into env and returns how many there were,
 * or -1 with an exception set. Each size is checked against what is left
 * before it is used: the sizes come from another process.
 */
static Py_ssize_t
add_pairs(PyObject *env, const unsigned char *data, Py_ssize_t end)
{
    uint32_t    key_size, value_size;
    Py_ssize_t  pos, count;

    count = 0;

    for (pos = 4; pos < end; count++) {
        if (end - pos < 4) {
            goto malformed;
        }

        key_size = read_u32(data + pos);
        pos += 4;

        if (key_size == 0) {
            PyErr_SetString(PyExc_ValueError, "an empty key");
            return -1;
        }

        if ((uint64_t) key_size + 4 > (uint64_t) (end - pos)) {
            goto malformed;
        }

        value_size = read_u32(data + pos + key_size);

        if ((uint64_t) value_size > (uint64_t) (end - pos - key_size - 4)) {
            goto malformed;
        }

        if (add_pair(env, data + pos, key_size, data + pos + key_size + 4,
                     value_size) != 0)
        {
            return -1;
        }

        pos += key_size + 4 + value_size;
    }

    return count;

malformed:
    PyErr_SetString(PyExc_ValueError, MALFORMED_PAIR);
    return -1;
}


static PyObject *
environ_from_vars(PyObject *self, PyObject *args)
{
    PyObject             *buffer, *base, *env;
    Py_ssize_t            end, size, count;
    const unsigned char  *data;

    (void) self;

    if (!PyArg_ParseTuple(args, "OnO!:environ_from_vars", &buffer, &end,
                          &PyDict_Type, &base))
    {
        return NULL;
    }

    data = bytes_of(buffer, &size);
    if (data == NULL) {
        return NULL;
    }

    if (end < 4 || end > size) {
        PyErr_SetString(PyExc_ValueError, "the vars' end lies outside the buffer");
        return NULL;
    }

    env = PyDict_Copy(base);
    if (env == NULL) {
        return NULL;
    }

    count = add_pairs(env, data, end);
    if (count < 0) {
        Py_DECREF(env);
        return NULL;
    }

    if (PyDict_Size(env) != PyDict_Size(base) + count) {
        /* a key came twice (or repeats one of base's) */
        Py_DECREF(env);
        Py_RETURN_NONE;
    }

    return env;
}


/* A growing byte buffer for the head. */
typedef struct {
    char        *data;
    Py_ssize_t   len;
    Py_ssize_t   cap;
} head_buf_t;


static int
head_append(head_buf_t *b, const char *p, Py_ssize_t n)
{
    char        *grown;
    Py_ssize_t   cap;

    if (n > PY_SSIZE_T_MAX / 2 - b->len) {
        PyErr_NoMemory();
        return -1;
    }

    if (b->len + n > b->cap) {
        cap = b->cap;
        while (cap < b->len + n) {
            cap *= 2;
        }

        grown = PyMem_Realloc(b->data, cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }

        b->data = grown;
        b->cap = cap;
    }

    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}


/* Appends a str as latin-1, refusing one with a line break in it. */
static int
head_append_str(head_buf_t *b, PyObject *str)
{
    int          rc;
    char        *p;
    PyObject    *encoded;
    Py_ssize_t   n;

    if (!PyUnicode_Check(str)) {
        PyErr_Format(PyExc_TypeError,
                     "a response status or header must be a str, not %R",
                     (PyObject *) Py_TYPE(str));
        return -1;
    }

    encoded = PyUnicode_AsLatin1String(str);
    if (encoded == NULL) {
        return -1;
    }

    if (PyBytes_AsStringAndSize(encoded, &p, &n) != 0) {
        Py_DECREF(encoded);
        return -1;
    }

    if (memchr(p, '\r', n) != NULL || memchr(p, '\n', n) != NULL) {
        Py_DECREF(encoded);
        PyErr_SetString(PyExc_ValueError, LINE_BREAK);
        return -1;
    }

    rc = head_append(b, p, n);
    Py_DECREF(encoded);
    return rc;
}


static int
check_status(PyObject *status)
{
    int          ok;
    char        *p;
    PyObject    *encoded;
    Py_ssize_t   n;

    encoded = PyUnicode_AsLatin1String(status);
    if (encoded == NULL) {
        return -1;
    }

    if (PyBytes_AsStringAndSize(encoded, &p, &n) != 0) {
        Py_DECREF(encoded);
        return -1;
    }

    ok = n >= 3
         && p[0] >= '0' && p[0] <= '9'
         && p[1] >= '0' && p[1] <= '9'
         && p[2] >= '0' && p[2] <= '9'
         && (n == 3 || p[3] == ' ');
    Py_DECREF(encoded);

    if (!ok) {
        PyErr_Format(PyExc_ValueError, "invalid response status %R", status);
        return -1;
    }

    return 0;
}


/* Appends "\r\n" name ": " value for one header pair. */
static int
head_append_header(head_buf_t *b, PyObject *header)
{
    int        rc;
    PyObject  *name, *value;

    if (PyTuple_Check(header) && PyTuple_Size(header) == 2) {
        name = PyTuple_GetItem(header, 0);
        value = PyTuple_GetItem(header, 1);

    } else if (PyList_Check(header) && PyList_Size(header) == 2) {
        name = PyList_GetItem(header, 0);
        value = PyList_GetItem(header, 1);

    } else {
        PyErr_SetString(PyExc_TypeError,
                        "a response header must be a (name, value) pair");
        return -1;
    }

    if (name == NULL || value == NULL) {
        return -1;
    }

    /* held while used: a list pair is the app's and could change */
    Py_INCREF(name);
    Py_INCREF(value);

    rc = head_append(b, "\r\n", 2);
    if (rc == 0) {
        rc = head_append_str(b, name);
    }
    if (rc == 0) {
        rc = head_append(b, ": ", 2);
    }
    if (rc == 0) {
        rc = head_append_str(b, value);
    }

    Py_DECREF(name);
    Py_DECREF(value);
    return rc;
}


static PyObject *
encode_head(PyObject *self, PyObject *args)
{
    int          rc;
    PyObject    *status, *headers, *iter, *header, *head;
    head_buf_t   b;

    (void) self;

    if (!PyArg_ParseTuple(args, "UO:encode_head", &status, &headers)) {
        return NULL;
    }

    iter = PyObject_GetIter(headers);
    if (iter == NULL) {
        return NULL;
    }

    b.cap = 256;
    b.len = 0;
    b.data = PyMem_Malloc(b.cap);
    if (b.data == NULL) {
        Py_DECREF(iter);
        return PyErr_NoMemory();
    }

    rc = head_append(&b, "HTTP/1.1 ", 9);
    if (rc == 0) {
        rc = head_append_str(&b, status);
    }

    while (rc == 0 && (header = PyIter_Next(iter)) != NULL) {
        rc = head_append_header(&b, header);
        Py_DECREF(header);
    }

    Py_DECREF(iter);

    if (rc == 0 && PyErr_Occurred()) {
        rc = -1;    /* the iteration itself failed */
    }
    if (rc == 0) {
        rc = check_status(status);
    }
    if (rc == 0) {
        rc = head_append(&b, "\r\n\r\n", 4);
    }

    head = rc == 0 ? PyBytes_FromStringAndSize(b.data, b.len) : NULL;
    PyMem_Free(b.data);
    return head;
}


static PyMethodDef speedups_methods[] = {
    { "environ_from_vars", environ_from_vars, METH_VARARGS,
      "environ_from_vars(buffer, end, base) -> dict | None" },
    { "encode_head", encode_head, METH_VARARGS,
      "encode_head(status, headers) -> bytes" },
    { NULL, NULL, 0, NULL }
};


static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    "_agent_loader_speedups",
    "The WSGI loader's per-request steps in C (see csrc/loader_speedups.c).",
    -1,
    speedups_methods,
    NULL, NULL, NULL, NULL
};


PyMODINIT_FUNC
PyInit__agent_loader_speedups(void)
{
    return PyModule_Create(&speedups_module);
}
