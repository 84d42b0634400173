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
#define _GNU_SOURCE  /* recvmmsg, sendmmsg */
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <math.h>
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


/* -- the relay's rewrite ------------------------------------------------------------- */

/* RtpRewriter (appliance/media/rtp.py) in C: one outgoing stream fed by successive
   sources (SSRCs), with our SSRC and payload type, sequence numbers +1 per packet sent,
   timestamps continuous across source switches (a new source continues our timeline,
   advanced by the wall-clock gap), the marker on the first packet after a switch when
   mark_switches (audio). The initial sequence number and first timestamp are given, so
   a test can hold it to the Python one byte for byte. */

typedef struct {
    PyObject_HEAD
    uint32_t ssrc;
    uint32_t clock_rate;
    int mark_switches;
    uint16_t seq;
    uint32_t first_ts;   /* our timeline's start, for the first source */
    int64_t source;      /* the current source's SSRC; -1 before the first */
    uint32_t ts_offset;
    int have_last;
    uint32_t last_out_ts;
    double last_wall;
    int mark_next;
    unsigned long long packets;
    unsigned long long octets;
} RewriterObject;

static int Rewriter_init(RewriterObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"ssrc", "clock_rate", "mark_switches", "seq", "first_ts", NULL};
    unsigned long ssrc, clock_rate, seq, first_ts;
    int mark_switches;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "kkpkk", kwlist, &ssrc, &clock_rate,
                                     &mark_switches, &seq, &first_ts))
        return -1;
    if (ssrc > 0xFFFFFFFFUL || seq > 0xFFFF || first_ts > 0xFFFFFFFFUL ||
        clock_rate < 1 || clock_rate > 1000000) {
        PyErr_SetString(PyExc_ValueError,
                        "ssrc and first_ts are 32-bit, seq 16-bit, clock_rate 1..1000000");
        return -1;
    }
    self->ssrc = (uint32_t)ssrc;
    self->clock_rate = (uint32_t)clock_rate;
    self->mark_switches = mark_switches;
    self->seq = (uint16_t)seq;
    self->first_ts = (uint32_t)first_ts;
    self->source = -1;
    self->ts_offset = 0;
    self->have_last = 0;
    self->last_out_ts = 0;
    self->last_wall = 0.0;
    self->mark_next = 0;
    self->packets = self->octets = 0;
    return 0;
}

/* RtpRewriter.stamp: our timestamp for `source`'s `timestamp`. */
static uint32_t rewriter_stamp_source(RewriterObject *self, int64_t source, uint32_t timestamp,
                                      double now) {
    if (source != self->source) {
        uint32_t target;
        if (!self->have_last) {
            target = self->first_ts;
        } else {
            /* Python: max(1, round(gap * clock_rate)); round() ties to even, as rint()
               does in the default rounding mode. */
            double ticks = rint((now - self->last_wall) * (double)self->clock_rate);
            int64_t gap = ticks < 1.0 ? 1 : (ticks > 4294967295.0 ? 4294967295LL
                                                                  : (int64_t)ticks);
            target = (uint32_t)(self->last_out_ts + (uint64_t)gap);
        }
        self->ts_offset = target - timestamp;  /* mod 2^32 */
        self->source = source;
        if (self->mark_switches)
            self->mark_next = 1;
    }
    uint32_t out_ts = timestamp + self->ts_offset;
    self->last_out_ts = out_ts;
    self->have_last = 1;
    self->last_wall = now;
    return out_ts;
}

/* RFC 3550 5.1: where the payload of `p` starts and ends (padding stripped), or -1. */
static int rtp_payload_bounds(const unsigned char *p, Py_ssize_t len, Py_ssize_t *start,
                              Py_ssize_t *end) {
    if (len < RTP_HEADER || (p[0] & 0xC0) != 0x80)
        return -1;
    Py_ssize_t offset = RTP_HEADER + 4 * (p[0] & 0x0F);
    if (p[0] & 0x10) {
        if (len < offset + 4)
            return -1;
        offset += 4 + 4 * (((Py_ssize_t)p[offset + 2] << 8) | p[offset + 3]);
    }
    if (offset > len)
        return -1;
    Py_ssize_t stop = len;
    if (p[0] & 0x20)
        stop -= p[len - 1];
    *start = offset;
    *end = stop > offset ? stop : offset;
    return 0;
}

/* abs-send-time (6.18 fixed-point seconds) in a one-byte-header extension block, as
   rtp.abs_send_time_extension builds it. */
static void abs_send_time_block(unsigned char *out, int ext_id, double wall) {
    uint32_t value = (uint32_t)((int64_t)(wall * 262144.0)) & 0xFFFFFF;
    out[0] = 0xBE; out[1] = 0xDE; out[2] = 0; out[3] = 1;
    out[4] = (unsigned char)((ext_id << 4) | 2);
    out[5] = (unsigned char)(value >> 16);
    out[6] = (unsigned char)(value >> 8);
    out[7] = (unsigned char)value;
}

/* Write into `o` the packet to send for the received RTP packet `p` (its payload at
   start..end), advancing the rewriter: what RtpRewriter.rewrite returns. The length
   written: RTP_HEADER + 8 with an abs-send-time id, + the payload. */
static Py_ssize_t rewrite_into(RewriterObject *rw, const unsigned char *p, Py_ssize_t start,
                               Py_ssize_t end, int payload_type, int ext_id, double now,
                               double wall, unsigned char *o) {
    int marker = (p[1] & 0x80) != 0;
    uint32_t timestamp = ((uint32_t)p[4] << 24) | ((uint32_t)p[5] << 16) |
                         ((uint32_t)p[6] << 8) | p[7];
    uint32_t source = ((uint32_t)p[8] << 24) | ((uint32_t)p[9] << 16) |
                      ((uint32_t)p[10] << 8) | p[11];
    Py_ssize_t payload_len = end - start;
    Py_ssize_t ext_len = ext_id > 0 ? 8 : 0;
    uint32_t out_ts = rewriter_stamp_source(rw, (int64_t)source, timestamp, now);
    if (rw->mark_next) {
        marker = 1;
        rw->mark_next = 0;
    }
    rw->seq = (uint16_t)(rw->seq + 1);
    rw->packets += 1;
    rw->octets += (unsigned long long)payload_len;
    o[0] = ext_len ? 0x90 : 0x80;
    o[1] = (unsigned char)((marker ? 0x80 : 0) | payload_type);
    o[2] = (unsigned char)(rw->seq >> 8); o[3] = (unsigned char)rw->seq;
    o[4] = (unsigned char)(out_ts >> 24); o[5] = (unsigned char)(out_ts >> 16);
    o[6] = (unsigned char)(out_ts >> 8); o[7] = (unsigned char)out_ts;
    o[8] = (unsigned char)(rw->ssrc >> 24); o[9] = (unsigned char)(rw->ssrc >> 16);
    o[10] = (unsigned char)(rw->ssrc >> 8); o[11] = (unsigned char)rw->ssrc;
    if (ext_len)
        abs_send_time_block(o + RTP_HEADER, ext_id, wall);
    memcpy(o + RTP_HEADER + ext_len, p + start, (size_t)payload_len);
    return RTP_HEADER + ext_len + payload_len;
}

static PyObject *Rewriter_relay(RewriterObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"packet", "payload_type", "now", "abs_send_time_id", "wall",
                             NULL};
    Py_buffer in;
    int payload_type, ext_id = -1;
    double now, wall = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*id|id", kwlist, &in, &payload_type,
                                     &now, &ext_id, &wall))
        return NULL;
    if (payload_type < 0 || payload_type > 127 || ext_id > 14 || ext_id == 0) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "payload_type 0..127, abs_send_time_id 1..14");
        return NULL;
    }
    const unsigned char *p = in.buf;
    Py_ssize_t start, end;
    if (rtp_payload_bounds(p, in.len, &start, &end) < 0) {
        PyBuffer_Release(&in);
        Py_RETURN_NONE;  /* not an RTP packet: nothing to relay */
    }
    PyObject *out = PyBytes_FromStringAndSize(
        NULL, RTP_HEADER + (ext_id > 0 ? 8 : 0) + (end - start));
    if (out == NULL) {
        PyBuffer_Release(&in);
        return NULL;
    }
    rewrite_into(self, p, start, end, payload_type, ext_id, now, wall,
                 (unsigned char *)PyBytes_AS_STRING(out));
    PyBuffer_Release(&in);
    return out;
}

/* Our header for one outgoing packet into `o` (12 bytes), advancing seq and counters. */
static void rewriter_header(RewriterObject *rw, int payload_type, int marker, uint32_t out_ts,
                            Py_ssize_t payload_len, unsigned char *o) {
    rw->seq = (uint16_t)(rw->seq + 1);
    rw->packets += 1;
    rw->octets += (unsigned long long)payload_len;
    o[0] = 0x80;
    o[1] = (unsigned char)((marker ? 0x80 : 0) | payload_type);
    o[2] = (unsigned char)(rw->seq >> 8); o[3] = (unsigned char)rw->seq;
    o[4] = (unsigned char)(out_ts >> 24); o[5] = (unsigned char)(out_ts >> 16);
    o[6] = (unsigned char)(out_ts >> 8); o[7] = (unsigned char)out_ts;
    o[8] = (unsigned char)(rw->ssrc >> 24); o[9] = (unsigned char)(rw->ssrc >> 16);
    o[10] = (unsigned char)(rw->ssrc >> 8); o[11] = (unsigned char)rw->ssrc;
}

