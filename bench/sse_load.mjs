// A lean SSE load client for bench/fanout.py: many raw TCP streams, one Node process.
//
//   node bench/sse_load.mjs '{"host":"127.0.0.1","port":8000,"path":"/api/channels/b/events",
//                             "n":5000,"wave":100,"timeout_s":60}'
//
// Only Node's built-in `net`. Each stream sends `GET <path> HTTP/1.1` (Host, Accept:
// text/event-stream), reads the status line, then decodes the body (chunked or not) and
// parses just enough SSE: blocks split on a blank line, `event:` and `data:` fields,
// comments skipped. An event named `message` (or unnamed) whose data is JSON (or a JSON
// string holding JSON, as some baselines send) with a number `t` and a `phase` counts as a
// delivery, with latency = now - t. `now` is process.hrtime.bigint(): CLOCK_MONOTONIC, the
// clock of Python's time.monotonic() on Linux, so it compares with the publisher's `t`.
//
// Streams connect in waves of `wave` (each wave waits for its response heads) so the
// server's accept queue is never overrun. Then the process prints one JSON line
// {"type":"connected",...} and answers commands read from stdin, one a line, with one
// JSON line each on stdout:
//
//   stats         {"type":"stats", statuses, connected, failed, ended, phases: {phase:
//                 {count, first, last}}, other_events, bad_events}  (first/last: monotonic s)
//   hist PHASE    {"type":"hist", phase, buckets: [[latency_ms, count], ...]} (sparse:
//                 10 us wide below 100 ms, 1 ms wide above, 120 s cap)
//   events        {"type":"events", events: [[seq, t, [latency_us, ...]], ...], gc: [[start,
//                 ms], ...]}: every delivery of the `latency` phase by event (its `seq` and
//                 publish time `t`), to tell a slow event from a slow stream; and this
//                 process's garbage-collection pauses of 1 ms or more (start: monotonic s),
//                 to tell a slow server from a client that paused
//   close         closes every stream, answers {"type":"closed"} and exits
//
// Nothing per event is allocated beyond the parse (and, in the `latency` phase, one number
// per delivery for `events`), and nothing is printed per event.

import net from "node:net";
import { PerformanceObserver, performance } from "node:perf_hooks";
import readline from "node:readline";

const opts = JSON.parse(process.argv[2] ?? "{}");
const HOST = opts.host ?? "127.0.0.1";
const PORT = opts.port;
const PATH = opts.path;
const N = opts.n ?? 100;
const WAVE = opts.wave ?? 100;
const TIMEOUT_MS = (opts.timeout_s ?? 60) * 1000;

const now = () => Number(process.hrtime.bigint()) / 1e9;
const READ_BUFFER = Buffer.alloc(256 * 1024);

// Latency histogram: 10 us buckets below 100 ms, 1 ms buckets to 120 s (the last catches all).
const FINE = 10_000;
const BUCKETS = FINE + 120_000;
function bucketOf(seconds) {
  if (seconds < 0) seconds = 0;
  if (seconds < 0.1) return Math.floor(seconds * 1e5);
  return Math.min(BUCKETS - 1, FINE + Math.floor((seconds - 0.1) * 1e3));
}
function bucketMs(index) {
  // the middle of the bucket, in ms
  if (index < FINE) return (index + 0.5) / 100;
  return 100 + (index - FINE) + 0.5;
}

const phases = new Map(); // phase -> {hist, count, first, last}
function record(phase, latency, at) {
  let p = phases.get(phase);
  if (p === undefined) {
    p = { hist: new Uint32Array(BUCKETS), count: 0, first: at, last: at };
    phases.set(phase, p);
  }
  p.hist[bucketOf(latency)]++;
  p.count++;
  p.last = at;
}

const perEvent = new Map(); // seq -> [t, latencies in us], the latency phase only
function recordEvent(seq, t, latency) {
  let entry = perEvent.get(seq);
  if (entry === undefined) {
    entry = [t, []];
    perEvent.set(seq, entry);
  }
  entry[1].push(Math.round(latency * 1e6));
}

