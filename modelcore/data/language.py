"""A small guess of the language of a contributor's text, as a BCP-47 tag, for the datasheet
that ``agora expert datasheet`` writes (docs/data.md, "Generated datasheets").

Pure Python, no model. One text (``guess_language``), in this order:

1. **Code**: when at least half of the non-blank lines look like source code (they end in
   ``;`` ``{`` ``}``, open with a keyword such as ``#include`` or ``def``, are comment
   lines of C or shell, or are mostly punctuation), the text is ``zxx``, ISO 639's "no
   linguistic content": BCP-47 has no tag for a programming language, and the comments
   of code are too few and too formulaic to tag it with their language.
2. **Script**: when most letters are of one non-Latin script, the script's language:
   Cyrillic (``uk`` when its own letters і ї є ґ show, else ``ru``), Greek ``el``, Arabic
   ``ar``, Hebrew ``he``, Devanagari ``hi``, Thai ``th``, Hangul ``ko``, kana ``ja``, Han
   without kana ``zh``.
3. **Stopwords**: for Latin script, the share of words that are among the commonest
   function words of English, German, French, Spanish, Italian, Portuguese, Dutch,
   Swedish and Polish (a word several languages share counts for each by 1/n). The best
   language wins when its words are at least 8 % of all words and it scores at least
   1.25 times the runner-up.

Anything else, or fewer than ``MIN_WORDS`` words, is ``und`` (undetermined). Limits: other
languages of these scripts come out as ``und`` or as their nearest listed neighbour
(Catalan as Spanish or French, Norwegian and Danish as Swedish, Persian as Arabic,
Serbian Cyrillic as Russian); a text that mixes languages gets its majority's tag; code
with long prose comments may pass as prose. ``guess_languages`` tags a collection by the
bytes of each document's guess, so a datasheet can list more than one language.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["LanguageGuess", "guess_language", "guess_languages"]

CODE = "zxx"  # ISO 639-2: no linguistic content
UNDETERMINED = "und"
MIN_WORDS = 8
# Each document is judged on its first characters: enough for a stable guess, and a
# 100 MB corpus costs seconds, not minutes.
MAX_CHARS = 20_000
CODE_LINE_SHARE = 0.5
MIN_STOPWORD_SHARE = 0.08
MIN_MARGIN = 1.25

_STOPWORDS_TEXT = {
    "en": "the and of to in is that it for was on are as with be by this have from or not "
    "but which an at they you his her were has been their will would there what can if its "
    "one all we when so than these also into who a",
    "de": "der die und den das nicht ist zu ich sich mit auf des dem ein eine einer es von im "
    "auch wird werden sind für an als nach wie aber oder bei noch wenn nur über wir hat durch "
    "kann diese dass sie um zum zur man schon war",
    "fr": "le la les de des et est un une du que qui dans pour pas sur au aux avec ce cette il "
    "elle ne se sont par plus ou mais nous vous leur été être comme son sa ses même tout "
    "aussi très où était ont peut sans entre",
    "es": "el la los las de y que en un una es por con para del al se no lo como más pero sus "
    "su le ya o este esta ha sí porque muy sin sobre también me hasta hay donde quien desde "
    "todo nos durante todos uno ni contra ese eso fue son está",
    "it": "il di che la e è un una per non in del della dei delle con si da al alla le gli lo "
    "sono come ma anche più ha questo questa nel nella ci mi se o ne era tutto quando già "
    "molto perché essere stato suo sua loro",
    "pt": "o a os as de do da dos das e que em um uma é não para com por no na nos se mais "
    "como mas ao foi ele ela seu sua são também pelo pela já ou está muito há isso quando "
    "entre depois sem mesmo nas aos ser tem",
    "nl": "de het een en van is dat op te in zijn niet voor met die er aan ook als bij maar om "
    "door wordt worden naar dan uit nog wat kan over hij zij we ze deze dit wel heeft tot al "
    "meer hun geen was waren omdat",
    "sv": "och att det som en på är av för med till den har de inte om ett var jag vi han hon "
    "men från kan så eller vid efter också när detta mycket sina sig under utan skulle där "
    "här",
    "pl": "i w z na się nie do to że jest o jak po a co od za przez dla tak jego jej ale czy "
    "już tylko może są być było ten ta które który która przy oraz lub jako także bardzo",
}
# One-letter words (a, e, o, y, i, w, z) are left out: initials in lists of names match them.
_STOPWORDS = {
    lang: frozenset(w for w in words.split() if len(w) > 1)
    for lang, words in _STOPWORDS_TEXT.items()
}
# A word in n lists counts 1/n for each.
_WEIGHT: dict[str, dict[str, float]] = {}
for _lang, _words in _STOPWORDS.items():
    for _w in _words:
        _WEIGHT.setdefault(_w, {})[_lang] = 0.0
for _w, _langs in _WEIGHT.items():
    for _lang in _langs:
        _langs[_lang] = 1.0 / len(_langs)

# (first, last) code points of a script -> its name; letters outside these are Latin or other.
_SCRIPTS = (
    (0x0370, 0x03FF, "greek"),
    (0x0400, 0x052F, "cyrillic"),
    (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"),
    (0x0750, 0x077F, "arabic"),
    (0x0900, 0x097F, "devanagari"),
    (0x0E00, 0x0E7F, "thai"),
    (0x1100, 0x11FF, "hangul"),
    (0x3040, 0x30FF, "kana"),
    (0x3130, 0x318F, "hangul"),
    (0x3400, 0x4DBF, "han"),
    (0x4E00, 0x9FFF, "han"),
    (0xAC00, 0xD7AF, "hangul"),
)
_SCRIPT_TAG = {
    "greek": "el",
    "hebrew": "he",
    "arabic": "ar",
    "devanagari": "hi",
    "thai": "th",
    "hangul": "ko",
}
_UKRAINIAN = frozenset("іїєґІЇЄҐ")

# A word: a whitespace-separated token of letters (an inner apostrophe allowed) once the
# punctuation around it is stripped; "man3/queue.3" or "x_1" are no words.
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")
_AROUND = "\"'“”„«»‘’()[]{}<>.,;:!?¡¿*_-–—/"
_CODE_START = re.compile(
    r"(#\s*(include|define|if|ifdef|ifndef|endif|else|elif|undef|pragma|error)\b"
    r"|//|/\*|\*/|>>>|\$ |@\w"
    r"|(def|class|import|from|return|static|extern|typedef|struct|enum|union|const|void|int|"
    r"char|unsigned|long|double|float|bool|public|private|function|var|let|package|fn|"
    r"using|namespace|template|elif|else|for|while|if|try|except|raise|yield)\b.*[:;{(=]"
    r"|[A-Za-z_][\w.\[\]]*\s*[-+*/|&]?=\s)"
)
# "/*" opening a C comment, not a path's "dir/*".
_COMMENT_OPEN = re.compile(r"(?:^|[\s;){])/\*")
_CODE_END = ("{", "}", ";", "*/", "\\", "(", "[", "=", "&&", "||", "):")
_SYMBOLS = frozenset("{}[]()<>=;*&|/\\#_+-:,.\"'`$%^~!?@")


@dataclass(frozen=True)
class LanguageGuess:
    """A guess and what it rests on: ``tag`` is a BCP-47 tag, ``zxx`` or ``und``."""

    tag: str
    reason: str  # "code", "script", "stopwords", or why undetermined
    words: int = 0
    code_line_share: float = 0.0
    scores: dict[str, float] = field(default_factory=dict)  # stopword share per language


def _code_lines(lines: list[str]) -> list[bool]:
    """Which lines look like source code; lines inside a ``/* ... */`` comment do."""
    out: list[bool] = []
    in_comment = False
    for line in lines:
        text = line.strip()
        opener = _COMMENT_OPEN.search(text)
        out.append(in_comment or opener is not None or _looks_like_code(text))
        if opener is not None:  # still open at the end of the line?
            in_comment = "*/" not in text[opener.end() :]
        elif in_comment:
            in_comment = "*/" not in text
    return out


def _looks_like_code(text: str) -> bool:
    if _CODE_START.match(text) or text.endswith(_CODE_END):
        return True
    visible = [c for c in text if not c.isspace()]
    symbols = sum(1 for c in visible if c in _SYMBOLS)
    return len(visible) > 0 and symbols / len(visible) > 0.3


def _script_of(ch: str) -> str | None:
    code = ord(ch)
    for first, last, name in _SCRIPTS:
        if first <= code <= last:
            return name
    return None


def _script_guess(letters: Counter[str], text: str) -> str | None:
    total = sum(letters.values())
    if total == 0:
        return None
    name, count = letters.most_common(1)[0]
    if name == "latin" or count / total < 0.5:
        return None
    if name in ("han", "kana"):
        return "ja" if letters["kana"] >= 0.1 * (letters["kana"] + letters["han"]) else "zh"
    if name == "cyrillic":
        return "uk" if sum(1 for c in text if c in _UKRAINIAN) >= 0.005 * count else "ru"
    return _SCRIPT_TAG[name]


def guess_language(text: str) -> LanguageGuess:
    """The language of ``text`` (its first ``MAX_CHARS`` characters); module docstring."""
    text = text[:MAX_CHARS]
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return LanguageGuess(UNDETERMINED, "no text")
    code_lines = _code_lines(lines)
    code_share = sum(code_lines) / len(lines)
    if code_share >= CODE_LINE_SHARE:
        return LanguageGuess(CODE, "code", code_line_share=code_share)
    prose = "\n".join(line for line, is_code in zip(lines, code_lines, strict=True) if not is_code)
    letters: Counter[str] = Counter()
    for ch in prose:
        if ch.isalpha():
            letters[_script_of(ch) or "latin"] += 1
    by_script = _script_guess(letters, prose)
    if by_script is not None:
        return LanguageGuess(by_script, "script", code_line_share=code_share)
    words = [w.lower() for w in (t.strip(_AROUND) for t in prose.split()) if _WORD.fullmatch(w)]
    if len(words) < MIN_WORDS:
        return LanguageGuess(
            UNDETERMINED, f"{len(words)} words", words=len(words), code_line_share=code_share
        )
    totals: Counter[str] = Counter()
    for w in words:
        for lang, weight in _WEIGHT.get(w, {}).items():
            totals[lang] += weight
    scores = {lang: totals[lang] / len(words) for lang in _STOPWORDS}
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    (best, top), (_, second) = ranked[0], ranked[1]
    if top < MIN_STOPWORD_SHARE or top < MIN_MARGIN * second:
        return LanguageGuess(UNDETERMINED, "no clear stopwords", len(words), code_share, scores)
    return LanguageGuess(best, "stopwords", len(words), code_share, scores)


def guess_languages(
    texts: Iterable[str], *, min_share: float = 0.2, max_tags: int = 5
) -> list[tuple[str, float]]:
    """A collection's languages: each text's guess weighted by its UTF-8 bytes, the tags
    with at least ``min_share`` of the bytes (largest first, at most ``max_tags``);
    ``und`` only when nothing else qualifies. Returns (tag, share) pairs."""
    weight: Counter[str] = Counter()
    for text in texts:
        weight[guess_language(text).tag] += len(text.encode("utf-8"))
    total = sum(weight.values())
    if total == 0:
        return [(UNDETERMINED, 1.0)]
    ranked = [(tag, n / total) for tag, n in weight.most_common()]
    chosen = [(t, s) for t, s in ranked if s >= min_share and t != UNDETERMINED][:max_tags]
    return chosen or [(UNDETERMINED, weight[UNDETERMINED] / total or 1.0)]