/* A source as RtpRewriter sees one: an SSRC, or a marker of our own above 2^32 (the
   voice bridge's ringback). */
static int parse_source(PyObject *arg, int64_t *source) {
    long long value = PyLong_AsLongLong(arg);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (value < 0 || value > (1LL << 40)) {
        PyErr_SetString(PyExc_ValueError, "source must be 0..2**40");
        return -1;
    }
    *source = (int64_t)value;
    return 0;
}


/* RtpRewriter.rewrite(source, payload_type, marker, timestamp, payload, now). */
static PyObject *Rewriter_rewrite(RewriterObject *self, PyObject *args) {
    PyObject *source_arg;
    int payload_type, marker;
    unsigned long timestamp;
    Py_buffer payload;
    double now;
    if (!PyArg_ParseTuple(args, "Oipky*d", &source_arg, &payload_type, &marker, &timestamp,
                          &payload, &now))
        return NULL;
    int64_t source;
    if (parse_source(source_arg, &source) < 0 || payload_type < 0 || payload_type > 127 ||
        timestamp > 0xFFFFFFFFUL || payload.len > MAX_PACKET - RTP_HEADER) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "payload_type 0..127, timestamp 32-bit");
        PyBuffer_Release(&payload);
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, RTP_HEADER + payload.len);
    if (out == NULL) {
        PyBuffer_Release(&payload);
        return NULL;
    }
    uint32_t out_ts = rewriter_stamp_source(self, source, (uint32_t)timestamp, now);
    if (self->mark_next) {
        marker = 1;
        self->mark_next = 0;
    }
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    rewriter_header(self, payload_type, marker, out_ts, payload.len, o);
    memcpy(o + RTP_HEADER, payload.buf, (size_t)payload.len);
    PyBuffer_Release(&payload);
    return out;
}

/* RtpRewriter.stamp(source, timestamp, now): the timeline moves on, nothing is sent. */
static PyObject *Rewriter_stamp(RewriterObject *self, PyObject *args) {
    PyObject *source_arg;
    unsigned long timestamp;
    double now;
    if (!PyArg_ParseTuple(args, "Okd", &source_arg, &timestamp, &now))
        return NULL;
    int64_t source;
    if (parse_source(source_arg, &source) < 0)
        return NULL;
    if (timestamp > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_ValueError, "timestamp is 32-bit");
        return NULL;
    }
    return PyLong_FromUnsignedLong(rewriter_stamp_source(self, source, (uint32_t)timestamp, now));
}

/* RtpRewriter.inject(payload_type, marker, timestamp, payload): a packet on our own
   timeline (DTMF events); the stream's next packet starts a talkspurt. */
static PyObject *Rewriter_inject(RewriterObject *self, PyObject *args) {
    int payload_type, marker;
    unsigned long timestamp;
    Py_buffer payload;
    if (!PyArg_ParseTuple(args, "ipky*", &payload_type, &marker, &timestamp, &payload))
        return NULL;
    if (payload_type < 0 || payload_type > 127 || timestamp > 0xFFFFFFFFUL ||
        payload.len > MAX_PACKET - RTP_HEADER) {
        PyBuffer_Release(&payload);
        PyErr_SetString(PyExc_ValueError, "payload_type 0..127, timestamp 32-bit");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, RTP_HEADER + payload.len);
    if (out == NULL) {
        PyBuffer_Release(&payload);
        return NULL;
    }
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    rewriter_header(self, payload_type, marker, (uint32_t)timestamp, payload.len, o);
    memcpy(o + RTP_HEADER, payload.buf, (size_t)payload.len);
    PyBuffer_Release(&payload);
    if (self->mark_switches)
        self->mark_next = 1;
    return out;
}

static PyObject *Rewriter_mark_next(RewriterObject *self, PyObject *unused) {
    if (self->mark_switches)
        self->mark_next = 1;
    Py_RETURN_NONE;
}

static PyObject *Rewriter_get_seq(RewriterObject *self, void *closure) {
    return PyLong_FromUnsignedLong(self->seq);
}
static PyObject *Rewriter_get_packets(RewriterObject *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->packets);
}
static PyObject *Rewriter_get_octets(RewriterObject *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->octets);
}
static PyObject *Rewriter_get_last_timestamp(RewriterObject *self, void *closure) {
    return PyLong_FromUnsignedLong(self->have_last ? self->last_out_ts : 0);
}
static PyObject *Rewriter_get_ssrc(RewriterObject *self, void *closure) {
    return PyLong_FromUnsignedLong(self->ssrc);
}

/* The whole state, for a Python RtpRewriter to take the stream over where this one is. */
static PyObject *Rewriter_state(RewriterObject *self, PyObject *unused) {
    return Py_BuildValue("{sksLsksOsksdsOsKsK}", "seq", (unsigned long)self->seq,
                         "source", (long long)self->source,
                         "ts_offset", (unsigned long)self->ts_offset,
                         "have_last", self->have_last ? Py_True : Py_False,
                         "last_out_ts", (unsigned long)self->last_out_ts,
                         "last_wall", self->last_wall,
                         "mark_next", self->mark_next ? Py_True : Py_False,
                         "packets", (unsigned long long)self->packets,
                         "octets", (unsigned long long)self->octets);
}

