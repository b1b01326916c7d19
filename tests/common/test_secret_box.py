"""Secrets sealed at rest (libs.common.secret_box): envelope AES-GCM, bound to a context, rotatable KEKs, and
errors that never quote key material."""

from __future__ import annotations

import base64
import hashlib

import pytest

from libs.common.secret_box import KEY_BYTES, SecretBox, SecretUnreadable, generate_key_setting, optional_secret_box
from libs.common.settings import CommonSettings, load_settings

CONTEXT = "router.provider_credentials/ses-eu"


def test_a_sealed_value_opens_with_its_context() -> None:
    box = SecretBox.from_setting(generate_key_setting())

    sealed = box.seal(b"api-key-123", context=CONTEXT)

    assert box.open(sealed, context=CONTEXT) == b"api-key-123"
    assert b"api-key-123" not in sealed


def test_each_seal_is_different_even_for_the_same_value() -> None:
    box = SecretBox.from_setting(generate_key_setting())

    assert box.seal(b"same", context=CONTEXT) != box.seal(b"same", context=CONTEXT)


def test_the_empty_value_round_trips() -> None:
    box = SecretBox.from_setting(generate_key_setting())

    assert box.open(box.seal(b"", context=CONTEXT), context=CONTEXT) == b""


def test_a_value_moved_to_another_context_does_not_open() -> None:
    box = SecretBox.from_setting(generate_key_setting())
    sealed = box.seal(b"secret", context=CONTEXT)

    with pytest.raises(SecretUnreadable):
        box.open(sealed, context="router.provider_credentials/ses-us")


def test_another_key_does_not_open_it() -> None:
    sealed = SecretBox.from_setting(generate_key_setting("k1")).seal(b"secret", context=CONTEXT)

    with pytest.raises(SecretUnreadable):
        SecretBox.from_setting(generate_key_setting("k1")).open(sealed, context=CONTEXT)
    with pytest.raises(SecretUnreadable):
        SecretBox.from_setting(generate_key_setting("k2")).open(sealed, context=CONTEXT)


@pytest.mark.parametrize("position", [0, 1, 2, 5, 20, 70, 90, -1])
def test_any_changed_byte_is_refused(position: int) -> None:
    box = SecretBox.from_setting(generate_key_setting())
    sealed = bytearray(box.seal(b"secret value", context=CONTEXT))
    sealed[position] ^= 0x01

    with pytest.raises(SecretUnreadable):
        box.open(bytes(sealed), context=CONTEXT)


@pytest.mark.parametrize("sealed", [b"", b"\x01", b"\x02\x02k1", b"\x01\x05k1", b"\x01\x02k1" + b"\x00" * 30])
def test_malformed_values_are_unreadable(sealed: bytes) -> None:
    with pytest.raises(SecretUnreadable):
        SecretBox.from_setting(generate_key_setting()).open(sealed, context=CONTEXT)


def test_rotation_the_first_key_seals_and_every_key_opens() -> None:
    old, new = generate_key_setting("old"), generate_key_setting("new")
    sealed_before = SecretBox.from_setting(old).seal(b"before", context=CONTEXT)

    rotated = SecretBox.from_setting(f"{new},{old}")
    sealed_after = rotated.seal(b"after", context=CONTEXT)

    assert rotated.active_key_id == "new"
    assert rotated.key_ids == ("new", "old")
    assert rotated.open(sealed_before, context=CONTEXT) == b"before"
    assert rotated.needs_reseal(sealed_before) and not rotated.needs_reseal(sealed_after)
    assert rotated.sealed_key_id(sealed_before) == "old"
    with pytest.raises(SecretUnreadable):
        SecretBox.from_setting(old).open(sealed_after, context=CONTEXT)


def test_url_safe_and_unpadded_keys_are_accepted() -> None:
    key = bytes(range(KEY_BYTES))
    standard = SecretBox.from_setting("a:" + base64.b64encode(key).decode())
    url_safe = SecretBox.from_setting(" a:" + base64.urlsafe_b64encode(key).decode().rstrip("=") + " ")

    assert url_safe.open(standard.seal(b"x", context=CONTEXT), context=CONTEXT) == b"x"


