// The robot viewer: joins a Kinesis Video Streams signaling channel as VIEWER with plain
// browser APIs (fetch, WebSocket, WebCrypto, RTCPeerConnection, WebAudio; no build step).
//
//   control plane:  DescribeSignalingChannel -> ARN; GetSignalingChannelEndpoint (VIEWER,
//                   WSS+HTTPS); GetIceServerConfig on the HTTPS endpoint -> TURN servers
//   signaling:      WebSocket to the SigV4-presigned WSS URL; SDP_OFFER out, SDP_ANSWER in,
//                   ICE_CANDIDATE both ways (trickle), STATUS_RESPONSE / GO_AWAY handled
//   media:          the microphone (echo cancellation on) to the robot; the robot's audio
//                   played here; a data channel carrying the robot's transcripts and state
//                   in and the visitor's text chat and mute/unmute out.
//
// Three ways in, no keys needed for the first two:
// - a guest invite minted by the robot (sonic_voice/kvs/invite.py): #invite=<base64url JSON>
//   in the URL *fragment* (never sent to any server) holding a presigned viewer signaling
//   URL, its client id and the TURN servers; the page skips the control plane entirely;
// - an Amazon Cognito identity pool (?cognitoPool=REGION:ID, optional ?cognitoEndpoint= for
//   a local stand-in): unauthenticated guest credentials from GetId +
//   GetCredentialsForIdentity, then the usual signed control-plane calls;
// - typed keys (the developer fallback): they live in this tab's memory and are written to
//   localStorage only when "remember" is ticked.
// Non-secret settings may come from the URL (?region=&channel=&endpoint=&clientId=);
// credentials in the URL are ignored on purpose.
//
// window.kvsViewer exposes the live state (status, transcripts, candidates, levels) and a few
// diagnostics (stats(), takeCapture() when the page was opened with ?capture=1) so the page
// can be checked from DevTools, or from test/test_web_viewer.py over the DevTools protocol.
(function () {
  "use strict";

  const SigV4 = window.KvsSigV4;
  const $ = (id) => document.getElementById(id);
  const STORAGE_KEY = "kvsViewer.credentials";
  const CONNECT_TIMEOUT_MS = 30000;
  const DATA_CHANNEL_LABEL = "kvsDataChannel";
  const CLIENT_ID_RE = /^[a-zA-Z0-9_.-]{1,256}$/;
  const query = new URLSearchParams(location.search);
  let invite = null; // the guest invite read from the fragment, see readInvite()

  const viewer = {
    status: "idle",
    error: null,
    joinedWith: null, // "invite" | "cognito" | "keys"
    clientId: null,
    channelArn: null,
    connectionState: "new",
    dataChannelOpen: false,
    muted: false,
    robotState: null,
    transcripts: [], // {role, text, stage}
    received: [], // every data-channel message from the robot, parsed
    signaling: { sent: {}, received: {}, statusResponses: [] },
    candidates: { local: [], remote: [] },
    levels: { mic: 0, robot: 0, robotPeak: 0 },
    log: [],
    stats,
    takeCapture,
  };
  window.kvsViewer = viewer;

  let session = null; // the live connection, see connect()

  // ---------------------------------------------------------------- small helpers
  function log(msg, level = "info") {
    const line = `${new Date().toISOString().slice(11, 23)} ${msg}`;
    viewer.log.push(line);
    if (viewer.log.length > 500) viewer.log.shift();
    const pre = $("log");
    pre.textContent = viewer.log.slice(-200).join("\n");
    pre.scrollTop = pre.scrollHeight;
    (level === "error" ? console.error : console.log)(`[viewer] ${msg}`);
  }

  function setStatus(status, error = null) {
    viewer.status = status;
    viewer.error = error;
    const badge = $("status");
    badge.textContent = error ? `${status}: ${error}` : status;
    badge.dataset.status = status;
    const live = status !== "idle" && status !== "closed" && status !== "failed";
    $("connect").disabled = live;
    $("disconnect").disabled = !live;
    $("mute").disabled = !live;
  }

  function randomId(prefix) {
    const bytes = crypto.getRandomValues(new Uint8Array(6));
    return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function b64encode(text) {
    const bytes = new TextEncoder().encode(text);
    let bin = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(bin);
  }

  function b64decode(b64) {
    const bin = atob(b64);
    return new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0)));
  }

  function count(map, key) {
    map[key] = (map[key] || 0) + 1;
  }

  // ---------------------------------------------------------------- control plane
  class KvsError extends Error {
    constructor(code, message, status) {
      super(`${code}: ${message}`);
      this.code = code;
      this.status = status;
    }
  }

  /** One signed REST-JSON POST (botocore's shape: JSON body, SigV4 in the headers). */
  async function kvsCall(baseUrl, path, body, cfg) {
    const url = baseUrl.replace(/\/+$/, "") + path;
    const payload = JSON.stringify(body);
    const headers = await SigV4.signRequest({
      url,
      body: payload,
      headers: { "Content-Type": "application/json" },
      credentials: cfg.credentials,
      region: cfg.region,
    });
    let resp;
    try {
      resp = await fetch(url, { method: "POST", headers, body: payload, mode: "cors" });
    } catch (e) {
      throw new KvsError("NetworkError", `${url}: ${e.message}`, 0);
    }
    const text = await resp.text();
    let json = {};
    try {
      json = text ? JSON.parse(text) : {};
    } catch (e) {
      json = { message: text };
    }
    if (!resp.ok) {
      const header = (resp.headers.get("x-amzn-ErrorType") || "").split(":")[0];
      const code = header || json.__type || json.code || json.Code || `HTTP ${resp.status}`;
      throw new KvsError(code, json.message || json.Message || resp.statusText, resp.status);
    }
    return json;
  }

  async function resolveChannel(cfg) {
    const control = cfg.endpoint || `https://kinesisvideo.${cfg.region}.amazonaws.com`;
    const described = await kvsCall(
      control,
      "/describeSignalingChannel",
      { ChannelName: cfg.channel },
      cfg,
    );
    const arn = described.ChannelInfo.ChannelARN;
    const endpoints = await kvsCall(
      control,
      "/getSignalingChannelEndpoint",
      {
        ChannelARN: arn,
        SingleMasterChannelEndpointConfiguration: { Protocols: ["WSS", "HTTPS"], Role: "VIEWER" },
      },
      cfg,
    );
    const byProtocol = {};
    for (const e of endpoints.ResourceEndpointList || []) {
      byProtocol[e.Protocol] = e.ResourceEndpoint;
    }
    if (!byProtocol.WSS || !byProtocol.HTTPS) {
      throw new KvsError("InvalidResponse", "GetSignalingChannelEndpoint gave no WSS/HTTPS", 0);
    }
    const ice = await kvsCall(
      byProtocol.HTTPS,
      "/v1/get-ice-server-config",
      { ChannelARN: arn, ClientId: cfg.clientId },
      cfg,
    );
    // STUN is not returned by any API: clients build it per region. Only towards real AWS:
    // with an endpoint override (the local stand-in) no other address is ever contacted.
    const iceServers = cfg.endpoint
      ? []
      : [{ urls: `stun:stun.kinesisvideo.${cfg.region}.amazonaws.com:443` }];
    for (const s of ice.IceServerList || []) {
      iceServers.push({ urls: s.Uris, username: s.Username, credential: s.Password });
    }
    return { arn, wss: byProtocol.WSS, https: byProtocol.HTTPS, iceServers };
  }

  // ---------------------------------------------------------------- guests
  /** The #invite= bundle, or null. Removed from the address bar once read. */
  function readInvite() {
    const m = /^#invite=([A-Za-z0-9_-]+)$/.exec(location.hash);
    if (!m) return null;
    let inv;
    try {
      const b64 = m[1].replace(/-/g, "+").replace(/_/g, "/");
      inv = JSON.parse(b64decode(b64 + "=".repeat((4 - (b64.length % 4)) % 4)));
    } catch (e) {
      log("the invite link is damaged: ask for a new one", "error");
      return null;
    }
    history.replaceState(null, "", location.pathname + location.search);
    if (inv.v !== 1 || !inv.wss || !inv.clientId) {
      log("the invite link is not one this page understands: ask for a new one", "error");
      return null;
    }
    return inv;
  }

  /** Unauthenticated (guest) credentials from a Cognito identity pool. */
  async function cognitoCredentials(poolId, endpoint) {
    const region = poolId.split(":")[0];
    const url = endpoint || `https://cognito-identity.${region}.amazonaws.com/`;
    async function call(target, body) {
      let resp;
      try {
        resp = await fetch(url, {
          method: "POST",
          headers: {
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": `AWSCognitoIdentityService.${target}`,
          },
          body: JSON.stringify(body),
          mode: "cors",
        });
      } catch (e) {
        throw new KvsError("NetworkError", `${url}: ${e.message}`, 0);
      }
      const json = await resp.json().catch(() => ({}));
      if (!resp.ok) {
        const code = (json.__type || `HTTP ${resp.status}`).split("#").pop();
        throw new KvsError(`Cognito ${target}: ${code}`, json.message || resp.statusText, resp.status);
      }
      return json;
    }
    const { IdentityId } = await call("GetId", { IdentityPoolId: poolId });
    const { Credentials: c } = await call("GetCredentialsForIdentity", { IdentityId });
    log(`guest identity ${IdentityId} (credentials until ${new Date(c.Expiration * 1000).toISOString()})`);
    return { accessKeyId: c.AccessKeyId, secretAccessKey: c.SecretKey, sessionToken: c.SessionToken };
  }

  // ---------------------------------------------------------------- signaling
  /** The signaling WebSocket; reconnects (freshly presigned) on GO_AWAY. */
  class Signaling {
    constructor(cfg, channel, handlers) {
      this.cfg = cfg;
      this.channel = channel;
      this.handlers = handlers;
      this.ws = null;
      this.closed = false;
      this.correlation = 0;
    }

    async open() {
      const url = this.channel.presigned || await SigV4.presignUrl({
        url: this.channel.wss,
        params: { "X-Amz-ChannelARN": this.channel.arn, "X-Amz-ClientId": this.cfg.clientId },
        credentials: this.cfg.credentials,
        region: this.cfg.region,
      });
      const ws = new WebSocket(url);
      this.ws = ws;
      await new Promise((resolve, reject) => {
        ws.onopen = resolve;
        ws.onerror = () => reject(new KvsError("SignalingError", "WebSocket refused (403?)", 0));
        ws.onclose = (e) =>
          reject(new KvsError("SignalingError", `WebSocket closed (${e.code}) before open`, 0));
      });
      ws.onmessage = (e) => this.onMessage(e.data);
      ws.onerror = () => log("signaling socket error", "error");
      ws.onclose = (e) => {
        if (this.ws !== ws || this.closed) return;
        log(`signaling closed (${e.code} ${e.reason || ""})`);
        this.handlers.onClose();
      };
      log("signaling connected");
    }

    send(action, payloadObject) {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
        log(`signaling not open; ${action} dropped`, "error");
        return;
      }
      this.correlation += 1;
      const frame = {
        action,
        messagePayload: b64encode(JSON.stringify(payloadObject)),
        correlationId: `${action.toLowerCase().replace(/_/g, "-")}.${Date.now()}.${this.correlation}`,
      };
      this.ws.send(JSON.stringify(frame));
      count(viewer.signaling.sent, action);
    }

    onMessage(data) {
      if (typeof data !== "string" || !data.trim()) return; // keep-alive
      let msg;
      try {
        msg = JSON.parse(data);
      } catch (e) {
        log("signaling: ignored a non-JSON frame");
        return;
      }
      const type = msg.messageType || msg.MessageType;
      if (!type) {
        log(`signaling: ignored ${data.slice(0, 120)}`);
        return;
      }
      count(viewer.signaling.received, type);
      const payload = msg.messagePayload || msg.MessagePayload;
      let body = null;
      if (payload) {
        try {
          body = JSON.parse(b64decode(payload));
        } catch (e) {
          log(`signaling: ${type} with an unreadable payload`, "error");
          return;
        }
      }
      switch (type) {
        case "SDP_ANSWER":
          this.handlers.onAnswer(body);
          break;
        case "ICE_CANDIDATE":
          this.handlers.onCandidate(body);
          break;
        case "STATUS_RESPONSE": {
          const s = msg.statusResponse || msg.StatusResponse || {};
          viewer.signaling.statusResponses.push(s);
          log(
            `signaling error for ${s.correlationId}: ${s.errorType} ${s.statusCode} ` +
              `${s.description || ""}`,
            "error",
          );
          break;
        }
        case "GO_AWAY":
          log("signaling: GO_AWAY, reconnecting");
          this.reconnect();
          break;
        case "RECONNECT_ICE_SERVER":
          // New TURN credentials only matter for a new peer connection; media continues.
          log("signaling: RECONNECT_ICE_SERVER (relay sessions move; media continues)");
          break;
        default:
          log(`signaling: ignored ${type}`);
      }
    }

    async reconnect() {
      const old = this.ws;
      this.ws = null;
      if (old) old.close(1000, "reconnect");
      try {
        await this.open();
      } catch (e) {
        log(`signaling reconnect failed: ${e.message}`, "error");
      }
    }

    close() {
      this.closed = true;
      if (this.ws) this.ws.close(1000, "bye");
      this.ws = null;
    }
  }

  // ---------------------------------------------------------------- audio
  function levelOf(analyser, buffer) {
    analyser.getFloatTimeDomainData(buffer);
    let sum = 0;
    let peak = 0;
    for (const v of buffer) {
      sum += v * v;
      peak = Math.max(peak, Math.abs(v));
    }
    return { rms: Math.sqrt(sum / buffer.length), peak };
  }

  function startMeters(s) {
    const buf = new Float32Array(1024);
    s.meterTimer = setInterval(() => {
      if (s.micAnalyser) {
        viewer.levels.mic = levelOf(s.micAnalyser, buf).rms;
        $("mic-level").value = Math.min(1, viewer.levels.mic * 4);
      }
      if (s.robotAnalyser) {
        const { rms, peak } = levelOf(s.robotAnalyser, buf);
        viewer.levels.robot = rms;
        viewer.levels.robotPeak = Math.max(viewer.levels.robotPeak, peak);
        $("robot-level").value = Math.min(1, rms * 4);
      }
    }, 100);
  }

  async function startCapture(s, source) {
    // Diagnostics: keep what the page plays from the robot (up to 60 s) for takeCapture().
    await s.audioContext.audioWorklet.addModule("capture-worklet.js");
    const node = new AudioWorkletNode(s.audioContext, "kvs-capture");
    const chunks = [];
    let total = 0;
    const max = 60 * s.audioContext.sampleRate;
    node.port.onmessage = (e) => {
      if (total >= max) return;
      chunks.push(e.data);
      total += e.data.length;
    };
    source.connect(node);
    // Keep the node in the rendered graph (silently) so the context pulls it.
    const sink = s.audioContext.createGain();
    sink.gain.value = 0;
    node.connect(sink).connect(s.audioContext.destination);
    s.capture = { chunks, rate: s.audioContext.sampleRate, node };
    log("capturing the robot's audio (diagnostics)");
  }

  /** The captured robot audio as base64 little-endian int16 (diagnostics, ?capture=1). */
  function takeCapture() {
    const cap = session && session.capture;
    if (!cap) return null;
    const n = cap.chunks.reduce((a, c) => a + c.length, 0);
    const pcm = new Int16Array(n);
    let i = 0;
    for (const c of cap.chunks) {
      for (const v of c) pcm[i++] = Math.max(-32768, Math.min(32767, Math.round(v * 32767)));
    }
    const bytes = new Uint8Array(pcm.buffer);
    let bin = "";
    for (let j = 0; j < bytes.length; j += 0x8000) {
      bin += String.fromCharCode.apply(null, bytes.subarray(j, j + 0x8000));
    }
    return { rate: cap.rate, samples: n, pcm16: btoa(bin) };
  }

  /** A summary of getStats(): audio in/out and the selected candidate pair. */
  async function stats() {
    if (!session || !session.pc) return null;
    const report = await session.pc.getStats();
    const out = {};
    const byId = new Map();
    report.forEach((r) => byId.set(r.id, r));
    report.forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "audio") {
        out.inbound = {
          packetsReceived: r.packetsReceived,
          packetsLost: r.packetsLost,
          totalSamplesReceived: r.totalSamplesReceived,
          totalAudioEnergy: r.totalAudioEnergy,
          concealedSamples: r.concealedSamples,
          jitterBufferDelay: r.jitterBufferDelay,
          jitterBufferEmittedCount: r.jitterBufferEmittedCount,
        };
      } else if (r.type === "outbound-rtp" && r.kind === "audio") {
        out.outbound = { packetsSent: r.packetsSent, bytesSent: r.bytesSent };
      } else if (r.type === "transport" && r.selectedCandidatePairId) {
        const pair = byId.get(r.selectedCandidatePairId);
        if (pair) {
          const l = byId.get(pair.localCandidateId) || {};
          const rem = byId.get(pair.remoteCandidateId) || {};
          out.selectedPair = {
            local: `${l.address || l.ip}:${l.port}`,
            remote: `${rem.address || rem.ip}:${rem.port}`,
            state: pair.state,
          };
        }
      }
    });
    return out;
  }

  // ---------------------------------------------------------------- transcripts & data channel
  function renderTranscripts() {
    const ol = $("transcript");
    ol.replaceChildren(
      ...viewer.transcripts.map((t) => {
        const li = document.createElement("li");
        li.className = `role-${String(t.role).toLowerCase()} stage-${String(t.stage).toLowerCase()}`;
        const who = document.createElement("b");
        who.textContent = t.role === "USER" ? "you" : String(t.role).toLowerCase();
        li.append(who, document.createTextNode(" " + t.text));
        return li;
      }),
    );
    ol.lastElementChild && ol.lastElementChild.scrollIntoView({ block: "nearest" });
  }

  function addTranscript(msg) {
    const entry = {
      role: String(msg.role || "ASSISTANT").toUpperCase(),
      text: String(msg.text || ""),
      stage: String(msg.stage || "FINAL").toUpperCase(),
    };
    // Nova Sonic sends the assistant's text twice: SPECULATIVE (as it is generated) and
    // FINAL (what was actually spoken, in the same order). A FINAL replaces the oldest
    // speculative entry of the same role, or the visitor's own SENT chat line when the robot
    // echoes it; anything else is appended.
    if (entry.stage === "FINAL") {
      const i = viewer.transcripts.findIndex(
        (t) =>
          t.role === entry.role &&
          (t.stage === "SPECULATIVE" || (t.stage === "SENT" && t.text === entry.text)),
      );
      if (i >= 0) {
        viewer.transcripts[i] = entry;
        renderTranscripts();
        return;
      }
    }
    viewer.transcripts.push(entry);
    if (viewer.transcripts.length > 500) viewer.transcripts.shift();
    renderTranscripts();
  }

  function onRobotMessage(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (e) {
      log("data channel: ignored a non-JSON message");
      return;
    }
    viewer.received.push(msg);
    if (viewer.received.length > 500) viewer.received.shift();
    if (msg.type === "transcript") {
      addTranscript(msg);
    } else if (msg.type === "state") {
      viewer.robotState = msg.state;
      $("robot-state").textContent = `robot: ${msg.state}`;
      $("robot-state").dataset.state = msg.state;
    } else if (msg.type === "error") {
      log(`robot: ${msg.reason || msg.error || msg.message || JSON.stringify(msg)}`, "error");
    } else {
      log(`data channel: ${String(data).slice(0, 200)}`);
    }
  }

  function adoptDataChannel(s, dc) {
    if (s.dc && s.dc.readyState === "open" && dc !== s.dc) {
      // Both sides may open a channel; keep listening to every one, send on the open one.
      dc.onmessage = (e) => onRobotMessage(e.data);
      return;
    }
    s.dc = dc;
    dc.onopen = () => {
      viewer.dataChannelOpen = true;
      $("chat-text").disabled = false;
      $("chat-send").disabled = false;
      log(`data channel "${dc.label}" open`);
      if (viewer.muted) sendToRobot({ type: "mute" });
    };
    dc.onclose = () => {
      viewer.dataChannelOpen = false;
      $("chat-text").disabled = true;
      $("chat-send").disabled = true;
      log(`data channel "${dc.label}" closed`);
    };
    dc.onmessage = (e) => onRobotMessage(e.data);
    if (dc.readyState === "open") dc.onopen();
  }

  function sendToRobot(obj) {
    const dc = session && session.dc;
    if (!dc || dc.readyState !== "open") {
      log("data channel not open; message not sent", "error");
      return false;
    }
    dc.send(JSON.stringify(obj));
    return true;
  }

  // ---------------------------------------------------------------- connect / disconnect
  function readForm() {
    if (invite) {
      if (invite.exp && invite.exp * 1000 < Date.now()) {
        throw new Error("this invite has expired: ask the robot for a new one");
      }
      return {
        region: invite.region,
        channel: invite.channel,
        clientId: invite.clientId,
        icePolicy: $("ice-policy").value,
        invite,
      };
    }
    const cfg = {
      region: $("region").value.trim(),
      channel: $("channel").value.trim(),
      clientId: $("client-id").value.trim() || randomId("viewer-"),
      endpoint: $("endpoint").value.trim().replace(/\/+$/, ""),
      icePolicy: $("ice-policy").value,
      credentials: {
        accessKeyId: $("access-key-id").value.trim(),
        secretAccessKey: $("secret-access-key").value.trim(),
        sessionToken: $("session-token").value.trim() || undefined,
      },
    };
    if (!CLIENT_ID_RE.test(cfg.clientId) || cfg.clientId.startsWith("AWS_")) {
      throw new Error("client id: 1-256 of a-z A-Z 0-9 _ . - and not starting with AWS_");
    }
    if (!cfg.region || !cfg.channel) throw new Error("region and channel name are required");
    cfg.cognitoPool = query.get("cognitoPool") || "";
    cfg.cognitoEndpoint = query.get("cognitoEndpoint") || "";
    if (cfg.cognitoEndpoint && !/^(https:\/\/|http:\/\/(127\.0\.0\.1|localhost)(:|\/|$))/.test(cfg.cognitoEndpoint)) {
      throw new Error("cognitoEndpoint must be https://…, or http:// on 127.0.0.1/localhost");
    }
    const typed = cfg.credentials.accessKeyId || cfg.credentials.secretAccessKey;
    if (!typed && !cfg.cognitoPool) {
      throw new Error("enter an access key id and a secret access key");
    }
    if (typed && (!cfg.credentials.accessKeyId || !cfg.credentials.secretAccessKey)) {
      throw new Error("enter both an access key id and a secret access key");
    }
    if (cfg.endpoint && !/^(https:\/\/|http:\/\/(127\.0\.0\.1|localhost)(:|\/|$))/.test(cfg.endpoint)) {
      throw new Error("endpoint override must be https://…, or http:// on 127.0.0.1/localhost");
    }
    return cfg;
  }

  function rememberCredentials(cfg) {
    if (cfg.credentials && cfg.credentials.accessKeyId && $("remember").checked) {
      localStorage.setItem(STORAGE_KEY, JSON.stringify(cfg.credentials));
    }
  }

  async function connect() {
    if (session) await disconnect();
    let cfg;
    try {
      cfg = readForm();
    } catch (e) {
      setStatus("idle", e.message);
      return;
    }
    rememberCredentials(cfg);
    viewer.clientId = cfg.clientId;
    const s = {
      cfg,
      pc: null,
      dc: null,
      signaling: null,
      mic: null,
      pendingCandidates: [],
      remoteSet: false,
      audioContext: new AudioContext({ sampleRate: 48000, latencyHint: "interactive" }),
    };
    session = s;
    try {
      setStatus("resolving");
      let channel;
      if (cfg.invite) {
        viewer.joinedWith = "invite";
        const arn = new URL(cfg.invite.wss).searchParams.get("X-Amz-ChannelARN");
        channel = { arn, presigned: cfg.invite.wss, iceServers: cfg.invite.iceServers || [] };
      } else {
        if (!cfg.credentials.accessKeyId) {
          viewer.joinedWith = "cognito";
          cfg.credentials = await cognitoCredentials(cfg.cognitoPool, cfg.cognitoEndpoint);
        } else {
          viewer.joinedWith = "keys";
        }
        channel = await resolveChannel(cfg);
      }
      viewer.channelArn = channel.arn;
      log(`channel ${channel.arn}; ${channel.iceServers.length} ICE server(s)`);

      setStatus("microphone");
      try {
        s.mic = await navigator.mediaDevices.getUserMedia({
          audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
          video: false,
        });
        const settings = s.mic.getAudioTracks()[0].getSettings();
        log(`microphone: ${s.mic.getAudioTracks()[0].label} (echoCancellation ${settings.echoCancellation})`);
        s.micAnalyser = s.audioContext.createAnalyser();
        s.audioContext.createMediaStreamSource(s.mic).connect(s.micAnalyser);
      } catch (e) {
        log(`no microphone (${e.name}: ${e.message}); listening only`, "error");
      }

      setStatus("signaling");
      s.signaling = new Signaling(cfg, channel, {
        onAnswer: (answer) => onAnswer(s, answer),
        onCandidate: (c) => onRemoteCandidate(s, c),
        onClose: () => {
          if (viewer.connectionState !== "connected") fail(s, "signaling closed");
        },
      });
      await s.signaling.open();

      setStatus("negotiating");
      const pc = new RTCPeerConnection({
        iceServers: channel.iceServers,
        iceTransportPolicy: cfg.icePolicy === "relay" ? "relay" : "all",
      });
      s.pc = pc;
      if (s.mic) {
        for (const track of s.mic.getAudioTracks()) pc.addTrack(track, s.mic);
      } else {
        pc.addTransceiver("audio", { direction: "recvonly" });
      }
      adoptDataChannel(s, pc.createDataChannel(DATA_CHANNEL_LABEL));
      pc.ondatachannel = (e) => adoptDataChannel(s, e.channel);
      pc.onicecandidate = (e) => {
        if (!e.candidate || !e.candidate.candidate) return; // end of gathering: KVS has no marker
        viewer.candidates.local.push(e.candidate.candidate);
        s.signaling.send("ICE_CANDIDATE", e.candidate.toJSON());
      };
      pc.ontrack = (e) => onRemoteTrack(s, e);
      pc.onconnectionstatechange = () => {
        viewer.connectionState = pc.connectionState;
        log(`peer connection ${pc.connectionState}`);
        if (pc.connectionState === "connected") {
          clearTimeout(s.connectTimer);
          setStatus("connected");
        } else if (pc.connectionState === "failed") {
          fail(s, "peer connection failed");
        } else if (pc.connectionState === "disconnected") {
          setStatus("reconnecting");
        }
      };
      s.connectTimer = setTimeout(() => {
        if (pc.connectionState !== "connected") fail(s, "no connection within 30 s");
      }, CONNECT_TIMEOUT_MS);
      startMeters(s);

      // Trickle ICE: the offer goes out at once, candidates follow one by one.
      await pc.setLocalDescription(await pc.createOffer());
      s.signaling.send("SDP_OFFER", { type: "offer", sdp: pc.localDescription.sdp });
      log("offer sent");
    } catch (e) {
      fail(s, e.message);
    }
  }

  async function onAnswer(s, answer) {
    if (session !== s || !s.pc || !answer || !answer.sdp) return;
    if (s.pc.signalingState !== "have-local-offer") {
      log(`answer ignored in state ${s.pc.signalingState}`);
      return;
    }
    try {
      for (const line of answer.sdp.split(/\r?\n/)) {
        if (line.startsWith("a=candidate:")) viewer.candidates.remote.push(line.slice(2));
      }
      await s.pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
      s.remoteSet = true;
      log("answer applied");
      for (const c of s.pendingCandidates.splice(0)) await addCandidate(s, c);
    } catch (e) {
      fail(s, `bad answer: ${e.message}`);
    }
  }

  async function onRemoteCandidate(s, c) {
    if (session !== s || !c || !c.candidate) return;
    viewer.candidates.remote.push(c.candidate);
    if (!s.remoteSet) s.pendingCandidates.push(c);
    else await addCandidate(s, c);
  }

  async function addCandidate(s, c) {
    try {
      await s.pc.addIceCandidate({
        candidate: c.candidate,
        sdpMid: c.sdpMid ?? null,
        sdpMLineIndex: c.sdpMLineIndex ?? null,
      });
    } catch (e) {
      log(`candidate rejected: ${e.message}`, "error");
    }
  }

  function onRemoteTrack(s, e) {
    if (e.track.kind !== "audio") return;
    const stream = e.streams[0] || new MediaStream([e.track]);
    const audio = $("robot-audio");
    audio.srcObject = stream;
    audio.play().catch((err) => log(`autoplay blocked (${err.message}); click the page`, "error"));
    // Chrome feeds a remote track into WebAudio only while a media element also plays it.
    const source = s.audioContext.createMediaStreamSource(stream);
    s.robotAnalyser = s.audioContext.createAnalyser();
    source.connect(s.robotAnalyser);
    if (query.get("capture") === "1") {
      startCapture(s, source).catch((err) => log(`capture: ${err.message}`, "error"));
    }
    s.audioContext.resume();
    log("robot audio track");
  }

  function fail(s, reason) {
    if (session !== s) return;
    log(reason, "error");
    teardown(s);
    setStatus("failed", reason);
  }

  function teardown(s) {
    clearTimeout(s.connectTimer);
    clearInterval(s.meterTimer);
    if (s.signaling) s.signaling.close();
    if (s.dc) s.dc.close();
    if (s.pc) s.pc.close();
    if (s.mic) s.mic.getTracks().forEach((t) => t.stop());
    viewer.dataChannelOpen = false;
    viewer.connectionState = s.pc ? s.pc.connectionState : "closed";
    $("robot-audio").srcObject = null;
    // The audio context (and any capture) stays until the next connect, for diagnostics.
  }

  async function disconnect() {
    const s = session;
    if (!s) return;
    teardown(s);
    session = null;
    if (s.audioContext) await s.audioContext.close().catch(() => {});
    setStatus("closed");
    log("disconnected");
  }

  function setMuted(muted) {
    viewer.muted = muted;
    const btn = $("mute");
    btn.textContent = muted ? "Unmute mic" : "Mute mic";
    btn.setAttribute("aria-pressed", String(muted));
    // Muting stops the audio locally (the robot gets silence) and tells the robot, so it
    // also ignores this visitor until unmuted.
    if (session && session.mic) session.mic.getAudioTracks().forEach((t) => (t.enabled = !muted));
    if (session && session.dc && session.dc.readyState === "open") {
      sendToRobot({ type: muted ? "mute" : "unmute" });
    }
    log(muted ? "microphone muted" : "microphone live");
  }

  // ---------------------------------------------------------------- wiring
  function init() {
    for (const [param, id] of [
      ["region", "region"],
      ["channel", "channel"],
      ["endpoint", "endpoint"],
      ["clientId", "client-id"],
    ]) {
      if (query.get(param)) $(id).value = query.get(param);
    }
    for (const secret of ["accessKeyId", "secretAccessKey", "sessionToken"]) {
      if (query.has(secret)) log(`ignored "${secret}" in the URL: type credentials instead`, "error");
    }
    invite = readInvite();
    if (invite) {
      $("channel").value = invite.channel || "";
      $("region").value = invite.region || "";
      $("client-id").value = invite.clientId;
      for (const id of ["access-key-id", "secret-access-key"]) $(id).required = false;
      $("credentials").hidden = true;
      log(`invited as ${invite.clientId} to ${invite.channel}: no keys needed`);
    } else if (query.get("cognitoPool")) {
      for (const id of ["access-key-id", "secret-access-key"]) $(id).required = false;
      log(`guest credentials from Cognito pool ${query.get("cognitoPool")} (keys optional)`);
    }
    const saved = localStorage.getItem(STORAGE_KEY);
    if (saved) {
      try {
        const c = JSON.parse(saved);
        $("access-key-id").value = c.accessKeyId || "";
        $("secret-access-key").value = c.secretAccessKey || "";
        $("session-token").value = c.sessionToken || "";
        $("remember").checked = true;
      } catch (e) {
        localStorage.removeItem(STORAGE_KEY);
      }
    }
    $("connect-form").addEventListener("submit", (e) => {
      e.preventDefault();
      connect();
    });
    $("disconnect").addEventListener("click", () => disconnect());
    $("mute").addEventListener("click", () => setMuted(!viewer.muted));
    $("remember").addEventListener("change", () => {
      if (!$("remember").checked) localStorage.removeItem(STORAGE_KEY);
    });
    $("forget").addEventListener("click", () => {
      localStorage.removeItem(STORAGE_KEY);
      $("remember").checked = false;
      log("saved credentials removed");
    });
    $("chat-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("chat-text").value.trim();
      if (!text) return;
      if (sendToRobot({ type: "text", text })) {
        addTranscript({ role: "USER", text, stage: "SENT" });
        $("chat-text").value = "";
      }
    });
    window.addEventListener("pagehide", () => {
      if (session) teardown(session);
    });
    setStatus("idle");
    viewer.ready = true;
  }

  viewer.connect = connect;
  viewer.disconnect = disconnect;
  viewer.setMuted = setMuted;
  viewer.sendText = (text) => sendToRobot({ type: "text", text });
  init();
})();