static PyGetSetDef Rewriter_getset[] = {
    {"seq", (getter)Rewriter_get_seq, NULL, "the last sequence number sent", NULL},
    {"packets", (getter)Rewriter_get_packets, NULL, "packets sent", NULL},
    {"octets", (getter)Rewriter_get_octets, NULL, "payload octets sent", NULL},
    {"last_timestamp", (getter)Rewriter_get_last_timestamp, NULL, "our last timestamp", NULL},
    {"ssrc", (getter)Rewriter_get_ssrc, NULL, "our SSRC", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Rewriter_methods[] = {
    {"rewrite", (PyCFunction)Rewriter_rewrite, METH_VARARGS,
     "rewrite(source, payload_type, marker, timestamp, payload, now): RtpRewriter.rewrite."},
    {"stamp", (PyCFunction)Rewriter_stamp, METH_VARARGS,
     "stamp(source, timestamp, now): our timestamp; the timeline moves, nothing is sent."},
    {"inject", (PyCFunction)Rewriter_inject, METH_VARARGS,
     "inject(payload_type, marker, timestamp, payload): a packet on our own timeline."},
    {"mark_next", (PyCFunction)Rewriter_mark_next, METH_NOARGS,
     "the next packet starts a talkspurt (audio)"},
    {"state", (PyCFunction)Rewriter_state, METH_NOARGS, "the rewriter's state, as a dict"},
    {"relay", (PyCFunction)(void (*)(void))Rewriter_relay, METH_VARARGS | METH_KEYWORDS,
     "relay(packet, payload_type, now, abs_send_time_id=-1, wall=0.0): the packet to send "
     "for a received RTP packet (padding stripped, our header and abs-send-time), or None "
     "when it is not RTP."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RewriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "appliance.native._packetloop.Rewriter",
    .tp_doc = "Rewriter(ssrc, clock_rate, mark_switches, seq, first_ts): RtpRewriter in C.",
    .tp_basicsize = sizeof(RewriterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Rewriter_init,
    .tp_methods = Rewriter_methods,
    .tp_getset = Rewriter_getset,
};

/* -- a received stream's figures ------------------------------------------------------ */

/* StreamMeter + ReceiveStats (appliance/media/quality.py, rtp.py) in C: RFC 3550 A.1
   sequence accounting (cycles, expected), A.8 interarrival jitter in timestamp units,
   packets and bytes, marker-bit frames and bytes since the last window, and for VP8 the
   keyframes with the picture size their header carries. Python reads it once a second. */

typedef struct {
    uint32_t clock_rate;
    int is_vp8;
    uint32_t ssrc;
    int have_base;
    uint16_t base_seq;
    uint16_t max_seq;
    uint64_t cycles;
    uint64_t received;
    uint64_t octets;
    double jitter;
    int have_transit;
    double transit;
    uint64_t keyframes;
    uint16_t width, height;
    uint64_t window_bytes;
    uint64_t window_frames;
} meter_t;

/* RFC 7741 4.2: the offset of the VP8 data in an RTP payload, or -1. */
static Py_ssize_t vp8_data_offset(const unsigned char *pl, Py_ssize_t len) {
    if (len < 1)
        return -1;
    Py_ssize_t i = 1;
    if (pl[0] & 0x80) {
        if (len < 2)
            return -1;
        unsigned char ext = pl[1];
        i = 2;
        if (ext & 0x80) {
            if (len <= i)
                return -1;
            i += (pl[i] & 0x80) ? 2 : 1;
        }
        if (ext & 0x40)
            i += 1;
        if (ext & 0x30)
            i += 1;
    }
    return i < len ? i : -1;
}

/* 1 and the size when `pl` (at most 16 bytes of payload, as StreamMeter passes) starts a
   VP8 keyframe whose header says its size (RFC 6386 9.1). */
static int vp8_keyframe_size(const unsigned char *pl, Py_ssize_t len, uint16_t *w,
                             uint16_t *h) {
    if (len < 1 || (pl[0] & 0x17) != 0x10)
        return 0;
    Py_ssize_t at = vp8_data_offset(pl, len);
    if (at < 0)
        return 0;
    const unsigned char *f = pl + at;
    Py_ssize_t flen = len - at;
    if (flen > 10)
        flen = 10;
    if (flen < 10 || (f[0] & 1) || f[3] != 0x9d || f[4] != 0x01 || f[5] != 0x2a)
        return 0;
    *w = (uint16_t)((f[6] | (f[7] << 8)) & 0x3FFF);
    *h = (uint16_t)((f[8] | (f[9] << 8)) & 0x3FFF);
    return 1;
}

/* One packet whose header parsed (payload at `offset`); 1 when it starts a keyframe. */
static int meter_packet(meter_t *m, const unsigned char *p, Py_ssize_t len,
                        Py_ssize_t offset, double arrival) {
    uint16_t seq = (uint16_t)((p[2] << 8) | p[3]);
    uint32_t ts = ((uint32_t)p[4] << 24) | ((uint32_t)p[5] << 16) | ((uint32_t)p[6] << 8) | p[7];
    if (!m->have_base) {
        m->have_base = 1;
        m->base_seq = m->max_seq = seq;
        m->ssrc = ((uint32_t)p[8] << 24) | ((uint32_t)p[9] << 16) | ((uint32_t)p[10] << 8) | p[11];
    } else {
        uint16_t delta = (uint16_t)(seq - m->max_seq);
        if (delta > 0 && delta < 0x8000) {
            if (seq < m->max_seq)
                m->cycles += 0x10000;
            m->max_seq = seq;
        }
    }
    m->received += 1;
    m->octets += (uint64_t)len;
    double transit = arrival * (double)m->clock_rate - (double)ts;
    if (m->have_transit) {
        double d = fabs(transit - m->transit);
        if (d < (double)m->clock_rate * 10)  /* a timestamp jump: a source switch */
            m->jitter += (d - m->jitter) / 16;
    }
    m->transit = transit;
    m->have_transit = 1;
    m->window_bytes += (uint64_t)len;
    if (p[1] & 0x80)
        m->window_frames += 1;
    if (m->is_vp8 && len > offset) {
        Py_ssize_t n = len - offset < 16 ? len - offset : 16;
        uint16_t w, h;
        if (vp8_keyframe_size(p + offset, n, &w, &h)) {
            m->keyframes += 1;
            m->width = w;
            m->height = h;
            return 1;
        }
    }
    return 0;
}

/* The payload offset RtpHeader.payload_offset gives (padding not stripped), or -1. */
static Py_ssize_t rtp_payload_offset(const unsigned char *p, Py_ssize_t len) {
    Py_ssize_t start, end;
    if (rtp_payload_bounds(p, len, &start, &end) < 0)
        return -1;
    return start;
}

typedef struct {
    PyObject_HEAD
    meter_t m;
} MeterObject;

static int Meter_init(MeterObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"clock_rate", "is_vp8", NULL};
    unsigned long clock_rate;
    int is_vp8 = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "k|p", kwlist, &clock_rate, &is_vp8))
        return -1;
    if (clock_rate < 1 || clock_rate > 1000000) {
        PyErr_SetString(PyExc_ValueError, "clock_rate must be 1..1000000");
        return -1;
    }
    memset(&self->m, 0, sizeof self->m);
    self->m.clock_rate = (uint32_t)clock_rate;
    self->m.is_vp8 = is_vp8;
    return 0;
}

static PyObject *Meter_packet(MeterObject *self, PyObject *args) {
    Py_buffer in;
    double arrival;
    if (!PyArg_ParseTuple(args, "y*d", &in, &arrival))
        return NULL;
    Py_ssize_t offset = rtp_payload_offset(in.buf, in.len);
    PyObject *result;
    if (offset < 0) {
        result = Py_None;
    } else {
        result = meter_packet(&self->m, in.buf, in.len, offset, arrival) ? Py_True : Py_False;
    }
    PyBuffer_Release(&in);
    Py_INCREF(result);
    return result;
}

static PyObject *Meter_take_window(MeterObject *self, PyObject *unused) {
    PyObject *out = Py_BuildValue("(KK)", (unsigned long long)self->m.window_bytes,
                                  (unsigned long long)self->m.window_frames);
    self->m.window_bytes = self->m.window_frames = 0;
    return out;
}

static PyObject *Meter_figures(MeterObject *self, PyObject *unused) {
    const meter_t *m = &self->m;
    uint64_t extended_max = m->cycles + m->max_seq;
    uint64_t expected = m->have_base ? extended_max - m->base_seq + 1 : 0;
    return Py_BuildValue("{sksKsKsKsKsdsKsisisK}", "ssrc", (unsigned long)m->ssrc,
                         "received", (unsigned long long)m->received,
                         "octets", (unsigned long long)m->octets,
                         "expected", (unsigned long long)expected,
                         "extended_max", (unsigned long long)extended_max,
                         "jitter", m->jitter,
                         "keyframes", (unsigned long long)m->keyframes,
                         "width", (int)m->width, "height", (int)m->height,
                         "window_frames", (unsigned long long)m->window_frames);
}

static PyMethodDef Meter_methods[] = {
    {"packet", (PyCFunction)Meter_packet, METH_VARARGS,
     "packet(data, arrival): account for one RTP packet; True when it starts a VP8 "
     "keyframe, None when it is not RTP (nothing counted)."},
    {"take_window", (PyCFunction)Meter_take_window, METH_NOARGS,
     "(bytes, marker frames) since the last call; starts a new window."},
    {"figures", (PyCFunction)Meter_figures, METH_NOARGS, "the counters, as a dict"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MeterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "appliance.native._packetloop.Meter",
    .tp_doc = "Meter(clock_rate, is_vp8=False): StreamMeter and ReceiveStats in C.",
    .tp_basicsize = sizeof(MeterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Meter_init,
    .tp_methods = Meter_methods,
};

/* -- the worker port's loop ------------------------------------------------------------ */

/* PortLoop owns the draining of one UDP socket (the worker's media port; Python keeps the
   socket object and registers drain() as the event loop's reader). Each drain reads
   datagrams in batches (recvmmsg); a datagram from a registered flow (a call's browser
   address) that is SRTP with a routed payload type is unprotected with the flow's keys,
   metered, rewritten and protected with the destination leg's keys, and sent in a batch
   (sendmmsg) - Python never sees it. Everything else is handed up untouched, in one list
   per drain: STUN, DTLS, RTCP, unrouted payload types, unknown sources. */

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>

#define BATCH 64
#define MAX_DATAGRAM 1500          /* appliance/media/datagrams.py */
#define BUF_SIZE 2048              /* > MAX_DATAGRAM: a longer one shows as truncated */
#define OUT_SIZE (MAX_DATAGRAM + 8 + SRTP_TRAILER)
#define MAX_FLOWS 4096
#define MAX_DRAIN 4096             /* datagrams per drain() call: the loop must yield */
/* Protected packets kept per route to answer the receiver's NACKs (RFC 4585): ~2.5 s of
   640x480 VP8 at ~100 packets/s; each slot holds one packet, sized to it. */
#define NACK_SLOTS 256

typedef struct {
    struct sockaddr_storage addr;
    socklen_t addr_len;
} endpoint_t;

/* rtp.TalkSpurts: where a sender's talkspurts start (RFC 3551 4.1), from its sequence
   numbers and timestamps; the sender's own marker bit is not trusted. */
typedef struct {
    int have;
    uint16_t seq;
    uint32_t ts;
    uint32_t step;
    uint32_t max_step;
} spurts_t;

/* 0 if this packet continues the talkspurt, else the timestamp units of silence before it. */
static uint32_t spurts_starts(spurts_t *t, uint16_t seq, uint32_t ts) {
    if (!t->have) {
        t->have = 1;
        t->seq = seq;
        t->ts = ts;
        return 0;
    }
    uint16_t dseq = (uint16_t)(seq - t->seq);
    if (dseq == 0 || dseq >= 0x8000)
        return 0;
    uint32_t dts = ts - t->ts;
    t->seq = seq;
    t->ts = ts;
    if (dts >= 0x80000000u)
        return 0;
    uint32_t silence = 0;
    if (t->step && 2 * (uint64_t)dts > (2 * (uint64_t)dseq + 1) * t->step)
        silence = (uint32_t)((uint64_t)dts - (uint64_t)dseq * t->step);
    if (dseq == 1 && dts > 0 && dts <= t->max_step)
        t->step = dts;
    return silence;
}

/* conditions.pcmu_has_sound: digital silence in µ-law is 0xFF/0x7F (and near it); a live
   microphone never stays there. A stride of 7, as Python reads it. */
static int pcmu_has_sound(const unsigned char *pl, Py_ssize_t len) {
    for (Py_ssize_t i = 0; i < len; i += 7) {
        unsigned char b = pl[i];
        if (b != 0xFF && b != 0x7F && b != 0xFE && b != 0x7E)
            return 1;
    }
    return 0;
}

/* A route's pause (set_paused): video drops what it holds; a voice route "held" by the
   phone (hold) keeps our timeline moving with the clock, sending nothing. */
#define PAUSE_NONE 0
#define PAUSE_DROP 1
#define PAUSE_STAMP 2

typedef struct route {
    int payload_type;              /* incoming */
    int voice;                     /* audio: our own marker (talkspurts), no NACK cache */
    int sound_check;               /* sample one packet in 10 for sound (the customer's mic) */
    int fd;                        /* the socket to send from */
    int sink;                      /* metered, then dropped (add_sink: a receiver's end) */
    spurts_t spurts;
    double last_sound;             /* monotonic time the sound check last heard something */
    int out_payload_type;
    int ext_id;                    /* abs-send-time id, or -1 */
    int paused;
    int await_keyframe;
    PyObject *meter;               /* MeterObject */
    PyObject *rewriter;            /* RewriterObject */
    PyObject *tx;                  /* SrtpObject: the destination leg's outbound keys, or
                                      NULL: plain RTP (the desk phone) */
    endpoint_t dest;
    uint64_t relayed;
    uint64_t held;                 /* received while paused or waiting for a keyframe */
    uint64_t retransmitted;
    unsigned char *cache[NACK_SLOTS];  /* the protected packet sent with each seq % slots */
    uint16_t cache_len[NACK_SLOTS];
    uint16_t cache_cap[NACK_SLOTS];
    int32_t cache_seq[NACK_SLOTS];     /* -1: empty */
    struct route *next;
} route_t;

typedef struct {
    int used;
    long id;
    endpoint_t from;
    PyObject *rx;                  /* SrtpObject: the leg's inbound keys, or NULL: plain RTP
                                      (the desk phone's socket) */
    route_t *routes;
    uint64_t unprotect_failed;
} flow_t;

typedef struct {
    PyObject_HEAD
    int fd;
    long next_id;
    flow_t *flows;                 /* MAX_FLOWS slots */
    int nflows;
    flow_t *last_hit;
    unsigned char (*in)[BUF_SIZE];
    unsigned char (*out)[OUT_SIZE];
    struct sockaddr_storage in_addr[BATCH];
    struct mmsghdr in_msgs[BATCH];
    struct iovec in_iov[BATCH];
    struct mmsghdr out_msgs[BATCH];
    struct iovec out_iov[BATCH];
    int out_fd[BATCH];             /* the socket each queued datagram goes out of */
    uint64_t datagrams, relayed, relayed_elsewhere, handed_up, oversized, send_errors, drains,
        routed_in;
} PortLoopObject;

static int endpoint_from(PyObject *host, int port, endpoint_t *ep) {
    const char *text = PyUnicode_AsUTF8(host);
    if (text == NULL)
        return -1;
    if (port < 1 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "port must be 1..65535");
        return -1;
    }
    memset(ep, 0, sizeof *ep);
    struct sockaddr_in *v4 = (struct sockaddr_in *)&ep->addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&ep->addr;
    if (inet_pton(AF_INET, text, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        ep->addr_len = sizeof *v4;
        return 0;
    }
    if (inet_pton(AF_INET6, text, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        ep->addr_len = sizeof *v6;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "not an IP address: %R", host);
    return -1;
}

/* Whether two socket addresses name the same address and port (a v4 peer on a dual-stack
   socket arrives as ::ffff:a.b.c.d and is registered as such by Python). */
static int endpoint_equal(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
    if (a->ss_family != b->ss_family)
        return 0;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
        return x->sin6_port == y->sin6_port &&
               memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr) == 0;
    }
    return 0;
}

static PyObject *endpoint_tuple(const struct sockaddr_storage *a) {
    char text[INET6_ADDRSTRLEN];
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const void *)a;
        inet_ntop(AF_INET, &v4->sin_addr, text, sizeof text);
        return Py_BuildValue("(si)", text, ntohs(v4->sin_port));
    }
    const struct sockaddr_in6 *v6 = (const void *)a;
    inet_ntop(AF_INET6, &v6->sin6_addr, text, sizeof text);
    return Py_BuildValue("(siII)", text, ntohs(v6->sin6_port),
                         (unsigned int)ntohl(v6->sin6_flowinfo), (unsigned int)v6->sin6_scope_id);
}

