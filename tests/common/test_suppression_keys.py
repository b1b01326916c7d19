"""Which Redis suppression sets an email is checked against, by class and topic (libs/common/suppressions.py)."""

from __future__ import annotations

import pytest

from libs.common.message_classes import MessageClass
from libs.common.suppressions import (
    is_topic,
    suppression_key,
    suppression_key_for_every_class,
    suppression_key_for_topic,
    suppression_keys_for,
)


def test_bulk_mail_of_a_topic_checks_the_tenants_set_and_the_topics():
    assert suppression_keys_for("ns", "acme", MessageClass.BULK, "weekly-deals") == [
        suppression_key("ns", "acme"), suppression_key_for_topic("ns", "acme", "weekly-deals")]


def test_bulk_mail_of_no_topic_checks_only_the_tenants_set():
    assert suppression_keys_for("ns", "acme", MessageClass.BULK) == [suppression_key("ns", "acme")]


@pytest.mark.parametrize("message_class", [MessageClass.OTP, MessageClass.TRANSACTIONAL])
def test_otp_and_transactional_mail_never_check_a_topics_set(message_class: MessageClass):
    assert suppression_keys_for("ns", "acme", message_class, "weekly-deals") == [
        suppression_key_for_every_class("ns", "acme")]


def test_a_topics_key_is_the_same_whatever_the_topics_case():
    assert suppression_key_for_topic("ns", "acme", " Weekly-Deals ") == suppression_key_for_topic(
        "ns", "acme", "weekly-deals")


def test_topic_keys_of_different_topics_differ_from_each_other_and_from_the_tenants_sets():
    keys = {suppression_key_for_topic("ns", "acme", "a"), suppression_key_for_topic("ns", "acme", "b"),
            suppression_key("ns", "acme"), suppression_key_for_every_class("ns", "acme")}

    assert len(keys) == 4


@pytest.mark.parametrize("topic", ["weekly-deals", "product.updates", "news_2024", "a", "0" * 64])
def test_a_topic_is_lower_case_letters_digits_dots_underscores_and_dashes(topic: str):
    assert is_topic(topic)


@pytest.mark.parametrize("topic", ["", "Weekly", "-deals", "deals~x", "a@b", "a:b", "a/b", "a b", "0" * 65])
def test_anything_else_is_not_a_topic(topic: str):
    assert not is_topic(topic)
