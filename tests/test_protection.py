"""Lexicon masking and the policy sections: what reviewers see, and bad lexicon files or policies refused clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from labelloop.config import Settings
from labelloop.policy import Escalation, Protection, ReviewPolicy, Severity, read_marks, severe_reason
from labelloop.protection import DEFAULT_LEXICON, LexiconError, load_lexicon, mask, parse_lexicon


def lexicon(*lines: str):
    return parse_lexicon("\n".join(lines), "test")


def test_whole_words_case_insensitive_with_a_length_hint() -> None:
    lx = lexicon("ass", "damn")
    assert mask("Kick ASS, damn it", lx) == ("Kick A**, d*** it", 2)
    assert mask("a class assessment, passing", lx) == ("a class assessment, passing", 0)


def test_punctuation_stays_and_phrases_match_across_spacing() -> None:
    lx = lexicon("kill yourself")
    assert mask("just KILL   yourself!!! (kill yourself)", lx) == ("just K***   y*******!!! (k*** y*******)", 2)
    assert mask("killyourself", lx) == ("killyourself", 0)


def test_unicode_words_and_boundaries() -> None:
    lx = lexicon("scheiße", "идиот")
    assert mask("Du SCHEIẞE? ты идиот.", lx)[1] == 1 + 1
    assert mask("идиоты", lx) == ("идиоты", 0)  # a longer word is another word
    assert mask("scheiße", lx) == ("s******", 1)


def test_regex_entries_plurals_and_obfuscations_and_longest_literal_first() -> None:
    lx = lexicon("re:f+u+c+k+(ing)?", "bad", "bad word  # trailing comment")
    assert mask("fuuuck FUCKING fuckers", lx) == ("f***** F****** fuckers", 2)
    assert mask("a bad word", lx) == ("a b** w***", 1)


def test_what_looks_like_the_term_is_masked_as_the_term() -> None:
    """Handles and hashtags join words with underscores; fullwidth forms, zero-width characters, soft hyphens,
    decomposed accents and full case folding only change how the term is encoded, not what a reviewer reads."""
    lx = lexicon("bitch", "fuck", "scheiße", "café")
    assert mask("@Dat_Bitch_Jay #fuck_you", lx) == ("@Dat_B****_Jay #f***_you", 2)
    assert mask("ｆｕｃｋ off", lx) == ("ｆ*** off", 1)
    assert mask("f\u200bu\u00adck", lx) == ("f\u200b*\u00ad**", 1)
    assert mask("SCHEISSE", lx) == ("S*******", 1)
    assert mask("cafe\u0301!", lx) == ("c***!", 1)  # NFD: the accent goes with its letter
    assert mask("bitchy classic cafés", lx) == ("bitchy classic cafés", 0)  # still whole words only


def test_entries_that_cannot_share_one_pattern_are_refused() -> None:
    with pytest.raises(LexiconError, match="do not combine"):
        lexicon("re:(?P<x>a)b", "re:(?P<x>c)d")


def test_one_character_words_are_fully_hidden() -> None:
    assert mask("a x b", lexicon("x")) == ("a * b", 1)


def test_default_lexicon_loads_and_masks_davidson_style_text() -> None:
    lx = load_lexicon(DEFAULT_LEXICON)
    masked, n = mask("RT @user: these hoes ain't loyal &amp; that bitch is a shit", lx)
    assert n == 3
    assert "hoes" not in masked and "bitch" not in masked and "h***" in masked and "b****" in masked


@pytest.mark.parametrize(("content", "message"), [
    ("", "no terms"),
    ("# only comments\n\n   \n", "no terms"),
    ("ok\nre:(unclosed\n", ":2: not a valid regular expression"),
    ("ok\nre:[unclosed\n", ":2: not a valid regular expression"),
    ("re:\n", ":1: empty regular expression"),
    ("fine\nre:a*\n", ":2: 're:a*' matches the empty string"),
])
def test_bad_lexicon_files_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "lexicon.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LexiconError, match=message.replace("*", r"\*").replace("(", r"\(")):
        load_lexicon(path)


def test_unreadable_lexicon_files(tmp_path: Path) -> None:
    with pytest.raises(LexiconError, match="not found"):
        load_lexicon(tmp_path / "missing.txt")
    with pytest.raises(LexiconError, match="directory"):
        load_lexicon(tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("schei\xdfe\n".encode("latin-1"))
    with pytest.raises(LexiconError, match="not UTF-8"):
        load_lexicon(latin1)


def test_a_bad_lexicon_fails_when_settings_load_naming_the_field(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValidationError) as info:
        Settings(protection={"lexicon": str(empty)})
    assert info.value.errors()[0]["loc"] == ("protection", "lexicon")
    assert Settings(protection={"lexicon": None}).protection.lexicon is None


def test_cli_reports_a_bad_lexicon_as_one_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("re:[oops\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "labelloop.cli", "escalations"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LABELLOOP_STATE_DIR": str(tmp_path),
                               "LABELLOOP_PROTECTION": f'{{"lexicon": "{bad}"}}'}, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: invalid setting protection.lexicon=")
    assert "bad.txt:1: not a valid regular expression" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_policy_sections_name_the_field_at_fault() -> None:
    with pytest.raises(ValidationError, match="severe_from 'extreme' is not one of the levels"):
        Severity(severe_from="extreme")
    with pytest.raises(ValidationError, match="levels repeat"):
        Severity(levels=("low", "high", "low"), severe_from="high")
    with pytest.raises(ValidationError, match="missing: \\['critical'\\]"):
        Severity(weights={"low": 1, "medium": 2, "high": 3})
    with pytest.raises(ValidationError, match="blur_threshold"):
        Protection(blur_threshold=1.5)
    with pytest.raises(ValidationError, match="daily_severe_cap"):
        Protection(daily_severe_cap=0)
    with pytest.raises(ValidationError, match="reasons repeat"):
        Escalation(reasons=("threat", "threat"))
    with pytest.raises(ValueError, match="severe_labels \\['hat'\\] are not taxonomy labels"):
        ReviewPolicy(severity=Severity(severe_labels=("hat",))).check(["hate", "offensive", "neither"])


def item(from_name: str, value: dict) -> dict:
    return {"id": from_name[:4], "from_name": from_name, "to_name": "text", "type": "choices", "value": value}


def test_read_marks_from_choices_and_textarea_controls() -> None:
    policy = ReviewPolicy()
    result = [item("label", {"choices": ["hate"]}), item("severity", {"choices": ["critical"]}),
              item("escalate", {"choices": ["Escalate"]}), item("escalation_reason", {"text": ["  threat  "]}),
              item("reveal", {"choices": ["show original"]})]
    marks = read_marks(result, policy, labelled=True)
    assert (marks.severity, marks.escalated, marks.reason, marks.revealed, marks.problems) == (
        "critical", True, "threat", True, ())


def test_read_marks_problems_keep_the_rest() -> None:
    marks = read_marks([item("severity", {"choices": ["catastrophic"]}), item("escalate", {"choices": ["yes"]})],
                       ReviewPolicy(), labelled=True)
    assert marks.severity is None and not marks.escalated
    assert [p.split(":")[0] for p in marks.problems] == ["severity", "escalation"]
    free = read_marks([item("escalate", {"choices": ["yes"]})],
                      ReviewPolicy(escalation=Escalation(require_reason=False)))
    assert free.escalated and free.reason is None and free.problems == ()
    required = ReviewPolicy(severity=Severity(required=True))
    assert read_marks([], required, labelled=True).problems[0].startswith("severity: none given")
    assert read_marks([], required, labelled=False).problems == ()


def test_severity_weights_and_severe_items() -> None:
    scale = Severity(severe_labels=("hate",))
    assert [scale.weight(level) for level in (None, "low", "critical", "unknown")] == [1.0, 1.0, 4.0, 1.0]
    protection = Protection(lexicon=None, blur_threshold=0.8)
    assert severe_reason(scale, protection, severity="high", label="neither") == "severity high"
    assert severe_reason(scale, protection, severity="medium", label="neither") is None
    assert severe_reason(scale, protection, severity=None, label="hate") == "label hate"
    assert severe_reason(scale, protection, severity=None, label=("offensive", "hate")) == "label hate"
    assert severe_reason(scale, protection, severity=None, label=None, predicted_label="hate",
                         predicted_probability=0.85) == "predicted hate (0.85)"
    assert severe_reason(scale, protection, severity=None, label=None, predicted_label="hate",
                         predicted_probability=0.7) is None