static void route_free(route_t *r) {
    for (int i = 0; i < NACK_SLOTS; i++)
        PyMem_Free(r->cache[i]);
    Py_XDECREF(r->meter);
    Py_XDECREF(r->rewriter);
    Py_XDECREF(r->tx);
    PyMem_Free(r);
}

static void flow_clear(flow_t *f) {
    route_t *r = f->routes;
    while (r != NULL) {
        route_t *next = r->next;
        route_free(r);
        r = next;
    }
    Py_XDECREF(f->rx);
    memset(f, 0, sizeof *f);
}

/* Flows take the lowest free slot, so the used ones sit at the front: the search stops
   after the last. Consecutive datagrams mostly come from one browser: the last hit is
   tried first. (A hash table is the next step when a worker holds hundreds of flows.) */
static flow_t *flow_by_addr(PortLoopObject *self, const struct sockaddr_storage *from) {
    flow_t *last = self->last_hit;
    if (last != NULL && last->used && endpoint_equal(&last->from.addr, from))
        return last;
    for (int i = 0, seen = 0; i < MAX_FLOWS && seen < self->nflows; i++) {
        flow_t *f = &self->flows[i];
        if (!f->used)
            continue;
        seen++;
        if (endpoint_equal(&f->from.addr, from)) {
            self->last_hit = f;
            return f;
        }
    }
    return NULL;
}

static flow_t *flow_by_id(PortLoopObject *self, long id) {
    for (int i = 0; i < MAX_FLOWS; i++)
        if (self->flows[i].used && self->flows[i].id == id)
            return &self->flows[i];
    PyErr_Format(PyExc_KeyError, "no flow %ld", id);
    return NULL;
}

static int PortLoop_init(PortLoopObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fd", NULL};
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", kwlist, &fd))
        return -1;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must be a socket's file descriptor");
        return -1;
    }
    if (self->flows == NULL) {
        self->flows = PyMem_Calloc(MAX_FLOWS, sizeof(flow_t));
        self->in = PyMem_Malloc(sizeof(*self->in) * BATCH);
        self->out = PyMem_Malloc(sizeof(*self->out) * BATCH);
        if (self->flows == NULL || self->in == NULL || self->out == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    self->fd = fd;
    self->next_id = 1;
    return 0;
}

static void PortLoop_dealloc(PortLoopObject *self) {
    if (self->flows != NULL) {
        for (int i = 0; i < MAX_FLOWS; i++)
            if (self->flows[i].used)
                flow_clear(&self->flows[i]);
        PyMem_Free(self->flows);
    }
    PyMem_Free(self->in);
    PyMem_Free(self->out);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *PortLoop_add_flow(PortLoopObject *self, PyObject *args) {
    PyObject *host, *rx;
    int port;
    if (!PyArg_ParseTuple(args, "UiO", &host, &port, &rx))
        return NULL;
    if (rx != Py_None && !PyObject_TypeCheck(rx, &SrtpType)) {
        PyErr_SetString(PyExc_TypeError, "rx must be an Srtp session or None (plain RTP)");
        return NULL;
    }
    endpoint_t ep;
    if (endpoint_from(host, port, &ep) < 0)
        return NULL;
    if (flow_by_addr(self, &ep.addr) != NULL) {
        PyErr_SetString(PyExc_ValueError, "a flow from that address exists");
        return NULL;
    }
    for (int i = 0; i < MAX_FLOWS; i++) {
        flow_t *f = &self->flows[i];
        if (!f->used) {
            f->used = 1;
            f->id = self->next_id++;
            f->from = ep;
            if (rx != Py_None) {
                Py_INCREF(rx);
                f->rx = rx;
            } else {
                f->rx = NULL;
            }
            f->routes = NULL;
            self->nflows++;
            return PyLong_FromLong(f->id);
        }
    }
    PyErr_SetString(PyExc_OverflowError, "too many flows on this port");
    return NULL;
}

static PyObject *PortLoop_remove_flow(PortLoopObject *self, PyObject *arg) {
    long id = PyLong_AsLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    flow_t *f = flow_by_id(self, id);
    if (f == NULL)
        return NULL;
    flow_clear(f);
    self->nflows--;
    Py_RETURN_NONE;
}

/* A new route for payload type `pt` on flow `id` (not linked yet: *flow is where it goes),
   metered by `meter`, sending from the loop's socket; NULL with an exception if the flow
   is unknown or already routes that type. */
static route_t *route_alloc(PortLoopObject *self, long id, int pt, PyObject *meter,
                            flow_t **flow) {
    flow_t *f = flow_by_id(self, id);
    if (f == NULL)
        return NULL;
    for (route_t *r = f->routes; r != NULL; r = r->next)
        if (r->payload_type == pt) {
            PyErr_SetString(PyExc_ValueError, "that payload type is routed already");
            return NULL;
        }
    route_t *r = PyMem_Calloc(1, sizeof *r);
    if (r == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    r->payload_type = pt;
    r->fd = self->fd;
    for (int i = 0; i < NACK_SLOTS; i++)
        r->cache_seq[i] = -1;
    Py_INCREF(meter);
    r->meter = meter;
    *flow = f;
    return r;
}

static PyObject *PortLoop_add_route(PortLoopObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"flow", "payload_type", "meter", "rewriter", "out_payload_type",
                             "tx", "host", "port", "abs_send_time_id", "voice", "sound_check",
                             "fd", NULL};
    long id;
    int pt, out_pt, port, ext_id = -1, voice = 0, sound_check = 0, fd = -1;
    PyObject *meter, *rewriter, *tx, *host;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "liO!O!iOUi|$ippi", kwlist, &id, &pt,
                                     &MeterType, &meter, &RewriterType, &rewriter, &out_pt,
                                     &tx, &host, &port, &ext_id, &voice, &sound_check, &fd))
        return NULL;
    if (pt < 0 || pt > 127 || out_pt < 0 || out_pt > 127 || ext_id == 0 || ext_id > 14) {
        PyErr_SetString(PyExc_ValueError, "payload types 0..127, abs_send_time_id 1..14");
        return NULL;
    }
    if (tx != Py_None && (!PyObject_TypeCheck(tx, &SrtpType) ||
                          ((SrtpObject *)tx)->session == NULL)) {
        PyErr_SetString(PyExc_ValueError, "tx must be an initialised Srtp session or None");
        return NULL;
    }
    if (fd < -1) {
        PyErr_SetString(PyExc_ValueError, "fd must be a socket's file descriptor");
        return NULL;
    }
    flow_t *f;
    route_t *r = route_alloc(self, id, pt, meter, &f);
    if (r == NULL)
        return NULL;
    if (endpoint_from(host, port, &r->dest) < 0) {
        route_free(r);
        return NULL;
    }
    r->out_payload_type = out_pt;
    r->ext_id = ext_id;
    r->voice = voice;
    r->sound_check = sound_check;
    if (fd >= 0)
        r->fd = fd;
    r->spurts.max_step = ((MeterObject *)meter)->m.clock_rate * 120 / 1000;
    r->await_keyframe = voice ? 0 : 1;  /* a receiver can use deltas only after a keyframe */
    Py_INCREF(rewriter); r->rewriter = rewriter;
    if (tx != Py_None) {
        Py_INCREF(tx);
        r->tx = tx;
    }
    r->next = f->routes;
    f->routes = r;
    Py_RETURN_NONE;
}

