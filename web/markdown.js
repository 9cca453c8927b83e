// A small Markdown renderer that builds DOM nodes directly. Model output is untrusted: it is never
// parsed as HTML (no innerHTML anywhere), every piece of text goes in through text nodes, and links
// are kept only for http(s)/mailto URLs. So there is nothing to sanitize afterwards: raw HTML in the
// reply shows up as literal text, and a `javascript:` link shows up as its label with no href.
//
// Supported: fenced code blocks (with a language, highlighted; an unclosed fence while streaming is
// shown as code), ATX headings, paragraphs, hard line breaks, block quotes, ordered and unordered
// lists (nested by indentation), GFM tables, horizontal rules, `code`, **strong**, *em*, ~~del~~,
// [links](url), <autolinks> and bare URLs. Images become links (no remote image loads).

import { highlight } from "./highlight.js";

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

export function safeUrl(raw) {
  const href = raw.trim().replace(/^<|>$/g, "");
  if (/^[\s\u0000-\u001f]*(javascript|data|vbscript|file):/i.test(href)) return null;
  try {
    const url = new URL(href, location.href);
    return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

function h(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const c of children) node.append(c);
  return node;
}

// ------------------------------------------------------------------ blocks

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const HR = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const LIST = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;

export function renderMarkdown(text) {
  const frag = document.createDocumentFragment();
  renderBlocks(text.replace(/\r\n?/g, "\n").split("\n"), frag);
  return frag;
}

function renderBlocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i++; continue; }
    let m;
    if ((m = line.match(FENCE))) {
      const fence = m[1];
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence)) body.push(lines[i++]);
      const closed = i < lines.length;
      i++;
      parent.append(codeBlock(body.join("\n"), m[2], closed));
      continue;
    }
    if ((m = line.match(HEADING))) {
      parent.append(h(`h${Math.min(6, m[1].length + 2)}`, "md-h", ...inline(m[2])));
      i++;
      continue;
    }
    if (HR.test(line)) { parent.append(h("hr")); i++; continue; }
    if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (m = lines[i].match(QUOTE))) { body.push(m[1]); i++; }
      const q = h("blockquote");
      renderBlocks(body, q);
      parent.append(q);
      continue;
    }
    if (LIST.test(line)) { i = renderList(lines, i, parent); continue; }
    if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      i = renderTable(lines, i, parent);
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() && !startsBlock(lines, i)) para.push(lines[i++]);
    if (!para.length) para.push(lines[i++]);
    parent.append(h("p", null, ...inline(para.join("\n"))));
  }
}

function startsBlock(lines, i) {
  const l = lines[i];
  return FENCE.test(l) || HEADING.test(l) || HR.test(l) || QUOTE.test(l) || LIST.test(l);
}

function renderList(lines, i, parent) {
  const first = lines[i].match(LIST);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const list = h(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) list.start = parseInt(first[2], 10);
  while (i < lines.length) {
    const m = lines[i].match(LIST);
    if (!m || m[1].length < indent) break;
    if (m[1].length === indent && /\d/.test(m[2]) !== ordered) break; // the other kind of list starts
    if (m[1].length > indent) { // nested list belongs to the previous item
      const host = list.lastElementChild || list.appendChild(h("li"));
      i = renderList(lines, i, host);
      continue;
    }
    const item = [m[3]];
    i++;
    // continuation lines: indented non-list text
    while (i < lines.length && lines[i].trim() && !LIST.test(lines[i]) && /^\s{2,}/.test(lines[i])) {
      item.push(lines[i].trim());
      i++;
    }
    let task = null;
    let content = item.join("\n");
    const t = content.match(/^\[([ xX])\]\s+/);
    if (t) {
      task = Object.assign(document.createElement("input"), { type: "checkbox", checked: t[1] !== " ", disabled: true });
      content = content.slice(t[0].length);
    }
    const li = h("li", null, ...(task ? [task, " "] : []), ...inline(content));
    list.append(li);
    if (i < lines.length && !lines[i].trim() && i + 1 < lines.length && LIST.test(lines[i + 1])) i++; // loose list
  }
  parent.append(list);
  return i;
}

