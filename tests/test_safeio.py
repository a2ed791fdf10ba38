"""pipelines.safeio: every kind of entry an input folder can hold, read or refused with a
reason; outputs published without writing through a planted link."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from cohortflow.pipelines.safeio import RefusedError, is_inside, printable, publish, read_regular


def _refused(path: Path, root: Path | None = None, **kw: object) -> str:
    with pytest.raises(RefusedError) as caught:
        read_regular(path, root, **kw)  # type: ignore[arg-type]
    return caught.value.code


def test_a_regular_file_is_read(tmp_path: Path) -> None:
    f = tmp_path / "a.dcm"
    f.write_bytes(b"x" * 1000)
    data, st = read_regular(f, tmp_path)
    assert data == b"x" * 1000 and st.st_size == 1000


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    done: list[str] = []
    worker = threading.Thread(target=lambda: done.append(_refused(fifo, tmp_path)), daemon=True)
    worker.start()
    worker.join(5)
    assert done == ["not_regular_file"], "reading a FIFO blocked"


def test_a_socket_and_a_device_are_refused(tmp_path: Path) -> None:
    sock_path = tmp_path / "s.dcm"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        assert _refused(sock_path, tmp_path) == "not_regular_file"
    assert _refused(Path("/dev/null")) == "not_regular_file"


def test_a_directory_named_like_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.dcm").mkdir()
    assert _refused(tmp_path / "x.dcm", tmp_path) == "is_directory"


def test_links_out_of_the_input_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "key"
    secret.write_bytes(b"secret")
    root = tmp_path / "in"
    root.mkdir()
    (root / "passwd.dcm").symlink_to("/etc/passwd")
    (root / "key.dcm").symlink_to(secret)
    assert _refused(root / "passwd.dcm", root) == "symlink"
    assert _refused(root / "key.dcm", root, follow=True) == "symlink"
    with pytest.raises(RefusedError) as caught:
        read_regular(root / "key.dcm", root, follow=True)
    assert "outside the input" in caught.value.reason and str(secret) in caught.value.reason


def test_a_link_inside_the_input_is_followed_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"abc")
    (tmp_path / "b.dcm").symlink_to(tmp_path / "a.dcm")
    assert _refused(tmp_path / "b.dcm", tmp_path) == "symlink"
    assert read_regular(tmp_path / "b.dcm", tmp_path, follow=True)[0] == b"abc"
    (tmp_path / "dangling.dcm").symlink_to(tmp_path / "gone")
    assert _refused(tmp_path / "dangling.dcm", tmp_path, follow=True) == "missing"


def test_missing_unreadable_and_too_large(tmp_path: Path) -> None:
    assert _refused(tmp_path / "nothing.dcm", tmp_path) == "missing"
    big = tmp_path / "big.dcm"
    big.write_bytes(b"0" * 2048)
    assert _refused(big, tmp_path, max_bytes=1024) == "too_large"
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.dcm"
        locked.write_bytes(b"x")
        locked.chmod(0)
        assert _refused(locked, tmp_path) == "permission_denied"


def test_publish_replaces_a_planted_link_instead_of_writing_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.dcm").symlink_to(victim)
    publish(out / "result.dcm", b"new", out)
    assert victim.read_bytes() == b"keep me"
    assert not (out / "result.dcm").is_symlink()
    assert (out / "result.dcm").read_bytes() == b"new"
    assert [p.name for p in out.iterdir()] == ["result.dcm"]  # no temporary file left


def test_publish_refuses_a_folder_that_leads_out_of_the_output(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "series").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(RefusedError) as caught:
        publish(out / "series" / "1.dcm", b"x", out)
    assert caught.value.code == "outside_output"
    assert not any(elsewhere.iterdir())


def test_is_inside_resolves_dot_dot(tmp_path: Path) -> None:
    assert is_inside(tmp_path / "a" / "b", tmp_path)
    assert not is_inside(tmp_path / "a" / ".." / ".." / "etc", tmp_path)
    assert not is_inside(str(tmp_path) + "-sibling", tmp_path)


def test_printable_escapes_what_could_forge_a_report_line() -> None:
    forged = "a.dcm\n| fake | row |\x1b[2J\u202e"
    shown = printable(forged)
    assert "\n" not in shown and "\x1b" not in shown and "\u202e" not in shown
    assert shown == "a.dcm\\x0a| fake | row |\\x1b[2J\\u202e"
    assert printable(b"caf\xe9.dcm") == "caf\\xe9.dcm"
    assert printable("Müller^Jörg") == "Müller^Jörg"  # letters stay letters


def test_exclusive_publish_never_overwrites_other_content(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert publish(out / "1.dcm", b"first", out, exclusive=True)
    assert not publish(out / "1.dcm", b"first", out, exclusive=True)  # a rerun: same bytes
    with pytest.raises(RefusedError) as caught:
        publish(out / "1.dcm", b"second", out, exclusive=True)
    assert caught.value.code == "output_exists"
    assert (out / "1.dcm").read_bytes() == b"first"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (out / "2.dcm").symlink_to(victim)
    with pytest.raises(RefusedError):
        publish(out / "2.dcm", b"keep", out, exclusive=True)  # not even equal bytes via a link
    assert victim.read_bytes() == b"keep"
    assert sorted(p.name for p in out.iterdir()) == ["1.dcm", "2.dcm"]