/* A receiver's end of a stream: the flow's packets of that type are unprotected and
   metered, then dropped (the load generator's callers count what they receive this way). */
static PyObject *PortLoop_add_sink(PortLoopObject *self, PyObject *args) {
    long id;
    int pt;
    PyObject *meter;
    if (!PyArg_ParseTuple(args, "liO!", &id, &pt, &MeterType, &meter))
        return NULL;
    if (pt < 0 || pt > 127) {
        PyErr_SetString(PyExc_ValueError, "payload type 0..127");
        return NULL;
    }
    flow_t *f;
    route_t *r = route_alloc(self, id, pt, meter, &f);
    if (r == NULL)
        return NULL;
    r->sink = 1;
    r->next = f->routes;
    f->routes = r;
    Py_RETURN_NONE;
}

static route_t *route_of(PortLoopObject *self, long id, int pt) {
    flow_t *f = flow_by_id(self, id);
    if (f == NULL)
        return NULL;
    for (route_t *r = f->routes; r != NULL; r = r->next)
        if (r->payload_type == pt)
            return r;
    PyErr_Format(PyExc_KeyError, "flow %ld routes no payload type %d", id, pt);
    return NULL;
}

static PyObject *PortLoop_remove_route(PortLoopObject *self, PyObject *args) {
    long id;
    int pt;
    if (!PyArg_ParseTuple(args, "li", &id, &pt))
        return NULL;
    flow_t *f = flow_by_id(self, id);
    if (f == NULL)
        return NULL;
    for (route_t **at = &f->routes; *at != NULL; at = &(*at)->next) {
        if ((*at)->payload_type == pt) {
            route_t *gone = *at;
            *at = gone->next;
            route_free(gone);
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_KeyError, "flow %ld routes no payload type %d", id, pt);
    return NULL;
}

/* The browser of a flow moved (a valid check from a new address, ICE-lite): its packets
   come from there now. */
static PyObject *PortLoop_move_flow(PortLoopObject *self, PyObject *args) {
    long id;
    PyObject *host;
    int port;
    if (!PyArg_ParseTuple(args, "lUi", &id, &host, &port))
        return NULL;
    flow_t *f = flow_by_id(self, id);
    if (f == NULL)
        return NULL;
    endpoint_t ep;
    if (endpoint_from(host, port, &ep) < 0)
        return NULL;
    flow_t *other = flow_by_addr(self, &ep.addr);
    if (other != NULL && other != f) {
        PyErr_SetString(PyExc_ValueError, "another flow has that address");
        return NULL;
    }
    f->from = ep;
    Py_RETURN_NONE;
}

/* The receiving browser moved: a route's packets go to its new address. */
static PyObject *PortLoop_set_route_dest(PortLoopObject *self, PyObject *args) {
    long id;
    int pt, port;
    PyObject *host;
    if (!PyArg_ParseTuple(args, "liUi", &id, &pt, &host, &port))
        return NULL;
    route_t *r = route_of(self, id, pt);
    if (r == NULL)
        return NULL;
    endpoint_t ep;
    if (endpoint_from(host, port, &ep) < 0)
        return NULL;
    r->dest = ep;
    Py_RETURN_NONE;
}

static PyObject *PortLoop_set_paused(PortLoopObject *self, PyObject *args) {
    long id;
    int pt, paused;
    if (!PyArg_ParseTuple(args, "lii", &id, &pt, &paused))
        return NULL;
    if (paused < PAUSE_NONE || paused > PAUSE_STAMP) {
        PyErr_SetString(PyExc_ValueError, "paused: 0 (relay), 1 (drop), 2 (stamp only)");
        return NULL;
    }
    route_t *r = route_of(self, id, pt);
    if (r == NULL)
        return NULL;
    if (r->paused && !paused && !r->voice)
        r->await_keyframe = 1;  /* resumed: forward again from a fresh keyframe */
    r->paused = paused;
    Py_RETURN_NONE;
}

/* retransmit(flow, payload_type, seqs): resend the cached packets the receiver reported
   lost (the same protected bytes: SRTP is deterministic for one index); how many. */
static PyObject *PortLoop_retransmit(PortLoopObject *self, PyObject *args) {
    long id;
    int pt;
    PyObject *seqs;
    if (!PyArg_ParseTuple(args, "liO", &id, &pt, &seqs))
        return NULL;
    route_t *r = route_of(self, id, pt);
    if (r == NULL)
        return NULL;
    PyObject *fast = PySequence_Fast(seqs, "seqs must be a sequence of sequence numbers");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > NACK_SLOTS)
        n = NACK_SLOTS;  /* a NACK cannot ask for more than the cache holds */
    long sent = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        long seq = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (seq == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return NULL;
        }
        if (seq < 0 || seq > 0xFFFF)
            continue;
        int slot = (int)(seq % NACK_SLOTS);
        if (r->cache_seq[slot] != seq)
            continue;  /* too old (overwritten) or never sent */
        ssize_t done = sendto(r->fd, r->cache[slot], r->cache_len[slot], MSG_DONTWAIT,
                              (struct sockaddr *)&r->dest.addr, r->dest.addr_len);
        if (done < 0) {
            self->send_errors += 1;
            continue;
        }
        sent += 1;
    }
    Py_DECREF(fast);
    r->retransmitted += (uint64_t)sent;
    return PyLong_FromLong(sent);
}

static PyObject *PortLoop_route_stats(PortLoopObject *self, PyObject *args) {
    long id;
    int pt;
    if (!PyArg_ParseTuple(args, "li", &id, &pt))
        return NULL;
    route_t *r = route_of(self, id, pt);
    if (r == NULL)
        return NULL;
    return Py_BuildValue("{sKsKsKsisisd}", "relayed", (unsigned long long)r->relayed,
                         "held", (unsigned long long)r->held,
                         "retransmitted", (unsigned long long)r->retransmitted,
                         "paused", r->paused, "await_keyframe", r->await_keyframe,
                         "last_sound", r->last_sound);
}

/* Queue out[*nout] (out_len bytes) for the route's destination, from the route's socket. */
static void queue_out(PortLoopObject *self, route_t *r, int out_len, int *nout) {
    self->out_iov[*nout].iov_base = self->out[*nout];
    self->out_iov[*nout].iov_len = (size_t)out_len;
    struct msghdr *h = &self->out_msgs[*nout].msg_hdr;
    memset(h, 0, sizeof *h);
    h->msg_name = &r->dest.addr;
    h->msg_namelen = r->dest.addr_len;
    h->msg_iov = &self->out_iov[*nout];
    h->msg_iovlen = 1;
    self->out_fd[*nout] = r->fd;
    *nout += 1;
    r->relayed += 1;
}

