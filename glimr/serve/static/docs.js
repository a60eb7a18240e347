// The API's operations, read from /openapi.json (a local page: no CDN).
"use strict";
window.addEventListener("DOMContentLoaded", async () => {
  const box = document.getElementById("ops");
  const spec = await (await fetch("/openapi.json")).json();
  box.innerHTML = "";
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const sec = document.createElement("section");
      const h = document.createElement("h3");
      h.textContent = `${method.toUpperCase()} ${path}`;
      const p = document.createElement("p");
      p.textContent = op.summary || "";
      const pre = document.createElement("pre");
      const params = (op.parameters || []).map((x) => `${x.in} ${x.name}${x.required ? " (required)" : ""}: ${x.description || ""}`);
      const body = op.requestBody ? Object.keys(op.requestBody.content).join(", ") : "";
      pre.textContent = [...params, body ? `body: ${body}` : "", `answers: ${Object.keys(op.responses).join(", ")}`].filter(Boolean).join("\n");
      sec.append(h, p, pre);
      box.appendChild(sec);
    }
  }
});
