"""Taxonomy files (loading, every validation error with its line and field, fingerprints), the Label Studio
configs generated from them (which must never drift apart from the committed XML), hand-edited configs,
and the migration policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from labelloop.data import KNOWN_DATASETS
from labelloop.taxonomy import (
    BUILTIN_DIR,
    TAXONOMIES,
    LabelConfigError,
    Taxonomy,
    TaxonomyError,
    UnknownLabelError,
    check_label_config,
    get_taxonomy,
    label_config_path,
    label_config_xml,
    load_taxonomy,
    migration_map,
    parse_label_config,
    parse_taxonomy,
    project_label_config,
    relabel,
    taxonomy_to_toml,
)


@pytest.mark.parametrize("name", sorted(TAXONOMIES))
def test_committed_label_config_matches_taxonomy(name):
    taxonomy = TAXONOMIES[name]
    path = label_config_path(taxonomy)
    assert path.exists(), f"{path} missing: run `labelloop label-configs`"
    assert path.read_text(encoding="utf-8") == label_config_xml(taxonomy), (
        f"{path} drifted from the taxonomy: run `labelloop label-configs`")
    parsed = parse_label_config(path.read_text(encoding="utf-8"))
    assert parsed.labels == taxonomy.labels


def test_every_shared_dataset_has_a_taxonomy():
    for taxonomy in KNOWN_DATASETS.values():
        assert taxonomy in TAXONOMIES


def test_parse_uses_names_from_the_config_not_hard_coded_ones():
    xml = """<View><Text name="tweet" value="$content"/>
    <Choices name="verdict" toName="tweet"><Choice value="spam"/><Choice value="ham"/></Choices></View>"""
    control = parse_label_config(xml)
    assert (control.from_name, control.to_name, control.value_field) == ("verdict", "tweet", "content")
    assert control.labels == ("spam", "ham")


def test_a_choice_alias_is_the_label_because_label_studio_stores_it_in_results():
    xml = """<View><Text name="text" value="$text"/><Choices name="label" toName="text">
    <Choice value="Spam, scam or phishing" alias="spam"/><Choice value="ham"/></Choices></View>"""
    assert parse_label_config(xml).labels == ("spam", "ham")


@pytest.mark.parametrize("xml", ["<View></View>", "<View><Text name='t' value='$text'/></View>", "not xml <"])
def test_configs_without_choices_are_a_clear_error(xml):
    with pytest.raises(LabelConfigError):
        parse_label_config(xml)


def test_unknown_label_error_names_the_taxonomy():
    with pytest.raises(UnknownLabelError, match="'toxic' is not in taxonomy 'hate_offensive'"):
        get_taxonomy("hate_offensive").index("toxic")
    with pytest.raises(ValueError, match="unknown taxonomy"):
        get_taxonomy("nope")


# ------------------------------------------------------------------------------------------------
# Taxonomy files
# ------------------------------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "taxonomies"

MULTI = """name = "targets"
title = "Targets"
type = "multi"
none_label = "none"

[[labels]]
name = "violence"
description = "Calls for violence"
hotkey = "v"
colour = "#d62728"