@pytest.mark.parametrize(("setting", "problem"), [
    ("", "no key given"),
    (" , ", "no key given"),
    ("k1", "entry 1: expected <key id>:<base64 key>"),
    ("bad id:" + base64.b64encode(b"\x00" * 32).decode(), "entry 1: expected"),
    ("k1:c2hvcnQ=", "entry 1 (key id k1): the key must be 32 bytes"),
    ("k1:not*base64", "entry 1 (key id k1): the key must be 32 bytes"),
])
def test_a_bad_setting_names_the_problem(setting: str, problem: str) -> None:
    with pytest.raises(ValueError, match="^" + problem.replace("(", r"\(").replace(")", r"\)")):
        SecretBox.from_setting(setting)


def test_a_bad_setting_never_quotes_key_material() -> None:
    good = generate_key_setting("k1")
    short_key = base64.b64encode(b"0123456789abcdef").decode()
    with pytest.raises(ValueError) as refused:
        SecretBox.from_setting(f"{good},k2:{short_key},{good}")

    message = str(refused.value)
    assert "entry 2" in message and "entry 3: key id k1 appears twice" in message
    assert good.partition(":")[2] not in message and short_key not in message


def test_the_setting_is_read_from_esp_secrets_keys_and_kept_out_of_repr() -> None:
    setting = generate_key_setting()
    settings = load_settings(CommonSettings, {"ESP_SECRETS_KEYS": setting})

    assert settings.secrets_keys == setting
    assert setting.partition(":")[2] not in repr(settings)
    assert setting.partition(":")[2] not in repr(SecretBox.from_setting(setting))


def test_generated_settings_are_fresh_and_well_formed() -> None:
    first, second = generate_key_setting("dev"), generate_key_setting("dev")

    assert first != second and first.startswith("dev:")
    with pytest.raises(ValueError):
        generate_key_setting("no spaces")


def test_an_empty_setting_is_no_box_and_a_bad_one_names_the_variable() -> None:
    assert optional_secret_box("") is None and optional_secret_box("  ") is None
    assert isinstance(optional_secret_box(generate_key_setting()), SecretBox)
    with pytest.raises(ValueError, match=r"^ESP_SECRETS_KEYS: entry 1"):
        optional_secret_box("k1:c2hvcnQ=")


def test_a_fingerprint_is_stable_for_equal_data_and_keyed() -> None:
    setting = generate_key_setting("fp")
    box, same_key = SecretBox.from_setting(setting), SecretBox.from_setting(setting)

    fingerprint = box.fingerprint(b"password=hunter2", context=CONTEXT)

    assert fingerprint == same_key.fingerprint(b"password=hunter2", context=CONTEXT)
    assert same_key.fingerprint_matches(fingerprint, b"password=hunter2", context=CONTEXT)
    assert not box.fingerprint_matches(fingerprint, b"password=hunter3", context=CONTEXT)
    assert not box.fingerprint_matches(fingerprint, b"password=hunter2", context="router.providers.create/other")
    assert hashlib.sha256(b"password=hunter2").digest() not in fingerprint
    another = SecretBox.from_setting(generate_key_setting("fp"))  # same id, other key: cannot tell, so "no"
    assert not another.fingerprint_matches(fingerprint, b"password=hunter2", context=CONTEXT)


def test_a_fingerprint_verifies_after_a_rotation_while_its_key_is_listed() -> None:
    old, new = generate_key_setting("old"), generate_key_setting("new")
    before = SecretBox.from_setting(old).fingerprint(b"request", context=CONTEXT)

    rotated = SecretBox.from_setting(f"{new},{old}")

    assert rotated.fingerprint_matches(before, b"request", context=CONTEXT)
    assert rotated.fingerprint(b"request", context=CONTEXT) != before  # new ones are made with the active key
    assert not SecretBox.from_setting(new).fingerprint_matches(before, b"request", context=CONTEXT)


@pytest.mark.parametrize("fingerprint", [b"", b"\x01", b"\x01\x02k1", b"\x00" * 32, b"\x01\x02fp" + b"\x00" * 32])
def test_a_malformed_or_unkeyed_fingerprint_never_matches(fingerprint: bytes) -> None:
    box = SecretBox.from_setting(generate_key_setting("fp"))

    assert not box.fingerprint_matches(fingerprint, b"request", context=CONTEXT)
