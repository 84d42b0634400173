// The browser side of the call-control protocol (PROTOCOL.md): JSON over one WebSocket,
// one action per message. No dependencies and no build step: pages load it as an ES module.
//
//   const client = new ApplianceClient();            // wss://<this host>/, window.appliance
//   (each call's ICE servers come from https://<that host>/ice-servers; pass {iceServers}
//   to set them yourself)
//   client.addEventListener("state", e => ...);      // e.detail = {state, text}
//   await client.makeVideoCall({caller, callee, userdata});   // the customer (module User)
//   await client.joinRoom(roomkey, {token});         // the agent's video (module Agent)
//   client.sendDTMF("5"); client.sendPeerData("hello"); client.hangup();
//
// Every MS message becomes an event named after its action ("alert", "answer", "ice",
// "DTLSconnect", "release", "peerdata", "my_resolution", "peer_resolution",
// "record_status", "message", "DTMF"), with the message as `event.detail`. The client also
// emits "state", "localstream", "remotetrack", "peervideo" ({present}: the peer's video
// joined or left, the call going on) and "error". For tests, `window.appliance`
// is the client: `.events` lists every message received ({action, at, msg}), `.sent` every
// message sent, `.call.pc` is the RTCPeerConnection.

const LIMIT_KEY = 16; // bytes, every key
const LIMIT_VALUE = 128; // bytes, every string value except below
const LIMITS = { userdata: 256, ua_family: 64, ua_version: 64, ua_os: 64, suid: 64, module: 6, token: 64 };
const SDP_KEYS = new Set(["offer", "answer", "ice"]);
const DTMF_KEYS = "0123456789*#";
// How long to wait for our ICE candidates before sending the offer: the offer then carries
// them, and the rare late one follows as an `ice` action.
const GATHER_WAIT_MS = 2000;
// Each call's ICE servers come from the appliance (GET /ice-servers, supervisor/front.py):
// a TURN credential in them is made for one call and expires, so they are asked for per
// call. The answer is checked by the rules the appliance checks its config with
// (appliance/core/turn_credentials.py; tests/unit/test_turn_credentials.py runs both).
const ICE_SERVERS_PATH = "/ice-servers";
const ICE_SERVERS_WAIT_MS = 3000;
const MAX_ICE_ANSWER_BYTES = 16 * 1024;
const MAX_ICE_SERVERS = 8;
const MAX_ICE_URLS = 8;
const MAX_ICE_URL_CHARS = 256;
const ICE_URL = /^(stuns?|turns?):([A-Za-z0-9.-]{1,253})(?::([0-9]{1,5}))?(?:\?transport=(udp|tcp))?$/;
const ICE_FIELD = /^[\x20-\x7e]{1,256}$/; // a username or credential: printable ASCII

const encoder = new TextEncoder();
const byteLength = (s) => encoder.encode(s).length;

/** Cut a string to at most `max` UTF-8 bytes without splitting a character. */
export function clipBytes(s, max) {
  s = String(s ?? "");
  while (byteLength(s) > max) s = s.slice(0, -1);
  return s;
}

/** A random unsigned 32-bit id, never 0 (0 is easy to confuse with "not set"). */
export function randomUint() {
  const a = new Uint32Array(1);
  do crypto.getRandomValues(a); while (a[0] === 0);
  return a[0];
}

