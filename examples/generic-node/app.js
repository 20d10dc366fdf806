// A generic app for the agent (agent_app_type generic): Node.js with only
// its standard http module, listening on 127.0.0.1:$PORT as the agent asks.
"use strict";
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

server.listen(port, "127.0.0.1", () => {
  console.log(`listening on 127.0.0.1:${port}`);
});

process.on("SIGTERM", () => {
  server.close(() => process.exit(0));
});
