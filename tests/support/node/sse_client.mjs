// A real EventSource client (the `eventsource` npm package) for the container tests.
//
//   node sse_client.mjs URL
//
// Writes one JSON line per happening to stdout, with a monotonic time in ms:
//   {"kind":"open","t":..,"instance":"<X-Coordinator-Instance>","lastEventId":"..","url":".."}
//   {"kind":"event","t":..,"id":"..","event":"..","data":".."}
//   {"kind":"error","t":..,"message":".."}
// and reconnects as any browser does (with Last-Event-ID) until it is killed.
import { EventSource } from "eventsource";

const url = process.argv[2];
const now = () => Number(process.hrtime.bigint() / 1000000n);
const say = (record) => process.stdout.write(JSON.stringify({ t: now(), ...record }) + "\n");

const source = new EventSource(url, {
  fetch: async (input, init) => {
    const headers = new Headers(init?.headers);
    const response = await fetch(input, init);
    say({
      kind: "open",
      status: response.status,
      url: response.url,
      redirected: response.redirected,
      instance: response.headers.get("x-coordinator-instance"),
      lastEventId: headers.get("last-event-id"),
    });
    return response;
  },
});
for (const type of ["message", "leader", "state", "tick"]) {
  source.addEventListener(type, (e) => say({ kind: "event", id: e.lastEventId, event: type, data: e.data }));
}
source.onerror = (e) => say({ kind: "error", message: String(e?.message ?? e?.code ?? "error") });
process.on("SIGTERM", () => { source.close(); process.exit(0); });
