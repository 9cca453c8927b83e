// A small syntax highlighter: one tokenizer (comments, strings, numbers, keywords, calls) with
// keyword sets per language family. It returns a DocumentFragment of text nodes and spans; the code
// text only ever goes into text nodes.

const KEYWORDS = {
  js: "async await break case catch class const continue debugger default delete do else export extends false finally for from function if import in instanceof let new null of return static super switch this throw true try typeof undefined var void while yield interface type enum implements private public protected readonly as",
  py: "and as assert async await break class continue def del elif else except False finally for from global if import in is lambda None nonlocal not or pass raise return self True try while with yield match case print",
  sh: "if then else elif fi for while do done case esac in function return export local echo exit set unset source cd sudo",
  c: "auto bool break case char class const constexpr continue default delete do double else enum extern false float for friend goto if inline int long namespace new nullptr operator private protected public return short signed sizeof static struct switch template this throw true try typedef typename union unsigned using virtual void volatile while include define",
  rust: "as async await break const continue crate dyn else enum extern false fn for if impl in let loop match mod move mut pub ref return self Self static struct super trait true type unsafe use where while Some None Ok Err",
  go: "break case chan const continue default defer else fallthrough for func go goto if import interface map package range return select struct switch type var nil true false",
  java: "abstract boolean break byte case catch char class const continue default do double else enum extends final finally float for if implements import instanceof int interface long new null package private protected public return short static super switch this throw throws true false try void while var val fun",
  sql: "select from where and or not insert into values update set delete create table drop alter index join left right inner outer on group by order having limit offset as distinct null is in like between union all primary key references",
  json: "true false null",
};
const ALIASES = {
  javascript: "js", jsx: "js", ts: "js", typescript: "js", tsx: "js", mjs: "js", node: "js",
  python: "py", python3: "py", py3: "py",
  bash: "sh", shell: "sh", zsh: "sh", console: "sh", shellscript: "sh",
  "c++": "c", cpp: "c", h: "c", hpp: "c", cs: "c", csharp: "c", "c#": "c",
  rs: "rust", golang: "go", kotlin: "java", kt: "java", scala: "java", swift: "java",
  postgres: "sql", sqlite: "sql", mysql: "sql",
};
const HASH_COMMENTS = new Set(["py", "sh"]);
const sets = new Map();

function keywordSet(lang) {
  if (!sets.has(lang)) {
    const words = (KEYWORDS[lang] || "").split(" ").filter(Boolean);
    sets.set(lang, new Set(lang === "sql" ? words.flatMap((w) => [w, w.toUpperCase()]) : words));
  }
  return sets.get(lang);
}

export function highlight(code, rawLang) {
  const frag = document.createDocumentFragment();
  const key = (rawLang || "").toLowerCase();
  const lang = KEYWORDS[key] ? key : ALIASES[key];
  if (!lang || code.length > 100_000) {
    frag.append(code);
    return frag;
  }
  const kw = keywordSet(lang);
  const comment = HASH_COMMENTS.has(lang) ? "#[^\\n]*" : lang === "sql" ? "--[^\\n]*" : "\\/\\/[^\\n]*|\\/\\*[\\s\\S]*?(?:\\*\\/|$)";
  const re = new RegExp(
    `(${comment})|("""[\\s\\S]*?(?:"""|$)|'''[\\s\\S]*?(?:'''|$)|"(?:[^"\\\\\\n]|\\\\.)*"?|'(?:[^'\\\\\\n]|\\\\.)*'?|\`(?:[^\`\\\\]|\\\\.)*\`?)` +
      "|(\\b(?:0x[\\da-fA-F_]+|\\d[\\d_]*(?:\\.\\d+)?(?:[eE][+-]?\\d+)?)\\b)|([A-Za-z_$][\\w$]*)(\\s*\\()?",
    "g",
  );
  let last = 0;
  let m;
  const span = (cls, text) => {
    const s = document.createElement("span");
    s.className = cls;
    s.textContent = text;
    return s;
  };
  while ((m = re.exec(code))) {
    if (m.index > last) frag.append(code.slice(last, m.index));
    last = re.lastIndex;
    if (m[1]) frag.append(span("hl-c", m[1]));
    else if (m[2]) frag.append(span("hl-s", m[2]));
    else if (m[3]) frag.append(span("hl-n", m[3]));
    else if (m[4]) {
      if (kw.has(m[4])) frag.append(span("hl-k", m[4]));
      else if (m[5]) frag.append(span("hl-f", m[4]));
      else frag.append(m[4]);
      if (m[5]) frag.append(m[5]);
    }
    if (m[0].length === 0) re.lastIndex++;
  }
  if (last < code.length) frag.append(code.slice(last));
  return frag;
}
