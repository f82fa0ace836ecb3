/*
 * The kernel splice's inner loop, for shardtcp.proxy.ksplice.
 *
 * One direction of a spliced connection (socket -> pipe -> socket), moved
 * with splice(2) until neither reading nor writing can go on: the same
 * loop as the pure-Python pump in ksplice.py, with no interpreter work per
 * system call and no exception object per EAGAIN.  Everything that is not
 * moving bytes (prefixes, copying through userspace, ends, errors, the
 * pipe pool, the statistics) stays in Python: this function only reports,
 * in its returned state, what it saw.
 *
 * pump(src, pipe_w, pipe_r, dst, in_pipe, capacity, state, reads)
 *     -> (in_pipe, bytes_read, state, errno)
 *
 * state, in and out (the ST_* bits below, mirrored in ksplice.py):
 *   RD       src is readable until an EAGAIN from an empty pipe says not
 *   WR       dst is writable until an EAGAIN says not
 *   STALLED  the pipe refused more bytes by slot count (EAGAIN with bytes
 *            in it): no read until some went out
 *   EOF      src gives no more bytes (in: already known; out: a read gave 0)
 *   EDGE     in only: edge-triggered; without it, a short write clears WR
 *            (the reactor says when to go on)
 *   AGAIN    out: the reads allowed were used and src could give more
 *   MOVED    out: some byte moved, either way
 *   TRIED_IN, TRIED_OUT  out: a splice into / out of the pipe worked
 *   ERR_IN, ERR_OUT      out: a splice from src / to dst failed with errno
 *            (not EAGAIN or EINTR); the loop stopped there
 */

#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>

#define ST_RD 1
#define ST_WR 2
#define ST_STALLED 4
#define ST_EOF 8
#define ST_EDGE 16
#define ST_AGAIN 32
#define ST_MOVED 64
#define ST_TRIED_IN 128
#define ST_TRIED_OUT 256
#define ST_ERR_IN 512
#define ST_ERR_OUT 1024

#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)

static int
as_long(PyObject *o, long *out)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

static PyObject *
kpump_pump(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long src, pipe_w, pipe_r, dst, in_pipe, capacity, state, reads;
    long got = 0;
    int err = 0;

    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "pump() takes 8 arguments");
        return NULL;
    }
    if (as_long(args[0], &src) || as_long(args[1], &pipe_w) || as_long(args[2], &pipe_r)
        || as_long(args[3], &dst) || as_long(args[4], &in_pipe) || as_long(args[5], &capacity)
        || as_long(args[6], &state) || as_long(args[7], &reads))
        return NULL;
    if (in_pipe < 0 || capacity <= 0 || in_pipe > capacity) {
        PyErr_SetString(PyExc_ValueError, "pump(): in_pipe out of [0, capacity]");
        return NULL;
    }
    state &= ST_RD | ST_WR | ST_STALLED | ST_EOF | ST_EDGE;

    for (;;) {
        int progress = 0;
        ssize_t n;

        /* out, to dst */
        if ((state & ST_WR) && in_pipe) {
            n = splice((int)pipe_r, NULL, (int)dst, NULL, (size_t)in_pipe, SPLICE_FLAGS);
            if (n > 0) {
                state |= ST_TRIED_OUT | ST_MOVED;
                state &= ~ST_STALLED;
                in_pipe -= n;
                progress = 1;
                if (in_pipe && !(state & ST_EDGE))
                    state &= ~ST_WR;
            } else if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    state &= ~ST_WR;
                else if (errno != EINTR) {
                    err = errno;
                    state |= ST_ERR_OUT;
                    break;
                }
            }
        }
        if ((state & ST_EOF) && !in_pipe)
            break;
        /* in, from src */
        if ((state & ST_RD) && !(state & (ST_EOF | ST_STALLED))) {
            if (!reads) {
                state |= ST_AGAIN;
                break;
            }
            reads--;
            if (capacity > in_pipe) {
                n = splice((int)src, NULL, (int)pipe_w, NULL, (size_t)(capacity - in_pipe), SPLICE_FLAGS);
                if (n > 0) {
                    state |= ST_TRIED_IN | ST_MOVED;
                    in_pipe += n;
                    got += n;
                    progress = 1;
                } else if (n == 0) {
                    state |= ST_TRIED_IN | ST_EOF;
                    progress = 1;
                } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    if (in_pipe)
                        state |= ST_STALLED;
                    else
                        state &= ~ST_RD;
                } else if (errno != EINTR) {
                    err = errno;
                    state |= ST_ERR_IN;
                    break;
                }
            }
        }
        if (!progress)
            break;
    }
    return Py_BuildValue("(llli)", in_pipe, got, state, err);
}

static PyMethodDef kpump_methods[] = {
    {"pump", (PyCFunction)(void (*)(void))kpump_pump, METH_FASTCALL,
     "pump(src, pipe_w, pipe_r, dst, in_pipe, capacity, state, reads)"
     " -> (in_pipe, bytes_read, state, errno)\n\n"
     "Splice one direction until neither side can go on; see ksplice.py."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef kpump_module = {
    PyModuleDef_HEAD_INIT, "shardtcp.proxy._kpump",
    "The kernel splice's inner loop (splice(2) both ways, one direction).", -1, kpump_methods,
};

PyMODINIT_FUNC
PyInit__kpump(void)
{
    return PyModule_Create(&kpump_module);
}