/** ua_family, ua_version (major), ua_os from a User-Agent string, each <= 64 bytes. */
export function describeUserAgent(ua = navigator.userAgent) {
  const browsers = [
    ["Edge", /Edg(?:e|A|iOS)?\/(\d+)/],
    ["Opera", /OPR\/(\d+)/],
    ["Samsung Internet", /SamsungBrowser\/(\d+)/],
    ["Chrome", /CriOS\/(\d+)/],
    ["Firefox", /FxiOS\/(\d+)/],
    ["Firefox", /Firefox\/(\d+)/],
    ["Chrome", /(?:Headless)?Chrom(?:e|ium)\/(\d+)/],
    ["Safari", /Version\/(\d+)[\d.]* (?:Mobile\/\S+ )?Safari/],
  ];
  let family = "unknown";
  let version = "";
  for (const [name, re] of browsers) {
    const m = ua.match(re);
    if (m) {
      family = name;
      version = m[1];
      break;
    }
  }
  let os = "unknown";
  let m;
  if ((m = ua.match(/Android ([\d.]+)/))) os = `Android ${m[1]}`;
  else if ((m = ua.match(/(?:iPhone|CPU) OS ([\d_]+)/))) os = `iOS ${m[1].replace(/_/g, ".")}`;
  else if ((m = ua.match(/Windows NT ([\d.]+)/)))
    os = { "10.0": "Windows 10", "6.3": "Windows 8.1", "6.2": "Windows 8", "6.1": "Windows 7" }[m[1]] || `Windows NT ${m[1]}`;
  else if ((m = ua.match(/Mac OS X ([\d_.]+)/))) os = `macOS ${m[1].replace(/_/g, ".")}`;
  else if (/CrOS/.test(ua)) os = "ChromeOS";
  else if (/Linux/.test(ua)) os = "Linux";
  return {
    ua_family: clipBytes(family, 64),
    ua_version: clipBytes(version, 64),
    ua_os: clipBytes(os, 64),
  };
}

/** Throw if a message breaks the protocol's length limits (the MS would refuse it). */
export function checkLimits(msg) {
  for (const [key, value] of Object.entries(msg)) {
    if (byteLength(key) > LIMIT_KEY) throw new RangeError(`key '${key}' is longer than ${LIMIT_KEY} bytes`);
    if (SDP_KEYS.has(key) || typeof value !== "string") continue;
    const limit = LIMITS[key] ?? LIMIT_VALUE;
    if (byteLength(value) > limit) throw new RangeError(`${key} is longer than ${limit} bytes`);
  }
}

/** A uint field from a form or query string: a number, or undefined when blank. */
export function parseUint(value, name) {
  if (value === undefined || value === null || value === "") return undefined;
  const s = String(value).trim();
  if (!/^\d{1,15}$/.test(s)) throw new RangeError(`${name} must be a number`);
  return Number(s);
}

// mDNS names (`xxxx.local`) are useless to the MS, which never resolves them; the MS then
// learns the browser's address from its connectivity checks (peer-reflexive) instead.
const isMdnsCandidate = (line) => /\s[0-9a-f-]+\.local\s/i.test(line);
const stripMdnsCandidates = (sdp) =>
  sdp.split("\r\n").filter((line) => !(line.startsWith("a=candidate:") && isMdnsCandidate(line))).join("\r\n");

/** The iceServers of an /ice-servers answer (parsed JSON), each {urls: [...], username?,
 * credential?}; throws on anything the appliance would not have sent. */
export function sanitizeIceServers(answer) {
  if (!answer || typeof answer !== "object" || Array.isArray(answer) || !Array.isArray(answer.iceServers))
    throw new TypeError("not an ICE servers answer");
  if (answer.iceServers.length > MAX_ICE_SERVERS) throw new RangeError(`more than ${MAX_ICE_SERVERS} ICE servers`);
  return answer.iceServers.map((s) => {
    if (!s || typeof s !== "object" || Array.isArray(s)) throw new TypeError("an ICE server must be an object");
    const urls = typeof s.urls === "string" ? [s.urls] : s.urls;
    if (!Array.isArray(urls) || urls.length < 1 || urls.length > MAX_ICE_URLS)
      throw new RangeError(`urls must be a URL or 1..${MAX_ICE_URLS} URLs`);
    let turn = false;
    for (const url of urls) {
      const m = typeof url === "string" && url.length <= MAX_ICE_URL_CHARS ? ICE_URL.exec(url) : null;
      if (!m) throw new RangeError("not a stun:, stuns:, turn: or turns: URL");
      const [, scheme, , port, transport] = m;
      if (port !== undefined && (Number(port) < 1 || Number(port) > 65535)) throw new RangeError("port out of range");
      if (scheme.startsWith("stun") && transport !== undefined) throw new RangeError("a STUN URL takes no transport");
      if (scheme === "turns" && transport === "udp") throw new RangeError("turns: is TLS over TCP");
      if (scheme.startsWith("turn")) turn = true;
    }
    const server = { urls: [...urls] };
    for (const key of ["username", "credential"]) {
      const value = s[key];
      if (value === undefined || value === null) continue;
      if (typeof value !== "string" || !ICE_FIELD.test(value)) throw new RangeError(`bad ${key}`);
      server[key] = value;
    }
    if (turn && (server.username === undefined || server.credential === undefined))
      throw new RangeError("a TURN server without username and credential");
    return server;
  });
}