const gcPauses = []; // [start (monotonic s), duration ms]: V8's pauses of 1 ms or more
new PerformanceObserver((list) => {
  const at = now();
  const perfNow = performance.now(); // entries' startTime is on this clock (ms)
  for (const entry of list.getEntries()) {
    if (entry.duration >= 1) gcPauses.push([at - (perfNow - entry.startTime) / 1000, entry.duration]);
  }
}).observe({ entryTypes: ["gc"] });

const statuses = {};
let connected = 0; // streams that answered 200
let failed = 0; // connect errors and timeouts before a response head
let ended = 0; // 200 streams closed by the server (or reset) before `close`
let otherEvents = 0; // hello, named events other than message
let badEvents = 0; // message events without a usable JSON {t, phase}
let closing = false;
const sockets = new Set();

function handleBlock(block, at) {
  let event = "message";
  let data = null;
  let start = 0;
  while (start <= block.length) {
    let end = block.indexOf("\n", start);
    if (end === -1) end = block.length;
    const line = block.slice(start, end);
    start = end + 1;
    if (line.length === 0 || line.charCodeAt(0) === 58 /* : */) continue;
    const colon = line.indexOf(":");
    const name = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.charCodeAt(0) === 32) value = value.slice(1);
    if (name === "data") data = data === null ? value : `${data}\n${value}`;
    else if (name === "event") event = value;
  }
  if (data === null) return; // a comment (heartbeat) or a retry hint
  if (event !== "message") {
    otherEvents++;
    return;
  }
  try {
    let body = JSON.parse(data);
    if (typeof body === "string") body = JSON.parse(body);
    if (typeof body.t !== "number") throw new Error("no t");
    record(String(body.phase), at - body.t, at);
    if (body.phase === "latency" && typeof body.seq === "number") recordEvent(body.seq, body.t, at - body.t);
  } catch {
    badEvents++;
  }
}

class Stream {
  constructor(resolve) {
    this.resolve = resolve; // called once the response head arrived (or the attempt failed)
    this.head = null; // Buffer of the head so far, until it is complete
    this.status = 0;
    this.chunked = false;
    this.state = 0; // chunked: 0 size line, 1 data, 2 the CRLF after data
    this.sizeLine = "";
    this.remaining = 0;
    this.text = ""; // decoded body not yet split into SSE blocks
    // `onread`: reads land in one shared buffer, handed over without the stream machinery
    // (no per-read Buffer, no 'data' event); each read is consumed before the next.
    this.socket = net.connect({
      host: HOST,
      port: PORT,
      onread: { buffer: READ_BUFFER, callback: (size, buf) => this.onData(buf.subarray(0, size)) },
    });
    this.socket.setNoDelay(true);
    this.timer = setTimeout(() => this.fail(), TIMEOUT_MS);
    this.socket.on("connect", () => {
      this.socket.write(
        `GET ${PATH} HTTP/1.1\r\nHost: ${HOST}:${PORT}\r\nAccept: text/event-stream\r\n` +
          "Cache-Control: no-cache\r\n\r\n",
      );
    });
    this.socket.on("error", () => {}); // 'close' follows
    this.socket.on("close", () => {
      sockets.delete(this.socket);
      if (this.status === 0) this.fail();
      else if (this.status === 200 && !closing) ended++;
    });
    sockets.add(this.socket);
  }

  fail() {
    if (this.resolve === null) return;
    failed++;
    this.done();
    this.socket.destroy();
  }

  done() {
    clearTimeout(this.timer);
    const resolve = this.resolve;
    this.resolve = null;
    resolve?.();
  }

