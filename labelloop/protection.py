"""Lexicon masking: the terms a team does not want reviewers to read by default, masked in the text they see.

A lexicon file holds one entry per line; ``#`` starts a comment (whole line or trailing, after whitespace),
blank lines are skipped. An entry is a literal term or phrase, matched case-insensitively as whole words
(``ass`` does not mask ``class``); a line starting with ``re:`` is a regular expression (Python syntax), for
plurals, spellings and obfuscations (``re:f+u+c+k+(ing|ed|er)?``), matched as whole words too. A word ends at
anything but a letter or digit, underscore included, so the term in a handle such as ``@dumb_bitch`` is masked.

Matching reads a folded copy of the text, so that what looks like the term is the term: Unicode compatibility
forms (fullwidth ``ｆｕｃｋ``), accents and combining marks, full case folding (``SCHEISSE`` is ``scheiße``) and
invisible characters inside a word (zero-width spaces, soft hyphens) do not hide it. Entries are folded the same
way (a regular expression only in its non-ASCII characters, so that ``\W`` stays ``\W``); the masked text is
the original with the matched characters replaced. Each entry is
checked on its own when the file loads, so a bad line is reported with its number; an entry that could match
the empty string is refused, because it would match between every two characters.

Masking keeps a length hint and the shape of the text: each word of a match keeps its first character and
the rest of its letters become ``*`` (``fucking`` → ``f******``, ``kill yourself`` → ``k*** y*******``);
spaces and punctuation stay. Reviewers can still tell roughly what was there and read the sentence around it,
without the term itself in front of them; a click on "show original" reveals it (recorded as exposure).

Pure apart from :func:`load_lexicon` reading the file; a lexicon loads once (settings validation) and masking
is one compiled pattern over the text, linear in its length.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LEXICON = Path(__file__).resolve().parent.parent / "label_studio_config" / "lexicon_default.txt"
REGEX_PREFIX = "re:"
#: whole words in any script: no letter or digit (in Unicode) right before or after; an underscore separates words
_BEFORE, _AFTER = r"(?<![^\W_])", r"(?![^\W_])"


class LexiconError(ValueError):
    """A lexicon file that cannot be used; the message names the file and, where one is at fault, the line."""


@dataclass(frozen=True)
class Lexicon:
    entries: tuple[str, ...]
    pattern: re.Pattern[str]
    source: str

    def mask(self, text: str) -> tuple[str, int]:
        return mask(text, self)


def parse_lexicon(content: str, source: str = "<lexicon>") -> Lexicon:
    """A lexicon from the file's text; raises :class:`LexiconError` for a bad line or no entries."""
    literals: list[str] = []
    regexes: list[str] = []
    for number, raw in enumerate(content.splitlines(), start=1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        if line.startswith(REGEX_PREFIX):
            body = line[len(REGEX_PREFIX):].strip()
            if not body:
                raise LexiconError(f"{source}:{number}: empty regular expression after {REGEX_PREFIX!r}")
            body = "".join(ch if ch.isascii() else _fold_char(ch) for ch in body)
        else:
            body = r"\s+".join(re.escape(word) for word in map(_fold_char_by_char, line.split()) if word)
        try:
            re.compile(body)  # alone first: an open "[" must not swallow the word boundary's "]" around it
            compiled = re.compile(f"{_BEFORE}(?:{body}){_AFTER}", re.IGNORECASE)
        except re.error as e:
            raise LexiconError(f"{source}:{number}: not a valid regular expression ({e}): {line!r}") from None
        if compiled.fullmatch("") is not None or re.fullmatch(f"(?:{body})", "", re.IGNORECASE) is not None:
            raise LexiconError(f"{source}:{number}: {line!r} matches the empty string")
        (regexes if line.startswith(REGEX_PREFIX) else literals).append(body)
    if not literals and not regexes:
        raise LexiconError(f"{source}: no terms (only blank lines and comments); list one term per line, "
                           "or set protection.lexicon to none to turn masking off")
    # longest literal first, so that a phrase wins over a word it starts with
    ordered = sorted(dict.fromkeys(literals), key=len, reverse=True) + list(dict.fromkeys(regexes))
    try:
        pattern = re.compile(f"{_BEFORE}(?:{'|'.join(f'(?:{b})' for b in ordered)}){_AFTER}", re.IGNORECASE)
    except re.error as e:  # each entry compiled alone, but together they clash (a group name used twice)
        raise LexiconError(f"{source}: the entries do not combine into one pattern ({e})") from None
    return Lexicon(tuple(ordered), pattern, source)


def load_lexicon(path: Path) -> Lexicon:
    """Read and check a lexicon file (UTF-8)."""
    try:
        content = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LexiconError(f"{path}: lexicon file not found") from None
    except IsADirectoryError:
        raise LexiconError(f"{path}: is a directory, not a lexicon file") from None
    except UnicodeDecodeError as e:
        raise LexiconError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise LexiconError(f"{path}: cannot read the lexicon: {e.strerror or e}") from None
    return parse_lexicon(content, str(path))


def mask(text: str, lexicon: Lexicon) -> tuple[str, int]:
    """``(masked text, number of matches masked)``."""
    folded, origin = _fold(text)
    pieces: list[str] = []
    done = count = 0
    for match in lexicon.pattern.finditer(folded):
        if match.end() == match.start():
            continue
        start, end = max(origin[match.start()], done), origin[match.end() - 1] + 1
        while end < len(text) and unicodedata.combining(text[end]):  # marks on the last letter go with it
            end += 1
        pieces += [text[done:start], _hide(text[start:end])]
        done = end
        count += 1
    pieces.append(text[done:])
    return "".join(pieces), count


def _fold_char(ch: str) -> str:
    """One character as matching sees it: invisible format characters vanish, compatibility forms and accents
    are reduced to the base letters, case is fully folded (``ß`` → ``ss``)."""
    if unicodedata.category(ch) == "Cf":
        return ""
    return "".join(c for c in unicodedata.normalize("NFKD", ch.casefold()) if not unicodedata.combining(c))


def _fold_char_by_char(text: str) -> str:
    return "".join(map(_fold_char, text))


def _fold(text: str) -> tuple[str, list[int]]:
    """The folded text, and for each of its characters the index of the original character it comes from."""
    if text.isascii():
        return text.lower(), list(range(len(text)))
    parts: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text):
        folded = _fold_char(ch)
        parts.append(folded)
        origin.extend([i] * len(folded))
    return "".join(parts), origin


def _hide(span: str) -> str:
    """Each word of a match keeps its first letter as a hint (not a one-letter word, which it would not hide);
    its other letters and digits become ``*``, combining marks go, and separators stay."""
    if not any(ch.isalnum() for ch in span):  # a regex entry that matched only symbols
        return "*" * len(span)
    out: list[str] = []
    word: list[str] = []

    def flush() -> None:
        keep = sum(ch.isalnum() for ch in word) > 1
        for ch in word:
            if ch.isalnum():
                out.append(ch if keep else "*")
                keep = False
            elif not unicodedata.combining(ch):
                out.append(ch)  # an invisible character inside the word
        word.clear()

    for ch in span:
        if ch.isalnum() or unicodedata.combining(ch) or unicodedata.category(ch) == "Cf":
            word.append(ch)
        else:
            flush()
            out.append(ch)
    flush()
    return "".join(out)


def _strip_comment(line: str) -> str:
    """A ``#`` at the start of a line, or after whitespace, starts a comment; ``#`` inside a term (a regex
    such as ``[#]hashtag``) does not."""
    if line.lstrip().startswith("#"):
        return ""
    match = re.search(r"\s#", line)
    return line[:match.start()] if match else line