[[labels]]
name = "race"
description = "Targets race"
"""


@pytest.mark.parametrize("name", ["hate_offensive", "hate", "offensive", "spam"])
def test_builtins_are_files_loaded_like_any_other(name):
    by_name = get_taxonomy(name)
    by_path = get_taxonomy(str(BUILTIN_DIR / f"{name}.toml"))
    assert by_name == by_path == TAXONOMIES[name]
    assert not by_name.multi and by_name.none_label is None
    assert parse_taxonomy(taxonomy_to_toml(by_name)) == by_name  # the writer and the reader agree


def test_builtins_keep_their_labels_in_order():
    assert get_taxonomy("hate_offensive").labels == ("hate", "offensive", "neither")
    assert get_taxonomy("spam").labels == ("ham", "spam")


def test_a_multi_label_file_loads_with_hotkeys_colours_and_none_label(tmp_path):
    path = tmp_path / "targets.toml"
    path.write_text(MULTI)
    taxonomy = load_taxonomy(path)
    assert taxonomy.multi and taxonomy.labels == ("violence", "race") and taxonomy.none_label == "none"
    assert taxonomy.choices == ("violence", "race", "none")
    assert taxonomy.resolved_hotkeys() == ("v", "1", "2")  # free digits for the ones without
    assert taxonomy.resolved_colours() == ("#d62728", None, None)
    assert taxonomy.hints == ("Calls for violence", "Targets race")


def test_color_is_accepted_as_well_as_colour():
    taxonomy = parse_taxonomy(MULTI.replace("colour =", "color ="))
    assert taxonomy.colours[0] == "#d62728"


@pytest.mark.parametrize("example", ["ethos_targets.toml", "sms_policy.toml"])
def test_the_examples_are_valid_and_round_trip(example):
    taxonomy = load_taxonomy(EXAMPLES / example)
    assert taxonomy.name == example.removesuffix(".toml")
    assert parse_taxonomy(taxonomy_to_toml(taxonomy)) == taxonomy


BAD_FILES = {
    # case: (edit of MULTI, what the problem line must say)
    "duplicate label": (lambda t: t.replace('name = "race"', 'name = "violence"'),
                        "line 13: labels[1].name: duplicate label 'violence' (also labels[0])"),
    "empty name": (lambda t: t.replace('name = "race"', 'name = "  "'), "line 13: labels[1].name: must not be empty"),
    "hotkey clash": (lambda t: t + 'hotkey = "V"\n', "line 15: labels[1].hotkey: hotkey 'V' of 'race' clashes with "
                     "'violence' (labels[0].hotkey)"),
    "hotkey clash with the none label": (
        lambda t: t.replace('none_label = "none"', '[none_label]\nname = "none"\nhotkey = "v"').replace(
            '\n[[labels]]', '\n\n[[labels]]', 1),
        "none_label.hotkey: hotkey 'v' of 'none' clashes with 'violence' (labels[0].hotkey)"),
    "multi with one label": (lambda t: t[:t.rindex("[[labels]]")], "line 6: labels: a multi-label taxonomy needs "
                             "at least two labels"),
    "unknown key": (lambda t: t.replace('title = "Targets"', 'title = "Targets"\nshade = 3'),
                    "line 3: shade: unknown key (allowed: name, title, type, labels, none_label"),
    "unknown label key": (lambda t: t + 'severity = 3\n', "line 15: labels[1].severity: unknown key"),
    "wrong type": (lambda t: t.replace('description = "Targets race"', 'description = 7'),
                   "line 14: labels[1].description: Input should be a valid string"),
    "unknown type": (lambda t: t.replace('type = "multi"', 'type = "both"'), "line 3: type: Input should be"),
    "missing title": (lambda t: t.replace('title = "Targets"\n', ''), "title: required key is missing"),
    "none label on single": (lambda t: t.replace('type = "multi"', 'type = "single"'),
                             "line 4: none_label: a none label is for multi-label taxonomies only"),
    "none label is a label": (lambda t: t.replace('none_label = "none"', 'none_label = "race"'),
                              "line 4: none_label: none label 'race' is also a label (labels[1])"),
    "bad colour": (lambda t: t.replace('#d62728', 'red; background: url(x)'), "line 10: labels[0].colour: "
                   "'red; background: url(x)' is not a colour"),
    "bad hotkey": (lambda t: t.replace('hotkey = "v"', 'hotkey = "a b"'), "line 9: labels[0].hotkey:"),
    "bad name": (lambda t: t.replace('name = "targets"', 'name = "My Targets"'), "line 1: name: 'My Targets' must be"),
    "not toml": (lambda t: t.replace('title = "Targets"', 'title = Targets'), "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_every_validation_error_names_the_field_and_line(case, tmp_path):
    edit, expected = BAD_FILES[case]
    path = tmp_path / "bad.toml"
    path.write_text(edit(MULTI))
    with pytest.raises(TaxonomyError) as e:
        load_taxonomy(path)
    assert any(expected in problem for problem in e.value.problems), e.value.problems
    assert all(problem.startswith(str(path)) for problem in e.value.problems)


def test_all_problems_are_reported_at_once_in_file_order():
    text = MULTI.replace('name = "targets"', 'name = "X"').replace('description = "Targets race"', 'description = 7')
    with pytest.raises(TaxonomyError) as e:
        parse_taxonomy(text, "f.toml")
    assert [p.split(":")[1].strip() for p in e.value.problems] == ["line 1", "line 14"]


def test_an_unknown_name_or_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(TaxonomyError, match="unknown taxonomy.*built-ins: hate, hate_offensive"):
        get_taxonomy(str(tmp_path / "nope.toml"))


def test_fingerprint_follows_meaning_not_presentation():
    base = parse_taxonomy(MULTI)
    assert parse_taxonomy(MULTI.replace("Calls for violence", "Incites violence")
                          .replace('hotkey = "v"', 'hotkey = "x"')).fingerprint == base.fingerprint
    assert parse_taxonomy(MULTI.replace('"race"', '"ethnicity"')).fingerprint != base.fingerprint
    assert parse_taxonomy(MULTI.replace('none_label = "none"\n', '')).fingerprint != base.fingerprint
    single = parse_taxonomy(MULTI.replace('type = "multi"', 'type = "single"').replace('none_label = "none"\n', ''))
    assert single.fingerprint != parse_taxonomy(MULTI.replace('none_label = "none"\n', '')).fingerprint


# ------------------------------------------------------------------------------------------------
# Label Studio configs from files, and hand-edited ones
# ------------------------------------------------------------------------------------------------


def test_single_label_config_is_radio_with_hints_hotkeys_and_colours():
    taxonomy = load_taxonomy(EXAMPLES / "sms_policy.toml")
    xml = label_config_xml(taxonomy)
    assert 'choice="single-radio" required="true"' in xml
    assert 'value="ok" hint="A legitimate message' in xml and 'hotkey="o"' in xml
    assert 'style="border-left: 6px solid #d62728; padding-left: 4px"' in xml
    control = check_label_config(xml, taxonomy)
    assert control.labels == ("ok", "scam") and not control.multiple


def test_multi_label_config_is_multiple_with_the_none_label_as_a_choice():
    taxonomy = parse_taxonomy(MULTI)
    xml = label_config_xml(taxonomy)
    assert 'choice="multiple" required="true"' in xml
    control = check_label_config(xml, taxonomy)
    assert control.labels == ("violence", "race", "none") and control.multiple
    no_none = parse_taxonomy(MULTI.replace('none_label = "none"\n', ''))
    assert 'choice="multiple" showInline' in label_config_xml(no_none)  # an empty answer must be possible


HAND_EDITED = """<View>
  <Text name="post" value="$body"/>
  <Header value="Our own wording"/>
  <Choices name="verdict" toName="post" choice="multiple">
    <Choice value="Race or ethnicity" alias="race" hint="edited"/>
    <Choice value="violence" background="red"/>
    <Choice value="none"/>
  </Choices>