  onData(buf) {
    const at = now();
    if (this.status === 0) {
      // a copy: `buf` is the shared read buffer
      this.head = this.head === null ? Buffer.from(buf) : Buffer.concat([this.head, buf]);
      const end = this.head.indexOf("\r\n\r\n");
      if (end === -1) return;
      const head = this.head.toString("latin1", 0, end);
      const rest = this.head.subarray(end + 4);
      this.head = null;
      this.status = Number.parseInt(head.slice(9, 12), 10) || -1;
      statuses[this.status] = (statuses[this.status] ?? 0) + 1;
      this.chunked = /\r\ntransfer-encoding:\s*chunked/i.test(head);
      if (this.status !== 200) {
        this.done();
        this.socket.destroy();
        return;
      }
      connected++;
      this.done();
      if (rest.length) this.onBody(rest, at);
      return;
    }
    this.onBody(buf, at);
  }

  onBody(buf, at) {
    if (!this.chunked) {
      this.onText(buf.toString("latin1"), at);
      return;
    }
    let pos = 0;
    while (pos < buf.length) {
      if (this.state === 0) {
        const lf = buf.indexOf(10, pos);
        if (lf === -1) {
          this.sizeLine += buf.toString("latin1", pos);
          return;
        }
        this.sizeLine += buf.toString("latin1", pos, lf);
        pos = lf + 1;
        this.remaining = Number.parseInt(this.sizeLine, 16); // stops at ';' or '\r'
        this.sizeLine = "";
        if (this.remaining === 0) return; // the last chunk: the server ends the stream
        this.state = 1;
      } else if (this.state === 1) {
        const take = Math.min(this.remaining, buf.length - pos);
        this.onText(buf.toString("latin1", pos, pos + take), at);
        pos += take;
        this.remaining -= take;
        if (this.remaining === 0) {
          this.state = 2;
          this.remaining = 2;
        }
      } else {
        const take = Math.min(this.remaining, buf.length - pos);
        pos += take;
        this.remaining -= take;
        if (this.remaining === 0) this.state = 0;
      }
    }
  }

  onText(piece, at) {
    let text = this.text + piece;
    if (text.indexOf("\r") !== -1) text = text.replace(/\r\n/g, "\n");
    let sep = text.indexOf("\n\n");
    while (sep !== -1) {
      handleBlock(text.slice(0, sep), at);
      text = text.slice(sep + 2);
      sep = text.indexOf("\n\n");
    }
    this.text = text;
  }
}

function emit(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

function stats() {
  const out = {};
  for (const [name, p] of phases) out[name] = { count: p.count, first: p.first, last: p.last };
  return {
    type: "stats",
    pid: process.pid,
    at: now(),
    statuses,
    connected,
    failed,
    ended,
    open: sockets.size,
    phases: out,
    other_events: otherEvents,
    bad_events: badEvents,
  };
}

function hist(phase) {
  const buckets = [];
  const p = phases.get(phase);
  if (p !== undefined) {
    for (let i = 0; i < BUCKETS; i++) if (p.hist[i]) buckets.push([bucketMs(i), p.hist[i]]);
  }
  return { type: "hist", phase, buckets };
}

function events() {
  return {
    type: "events",
    events: [...perEvent].map(([seq, [t, lat]]) => [seq, t, lat]),
    gc: gcPauses,
  };
}

async function main() {
  const started = now();
  for (let opened = 0; opened < N; opened += WAVE) {
    const wave = [];
    for (let i = 0; i < Math.min(WAVE, N - opened); i++) {
      wave.push(new Promise((resolve) => new Stream(resolve)));
    }
    await Promise.all(wave);
  }
  emit({ ...stats(), type: "connected", connect_s: now() - started });
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const [cmd, arg] = line.trim().split(/\s+/);
    if (cmd === "stats") emit(stats());
    else if (cmd === "hist") emit(hist(arg));
    else if (cmd === "events") emit(events());
    else if (cmd === "close") break;
  }
  closing = true;
  for (const socket of sockets) socket.destroy();
  emit({ type: "closed" });
  process.exit(0);
}

main();