/** The iceServers of an /ice-servers answer's text; throws on anything else. */
export function parseIceServersAnswer(text) {
  if (byteLength(text) > MAX_ICE_ANSWER_BYTES) throw new RangeError("ICE servers answer too long");
  return sanitizeIceServers(JSON.parse(text));
}

/** wss://host:port/... -> https://host:port/ice-servers: the appliance that carries the calls. */
export function iceServersUrl(wsUrl) {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === "ws:" ? "http:" : "https:";
  u.pathname = ICE_SERVERS_PATH;
  u.search = "";
  u.hash = "";
  return u.href;
}

const sameId = (a, b) => a !== undefined && a !== null && Number(a) === Number(b);

export class ApplianceClient extends EventTarget {
  /**
   * @param {object} [options]
   * @param {string} [options.url] the MS WebSocket, default wss://<this page's host>/
   * @param {boolean} [options.expose] make this client `window.appliance` (default true)
   * @param {object[]} [options.iceServers] the ICE servers of every call; default: asked
   *   of the appliance for each call (GET /ice-servers)
   */
  constructor({ url, expose = true, iceServers } = {}) {
    super();
    this.url = url || `${location.protocol === "http:" ? "ws" : "wss"}://${location.host}/`;
    this._iceServers = iceServers ?? null;
    this.ws = null;
    this.events = []; // every message received: {action, at, msg}
    this.sent = []; // every message sent: {action, at, msg}
    this.call = null; // the current call, see _newCall()
    this.state = "idle";
    this.stateText = "";
    if (expose) window.appliance = this;
    window.addEventListener("pagehide", () => this.hangup());
  }

  // -- the WebSocket ------------------------------------------------------------------