function splitRow(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

function renderTable(lines, i, parent) {
  const head = splitRow(lines[i]);
  const aligns = splitRow(lines[i + 1]).map((c) =>
    c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : "");
  i += 2;
  const table = h("table");
  const row = (cells, tag) => h("tr", null, ...head.map((_, k) => {
    const cell = h(tag, null, ...inline(cells[k] ?? ""));
    if (aligns[k]) cell.style.textAlign = aligns[k];
    return cell;
  }));
  table.append(h("thead", null, row(head, "th")));
  const body = h("tbody");
  while (i < lines.length && lines[i].includes("|") && lines[i].trim()) body.append(row(splitRow(lines[i++]), "td"));
  table.append(body);
  parent.append(h("div", "md-table", table));
  return i;
}

function codeBlock(code, lang, closed) {
  const pre = h("pre", "md-code");
  const codeEl = h("code", lang ? `lang-${lang.toLowerCase().replace(/[^a-z0-9+#-]/g, "")}` : null);
  codeEl.append(highlight(code, lang));
  const bar = h("div", "code-bar", h("span", "code-lang", lang || "code"));
  const copy = h("button", "copy", "Copy");
  copy.type = "button";
  copy.setAttribute("aria-label", `Copy ${lang || "code"} to the clipboard`);
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(code);
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  bar.append(copy);
  pre.append(codeEl);
  const wrap = h("div", "code-wrap", bar, pre);
  if (!closed) wrap.dataset.open = "true";
  return wrap;
}

// ------------------------------------------------------------------ inline

// One alternation, tried left to right; the first group that matched decides the token.
const INLINE = new RegExp(
  [
    "(`+)([\\s\\S]*?[^`])\\1(?!`)", // 1,2 code span
    "!?\\[((?:[^\\[\\]]|\\[[^\\]]*\\])*)\\]\\(\\s*(<[^>]*>|[^\\s()]*(?:\\([^\\s()]*\\)[^\\s()]*)*)(?:\\s+\"[^\"]*\")?\\s*\\)", // 3,4 link
    "<((?:https?|mailto):[^\\s<>]+)>", // 5 autolink
    "((?:https?://|www\\.)[^\\s<>()]+(?:\\([^\\s<>()]*\\)[^\\s<>()]*)*)", // 6 bare url
    "(\\*\\*|__)(?=\\S)([\\s\\S]*?\\S)\\7", // 7,8 strong
    "(\\*|_)(?=[^\\s*_])([\\s\\S]*?[^\\s*_])\\9(?![\\w])", // 9,10 em
    "~~(?=\\S)([\\s\\S]*?\\S)~~", // 11 del
    "\\\\([\\\\`*_{}\\[\\]()#+\\-.!|~<>])", // 12 escape
    "( {2,}|\\\\)\\n", // 13 hard break
  ].join("|"),
  "g",
);

export function inline(text) {
  const out = [];
  let last = 0;
  const re = new RegExp(INLINE.source, "g"); // its own lastIndex: inline() recurses for **, * and ~~
  let m;
  while ((m = re.exec(text))) {
    // `_`/`__` emphasis only at word boundaries (snake_case and obj.__dunder__ stay as they are)
    const under = m[9] === "_" ? 1 : m[7] === "__" ? 2 : 0;
    if (under && ((m.index > 0 && /[\w.]/.test(text[m.index - 1])) || /\w/.test(text[re.lastIndex] || ""))) {
      re.lastIndex = m.index + under;
      continue;
    }
    if (m.index > last) out.push(...textWithBreaks(text.slice(last, m.index)));
    last = re.lastIndex;
    if (m[1]) out.push(h("code", "md-inline", m[2].replace(/^ (.*) $/, "$1")));
    else if (m[3] !== undefined) out.push(link(m[3], m[4], m[0].startsWith("!")));
    else if (m[5]) out.push(anchor(m[5], [m[5]]));
    else if (m[6]) {
      let url = m[6];
      const trail = url.match(/[.,;:!?'"]+$/);
      if (trail) { url = url.slice(0, -trail[0].length); last -= trail[0].length; re.lastIndex = last; }
      out.push(anchor(url.startsWith("www.") ? `https://${url}` : url, [url]));
    } else if (m[7]) out.push(h("strong", null, ...inline(m[8])));
    else if (m[9]) out.push(h("em", null, ...inline(m[10])));
    else if (m[11]) out.push(h("del", null, ...inline(m[11])));
    else if (m[12]) out.push(m[12]);
    else if (m[13]) out.push(h("br"));
    if (m[0].length === 0) re.lastIndex++;
  }
  if (last < text.length) out.push(...textWithBreaks(text.slice(last)));
  return out;
}

function textWithBreaks(s) {
  // Soft line breaks inside a paragraph are kept (chat replies rely on them).
  const parts = s.split("\n");
  const out = [];
  parts.forEach((p, k) => {
    if (k) out.push(h("br"));
    if (p) out.push(document.createTextNode(p));
  });
  return out;
}

function link(label, rawHref, isImage) {
  const children = isImage ? [`image: ${label || rawHref}`] : inline(label);
  return anchor(rawHref, children);
}

function anchor(rawHref, children) {
  const href = safeUrl(rawHref);
  if (!href) return h("span", "md-unsafe-link", ...children); // the label only: never a live link
  const a = h("a", null, ...children);
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  return a;
}