</View>"""


def test_a_hand_edited_config_is_accepted_when_its_choices_match(tmp_path):
    taxonomy = parse_taxonomy(MULTI)
    path = tmp_path / "config.xml"
    path.write_text(HAND_EDITED)
    assert project_label_config(taxonomy, path) == HAND_EDITED


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda x: x.replace('<Choice value="none"/>', ''), r"missing choice\(s\) \['none'\]"),
    (lambda x: x.replace('<Choice value="none"/>', '<Choice value="none"/><Choice value="spam"/>'),
     r"choice\(s\) \['spam'\] not in the taxonomy"),
    (lambda x: x.replace('choice="multiple"', 'choice="single"'), 'must use choice="multiple"'),
])
def test_a_hand_edited_config_that_does_not_match_is_refused(edit, expected, tmp_path):
    path = tmp_path / "config.xml"
    path.write_text(edit(HAND_EDITED))
    with pytest.raises(LabelConfigError, match=expected):
        project_label_config(parse_taxonomy(MULTI), path)


def test_a_single_label_taxonomy_refuses_a_multiple_choice_config():
    xml = label_config_xml(get_taxonomy("spam")).replace('choice="single-radio"', 'choice="multiple"')
    with pytest.raises(LabelConfigError, match="single-label taxonomy"):
        check_label_config(xml, get_taxonomy("spam"))


# ------------------------------------------------------------------------------------------------
# Migration policy
# ------------------------------------------------------------------------------------------------


def test_migration_map_keeps_names_and_applies_the_map():
    old = get_taxonomy("spam")
    new = load_taxonomy(EXAMPLES / "sms_policy.toml")
    mapping = migration_map(old, new, {"ham": "ok", "spam": "scam"})
    assert mapping == {"ham": "ok", "spam": "scam"}
    assert relabel("spam", mapping, new) == "scam"


def test_migration_refuses_an_old_label_without_a_counterpart():
    with pytest.raises(ValueError, match=r"old label\(s\) \['spam'\] have no counterpart.*--label-map"):
        migration_map(get_taxonomy("spam"), load_taxonomy(EXAMPLES / "sms_policy.toml"), {"ham": "ok"})


def test_migration_refuses_a_change_between_single_and_multi_label():
    with pytest.raises(ValueError, match="single-label .* multi-label"):
        migration_map(get_taxonomy("hate"), parse_taxonomy(MULTI), {})


def test_relabel_of_a_label_set_keeps_the_new_order_and_drops_the_none_label():
    old = parse_taxonomy(MULTI)
    new = Taxonomy("t2", "T2", ("ethnicity", "violence"), ("", ""), multi=True, none_label="nothing")
    mapping = migration_map(old, new, {"race": "ethnicity", "none": "nothing"})
    assert relabel(["violence", "race"], mapping, new) == ("ethnicity", "violence")
    assert relabel(("none",), mapping, new) == ()


@pytest.mark.parametrize("new_none", ["nothing", None])
def test_migration_takes_the_none_label_to_the_new_one_or_to_the_empty_set(new_none):
    """"None of these" is the empty set in any multi-label taxonomy: renaming or dropping it needs no map."""
    old = parse_taxonomy(MULTI)
    new = Taxonomy("t2", "T2", ("violence", "race"), ("", ""), multi=True, none_label=new_none)
    mapping = migration_map(old, new, {})
    assert mapping == {"violence": "violence", "race": "race", "none": new_none}
    assert relabel(("race",), mapping, new) == ("race",) and relabel((), mapping, new) == ()


def test_migration_never_turns_the_none_label_into_a_real_label_of_the_same_name():
    old = parse_taxonomy(MULTI)
    new = Taxonomy("t2", "T2", ("violence", "race", "none"), ("", "", ""), multi=True, none_label="nothing")
    assert migration_map(old, new, {})["none"] == "nothing"


@pytest.mark.parametrize("name", ["a|b", "a,b", "a=b", " padded"])
def test_label_names_that_would_break_label_maps_and_lists_are_refused(name):
    with pytest.raises(TaxonomyError, match=r"line 7: labels\[0\].name: .* must not start or end with spaces"):
        parse_taxonomy(MULTI.replace('name = "violence"', f'name = "{name}"'))


@pytest.mark.parametrize("name", ["slur (racial)", "a+b", "x/", "a//b", "q?"])
def test_label_names_mlflow_cannot_log_as_metrics_are_refused_when_the_file_is_checked(name):
    """Training logs ``f1_<label>``; a name MLflow refuses would fail only then, after the eval set froze."""
    with pytest.raises(TaxonomyError, match=r"line 7: labels\[0\].name: .* also names MLflow metrics"):
        parse_taxonomy(MULTI.replace('name = "violence"', f'name = "{name}"'))


@pytest.mark.parametrize("name", ["hate speech", "self-harm/suicide", "häme", "v1.2", "憎悪"])
def test_label_names_mlflow_accepts_load(name):
    from mlflow.utils.validation import _validate_metric_name

    taxonomy = parse_taxonomy(MULTI.replace('name = "violence"', f'name = "{name}"'))
    for label in taxonomy.labels:
        _validate_metric_name(f"f1_{label}")


def test_a_taxonomy_file_saved_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_text(MULTI, encoding="utf-8-sig")
    assert load_taxonomy(path).labels == ("violence", "race")


def test_a_none_label_table_with_a_bad_field_names_only_that_field():
    text = MULTI.replace('none_label = "none"', '[none_label]\nname = "none"\ncolour = 5').replace(
        '\n[[labels]]', '\n\n[[labels]]', 1)
    with pytest.raises(TaxonomyError) as e:
        parse_taxonomy(text)
    assert len(e.value.problems) == 1 and "line 6: none_label.colour: Input should be a valid string" in str(e.value)
