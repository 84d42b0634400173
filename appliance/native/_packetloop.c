/*
 * The worker's native packet path (issue 13; docs/decisions/0007): SRTP with libsrtp2,
 * and the relay's RTP rewrite, byte for byte what appliance/media/rtp.py's RtpRewriter
 * produces. Python keeps the control plane; appliance/native/__init__.py loads this
 * module or says why it could not.
 *
 * Every input is hostile: lengths are checked before any byte is read, and nothing here
 * keeps a pointer into a Python object past the call that lent it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <srtp2/srtp.h>

#define RTP_HEADER 12
/* libsrtp appends at most the auth tag and an MKI (RTP), plus the SRTCP index (RTCP). */
#define SRTP_TRAILER (SRTP_MAX_TRAILER_LEN + 4)
#define MAX_PACKET 65535

static PyObject *SrtpError;

/* -- SRTP ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    srtp_t session;
    int outbound;
} SrtpObject;

static const char *srtp_status_text(srtp_err_status_t status) {
    switch (status) {
    case srtp_err_status_ok: return "ok";
    case srtp_err_status_fail: return "unspecified failure";
    case srtp_err_status_bad_param: return "unsupported parameter";
    case srtp_err_status_alloc_fail: return "couldn't allocate memory";
    case srtp_err_status_init_fail: return "couldn't initialize";
    case srtp_err_status_auth_fail: return "authentication failure";
    case srtp_err_status_cipher_fail: return "cipher failure";
    case srtp_err_status_replay_fail: return "replay check failed (bad index)";
    case srtp_err_status_replay_old: return "replay check failed (index too old)";
    case srtp_err_status_no_ctx: return "no appropriate context found";
    case srtp_err_status_key_expired: return "can't use key any more";
    case srtp_err_status_parse_err: return "error parsing data";
    default: return "libsrtp error";
    }
}

static PyObject *srtp_fail(srtp_err_status_t status) {
    PyObject *args = Py_BuildValue("(si)", srtp_status_text(status), (int)status);
    if (args != NULL) {
        PyErr_SetObject(SrtpError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static int profile_key_length(int profile) {
    switch (profile) {
    case srtp_profile_aes128_cm_sha1_80:
    case srtp_profile_aes128_cm_sha1_32: return 16 + 14;
    case srtp_profile_aead_aes_128_gcm: return 16 + 12;
    case srtp_profile_aead_aes_256_gcm: return 32 + 12;
    default: return -1;
    }
}

static int Srtp_init(SrtpObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"profile", "key", "outbound", "window_size", NULL};
    int profile, outbound, window_size = 1024;
    Py_buffer key;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iy*p|i", kwlist, &profile, &key,
                                     &outbound, &window_size))
        return -1;
    int expected = profile_key_length(profile);
    if (expected < 0 || key.len != expected) {
        PyErr_Format(PyExc_ValueError, "SRTP profile %d needs a key and salt of %d bytes, "
                     "not %zd", profile, expected, key.len);
        PyBuffer_Release(&key);
        return -1;
    }
    if (window_size < 64 || window_size > 0x7FFF) {
        PyErr_SetString(PyExc_ValueError, "window_size must be 64..32767");
        PyBuffer_Release(&key);
        return -1;
    }
    if (self->session != NULL) {
        srtp_dealloc(self->session);
        self->session = NULL;
    }
    srtp_policy_t policy;
    memset(&policy, 0, sizeof policy);
    srtp_err_status_t status = srtp_crypto_policy_set_from_profile_for_rtp(
        &policy.rtp, (srtp_profile_t)profile);
    if (status == srtp_err_status_ok)
        status = srtp_crypto_policy_set_from_profile_for_rtcp(&policy.rtcp,
                                                              (srtp_profile_t)profile);
    if (status != srtp_err_status_ok) {
        PyBuffer_Release(&key);
        srtp_fail(status);
        return -1;
    }
    unsigned char key_copy[64];
    memcpy(key_copy, key.buf, (size_t)key.len);
    PyBuffer_Release(&key);
    policy.ssrc.type = outbound ? ssrc_any_outbound : ssrc_any_inbound;
    policy.key = key_copy;
    policy.window_size = (unsigned long)window_size;
    /* As aiortc sets up its sessions: a relay may send a packet index twice (a NACK
       answered from the cache is the same packet again). */
    policy.allow_repeat_tx = 1;
    policy.next = NULL;
    status = srtp_create(&self->session, &policy);
    memset(key_copy, 0, sizeof key_copy);
    if (status != srtp_err_status_ok) {
        self->session = NULL;
        srtp_fail(status);
        return -1;
    }
    self->outbound = outbound;
    return 0;
}