/* A voice packet (VoiceBridge.from_browser / from_phone for PCMU, metered already): the
   sound check, the talkspurt marker of our own, the hold's timeline, then the rewrite and
   (towards a browser) the SRTP protect. Always consumed. */
static int relay_voice(PortLoopObject *self, route_t *r, unsigned char *buf,
                       Py_ssize_t start, Py_ssize_t end, double now, int *nout) {
    uint16_t seq = (uint16_t)((buf[2] << 8) | buf[3]);
    uint32_t ts = ((uint32_t)buf[4] << 24) | ((uint32_t)buf[5] << 16) |
                  ((uint32_t)buf[6] << 8) | buf[7];
    if (r->sound_check && seq % 10 == 0 && pcmu_has_sound(buf + start, end - start))
        r->last_sound = now;
    if (r->paused == PAUSE_DROP) {  /* a key press is on the wire in this stream's place */
        r->held += 1;
        return 1;
    }
    uint32_t silence = spurts_starts(&r->spurts, seq, ts);
    RewriterObject *rw = (RewriterObject *)r->rewriter;
    if (r->paused == PAUSE_STAMP) {  /* on hold: no sequence number used, the clock moves */
        uint32_t source = ((uint32_t)buf[8] << 24) | ((uint32_t)buf[9] << 16) |
                          ((uint32_t)buf[10] << 8) | buf[11];
        rewriter_stamp_source(rw, (int64_t)source, ts, now);
        r->held += 1;
        return 1;
    }
    if (RTP_HEADER + (end - start) > MAX_DATAGRAM)
        return 1;
    unsigned char *o = self->out[*nout];
    /* Our marker, not the sender's (aiortc sets it on every packet): the talkspurt's. */
    unsigned char first = buf[1];
    buf[1] = (unsigned char)((silence ? 0x80 : 0) | (first & 0x7F));
    int out_len = (int)rewrite_into(rw, buf, start, end, r->out_payload_type, -1, now, 0.0, o);
    if (r->tx != NULL &&
        srtp_protect(((SrtpObject *)r->tx)->session, o, &out_len) != srtp_err_status_ok)
        return 1;
    queue_out(self, r, out_len, nout);
    return 1;
}

/* One datagram from a known flow; 1 if it was relayed (or consumed: a forged packet). */
static int relay_one(PortLoopObject *self, flow_t *f, unsigned char *buf, int len,
                     double now, double wall, int *nout) {
    if (len < RTP_HEADER || buf[0] < 128 || buf[0] > 191 || (buf[1] >= 192 && buf[1] <= 223))
        return 0;  /* not SRTP RTP (RFC 7983, RFC 5761): up to Python */
    int pt = buf[1] & 0x7F;
    route_t *r = f->routes;
    while (r != NULL && r->payload_type != pt)
        r = r->next;
    if (r == NULL)
        return 0;  /* Python's payload type (audio to the phone, telephone-events...) */
    if (f->rx != NULL &&
        srtp_unprotect(((SrtpObject *)f->rx)->session, buf, &len) != srtp_err_status_ok) {
        f->unprotect_failed += 1;  /* anyone can send these, or a duplicate: count only */
        return 1;
    }
    self->routed_in += 1;
    Py_ssize_t start, end;
    if (rtp_payload_bounds(buf, len, &start, &end) < 0)
        return 1;
    int keyframe = meter_packet(&((MeterObject *)r->meter)->m, buf, len, start, now);
    if (r->sink)
        return 1;
    if (r->voice)
        return relay_voice(self, r, buf, start, end, now, nout);
    if (r->paused) {
        r->held += 1;
        return 1;
    }
    if (r->await_keyframe) {
        if (!keyframe) {
            r->held += 1;
            return 1;
        }
        r->await_keyframe = 0;
    }
    RewriterObject *rw = (RewriterObject *)r->rewriter;
    if (RTP_HEADER + (r->ext_id > 0 ? 8 : 0) + (end - start) > MAX_DATAGRAM)
        return 1;
    unsigned char *o = self->out[*nout];
    int out_len = (int)rewrite_into(rw, buf, start, end, r->out_payload_type, r->ext_id,
                                    now, wall, o);
    if (r->tx != NULL &&
        srtp_protect(((SrtpObject *)r->tx)->session, o, &out_len) != srtp_err_status_ok)
        return 1;
    int slot = rw->seq % NACK_SLOTS;
    if (r->cache_cap[slot] < out_len) {
        unsigned char *grown = PyMem_Realloc(r->cache[slot], (size_t)out_len);
        if (grown != NULL) {
            r->cache[slot] = grown;
            r->cache_cap[slot] = (uint16_t)out_len;
        }
    }
    if (r->cache_cap[slot] >= out_len) {
        memcpy(r->cache[slot], o, (size_t)out_len);
        r->cache_len[slot] = (uint16_t)out_len;
        r->cache_seq[slot] = rw->seq;
    } else {
        r->cache_seq[slot] = -1;  /* no memory: that packet cannot be repaired */
    }
    queue_out(self, r, out_len, nout);
    return 1;
}

static void flush_out(PortLoopObject *self, int nout) {
    int sent = 0;
    while (sent < nout) {
        /* One sendmmsg per run of datagrams from the same socket. */
        int fd = self->out_fd[sent], run = sent + 1;
        while (run < nout && self->out_fd[run] == fd)
            run++;
        int n = sendmmsg(fd, &self->out_msgs[sent], (unsigned int)(run - sent),
                         MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            /* A full socket buffer or an ICMP error for an earlier datagram: a real-time
               packet is dropped, not queued (counted). */
            self->send_errors += 1;
            sent += 1;
            continue;
        }
        /* The browsers' packets count as this socket's; the phone's as "elsewhere". */
        if (fd == self->fd)
            self->relayed += (uint64_t)n;
        else
            self->relayed_elsewhere += (uint64_t)n;
        sent += n;
    }
}

static PyObject *PortLoop_drain(PortLoopObject *self, PyObject *args) {
    double now, wall;
    if (!PyArg_ParseTuple(args, "dd", &now, &wall))
        return NULL;
    PyObject *up = PyList_New(0);
    if (up == NULL)
        return NULL;
    self->drains += 1;
    int total = 0;
    while (total < MAX_DRAIN) {
        for (int i = 0; i < BATCH; i++) {
            self->in_iov[i].iov_base = self->in[i];
            self->in_iov[i].iov_len = BUF_SIZE;
            struct msghdr *h = &self->in_msgs[i].msg_hdr;
            memset(h, 0, sizeof *h);
            h->msg_name = &self->in_addr[i];
            h->msg_namelen = sizeof self->in_addr[i];
            h->msg_iov = &self->in_iov[i];
            h->msg_iovlen = 1;
        }
        int n = recvmmsg(self->fd, self->in_msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;  /* EAGAIN: drained; another error is the socket's, Python will see it */
        }
        if (n == 0)
            break;
        int nout = 0;
        for (int i = 0; i < n; i++) {
            unsigned char *buf = self->in[i];
            int len = (int)self->in_msgs[i].msg_len;
            self->datagrams += 1;
            if ((self->in_msgs[i].msg_hdr.msg_flags & MSG_TRUNC) || len > MAX_DATAGRAM ||
                len == 0) {
                self->oversized += 1;
                continue;
            }
            flow_t *f = self->nflows ? flow_by_addr(self, &self->in_addr[i]) : NULL;
            if (f != NULL && f->routes != NULL && relay_one(self, f, buf, len, now, wall, &nout))
                continue;
            PyObject *addr = endpoint_tuple(&self->in_addr[i]);
            PyObject *data = PyBytes_FromStringAndSize((const char *)buf, len);
            PyObject *item = (addr && data) ? PyTuple_Pack(2, data, addr) : NULL;
            Py_XDECREF(addr);
            Py_XDECREF(data);
            if (item == NULL || PyList_Append(up, item) < 0) {
                Py_XDECREF(item);
                flush_out(self, nout);
                Py_DECREF(up);
                return NULL;
            }
            Py_DECREF(item);
            self->handed_up += 1;
        }
        flush_out(self, nout);
        total += n;
        if (n < BATCH)
            break;
    }
    return up;
}

static PyObject *PortLoop_stats(PortLoopObject *self, PyObject *unused) {
    uint64_t unprotect_failed = 0;
    for (int i = 0; i < MAX_FLOWS; i++)
        if (self->flows[i].used)
            unprotect_failed += self->flows[i].unprotect_failed;
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsi}", "datagrams", (unsigned long long)self->datagrams,
                         "routed_in", (unsigned long long)self->routed_in,
                         "relayed", (unsigned long long)self->relayed,
                         "relayed_elsewhere", (unsigned long long)self->relayed_elsewhere,
                         "handed_up", (unsigned long long)self->handed_up,
                         "oversized", (unsigned long long)self->oversized,
                         "send_errors", (unsigned long long)self->send_errors,
                         "drains", (unsigned long long)self->drains,
                         "unprotect_failed", (unsigned long long)unprotect_failed,
                         "flows", self->nflows);
}