  connect() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) return Promise.resolve();
    if (this._connecting) return this._connecting;
    this._connecting = new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url);
      this.ws = ws;
      ws.onopen = () => {
        this._connecting = null;
        resolve();
      };
      ws.onerror = () => {
        if (this._connecting) {
          this._connecting = null;
          reject(new Error(`cannot reach the media server at ${this.url}`));
        }
      };
      ws.onclose = () => {
        if (this.ws === ws) this.ws = null;
        if (this.call && !this.call.ended) this._end({ causestring: "connection to the media server lost" });
      };
      ws.onmessage = (e) => this._receive(e.data);
    });
    return this._connecting;
  }

  send(msg) {
    checkLimits(msg);
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) throw new Error("not connected to the media server");
    this.ws.send(JSON.stringify(msg));
    this.sent.push({ action: msg.action, at: Date.now(), msg });
  }

  // -- placing a call -------------------------------------------------------------------

  /**
   * The customer's call (module User): camera + microphone to the MS, which rings the agent.
   * caller/callee are numbers; userdata is the encoded string AP-S verifies (<= 256 bytes).
   */
  async makeVideoCall({
    caller, callee, userdata = "", medium = 2, record = 0, lifetime = 0, audio = "PCMU",
    nickname, suid, localStream,
  } = {}) {
    const fields = { module: "User", medium, record: record ? 1 : 0, lifetime: Number(lifetime) || 0 };
    if (caller !== undefined) fields.caller = Number(caller);
    if (callee !== undefined) fields.callee = Number(callee);
    if (userdata) fields.userdata = String(userdata);
    if (audio) fields.audio = String(audio).toUpperCase();
    if (nickname) fields.nickname = clipBytes(nickname, LIMIT_VALUE);
    if (suid) fields.suid = String(suid);
    checkLimits(fields); // before asking for the camera: a too-long userdata fails fast
    return this._start(fields, { audio: true, video: medium === 2 }, localStream);
  }

  /**
   * The agent's video leg (module Agent) for the room AP-S gave the customer's call.
   * token: the agent credential AP-S issued with the roomkey (docs/aps-api.md), sent as is
   * when given; an appliance that locks the agent leg refuses an offer without it.
   */
  async joinRoom(roomkey, { medium = 2, nickname, token, localStream } = {}) {
    const fields = { module: "Agent", medium, roomkey: parseUint(roomkey, "roomkey") };
    if (fields.roomkey === undefined) throw new RangeError("roomkey is required");
    if (nickname) fields.nickname = clipBytes(nickname, LIMIT_VALUE);
    if (token) fields.token = String(token);
    checkLimits(fields); // a token over 64 bytes fails here, before the camera starts
    // The agent talks on the desk phone: the page sends video only and stays ready to
    // receive whatever audio the MS chooses to send.
    return this._start(fields, { audio: false, video: medium === 2 }, localStream);
  }

  _newCall(fields) {
    return {
      dialogid: randomUint(),
      ref: randomUint(),
      channel: 0,
      module: fields.module,
      medium: fields.medium,
      roomkey: fields.roomkey,
      pc: null,
      localStream: null,
      remoteStream: new MediaStream(),
      answered: false, // remote description set
      pendingIce: [],
      seenIce: new Set(),
      dtls: false,
      joined: false, // peerdata Join seen: the voice call is up (agent's leg: the customer is)
      peerVideo: false, // the peer's video is in the room (peerdata Join/Leave, medium video)
      peerchannel: 0,
      quality: { mine: null, peer: null },
      record: null,
      release: null,
      ended: false,
      startedAt: Date.now(),
    };
  }

  async _start(fields, constraints, localStream) {
    if (this.call && !this.call.ended) throw new Error("a call is already in progress");
    const call = this._newCall(fields);
    this.call = call;
    this._setState("starting", fields.module === "Agent" ? "Joining the room…" : "Starting the camera…");
    try {
      call.localStream = localStream || (await this._getMedia(constraints));
      if (call.ended) return call;
      this._emit("localstream", call.localStream);
      await this.connect();
      if (call.ended) return call;
      const iceServers = await this._fetchIceServers();
      if (call.ended) return call;
      const pc = new RTCPeerConnection({ iceServers });
      call.pc = pc;
      this._wirePeerConnection(call, pc);
      for (const track of call.localStream.getTracks()) pc.addTrack(track, call.localStream);
      if (!call.localStream.getAudioTracks().length) pc.addTransceiver("audio", { direction: "recvonly" });
      if (fields.medium === 2 && !call.localStream.getVideoTracks().length)
        pc.addTransceiver("video", { direction: "recvonly" });
      await pc.setLocalDescription(await pc.createOffer());
      await this._gathered(pc);
      if (call.ended) return call;
      this._setState("calling", fields.module === "Agent" ? "Connecting the video…" : "Calling…");
      call.offerSent = true;
      this.send({
        action: "offer",
        dialogid: call.dialogid,
        ref: call.ref,
        ...fields,
        ...describeUserAgent(),
        offer: { type: "offer", sdp: stripMdnsCandidates(pc.localDescription.sdp) },
      });
    } catch (err) {
      this._emit("error", err);
      this._end({ causestring: err.message || String(err) });
      throw err;
    }
    return call;
  }

  async _getMedia({ audio, video }) {
    const wanted = {
      audio: audio ? { echoCancellation: true, noiseSuppression: true } : false,
      video: video ? { facingMode: "user", width: { ideal: 640 }, height: { ideal: 480 } } : false,
    };
    if (!audio && !video) return new MediaStream();
    try {
      return await navigator.mediaDevices.getUserMedia(wanted);
    } catch (err) {
      // No camera (or refused) still allows a voice call, with video received only.
      if (!video || !audio) throw err;
      this._emit("error", new Error(`camera unavailable (${err.name}); calling with voice only`));
      return navigator.mediaDevices.getUserMedia({ audio: wanted.audio });
    }
  }

  async _fetchIceServers() {
    if (this._iceServers) return sanitizeIceServers({ iceServers: this._iceServers });
    const url = iceServersUrl(this.url);
    try {
      const response = await fetch(url, {
        cache: "no-store", credentials: "omit", signal: AbortSignal.timeout(ICE_SERVERS_WAIT_MS),
      });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      return parseIceServersAnswer(await response.text());
    } catch (err) {
      // Without them a call still connects wherever UDP reaches the appliance, as before.
      console.warn(`no ICE servers from ${url} (${err.message || err}): calling without STUN/TURN`);
      return [];
    }
  }

  _gathered(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        if (pc.iceGatheringState !== "complete") return;
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      };
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, GATHER_WAIT_MS);
    });
  }

  _wirePeerConnection(call, pc) {
    pc.addEventListener("track", (e) => {
      call.remoteStream.addTrack(e.track);
      this._emit("remotetrack", { track: e.track, stream: call.remoteStream });
    });
    pc.addEventListener("icecandidate", (e) => {
      // Candidates found after the offer went out (it carries the earlier ones).
      if (!call.offerSent || call.ended || !e.candidate || !e.candidate.candidate) return;
      if (isMdnsCandidate(` ${e.candidate.candidate} `)) return;
      this._sendForCall(call, {
        action: "ice",
        ice: { candidate: e.candidate.candidate, sdpMid: e.candidate.sdpMid ?? "0", sdpMLineIndex: e.candidate.sdpMLineIndex ?? 0 },
      });
    });
    pc.addEventListener("connectionstatechange", () => {
      this._emit("connectionstate", pc.connectionState);
      if (pc.connectionState === "failed" && !call.ended && call.dtls) this._setState("trouble", "Media connection lost…");
    });
  }

  // -- actions from the page ------------------------------------------------------------

  _sendForCall(call, fields) {
    // dialogid + ref are the call's, unchanged, in every message (PROTOCOL.md).
    const { action, ...rest } = fields;
    const msg = { action, dialogid: call.dialogid, ref: call.ref };
    if (call.channel) msg.channel = call.channel;
    Object.assign(msg, rest);
    this.send(msg);
    return msg;
  }

  /** One key of the keypad (0-9 * #) to the agent. */
  sendDTMF(key) {
    const value = String(key);
    if (value.length !== 1 || !DTMF_KEYS.includes(value)) throw new RangeError(`not a DTMF key: ${value}`);
    const call = this.call;
    if (!call || call.ended || !call.offerSent) throw new Error("no call in progress");
    return this._sendForCall(call, { action: "DTMF", value });
  }

  /** Application data for the peer (peerdata type "command"); each value <= 128 bytes. */
  sendPeerData(peerdata, value = "") {
    const call = this.call;
    if (!call || call.ended || !call.offerSent) throw new Error("no call in progress");
    const msg = { action: "peerdata", type: "command", peerdata: String(peerdata), value: String(value) };
    msg.medium = call.medium === 2 ? "video" : "audio";
    if (call.peerchannel) msg.peerchannel = call.peerchannel;
    return this._sendForCall(call, msg);
  }

  /** Hang up: `release` to the MS (cause 16), then close the media. */
  hangup(causestring = "normal release") {
    const call = this.call;
    if (!call || call.ended) return;
    if (call.offerSent && this.ws && this.ws.readyState === WebSocket.OPEN) {
      try {
        this._sendForCall(call, { action: "release", cause: 16, causestring });
      } catch (err) {
        this._emit("error", err);
      }
    }
    this._end({ cause: 16, causestring: "you hung up", local: true });
  }

  // -- messages from the MS -------------------------------------------------------------

  _receive(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      this._emit("error", new Error("undecodable message from the media server"));
      return;
    }
    if (!msg || typeof msg !== "object") return;
    this.events.push({ action: msg.action, at: Date.now(), msg });
    const call = this.call;
    // A release that names no call (the slides' "no circuit available" example) is for the
    // call being set up; anything naming another dialogid+ref is not ours.
    const named = msg.dialogid !== undefined || msg.ref !== undefined;
    const ours = call && (named ? sameId(msg.dialogid, call.dialogid) && sameId(msg.ref, call.ref) : msg.action === "release" && !call.channel);
    if (!ours || call.ended) {
      this._emit("unrouted", msg);
      return;
    }
    if (msg.channel !== undefined && Number(msg.channel) && !call.channel) call.channel = Number(msg.channel);
    const handler = this._handlers[msg.action];
    if (handler) {
      Promise.resolve(handler.call(this, call, msg)).catch((err) => this._emit("error", err));
    }
    this._emit(msg.action, msg);
  }

  _handlers = {
    alert(call, msg) {
      call.channel = Number(msg.channel) || call.channel;
      this._setState("alerting", call.module === "Agent" ? "Room found, connecting…" : "Verified, connecting…");
    },
    async answer(call, msg) {
      const answer = msg.answer;
      if (!answer || !answer.sdp || call.answered) return;
      await call.pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
      call.answered = true;
      this._setState("connecting", "Connecting the media…");
      const queued = call.pendingIce.splice(0);
      for (const ice of queued) await this._addIce(call, ice);
    },
    async ice(call, msg) {
      const ice = msg.ice;
      if (!ice || !ice.candidate) return;
      const key = `${ice.sdpMid}|${ice.candidate}`;
      if (call.seenIce.has(key)) return; // tolerate duplicates
      call.seenIce.add(key);
      if (!call.answered) call.pendingIce.push(ice);
      else await this._addIce(call, ice);
    },
    DTLSconnect(call) {
      call.dtls = true;
      if (call.module === "Agent") this._setState("connected", "Video connected");
      else if (!call.joined) this._setState("connected", "Ringing the agent…");
    },
    peerdata(call, msg) {
      if (msg.peerchannel) call.peerchannel = Number(msg.peerchannel) || call.peerchannel;
      if (msg.type === "command" || (msg.peerdata !== "Join" && msg.peerdata !== "Leave")) return;
      // `medium` is the peer's (PROTOCOL.md). On the customer's call "audio" is the desk
      // phone (the voice call itself) and "video" the agent's page, which may leave and
      // come back while the voice goes on; on the agent's leg the peer is the customer.
      const peer = call.module === "Agent" ? "Customer" : "Agent";
      const joined = msg.peerdata === "Join";
      if (msg.medium === "audio") {
        call.joined = joined;
        if (joined) this._setState("incall", call.module === "Agent" ? "Customer connected" : "Agent answered — in call");
        else this._setState("peerleft", `${peer} hung up`);
        return;
      }
      if (call.module === "Agent" && joined) call.joined = true; // a video customer's Join
      this._setPeerVideo(call, joined);
      if (!call.joined) return; // still ringing: the state says so
      // Short: a phone's status bar shows about 30 characters.
      if (joined) this._setState("incall", call.module === "Agent" ? "Customer connected" : "In call — with video");
      // The agent's leg is only video: its peer's video gone leaves nothing "going on" there.
      else this._setState("incall", call.module === "Agent" ? "Customer's video left" : "In call — agent's video left");
    },
    my_resolution(call, msg) {
      call.quality.mine = msg;
    },
    peer_resolution(call, msg) {
      call.quality.peer = msg;
    },
    record_status(call, msg) {
      call.record = msg;
    },
    release(call, msg) {
      this._end({ cause: msg.cause, causestring: msg.causestring || "released", msg });
    },
  };

  /** The peer's video came or went: `peervideo` event, detail {present}. */
  _setPeerVideo(call, present) {
    call.peerVideo = present;
    this._emit("peervideo", { present });
  }

  async _addIce(call, ice) {
    try {
      await call.pc.addIceCandidate({
        candidate: ice.candidate,
        sdpMid: ice.sdpMid ?? null,
        sdpMLineIndex: ice.sdpMLineIndex ?? (ice.sdpMid == null ? 0 : null),
      });
    } catch (err) {
      // One bad candidate must not end the call: the others may well work.
      this._emit("error", new Error(`ignored MS candidate: ${err.message}`));
    }
  }

  // -- ending ---------------------------------------------------------------------------

  _end({ cause, causestring, local = false, msg } = {}) {
    const call = this.call;
    if (!call || call.ended) return;
    call.ended = true;
    call.release = { cause, causestring, local, msg };
    if (call.pc) call.pc.close();
    if (call.localStream) for (const t of call.localStream.getTracks()) t.stop();
    const text = local
      ? "Call ended"
      : `Call ended: ${causestring}${cause !== undefined ? ` (cause ${cause})` : ""}`;
    this._setState("ended", text);
  }

  _setState(state, text) {
    this.state = state;
    this.stateText = text;
    this._emit("state", { state, text });
  }

  _emit(name, detail) {
    if (name === "error") console.warn("appliance:", detail && detail.message ? detail.message : detail);
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }
}

