// A generic app for the agent (agent_app_type generic): Node.js with only
// its standard http module, listening on 127.0.0.1:$PORT as the agent asks.
// /ws is a WebSocket echo (RFC 6455, text and binary messages, ping, close),
// written on the http module's "upgrade" event.
"use strict";
const crypto = require("crypto");
const http = require("http");

const port = Number(process.env.PORT);
if (!port) {
  console.error("PORT is not set: the agent gives each worker its port");
  process.exit(2);
}

const held = [];   // memory kept on purpose by /grow (to show agent_memory_limit)

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://localhost");
  if (url.pathname === "/echo") {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      res.writeHead(200, {
        "Content-Type": "application/octet-stream",
        "Content-Length": body.length,
        "X-Method": req.method,
        "X-Seen-Content-Type": req.headers["content-type"] || "",
      });
      res.end(body);
    });
    return;
  }
  if (url.pathname === "/chunked") {
    // No Content-Length: Node sends Transfer-Encoding: chunked.
    res.writeHead(200, { "Content-Type": "text/plain" });
    const parts = Number(url.searchParams.get("parts") || 5);
    let i = 0;
    const next = () => {
      if (i === parts) {
        res.end();
        return;
      }
      res.write(`part ${i++}\n`);
      setTimeout(next, 5);
    };
    next();
    return;
  }
  if (url.pathname === "/grow") {
    const mb = Number(url.searchParams.get("mb") || 50);
    const block = Buffer.alloc(mb * 1024 * 1024, 1);
    held.push(block);
    res.writeHead(200, { "Content-Type": "text/plain" });
    res.end(`holding ${held.length * mb} MB\n`);
    return;
  }
  if (url.pathname === "/sleep") {
    const ms = Number(url.searchParams.get("ms") || 100);
    setTimeout(() => {
      res.writeHead(200, { "Content-Type": "text/plain", "X-Pid": process.pid });
      res.end(`slept ${ms} ms\n`);
    }, ms);
    return;
  }
  if (url.pathname === "/headers") {
    res.writeHead(200, { "Content-Type": "application/json" });
    res.end(JSON.stringify({ method: req.method, url: req.url, headers: req.headers }));
    return;
  }
  res.writeHead(200, { "Content-Type": "text/plain", "X-Pid": process.pid });
  res.end(`hello from node, pid ${process.pid}\n`);
});

const WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

function wsFrame(opcode, payload) {
  const n = payload.length;
  const head = n < 126 ? Buffer.from([0x80 | opcode, n])
    : n < 65536 ? Buffer.from([0x80 | opcode, 126, n >> 8, n & 255])
      : Buffer.concat([Buffer.from([0x80 | opcode, 127]), (() => {
        const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(n)); return b;
      })()]);
  return Buffer.concat([head, payload]);
}

// Takes the client's (masked) frames off buf; returns what is left.
function wsFrames(buf, socket) {
  while (buf.length >= 2) {
    const opcode = buf[0] & 15;
    let n = buf[1] & 127;
    let at = 2;
    if (n === 126) {
      if (buf.length < 4) break;
      n = buf.readUInt16BE(2); at = 4;
    } else if (n === 127) {
      if (buf.length < 10) break;
      n = Number(buf.readBigUInt64BE(2)); at = 10;
    }
    if (buf.length < at + 4 + n) break;
    const mask = buf.subarray(at, at + 4);
    const payload = Buffer.from(buf.subarray(at + 4, at + 4 + n));
    for (let i = 0; i < n; i++) payload[i] ^= mask[i % 4];
    buf = buf.subarray(at + 4 + n);
    if (opcode === 8) {           // close: answered with the same code, then the end
      socket.end(wsFrame(8, payload.subarray(0, 2)));
      return Buffer.alloc(0);
    }
    if (opcode === 9) socket.write(wsFrame(10, payload));
    else if (opcode === 1 || opcode === 2) socket.write(wsFrame(opcode, payload));
  }
  return buf;
}

server.on("upgrade", (req, socket, head) => {
  const key = req.headers["sec-websocket-key"];
  if (new URL(req.url, "http://localhost").pathname !== "/ws" || !key
      || (req.headers.upgrade || "").toLowerCase() !== "websocket") {
    socket.end("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    return;
  }
  const accept = crypto.createHash("sha1").update(key + WS_GUID).digest("base64");
  socket.write("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               + `Sec-WebSocket-Accept: ${accept}\r\nX-Pid: ${process.pid}\r\n\r\n`);
  let pending = Buffer.from(head);
  pending = wsFrames(pending, socket);
  socket.on("data", (data) => { pending = wsFrames(Buffer.concat([pending, data]), socket); });
  socket.on("error", () => socket.destroy());
});

server.listen(port, "127.0.0.1", () => {
  console.log(`listening on 127.0.0.1:${port}`);
});

process.on("SIGTERM", () => {
  server.close(() => process.exit(0));
});