static PyMethodDef PortLoop_methods[] = {
    {"add_flow", (PyCFunction)PortLoop_add_flow, METH_VARARGS,
     "add_flow(host, port, rx): a call's browser address and its inbound SRTP keys; the "
     "flow's id."},
    {"remove_flow", (PyCFunction)PortLoop_remove_flow, METH_O, "forget a flow and its routes"},
    {"add_route", (PyCFunction)(void (*)(void))PortLoop_add_route,
     METH_VARARGS | METH_KEYWORDS,
     "add_route(flow, payload_type, meter, rewriter, out_payload_type, tx, host, port, "
     "abs_send_time_id=-1): relay that payload type to host:port (from a keyframe)."},
    {"add_sink", (PyCFunction)PortLoop_add_sink, METH_VARARGS,
     "add_sink(flow, payload_type, meter): meter that payload type's packets, relay none."},
    {"remove_route", (PyCFunction)PortLoop_remove_route, METH_VARARGS,
     "remove_route(flow, payload_type): stop relaying it (its packets come up again)."},
    {"move_flow", (PyCFunction)PortLoop_move_flow, METH_VARARGS,
     "move_flow(flow, host, port): the browser's packets come from there now."},
    {"set_route_dest", (PyCFunction)PortLoop_set_route_dest, METH_VARARGS,
     "set_route_dest(flow, payload_type, host, port): the receiving browser moved."},
    {"set_paused", (PyCFunction)PortLoop_set_paused, METH_VARARGS,
     "set_paused(flow, payload_type, paused): hold or resume a route (resumed: from the "
     "next keyframe)."},
    {"route_stats", (PyCFunction)PortLoop_route_stats, METH_VARARGS, "one route's counters"},
    {"retransmit", (PyCFunction)PortLoop_retransmit, METH_VARARGS,
     "retransmit(flow, payload_type, seqs): resend cached packets a NACK named; how many."},
    {"drain", (PyCFunction)PortLoop_drain, METH_VARARGS,
     "drain(now, wall): read what the socket holds, relay what is routed; the rest as a "
     "list of (datagram, address)."},
    {"stats", (PyCFunction)PortLoop_stats, METH_NOARGS, "the loop's counters"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PortLoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "appliance.native._packetloop.PortLoop",
    .tp_doc = "PortLoop(fd): the native receive-relay-send loop of one UDP media socket.",
    .tp_basicsize = sizeof(PortLoopObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)PortLoop_init,
    .tp_dealloc = (destructor)PortLoop_dealloc,
    .tp_methods = PortLoop_methods,
};

static PyTypeObject PlayoutType;

/* -- Playout: pre-encoded RTP, paced ------------------------------------------------- */

/* bench/pacer.py's TxAudio and TxVideo in C: a loop of pre-encoded frames (each one or
   more payloads) sent at their due times with our SSRC, sequence and timestamp, protected
   and batched. It is how the load generator's callers send without costing more than the
   appliance they load (issue 13); the Python streams stay the reference it is tested
   against, byte for byte. */

#define PLAY_MAX_BEHIND 0.2      /* further behind, skip what was missed (no burst) */
#define PLAY_KEYFRAME_JUMP 0.5   /* at most one PLI-driven jump per half second */

typedef struct {
    PyObject_HEAD
    PyObject *tx;                /* SrtpObject, or NULL: plain RTP */
    int fd;
    endpoint_t dest;
    uint32_t ssrc;
    int payload_type;
    int video;                   /* marker on a frame's last packet; audio: the first ever */
    PyObject *frames;            /* tuple of tuples of bytes */
    Py_ssize_t nframes;
    Py_ssize_t *keyframes;       /* sorted frame indices */
    Py_ssize_t nkeyframes;
    Py_ssize_t index;
    double due, period, last_jump;
    uint32_t ts, ts_step;
    uint16_t seq;
    int started;
    int stopped;
    unsigned long long sent, skipped, keyframe_jumps, send_errors;
} PlayoutObject;

static int Playout_init(PlayoutObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tx", "fd", "host", "port", "ssrc", "payload_type", "frames",
                             "keyframes", "period", "ts_step", "start", "seq", "ts", "index",
                             "video", NULL};
    PyObject *tx, *host, *frames, *keys;
    int fd, port, pt, video = 0;
    unsigned long ssrc, ts_step, seq, ts;
    double period, start;
    Py_ssize_t index = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OiUikiOOdkdkk|np", kwlist, &tx, &fd,
                                     &host, &port, &ssrc, &pt, &frames, &keys, &period,
                                     &ts_step, &start, &seq, &ts, &index, &video))
        return -1;
    if (tx != Py_None && (!PyObject_TypeCheck(tx, &SrtpType) ||
                          ((SrtpObject *)tx)->session == NULL ||
                          !((SrtpObject *)tx)->outbound)) {
        PyErr_SetString(PyExc_ValueError, "tx must be an outbound Srtp session or None");
        return -1;
    }
    if (fd < 0 || pt < 0 || pt > 127 || ssrc > 0xFFFFFFFFul || seq > 0xFFFF ||
        ts > 0xFFFFFFFFul || ts_step > 0xFFFFFFFFul || !(period > 0.0)) {
        PyErr_SetString(PyExc_ValueError, "fd, payload type, ssrc, seq, ts or period out of range");
        return -1;
    }
    if (!PyTuple_Check(frames) || PyTuple_GET_SIZE(frames) < 1) {
        PyErr_SetString(PyExc_TypeError, "frames must be a non-empty tuple of tuples of bytes");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(frames);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *frame = PyTuple_GET_ITEM(frames, i);
        if (!PyTuple_Check(frame) || PyTuple_GET_SIZE(frame) < 1) {
            PyErr_SetString(PyExc_TypeError, "each frame must be a non-empty tuple of bytes");
            return -1;
        }
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(frame); j++) {
            PyObject *pl = PyTuple_GET_ITEM(frame, j);
            if (!PyBytes_Check(pl) || RTP_HEADER + PyBytes_GET_SIZE(pl) > MAX_DATAGRAM) {
                PyErr_SetString(PyExc_ValueError, "payloads must be bytes that fit a datagram");
                return -1;
            }
        }
    }
    if (index < 0 || index >= n) {
        PyErr_SetString(PyExc_ValueError, "index must name a frame");
        return -1;
    }
    PyObject *fast = PySequence_Fast(keys, "keyframes must be a sequence of frame indices");
    if (fast == NULL)
        return -1;
    Py_ssize_t nk = PySequence_Fast_GET_SIZE(fast);
    Py_ssize_t *k = PyMem_Calloc(nk ? (size_t)nk : 1, sizeof *k);
    if (k == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < nk; i++) {
        k[i] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(fast, i));
        if ((k[i] == -1 && PyErr_Occurred()) || k[i] < 0 || k[i] >= n ||
            (i > 0 && k[i] <= k[i - 1])) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "keyframes must be sorted frame indices");
            Py_DECREF(fast);
            PyMem_Free(k);
            return -1;
        }
    }
    Py_DECREF(fast);
    endpoint_t ep;
    if (endpoint_from(host, port, &ep) < 0) {
        PyMem_Free(k);
        return -1;
    }
    Py_CLEAR(self->tx);
    Py_CLEAR(self->frames);
    PyMem_Free(self->keyframes);
    if (tx != Py_None) {
        Py_INCREF(tx);
        self->tx = tx;
    }
    Py_INCREF(frames);
    self->frames = frames;
    self->nframes = n;
    self->keyframes = k;
    self->nkeyframes = nk;
    self->fd = fd;
    self->dest = ep;
    self->ssrc = (uint32_t)ssrc;
    self->payload_type = pt;
    self->video = video;
    self->index = index;
    self->period = period;
    self->due = start;
    self->last_jump = -PLAY_KEYFRAME_JUMP;
    self->ts = (uint32_t)ts;
    self->ts_step = (uint32_t)ts_step;
    self->seq = (uint16_t)seq;
    self->started = 0;
    self->stopped = 0;
    self->sent = self->skipped = self->keyframe_jumps = self->send_errors = 0;
    return 0;
}

