// Export a session client-side from GET /v1/sessions/{id}/messages, as JSON or Markdown.

export function toMarkdown(history) {
  const lines = [`# ${history.session.title}`, "", `_Exported ${new Date().toISOString()} · session ${history.session.id}_`, ""];
  for (const m of history.messages) {
    if (m.role === "user") {
      lines.push("## You", "");
      if (m.attachment_ids?.length) lines.push(`_Attachments: ${m.attachment_ids.join(", ")}_`, "");
      lines.push(m.text || "_(no text)_", "");
    } else {
      const meta = [m.skill, m.status !== "completed" ? m.status : null].filter(Boolean).join(" · ");
      lines.push(`## Assistant${meta ? ` (${meta})` : ""}`, "", m.text || "_(no reply)_", "");
    }
  }
  return lines.join("\n");
}

function slug(title) {
  return (title || "chat").toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 60) || "chat";
}

export async function downloadExport(api, sessionId, format) {
  const history = await api(`/v1/sessions/${encodeURIComponent(sessionId)}/messages`);
  const body = format === "md" ? toMarkdown(history) : JSON.stringify(history, null, 2);
  const type = format === "md" ? "text/markdown" : "application/json";
  const url = URL.createObjectURL(new Blob([body], { type: `${type};charset=utf-8` }));
  const a = Object.assign(document.createElement("a"), { href: url, download: `${slug(history.session.title)}.${format}` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
