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
static uint32_t rewriter_stamp(RewriterObject *self, uint32_t source, uint32_t timestamp,
                               double now) {
    if ((int64_t)source != self->source) {
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
        self->source = (int64_t)source;
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
    int marker = (p[1] & 0x80) != 0;
    uint32_t timestamp = ((uint32_t)p[4] << 24) | ((uint32_t)p[5] << 16) |
                         ((uint32_t)p[6] << 8) | p[7];
    uint32_t source = ((uint32_t)p[8] << 24) | ((uint32_t)p[9] << 16) |
                      ((uint32_t)p[10] << 8) | p[11];
    Py_ssize_t payload_len = end - start;
    Py_ssize_t ext_len = ext_id > 0 ? 8 : 0;
    PyObject *out = PyBytes_FromStringAndSize(NULL, RTP_HEADER + ext_len + payload_len);
    if (out == NULL) {
        PyBuffer_Release(&in);
        return NULL;
    }
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    uint32_t out_ts = rewriter_stamp(self, source, timestamp, now);
    if (self->mark_next) {
        marker = 1;
        self->mark_next = 0;
    }
    self->seq = (uint16_t)(self->seq + 1);
    self->packets += 1;
    self->octets += (unsigned long long)payload_len;
    o[0] = ext_len ? 0x90 : 0x80;
    o[1] = (unsigned char)((marker ? 0x80 : 0) | payload_type);
    o[2] = (unsigned char)(self->seq >> 8); o[3] = (unsigned char)self->seq;
    o[4] = (unsigned char)(out_ts >> 24); o[5] = (unsigned char)(out_ts >> 16);
    o[6] = (unsigned char)(out_ts >> 8); o[7] = (unsigned char)out_ts;
    o[8] = (unsigned char)(self->ssrc >> 24); o[9] = (unsigned char)(self->ssrc >> 16);
    o[10] = (unsigned char)(self->ssrc >> 8); o[11] = (unsigned char)self->ssrc;
    if (ext_len)
        abs_send_time_block(o + RTP_HEADER, ext_id, wall);
    memcpy(o + RTP_HEADER + ext_len, p + start, (size_t)payload_len);
    PyBuffer_Release(&in);
    return out;
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

static PyGetSetDef Rewriter_getset[] = {
    {"seq", (getter)Rewriter_get_seq, NULL, "the last sequence number sent", NULL},
    {"packets", (getter)Rewriter_get_packets, NULL, "packets sent", NULL},
    {"octets", (getter)Rewriter_get_octets, NULL, "payload octets sent", NULL},
    {"last_timestamp", (getter)Rewriter_get_last_timestamp, NULL, "our last timestamp", NULL},
    {"ssrc", (getter)Rewriter_get_ssrc, NULL, "our SSRC", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Rewriter_methods[] = {
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

/* -- the module ---------------------------------------------------------------------- */

static struct PyModuleDef packetloop_module = {
    PyModuleDef_HEAD_INIT, "appliance.native._packetloop",
    "The worker's native packet path: SRTP (libsrtp2), the relay's rewrite.", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__packetloop(void) {
    srtp_err_status_t status = srtp_init();
    if (status != srtp_err_status_ok) {
        PyErr_Format(PyExc_ImportError, "srtp_init failed: %s", srtp_status_text(status));
        return NULL;
    }
    if (PyType_Ready(&SrtpType) < 0 || PyType_Ready(&RewriterType) < 0 ||
        PyType_Ready(&MeterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&packetloop_module);
    if (m == NULL)
        return NULL;
    SrtpError = PyErr_NewException("appliance.native._packetloop.SrtpError",
                                   PyExc_ValueError, NULL);
    if (SrtpError == NULL || PyModule_AddObjectRef(m, "SrtpError", SrtpError) < 0 ||
        PyModule_AddObjectRef(m, "Srtp", (PyObject *)&SrtpType) < 0 ||
        PyModule_AddObjectRef(m, "Rewriter", (PyObject *)&RewriterType) < 0 ||
        PyModule_AddObjectRef(m, "Meter", (PyObject *)&MeterType) < 0) {
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
