// AWS Signature Version 4 in the browser, with WebCrypto only (no library, no build step).
//
// Two uses, both for Kinesis Video Streams (signing name "kinesisvideo"):
//   - presignUrl():  the signaling WebSocket URL (query signing, only `host` signed, empty
//                    payload hash, X-Amz-Security-Token inside the signed query, as KVS needs);
//   - signRequest(): the REST calls (DescribeSignalingChannel, GetSignalingChannelEndpoint,
//                    GetIceServerConfig), signed in the Authorization header.
// Both follow botocore's SigV4QueryAuth / SigV4Auth byte for byte; test/test_web_viewer.py
// checks them against botocore for fixed inputs. Pure functions: every input (credentials,
// date) is a parameter; nothing is read from or written to storage.
(function (global) {
  "use strict";

  const encoder = new TextEncoder();
  const ALGORITHM = "AWS4-HMAC-SHA256";
  const EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

  function toHex(buffer) {
    return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function sha256Hex(data) {
    const bytes = typeof data === "string" ? encoder.encode(data) : data;
    return toHex(await crypto.subtle.digest("SHA-256", bytes));
  }

  async function hmac(key, message) {
    const raw = typeof key === "string" ? encoder.encode(key) : key;
    const k = await crypto.subtle.importKey("raw", raw, { name: "HMAC", hash: "SHA-256" }, false, [
      "sign",
    ]);
    return crypto.subtle.sign("HMAC", k, encoder.encode(message));
  }

  /** 2024-01-02T03:04:05.678Z -> "20240102T030405Z" (SigV4's basic ISO 8601 form). */
  function amzDate(date) {
    return date.toISOString().replace(/\.\d{3}Z$/, "Z").replace(/[-:]/g, "");
  }

  /** RFC 3986 encoding: only A-Z a-z 0-9 - _ . ~ stay as they are. */
  function uriEncode(value) {
    return encodeURIComponent(value).replace(
      /[!'()*]/g,
      (c) => "%" + c.charCodeAt(0).toString(16).toUpperCase(),
    );
  }

  /** Canonical URI: each path segment RFC 3986 encoded once; "/" when empty. */
  function canonicalPath(pathname) {
    if (!pathname || pathname === "/") return "/";
    return pathname
      .split("/")
      .map((seg) => uriEncode(decodeURIComponent(seg)))
      .join("/");
  }

  /** Sort encoded [key, value] pairs by key, then value (ASCII, so this matches Python's sort). */
  function comparePairs(a, b) {
    if (a[0] !== b[0]) return a[0] < b[0] ? -1 : 1;
    if (a[1] !== b[1]) return a[1] < b[1] ? -1 : 1;
    return 0;
  }

  function canonicalQuery(encodedPairs) {
    return [...encodedPairs]
      .sort(comparePairs)
      .map(([k, v]) => `${k}=${v}`)
      .join("&");
  }

  function credentialScope(date, region, service) {
    return `${amzDate(date).slice(0, 8)}/${region}/${service}/aws4_request`;
  }

  async function signature(secretAccessKey, date, region, service, stringToSign) {
    const kDate = await hmac("AWS4" + secretAccessKey, amzDate(date).slice(0, 8));
    const kRegion = await hmac(kDate, region);
    const kService = await hmac(kRegion, service);
    const kSigning = await hmac(kService, "aws4_request");
    return toHex(await hmac(kSigning, stringToSign));
  }

  function checkCredentials(credentials) {
    if (!credentials || !credentials.accessKeyId || !credentials.secretAccessKey) {
      throw new Error("AWS credentials need an access key id and a secret access key");
    }
  }

  /**
   * Presign a GET URL in the query (botocore SigV4QueryAuth): returns
   * `${url}?${params}&X-Amz-Algorithm=…&X-Amz-Signature=…` in botocore's parameter order.
   * `url` must have no query string (KVS ResourceEndpoints have none).
   */
  async function presignUrl({
    url,
    params = {},
    credentials,
    region,
    service = "kinesisvideo",
    expires = 299,
    date = new Date(),
  }) {
    checkCredentials(credentials);
    const u = new URL(url);
    if (u.search || url.includes("?")) throw new Error(`endpoint has a query string: ${url}`);
    const ts = amzDate(date);
    const scope = credentialScope(date, region, service);
    const pairs = Object.entries(params).map(([k, v]) => [uriEncode(k), uriEncode(String(v))]);
    const auth = [
      ["X-Amz-Algorithm", ALGORITHM],
      ["X-Amz-Credential", `${credentials.accessKeyId}/${scope}`],
      ["X-Amz-Date", ts],
      ["X-Amz-Expires", String(expires)],
      ["X-Amz-SignedHeaders", "host"],
    ];
    if (credentials.sessionToken) auth.push(["X-Amz-Security-Token", credentials.sessionToken]);
    const all = [...pairs, ...auth.map(([k, v]) => [uriEncode(k), uriEncode(v)])];
    const canonicalRequest = [
      "GET",
      canonicalPath(u.pathname),
      canonicalQuery(all),
      `host:${u.host}\n`,
      "host",
      EMPTY_SHA256,
    ].join("\n");
    const stringToSign = [ALGORITHM, ts, scope, await sha256Hex(canonicalRequest)].join("\n");
    const sig = await signature(credentials.secretAccessKey, date, region, service, stringToSign);
    const query = all.map(([k, v]) => `${k}=${v}`).join("&");
    return `${url}?${query}&X-Amz-Signature=${sig}`;
  }

  /**
   * Sign a request in its headers (botocore SigV4Auth). Every header given is signed, plus
   * `host` (from the URL, as the browser will send it), `x-amz-date` and, with a session
   * token, `x-amz-security-token`. Returns the headers to send (without `host`, which
   * fetch() sets itself).
   */
  async function signRequest({
    method = "POST",
    url,
    headers = {},
    body = "",
    credentials,
    region,
    service = "kinesisvideo",
    date = new Date(),
  }) {
    checkCredentials(credentials);
    const u = new URL(url);
    const ts = amzDate(date);
    const scope = credentialScope(date, region, service);
    const out = { ...headers, "X-Amz-Date": ts };
    if (credentials.sessionToken) out["X-Amz-Security-Token"] = credentials.sessionToken;
    const toSign = { host: u.host };
    for (const [k, v] of Object.entries(out)) toSign[k.toLowerCase()] = String(v);
    const names = Object.keys(toSign).sort();
    const canonicalHeaders = names
      .map((n) => `${n}:${toSign[n].trim().split(/\s+/).join(" ")}`)
      .join("\n");
    const query = [...u.searchParams].map(([k, v]) => [uriEncode(k), uriEncode(v)]);
    const canonicalRequest = [
      method.toUpperCase(),
      canonicalPath(u.pathname),
      canonicalQuery(query),
      canonicalHeaders + "\n",
      names.join(";"),
      await sha256Hex(body),
    ].join("\n");
    const stringToSign = [ALGORITHM, ts, scope, await sha256Hex(canonicalRequest)].join("\n");
    const sig = await signature(credentials.secretAccessKey, date, region, service, stringToSign);
    out.Authorization =
      `${ALGORITHM} Credential=${credentials.accessKeyId}/${scope}, ` +
      `SignedHeaders=${names.join(";")}, Signature=${sig}`;
    return out;
  }

  global.KvsSigV4 = { presignUrl, signRequest, amzDate, uriEncode };
})(typeof window !== "undefined" ? window : globalThis);