static void Playout_dealloc(PlayoutObject *self) {
    Py_XDECREF(self->tx);
    Py_XDECREF(self->frames);
    PyMem_Free(self->keyframes);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The batch every Playout fills and sends (one thread: the GIL is held throughout). */
static unsigned char play_out[BATCH][OUT_SIZE];
static struct mmsghdr play_msgs[BATCH];
static struct iovec play_iov[BATCH];

static void play_flush(PlayoutObject *self, int n) {
    int done = 0;
    while (done < n) {
        int k = sendmmsg(self->fd, &play_msgs[done], (unsigned int)(n - done), MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            self->send_errors += 1;  /* a full buffer: a real-time packet is dropped */
            done += 1;
            continue;
        }
        self->sent += (unsigned long long)k;
        done += k;
    }
}

/* TxStream._packet into the batch (sequence first, as the Python stream does). */
static void play_packet(PlayoutObject *self, int marker, PyObject *payload, int *n) {
    self->seq = (uint16_t)(self->seq + 1);
    unsigned char *o = play_out[*n];
    Py_ssize_t len = PyBytes_GET_SIZE(payload);
    o[0] = 0x80;
    o[1] = (unsigned char)((marker ? 0x80 : 0) | self->payload_type);
    o[2] = (unsigned char)(self->seq >> 8);
    o[3] = (unsigned char)self->seq;
    o[4] = (unsigned char)(self->ts >> 24);
    o[5] = (unsigned char)(self->ts >> 16);
    o[6] = (unsigned char)(self->ts >> 8);
    o[7] = (unsigned char)self->ts;
    o[8] = (unsigned char)(self->ssrc >> 24);
    o[9] = (unsigned char)(self->ssrc >> 16);
    o[10] = (unsigned char)(self->ssrc >> 8);
    o[11] = (unsigned char)self->ssrc;
    memcpy(o + RTP_HEADER, PyBytes_AS_STRING(payload), (size_t)len);
    int out_len = (int)(RTP_HEADER + len);
    if (self->tx != NULL &&
        srtp_protect(((SrtpObject *)self->tx)->session, o, &out_len) != srtp_err_status_ok) {
        self->send_errors += 1;
        return;
    }
    play_iov[*n].iov_base = o;
    play_iov[*n].iov_len = (size_t)out_len;
    struct msghdr *h = &play_msgs[*n].msg_hdr;
    memset(h, 0, sizeof *h);
    h->msg_name = &self->dest.addr;
    h->msg_namelen = self->dest.addr_len;
    h->msg_iov = &play_iov[*n];
    h->msg_iovlen = 1;
    *n += 1;
    if (*n == BATCH) {
        play_flush(self, *n);
        *n = 0;
    }
}

/* TxStream.emit: everything due by `now`; how many packets were queued. */
static long play_emit(PlayoutObject *self, double now) {
    if (self->stopped)
        return 0;
    if (now - self->due > PLAY_MAX_BEHIND) {
        long long missed = (long long)((now - self->due) / self->period);
        self->skipped += (unsigned long long)missed;
        self->due += (double)missed * self->period;
        self->ts = (uint32_t)(self->ts + (uint32_t)((unsigned long long)missed * self->ts_step));
        self->index = (Py_ssize_t)((self->index + missed) % self->nframes);
    }
    int n = 0;
    long queued = 0;
    while (self->due <= now) {
        PyObject *frame = PyTuple_GET_ITEM(self->frames, self->index);
        Py_ssize_t count = PyTuple_GET_SIZE(frame);
        for (Py_ssize_t i = 0; i < count; i++) {
            int marker = self->video ? i == count - 1 : !self->started;
            play_packet(self, marker, PyTuple_GET_ITEM(frame, i), &n);
            self->started = 1;
            queued++;
        }
        self->index = (self->index + 1) % self->nframes;
        self->due += self->period;
        self->ts = self->ts + self->ts_step;
    }
    if (n)
        play_flush(self, n);
    return queued;
}

static PyObject *Playout_emit(PlayoutObject *self, PyObject *arg) {
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(play_emit(self, now));
}

static int is_keyframe(PlayoutObject *self, Py_ssize_t index) {
    for (Py_ssize_t i = 0; i < self->nkeyframes; i++)
        if (self->keyframes[i] == index)
            return 1;
    return 0;
}

/* TxVideo.keyframe_request: the next frame sent is the loop's next keyframe. */
static PyObject *Playout_keyframe_request(PlayoutObject *self, PyObject *arg) {
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    if (self->nkeyframes == 0 || is_keyframe(self, self->index) ||
        now - self->last_jump < PLAY_KEYFRAME_JUMP)
        Py_RETURN_NONE;
    self->last_jump = now;
    self->keyframe_jumps += 1;
    Py_ssize_t next = self->keyframes[0];
    for (Py_ssize_t i = 0; i < self->nkeyframes; i++)
        if (self->keyframes[i] > self->index) {
            next = self->keyframes[i];
            break;
        }
    self->index = next;
    Py_RETURN_NONE;
}

static PyObject *Playout_stop(PlayoutObject *self, PyObject *unused) {
    self->stopped = 1;  /* the socket may close next: never send from it again */
    Py_RETURN_NONE;
}

/* emit_all(playouts, now): every Playout of the list, one call from the pacer's tick. */
static PyObject *play_emit_all(PyObject *module, PyObject *args) {
    PyObject *list;
    double now;
    if (!PyArg_ParseTuple(args, "O!d", &PyList_Type, &list, &now))
        return NULL;
    long total = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        if (!PyObject_TypeCheck(item, &PlayoutType)) {
            PyErr_SetString(PyExc_TypeError, "emit_all takes a list of Playout");
            return NULL;
        }
        total += play_emit((PlayoutObject *)item, now);
    }
    return PyLong_FromLong(total);
}

static PyObject *Playout_get_ssrc(PlayoutObject *self, void *unused) {
    return PyLong_FromUnsignedLong(self->ssrc);
}

static PyObject *Playout_get_seq(PlayoutObject *self, void *unused) {
    return PyLong_FromLong(self->seq);
}

static PyObject *Playout_get_ts(PlayoutObject *self, void *unused) {
    return PyLong_FromUnsignedLong(self->ts);
}

static PyObject *Playout_get_due(PlayoutObject *self, void *unused) {
    return PyFloat_FromDouble(self->due);
}

static PyGetSetDef Playout_getset[] = {
    {"ssrc", (getter)Playout_get_ssrc, NULL, "our SSRC", NULL},
    {"seq", (getter)Playout_get_seq, NULL, "the last sequence number sent", NULL},
    {"ts", (getter)Playout_get_ts, NULL, "the next frame's timestamp", NULL},
    {"due", (getter)Playout_get_due, NULL, "when the next frame is due (monotonic)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Playout_members[] = {
    {"sent", T_ULONGLONG, offsetof(PlayoutObject, sent), READONLY, "packets sent"},
    {"skipped", T_ULONGLONG, offsetof(PlayoutObject, skipped), READONLY,
     "periods dropped because the generator fell behind"},
    {"keyframe_jumps", T_ULONGLONG, offsetof(PlayoutObject, keyframe_jumps), READONLY,
     "keyframe requests answered by jumping to the next keyframe"},
    {"send_errors", T_ULONGLONG, offsetof(PlayoutObject, send_errors), READONLY,
     "packets the socket refused or SRTP could not protect"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Playout_methods[] = {
    {"emit", (PyCFunction)Playout_emit, METH_O, "emit(now): send what is due; how many."},
    {"keyframe_request", (PyCFunction)Playout_keyframe_request, METH_O,
     "keyframe_request(now): a PLI: jump to the next keyframe (at most twice a second)."},
    {"stop", (PyCFunction)Playout_stop, METH_NOARGS, "send nothing more"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PlayoutType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "appliance.native._packetloop.Playout",
    .tp_doc = "Playout(tx, fd, host, port, ssrc, payload_type, frames, keyframes, period, "
              "ts_step, start, seq, ts, index=0, video=False): pre-encoded RTP, paced.",
    .tp_basicsize = sizeof(PlayoutObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Playout_init,
    .tp_dealloc = (destructor)Playout_dealloc,
    .tp_methods = Playout_methods,
    .tp_members = Playout_members,
    .tp_getset = Playout_getset,
};

/* -- the module ---------------------------------------------------------------------- */

static PyMethodDef module_functions[] = {
    {"emit_all", play_emit_all, METH_VARARGS,
     "emit_all(playouts, now): Playout.emit(now) for each of a list; packets queued."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef packetloop_module = {
    PyModuleDef_HEAD_INIT, "appliance.native._packetloop",
    "The worker's native packet path: SRTP (libsrtp2), the relay's rewrite.", -1,
    module_functions, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__packetloop(void) {
    srtp_err_status_t status = srtp_init();
    if (status != srtp_err_status_ok) {
        PyErr_Format(PyExc_ImportError, "srtp_init failed: %s", srtp_status_text(status));
        return NULL;
    }
    if (PyType_Ready(&SrtpType) < 0 || PyType_Ready(&RewriterType) < 0 ||
        PyType_Ready(&MeterType) < 0 || PyType_Ready(&PortLoopType) < 0 ||
        PyType_Ready(&PlayoutType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&packetloop_module);
    if (m == NULL)
        return NULL;
    SrtpError = PyErr_NewException("appliance.native._packetloop.SrtpError",
                                   PyExc_ValueError, NULL);
    if (SrtpError == NULL || PyModule_AddObjectRef(m, "SrtpError", SrtpError) < 0 ||
        PyModule_AddObjectRef(m, "Srtp", (PyObject *)&SrtpType) < 0 ||
        PyModule_AddObjectRef(m, "Rewriter", (PyObject *)&RewriterType) < 0 ||
        PyModule_AddObjectRef(m, "Meter", (PyObject *)&MeterType) < 0 ||
        PyModule_AddObjectRef(m, "PortLoop", (PyObject *)&PortLoopType) < 0 ||
        PyModule_AddObjectRef(m, "Playout", (PyObject *)&PlayoutType) < 0) {
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