static void Srtp_dealloc(SrtpObject *self) {
    if (self->session != NULL)
        srtp_dealloc(self->session);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

typedef enum { PROTECT_RTP, UNPROTECT_RTP, PROTECT_RTCP, UNPROTECT_RTCP } srtp_op;

static PyObject *srtp_apply(SrtpObject *self, PyObject *arg, srtp_op op) {
    if (self->session == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "SRTP session not initialised");
        return NULL;
    }
    Py_buffer in;
    if (PyObject_GetBuffer(arg, &in, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t min_len = (op == PROTECT_RTP || op == UNPROTECT_RTP) ? RTP_HEADER : 8;
    if (in.len < min_len || in.len > MAX_PACKET - SRTP_TRAILER) {
        PyBuffer_Release(&in);
        PyErr_Format(PyExc_ValueError, "packet of %zd bytes", in.len);
        return NULL;
    }
    int grow = (op == PROTECT_RTP || op == PROTECT_RTCP) ? SRTP_TRAILER : 0;
    PyObject *out = PyBytes_FromStringAndSize(NULL, in.len + grow);
    if (out == NULL) {
        PyBuffer_Release(&in);
        return NULL;
    }
    char *buf = PyBytes_AS_STRING(out);
    memcpy(buf, in.buf, (size_t)in.len);
    int len = (int)in.len;
    PyBuffer_Release(&in);
    srtp_err_status_t status;
    switch (op) {
    case PROTECT_RTP: status = srtp_protect(self->session, buf, &len); break;
    case UNPROTECT_RTP: status = srtp_unprotect(self->session, buf, &len); break;
    case PROTECT_RTCP: status = srtp_protect_rtcp(self->session, buf, &len); break;
    default: status = srtp_unprotect_rtcp(self->session, buf, &len); break;
    }
    if (status != srtp_err_status_ok) {
        Py_DECREF(out);
        return srtp_fail(status);
    }
    if (_PyBytes_Resize(&out, len) < 0)
        return NULL;
    return out;
}

static PyObject *Srtp_protect(SrtpObject *self, PyObject *arg) {
    return srtp_apply(self, arg, PROTECT_RTP);
}
static PyObject *Srtp_unprotect(SrtpObject *self, PyObject *arg) {
    return srtp_apply(self, arg, UNPROTECT_RTP);
}
static PyObject *Srtp_protect_rtcp(SrtpObject *self, PyObject *arg) {
    return srtp_apply(self, arg, PROTECT_RTCP);
}
static PyObject *Srtp_unprotect_rtcp(SrtpObject *self, PyObject *arg) {
    return srtp_apply(self, arg, UNPROTECT_RTCP);
}

static PyMethodDef Srtp_methods[] = {
    {"protect", (PyCFunction)Srtp_protect, METH_O, "SRTP-protect one RTP packet."},
    {"unprotect", (PyCFunction)Srtp_unprotect, METH_O,
     "Authenticate and decrypt one SRTP packet; SrtpError if it fails."},
    {"protect_rtcp", (PyCFunction)Srtp_protect_rtcp, METH_O, "SRTCP-protect one packet."},
    {"unprotect_rtcp", (PyCFunction)Srtp_unprotect_rtcp, METH_O,
     "Authenticate and decrypt one SRTCP packet; SrtpError if it fails."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SrtpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "appliance.native._packetloop.Srtp",
    .tp_doc = "Srtp(profile, key, outbound, window_size=1024): one direction's SRTP and "
              "SRTCP session (libsrtp2), any SSRC.",
    .tp_basicsize = sizeof(SrtpObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Srtp_init,
    .tp_dealloc = (destructor)Srtp_dealloc,
    .tp_methods = Srtp_methods,
};

/* -- the module ---------------------------------------------------------------------- */

static struct PyModuleDef packetloop_module = {
    PyModuleDef_HEAD_INIT, "appliance.native._packetloop",
    "The worker's native packet path: SRTP (libsrtp2).", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__packetloop(void) {
    srtp_err_status_t status = srtp_init();
    if (status != srtp_err_status_ok) {
        PyErr_Format(PyExc_ImportError, "srtp_init failed: %s", srtp_status_text(status));
        return NULL;
    }
    if (PyType_Ready(&SrtpType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&packetloop_module);
    if (m == NULL)
        return NULL;
    SrtpError = PyErr_NewException("appliance.native._packetloop.SrtpError",
                                   PyExc_ValueError, NULL);
    if (SrtpError == NULL || PyModule_AddObjectRef(m, "SrtpError", SrtpError) < 0 ||
        PyModule_AddObjectRef(m, "Srtp", (PyObject *)&SrtpType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "PROFILE_AES128_CM_SHA1_80", srtp_profile_aes128_cm_sha1_80);
    PyModule_AddIntConstant(m, "PROFILE_AES128_CM_SHA1_32", srtp_profile_aes128_cm_sha1_32);
    PyModule_AddIntConstant(m, "PROFILE_AEAD_AES_128_GCM", srtp_profile_aead_aes_128_gcm);
    PyModule_AddIntConstant(m, "PROFILE_AEAD_AES_256_GCM", srtp_profile_aead_aes_256_gcm);
    PyModule_AddStringConstant(m, "LIBSRTP_VERSION", srtp_get_version_string());
    return m;
}
