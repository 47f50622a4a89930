"""Paths are limited to configured roots, and the refusal says how to widen them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.paths import ENV_ALLOWED_ROOTS, PathNotAllowed, PathPolicy, default_roots


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "data").mkdir(parents=True)
    outside.mkdir()
    (root / "data" / "train.jsonl").write_text("{}\n")
    (outside / "secret.txt").write_text("no")
    return root, outside


def test_inside_root_is_resolved(layout):
    root, _ = layout
    policy = PathPolicy([root])
    got = policy.check(root / "data" / "train.jsonl", must_exist=True)
    assert got == Path(os.path.realpath(root)) / "data" / "train.jsonl"
    assert got.is_absolute()
    assert policy.check(root) == Path(os.path.realpath(root))


def test_outside_refused(layout):
    root, outside = layout
    with pytest.raises(PathNotAllowed) as info:
        PathPolicy([root]).check(outside / "secret.txt")
    assert info.value.path == str(outside / "secret.txt")
    assert info.value.roots == [os.path.realpath(root)]


def test_sibling_with_common_prefix_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root2").mkdir()
    with pytest.raises(PathNotAllowed):
        PathPolicy([tmp_path / "root"]).check(tmp_path / "root2" / "x")


def test_dotdot_escape_refused(layout):
    root, _ = layout
    policy = PathPolicy([root])
    with pytest.raises(PathNotAllowed):
        policy.check(f"{root}/data/../../outside/secret.txt")
    # '..' that stays inside is fine
    assert policy.check(f"{root}/data/../data/train.jsonl").name == "train.jsonl"


def test_dotdot_in_missing_part_refused(layout):
    root, _ = layout
    with pytest.raises(PathNotAllowed, match=r"'\.\.'"):
        PathPolicy([root]).check(f"{root}/new/../../outside/x")


def test_symlink_pointing_outside_refused(layout):
    root, outside = layout
    (root / "link").symlink_to(outside)
    (root / "file_link").symlink_to(outside / "secret.txt")
    (root / "dangling").symlink_to(outside / "not-yet")
    policy = PathPolicy([root])
    for p in (root / "link" / "secret.txt", root / "file_link", root / "link" / "new" / "out", root / "dangling"):
        with pytest.raises(PathNotAllowed) as info:
            policy.check(p)
        assert "symlink" in str(info.value)


def test_symlink_inside_root_is_followed(layout):
    root, _ = layout
    (root / "alias").symlink_to(root / "data")
    got = PathPolicy([root]).check(root / "alias" / "train.jsonl")
    assert got == Path(os.path.realpath(root)) / "data" / "train.jsonl"


def test_missing_output_under_root_ok(layout):
    root, _ = layout
    got = PathPolicy([root]).check(root / "runs" / "adapter-1" / "weights.safetensors")
    assert got == Path(os.path.realpath(root)) / "runs" / "adapter-1" / "weights.safetensors"
    assert not got.parent.exists()


def test_must_exist(layout):
    root, _ = layout
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PathPolicy([root]).check(root / "nope.jsonl", must_exist=True)


def test_outside_refused_before_existence_is_revealed(layout):
    root, outside = layout
    with pytest.raises(PathNotAllowed):
        PathPolicy([root]).check(outside / "nope", must_exist=True)


def test_relative_paths_resolve_against_cwd(layout, monkeypatch):
    root, outside = layout
    policy = PathPolicy([root])
    monkeypatch.chdir(root)
    assert policy.check("data/train.jsonl") == Path(os.path.realpath(root)) / "data" / "train.jsonl"
    monkeypatch.chdir(outside)
    with pytest.raises(PathNotAllowed):
        policy.check("secret.txt")


def test_tilde_expands(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    assert PathPolicy(["~"]).check("~/models") == Path(os.path.realpath(tmp_path)) / "models"


def test_roots_are_resolved_and_deduplicated(layout):
    root, outside = layout
    policy = PathPolicy([root, f"{root}/data/..", outside, root])
    assert policy.roots == (Path(os.path.realpath(root)), Path(os.path.realpath(outside)))


def test_error_message_names_roots_and_remedy(layout):
    root, outside = layout
    with pytest.raises(PathNotAllowed) as info:
        PathPolicy([root]).check(outside)
    message = str(info.value)
    assert os.path.realpath(root) in message
    assert "--allow-root" in message and ENV_ALLOWED_ROOTS in message


def test_empty_path_refused(layout):
    root, _ = layout
    with pytest.raises(PathNotAllowed):
        PathPolicy([root]).check("")


def test_default_roots_order_and_env_parsing(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    env = {ENV_ALLOWED_ROOTS: os.pathsep.join(["/data/a", "", "rel", "/data/b", ""])}
    roots = default_roots(home, cwd, env, ["/extra"])
    assert roots == [home, cwd, Path("/data/a"), cwd / "rel", Path("/data/b"), Path("/extra")]
    assert default_roots(home, cwd, {}, []) == [home, cwd]


def test_default_roots_feed_policy(tmp_path):
    home, cwd, extra = (tmp_path / n for n in ("home", "cwd", "extra"))
    for d in (home, cwd, extra):
        d.mkdir()
    policy = PathPolicy(default_roots(home, cwd, {ENV_ALLOWED_ROOTS: str(extra)}, []))
    assert policy.check(extra / "x") == Path(os.path.realpath(extra)) / "x"
    assert policy.allows(home / "y") and not policy.allows(tmp_path / "z")
