"""The model's label list and the Label Studio configs must never drift apart."""

from __future__ import annotations

import pytest

from labelloop.data import KNOWN_DATASETS
from labelloop.taxonomy import (
    TAXONOMIES,
    LabelConfigError,
    UnknownLabelError,
    get_taxonomy,
    label_config_path,
    label_config_xml,
    parse_label_config,
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
