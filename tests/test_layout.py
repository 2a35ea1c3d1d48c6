"""The data folder's one owner of paths: the UID policy, the checks, one node per folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pacs_node.layout import DataDirInUse, DataLayout, OutsideDataDir, UIDRefused, uid_name


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "0", "1.0.2", "2.25." + "9" * 59])
def test_conformant_uids_are_their_own_names(uid):
    assert uid_name(uid) == uid


@pytest.mark.parametrize("uid", ["..", ".", "/etc", "../../x", "1.2/3", "1.2_3", "1.02.3",
                                 "1..2", "1.2.", "abc", "~root", "C:"])
def test_other_usable_uids_are_hashed_never_paths(uid):
    name = uid_name(uid)
    assert name.startswith("_") and len(name) == 41
    assert "/" not in name and name not in (".", "..")


def test_hashed_names_do_not_collide():
    names = {uid_name(u) for u in ["1.2/3", "1.2_3", "1.2\\3".replace("\\", ":"), "1.02.3",
                                   "1.2.3a", "x" * 64, "x" * 63 + "y"]}
    assert len(names) == 7


@pytest.mark.parametrize("uid, why", [("", "missing"), ("1." * 40, "above 64"),
                                      ("1.2\x00.3", "characters"), ("1.2\n", "characters"),
                                      ("1.2.\u00e9", "characters"), ("1\\2", "characters")])
def test_unusable_uids_are_refused_with_a_reason(uid, why):
    with pytest.raises(UIDRefused, match=why):
        uid_name(uid, "SOP Instance UID")


def test_every_path_stays_inside_the_data_folder(tmp_path):
    layout = DataLayout(tmp_path / "var")
    for study, series in [("..", ".."), (".", "."), ("/tmp/x", "/"), ("1.2", "../../..")]:
        for path in (layout.instance_path(study, series, ".."),
                     layout.results_folder(study, series, 1)):
            assert layout.inside(path).is_relative_to(layout.root)
    with pytest.raises(OutsideDataDir):
        layout.inside(tmp_path / "var" / ".." / "elsewhere")
    with pytest.raises(OutsideDataDir):
        layout.inside(layout.root)                  # the folder itself is never a target


def test_removing_a_tree_never_leaves_incoming_or_results(tmp_path):
    layout = DataLayout(tmp_path / "var")
    keep = tmp_path / "outside"
    keep.mkdir()
    (keep / "precious").write_text("x")
    layout.incoming.mkdir(parents=True)
    (layout.incoming / "link").symlink_to(keep)
    layout.remove_tree(layout.incoming / "link")     # the link goes, not what it points to
    assert (keep / "precious").exists() and not (layout.incoming / "link").exists()
    for target in (layout.incoming, layout.results, layout.root, keep, layout.root / "x"):
        with pytest.raises(OutsideDataDir):
            layout.remove_tree(target)
    assert (keep / "precious").exists()


def test_a_second_process_cannot_take_the_data_folder(tmp_path):
    layout = DataLayout(tmp_path / "var")
    layout.lock()
    try:
        code = ("from pacs_node.layout import DataLayout, DataDirInUse\n"
                f"try:\n    DataLayout({str(tmp_path / 'var')!r}).lock()\n"
                "except DataDirInUse as e:\n    print(e)\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60)
        assert f"in use by process {os.getpid()}" in proc.stdout, proc.stdout + proc.stderr
    finally:
        layout.unlock()
    DataLayout(tmp_path / "var").lock()             # free again once released
    assert issubclass(DataDirInUse, OSError)