// -- rendering helpers shared by VideoCall.html and AgentVideo.html -----------------------

const LEVELS = new Set(["info", "notify", "warning", "error"]);
const POSITIONS = new Set(["top", "middle", "bottom"]);

/**
 * Show a system `message` in `root`'s `.toasts[data-position=top|middle|bottom]` box,
 * styled by level, removed after `displaytime` seconds (0: until tapped).
 */
export function showSystemMessage(root, { message = "", level = "info", position = "top", displaytime = 5 } = {}) {
  level = LEVELS.has(level) ? level : "info";
  position = POSITIONS.has(position) ? position : "top";
  const box = root.querySelector(`.toasts[data-position="${position}"]`) || root.querySelector(".toasts");
  const el = document.createElement("div");
  el.className = `toast level-${level}`;
  el.setAttribute("role", level === "error" || level === "warning" ? "alert" : "status");
  el.textContent = String(message);
  el.addEventListener("click", () => el.remove());
  box.append(el);
  const seconds = Number(displaytime);
  if (seconds > 0) setTimeout(() => el.remove(), seconds * 1000);
  return el;
}

/** One line of quality figures from my_resolution / peer_resolution. */
export function describeQuality(q) {
  if (!q) return "—";
  const parts = [];
  if (Number(q.width) && Number(q.height)) parts.push(`${q.width}×${q.height}`);
  if (q.framerate !== undefined) parts.push(`${q.framerate} fps`);
  if (q.video_bitrate !== undefined) parts.push(`video ${q.video_bitrate} kbit/s`);
  if (q.audio_bitrate !== undefined) parts.push(`audio ${q.audio_bitrate} kbit/s`);
  if (q.REMB !== undefined) parts.push(`REMB ${q.REMB}`);
  if (q.jitter !== undefined) parts.push(`jitter ${q.jitter} ms`);
  if (q.packetloss !== undefined) parts.push(`lost ${q.packetloss}`);
  return parts.join(" · ") || "—";
}

/** mm:ss since `since` (ms epoch). */
export function elapsed(since) {
  const s = Math.max(0, Math.floor((Date.now() - since) / 1000));
  return `${String(Math.floor(s / 60)).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}
