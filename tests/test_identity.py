"""The agent id against the values Go's github.com/google/uuid gives (PROTOCOL section 6)."""

from __future__ import annotations

import logging
import stat
import uuid
from pathlib import Path

import pytest

from elkeid_agent.health import Health
from elkeid_agent.identity import (
    ID_FILE_UNIT,
    derive_agent_id,
    load_agent_id,
    parse_go_uuid,
    save_agent_id,
    uuid5_oid,
)

WORK_DIR = Path("/etc/elkeid")
INSTANCE_ID = "var/lib/cloud/data/instance-id"
PRODUCT_UUID = "sys/class/dmi/id/product_uuid"
PRODUCT_NAME = "sys/class/dmi/id/product_name"
ETH0 = "sys/class/net/eth0/address"
MACHINE_ID = "etc/machine-id"
SAVED_ID = "etc/elkeid/machine-id"

GOOD_NAME = "Standard PC (Q35 + ICH9, 2009)\n"
HW_ROW_1 = {
    INSTANCE_ID: "i-0123456789abcdef0\n",
    PRODUCT_UUID: "ec2a3b1c-7d2e-4f10-9a8b-0c1d2e3f4a5b\n",
    ETH0: "0a:1b:2c:3d:4e:5f\n",
    PRODUCT_NAME: GOOD_NAME,
}
HW_ROW_2 = {
    PRODUCT_UUID: "ec2a3b1c-7d2e-4f10-9a8b-0c1d2e3f4a5b\n",
    ETH0: "52:54:00:12:34:56\n",
    PRODUCT_NAME: GOOD_NAME,
}
ID_ROW_2 = "2bd90582-836e-5371-8024-0375da7f247e"
HEX_MACHINE_ID = "3f1a9c2e8b7d4e6fa1b2c3d4e5f60718"
DASHED_MACHINE_ID = "3f1a9c2e-8b7d-4e6f-a1b2-c3d4e5f60718"
SAVED = "0b8c2f5e-3c1a-4d7e-9f00-112233445566"


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (HW_ROW_1, "aa944ff6-c4f9-5758-8044-9a3dd1d0924c"),
        (HW_ROW_2, ID_ROW_2),
        ({MACHINE_ID: HEX_MACHINE_ID + "\n"}, DASHED_MACHINE_ID),
        (
            {MACHINE_ID: "not-a-hex-machine-id-but-32chars\n"},
            "e5fc5841-11b5-52ae-93ad-7944e1abf53e",
        ),
    ],
    ids=["instance+uuid+mac", "uuid+mac", "machine-id-hex", "machine-id-not-hex"],
)
def test_protocol_fixture_rows(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    assert derive_agent_id(make_tree(tmp_path, files), WORK_DIR, {}) == expected


def test_env_id_wins_over_everything(tmp_path: Path) -> None:
    root = make_tree(tmp_path, HW_ROW_1)
    env = {"SPECIFIED_AGENT_ID": "fixture-agent", "specified_id": "other"}
    assert derive_agent_id(root, WORK_DIR, env) == "fixture-agent"
    assert derive_agent_id(root, WORK_DIR, {"specified_id": "ctl-id"}) == "ctl-id"


def test_empty_env_id_counts_as_unset(tmp_path: Path) -> None:
    root = make_tree(tmp_path, HW_ROW_2)
    env = {"SPECIFIED_AGENT_ID": "", "specified_id": ""}
    assert derive_agent_id(root, WORK_DIR, env) == ID_ROW_2


def test_source_file_shorter_than_6_raw_bytes_is_ignored(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {**HW_ROW_2, INSTANCE_ID: "i-12\n"})  # 5 bytes
    assert derive_agent_id(root, WORK_DIR, {}) == ID_ROW_2


def test_unreadable_source_file_is_ignored(tmp_path: Path) -> None:
    root = make_tree(tmp_path, HW_ROW_2)
    (root / INSTANCE_ID).mkdir(parents=True)  # exists but reading it fails
    assert derive_agent_id(root, WORK_DIR, {}) == ID_ROW_2


def test_source_of_8_bytes_falls_through_and_9_bytes_is_used(tmp_path: Path) -> None:
    eight = make_tree(
        tmp_path / "eight",
        {INSTANCE_ID: "abcdefgh\n", PRODUCT_NAME: GOOD_NAME, MACHINE_ID: HEX_MACHINE_ID},
    )
    assert derive_agent_id(eight, WORK_DIR, {}) == DASHED_MACHINE_ID
    nine = make_tree(
        tmp_path / "nine",
        {INSTANCE_ID: "abcdefghi\n", PRODUCT_NAME: GOOD_NAME, MACHINE_ID: HEX_MACHINE_ID},
    )
    assert derive_agent_id(nine, WORK_DIR, {}) == str(uuid.uuid5(uuid.NAMESPACE_OID, "abcdefghi"))


@pytest.mark.parametrize(
    "bad_uuid",
    ["03000200-0400-0500-0006-000700080009", "02000100-0300-0400-0005-000600070008"],
)
def test_placeholder_product_uuid_falls_through(tmp_path: Path, bad_uuid: str) -> None:
    root = make_tree(
        tmp_path, {**HW_ROW_1, PRODUCT_UUID: bad_uuid + "\n", MACHINE_ID: HEX_MACHINE_ID}
    )
    assert derive_agent_id(root, WORK_DIR, {}) == DASHED_MACHINE_ID


@pytest.mark.parametrize(
    "bad_name",
    [
        "\n",
        "",
        "--\n",
        "unknown\n",
        "To be filled by O.E.M.\n",
        "OEM not specify\n",
        "t.b.d\n",
        "T.B.D\n",
        "T.b.D\n",
    ],
)
def test_bad_product_name_falls_through_to_machine_id(tmp_path: Path, bad_name: str) -> None:
    root = make_tree(
        tmp_path, {**HW_ROW_1, PRODUCT_NAME: bad_name, MACHINE_ID: HEX_MACHINE_ID + "\n"}
    )
    assert derive_agent_id(root, WORK_DIR, {}) == DASHED_MACHINE_ID


def test_missing_product_name_falls_through(tmp_path: Path) -> None:
    files = {k: v for k, v in HW_ROW_1.items() if k != PRODUCT_NAME}
    root = make_tree(tmp_path, {**files, MACHINE_ID: HEX_MACHINE_ID})
    assert derive_agent_id(root, WORK_DIR, {}) == DASHED_MACHINE_ID


def test_short_product_name_is_a_good_one(tmp_path: Path) -> None:
    # Go's reader refuses files under 6 bytes, so the Go agent returned "" here; we keep
    # the hardware id.
    root = make_tree(tmp_path, {**HW_ROW_2, PRODUCT_NAME: "KVM\n", MACHINE_ID: HEX_MACHINE_ID})
    assert derive_agent_id(root, WORK_DIR, {}) == ID_ROW_2


def test_case_sensitive_product_name_entries_only_match_exactly(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {**HW_ROW_2, PRODUCT_NAME: "Unknown\n"})
    assert derive_agent_id(root, WORK_DIR, {}) == ID_ROW_2


def test_dashed_uppercase_machine_id_is_normalised(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {MACHINE_ID: DASHED_MACHINE_ID.upper() + "\n"})
    assert derive_agent_id(root, WORK_DIR, {}) == DASHED_MACHINE_ID


def test_machine_id_with_uuid_length_but_bad_format_is_hashed(tmp_path: Path) -> None:
    content = "3f1a9c2e_8b7d_4e6f_a1b2_c3d4e5f60718"  # 36 chars, no dashes
    root = make_tree(tmp_path, {MACHINE_ID: content + "\n", SAVED_ID: SAVED})
    assert derive_agent_id(root, WORK_DIR, {}) == str(uuid.uuid5(uuid.NAMESPACE_OID, content))


@pytest.mark.parametrize("content", ["short-id\n", "", "urn:abcd:" + DASHED_MACHINE_ID])
def test_machine_id_of_wrong_length_falls_through_to_saved_id(
    tmp_path: Path, content: str
) -> None:
    root = make_tree(tmp_path, {MACHINE_ID: content, SAVED_ID: SAVED + "\n"})
    assert derive_agent_id(root, WORK_DIR, {}) == SAVED


def test_saved_id_that_is_not_a_uuid_gives_a_random_one(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {SAVED_ID: "fixture-agent"})
    agent_id = derive_agent_id(root, WORK_DIR, {})
    assert uuid.UUID(agent_id).version == 4


def test_random_id_is_saved_and_reused(tmp_path: Path) -> None:
    (tmp_path / "etc/elkeid").mkdir(parents=True)
    first = load_agent_id(tmp_path, WORK_DIR, {})
    assert uuid.UUID(first).version == 4
    saved = tmp_path / SAVED_ID
    assert saved.read_text() == first  # no newline, like the Go agent
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert load_agent_id(tmp_path, WORK_DIR, {}) == first
    assert sorted(p.name for p in saved.parent.iterdir()) == ["machine-id"]  # no temp left


def test_load_overwrites_a_stale_saved_id(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {**HW_ROW_2, SAVED_ID: SAVED})
    (root / SAVED_ID).chmod(0o644)
    assert load_agent_id(root, WORK_DIR, {}) == ID_ROW_2
    assert (root / SAVED_ID).read_text() == ID_ROW_2
    assert stat.S_IMODE((root / SAVED_ID).stat().st_mode) == 0o600


def test_load_without_a_writable_work_dir_still_returns_the_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_tree(tmp_path, HW_ROW_2)  # no etc/elkeid directory
    health = Health()
    with caplog.at_level(logging.WARNING):
        assert load_agent_id(root, WORK_DIR, {}, health) == ID_ROW_2
    (detail,) = health.details()
    assert detail.startswith(f"{ID_FILE_UNIT}: cannot save: {WORK_DIR / 'machine-id'}: ENOENT")
    assert "cannot save" in caplog.text
    # The directory comes back: the next attempt saves the id and clears the fault.
    (root / "etc/elkeid").mkdir(parents=True)
    assert save_agent_id(root, WORK_DIR, ID_ROW_2, health)
    assert (root / SAVED_ID).read_text() == ID_ROW_2
    assert not health.details()


def test_an_id_already_saved_needs_no_write(tmp_path: Path) -> None:
    """A read-only work dir that already holds the id is no fault."""
    root = make_tree(tmp_path, {**HW_ROW_2, SAVED_ID: ID_ROW_2})
    (root / "etc/elkeid").chmod(0o500)
    (root / SAVED_ID).chmod(0o400)
    health = Health()
    try:
        assert load_agent_id(root, WORK_DIR, {}, health) == ID_ROW_2
    finally:
        (root / "etc/elkeid").chmod(0o700)
    assert not health.details()
    # Not rewritten (a rewrite would have made it 0600): root ignores the directory's mode.
    assert stat.S_IMODE((root / SAVED_ID).stat().st_mode) == 0o400


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (HEX_MACHINE_ID, DASHED_MACHINE_ID),
        (DASHED_MACHINE_ID, DASHED_MACHINE_ID),
        ("{" + DASHED_MACHINE_ID + "}", DASHED_MACHINE_ID),
        ("x" + DASHED_MACHINE_ID + "y", DASHED_MACHINE_ID),  # Go ignores the braces
        ("URN:uuid:" + DASHED_MACHINE_ID, DASHED_MACHINE_ID),
    ],
)
def test_parse_go_uuid_accepts_google_uuid_forms(text: str, expected: str) -> None:
    assert str(parse_go_uuid(text.encode())) == expected


@pytest.mark.parametrize("text", ["", "abc", HEX_MACHINE_ID + "0", "urn:abcd:" + DASHED_MACHINE_ID])
def test_parse_go_uuid_rejects_other_lengths_and_prefixes(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid (UUID length|urn prefix)"):
        parse_go_uuid(text.encode())


def test_uuid5_oid_matches_python_uuid5_for_text() -> None:
    for name in ["", "a", "i-0123456789abcdef0ec2a3b1c", "ünïcode"]:
        assert uuid5_oid(name.encode()) == uuid.uuid5(uuid.NAMESPACE_OID, name)


def test_relative_work_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absolute"):
        derive_agent_id(tmp_path, Path("etc/elkeid"), {})
