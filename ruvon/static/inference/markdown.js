// A small, safe Markdown subset for the chat's replies. The text is HTML-escaped first, so nothing a model
// writes can become markup; only then do fenced code, `code`, **bold**, *italic*, headings and lists become
// tags. Links and images are left as text on purpose (no javascript: URLs, no requests to other hosts).
"use strict";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const FENCE = /^\s*```\s*([\w+#.-]*)\s*$/;

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// One line of escaped text: code spans are set aside first so their content is never styled.
function renderInline(escaped) {
  const spans = [];
  let html = escaped.replace(/`([^`]+)`/g, (_, code) => `\u0000${spans.push(code) - 1}\u0000`);
  html = html.replace(/\*\*(?=\S)([^*]*?\S)\*\*/g, "<strong>$1</strong>");
  html = html.replace(/(^|[^*\w])\*(?=\S)([^*]*?\S)\*(?![*\w])/g, "$1<em>$2</em>");
  return html.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${spans[Number(i)]}</code>`);
}

// Escaped text without fences: paragraphs (single newlines kept as <br>), headings, bullet and numbered lists.
function renderBlocks(lines) {
  const out = [];
  let paragraph = [];
  let list = null;
  const flush = () => {
    if (paragraph.length) out.push(`<p>${paragraph.map(renderInline).join("<br>")}</p>`);
    paragraph = [];
  };
  const closeList = () => {
    if (list) out.push(`</${list}>`);
    list = null;
  };
  for (const line of lines) {
    const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
    const numbered = bullet ? null : /^\s*\d+[.)]\s+(.*)$/.exec(line);
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    if (bullet || numbered) {
      flush();
      const kind = bullet ? "ul" : "ol";
      if (list !== kind) { closeList(); out.push(`<${kind}>`); list = kind; }
      out.push(`<li>${renderInline((bullet || numbered)[1])}</li>`);
      continue;
    }
    closeList();
    if (heading) { flush(); out.push(`<h4>${renderInline(heading[2])}</h4>`); }
    else if (!line.trim()) flush();
    else paragraph.push(line);
  }
  flush();
  closeList();
  return out.join("");
}

// Return the HTML of `text`; an unclosed fence (a reply still streaming) runs to the end as code.
function renderMarkdown(text) {
  const out = [];
  let prose = [];
  let code = null; // {lang, lines} inside a fence
  for (const line of escapeHtml(text.replace(/\u0000/g, "")).split("\n")) {
    const fence = FENCE.exec(line);
    if (fence && code) {
      out.push(codeBlock(code));
      code = null;
    } else if (fence) {
      out.push(renderBlocks(prose));
      prose = [];
      code = { lang: fence[1], lines: [] };
    } else if (code) code.lines.push(line);
    else prose.push(line);
  }
  out.push(code ? codeBlock(code) : renderBlocks(prose));
  return out.join("");
}

function codeBlock(code) {
  const lang = code.lang ? ` data-lang="${code.lang}"` : "";
  return `<pre><code${lang}>${code.lines.join("\n")}</code></pre>`;
}
